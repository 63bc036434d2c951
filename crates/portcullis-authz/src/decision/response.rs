//! The `CheckResponse` that carries a decision back to Envoy.

use std::collections::{HashMap, HashSet};

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption, QueryParameter};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::{ListValue, NullValue, Struct, Value as ProtoValue};
use envoy_types::pb::google::rpc::Status;

use super::Decision;

/// gRPC status code OK, with which Envoy lets the request through.
const GRPC_OK: i32 = 0;

/// gRPC status code PERMISSION_DENIED, with which Envoy sends the denied response downstream.
const GRPC_PERMISSION_DENIED: i32 = 7;

/// Status of a denial when the decision sets none, as in the OPA Envoy plugin and Envoy itself.
const DEFAULT_DENIED_STATUS: u16 = 403;

/// Key under which every response's dynamic metadata carries the decision id. It replaces a key
/// of the same name set by the policy, so logs can always be joined on it.
pub const DECISION_ID_KEY: &str = "decision_id";

/// Builds the response that carries `decision` to Envoy.
///
/// An allowed decision gives gRPC status OK and an `OkHttpResponse` with the request and response
/// mutations. A denied one gives PERMISSION_DENIED and a `DeniedHttpResponse` with the status
/// (403 by default), headers and body. `headers` replace request or response headers of the same
/// name, as the OPA Envoy plugin's do: the first occurrence of a name overwrites, and further
/// occurrences of it are added beside it. `response_headers_to_add` are always added.
pub fn check_response(decision: &Decision, decision_id: &str) -> CheckResponse {
    let mut metadata = decision.dynamic_metadata.clone();
    metadata.insert(
        DECISION_ID_KEY.to_owned(),
        serde_json::Value::String(decision_id.to_owned()),
    );
    let dynamic_metadata = Some(json_object_to_struct(&metadata));

    if decision.allowed {
        let ok = OkHttpResponse {
            headers: replacing_header_options(&decision.headers),
            headers_to_remove: decision.request_headers_to_remove.clone(),
            response_headers_to_add: adding_header_options(&decision.response_headers_to_add),
            query_parameters_to_set: decision
                .query_parameters_to_set
                .iter()
                .map(|(key, value)| QueryParameter {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect(),
            query_parameters_to_remove: decision.query_parameters_to_remove.clone(),
            ..OkHttpResponse::default()
        };
        return CheckResponse {
            status: Some(grpc_status(GRPC_OK)),
            dynamic_metadata,
            http_response: Some(HttpResponse::OkResponse(ok)),
        };
    }

    let status = decision.http_status.unwrap_or(DEFAULT_DENIED_STATUS);
    let denied = DeniedHttpResponse {
        status: Some(HttpStatus {
            code: i32::from(status),
        }),
        headers: replacing_header_options(&decision.headers),
        body: decision.body.clone().unwrap_or_default(),
    };
    CheckResponse {
        status: Some(grpc_status(GRPC_PERMISSION_DENIED)),
        dynamic_metadata,
        http_response: Some(HttpResponse::DeniedResponse(denied)),
    }
}

fn grpc_status(code: i32) -> Status {
    Status {
        code,
        ..Status::default()
    }
}

/// Header options that replace existing headers of the same name. The `append_action` is set
/// explicitly because Envoy's ext_authz gRPC client (`ext_authz_grpc_impl.cc` on Envoy's main
/// branch) reads an unset one as APPEND_IF_EXISTS_OR_ADD, the enum's zero value.
fn replacing_header_options(headers: &[(String, String)]) -> Vec<HeaderValueOption> {
    let mut seen = HashSet::new();
    headers
        .iter()
        .map(|(name, value)| {
            let action = if seen.insert(name.as_str()) {
                HeaderAppendAction::OverwriteIfExistsOrAdd
            } else {
                HeaderAppendAction::AppendIfExistsOrAdd
            };
            header_option(name, value, action)
        })
        .collect()
}

fn adding_header_options(headers: &[(String, String)]) -> Vec<HeaderValueOption> {
    headers
        .iter()
        .map(|(name, value)| header_option(name, value, HeaderAppendAction::AppendIfExistsOrAdd))
        .collect()
}

fn header_option(name: &str, value: &str, action: HeaderAppendAction) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: name.to_owned(),
            value: value.to_owned(),
            ..HeaderValue::default()
        }),
        append_action: action as i32,
        ..HeaderValueOption::default()
    }
}

fn json_object_to_struct(object: &serde_json::Map<String, serde_json::Value>) -> Struct {
    let fields: HashMap<String, ProtoValue> = object
        .iter()
        .map(|(key, value)| (key.clone(), json_to_proto_value(value)))
        .collect();
    Struct { fields }
}

/// Converts JSON to a `google.protobuf.Value`. Numbers become doubles, so integers beyond 2^53
/// lose precision, as in every protobuf Struct.
fn json_to_proto_value(value: &serde_json::Value) -> ProtoValue {
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(NullValue::NullValue as i32),
        serde_json::Value::Bool(flag) => Kind::BoolValue(*flag),
        serde_json::Value::Number(number) => Kind::NumberValue(number.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(text) => Kind::StringValue(text.clone()),
        serde_json::Value::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(json_to_proto_value).collect(),
        }),
        serde_json::Value::Object(members) => Kind::StructValue(json_object_to_struct(members)),
    };
    ProtoValue { kind: Some(kind) }
}
