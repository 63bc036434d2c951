//! RFC 3339 text of `google.protobuf.Timestamp`, as protojson writes and reads it.

use chrono::{DateTime, Utc};
use envoy_types::pb::google::protobuf::Timestamp;

/// Seconds of 0001-01-01T00:00:00Z, the earliest instant a protobuf `Timestamp` may hold.
const MIN_SECONDS: i64 = -62_135_596_800;

/// Seconds of 9999-12-31T23:59:59Z, the latest whole second a protobuf `Timestamp` may hold.
const MAX_SECONDS: i64 = 253_402_300_799;

/// Formats `timestamp` in UTC with a `Z` suffix and 0, 3, 6 or 9 fractional digits, the shortest
/// of those that keeps every nonzero digit, as protojson does.
///
/// Returns `None` for a timestamp outside years 1 to 9999 or with nanoseconds outside
/// `0..1_000_000_000`; protojson fails to encode those.
pub(crate) fn format_timestamp(timestamp: &Timestamp) -> Option<String> {
    if !(MIN_SECONDS..=MAX_SECONDS).contains(&timestamp.seconds) {
        return None;
    }
    let nanos = u32::try_from(timestamp.nanos)
        .ok()
        .filter(|nanos| *nanos < 1_000_000_000)?;
    let time = DateTime::<Utc>::from_timestamp(timestamp.seconds, nanos)?;

    let whole_seconds = time.format("%Y-%m-%dT%H:%M:%S");
    let text = if nanos == 0 {
        format!("{whole_seconds}Z")
    } else if nanos % 1_000_000 == 0 {
        format!("{whole_seconds}.{:03}Z", nanos / 1_000_000)
    } else if nanos % 1_000 == 0 {
        format!("{whole_seconds}.{:06}Z", nanos / 1_000)
    } else {
        format!("{whole_seconds}.{nanos:09}Z")
    };
    Some(text)
}

/// Parses RFC 3339 text with any UTC offset into a `Timestamp`.
pub(crate) fn parse_timestamp(text: &str) -> Result<Timestamp, String> {
    let time = DateTime::parse_from_rfc3339(text).map_err(|error| error.to_string())?;
    let seconds = time.timestamp();
    if !(MIN_SECONDS..=MAX_SECONDS).contains(&seconds) {
        return Err("outside years 1 to 9999".to_owned());
    }
    // chrono stores a leap second as nanoseconds from 1_000_000_000 upwards. Protobuf timestamps
    // have no leap seconds, and Go's parser rejects second 60 too.
    let nanos = time.timestamp_subsec_nanos();
    let nanos = i32::try_from(nanos)
        .ok()
        .filter(|nanos| *nanos < 1_000_000_000)
        .ok_or_else(|| "leap seconds are not supported".to_owned())?;
    Ok(Timestamp { seconds, nanos })
}
