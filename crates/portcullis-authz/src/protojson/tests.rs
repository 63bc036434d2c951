use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::envoy_internal_address::AddressNameSpecifier;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{
    Address, EnvoyInternalAddress, Metadata, Pipe, SocketAddress,
};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Peer, Request, TlsSession,
};
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::{Any, Struct, Timestamp, Value as ProtoValue};
use prost::Message as _;
use regorus::Value;
use serde_json::json;

use super::*;

const FULL_FIXTURE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/check_request_full.json"
));

const SNAKE_CASE_FIXTURE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/check_request_snake_case.json"
));

fn policy_value(json: &str) -> Value {
    Value::from_json_str(json).expect("test JSON is valid")
}

fn encode(ctx: &AttributeContext) -> Value {
    attribute_context_to_value(ctx)
}

fn decode(json: serde_json::Value) -> Result<CheckRequest, ProtojsonError> {
    check_request_from_json(&json)
}

fn decode_error(json: serde_json::Value) -> String {
    decode(json).expect_err("document is invalid").to_string()
}

fn with_http(http: HttpRequest) -> AttributeContext {
    AttributeContext {
        request: Some(Request {
            time: None,
            http: Some(http),
        }),
        ..AttributeContext::default()
    }
}

fn timestamp_text(seconds: i64, nanos: i32) -> Option<String> {
    format_timestamp(&Timestamp { seconds, nanos })
}

#[test]
fn full_fixture_round_trips() {
    let json: serde_json::Value = serde_json::from_str(FULL_FIXTURE).expect("fixture is JSON");
    let request = check_request_from_json(&json).expect("fixture decodes");
    let attributes = request.attributes.as_ref().expect("fixture has attributes");

    let expected = policy_value(FULL_FIXTURE);
    assert_eq!(encode(attributes), expected["attributes"]);
}

#[test]
fn full_fixture_survives_wire_encoding() {
    let json: serde_json::Value = serde_json::from_str(FULL_FIXTURE).expect("fixture is JSON");
    let request = check_request_from_json(&json).expect("fixture decodes");

    let bytes = request.encode_to_vec();
    let decoded = CheckRequest::decode(bytes.as_slice()).expect("wire bytes decode");
    assert_eq!(decoded, request);
}

#[test]
fn full_fixture_decodes_field_values() {
    let json: serde_json::Value = serde_json::from_str(FULL_FIXTURE).expect("fixture is JSON");
    let request = check_request_from_json(&json).expect("fixture decodes");
    let attributes = request.attributes.expect("fixture has attributes");
    let http = attributes
        .request
        .as_ref()
        .and_then(|request| request.http.as_ref())
        .expect("fixture has http");

    assert_eq!(http.size, 25);
    assert_eq!(http.raw_body, br#"{"item":"book","count":2}"#.to_vec());
    let header_map = http.header_map.as_ref().expect("fixture has headerMap");
    assert_eq!(
        header_map.headers[1].raw_value,
        vec![0x00, 0x01, 0x02, 0xff]
    );
    assert_eq!(
        attributes.request.as_ref().and_then(|request| request.time),
        Some(Timestamp {
            seconds: 1_714_566_896,
            nanos: 789_000_000
        })
    );
    let destination = attributes.destination.expect("fixture has destination");
    let Some(AddressKind::SocketAddress(socket)) =
        destination.address.and_then(|address| address.address)
    else {
        panic!("destination is not a socket address");
    };
    assert_eq!(socket.protocol, 1);
    assert_eq!(socket.port_specifier, Some(PortSpecifier::PortValue(0)));
    assert!(socket.ipv4_compat);
}

#[test]
fn snake_case_names_decode_like_camel_case() {
    let json: serde_json::Value =
        serde_json::from_str(SNAKE_CASE_FIXTURE).expect("fixture is JSON");
    let request = check_request_from_json(&json).expect("fixture decodes");
    let attributes = request.attributes.expect("fixture has attributes");

    let expected = policy_value(
        r#"{
          "source": {"address": {"socketAddress": {"address": "10.0.0.7", "portValue": 51324}}},
          "destination": {"address": {"envoyInternalAddress": {
              "serverListenerName": "internal-listener", "endpointId": "orders-1"}}},
          "request": {
            "time": "2024-05-01T12:34:56.789Z",
            "http": {
              "method": "GET",
              "headerMap": {"headers": [{"key": "x-binary", "rawValue": "AAEC/w=="}]},
              "path": "/orders",
              "size": "26",
              "rawBody": "eyJpdGVtIjoiYm9vayJ9"
            }
          },
          "contextExtensions": {"virtual_host": "orders"},
          "routeMetadataContext": {"filterMetadata": {"route": {"tier": "gold"}}},
          "tlsSession": {"sni": "orders.shop.example"}
        }"#,
    );
    assert_eq!(encode(&attributes), expected);
}

