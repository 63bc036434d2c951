//! Decoding of `CheckRequest` wire bytes that tolerates a body that is not UTF-8.
//!
//! `HttpRequest.body` is a protobuf `string` that carries the request body when
//! `with_request_body.pack_as_bytes` is false. Envoy 1.40 replaces bytes that are not UTF-8 with
//! `!` before sending, but a sender that copies a binary body byte for byte makes the message
//! invalid, and prost rejects it. [`decode_check_request`] then moves the body into
//! `HttpRequest.raw_body` (a `bytes` field) and decodes again, so the check goes on with the body
//! in `rawBody`.

use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use prost::Message as _;
use prost::encoding::{WireType, decode_varint, encode_varint};

/// Field numbers from `CheckRequest` down to `HttpRequest`: `CheckRequest.attributes` (1),
/// `AttributeContext.request` (4), `Request.http` (2).
const PATH_TO_HTTP_REQUEST: [u64; 3] = [1, 4, 2];

/// `HttpRequest.body`, a `string`.
const BODY_FIELD: u64 = 11;

/// `HttpRequest.raw_body`, a `bytes`.
const RAW_BODY_FIELD: u64 = 12;

/// Decodes a `CheckRequest`, moving `http.body` into `http.raw_body` when prost rejects the
/// message because of it.
///
/// # Errors
///
/// Returns prost's error when the bytes are not a valid message even with the body moved, for
/// example when another string field is not UTF-8.
pub fn decode_check_request(bytes: &[u8]) -> Result<CheckRequest, prost::DecodeError> {
    let error = match CheckRequest::decode(bytes) {
        Ok(request) => return Ok(request),
        Err(error) => error,
    };
    match rewrite_message(bytes, &PATH_TO_HTTP_REQUEST) {
        Some(rewritten) => CheckRequest::decode(rewritten.as_slice()),
        None => Err(error),
    }
}

/// Copies the message `bytes`, descending into the length-delimited fields numbered by `path` and
/// moving the body of the `HttpRequest` found at its end. Returns `None` when there is no body to
/// move or the bytes are not well-formed wire data.
fn rewrite_message(bytes: &[u8], path: &[u64]) -> Option<Vec<u8>> {
    let fields = split_fields(bytes)?;
    let mut output = Vec::with_capacity(bytes.len());
    let mut moved = false;

    match path.split_first() {
        Some((&next, rest)) => {
            for field in &fields {
                if field.number == next
                    && field.wire_type == WireType::LengthDelimited
                    && let Some(payload) = rewrite_message(field.payload, rest)
                {
                    write_length_delimited(&mut output, field.number, &payload);
                    moved = true;
                    continue;
                }
                output.extend_from_slice(field.raw);
            }
        }
        None => {
            // When Envoy has also set raw_body, the body is a copy of it and is dropped.
            let has_raw_body = fields.iter().any(|field| field.number == RAW_BODY_FIELD);
            for field in &fields {
                if field.number == BODY_FIELD && field.wire_type == WireType::LengthDelimited {
                    if !has_raw_body {
                        write_length_delimited(&mut output, RAW_BODY_FIELD, field.payload);
                    }
                    moved = true;
                    continue;
                }
                output.extend_from_slice(field.raw);
            }
        }
    }
    moved.then_some(output)
}

/// One field of a message on the wire.
struct WireField<'a> {
    number: u64,
    wire_type: WireType,
    /// The whole field: key, length if any, and value.
    raw: &'a [u8],
    /// The value without key and length; for length-delimited fields, the embedded bytes.
    payload: &'a [u8],
}

/// Splits message bytes into their fields. Returns `None` on malformed wire data and on groups,
/// which no field on the way to the body uses.
fn split_fields(bytes: &[u8]) -> Option<Vec<WireField<'_>>> {
    let mut fields = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let start = rest;
        let key = decode_varint(&mut rest).ok()?;
        let wire_type = WireType::try_from(key & 0x7).ok()?;
        let number = key >> 3;
        let payload_len = match wire_type {
            WireType::Varint => {
                decode_varint(&mut rest).ok()?;
                0
            }
            WireType::SixtyFourBit => 8,
            WireType::ThirtyTwoBit => 4,
            WireType::LengthDelimited => usize::try_from(decode_varint(&mut rest).ok()?).ok()?,
            WireType::StartGroup | WireType::EndGroup => return None,
        };
        if payload_len > rest.len() {
            return None;
        }
        let (payload, after) = rest.split_at(payload_len);
        let raw_len = start.len() - after.len();
        fields.push(WireField {
            number,
            wire_type,
            raw: &start[..raw_len],
            payload,
        });
        rest = after;
    }
    Some(fields)
}

