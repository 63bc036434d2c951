//! Load benchmarks of portcullis: a load generator for ext_authz gRPC, for OPA's REST API and
//! for HTTP through Envoy, the processes under test, and the comparison tables.
//!
//! The `portcullis-bench` binary runs every scenario and prints the table; `portcullis-floor`
//! is the always-allow ext_authz server that serves as the floor.

pub mod envoy_stats;
pub mod jwt;
pub mod load;
pub mod metrics;
pub mod process;
pub mod report;
pub mod requests;
pub mod target;
pub mod upstream;
