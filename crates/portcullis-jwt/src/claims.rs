//! Checks of the registered claims, done explicitly instead of through jsonwebtoken's
//! `Validation`, which skips `nbf` and `iat` and reads the system clock.

use serde_json::{Map, Value};

use crate::outcome::{InvalidReason, Rejection, shorten};

/// Claim checks configured for a provider.
#[derive(Debug, Clone)]
pub(crate) struct ClaimRules {
    pub audiences: Vec<String>,
    pub clock_skew_seconds: f64,
    pub require_expiration: bool,
    pub required_claims: Vec<String>,
}

/// Claims extracted during validation.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CheckedClaims {
    pub subject: Option<String>,
    pub audiences: Vec<String>,
    /// `exp` in Unix seconds.
    pub expires_at: Option<f64>,
}

/// Checks `exp`, `nbf`, `iat`, `aud`, `sub` and the required claims at `now` (Unix seconds).
///
/// With skew `s`, a token is valid while `now < exp + s`, from `now >= nbf - s`, and when
/// `iat <= now + s`. NumericDate values may be fractional (RFC 7519, section 2).
pub(crate) fn check_claims(
    rules: &ClaimRules,
    claims: &Map<String, Value>,
    now: f64,
) -> Result<CheckedClaims, Rejection> {
    let expires_at = numeric_date(claims, "exp")?;
    let not_before = numeric_date(claims, "nbf")?;
    let issued_at = numeric_date(claims, "iat")?;
    let skew = rules.clock_skew_seconds;

    match expires_at {
        None if rules.require_expiration => {
            return Err(Rejection::new(
                InvalidReason::MissingClaim,
                "token has no exp claim",
            ));
        }
        Some(exp) if now >= exp + skew => {
            return Err(Rejection::new(
                InvalidReason::Expired,
                format!("token expired at {exp} (Unix time)"),
            ));
        }
        _ => {}
    }
    if let Some(nbf) = not_before
        && now < nbf - skew
    {
        return Err(Rejection::new(
            InvalidReason::NotYetValid,
            format!("token is not valid before {nbf} (Unix time)"),
        ));
    }
    if let Some(iat) = issued_at
        && iat > now + skew
    {
        return Err(Rejection::new(
            InvalidReason::NotYetValid,
            format!("token is issued in the future, at {iat} (Unix time)"),
        ));
    }

    let audiences = audiences(claims)?;
    check_audience(rules, audiences.as_deref())?;
    let subject = match claims.get("sub") {
        None | Some(Value::Null) => None,
        Some(Value::String(subject)) => Some(subject.clone()),
        Some(_) => return Err(malformed("token sub claim is not a string")),
    };
    for name in &rules.required_claims {
        if claims.get(name).is_none_or(Value::is_null) {
            return Err(Rejection::new(
                InvalidReason::MissingClaim,
                format!("token has no {} claim", shorten(name)),
            ));
        }
    }

    Ok(CheckedClaims {
        subject,
        audiences: audiences.unwrap_or_default(),
        expires_at,
    })
}

fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, Rejection> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(number)) => number
            .as_f64()
            .map(Some)
            .ok_or_else(|| malformed(format!("token {name} claim is not a number"))),
        Some(_) => Err(malformed(format!("token {name} claim is not a number"))),
    }
}

/// Reads `aud`, which RFC 7519 allows as a string or an array of strings.
fn audiences(claims: &Map<String, Value>) -> Result<Option<Vec<String>>, Rejection> {
    match claims.get("aud") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(audience)) => Ok(Some(vec![audience.clone()])),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned))
            .collect::<Option<Vec<String>>>()
            .map(Some)
            .ok_or_else(|| malformed("token aud claim has a non-string element")),
        Some(_) => Err(malformed(
            "token aud claim is neither a string nor an array",
        )),
    }
}