#[test]
fn unknown_field_error_names_json_path() {
    let error = decode_error(json!({"attributes": {"request": {"http": {"hedaers": {}}}}}));
    assert_eq!(error, "attributes.request.http.hedaers: unknown field");
}

#[test]
fn unknown_top_level_field_is_rejected() {
    let error = decode_error(json!({"attributes": {}, "extra": 1}));
    assert_eq!(error, "extra: unknown field");
}

#[test]
fn unknown_field_inside_header_map_entry_names_index() {
    let error = decode_error(json!({"attributes": {"request": {"http": {
        "headerMap": {"headers": [{"key": "a"}, {"key": "b", "val": "x"}]}
    }}}}));
    assert_eq!(
        error,
        "attributes.request.http.headerMap.headers[1].val: unknown field"
    );
}

#[test]
fn field_given_under_both_names_is_rejected() {
    let error = decode_error(json!({"attributes": {"request": {"http": {
        "rawBody": "YQ==", "raw_body": "Yg=="
    }}}}));
    assert_eq!(
        error,
        "attributes.request.http: field given twice, as \"rawBody\" and as \"raw_body\""
    );
}

#[test]
fn two_oneof_members_are_rejected() {
    let error = decode_error(json!({"attributes": {"source": {"address": {
        "pipe": {"path": "/tmp/sock"},
        "socketAddress": {"address": "10.0.0.1"}
    }}}}));
    assert_eq!(
        error,
        "attributes.source.address: only one of \"pipe\" and \"socketAddress\" may be set"
    );
}

#[test]
fn wrong_value_type_error_shows_value() {
    let error = decode_error(json!({"attributes": {"request": {"http": {"method": 5}}}}));
    assert_eq!(
        error,
        "attributes.request.http.method: expected a string, found 5"
    );
}

#[test]
fn top_level_that_is_not_object_is_rejected() {
    let error = decode_error(json!([1, 2]));
    assert_eq!(error, "(top level): expected an object, found an array");
}

#[test]
fn null_field_counts_as_unset() {
    let request =
        decode(json!({"attributes": {"request": {"http": {"method": null, "path": "/"}}}}))
            .expect("document decodes");
    let http = request
        .attributes
        .and_then(|a| a.request)
        .and_then(|r| r.http)
        .expect("http");
    assert_eq!(http.method, "");
    assert_eq!(http.path, "/");
}

#[test]
fn size_accepts_number_and_string() {
    for size in [json!(26), json!("26"), json!(26.0), json!(2.6e1)] {
        let request = decode(json!({"attributes": {"request": {"http": {"size": size}}}}))
            .expect("size decodes");
        let http = request
            .attributes
            .and_then(|a| a.request)
            .and_then(|r| r.http)
            .expect("http");
        assert_eq!(http.size, 26, "size given as {size}");
    }
}

#[test]
fn size_rejects_fraction_and_text() {
    let error = decode_error(json!({"attributes": {"request": {"http": {"size": 2.5}}}}));
    assert_eq!(
        error,
        "attributes.request.http.size: expected a 64-bit integer, as a number or a decimal string, found 2.5"
    );
    let error = decode_error(json!({"attributes": {"request": {"http": {"size": "many"}}}}));
    assert_eq!(
        error,
        "attributes.request.http.size: expected a 64-bit integer, as a number or a decimal string, found \"many\""
    );
}

#[test]
fn port_value_out_of_range_is_rejected() {
    let error = decode_error(json!({"attributes": {"source": {"address": {
        "socketAddress": {"portValue": 4_294_967_296_u64}
    }}}}));
    assert_eq!(
        error,
        "attributes.source.address.socketAddress.portValue: expected an unsigned 32-bit integer, found 4294967296"
    );
}

#[test]
fn protocol_accepts_name_and_number() {
    for protocol in [json!("UDP"), json!(1)] {
        let request = decode(json!({"attributes": {"source": {"address": {
            "socketAddress": {"protocol": protocol}
        }}}}))
        .expect("protocol decodes");
        let address = request
            .attributes
            .and_then(|a| a.source)
            .and_then(|p| p.address);
        let Some(AddressKind::SocketAddress(socket)) = address.and_then(|a| a.address) else {
            panic!("not a socket address");
        };
        assert_eq!(socket.protocol, 1, "protocol given as {protocol}");
    }
    let error = decode_error(json!({"attributes": {"source": {"address": {
        "socketAddress": {"protocol": "SCTP"}
    }}}}));
    assert_eq!(
        error,
        "attributes.source.address.socketAddress.protocol: expected \"TCP\" or \"UDP\", found \"SCTP\""
    );
}

