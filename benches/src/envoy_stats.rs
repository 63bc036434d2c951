//! Reading Envoy's ext_authz counters from its admin `/stats` page.
//!
//! When a check fails or times out, Envoy denies the request with 403 itself, which the load
//! generator cannot tell from a policy's 403. These counters tell the two apart.

/// The ext_authz counters that count checks without a decision from the server. Envoy 1.40
/// names them `http.<stat_prefix>.ext_authz.<kind>` and repeats some under `cluster.<name>.`.
/// It has no `timeout` counter: a check that timed out after 2 s counted as `error` when
/// tried with Envoy 1.40.
const FAILURE_KINDS: [&str; 3] = ["error", "invalid", "failure_mode_allowed"];

/// Reads the `http.*.ext_authz.<kind>: N` lines of a `/stats` text page for the kinds in
/// `FAILURE_KINDS`, in that order, with the counts of several listeners added up.
pub fn ext_authz_failures(stats: &str) -> Vec<(String, u64)> {
    let mut counts = [0u64; FAILURE_KINDS.len()];
    for line in stats.lines() {
        let Some((name, value)) = line.split_once(": ") else {
            continue;
        };
        if !name.starts_with("http.") {
            continue;
        }
        let Some((_, kind)) = name.rsplit_once(".ext_authz.") else {
            continue;
        };
        if let (Some(index), Ok(value)) = (
            FAILURE_KINDS.iter().position(|known| *known == kind),
            value.trim().parse::<u64>(),
        ) {
            counts[index] += value;
        }
    }
    FAILURE_KINDS
        .iter()
        .zip(counts)
        .map(|(kind, count)| (kind.to_string(), count))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_read_from_http_counters_only() {
        let stats = "cluster.upstream.ext_authz.error: 7\n\
                     http.ingress.ext_authz.denied: 40\n\
                     http.ingress.ext_authz.error: 2\n\
                     http.ingress.ext_authz.ok: 100\n\
                     http.ingress.ext_authz.invalid: 1\n\
                     http.ingress.downstream_rq_total: 141\n";

        let failures = ext_authz_failures(stats);

        assert_eq!(
            failures,
            [
                ("error".to_string(), 2),
                ("invalid".to_string(), 1),
                ("failure_mode_allowed".to_string(), 0),
            ]
        );
    }
}
