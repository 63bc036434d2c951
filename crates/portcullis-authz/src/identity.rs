//! The identity step of a check: the caller's JWT, verified before the policy runs.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use portcullis_jwt::{Identity, InvalidToken, RequestView, TokenOutcome, UpstreamHeaders, Verifier};
use regorus::Value as PolicyValue;
use regorus::value::Object;
use serde_json::{Value, json};

use crate::protojson::key;

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
pub fn identity_document(identity: &Identity) -> PolicyValue {
    let mut document = Object::new();
    document.insert(key!("provider").clone(), PolicyValue::from(identity.provider.as_str()));
    document.insert(key!("issuer").clone(), PolicyValue::from(identity.issuer.as_str()));
    document.insert(key!("subject").clone(), optional_string(identity.subject.as_deref()));
    let audiences: Vec<PolicyValue> = identity.audiences.iter().map(|audience| PolicyValue::from(audience.as_str())).collect();
    document.insert(key!("audiences").clone(), PolicyValue::from(audiences));
    document.insert(key!("claims").clone(), policy_object(&identity.claims));
    document.insert(key!("kid").clone(), optional_string(identity.kid.as_deref()));
    document.insert(key!("alg").clone(), PolicyValue::from(identity.algorithm.as_str()));
    document.into_value()
}

/// Builds the `input.identity_error` document, set when the policy evaluates a request whose
/// token is invalid.
pub fn identity_error_document(invalid: &InvalidToken) -> PolicyValue {
    let mut document = Object::new();
    document.insert(key!("reason").clone(), PolicyValue::from(invalid.reason.code()));
    document.insert(key!("message").clone(), PolicyValue::from(invalid.message.as_str()));
    document.insert(key!("provider").clone(), optional_string(invalid.provider.as_deref()));
    document.into_value()
}

fn optional_string(text: Option<&str>) -> PolicyValue {
    text.map_or(PolicyValue::Null, PolicyValue::from)
}

/// Converts JSON claims to a policy value member by member. Going through serde's
/// deserializer instead would cost a second walk and an allocation per node on every check.
fn policy_value(value: &Value) -> PolicyValue {
    match value {
        Value::Null => PolicyValue::Null,
        Value::Bool(flag) => PolicyValue::from(*flag),
        Value::Number(number) => match (number.as_u64(), number.as_i64()) {
            (Some(unsigned), _) => PolicyValue::from(unsigned),
            (None, Some(signed)) => PolicyValue::from(signed),
            (None, None) => PolicyValue::from(number.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(text) => PolicyValue::from(text.as_str()),
        Value::Array(items) => PolicyValue::from(items.iter().map(policy_value).collect::<Vec<_>>()),
        Value::Object(members) => policy_object(members),
    }
}

fn policy_object(members: &serde_json::Map<String, Value>) -> PolicyValue {
    let mut object = Object::new();
    for (name, value) in members {
        object.insert(PolicyValue::from(name.as_str()), policy_value(value));
    }
    object.into_value()
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
    fn identity_document_converts_claims_like_a_json_parse() {
        let claims = json!({
            "iss": "https://issuer.example",
            "sub": "alice",
            "exp": 4_102_444_800_u64,
            "offset": -42,
            "score": 0.5,
            "big": 18_446_744_073_709_551_615_u64,
            "admin": true,
            "nickname": null,
            "realm_access": {"roles": ["reader", "writer"], "nested": {"depth": [1, [2, {"x": "y"}]]}},
            "": "empty name",
        });
        let identity = Identity {
            provider: "keycloak".to_owned(),
            issuer: "https://issuer.example".to_owned(),
            subject: None,
            audiences: vec!["orders".to_owned(), "catalog".to_owned()],
            claims: claims.as_object().cloned().unwrap_or_default(),
            kid: Some("k1".to_owned()),
            algorithm: portcullis_jwt::SignatureAlgorithm::RS256,
            expires_at: None,
            token_fingerprint: "0123456789abcdef".to_owned(),
            locations: Vec::new(),
        };
        let expected = json!({
            "provider": "keycloak",
            "issuer": "https://issuer.example",
            "subject": null,
            "audiences": ["orders", "catalog"],
            "claims": claims,
            "kid": "k1",
            "alg": "RS256",
        });
        let parsed = PolicyValue::from_json_str(&expected.to_string()).expect("valid JSON");
        assert_eq!(identity_document(&identity), parsed);
    }

    #[test]
    fn identity_error_document_names_reason_message_and_provider() {
        let invalid = InvalidToken {
            reason: portcullis_jwt::InvalidReason::Expired,
            message: "token expired".to_owned(),
            provider: None,
            location: None,
            token_fingerprint: None,
        };
        let parsed = PolicyValue::from_json_str(r#"{"reason": "expired", "message": "token expired", "provider": null}"#)
            .expect("valid JSON");
        assert_eq!(identity_error_document(&invalid), parsed);
    }

    #[test]
    fn headers_map_is_used_when_present() {
        let mut http = HttpRequest::default();
        http.headers.insert("authorization".to_owned(), "Bearer t".to_owned());
        assert!(matches!(request_headers(&http), Cow::Borrowed(_)));
    }
}