#[test]
fn bytes_accept_url_safe_base64_without_padding() {
    let request = decode(json!({"attributes": {"request": {"http": {"rawBody": "_-8"}}}}))
        .expect("raw body decodes");
    let http = request
        .attributes
        .and_then(|a| a.request)
        .and_then(|r| r.http)
        .expect("http");
    assert_eq!(http.raw_body, vec![0xff, 0xef]);
}

#[test]
fn bytes_reject_invalid_base64() {
    let error = decode_error(json!({"attributes": {"request": {"http": {"rawBody": "a*b"}}}}));
    assert!(
        error
            .starts_with("attributes.request.http.rawBody: expected base64 bytes, found \"a*b\" ("),
        "error was {error}"
    );
}

#[test]
fn time_with_offset_is_read_as_utc() {
    let request = decode(json!({"attributes": {"request": {"time": "2024-05-01T14:00:00+02:00"}}}))
        .expect("time decodes");
    let time = request
        .attributes
        .and_then(|a| a.request)
        .and_then(|r| r.time);
    assert_eq!(
        time,
        Some(Timestamp {
            seconds: 1_714_564_800,
            nanos: 0
        })
    );
}

#[test]
fn invalid_time_is_rejected() {
    let error = decode_error(json!({"attributes": {"request": {"time": "yesterday"}}}));
    assert!(
        error.starts_with("attributes.request.time: expected an RFC 3339 timestamp, found "),
        "error was {error}"
    );
}

#[test]
fn zero_fields_are_omitted() {
    let ctx = with_http(HttpRequest::default());
    assert_eq!(encode(&ctx), policy_value(r#"{"request": {"http": {}}}"#));
    assert_eq!(encode(&AttributeContext::default()), policy_value("{}"));
}

#[test]
fn present_empty_message_is_written() {
    let ctx = AttributeContext {
        tls_session: Some(TlsSession::default()),
        source: Some(Peer::default()),
        ..AttributeContext::default()
    };
    assert_eq!(
        encode(&ctx),
        policy_value(r#"{"tlsSession": {}, "source": {}}"#)
    );
}

#[test]
fn size_is_written_as_string() {
    let ctx = with_http(HttpRequest {
        size: -1,
        ..HttpRequest::default()
    });
    assert_eq!(
        encode(&ctx),
        policy_value(r#"{"request": {"http": {"size": "-1"}}}"#)
    );
}

#[test]
fn raw_body_is_standard_base64() {
    let ctx = with_http(HttpRequest {
        raw_body: vec![0xfb, 0xff, 0xfe],
        ..HttpRequest::default()
    });
    assert_eq!(
        encode(&ctx),
        policy_value(r#"{"request": {"http": {"rawBody": "+//+"}}}"#)
    );
}

#[test]
fn socket_protocol_is_written_by_name() {
    let socket = |protocol| {
        let address = Address {
            address: Some(AddressKind::SocketAddress(SocketAddress {
                protocol,
                address: "10.0.0.1".to_owned(),
                port_specifier: Some(PortSpecifier::PortValue(0)),
                ..SocketAddress::default()
            })),
        };
        encode(&AttributeContext {
            source: Some(Peer {
                address: Some(address),
                ..Peer::default()
            }),
            ..AttributeContext::default()
        })
    };

    assert_eq!(
        socket(0),
        policy_value(
            r#"{"source": {"address": {"socketAddress": {"address": "10.0.0.1", "portValue": 0}}}}"#
        )
    );
    assert_eq!(
        socket(1),
        policy_value(
            r#"{"source": {"address": {"socketAddress": {"protocol": "UDP", "address": "10.0.0.1", "portValue": 0}}}}"#
        )
    );
    assert_eq!(
        socket(7),
        policy_value(
            r#"{"source": {"address": {"socketAddress": {"protocol": 7, "address": "10.0.0.1", "portValue": 0}}}}"#
        )
    );
}

#[test]
fn pipe_and_internal_addresses_are_written() {
    let peer = |kind| Peer {
        address: Some(Address {
            address: Some(kind),
        }),
        ..Peer::default()
    };
    let ctx = AttributeContext {
        source: Some(peer(AddressKind::Pipe(Pipe {
            path: "/run/app.sock".to_owned(),
            mode: 0o600,
        }))),
        destination: Some(peer(AddressKind::EnvoyInternalAddress(
            EnvoyInternalAddress {
                address_name_specifier: Some(AddressNameSpecifier::ServerListenerName(
                    String::new(),
                )),
                endpoint_id: "e1".to_owned(),
            },
        ))),
        ..AttributeContext::default()
    };
    assert_eq!(
        encode(&ctx),
        policy_value(
            r#"{
              "source": {"address": {"pipe": {"path": "/run/app.sock", "mode": 384}}},
              "destination": {"address": {"envoyInternalAddress": {"serverListenerName": "", "endpointId": "e1"}}}
            }"#
        )
    );
}

#[test]
fn struct_values_are_written_as_json() {
    let number = |value| ProtoValue {
        kind: Some(Kind::NumberValue(value)),
    };
    let mut fields = Struct::default();
    fields.fields.insert("half".to_owned(), number(0.5));
    fields.fields.insert("nan".to_owned(), number(f64::NAN));
    fields
        .fields
        .insert("infinite".to_owned(), number(f64::INFINITY));
    fields
        .fields
        .insert("no_kind".to_owned(), ProtoValue { kind: None });
    fields.fields.insert(
        "null".to_owned(),
        ProtoValue {
            kind: Some(Kind::NullValue(0)),
        },
    );
    let mut metadata = Metadata::default();
    metadata.filter_metadata.insert("f".to_owned(), fields);
    let ctx = AttributeContext {
        metadata_context: Some(metadata),
        ..AttributeContext::default()
    };

    assert_eq!(
        encode(&ctx),
        policy_value(
            r#"{"metadataContext": {"filterMetadata": {"f": {
              "half": 0.5, "nan": null, "infinite": null, "no_kind": null, "null": null
            }}}}"#
        )
    );
}

