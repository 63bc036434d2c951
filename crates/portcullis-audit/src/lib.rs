//! Decision events: one structured record per authorization decision, the hash chain and
//! signed checkpoints that make an instance's records tamper-evident, the pipeline that keeps
//! them in a local spool and ships them through a [`Transport`], and the verifier.
//!
//! A check returns to Envoy only after its event is recorded, so a sink's `record` future
//! resolves when the event is durable for that sink: the audit pipeline once the spool is
//! fsynced or the transport acknowledged it (see [`AckMode`]), the file sink once the event is
//! written (and fsynced, if configured), stdout once it is written, and `none` at once.

pub mod chain;
pub mod checkpoint;
mod event;
mod observer;
mod pipeline;
mod sink;
pub mod spool;
mod transport;
pub mod verify;

pub use checkpoint::{CheckpointSigner, KeyError};
pub use event::{DecisionEvent, EventDecision, EventPolicy, format_rfc3339};
pub use observer::{AuditObserver, NoAuditObserver};
pub use pipeline::{AckMode, AuditPipeline, CheckpointPolicy, PipelineConfig, PipelineError};
pub use sink::{DecisionSink, FileSink, NullSink, SinkError, StdoutSink};
pub use spool::SpoolConfig;
pub use transport::{Record, Transport, TransportError};

/// Builds a decision event with fixed content, for the tests of this crate.
#[cfg(test)]
pub(crate) fn test_event(decision_id: &str) -> DecisionEvent {
    DecisionEvent {
        schema: DecisionEvent::SCHEMA,
        event_id: format!("e-{decision_id}"),
        decision_id: decision_id.to_owned(),
        time: "2026-01-01T00:00:00.000000Z".to_owned(),
        request: serde_json::json!({"method": "GET", "path": "/a"}),
        identity: None,
        decision: EventDecision { allowed: true, http_status: 200, reason: None },
        policy: EventPolicy {
            bundle_revision: "r1".to_owned(),
            bundle_digest: "sha256:00".to_owned(),
            decision_path: "envoy/authz/allow".to_owned(),
        },
        latency_us: 12,
        amends: None,
    }
}
