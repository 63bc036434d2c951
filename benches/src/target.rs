//! The servers under load: an ext_authz gRPC server (portcullis or the floor) and OPA's REST
//! Data API.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tonic::transport::{Channel, Endpoint};

/// gRPC status code `OK`, which the CheckResponse status carries for an allow.
const GRPC_OK: i32 = 0;

/// A call that did not return a decision.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot connect to {address}: {source}")]
    Connect {
        address: SocketAddr,
        source: tonic::transport::Error,
    },

    #[error("Check failed with gRPC status {code:?}: {message}")]
    Grpc { code: tonic::Code, message: String },

    #[error("HTTP request to OPA failed: {0}")]
    Http(String),

    #[error("OPA returned HTTP {status}: {body}")]
    HttpStatus { status: u16, body: String },

    #[error("OPA result has no boolean `result.allowed`: {0}")]
    OpaResult(String),
}

/// A server under load, with the requests it is sent.
pub enum Target {
    /// ext_authz v3 over gRPC, spread over several HTTP/2 connections.
    Grpc {
        channels: Vec<Channel>,
        requests: Arc<Vec<CheckRequest>>,
    },
    /// OPA's `POST /v1/data/...` over HTTP/1.1 with keep-alive; one connection per call in flight.
    Opa {
        client: Box<Client<HttpConnector, Full<Bytes>>>,
        uri: http::Uri,
        bodies: Arc<Vec<Bytes>>,
    },
}

impl Target {
    /// Opens `connections` HTTP/2 connections to the ext_authz server at `address`.
    pub async fn grpc(
        address: SocketAddr,
        connections: usize,
        requests: Vec<CheckRequest>,
    ) -> Result<Target, CallError> {
        let mut channels = Vec::with_capacity(connections);
        for _ in 0..connections.max(1) {
            let endpoint = Endpoint::from_shared(format!("http://{address}"))
                .expect("an IP:PORT address is a valid URI")
                .tcp_nodelay(true);
            let channel = endpoint
                .connect()
                .await
                .map_err(|source| CallError::Connect { address, source })?;
            channels.push(channel);
        }
        Ok(Target::Grpc {
            channels,
            requests: Arc::new(requests),
        })
    }

    /// Prepares calls to OPA's Data API for the rule at `decision_path` (such as
    /// `envoy/authz/allow`); each body is a `{"input": ...}` document.
    pub fn opa(address: SocketAddr, decision_path: &str, bodies: Vec<Vec<u8>>) -> Target {
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(usize::MAX)
            .build_http();
        let uri = format!("http://{address}/v1/data/{decision_path}")
            .parse()
            .expect("an IP:PORT address and a rule path form a valid URI");
        let bodies = bodies.into_iter().map(Bytes::from).collect();
        Target::Opa {
            client: Box::new(client),
            uri,
            bodies: Arc::new(bodies),
        }
    }

    /// Number of distinct requests in the mix.
    pub fn mix_len(&self) -> usize {
        match self {
            Target::Grpc { requests, .. } => requests.len(),
            Target::Opa { bodies, .. } => bodies.len(),
        }
    }

    /// Sends request number `sequence` of the run, which picks the request from the mix in
    /// turn and a connection by `worker`. Returns whether the request was allowed.
    pub async fn call(&self, worker: usize, sequence: usize) -> Result<bool, CallError> {
        match self {
            Target::Grpc { channels, requests } => {
                let channel = channels[worker % channels.len()].clone();
                let request = requests[sequence % requests.len()].clone();
                check(channel, request).await
            }
            Target::Opa {
                client,
                uri,
                bodies,
            } => {
                let body = bodies[sequence % bodies.len()].clone();
                post_opa(client, uri, body).await
            }
        }
    }
}

async fn check(channel: Channel, request: CheckRequest) -> Result<bool, CallError> {
    let mut client = AuthorizationClient::new(channel);
    let response = client
        .check(request)
        .await
        .map_err(|status| CallError::Grpc {
            code: status.code(),
            message: status.message().to_string(),
        })?;
    let code = response
        .into_inner()
        .status
        .map(|status| status.code)
        .unwrap_or(GRPC_OK);
    Ok(code == GRPC_OK)
}

async fn post_opa(
    client: &Client<HttpConnector, Full<Bytes>>,
    uri: &http::Uri,
    body: Bytes,
) -> Result<bool, CallError> {
    let request = http::Request::post(uri.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|error| CallError::Http(error.to_string()))?;
    let response = client
        .request(request)
        .await
        .map_err(|error| CallError::Http(error.to_string()))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|error| CallError::Http(error.to_string()))?
        .to_bytes();
    if !status.is_success() {
        return Err(CallError::HttpStatus {
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    opa_allowed(&body)
}

/// Reads `result.allowed` from an OPA Data API response for an object decision, or
/// `result` itself for a boolean one.
pub fn opa_allowed(body: &[u8]) -> Result<bool, CallError> {
    let text = || String::from_utf8_lossy(body).into_owned();
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| CallError::OpaResult(text()))?;
    let result = value
        .get("result")
        .ok_or_else(|| CallError::OpaResult(text()))?;
    let allowed = match result {
        serde_json::Value::Bool(allowed) => Some(*allowed),
        object => object.get("allowed").and_then(serde_json::Value::as_bool),
    };
    allowed.ok_or_else(|| CallError::OpaResult(text()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opa_object_decision_is_read() {
        assert!(!opa_allowed(br#"{"result": {"allowed": false, "http_status": 403}}"#).unwrap());
        assert!(opa_allowed(br#"{"result": {"allowed": true}}"#).unwrap());
    }

    #[test]
    fn opa_boolean_decision_is_read() {
        assert!(opa_allowed(br#"{"result": true}"#).unwrap());
    }

    #[test]
    fn opa_undefined_decision_is_error() {
        let error = opa_allowed(b"{}").unwrap_err();

        assert_eq!(
            error.to_string(),
            "OPA result has no boolean `result.allowed`: {}"
        );
    }
}