fn write_length_delimited(output: &mut Vec<u8>, number: u64, payload: &[u8]) {
    encode_varint(number << 3 | WireType::LengthDelimited as u64, output);
    encode_varint(payload.len() as u64, output);
    output.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};

    use super::*;

    /// Placeholder body of the same length as [`BINARY_BODY`], replaced in the encoded bytes.
    const PLACEHOLDER: &[u8] = b"@@PLACEHOLDER@@";

    /// A body that is not UTF-8, as Envoy sends a binary body when `pack_as_bytes` is false.
    const BINARY_BODY: &[u8] = b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01\x02\x03\x04";

    fn request_with_http(http: HttpRequest) -> CheckRequest {
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

    /// Encodes a request whose `http.body` contains `BINARY_BODY`, which prost cannot build itself.
    fn wire_bytes_with_binary_body(mut http: HttpRequest) -> Vec<u8> {
        http.body = placeholder();
        binary_in_place_of_placeholder(request_with_http(http).encode_to_vec())
    }

    fn placeholder() -> String {
        String::from_utf8(PLACEHOLDER.to_vec()).expect("placeholder is UTF-8")
    }

    fn binary_in_place_of_placeholder(mut bytes: Vec<u8>) -> Vec<u8> {
        assert_eq!(PLACEHOLDER.len(), BINARY_BODY.len());
        let start = bytes
            .windows(PLACEHOLDER.len())
            .position(|window| window == PLACEHOLDER)
            .expect("placeholder is in the encoded bytes");
        bytes[start..start + BINARY_BODY.len()].copy_from_slice(BINARY_BODY);
        bytes
    }

    fn http_of(request: &CheckRequest) -> &HttpRequest {
        request
            .attributes
            .as_ref()
            .and_then(|attributes| attributes.request.as_ref())
            .and_then(|request| request.http.as_ref())
            .expect("request has http")
    }

    #[test]
    fn prost_alone_rejects_binary_body() {
        let bytes = wire_bytes_with_binary_body(HttpRequest::default());
        assert!(CheckRequest::decode(bytes.as_slice()).is_err());
    }

    #[test]
    fn binary_body_moves_to_raw_body() {
        let http = HttpRequest {
            method: "POST".to_owned(),
            path: "/upload".to_owned(),
            size: 15,
            ..HttpRequest::default()
        };
        let bytes = wire_bytes_with_binary_body(http);

        let request = decode_check_request(&bytes).expect("request decodes");
        let http = http_of(&request);
        assert_eq!(http.body, "");
        assert_eq!(http.raw_body, BINARY_BODY.to_vec());
        assert_eq!(http.method, "POST");
        assert_eq!(http.path, "/upload");
        assert_eq!(http.size, 15);
    }

    #[test]
    fn body_is_dropped_when_raw_body_is_present() {
        let http = HttpRequest {
            raw_body: b"raw".to_vec(),
            ..HttpRequest::default()
        };
        let bytes = wire_bytes_with_binary_body(http);

        let request = decode_check_request(&bytes).expect("request decodes");
        assert_eq!(http_of(&request).raw_body, b"raw".to_vec());
        assert_eq!(http_of(&request).body, "");
    }

    #[test]
    fn valid_request_decodes_unchanged() {
        let request = request_with_http(HttpRequest {
            body: "text body".to_owned(),
            ..HttpRequest::default()
        });
        let decoded = decode_check_request(&request.encode_to_vec()).expect("request decodes");
        assert_eq!(decoded, request);
    }

    #[test]
    fn other_invalid_string_is_still_rejected() {
        let http = HttpRequest {
            method: placeholder(),
            ..HttpRequest::default()
        };
        let bytes = binary_in_place_of_placeholder(request_with_http(http).encode_to_vec());

        assert!(decode_check_request(&bytes).is_err());
    }

    #[test]
    fn truncated_bytes_are_rejected() {
        let bytes = wire_bytes_with_binary_body(HttpRequest::default());
        for len in 0..bytes.len() {
            // Some prefixes are valid messages; none may panic.
            let _ = decode_check_request(&bytes[..len]);
        }
        assert!(decode_check_request(&bytes[..bytes.len() - 1]).is_err());
    }
}
