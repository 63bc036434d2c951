use std::collections::{BTreeSet, HashMap};

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption, QueryParameter};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value as ProtoValue};
use envoy_types::pb::google::rpc::Status;
use regorus::Value;
use serde_json::json;

use super::*;

fn policy_value(json: &str) -> Value {
    Value::from_json_str(json).expect("test JSON is valid")
}

fn decision(json: &str) -> Decision {
    parse_decision(&policy_value(json)).expect("decision is valid")
}

fn decision_error(json: &str) -> String {
    parse_decision(&policy_value(json))
        .expect_err("decision is invalid")
        .to_string()
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect()
}

fn header(name: &str, value: &str, action: HeaderAppendAction) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: name.to_owned(),
            value: value.to_owned(),
            raw_value: Vec::new(),
        }),
        append_action: action as i32,
        ..HeaderValueOption::default()
    }
}

fn string_value(text: &str) -> ProtoValue {
    ProtoValue {
        kind: Some(Kind::StringValue(text.to_owned())),
    }
}

fn metadata(fields: &[(&str, ProtoValue)]) -> Option<Struct> {
    let fields: HashMap<String, ProtoValue> = fields
        .iter()
        .map(|(name, value)| ((*name).to_owned(), value.clone()))
        .collect();
    Some(Struct { fields })
}

fn status(code: i32) -> Option<Status> {
    Some(Status {
        code,
        message: String::new(),
        details: Vec::new(),
    })
}

// Decision shapes.

#[test]
fn true_allows() {
    assert_eq!(
        parse_decision(&Value::from(true)),
        Ok(Decision {
            allowed: true,
            ..Decision::default()
        })
    );
}

#[test]
fn false_denies() {
    assert_eq!(parse_decision(&Value::from(false)), Ok(Decision::default()));
}

#[test]
fn undefined_decision_is_error() {
    assert_eq!(
        parse_decision(&Value::Undefined),
        Err(DecisionError::Undefined)
    );
}

