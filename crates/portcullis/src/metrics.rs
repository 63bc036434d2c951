//! Prometheus metrics: checks by outcome, check latency, the active bundle revision and
//! bundle reloads.

use portcullis_authz::service::{CheckObserver, CheckSummary};
use portcullis_policy::ReloadObserver;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    /// `allowed` or `denied`.
    outcome: &'static str,
    /// The denying party: `policy`, or the reason portcullis denied on its own; `none` on allow.
    denied_by: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RevisionLabels {
    revision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    provider: String,
    /// `valid`, `no_token` or the reason a token was rejected.
    outcome: String,
    /// `true` when the identity came from the verified-token cache.
    cached: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefreshLabels {
    provider: String,
    /// `success` or `failure`.
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VaultLoginLabels {
    /// `kubernetes`, `approle` or `token`.
    method: String,
    /// `success` or `failure`.
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    /// `success` or `failure`.
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuditFailureLabels {
    /// `full`, `write`, `transport_timeout`, `transport_retriable`, `transport_fatal`,
    /// `delivery_timeout` or `delivery_fallback`.
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabels {
    transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    /// `success` or `failure`.
    result: &'static str,
}

/// The process's metrics, shared by the check path, the bundle watcher and `/metrics`.
pub struct Metrics {
    registry: Registry,
    checks: Family<CheckLabels, Counter>,
    check_duration: Histogram,
    bundle_revision: Family<RevisionLabels, Gauge>,
    bundle_reloads: Family<ReloadLabels, Counter>,
    bundle_last_reload_failed: Gauge,
    ready: Gauge,
    jwt_verifications: Family<TokenLabels, Counter>,
    jwks_refreshes: Family<RefreshLabels, Counter>,
    jwks_key_age: Family<ProviderLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    audit_delivery_lag: Histogram,
    audit_backlog_records: Gauge,
    audit_backlog_bytes: Gauge,
    audit_oldest_unshipped: Gauge<f64, std::sync::atomic::AtomicU64>,
    audit_failures: Family<AuditFailureLabels, Counter>,
    audit_checkpoints: Counter,
    audit_transport_rebuilds: Family<TransportLabels, Counter>,
    certificate_expiry: Gauge,
    certificate_rotations: Counter,
    certificate_rotation_failures: Counter,
    vault_logins: Family<VaultLoginLabels, Counter>,
    vault_token_renewals: Family<OutcomeLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("portcullis");
        let checks = Family::<CheckLabels, Counter>::default();
        registry.register("checks", "ext_authz checks answered, by outcome and by who denied", checks.clone());

        // 10 µs to about 1.3 s: a check costs tens of microseconds unless the audit sink
        // is slow, and the slow end shows where the audit timeout bites.
        let check_duration = Histogram::new(exponential_buckets(0.000_01, 2.0, 18));
        registry.register("check_duration_seconds", "time from the arrival of a check to its answer", check_duration.clone());

        let bundle_revision = Family::<RevisionLabels, Gauge>::default();
        registry.register("bundle_info", "the active policy bundle; its revision is in the label", bundle_revision.clone());

        let bundle_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register("bundle_reloads", "policy bundle reloads by result", bundle_reloads.clone());

        let bundle_last_reload_failed = Gauge::default();
        registry.register(
            "bundle_last_reload_failed",
            "1 when the newest bundle content failed to load and an older bundle is still active",
            bundle_last_reload_failed.clone(),
        );

        let ready = Gauge::default();
        registry.register("ready", "1 when the sidecar is ready to answer checks", ready.clone());

        let jwt_verifications = Family::<TokenLabels, Counter>::default();
        registry.register("jwt_verifications", "JWT checks by provider, outcome and whether the verified-token cache answered", jwt_verifications.clone());
        let jwks_refreshes = Family::<RefreshLabels, Counter>::default();
        registry.register("jwks_refreshes", "JWKS and OIDC discovery fetches by provider and result", jwks_refreshes.clone());
        let jwks_key_age = Family::<ProviderLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register("jwks_key_age_seconds", "age of each provider's current key set", jwks_key_age.clone());

        let certificate_expiry = Gauge::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "notAfter of the served mTLS certificate in unix seconds; 0 when none is served",
            certificate_expiry.clone(),
        );
        let certificate_rotations = Counter::default();
        registry.register("certificate_rotations", "mTLS certificates obtained, checked and installed", certificate_rotations.clone());
        let certificate_rotation_failures = Counter::default();
        registry.register("certificate_rotation_failures", "failed attempts to obtain or install an mTLS certificate", certificate_rotation_failures.clone());
        let vault_logins = Family::<VaultLoginLabels, Counter>::default();
        registry.register("vault_logins", "Vault logins by auth method and outcome", vault_logins.clone());
        let vault_token_renewals = Family::<OutcomeLabels, Counter>::default();
        registry.register("vault_token_renewals", "Vault token renewals by outcome", vault_token_renewals.clone());

        // 1 ms to about 65 s: Kafka acknowledges in milliseconds, and the slow end shows an
        // outage that the spool absorbs.
        let audit_delivery_lag = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        registry.register("audit_delivery_lag_seconds", "time from recording an audit record to its acknowledgement by the transport", audit_delivery_lag.clone());
        let audit_backlog_records = Gauge::default();
        registry.register("audit_backlog_records", "audit records written locally and not yet acknowledged by the transport", audit_backlog_records.clone());
        let audit_backlog_bytes = Gauge::default();
        registry.register("audit_backlog_bytes", "bytes of the audit spool on disk, or of the memory queue without a spool", audit_backlog_bytes.clone());
        let audit_oldest_unshipped = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register("audit_oldest_unshipped_seconds", "age of the oldest audit record not yet acknowledged by the transport", audit_oldest_unshipped.clone());
        let audit_failures = Family::<AuditFailureLabels, Counter>::default();
        registry.register("audit_failures", "audit pipeline failures by kind; full means checks were denied because the spool or queue was full", audit_failures.clone());
        let audit_checkpoints = Counter::default();
        registry.register("audit_checkpoints", "signed checkpoints written to the audit chain", audit_checkpoints.clone());
        let audit_transport_rebuilds = Family::<TransportLabels, Counter>::default();
        registry.register("audit_transport_rebuilds", "audit transport clients replaced after a fatal error or on request", audit_transport_rebuilds.clone());

        // Series that dashboards and alerts query exist from the start, at zero.
        let _ = audit_failures.get_or_create(&AuditFailureLabels { kind: "full" });
        let _ = checks.get_or_create(&CheckLabels { outcome: "allowed", denied_by: "none" });
        let _ = checks.get_or_create(&CheckLabels { outcome: "denied", denied_by: "policy" });
        let _ = bundle_reloads.get_or_create(&ReloadLabels { result: "success" });
        let _ = bundle_reloads.get_or_create(&ReloadLabels { result: "failure" });

        Self {
            registry,
            checks,
            check_duration,
            bundle_revision,
            bundle_reloads,
            bundle_last_reload_failed,
            ready,
            jwt_verifications,
            jwks_refreshes,
            jwks_key_age,
            audit_delivery_lag,
            audit_backlog_records,
            audit_backlog_bytes,
            audit_oldest_unshipped,
            audit_failures,
            audit_checkpoints,
            audit_transport_rebuilds,
            certificate_expiry,
            certificate_rotations,
            certificate_rotation_failures,
            vault_logins,
            vault_token_renewals,
        }
    }

    /// Marks `revision` as the active bundle.
    pub fn set_bundle_revision(&self, revision: &str) {
        self.bundle_revision.clear();
        self.bundle_revision.get_or_create(&RevisionLabels { revision: revision.to_owned() }).set(1);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Err(error) = encode(&mut text, &self.registry) {
            tracing::error!(%error, "encoding metrics failed");
        }
        text
    }
}

impl CheckObserver for Metrics {
    fn check_completed(&self, outcome: &CheckSummary) {
        let labels = CheckLabels {
            outcome: if outcome.allowed { "allowed" } else { "denied" },
            denied_by: match (outcome.allowed, outcome.denied_by) {
                (true, _) => "none",
                (false, Some(reason)) => reason,
                (false, None) => "policy",
            },
        };
        self.checks.get_or_create(&labels).inc();
        self.check_duration.observe(outcome.latency.as_secs_f64());
    }
}

impl portcullis_jwt::JwtObserver for Metrics {
    fn token_checked(&self, provider: Option<&str>, outcome: &str, from_cache: bool) {
        let labels = TokenLabels {
            provider: provider.unwrap_or("none").to_owned(),
            outcome: outcome.to_owned(),
            cached: if from_cache { "true" } else { "false" },
        };
        self.jwt_verifications.get_or_create(&labels).inc();
    }

    fn jwks_refreshed(&self, provider: &str, _key_count: usize, _skipped_count: usize) {
        self.jwks_refreshes.get_or_create(&RefreshLabels { provider: provider.to_owned(), result: "success" }).inc();
    }

    fn jwks_refresh_failed(&self, provider: &str, _error: &portcullis_jwt::FetchError) {
        self.jwks_refreshes.get_or_create(&RefreshLabels { provider: provider.to_owned(), result: "failure" }).inc();
    }

    fn key_age(&self, provider: &str, age: std::time::Duration) {
        self.jwks_key_age.get_or_create(&ProviderLabels { provider: provider.to_owned() }).set(age.as_secs_f64());
    }
}

impl portcullis_pki::PkiObserver for Metrics {
    fn certificate_installed(&self, certificate: &portcullis_pki::CheckedCertificate) {
        self.certificate_rotations.inc();
        let expiry = certificate.not_after.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        self.certificate_expiry.set(i64::try_from(expiry.as_secs()).unwrap_or(i64::MAX));
    }

    fn certificate_withdrawn(&self) {
        self.certificate_expiry.set(0);
    }

    fn rotation_failed(&self, _error: &portcullis_pki::PkiError) {
        self.certificate_rotation_failures.inc();
    }

    fn vault_login(&self, method: &str, outcome: &str) {
        self.vault_logins.get_or_create(&VaultLoginLabels { method: method.to_owned(), outcome: outcome.to_owned() }).inc();
    }

    fn vault_token_renewal(&self, outcome: &str) {
        self.vault_token_renewals.get_or_create(&OutcomeLabels { outcome: outcome.to_owned() }).inc();
    }
}

impl portcullis_audit::AuditObserver for Metrics {
    fn delivered(&self, lag: std::time::Duration) {
        self.audit_delivery_lag.observe(lag.as_secs_f64());
    }

    fn backlog(&self, records: u64, bytes: u64, oldest: Option<std::time::Duration>) {
        self.audit_backlog_records.set(i64::try_from(records).unwrap_or(i64::MAX));
        self.audit_backlog_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.audit_oldest_unshipped.set(oldest.map_or(0.0, |age| age.as_secs_f64()));
    }

    fn failure(&self, kind: &'static str) {
        self.audit_failures.get_or_create(&AuditFailureLabels { kind }).inc();
    }

    fn checkpoint_written(&self) {
        self.audit_checkpoints.inc();
    }

    fn transport_rebuilt(&self, transport: &'static str, reason: &str) {
        tracing::warn!(audit.transport = transport, reason, "audit transport rebuilt its client");
        self.audit_transport_rebuilds.get_or_create(&TransportLabels { transport }).inc();
    }
}

impl portcullis_kafka::RebuildObserver for Metrics {
    fn producer_rebuilt(&self, event: &portcullis_kafka::RebuildEvent) {
        let reason = match &event.reason {
            portcullis_kafka::RebuildReason::Requested => "requested".to_owned(),
            portcullis_kafka::RebuildReason::FatalError(reason) => format!("fatal error: {reason}"),
            portcullis_kafka::RebuildReason::CertificateRotated => "client certificate rotated".to_owned(),
            portcullis_kafka::RebuildReason::Reset => "reset after a failed send".to_owned(),
        };
        portcullis_audit::AuditObserver::transport_rebuilt(self, "kafka", &reason);
    }
}

impl ReloadObserver for Metrics {
    fn reloaded(&self, revision: &str) {
        self.bundle_reloads.get_or_create(&ReloadLabels { result: "success" }).inc();
        self.bundle_last_reload_failed.set(0);
        self.set_bundle_revision(revision);
    }

    fn reload_failed(&self, _error: &str) {
        self.bundle_reloads.get_or_create(&ReloadLabels { result: "failure" }).inc();
        self.bundle_last_reload_failed.set(1);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn checks_are_counted_by_outcome() {
        let metrics = Metrics::new();
        let allowed = CheckSummary { allowed: true, http_status: 200, denied_by: None, latency: Duration::from_micros(40) };
        let denied = CheckSummary { allowed: false, http_status: 400, denied_by: Some("malformed_body"), latency: Duration::from_micros(40) };
        metrics.check_completed(&allowed);
        metrics.check_completed(&allowed);
        metrics.check_completed(&denied);

        let text = metrics.render();
        assert!(text.contains("portcullis_checks_total{outcome=\"allowed\",denied_by=\"none\"} 2"), "{text}");
        assert!(text.contains("portcullis_checks_total{outcome=\"denied\",denied_by=\"malformed_body\"} 1"), "{text}");
        assert!(text.contains("portcullis_check_duration_seconds_count 3"), "{text}");
    }

    #[test]
    fn common_series_start_at_zero() {
        let text = Metrics::new().render();
        assert!(text.contains("portcullis_checks_total{outcome=\"allowed\",denied_by=\"none\"} 0"), "{text}");
        assert!(text.contains("portcullis_checks_total{outcome=\"denied\",denied_by=\"policy\"} 0"), "{text}");
        assert!(text.contains("portcullis_bundle_reloads_total{result=\"failure\"} 0"), "{text}");
    }

    #[test]
    fn token_checks_and_refreshes_are_counted() {
        use portcullis_jwt::JwtObserver;

        let metrics = Metrics::new();
        metrics.token_checked(Some("keycloak"), "valid", true);
        metrics.token_checked(Some("keycloak"), "expired", false);
        metrics.jwks_refreshed("keycloak", 2, 1);
        metrics.key_age("keycloak", Duration::from_secs(90));

        let text = metrics.render();
        assert!(text.contains("portcullis_jwt_verifications_total{provider=\"keycloak\",outcome=\"valid\",cached=\"true\"} 1"), "{text}");
        assert!(text.contains("portcullis_jwt_verifications_total{provider=\"keycloak\",outcome=\"expired\",cached=\"false\"} 1"), "{text}");
        assert!(text.contains("portcullis_jwks_refreshes_total{provider=\"keycloak\",result=\"success\"} 1"), "{text}");
        assert!(text.contains("portcullis_jwks_key_age_seconds{provider=\"keycloak\"} 90.0"), "{text}");
    }

    #[test]
    fn certificate_and_vault_events_are_counted() {
        use portcullis_pki::PkiObserver;

        let metrics = Metrics::new();
        metrics.vault_login("kubernetes", "failure");
        metrics.vault_login("kubernetes", "success");
        metrics.vault_token_renewal("success");
        metrics.rotation_failed(&portcullis_pki::PkiError::File { path: "cert.pem".to_owned(), reason: "not found".to_owned() });

        let text = metrics.render();
        assert!(text.contains("portcullis_vault_logins_total{method=\"kubernetes\",outcome=\"failure\"} 1"), "{text}");
        assert!(text.contains("portcullis_vault_logins_total{method=\"kubernetes\",outcome=\"success\"} 1"), "{text}");
        assert!(text.contains("portcullis_vault_token_renewals_total{outcome=\"success\"} 1"), "{text}");
        assert!(text.contains("portcullis_certificate_rotation_failures_total 1"), "{text}");
        assert!(text.contains("portcullis_certificate_rotations_total 0"), "{text}");
        assert!(text.contains("portcullis_certificate_expiry_timestamp_seconds 0"), "{text}");
    }

    #[test]
    fn audit_pipeline_measurements_are_exported() {
        use portcullis_audit::AuditObserver;

        let metrics = Metrics::new();
        metrics.delivered(Duration::from_millis(3));
        metrics.backlog(12, 4096, Some(Duration::from_millis(1500)));
        metrics.failure("full");
        metrics.failure("transport_timeout");
        metrics.checkpoint_written();
        metrics.transport_rebuilt("kafka", "fatal error: fenced");

        let text = metrics.render();
        assert!(text.contains("portcullis_audit_delivery_lag_seconds_count 1"), "{text}");
        assert!(text.contains("portcullis_audit_backlog_records 12"), "{text}");
        assert!(text.contains("portcullis_audit_backlog_bytes 4096"), "{text}");
        assert!(text.contains("portcullis_audit_oldest_unshipped_seconds 1.5"), "{text}");
        assert!(text.contains("portcullis_audit_failures_total{kind=\"full\"} 1"), "{text}");
        assert!(text.contains("portcullis_audit_failures_total{kind=\"transport_timeout\"} 1"), "{text}");
        assert!(text.contains("portcullis_audit_checkpoints_total 1"), "{text}");
        assert!(text.contains("portcullis_audit_transport_rebuilds_total{transport=\"kafka\"} 1"), "{text}");
    }

    #[test]
    fn reloads_replace_the_revision_label() {
        let metrics = Metrics::new();
        metrics.set_bundle_revision("r1");
        metrics.reloaded("r2");
        metrics.reload_failed("broken");

        let text = metrics.render();
        assert!(text.contains("portcullis_bundle_info{revision=\"r2\"} 1"), "{text}");
        assert!(!text.contains("revision=\"r1\""), "{text}");
        assert!(text.contains("portcullis_bundle_reloads_total{result=\"success\"} 1"), "{text}");
        assert!(text.contains("portcullis_bundle_reloads_total{result=\"failure\"} 1"), "{text}");
        assert!(text.contains("portcullis_bundle_last_reload_failed 1"), "{text}");
    }
}
