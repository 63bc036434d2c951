use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{Address, HeaderMap, HeaderValue, SocketAddress};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use regorus::Value;

use super::body::MAX_JSON_DEPTH;
use super::path::{parse_form, parse_path, split_target};
use super::*;

fn http_with_path(path: &str) -> HttpRequest {
    HttpRequest {
        method: "GET".to_owned(),
        path: path.to_owned(),
        ..HttpRequest::default()
    }
}

fn http_with_body(content_type: &str, body: &str) -> HttpRequest {
    let mut http = http_with_path("/upload");
    http.method = "POST".to_owned();
    http.headers
        .insert("content-type".to_owned(), content_type.to_owned());
    http.body = body.to_owned();
    http
}

fn check_request(http: HttpRequest) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                time: None,
                http: Some(http),
            }),
            ..AttributeContext::default()
        }),
    }
}

fn document(http: HttpRequest) -> Value {
    build_input(&check_request(http))
        .expect("input builds")
        .document
}

fn input_error(http: HttpRequest) -> InputError {
    build_input(&check_request(http)).expect_err("input is rejected")
}

fn json(text: &str) -> Value {
    Value::from_json_str(text).expect("test JSON is valid")
}

fn strings(items: &[&str]) -> Value {
    Value::from(
        items
            .iter()
            .map(|item| Value::from(*item))
            .collect::<Vec<_>>(),
    )
}

fn parsed_path(path: &str) -> Value {
    document(http_with_path(path))["parsed_path"].clone()
}

fn parsed_query(path: &str) -> Value {
    document(http_with_path(path))["parsed_query"].clone()
}

fn malformed(media_type: &str, reason: &str) -> InputError {
    InputError::MalformedBody {
        media_type: media_type.to_owned(),
        reason: reason.to_owned(),
    }
}

fn header_entry(key: &str, value: &str, raw_value: &[u8]) -> HeaderValue {
    HeaderValue {
        key: key.to_owned(),
        value: value.to_owned(),
        raw_value: raw_value.to_vec(),
    }
}

// Paths.

#[test]
fn path_with_double_slash_is_not_a_host() {
    assert_eq!(
        parsed_path("//evil.example/admin"),
        strings(&["evil.example", "admin"])
    );
}

#[test]
fn encoded_slash_stays_inside_segment() {
    assert_eq!(parsed_path("/a%2Fb/c"), strings(&["a/b", "c"]));
    assert_eq!(parsed_path("/a%2fb"), strings(&["a/b"]));
}

#[test]
fn root_path_is_one_empty_segment() {
    assert_eq!(parsed_path("/"), strings(&[""]));
}

#[test]
fn empty_path_is_one_empty_segment() {
    assert_eq!(parsed_path(""), strings(&[""]));
}

#[test]
fn trailing_slash_gives_empty_last_segment() {
    assert_eq!(parsed_path("/a/b/"), strings(&["a", "b", ""]));
}

#[test]
fn inner_double_slash_gives_empty_segment() {
    assert_eq!(parsed_path("/a//b"), strings(&["a", "", "b"]));
}

#[test]
fn dot_segments_are_kept() {
    assert_eq!(
        parsed_path("/a/../b/./c"),
        strings(&["a", "..", "b", ".", "c"])
    );
    assert_eq!(parsed_path("/a/%2e%2E/b"), strings(&["a", "..", "b"]));
}

#[test]
fn invalid_percent_sequences_are_kept() {
    assert_eq!(parsed_path("/a%/b%zz/%4"), strings(&["a%", "b%zz", "%4"]));
}

#[test]
fn path_invalid_utf8_is_replaced() {
    assert_eq!(
        parsed_path("/%ff%fe/x"),
        strings(&["\u{FFFD}\u{FFFD}", "x"])
    );
}

#[test]
fn unicode_path_segments_decode() {
    assert_eq!(parsed_path("/caf%C3%A9/日本"), strings(&["café", "日本"]));
}