#[test]
fn any_is_written_with_type_and_base64_value() {
    let mut metadata = Metadata::default();
    metadata.typed_filter_metadata.insert(
        "typed".to_owned(),
        Any {
            type_url: "type.googleapis.com/google.protobuf.StringValue".to_owned(),
            value: b"\n\x05hello".to_vec(),
        },
    );
    let ctx = AttributeContext {
        route_metadata_context: Some(metadata),
        ..AttributeContext::default()
    };
    assert_eq!(
        encode(&ctx),
        policy_value(
            r#"{"routeMetadataContext": {"typedFilterMetadata": {"typed": {
              "@type": "type.googleapis.com/google.protobuf.StringValue", "value": "CgVoZWxsbw=="
            }}}}"#
        )
    );
}

#[test]
fn any_without_type_is_rejected() {
    let error = decode_error(
        json!({"attributes": {"metadataContext": {"typedFilterMetadata": {
            "typed": {"value": "CgVoZWxsbw=="}
        }}}}),
    );
    assert_eq!(
        error,
        "attributes.metadataContext.typedFilterMetadata[\"typed\"]: expected an Any with an \"@type\" field, found an object"
    );
}

#[test]
fn timestamp_uses_zero_three_six_or_nine_digits() {
    assert_eq!(
        timestamp_text(0, 0).as_deref(),
        Some("1970-01-01T00:00:00Z")
    );
    assert_eq!(
        timestamp_text(0, 10_000_000).as_deref(),
        Some("1970-01-01T00:00:00.010Z")
    );
    assert_eq!(
        timestamp_text(0, 10_000).as_deref(),
        Some("1970-01-01T00:00:00.000010Z")
    );
    assert_eq!(
        timestamp_text(0, 10).as_deref(),
        Some("1970-01-01T00:00:00.000000010Z")
    );
    assert_eq!(
        timestamp_text(1_714_566_896, 789_000_000).as_deref(),
        Some("2024-05-01T12:34:56.789Z")
    );
}

#[test]
fn timestamp_outside_protobuf_range_is_omitted() {
    assert_eq!(
        timestamp_text(-62_135_596_800, 0).as_deref(),
        Some("0001-01-01T00:00:00Z")
    );
    assert_eq!(timestamp_text(-62_135_596_801, 0), None);
    assert_eq!(
        timestamp_text(253_402_300_799, 999_999_999).as_deref(),
        Some("9999-12-31T23:59:59.999999999Z")
    );
    assert_eq!(timestamp_text(253_402_300_800, 0), None);
    assert_eq!(timestamp_text(0, -1), None);
    assert_eq!(timestamp_text(0, 1_000_000_000), None);

    let ctx = AttributeContext {
        request: Some(Request {
            time: Some(Timestamp {
                seconds: i64::MAX,
                nanos: 0,
            }),
            http: None,
        }),
        ..AttributeContext::default()
    };
    assert_eq!(encode(&ctx), policy_value(r#"{"request": {}}"#));
}
