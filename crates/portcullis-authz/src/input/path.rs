//! `parsed_path` and `parsed_query`, and the form decoding shared with form bodies.

use std::borrow::Cow;
use std::collections::BTreeMap;

use percent_encoding::percent_decode_str;
use regorus::Value;
use regorus::value::Object;

/// Splits a request target such as `/a/b?x=1#top` into its path and, when it has a `?`, the query
/// up to the `#`.
///
/// The target is never read as a URL, so `//host/rest` is the path `//host/rest`. Go's
/// `url.Parse`, which the OPA Envoy plugin uses, reads `host` there as the authority.
pub(crate) fn split_target(target: &str) -> (&str, Option<&str>) {
    let path_end = target.find(['?', '#']).unwrap_or(target.len());
    let (path, rest) = target.split_at(path_end);

    let query = rest.strip_prefix('?').map(|query| match query.find('#') {
        Some(fragment_start) => &query[..fragment_start],
        None => query,
    });
    (path, query)
}

/// Splits `path` into its segments, after removing every leading `/`.
///
/// Each segment is percent-decoded after splitting, so `%2F` stays inside its segment:
/// `/a%2Fb/c` gives `["a/b", "c"]`. Invalid percent sequences are kept as written, decoded bytes
/// that are not UTF-8 become U+FFFD, and `.` and `..` are kept as segments.
pub(crate) fn parse_path(path: &str) -> Value {
    let segments: Vec<Value> = path
        .trim_start_matches('/')
        .split('/')
        .map(|segment| Value::from(percent_decode_str(segment).decode_utf8_lossy().as_ref()))
        .collect();
    Value::from(segments)
}

/// Parses `application/x-www-form-urlencoded` text, as found in a query or a form body, into an
/// object from each name to the array of its values in order.
///
/// Names and values are decoded once (`+` is a space, `%XX` a byte). Pairs are separated by `&`
/// only, so `;` is an ordinary character. A name without `=` has the value `""`, empty pairs are
/// skipped, invalid percent sequences are kept as written and bytes that are not UTF-8 become
/// U+FFFD.
pub(crate) fn parse_form(text: &[u8]) -> Value {
    let mut fields: BTreeMap<Cow<'_, str>, Vec<Value>> = BTreeMap::new();
    for (name, value) in form_urlencoded::parse(text) {
        fields
            .entry(name)
            .or_default()
            .push(Value::from(value.as_ref()));
    }

    let mut object = Object::new();
    for (name, values) in fields {
        object.insert(Value::from(name.as_ref()), Value::from(values));
    }
    object.into_value()
}