fn check_audience(rules: &ClaimRules, audiences: Option<&[String]>) -> Result<(), Rejection> {
    if rules.audiences.is_empty() {
        return Ok(());
    }
    let Some(audiences) = audiences else {
        return Err(Rejection::new(
            InvalidReason::AudienceMismatch,
            "token has no aud claim",
        ));
    };
    if audiences
        .iter()
        .any(|audience| rules.audiences.contains(audience))
    {
        return Ok(());
    }
    let listed: Vec<String> = audiences
        .iter()
        .take(3)
        .map(|audience| shorten(audience))
        .collect();
    Err(Rejection::new(
        InvalidReason::AudienceMismatch,
        format!("token audience {} is not accepted", listed.join(", ")),
    ))
}

fn malformed(message: impl Into<String>) -> Rejection {
    Rejection::new(InvalidReason::Malformed, message)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const NOW: f64 = 1_700_000_000.0;

    fn rules() -> ClaimRules {
        ClaimRules {
            audiences: vec!["orders".to_owned(), "billing".to_owned()],
            clock_skew_seconds: 60.0,
            require_expiration: true,
            required_claims: Vec::new(),
        }
    }

    fn claims(value: Value) -> Map<String, Value> {
        value.as_object().expect("claims are an object").clone()
    }

    fn check(rules: &ClaimRules, value: Value, now: f64) -> Result<CheckedClaims, Rejection> {
        check_claims(rules, &claims(value), now)
    }

    fn reason(result: Result<CheckedClaims, Rejection>) -> InvalidReason {
        result.expect_err("claims should be rejected").reason
    }

    #[test]
    fn expiry_accepted_until_skew_ends() {
        let token = json!({"exp": NOW, "aud": "orders"});
        assert!(check(&rules(), token.clone(), NOW + 59.0).is_ok());
        assert!(check(&rules(), token.clone(), NOW + 59.999).is_ok());
        assert_eq!(
            reason(check(&rules(), token.clone(), NOW + 60.0)),
            InvalidReason::Expired
        );
        assert_eq!(
            check(&rules(), token, NOW + 61.0).unwrap_err().message,
            "token expired at 1700000000 (Unix time)"
        );
    }

    #[test]
    fn not_before_accepted_from_skew_start() {
        let token = json!({"exp": NOW + 3600.0, "nbf": NOW, "aud": "orders"});
        assert!(check(&rules(), token.clone(), NOW - 60.0).is_ok());
        assert_eq!(
            reason(check(&rules(), token.clone(), NOW - 60.001)),
            InvalidReason::NotYetValid
        );
        assert_eq!(
            check(&rules(), token, NOW - 61.0).unwrap_err().message,
            "token is not valid before 1700000000 (Unix time)"
        );
    }

    #[test]
    fn future_iat_beyond_skew_rejected() {
        let token = json!({"exp": NOW + 3600.0, "iat": NOW + 60.0, "aud": "orders"});
        assert!(check(&rules(), token.clone(), NOW).is_ok());
        let token = json!({"exp": NOW + 3600.0, "iat": NOW + 61.0, "aud": "orders"});
        assert_eq!(
            reason(check(&rules(), token, NOW)),
            InvalidReason::NotYetValid
        );
    }

    #[test]
    fn zero_skew_is_exact() {
        let rules = ClaimRules {
            clock_skew_seconds: 0.0,
            ..rules()
        };
        let token = json!({"exp": NOW, "nbf": NOW - 10.0, "aud": "orders"});
        assert!(check(&rules, token.clone(), NOW - 0.5).is_ok());
        assert_eq!(
            reason(check(&rules, token.clone(), NOW)),
            InvalidReason::Expired
        );
        assert_eq!(
            reason(check(&rules, token, NOW - 10.5)),
            InvalidReason::NotYetValid
        );
    }

    #[test]
    fn missing_exp_is_rejected_unless_optional() {
        assert_eq!(
            check(&rules(), json!({"aud": "orders"}), NOW).unwrap_err(),
            Rejection::new(InvalidReason::MissingClaim, "token has no exp claim")
        );
        let optional = ClaimRules {
            require_expiration: false,
            ..rules()
        };
        assert_eq!(
            check(&optional, json!({"aud": "orders"}), NOW)
                .unwrap()
                .expires_at,
            None
        );
    }

    #[test]
    fn non_numeric_dates_are_malformed() {
        for name in ["exp", "nbf", "iat"] {
            let mut token = claims(json!({"exp": NOW + 10.0, "aud": "orders"}));
            token.insert(name.to_owned(), json!("1700000000"));
            let error = check_claims(&rules(), &token, NOW).unwrap_err();
            assert_eq!(
                error,
                Rejection::new(
                    InvalidReason::Malformed,
                    format!("token {name} claim is not a number")
                )
            );
        }
    }

    #[test]
    fn audience_string_must_be_accepted() {
        let checked = check(&rules(), json!({"exp": NOW + 10.0, "aud": "billing"}), NOW).unwrap();
        assert_eq!(checked.audiences, vec!["billing"]);
        assert_eq!(
            check(&rules(), json!({"exp": NOW + 10.0, "aud": "shipping"}), NOW).unwrap_err(),
            Rejection::new(
                InvalidReason::AudienceMismatch,
                "token audience shipping is not accepted"
            )
        );
    }

    #[test]
    fn audience_array_needs_one_accepted_member() {
        let checked = check(
            &rules(),
            json!({"exp": NOW + 10.0, "aud": ["shipping", "orders"]}),
            NOW,
        )
        .unwrap();
        assert_eq!(checked.audiences, vec!["shipping", "orders"]);
        assert_eq!(
            check(
                &rules(),
                json!({"exp": NOW + 10.0, "aud": ["shipping", "crm"]}),
                NOW
            )
            .unwrap_err(),
            Rejection::new(
                InvalidReason::AudienceMismatch,
                "token audience shipping, crm is not accepted"
            )
        );
        assert_eq!(
            reason(check(&rules(), json!({"exp": NOW + 10.0, "aud": []}), NOW)),
            InvalidReason::AudienceMismatch
        );
    }

    #[test]
    fn missing_audience_is_a_mismatch() {
        assert_eq!(
            check(&rules(), json!({"exp": NOW + 10.0}), NOW).unwrap_err(),
            Rejection::new(InvalidReason::AudienceMismatch, "token has no aud claim")
        );
    }

    #[test]
    fn audience_is_not_checked_without_configured_audiences() {
        let open = ClaimRules {
            audiences: Vec::new(),
            ..rules()
        };
        assert!(check(&open, json!({"exp": NOW + 10.0}), NOW).is_ok());
        assert!(check(&open, json!({"exp": NOW + 10.0, "aud": "anything"}), NOW).is_ok());
    }

    #[test]
    fn malformed_audience_is_rejected() {
        assert_eq!(
            reason(check(
                &rules(),
                json!({"exp": NOW + 10.0, "aud": ["orders", 5]}),
                NOW
            )),
            InvalidReason::Malformed
        );
        assert_eq!(
            reason(check(
                &rules(),
                json!({"exp": NOW + 10.0, "aud": {"a": 1}}),
                NOW
            )),
            InvalidReason::Malformed
        );
    }

    #[test]
    fn required_claims_must_be_present_and_not_null() {
        let strict = ClaimRules {
            required_claims: vec!["tenant".to_owned()],
            ..rules()
        };
        assert!(
            check(
                &strict,
                json!({"exp": NOW + 10.0, "aud": "orders", "tenant": "acme"}),
                NOW
            )
            .is_ok()
        );
        assert_eq!(
            check(
                &strict,
                json!({"exp": NOW + 10.0, "aud": "orders", "tenant": null}),
                NOW
            )
            .unwrap_err(),
            Rejection::new(InvalidReason::MissingClaim, "token has no tenant claim")
        );
    }

    #[test]
    fn subject_must_be_a_string() {
        let checked = check(
            &rules(),
            json!({"exp": NOW + 10.0, "aud": "orders", "sub": "alice"}),
            NOW,
        )
        .unwrap();
        assert_eq!(checked.subject.as_deref(), Some("alice"));
        assert_eq!(
            reason(check(
                &rules(),
                json!({"exp": NOW + 10.0, "aud": "orders", "sub": 7}),
                NOW
            )),
            InvalidReason::Malformed
        );
    }
}
