//! Request headers, read from either of the two places Envoy puts them.
//!
//! Envoy fills `http.headers` (a map, repeated headers joined with `,`) by default, and
//! `http.headerMap` (a list of entries with raw byte values) instead when the ext_authz filter
//! sets `encode_raw_headers: true`.

use std::borrow::Cow;
use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use regorus::Value;
use regorus::value::Object;

/// Looks up the request header `name`, ignoring ASCII case.
///
/// Reads `http.headers` when it has entries, and otherwise joins the values of every matching
/// `headerMap` entry with `,`, as Envoy joins repeated headers in `http.headers`.
pub(crate) fn header<'a>(http: &'a HttpRequest, name: &str) -> Option<Cow<'a, str>> {
    if !http.headers.is_empty() {
        return http
            .headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| Cow::Borrowed(value.as_str()));
    }

    let entries = http.header_map.as_ref()?.headers.iter();
    let mut matching = entries.filter(|entry| entry.key.eq_ignore_ascii_case(name));
    let mut joined = header_text(matching.next()?);
    for entry in matching {
        let value = header_text(entry);
        joined.to_mut().push(',');
        joined.to_mut().push_str(&value);
    }
    Some(joined)
}

/// Builds the `http.headers` object from `http.headerMap` when Envoy sent only the latter.
///
/// Names are lowercased and the values of repeated names are joined with `,` in the order they
/// came, so policies reading `headers` work with either Envoy setting. Returns `None` when
/// `http.headers` has entries or there is no `headerMap` entry.
pub(crate) fn headers_from_header_map(http: &HttpRequest) -> Option<Value> {
    if !http.headers.is_empty() {
        return None;
    }
    let entries = &http.header_map.as_ref()?.headers;
    if entries.is_empty() {
        return None;
    }

    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for entry in entries {
        let value = header_text(entry);
        headers
            .entry(entry.key.to_ascii_lowercase())
            .and_modify(|joined| {
                joined.push(',');
                joined.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }

    let mut object = Object::new();
    for (name, value) in headers {
        object.insert(Value::from(name), Value::from(value));
    }
    Some(object.into_value())
}

/// Returns the text of a `headerMap` entry: its raw bytes decoded as UTF-8 (invalid bytes become
/// U+FFFD) when present, else its `value`.
fn header_text(entry: &HeaderValue) -> Cow<'_, str> {
    if entry.raw_value.is_empty() {
        Cow::Borrowed(entry.value.as_str())
    } else {
        String::from_utf8_lossy(&entry.raw_value)
    }
}
