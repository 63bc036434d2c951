use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// One authorization decision, as recorded by a [`crate::DecisionSink`].
///
/// The schema is versioned by `schema`; a field is only ever added, never renamed or
/// reused, so readers of older events keep working. Sinks that chain their records add
/// `instance_id`, `sequence`, `prev_hash` and `hash` around these members (see [`crate::chain`]).
#[derive(Debug, Clone, Serialize)]
pub struct DecisionEvent {
    pub schema: &'static str,
    /// Unique id of this record (UUID v7), distinct from the decision id so that a reader can
    /// tell a resent copy of one record from two records about one decision.
    pub event_id: String,
    pub decision_id: String,
    /// Time the check arrived, RFC 3339 in UTC with microseconds.
    pub time: String,
    /// The request as summarised by the authorization service (method, authority, path,
    /// addresses, principals, request id, trace context) and the headers named by the
    /// configured allow-list. Other headers and bodies are never included.
    pub request: serde_json::Value,
    /// The caller's identity when token verification is configured: the outcome (`valid`,
    /// `no_token` or why the token was rejected), provider, issuer, subject, key id,
    /// algorithm and token fingerprint. Never the token itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<serde_json::Value>,
    pub decision: EventDecision,
    pub policy: EventPolicy,
    /// Time from the arrival of the check to the decision, before recording the event.
    pub latency_us: u64,
    /// The `event_id` of an earlier record of the same decision that this record corrects.
    /// It is set when that record was not acknowledged in time, so the request was denied with
    /// 503 after all, while the earlier record, already chained, still carries the policy's
    /// decision and may be shipped later.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amends: Option<String>,
}

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventDecision {
    pub allowed: bool,
    /// The HTTP status Envoy sends to the client on deny; 200 on allow.
    pub http_status: u16,
    /// Reason portcullis denied on its own (malformed body, undefined decision, policy error).
    /// Absent when the policy decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The policy that made the decision.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventPolicy {
    /// The manifest revision, or the content digest when the bundle has none.
    pub bundle_revision: String,
    /// SHA-256 of the bundle content, so events tell bundles apart even when an edit kept the
    /// manifest revision.
    pub bundle_digest: String,
    pub decision_path: String,
}

impl DecisionEvent {
    /// Current schema identifier of [`DecisionEvent`].
    pub const SCHEMA: &'static str = "portcullis.decision.v2";
}

/// Formats a time as RFC 3339 in UTC with microseconds, e.g. `2026-12-04T19:42:58.123456Z`.
///
/// Written by hand because the calendar arithmetic is short and the workspace has no date
/// crate; times before 1970 are clamped to the epoch.
pub fn format_rfc3339(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since_epoch.as_secs();
    let micros = since_epoch.subsec_micros();
    let (year, month, day) = civil_from_days((seconds / 86_400) as i64);
    let second_of_day = seconds % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60
    )
}

/// Converts days since 1970-01-01 to a proleptic Gregorian (year, month, day), after
/// Howard Hinnant's `civil_from_days` algorithm.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn rfc3339_formats_epoch() {
        assert_eq!(format_rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
    }

    #[test]
    fn rfc3339_formats_leap_day_with_micros() {
        // 2024-02-29T12:34:56.789012Z
        let time = UNIX_EPOCH + Duration::new(1_709_210_096, 789_012_000);
        assert_eq!(format_rfc3339(time), "2024-02-29T12:34:56.789012Z");
    }

    #[test]
    fn rfc3339_formats_end_of_year() {
        // 2026-12-31T23:59:59Z
        let time = UNIX_EPOCH + Duration::from_secs(1_798_761_599);
        assert_eq!(format_rfc3339(time), "2026-12-31T23:59:59.000000Z");
    }
}
