//! The ext_authz v3 service of portcullis.
//!
//! A check goes through four steps: the `CheckRequest` becomes a policy input document
//! ([`input`]), the active policy evaluates it, the result becomes a [`decision::Decision`],
//! and the decision becomes a `CheckResponse`. [`service`] runs those steps for each gRPC call
//! and records one decision event per check.

pub mod decision;
pub mod grpc;
pub mod identity;
pub mod input;
pub mod protojson;
pub mod service;