#[test]
fn decision_of_other_type_is_error() {
    assert_eq!(
        decision_error("null"),
        "the policy decision must be a boolean or an object, found null"
    );
    assert_eq!(
        decision_error(r#""allow""#),
        "the policy decision must be a boolean or an object, found \"allow\""
    );
    assert_eq!(
        decision_error("[true]"),
        "the policy decision must be a boolean or an object, found an array"
    );
}

#[test]
fn object_without_allowed_is_error() {
    assert_eq!(
        decision_error(r#"{"http_status": 401}"#),
        "the policy decision object has no \"allowed\" field"
    );
}

#[test]
fn allowed_that_is_not_boolean_is_error() {
    assert_eq!(
        decision_error(r#"{"allowed": "true"}"#),
        "decision field \"allowed\" must be a boolean, found \"true\""
    );
}

#[test]
fn full_allow_object_is_read() {
    let decision = decision(
        r#"{
          "allowed": true,
          "headers": {"X-User": "alice", "x-roles": ["admin", "dev"]},
          "response_headers_to_add": [{"set-cookie": "a=1"}, {"set-cookie": "b=2"}],
          "request_headers_to_remove": ["Authorization", "x-debug"],
          "query_parameters_to_set": {"page": "2", "tag": ["x", "y"]},
          "query_parameters_to_remove": ["token"],
          "dynamic_metadata": {"tenant": "blue", "score": 7, "tags": ["a"]},
          "note": "members with other names are ignored"
        }"#,
    );
    let mut expected_metadata = serde_json::Map::new();
    expected_metadata.insert("score".to_owned(), json!(7));
    expected_metadata.insert("tags".to_owned(), json!(["a"]));
    expected_metadata.insert("tenant".to_owned(), json!("blue"));
    assert_eq!(
        decision,
        Decision {
            allowed: true,
            http_status: None,
            headers: pairs(&[
                ("x-user", "alice"),
                ("x-roles", "admin"),
                ("x-roles", "dev")
            ]),
            response_headers_to_add: pairs(&[("set-cookie", "a=1"), ("set-cookie", "b=2")]),
            request_headers_to_remove: vec!["authorization".to_owned(), "x-debug".to_owned()],
            query_parameters_to_set: pairs(&[("page", "2"), ("tag", "x"), ("tag", "y")]),
            query_parameters_to_remove: vec!["token".to_owned()],
            body: None,
            dynamic_metadata: expected_metadata,
            reason: None,
        }
    );
}

#[test]
fn full_deny_object_is_read() {
    let decision = decision(
        r#"{
          "allowed": false,
          "http_status": 401,
          "headers": [{"www-authenticate": "Bearer"}, {"WWW-Authenticate": "Basic"}],
          "body": "{\"error\": \"login required\"}"
        }"#,
    );
    assert_eq!(
        decision,
        Decision {
            allowed: false,
            http_status: Some(401),
            headers: pairs(&[
                ("www-authenticate", "Bearer"),
                ("www-authenticate", "Basic")
            ]),
            body: Some(r#"{"error": "login required"}"#.to_owned()),
            ..Decision::default()
        }
    );
}

#[test]
fn sets_are_read_as_arrays() {
    let names: BTreeSet<Value> = [Value::from("x-b"), Value::from("x-a")]
        .into_iter()
        .collect();
    let mut members = regorus::value::Object::new();
    members.insert(Value::from("allowed"), Value::from(true));
    members.insert(
        Value::from("request_headers_to_remove"),
        Value::from(names.clone()),
    );
    members.insert(Value::from("dynamic_metadata"), {
        let mut metadata = regorus::value::Object::new();
        metadata.insert(Value::from("names"), Value::from(names));
        metadata.into_value()
    });

    let decision = parse_decision(&members.into_value()).expect("decision is valid");
    assert_eq!(
        decision.request_headers_to_remove,
        vec!["x-a".to_owned(), "x-b".to_owned()]
    );
    assert_eq!(
        decision.dynamic_metadata.get("names"),
        Some(&json!(["x-a", "x-b"]))
    );
}

#[test]
fn http_status_text_is_error() {
    assert_eq!(
        decision_error(r#"{"allowed": false, "http_status": "abc"}"#),
        "decision field \"http_status\" must be an integer from 100 to 599, found \"abc\""
    );
}

#[test]
fn http_status_out_of_range_is_error() {
    for (status, found) in [
        ("600", "600"),
        ("99", "99"),
        ("-403", "-403"),
        ("200.5", "200.5"),
    ] {
        assert_eq!(
            decision_error(&format!(r#"{{"allowed": false, "http_status": {status}}}"#)),
            format!(
                "decision field \"http_status\" must be an integer from 100 to 599, found {found}"
            )
        );
    }
}

#[test]
fn http_status_unknown_to_envoy_is_error() {
    for status in [299, 418] {
        assert_eq!(
            decision_error(&format!(r#"{{"allowed": false, "http_status": {status}}}"#)),
            format!(
                "decision field \"http_status\" must be an HTTP status code listed in Envoy's envoy.type.v3.StatusCode, found {status}"
            )
        );
    }
}

#[test]
fn http_status_written_as_float_is_accepted() {
    assert_eq!(
        decision(r#"{"allowed": false, "http_status": 429.0}"#).http_status,
        Some(429)
    );
}

#[test]
fn invalid_header_name_is_error() {
    assert_eq!(
        decision_error(r#"{"allowed": true, "headers": {"x user": "a"}}"#),
        "decision field \"headers\" contains an invalid HTTP header name \"x user\""
    );
    assert_eq!(
        decision_error(r#"{"allowed": true, "request_headers_to_remove": [":path"]}"#),
        "decision field \"request_headers_to_remove[0]\" contains an invalid HTTP header name \":path\""
    );
    assert_eq!(
        decision_error(r#"{"allowed": true, "response_headers_to_add": [{"": "a"}]}"#),
        "decision field \"response_headers_to_add[0]\" contains an invalid HTTP header name \"\""
    );
}

#[test]
fn header_value_with_line_break_is_error() {
    assert_eq!(
        decision_error(r#"{"allowed": true, "headers": {"x-a": "1\r\nx-admin: true"}}"#),
        "decision field \"headers.x-a\" contains CR, LF or NUL, which headers and query parameters must not contain: \"1\\r\\nx-admin: true\""
    );
    assert_eq!(
        decision_error(r#"{"allowed": true, "headers": {"x-a": ["ok", "bad\u0000"]}}"#),
        "decision field \"headers.x-a[1]\" contains CR, LF or NUL, which headers and query parameters must not contain: \"bad\\0\""
    );
}

#[test]
fn query_parameter_with_line_break_is_error() {
    assert_eq!(
        decision_error(r#"{"allowed": true, "query_parameters_to_set": {"a\nb": "1"}}"#),
        "decision field \"query_parameters_to_set\" contains CR, LF or NUL, which headers and query parameters must not contain: \"a\\nb\""
    );
}

#[test]
fn header_value_of_wrong_type_is_error() {
    assert_eq!(
        decision_error(r#"{"allowed": true, "headers": {"x-a": 5}}"#),
        "decision field \"headers.x-a\" must be a string or an array of strings, found 5"
    );
    assert_eq!(
        decision_error(r#"{"allowed": true, "headers": {"x-a": ["1", true]}}"#),
        "decision field \"headers.x-a[1]\" must be a string, found true"
    );
    assert_eq!(
        decision_error(r#"{"allowed": true, "headers": "x-a: 1"}"#),
        "decision field \"headers\" must be an object of names to strings, or an array of such objects, found \"x-a: 1\""
    );
    assert_eq!(
        decision_error(r#"{"allowed": true, "headers": [{"x-a": "1"}, "x-b"]}"#),
        "decision field \"headers[1]\" must be an object of names to strings, found \"x-b\""
    );
}

#[test]
fn removal_list_of_wrong_type_is_error() {
    assert_eq!(
        decision_error(r#"{"allowed": true, "request_headers_to_remove": "x-a"}"#),
        "decision field \"request_headers_to_remove\" must be an array of strings, found \"x-a\""
    );
    assert_eq!(
        decision_error(r#"{"allowed": true, "query_parameters_to_remove": [1]}"#),
        "decision field \"query_parameters_to_remove[0]\" must be a string, found 1"
    );
}

#[test]
fn body_that_is_not_string_is_error() {
    assert_eq!(
        decision_error(r#"{"allowed": false, "body": {"error": "no"}}"#),
        "decision field \"body\" must be a string, found an object"
    );
}

#[test]
fn dynamic_metadata_that_is_not_object_is_error() {
    assert_eq!(
        decision_error(r#"{"allowed": true, "dynamic_metadata": ["a"]}"#),
        "decision field \"dynamic_metadata\" must be an object, found an array"
    );
}

#[test]
fn long_strings_are_cut_in_errors() {
    let long = "x".repeat(100);
    assert_eq!(
        decision_error(&format!(r#"{{"allowed": "{long}"}}"#)),
        format!(
            "decision field \"allowed\" must be a boolean, found \"{}\"...",
            "x".repeat(40)
        )
    );
}

#[test]
fn deny_helper_sets_status_and_reason() {
    assert_eq!(
        Decision::deny(401, "invalid token: expired"),
        Decision {
            allowed: false,
            http_status: Some(401),
            reason: Some("invalid token: expired".to_owned()),
            ..Decision::default()
        }
    );
}

// Responses.

#[test]
fn allow_gives_ok_response() {
    let response = check_response(&decision("true"), "d-1");
    assert_eq!(
        response,
        CheckResponse {
            status: status(0),
            dynamic_metadata: metadata(&[("decision_id", string_value("d-1"))]),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
        }
    );
}

#[test]
fn deny_gives_403_by_default() {
    let response = check_response(&decision("false"), "d-2");
    assert_eq!(
        response,
        CheckResponse {
            status: status(7),
            dynamic_metadata: metadata(&[("decision_id", string_value("d-2"))]),
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus { code: 403 }),
                headers: Vec::new(),
                body: String::new(),
            })),
        }
    );
}

#[test]
fn allow_object_gives_request_mutations() {
    let decision = decision(
        r#"{
          "allowed": true,
          "http_status": 401,
          "body": "ignored when allowed",
          "headers": [{"x-user": "alice"}, {"x-user": "bob", "x-team": "blue"}],
          "response_headers_to_add": {"set-cookie": ["a=1", "b=2"]},
          "request_headers_to_remove": ["authorization"],
          "query_parameters_to_set": [{"page": "2"}],
          "query_parameters_to_remove": ["token"],
          "dynamic_metadata": {"tenant": "blue", "decision_id": "from-policy", "nested": {"n": [1]}}
        }"#,
    );
    let response = check_response(&decision, "d-3");

    let nested = metadata(&[(
        "n",
        ProtoValue {
            kind: Some(Kind::ListValue(ListValue {
                values: vec![ProtoValue {
                    kind: Some(Kind::NumberValue(1.0)),
                }],
            })),
        },
    )])
    .map(|fields| ProtoValue {
        kind: Some(Kind::StructValue(fields)),
    })
    .expect("nested struct");
    assert_eq!(
        response,
        CheckResponse {
            status: status(0),
            dynamic_metadata: metadata(&[
                ("decision_id", string_value("d-3")),
                ("tenant", string_value("blue")),
                ("nested", nested),
            ]),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers: vec![
                    header(
                        "x-user",
                        "alice",
                        HeaderAppendAction::OverwriteIfExistsOrAdd
                    ),
                    header("x-team", "blue", HeaderAppendAction::OverwriteIfExistsOrAdd),
                    header("x-user", "bob", HeaderAppendAction::AppendIfExistsOrAdd),
                ],
                headers_to_remove: vec!["authorization".to_owned()],
                response_headers_to_add: vec![
                    header("set-cookie", "a=1", HeaderAppendAction::AppendIfExistsOrAdd),
                    header("set-cookie", "b=2", HeaderAppendAction::AppendIfExistsOrAdd),
                ],
                query_parameters_to_set: vec![QueryParameter {
                    key: "page".to_owned(),
                    value: "2".to_owned(),
                }],
                query_parameters_to_remove: vec!["token".to_owned()],
                ..OkHttpResponse::default()
            })),
        }
    );
}

#[test]
fn deny_object_gives_status_headers_and_body() {
    let decision = decision(
        r#"{
          "allowed": false,
          "http_status": 429,
          "headers": {"retry-after": "30", "set-cookie": ["a=1", "b=2"]},
          "response_headers_to_add": {"x-ignored": "when denied"},
          "body": "slow down"
        }"#,
    );
    let response = check_response(&decision, "d-4");
    assert_eq!(
        response,
        CheckResponse {
            status: status(7),
            dynamic_metadata: metadata(&[("decision_id", string_value("d-4"))]),
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus { code: 429 }),
                headers: vec![
                    header(
                        "retry-after",
                        "30",
                        HeaderAppendAction::OverwriteIfExistsOrAdd
                    ),
                    header(
                        "set-cookie",
                        "a=1",
                        HeaderAppendAction::OverwriteIfExistsOrAdd
                    ),
                    header("set-cookie", "b=2", HeaderAppendAction::AppendIfExistsOrAdd),
                ],
                body: "slow down".to_owned(),
            })),
        }
    );
}

#[test]
fn portcullis_deny_gives_its_status() {
    let mut decision = Decision::deny(401, "invalid token");
    decision.headers = pairs(&[("www-authenticate", "Bearer error=\"invalid_token\"")]);
    decision.body = Some("invalid token".to_owned());
    let response = check_response(&decision, "d-5");
    assert_eq!(
        response.http_response,
        Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus { code: 401 }),
            headers: vec![header(
                "www-authenticate",
                "Bearer error=\"invalid_token\"",
                HeaderAppendAction::OverwriteIfExistsOrAdd
            )],
            body: "invalid token".to_owned(),
        }))
    );
    assert_eq!(response.status, status(7));
}

#[test]
fn long_forbidden_value_is_cut_in_error() {
    let value = format!("{}\\n", "v".repeat(60));
    assert_eq!(
        decision_error(&format!(
            r#"{{"allowed": true, "headers": {{"x-a": "{value}"}}}}"#
        )),
        format!(
            "decision field \"headers.x-a\" contains CR, LF or NUL, which headers and query parameters must not contain: \"{}\"...",
            "v".repeat(40)
        )
    );
}