#[test]
fn query_and_fragment_are_cut_from_path() {
    assert_eq!(parsed_path("/a/b?x=1#f"), strings(&["a", "b"]));
    assert_eq!(parsed_path("/a#f?x=1"), strings(&["a"]));
    assert_eq!(parsed_query("/a#f?x=1"), json("{}"));
}

#[test]
fn encoded_question_mark_stays_in_path() {
    let document = document(http_with_path("/a%3Fb?c=d"));
    assert_eq!(document["parsed_path"], strings(&["a?b"]));
    assert_eq!(document["parsed_query"], json(r#"{"c": ["d"]}"#));
}

#[test]
fn split_target_separates_query_and_fragment() {
    assert_eq!(split_target("/p?q=1#frag"), ("/p", Some("q=1")));
    assert_eq!(split_target("/p?"), ("/p", Some("")));
    assert_eq!(split_target("/p#frag"), ("/p", None));
    assert_eq!(split_target("/p"), ("/p", None));
}

// Queries.

#[test]
fn repeated_query_keys_become_arrays() {
    assert_eq!(
        parsed_query("/?a=1&a=2&b=3"),
        json(r#"{"a": ["1", "2"], "b": ["3"]}"#)
    );
}

#[test]
fn query_plus_is_space() {
    assert_eq!(
        parsed_query("/?q=a+b%2Bc&x+y=1"),
        json(r#"{"q": ["a b+c"], "x y": ["1"]}"#)
    );
}

#[test]
fn double_encoded_query_is_decoded_once() {
    assert_eq!(parsed_query("/?x=%2520"), json(r#"{"x": ["%20"]}"#));
}

#[test]
fn query_key_without_equals_has_empty_value() {
    assert_eq!(
        parsed_query("/?flag&x=1"),
        json(r#"{"flag": [""], "x": ["1"]}"#)
    );
}

#[test]
fn empty_query_pairs_are_skipped() {
    assert_eq!(parsed_query("/?&&a=1&"), json(r#"{"a": ["1"]}"#));
    assert_eq!(parsed_query("/?"), json("{}"));
}

#[test]
fn query_semicolon_is_ordinary_character() {
    assert_eq!(parsed_query("/?a=1;b=2"), json(r#"{"a": ["1;b=2"]}"#));
}

#[test]
fn query_value_keeps_later_equals_signs() {
    assert_eq!(
        parsed_query("/?a=b=c&=v"),
        json(r#"{"a": ["b=c"], "": ["v"]}"#)
    );
}

#[test]
fn invalid_query_percent_is_kept() {
    assert_eq!(
        parsed_query("/?a=%zz&b=%"),
        json(r#"{"a": ["%zz"], "b": ["%"]}"#)
    );
}

#[test]
fn query_invalid_utf8_is_replaced() {
    assert_eq!(parsed_query("/?a=%ff"), json(r#"{"a": ["\ufffd"]}"#));
}

#[test]
fn http_query_field_wins_over_path_query() {
    let mut http = http_with_path("/x?a=1");
    http.query = "?b=2".to_owned();
    assert_eq!(document(http)["parsed_query"], json(r#"{"b": ["2"]}"#));
}

// Bodies.

#[test]
fn json_body_is_parsed() {
    let document = document(http_with_body(
        "application/json",
        r#"{"user": "alice", "n": 3}"#,
    ));
    assert_eq!(
        document["parsed_body"],
        json(r#"{"user": "alice", "n": 3}"#)
    );
    assert_eq!(document["truncated_body"], Value::from(false));
}

#[test]
fn json_suffix_media_types_are_json() {
    for content_type in [
        "application/vnd.api+json",
        "application/merge-patch+json",
        "Application/JSON; charset=UTF-8",
    ] {
        let document = document(http_with_body(content_type, "[1, 2]"));
        assert_eq!(
            document["parsed_body"],
            json("[1, 2]"),
            "content type {content_type}"
        );
    }
}

#[test]
fn json_body_keeps_large_integers() {
    let document = document(http_with_body(
        "application/json",
        r#"{"id": 9007199254740993}"#,
    ));
    assert_eq!(
        document["parsed_body"]["id"],
        Value::from(9_007_199_254_740_993_u64)
    );
}

#[test]
fn form_body_is_parsed() {
    let document = document(http_with_body(
        "application/x-www-form-urlencoded",
        "name=J%C3%BCrgen+K&role=admin&role=dev",
    ));
    assert_eq!(
        document["parsed_body"],
        json(r#"{"name": ["Jürgen K"], "role": ["admin", "dev"]}"#)
    );
}

#[test]
fn form_body_invalid_utf8_is_replaced() {
    let mut http = http_with_body("application/x-www-form-urlencoded", "");
    http.raw_body = b"a=\xff".to_vec();
    assert_eq!(document(http)["parsed_body"], json(r#"{"a": ["\ufffd"]}"#));
}

#[test]
fn multipart_body_is_parsed() {
    let body = concat!(
        "--XyZ\r\n",
        "Content-Disposition: form-data; name=\"title\"\r\n",
        "\r\n",
        "Quarterly report\r\n",
        "--XyZ\r\n",
        "Content-Disposition: form-data; name=\"tag\"\r\n",
        "\r\n",
        "finance\r\n",
        "--XyZ\r\n",
        "Content-Disposition: form-data; name=\"tag\"\r\n",
        "\r\n",
        "q3\r\n",
        "--XyZ\r\n",
        "Content-Disposition: form-data; name=\"meta\"\r\n",
        "Content-Type: application/json\r\n",
        "\r\n",
        "{\"pages\": 12}\r\n",
        "--XyZ\r\n",
        "Content-Disposition: form-data\r\n",
        "\r\n",
        "part without a name\r\n",
        "--XyZ--\r\n",
    );
    let document = document(http_with_body("multipart/form-data; boundary=XyZ", body));
    assert_eq!(
        document["parsed_body"],
        json(
            r#"{"title": ["Quarterly report"], "tag": ["finance", "q3"], "meta": [{"pages": 12}]}"#
        )
    );
}

#[test]
fn multipart_file_part_is_text_with_replacement() {
    let mut body =
        b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.bin\"\r\n".to_vec();
    body.extend_from_slice(b"Content-Type: application/octet-stream\r\n\r\n");
    body.extend_from_slice(b"ab\xffcd\r\n--b--\r\n");
    let mut http = http_with_body("multipart/form-data; boundary=b", "");
    http.raw_body = body;
    assert_eq!(
        document(http)["parsed_body"],
        json(r#"{"file": ["ab\ufffdcd"]}"#)
    );
}

#[test]
fn multipart_without_boundary_is_malformed() {
    let error = input_error(http_with_body("multipart/form-data", "--b--\r\n"));
    assert_eq!(
        error,
        malformed(
            "multipart/form-data",
            "multipart/form-data content type has no boundary parameter"
        )
    );
}

#[test]
fn multipart_without_closing_boundary_is_malformed() {
    let body = "--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nvalue";
    let error = input_error(http_with_body("multipart/form-data; boundary=b", body));
    assert_eq!(
        error,
        malformed(
            "multipart/form-data",
            "request body is not valid multipart/form-data: field \"a\" received with incomplete data"
        )
    );
}

#[test]
fn multipart_json_part_that_is_invalid_is_malformed() {
    let body = concat!(
        "--b\r\n",
        "Content-Disposition: form-data; name=\"meta\"\r\n",
        "Content-Type: application/json\r\n",
        "\r\n",
        "{oops}\r\n",
        "--b--\r\n",
    );
    let error = input_error(http_with_body("multipart/form-data; boundary=b", body));
    assert_eq!(
        error,
        malformed(
            "multipart/form-data",
            "multipart field \"meta\" is not valid JSON: key must be a string at line 1 column 2"
        )
    );
}

#[test]
fn malformed_json_body_is_error() {
    let error = input_error(http_with_body("application/json", r#"{"a": }"#));
    assert_eq!(
        error,
        malformed(
            "application/json",
            "request body is not valid JSON: expected value at line 1 column 7"
        )
    );
    assert_eq!(
        error.to_string(),
        "request body is not valid JSON: expected value at line 1 column 7"
    );
}

#[test]
fn json_body_that_is_not_utf8_is_error() {
    let mut http = http_with_body("application/json", "");
    http.raw_body = b"{\"a\": \"\xff\"}".to_vec();
    assert_eq!(
        input_error(http),
        malformed(
            "application/json",
            "request body is not valid UTF-8: invalid byte at offset 7"
        )
    );
}

#[test]
fn json_nested_beyond_limit_is_error() {
    let deep = |levels: usize| format!("{}{}", "[".repeat(levels), "]".repeat(levels));

    let document = document(http_with_body("application/json", &deep(MAX_JSON_DEPTH)));
    assert_ne!(document["parsed_body"], Value::Null);

    let error = input_error(http_with_body(
        "application/json",
        &deep(MAX_JSON_DEPTH + 1),
    ));
    assert_eq!(
        error,
        malformed(
            "application/json",
            "request body is JSON nested deeper than 64 levels"
        )
    );
}

#[test]
fn json_string_brackets_skip_depth_limit() {
    let text = format!(r#"["{}\"{}"]"#, "[".repeat(100), "{".repeat(100));
    let document = document(http_with_body("application/json", &text));
    assert_eq!(
        document["parsed_body"][0].as_string().map(|s| s.len()).ok(),
        Some(201)
    );
}

#[test]
fn raw_body_is_preferred_over_body() {
    let mut http = http_with_body("application/json", "not json");
    http.raw_body = br#"{"from": "raw"}"#.to_vec();
    assert_eq!(document(http)["parsed_body"], json(r#"{"from": "raw"}"#));
}

#[test]
fn partial_body_header_marks_truncation() {
    let mut http = http_with_body("application/json", r#"{"a": 1}"#);
    http.headers
        .insert("x-envoy-auth-partial-body".to_owned(), "TRUE".to_owned());
    let document = document(http);
    assert_eq!(document["truncated_body"], Value::from(true));
    assert_eq!(document["parsed_body"], Value::Null);
}

#[test]
fn short_body_against_content_length_is_truncated() {
    let mut http = http_with_body("application/json", r#"{"a": "#);
    http.headers
        .insert("content-length".to_owned(), "100".to_owned());
    let document = document(http);
    assert_eq!(document["truncated_body"], Value::from(true));
    assert_eq!(document["parsed_body"], Value::Null);
}

#[test]
fn body_matching_content_length_is_complete() {
    let mut http = http_with_body("application/json", r#"{"a": 1}"#);
    http.headers
        .insert("content-length".to_owned(), "8".to_owned());
    let document = document(http);
    assert_eq!(document["truncated_body"], Value::from(false));
    assert_eq!(document["parsed_body"], json(r#"{"a": 1}"#));
}

#[test]
fn body_not_forwarded_is_truncated() {
    let mut http = http_with_body("application/json", "");
    http.headers
        .insert("content-length".to_owned(), "42".to_owned());
    assert_eq!(document(http)["truncated_body"], Value::from(true));
}

#[test]
fn invalid_content_length_is_ignored() {
    let mut http = http_with_body("application/json", "[]");
    http.headers
        .insert("content-length".to_owned(), "lots".to_owned());
    let document = document(http);
    assert_eq!(document["truncated_body"], Value::from(false));
    assert_eq!(document["parsed_body"], json("[]"));
}

#[test]
fn empty_body_is_not_parsed() {
    let document = document(http_with_body("application/json", ""));
    assert_eq!(document["parsed_body"], Value::Null);
    assert_eq!(document["truncated_body"], Value::from(false));
}

#[test]
fn other_media_types_are_not_parsed() {
    for content_type in [
        "text/plain",
        "application/xml",
        "not a media type",
        "application/jsonx",
    ] {
        let document = document(http_with_body(content_type, "{}"));
        assert_eq!(
            document["parsed_body"],
            Value::Null,
            "content type {content_type}"
        );
    }
    let mut http = http_with_body("application/json", "{}");
    http.headers.clear();
    assert_eq!(document(http)["parsed_body"], Value::Null);
}

// Headers.

#[test]
fn header_map_alone_fills_headers() {
    let mut http = http_with_path("/");
    http.header_map = Some(HeaderMap {
        headers: vec![
            header_entry("X-Tenant", "blue", b""),
            header_entry("x-tenant", "", b"green"),
            header_entry("x-binary", "", b"h\xffi"),
        ],
    });
    let document = document(http);
    let request_http = &document["attributes"]["request"]["http"];
    assert_eq!(
        request_http["headers"],
        json(r#"{"x-tenant": "blue,green", "x-binary": "h\ufffdi"}"#)
    );
    assert_eq!(
        request_http["headerMap"],
        json(
            r#"{"headers": [
              {"key": "X-Tenant", "value": "blue"},
              {"key": "x-tenant", "rawValue": "Z3JlZW4="},
              {"key": "x-binary", "rawValue": "aP9p"}
            ]}"#
        )
    );
}

#[test]
fn header_map_content_type_drives_body_parsing() {
    let mut http = http_with_path("/");
    http.header_map = Some(HeaderMap {
        headers: vec![
            header_entry("content-type", "", b"application/json"),
            header_entry("content-length", "", b"9"),
        ],
    });
    http.raw_body = br#"{"ok": 1}"#.to_vec();
    let document = document(http);
    assert_eq!(document["parsed_body"], json(r#"{"ok": 1}"#));
    assert_eq!(document["truncated_body"], Value::from(false));
}

#[test]
fn headers_map_is_kept_when_both_are_sent() {
    let mut http = http_with_path("/");
    http.headers.insert("x-a".to_owned(), "from-map".to_owned());
    http.header_map = Some(HeaderMap {
        headers: vec![header_entry("x-b", "from-list", b"")],
    });
    let document = document(http);
    assert_eq!(
        document["attributes"]["request"]["http"]["headers"],
        json(r#"{"x-a": "from-map"}"#)
    );
}

// Document and summary.

#[test]
fn input_document_has_plugin_shape() {
    let mut http = http_with_body("application/json", r#"{"qty": 2}"#);
    http.path = "/orders/42?expand=items".to_owned();
    http.host = "shop.example".to_owned();
    http.size = 10;
    let document = document(http);
    assert_eq!(
        document,
        json(
            r#"{
              "attributes": {"request": {"http": {
                "method": "POST",
                "headers": {"content-type": "application/json"},
                "path": "/orders/42?expand=items",
                "host": "shop.example",
                "size": "10",
                "body": "{\"qty\": 2}"
              }}},
              "parsed_path": ["orders", "42"],
              "parsed_query": {"expand": ["items"]},
              "parsed_body": {"qty": 2},
              "truncated_body": false,
              "version": {"ext_authz": "v3", "encoding": "protojson"}
            }"#
        )
    );
}

#[test]
fn request_without_attributes_gives_minimal_document() {
    let input = build_input(&CheckRequest::default()).expect("input builds");
    assert_eq!(
        input.document,
        json(
            r#"{
              "parsed_path": [""],
              "parsed_query": {},
              "parsed_body": null,
              "truncated_body": false,
              "version": {"ext_authz": "v3", "encoding": "protojson"}
            }"#
        )
    );
}

fn socket_peer(address: &str, port: u32, principal: &str) -> Peer {
    Peer {
        address: Some(Address {
            address: Some(AddressKind::SocketAddress(SocketAddress {
                address: address.to_owned(),
                port_specifier: Some(PortSpecifier::PortValue(port)),
                ..SocketAddress::default()
            })),
        }),
        principal: principal.to_owned(),
        ..Peer::default()
    }
}

#[test]
fn summary_collects_request_facts() {
    let mut http = http_with_path("/orders/42?expand=items");
    http.id = "17".to_owned();
    http.host = "shop.example".to_owned();
    http.protocol = "HTTP/2".to_owned();
    http.headers
        .insert("x-request-id".to_owned(), "header-id".to_owned());
    let mut request = check_request(http);
    let attributes = request.attributes.as_mut().expect("attributes are set");
    attributes.source = Some(socket_peer(
        "10.0.0.7",
        51324,
        "spiffe://cluster.local/ns/a/sa/b",
    ));
    attributes.destination = Some(socket_peer("::1", 8080, ""));

    let summary = RequestSummary::from_request(&request);
    assert_eq!(
        summary,
        RequestSummary {
            request_id: "header-id".to_owned(),
            stream_id: "17".to_owned(),
            method: "GET".to_owned(),
            authority: "shop.example".to_owned(),
            path: "/orders/42".to_owned(),
            source_address: "10.0.0.7:51324".to_owned(),
            source_principal: "spiffe://cluster.local/ns/a/sa/b".to_owned(),
            destination_address: "[::1]:8080".to_owned(),
            destination_principal: String::new(),
            protocol: "HTTP/2".to_owned(),
            trace: Default::default(),
        }
    );
}

#[test]
fn summary_request_id_comes_from_header() {
    let mut http = http_with_path("/");
    http.id = "9876543210".to_owned();
    http.header_map = Some(HeaderMap {
        headers: vec![header_entry("X-Request-Id", "", b"abc-123")],
    });
    let summary = RequestSummary::from_request(&check_request(http));
    assert_eq!(summary.request_id, "abc-123");
    assert_eq!(summary.stream_id, "9876543210");
}

#[test]
fn summary_serialization_skips_empty_fields() {
    let summary = RequestSummary::from_request(&check_request(http_with_path("/a?b")));
    let json = serde_json::to_value(&summary).expect("summary serializes");
    assert_eq!(json, serde_json::json!({"method": "GET", "path": "/a"}));
}

#[test]
fn summary_works_when_input_fails() {
    let mut http = http_with_body("application/json", "{");
    http.id = "req-9".to_owned();
    let request = check_request(http);
    assert!(build_input(&request).is_err());
    assert_eq!(RequestSummary::from_request(&request).stream_id, "req-9");
}

// Random inputs.

/// xorshift64*: a small deterministic generator, so failures reproduce.
struct Generator(u64);

impl Generator {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, limit: usize) -> usize {
        (self.next() % limit as u64) as usize
    }

    /// Bytes drawn mostly from characters that matter to the parsers.
    fn bytes(&mut self, max_len: usize) -> Vec<u8> {
        const INTERESTING: &[u8] = b"%/?#+=&;.-_aZ09fF2\"{}[]:,\\ \r\n\xff\xc3\xa9\x00";
        let len = self.below(max_len + 1);
        (0..len)
            .map(|_| {
                if self.below(4) == 0 {
                    self.next() as u8
                } else {
                    INTERESTING[self.below(INTERESTING.len())]
                }
            })
            .collect()
    }
}

#[test]
fn random_paths_and_queries_never_panic() {
    let mut generator = Generator(0x9E37_79B9_7F4A_7C15);
    for _ in 0..20_000 {
        let target = String::from_utf8_lossy(&generator.bytes(40)).into_owned();
        let (path, query) = split_target(&target);

        // Splitting happens before decoding, so every `/` after the leading ones adds a segment.
        let segments = parse_path(path);
        let expected_segments = path.trim_start_matches('/').matches('/').count() + 1;
        assert_eq!(
            segments.as_array().map(|items| items.len()).ok(),
            Some(expected_segments),
            "path {path:?}"
        );

        let query = query.unwrap_or("");
        let fields = parse_form(query.as_bytes());
        let value_count: usize = fields
            .as_object()
            .expect("query parses to an object")
            .values()
            .map(|values| values.as_array().map(|items| items.len()).unwrap_or(0))
            .sum();
        let expected_pairs = query.split('&').filter(|pair| !pair.is_empty()).count();
        assert_eq!(value_count, expected_pairs, "query {query:?}");
    }
}

#[test]
fn random_bodies_never_panic() {
    const CONTENT_TYPES: &[&str] = &[
        "application/json",
        "application/problem+json",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=b",
        "multipart/form-data",
        "text/plain",
    ];
    let mut generator = Generator(0xD1B5_4A32_D192_ED03);
    let mut parsed = 0;
    let mut rejected = 0;
    for round in 0..20_000 {
        let content_type = CONTENT_TYPES[generator.below(CONTENT_TYPES.len())];
        let mut http = http_with_body(content_type, "");
        let mut body = generator.bytes(80);
        if content_type.contains("boundary") && round % 2 == 0 {
            let mut framed = b"--b\r\nContent-Disposition: form-data; name=\"f\"\r\n\r\n".to_vec();
            framed.append(&mut body);
            framed.extend_from_slice(b"\r\n--b--\r\n");
            body = framed;
        }
        http.raw_body = body;
        if round % 7 == 0 {
            http.headers.insert(
                "content-length".to_owned(),
                generator.below(100).to_string(),
            );
        }

        match build_input(&check_request(http)) {
            Ok(input) => {
                let truncated = &input.document["truncated_body"];
                assert!(
                    matches!(truncated, Value::Bool(_)),
                    "truncated_body is {truncated:?}"
                );
                if input.document["parsed_body"] != Value::Null {
                    parsed += 1;
                }
            }
            Err(InputError::MalformedBody { media_type, reason }) => {
                assert!(!media_type.is_empty(), "empty media type for {reason}");
                assert!(!reason.is_empty(), "empty reason for {media_type}");
                rejected += 1;
            }
        }
    }
    // Both outcomes must occur, or the generator is not reaching the parsers.
    assert!(parsed > 1_000, "only {parsed} bodies parsed");
    assert!(rejected > 1_000, "only {rejected} bodies rejected");
}

#[test]
fn header_map_with_many_repeats_joins_all() {
    let mut http = http_with_path("/");
    let entries: Vec<HeaderValue> = (0..100)
        .map(|i| header_entry("x-n", &i.to_string(), b""))
        .collect();
    http.header_map = Some(HeaderMap { headers: entries });
    let document = document(http);
    let joined: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    assert_eq!(
        document["attributes"]["request"]["http"]["headers"]["x-n"],
        Value::from(joined.join(","))
    );
}

#[test]
fn debug_output_hides_document() {
    let mut http = http_with_path("/a");
    http.headers
        .insert("authorization".to_owned(), "Bearer secret-token".to_owned());
    let input = build_input(&check_request(http)).expect("input builds");

    let text = format!("{input:?}");
    assert!(!text.contains("secret-token"), "debug output was {text}");
    assert!(
        text.contains("document: <redacted>"),
        "debug output was {text}"
    );
}

#[test]
fn summary_carries_trace_context_headers_only() {
    let mut http = http_with_path("/");
    http.headers.insert("traceparent".to_owned(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned());
    http.headers.insert("x-b3-traceid".to_owned(), "80f198ee56343ba864fe8b2a57d3eff7".to_owned());
    http.headers.insert("authorization".to_owned(), "Bearer secret".to_owned());

    let summary = RequestSummary::from_request(&check_request(http));

    let trace: Vec<(&str, &str)> = summary.trace.iter().map(|(name, value)| (name.as_str(), value.as_str())).collect();
    assert_eq!(
        trace,
        vec![
            ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
        ]
    );
}

#[test]
fn selected_headers_follow_the_allow_list() {
    let mut http = http_with_path("/");
    http.headers.insert("x-tenant".to_owned(), "acme".to_owned());
    http.headers.insert("authorization".to_owned(), "Bearer secret".to_owned());

    let selected = selected_headers(&check_request(http), &["x-tenant", "x-missing"]);

    assert_eq!(selected.len(), 1);
    assert_eq!(selected.get("x-tenant").map(String::as_str), Some("acme"));
}
