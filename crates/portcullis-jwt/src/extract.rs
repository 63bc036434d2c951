//! Reading tokens from request headers, the query string and cookies.

use std::collections::HashMap;

use crate::config::TokenLocation;

/// Read access to the parts of a request that can carry a token.
///
/// Implement it over whatever request type the caller has; [`RequestView`] covers a header map
/// plus a path, the shape of Envoy's `AttributeContext.HttpRequest`.
pub trait TokenSource {
    /// Returns the value of a header, looked up by lowercase name. Repeated headers may be
    /// joined with commas, as Envoy does.
    fn header(&self, name: &str) -> Option<&str>;

    /// Returns the raw query string, without the leading `?`.
    fn query(&self) -> Option<&str>;
}

/// A [`TokenSource`] over a map of lowercase header names and a request path with its query.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    headers: &'a HashMap<String, String>,
    query: Option<&'a str>,
}

impl<'a> RequestView<'a> {
    /// Creates a view; the query string is the part of `path` after the first `?`.
    pub fn new(headers: &'a HashMap<String, String>, path: &'a str) -> Self {
        let query = path.split_once('?').map(|(_, query)| query);
        Self { headers, query }
    }
}

impl TokenSource for RequestView<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    fn query(&self) -> Option<&str> {
        self.query
    }
}

/// Returns every token found at `location`, in request order, without duplicates. An empty
/// string means the location was present but carried an empty token (`Bearer ` alone).
pub(crate) fn tokens_at(source: &dyn TokenSource, location: &TokenLocation) -> Vec<String> {
    let mut tokens: Vec<String> = Vec::new();
    match location {
        TokenLocation::Header { name, value_prefix } => {
            if let Some(value) = source.header(name) {
                // A JWT never contains a comma, so a comma separates joined header values.
                for part in value.split(',') {
                    if let Some(token) = strip_prefix(part.trim(), value_prefix.as_deref()) {
                        tokens.push(token.to_owned());
                    }
                }
            }
        }
        TokenLocation::QueryParameter { name } => {
            if let Some(query) = source.query() {
                for (key, value) in form_urlencoded::parse(query.as_bytes()) {
                    if key == name.as_str() {
                        tokens.push(value.into_owned());
                    }
                }
            }
        }
        TokenLocation::Cookie { name } => {
            if let Some(header) = source.header("cookie") {
                for (key, value) in cookie_pairs(header) {
                    if key == name {
                        tokens.push(value.to_owned());
                    }
                }
            }
        }
    }
    let mut unique: Vec<String> = Vec::with_capacity(tokens.len());
    for token in tokens {
        if !unique.contains(&token) {
            unique.push(token);
        }
    }
    unique
}

/// Strips a scheme prefix ignoring ASCII case. A prefix that ends in whitespace (`Bearer `) also
/// matches the bare scheme (`Bearer`), which yields an empty token, but never a longer word
/// (`Bearerx`).
fn strip_prefix<'v>(value: &'v str, prefix: Option<&str>) -> Option<&'v str> {
    let Some(prefix) = prefix else {
        return Some(value);
    };
    let scheme = prefix.trim_end();
    let head = value.get(..scheme.len())?;
    if !head.eq_ignore_ascii_case(scheme) {
        return None;
    }
    let rest = &value[scheme.len()..];
    let prefix_ends_in_space = scheme.len() != prefix.len();
    if prefix_ends_in_space && !rest.is_empty() && !rest.starts_with([' ', '\t']) {
        return None;
    }
    Some(rest.trim())
}

/// Splits a `cookie` header into name and value pairs. Semicolons separate cookies, and commas
/// too, because joined `cookie` headers use them and RFC 6265 cookie values cannot contain
/// them. Double quotes around a value are removed.
pub(crate) fn cookie_pairs(header: &str) -> impl Iterator<Item = (&str, &str)> {
    header.split([';', ',']).filter_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|inner| inner.strip_suffix('"'))
            .unwrap_or(value);
        Some((name.trim(), value))
    })
}

