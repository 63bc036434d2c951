//! Decision events: one structured record per authorization decision, and the sinks that
//! record them.
//!
//! A check returns to Envoy only after its event is recorded, so a sink's `record` future
//! resolves when the event is durable for that sink. The file sink resolves once the event is
//! written (and fsynced, if configured), stdout once it is written, and `none` at once.

mod event;
mod sink;

pub use event::{DecisionEvent, EventDecision, EventPolicy, format_rfc3339};
pub use sink::{DecisionSink, FileSink, NullSink, SinkError, StdoutSink};
