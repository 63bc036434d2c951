//! Header changes for the request sent upstream after authentication.

use serde_json::Value;

use crate::config::TokenLocation;
use crate::extract::{TokenSource, cookie_header_without};
use crate::outcome::{TokenOutcome, UpstreamHeaders};
use crate::provider::Provider;

pub(crate) fn upstream_headers<S: TokenSource + ?Sized>(
    providers: &[Provider],
    outcome: &TokenOutcome,
    request: &S,
) -> UpstreamHeaders {
    let mut headers = UpstreamHeaders::default();
    let verified = match outcome {
        TokenOutcome::Valid(identity) => providers
            .iter()
            .find(|provider| provider.name == identity.provider)
            .map(|p| (p, identity)),
        TokenOutcome::NoToken | TokenOutcome::Invalid(_) => None,
    };

    if let Some((provider, identity)) = verified {
        for mapping in &provider.claim_to_headers {
            match identity.claims.get(&mapping.claim).and_then(header_value) {
                Some(value) => headers.set.push((mapping.header.clone(), value)),
                None => push_unique(&mut headers.remove, &mapping.header),
            }
        }
        if !provider.forward {
            remove_token_locations(&identity.locations, request, &mut headers);
        }
    }

    // Claim headers of the other providers (or of every provider without a valid token) come
    // only from the client, so they are removed.
    for provider in providers {
        if verified.is_some_and(|(verified, _)| std::ptr::eq(verified, provider)) {
            continue;
        }
        for mapping in &provider.claim_to_headers {
            if !headers.set.iter().any(|(name, _)| *name == mapping.header) {
                push_unique(&mut headers.remove, &mapping.header);
            }
        }
    }
    headers
}

fn remove_token_locations<S: TokenSource + ?Sized>(
    locations: &[TokenLocation],
    request: &S,
    headers: &mut UpstreamHeaders,
) {
    let mut removed_cookies: Vec<&str> = Vec::new();
    for location in locations {
        match location {
            TokenLocation::Header { name, .. } => push_unique(&mut headers.remove, name),
            TokenLocation::QueryParameter { name } => {
                push_unique(&mut headers.remove_query_parameters, name)
            }
            TokenLocation::Cookie { name } => removed_cookies.push(name),
        }
    }
    if removed_cookies.is_empty() {
        return;
    }
    if let Some(cookie_header) = request.header("cookie") {
        match cookie_header_without(cookie_header, &removed_cookies) {
            Some(rest) => headers.set.push(("cookie".to_owned(), rest)),
            None => push_unique(&mut headers.remove, "cookie"),
        }
    }
}

/// Converts a claim to a header value: strings as they are, numbers and booleans as JSON text,
/// arrays of those joined with commas. Objects, nulls, and values with control characters
/// (which could split a header) give `None`.
fn header_value(claim: &Value) -> Option<String> {
    let value = match claim {
        Value::String(text) => text.clone(),
        Value::Number(_) | Value::Bool(_) => claim.to_string(),
        Value::Array(items) => {
            let parts: Option<Vec<String>> = items
                .iter()
                .map(|item| match item {
                    Value::Array(_) | Value::Object(_) | Value::Null => None,
                    scalar => header_value(scalar),
                })
                .collect();
            parts?.join(",")
        }
        Value::Object(_) | Value::Null => return None,
    };
    if value.chars().any(|character| character.is_control()) {
        return None;
    }
    Some(value)
}

fn push_unique(list: &mut Vec<String>, value: &str) {
    if !list.iter().any(|existing| existing == value) {
        list.push(value.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn claim_values_become_header_text() {
        assert_eq!(header_value(&json!("alice")), Some("alice".to_owned()));
        assert_eq!(header_value(&json!(42)), Some("42".to_owned()));
        assert_eq!(header_value(&json!(true)), Some("true".to_owned()));
        assert_eq!(
            header_value(&json!(["admin", "ops", 3])),
            Some("admin,ops,3".to_owned())
        );
    }

    #[test]
    fn unsafe_or_structured_claims_give_no_header() {
        assert_eq!(header_value(&json!({"a": 1})), None);
        assert_eq!(header_value(&json!(null)), None);
        assert_eq!(header_value(&json!([["nested"]])), None);
        assert_eq!(header_value(&json!("line\r\nx-admin: true")), None);
    }
}