/// Returns the `cookie` header without the cookies named in `removed`, or `None` when no
/// cookie is left.
pub(crate) fn cookie_header_without(header: &str, removed: &[&str]) -> Option<String> {
    let remaining: Vec<&str> = header
        .split([';', ','])
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(name, _)| name.trim());
            !removed.contains(&name)
        })
        .collect();
    if remaining.is_empty() {
        None
    } else {
        Some(remaining.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(headers: &[(&str, &str)], path: &str) -> (HashMap<String, String>, String) {
        let map = headers
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        (map, path.to_owned())
    }

    fn bearer_tokens(value: &str) -> Vec<String> {
        let (headers, path) = source(&[("authorization", value)], "/");
        tokens_at(
            &RequestView::new(&headers, &path),
            &TokenLocation::authorization_bearer(),
        )
    }

    #[test]
    fn bearer_scheme_matches_any_case() {
        assert_eq!(bearer_tokens("Bearer a.b.c"), vec!["a.b.c"]);
        assert_eq!(bearer_tokens("bearer a.b.c"), vec!["a.b.c"]);
        assert_eq!(bearer_tokens("BEARER a.b.c"), vec!["a.b.c"]);
        assert_eq!(bearer_tokens("bEaReR    a.b.c  "), vec!["a.b.c"]);
    }

    #[test]
    fn other_schemes_are_not_tokens() {
        assert!(bearer_tokens("Basic dXNlcjpwYXNz").is_empty());
        assert!(bearer_tokens("Bearerx.y.z").is_empty());
        assert!(bearer_tokens("a.b.c").is_empty());
    }

    #[test]
    fn bare_bearer_scheme_is_an_empty_token() {
        assert_eq!(bearer_tokens("Bearer"), vec![""]);
        assert_eq!(bearer_tokens("Bearer   "), vec![""]);
    }

    #[test]
    fn joined_authorization_headers_give_each_token() {
        assert_eq!(
            bearer_tokens("Bearer a.b.c, Bearer d.e.f"),
            vec!["a.b.c", "d.e.f"]
        );
        assert_eq!(bearer_tokens("Basic xyz, Bearer d.e.f"), vec!["d.e.f"]);
        assert_eq!(bearer_tokens("Bearer a.b.c, Bearer a.b.c"), vec!["a.b.c"]);
    }

    #[test]
    fn header_without_prefix_is_taken_whole() {
        let (headers, path) = source(&[("x-jwt", " a.b.c ")], "/");
        let location = TokenLocation::Header {
            name: "x-jwt".to_owned(),
            value_prefix: None,
        };
        assert_eq!(
            tokens_at(&RequestView::new(&headers, &path), &location),
            vec!["a.b.c"]
        );
    }

    #[test]
    fn query_parameter_is_percent_decoded() {
        let (headers, path) = source(&[], "/items?x=1&access_token=a%2Eb.c&access_token=d.e.f");
        let location = TokenLocation::QueryParameter {
            name: "access_token".to_owned(),
        };
        assert_eq!(
            tokens_at(&RequestView::new(&headers, &path), &location),
            vec!["a.b.c", "d.e.f"]
        );
    }

    #[test]
    fn path_without_query_has_no_query_token() {
        let (headers, path) = source(&[], "/items");
        let location = TokenLocation::QueryParameter {
            name: "access_token".to_owned(),
        };
        assert!(tokens_at(&RequestView::new(&headers, &path), &location).is_empty());
    }

    #[test]
    fn cookie_is_found_by_exact_name() {
        let (headers, path) = source(
            &[("cookie", "theme=dark; session=a.b.c; Session=x.y.z")],
            "/",
        );
        let location = TokenLocation::Cookie {
            name: "session".to_owned(),
        };
        assert_eq!(
            tokens_at(&RequestView::new(&headers, &path), &location),
            vec!["a.b.c"]
        );
    }

    #[test]
    fn quoted_cookie_value_is_unquoted() {
        let (headers, path) = source(&[("cookie", "session=\"a.b.c\", theme=dark")], "/");
        let location = TokenLocation::Cookie {
            name: "session".to_owned(),
        };
        assert_eq!(
            tokens_at(&RequestView::new(&headers, &path), &location),
            vec!["a.b.c"]
        );
    }

    #[test]
    fn cookie_header_without_removes_only_named_cookie() {
        assert_eq!(
            cookie_header_without("a=1; session=x.y.z; b=2", &["session"]),
            Some("a=1; b=2".to_owned())
        );
        assert_eq!(cookie_header_without("session=x.y.z", &["session"]), None);
    }
}
