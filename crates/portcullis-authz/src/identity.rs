//! The identity step of a check: the caller's JWT, verified before the policy runs.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use portcullis_jwt::{Identity, InvalidToken, RequestView, TokenOutcome, UpstreamHeaders, Verifier};
use serde_json::{Value, json};

/// Handling of a request whose token is present but invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnInvalidToken {
    /// Deny with 401 and `WWW-Authenticate: Bearer error="invalid_token"` without evaluating
    /// the policy.
    Deny,
    /// Evaluate the policy with `input.identity_error` set and no `input.identity`.
    EvaluatePolicy,
}

/// Token verification for the checks of one authorizer.
pub struct Authentication {
    pub verifier: Arc<Verifier>,
    pub on_invalid_token: OnInvalidToken,
}

/// The result of the identity step of one check.
pub struct IdentityCheck {
    pub outcome: TokenOutcome,
    /// Header changes for the upstream request, applied only when the request is allowed.
    pub upstream: UpstreamHeaders,
}

impl Authentication {
    /// Finds and verifies the tokens of `request`.
    pub async fn check(&self, request: &CheckRequest) -> IdentityCheck {
        let Some(http) = request.attributes.as_ref().and_then(|a| a.request.as_ref()).and_then(|r| r.http.as_ref()) else {
            return IdentityCheck { outcome: TokenOutcome::NoToken, upstream: UpstreamHeaders::default() };
        };
        let headers = request_headers(http);
        let view = RequestView::new(&headers, &http.path);
        let outcome = self.verifier.authenticate(&view).await;
        let upstream = self.verifier.upstream_headers(&outcome, &view);
        IdentityCheck { outcome, upstream }
    }
}

/// Collects the request headers by lowercase name. With Envoy's `encode_raw_headers`, only `header_map`
/// is filled; its repeated headers are joined with commas as Envoy joins them in `headers`.
fn request_headers(http: &HttpRequest) -> Cow<'_, HashMap<String, String>> {
    let Some(header_map) = http.header_map.as_ref().filter(|_| http.headers.is_empty()) else {
        return Cow::Borrowed(&http.headers);
    };
    let mut headers: HashMap<String, String> = HashMap::new();
    for header in &header_map.headers {
        let value = if header.raw_value.is_empty() {
            header.value.clone()
        } else {
            String::from_utf8_lossy(&header.raw_value).into_owned()
        };
        headers
            .entry(header.key.to_ascii_lowercase())
            .and_modify(|joined| {
                joined.push(',');
                joined.push_str(&value);
            })
            .or_insert(value);
    }
    Cow::Owned(headers)
}

/// Builds the `input.identity` document: what the policy may rely on about a verified caller.
pub fn identity_document(identity: &Identity) -> Value {
    json!({
        "provider": identity.provider,
        "issuer": identity.issuer,
        "subject": identity.subject,
        "audiences": identity.audiences,
        "claims": identity.claims,
        "kid": identity.kid,
        "alg": identity.algorithm.as_str(),
    })
}

/// Builds the `input.identity_error` document, set when the policy evaluates a request whose
/// token is invalid.
pub fn identity_error_document(invalid: &InvalidToken) -> Value {
    json!({
        "reason": invalid.reason.code(),
        "message": invalid.message,
        "provider": invalid.provider,
    })
}

/// Builds the identity part of a decision event: never the token, only its fingerprint.
pub fn identity_event(outcome: &TokenOutcome) -> Value {
    match outcome {
        TokenOutcome::NoToken => json!({"outcome": "no_token"}),
        TokenOutcome::Valid(identity) => json!({
            "outcome": "valid",
            "provider": identity.provider,
            "issuer": identity.issuer,
            "subject": identity.subject,
            "kid": identity.kid,
            "alg": identity.algorithm.as_str(),
            "token_fingerprint": identity.token_fingerprint,
        }),
        TokenOutcome::Invalid(invalid) => json!({
            "outcome": invalid.reason.code(),
            "provider": invalid.provider,
            "token_fingerprint": invalid.token_fingerprint,
            "message": invalid.message,
        }),
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};

    use super::*;

    #[test]
    fn raw_header_map_is_joined_by_name() {
        let http = HttpRequest {
            header_map: Some(HeaderMap {
                headers: vec![
                    HeaderValue { key: "Authorization".to_owned(), value: String::new(), raw_value: b"Bearer a".to_vec() },
                    HeaderValue { key: "authorization".to_owned(), value: String::new(), raw_value: b"Bearer b".to_vec() },
                    HeaderValue { key: "cookie".to_owned(), value: "x=1".to_owned(), raw_value: Vec::new() },
                ],
            }),
            ..Default::default()
        };
        let headers = request_headers(&http);
        assert_eq!(headers.get("authorization").map(String::as_str), Some("Bearer a,Bearer b"));
        assert_eq!(headers.get("cookie").map(String::as_str), Some("x=1"));
    }

    #[test]
    fn headers_map_is_used_when_present() {
        let mut http = HttpRequest::default();
        http.headers.insert("authorization".to_owned(), "Bearer t".to_owned());
        assert!(matches!(request_headers(&http), Cow::Borrowed(_)));
    }
}
