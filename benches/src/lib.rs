//! Load benchmarks of portcullis: a load generator for ext_authz gRPC and for OPA's REST API,
//! the processes under test, and the comparison table.
//!
//! The `portcullis-bench` binary runs every scenario and prints the table; `portcullis-floor`
//! is the always-allow ext_authz server that serves as the floor.

pub mod jwt;
pub mod load;
pub mod metrics;
pub mod process;
pub mod report;
pub mod requests;
pub mod target;
