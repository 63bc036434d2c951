//! `parsed_body` and `truncated_body`.

use std::collections::BTreeMap;
use std::convert::Infallible;

use bytes::Bytes;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use futures::FutureExt as _;
use mime::Mime;
use regorus::Value;
use regorus::value::Object;

use super::InputError;
use super::headers::header;
use super::path::parse_form;

/// Maximum nesting of arrays and objects in a JSON body. Policies walk parsed bodies recursively,
/// so deep nesting costs stack in evaluation as well as in parsing; 64 levels is far beyond what
/// API payloads use.
pub(crate) const MAX_JSON_DEPTH: usize = 64;

/// Header that Envoy adds to the check request when it forwards only the first part of a body
/// (`with_request_body.allow_partial_message: true`).
const PARTIAL_BODY_HEADER: &str = "x-envoy-auth-partial-body";

/// The body part of an input document.
#[derive(Debug, Default)]
pub(crate) struct ParsedBody {
    /// Parsed body; `None` when the body is empty, truncated or of a media type that is not parsed.
    pub(crate) value: Option<Value>,
    pub(crate) truncated: bool,
}

/// The body formats that are parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyFormat {
    Json,
    Form,
    Multipart,
}

impl BodyFormat {
    /// Returns the format of `media_type`: JSON for `application/json` and every `+json` type,
    /// forms for `application/x-www-form-urlencoded` and `multipart/form-data`.
    fn of(media_type: &Mime) -> Option<Self> {
        let json = (media_type.type_() == mime::APPLICATION && media_type.subtype() == mime::JSON)
            || media_type.suffix() == Some(mime::JSON);
        if json {
            Some(Self::Json)
        } else if media_type.type_() == mime::APPLICATION
            && media_type.subtype() == mime::WWW_FORM_URLENCODED
        {
            Some(Self::Form)
        } else if media_type.type_() == mime::MULTIPART && media_type.subtype() == mime::FORM_DATA {
            Some(Self::Multipart)
        } else {
            None
        }
    }
}

/// Parses the body of `http` under the media type of its `content-type` header.
///
/// The bytes come from `raw_body` when it is not empty (Envoy's `pack_as_bytes: true`), else from
/// `body`. A truncated body is not parsed, nor is an empty one, one without a `content-type` that
/// parses as a media type, or one of another media type than JSON, form or multipart form.
pub(crate) fn parse_body(http: &HttpRequest) -> Result<ParsedBody, InputError> {
    let bytes: &[u8] = if http.raw_body.is_empty() {
        http.body.as_bytes()
    } else {
        &http.raw_body
    };

    let truncated = is_truncated(http, bytes.len());
    if truncated || bytes.is_empty() {
        return Ok(ParsedBody {
            value: None,
            truncated,
        });
    }

    let media_type = header(http, "content-type").and_then(|text| text.parse::<Mime>().ok());
    let Some(media_type) = media_type else {
        return Ok(ParsedBody::default());
    };
    let value = match BodyFormat::of(&media_type) {
        Some(BodyFormat::Json) => Some(parse_json(bytes, "request body", &media_type)?),
        Some(BodyFormat::Form) => Some(parse_form(bytes)),
        Some(BodyFormat::Multipart) => Some(parse_multipart(bytes, &media_type)?),
        None => None,
    };
    Ok(ParsedBody {
        value,
        truncated: false,
    })
}

/// Tells whether Envoy forwarded only part of the body: Envoy set the partial-body header, or
/// `content-length` is larger than the bytes received.
///
/// A `content-length` that is not a decimal number is ignored, because Envoy rejects such a
/// request before it reaches the ext_authz filter.
fn is_truncated(http: &HttpRequest, received: usize) -> bool {
    let partial = header(http, PARTIAL_BODY_HEADER)
        .is_some_and(|value| value.trim().eq_ignore_ascii_case("true"));
    let declared = header(http, "content-length")
        .and_then(|value| value.trim().parse::<u64>().ok())
        .is_some_and(|length| length > received as u64);
    partial || declared
}

/// Parses `bytes` as UTF-8 JSON of at most [`MAX_JSON_DEPTH`] levels. `subject` names the bytes in
/// error reasons, such as `request body` or `multipart field "meta"`.
fn parse_json(bytes: &[u8], subject: &str, media_type: &Mime) -> Result<Value, InputError> {
    let malformed = |reason: String| InputError::MalformedBody {
        media_type: media_type.essence_str().to_owned(),
        reason,
    };

    let text = std::str::from_utf8(bytes).map_err(|error| {
        malformed(format!(
            "{subject} is not valid UTF-8: invalid byte at offset {}",
            error.valid_up_to()
        ))
    })?;
    if exceeds_json_depth(bytes, MAX_JSON_DEPTH) {
        return Err(malformed(format!(
            "{subject} is JSON nested deeper than {MAX_JSON_DEPTH} levels"
        )));
    }
    Value::from_json_str(text)
        .map_err(|error| malformed(format!("{subject} is not valid JSON: {error}")))
}

/// Tells whether the arrays and objects in JSON text nest deeper than `max_depth`, without parsing
/// it. Brackets inside strings are skipped.
fn exceeds_json_depth(text: &[u8], max_depth: usize) -> bool {
    let mut depth = 0_usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in text {
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Parses a `multipart/form-data` body into an object from each field name to the array of its
/// values in order.
///
/// A part whose own content type is JSON is parsed as JSON, as the OPA Envoy plugin does. Every
/// other part, file uploads included, becomes its content as text, with bytes that are not UTF-8
/// replaced by U+FFFD. Parts without a name are skipped.
fn parse_multipart(bytes: &[u8], media_type: &Mime) -> Result<Value, InputError> {
    let malformed = |reason: String| InputError::MalformedBody {
        media_type: media_type.essence_str().to_owned(),
        reason,
    };
    let Some(boundary) = media_type.get_param(mime::BOUNDARY) else {
        return Err(malformed(
            "multipart/form-data content type has no boundary parameter".to_owned(),
        ));
    };

    let chunk = Bytes::copy_from_slice(bytes);
    let stream = futures::stream::iter([Ok::<Bytes, Infallible>(chunk)]);
    let mut multipart = multer::Multipart::new(stream, boundary.as_str());
    let collect_fields = async {
        let mut fields: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
            let Some(name) = field
                .name()
                .filter(|name| !name.is_empty())
                .map(str::to_owned)
            else {
                continue;
            };
            let part_type = field.content_type().cloned();
            let content = field.bytes().await.map_err(multipart_error)?;
            let value = match part_type {
                Some(part_type) if BodyFormat::of(&part_type) == Some(BodyFormat::Json) => {
                    parse_json(&content, &format!("multipart field {name:?}"), &part_type)
                        .map_err(|error| error.to_string())?
                }
                _ => Value::from(String::from_utf8_lossy(&content).as_ref()),
            };
            fields.entry(name).or_default().push(value);
        }
        Ok::<_, String>(fields)
    };

    // The stream contains the whole body and is always ready, so the parser never waits and one poll
    // runs it to the end.
    let fields = match collect_fields.now_or_never() {
        Some(result) => result.map_err(malformed)?,
        None => {
            return Err(malformed(
                "multipart parser stopped before the end of the body".to_owned(),
            ));
        }
    };

    let mut object = Object::new();
    for (name, values) in fields {
        object.insert(Value::from(name), Value::from(values));
    }
    Ok(object.into_value())
}

fn multipart_error(error: multer::Error) -> String {
    format!("request body is not valid multipart/form-data: {error}")
}
