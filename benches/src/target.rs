//! The servers under load: an ext_authz gRPC server (portcullis or the floor), OPA's REST
//! Data API, and Envoy's HTTP listener.

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

use crate::requests::HttpMixRequest;

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

    #[error("HTTP request to {address} failed: {message}")]
    Proxy {
        address: SocketAddr,
        message: String,
    },

    #[error("{method} {path} returned HTTP {status}, expected {expected}: {body}")]
    UnexpectedStatus {
        method: http::Method,
        path: String,
        status: u16,
        expected: u16,
        body: String,
    },
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
    /// HTTP requests to a proxy (Envoy) over HTTP/1.1 with keep-alive; one connection per call
    /// in flight, with at most `connections` calls in flight. A call succeeds when the response
    /// has the status expected for its request, so a deny with the expected 403 or 400 counts
    /// as a success.
    Http {
        client: Box<Client<HttpConnector, Full<Bytes>>>,
        address: SocketAddr,
        requests: Arc<Vec<HttpCall>>,
        /// One permit per connection. Without a limit, an open loop that falls behind opens a
        /// new connection for each late call, and Envoy one more to the upstream, which costs
        /// more CPU and puts it further behind.
        connections: Arc<tokio::sync::Semaphore>,
    },
}

/// A request sent by [`Target::Http`] and the status expected in its response.
pub struct HttpCall {
    pub request: HttpMixRequest,
    uri: http::Uri,
    pub expected_status: http::StatusCode,
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

    /// Prepares HTTP requests to the listener at `address` over at most `connections`
    /// connections; each request comes with the status expected in its response. A call that
    /// finds every connection busy waits for one, and that wait counts in its latency.
    pub fn http(
        address: SocketAddr,
        connections: usize,
        requests: Vec<(HttpMixRequest, http::StatusCode)>,
    ) -> Target {
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(usize::MAX)
            .build_http();
        let requests = requests
            .into_iter()
            .map(|(request, expected_status)| HttpCall {
                uri: format!("http://{address}{}", request.path)
                    .parse()
                    .expect("an IP:PORT address and a path starting with / form a valid URI"),
                request,
                expected_status,
            })
            .collect();
        Target::Http {
            client: Box::new(client),
            address,
            requests: Arc::new(requests),
            connections: Arc::new(tokio::sync::Semaphore::new(connections.max(1))),
        }
    }

    /// Number of distinct requests in the mix.
    pub fn mix_len(&self) -> usize {
        match self {
            Target::Grpc { requests, .. } => requests.len(),
            Target::Opa { bodies, .. } => bodies.len(),
            Target::Http { requests, .. } => requests.len(),
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
            Target::Http {
                client,
                address,
                requests,
                connections,
            } => {
                let _connection = connections
                    .acquire()
                    .await
                    .expect("the connection semaphore is never closed");
                send_http(client, *address, &requests[sequence % requests.len()]).await
            }
        }
    }
}

/// Sends one request and returns whether it was allowed (a 2xx status), or an error when the
/// status is not the one expected for it.
async fn send_http(
    client: &Client<HttpConnector, Full<Bytes>>,
    address: SocketAddr,
    call: &HttpCall,
) -> Result<bool, CallError> {
    let failed = |error: &dyn std::fmt::Display| CallError::Proxy {
        address,
        message: error.to_string(),
    };
    let mut request = http::Request::builder()
        .method(call.request.method.clone())
        .uri(call.uri.clone())
        .body(Full::new(call.request.body.clone()))
        .map_err(|error| failed(&error))?;
    *request.headers_mut() = call.request.headers.clone();

    let response = client
        .request(request)
        .await
        .map_err(|error| failed(&error))?;
    let status = response.status();
    // Reading the body to its end lets the connection go back to the pool.
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|error| failed(&error))?
        .to_bytes();
    if status != call.expected_status {
        return Err(CallError::UnexpectedStatus {
            method: call.request.method.clone(),
            path: call.request.path.clone(),
            status: status.as_u16(),
            expected: call.expected_status.as_u16(),
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    Ok(status.is_success())
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

    fn get(path: &str) -> HttpMixRequest {
        HttpMixRequest {
            method: http::Method::GET,
            path: path.to_string(),
            headers: http::HeaderMap::new(),
            body: Bytes::new(),
        }
    }

    #[tokio::test]
    async fn http_expected_status_is_success() {
        let upstream = crate::upstream::Upstream::start().unwrap();
        let target = Target::http(
            upstream.address(),
            4,
            vec![(get("/public/catalog"), http::StatusCode::OK)],
        );

        let allowed = target.call(0, 0).await.unwrap();

        assert!(allowed);
    }

    #[tokio::test]
    async fn http_unexpected_status_is_error() {
        let upstream = crate::upstream::Upstream::start().unwrap();
        let target = Target::http(
            upstream.address(),
            4,
            vec![
                (get("/public/catalog"), http::StatusCode::OK),
                (get("/admin/settings"), http::StatusCode::FORBIDDEN),
            ],
        );

        let error = target.call(0, 1).await.unwrap_err();

        assert_eq!(
            error.to_string(),
            "GET /admin/settings returned HTTP 200, expected 403: upstream ok\n"
        );
    }

    #[tokio::test]
    async fn http_refused_connection_is_error() {
        let address = crate::process::free_address().unwrap();
        let target = Target::http(address, 1, vec![(get("/"), http::StatusCode::OK)]);

        let error = target.call(0, 0).await.unwrap_err();

        assert!(
            matches!(&error, CallError::Proxy { address: failed, .. } if *failed == address),
            "{error}"
        );
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
