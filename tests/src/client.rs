//! A minimal HTTP/1.1 client: one connection per request, bounded by a timeout.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Maximum time for connecting, sending a request and reading the whole response.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP request to send with [`send`].
#[derive(Debug, Clone)]
pub struct HttpRequest {
    pub method: Method,
    /// Path and query, sent as the request target unchanged.
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl HttpRequest {
    pub fn new(method: Method, path: impl Into<String>) -> Self {
        HttpRequest {
            method,
            path: path.into(),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    pub fn get(path: impl Into<String>) -> Self {
        Self::new(Method::GET, path)
    }

    pub fn post(path: impl Into<String>, body: impl Into<Bytes>) -> Self {
        Self::new(Method::POST, path).with_body(body)
    }

    /// Adds a header; repeated names are sent as repeated header lines.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn with_body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }
}

/// A complete HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl HttpResponse {
    /// Returns the body as text, with invalid UTF-8 replaced.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Returns the first value of a header as text, or `None` when it is missing or not text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {address} failed: {source}")]
    Connect {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid request {method} {path}: {source}")]
    InvalidRequest {
        method: Method,
        path: String,
        #[source]
        source: http::Error,
    },

    #[error("HTTP exchange {method} {path} with {address} failed: {source}")]
    Exchange {
        address: SocketAddr,
        method: Method,
        path: String,
        #[source]
        source: hyper::Error,
    },

    #[error("request {method} {path} to {address} timed out after {timeout:?}")]
    TimedOut {
        address: SocketAddr,
        method: Method,
        path: String,
        timeout: Duration,
    },
}

/// Sends `request` to `address` over a new HTTP/1.1 connection and reads the whole response.
///
/// The `Host` header is `address` unless the request sets its own. A non-empty body gets a
/// `Content-Length` header.
pub async fn send(address: SocketAddr, request: &HttpRequest) -> Result<HttpResponse, ClientError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, exchange(address, request)).await {
        Ok(result) => result,
        Err(_elapsed) => Err(ClientError::TimedOut {
            address,
            method: request.method.clone(),
            path: request.path.clone(),
            timeout: REQUEST_TIMEOUT,
        }),
    }
}

async fn exchange(address: SocketAddr, request: &HttpRequest) -> Result<HttpResponse, ClientError> {
    let exchange_error = |source| ClientError::Exchange {
        address,
        method: request.method.clone(),
        path: request.path.clone(),
        source,
    };
    let http_request = build_request(address, request)?;

    let stream = TcpStream::connect(address)
        .await
        .map_err(|source| ClientError::Connect { address, source })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(exchange_error)?;
    // The connection task ends by itself once `sender` is dropped at the end of this function.
    tokio::spawn(connection);

    let response = sender
        .send_request(http_request)
        .await
        .map_err(exchange_error)?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(exchange_error)?.to_bytes();
    Ok(HttpResponse {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

fn build_request(
    address: SocketAddr,
    request: &HttpRequest,
) -> Result<Request<Full<Bytes>>, ClientError> {
    let mut builder = Request::builder()
        .method(request.method.clone())
        .uri(request.path.as_str());
    let sets_host = request
        .headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case(HOST.as_str()));
    if !sets_host {
        builder = builder.header(HOST, address.to_string());
    }
    if !request.body.is_empty() {
        builder = builder.header(CONTENT_LENGTH, request.body.len());
    }
    for (name, value) in &request.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }

    builder
        .body(Full::new(request.body.clone()))
        .map_err(|source| ClientError::InvalidRequest {
            method: request.method.clone(),
            path: request.path.clone(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_request_adds_host_and_content_length() {
        let address: SocketAddr = "127.0.0.1:8080".parse().expect("valid address");
        let request = HttpRequest::post("/orders?x=1", "{}").with_header("x-role", "admin");

        let built = build_request(address, &request).expect("build_request failed");

        assert_eq!(built.method(), Method::POST);
        assert_eq!(built.uri(), "/orders?x=1");
        assert_eq!(built.headers()["host"], "127.0.0.1:8080");
        assert_eq!(built.headers()["content-length"], "2");
        assert_eq!(built.headers()["x-role"], "admin");
    }

    #[test]
    fn build_request_keeps_caller_host() {
        let address: SocketAddr = "127.0.0.1:8080".parse().expect("valid address");
        let request = HttpRequest::get("/").with_header("Host", "example.test");

        let built = build_request(address, &request).expect("build_request failed");

        let hosts: Vec<_> = built.headers().get_all("host").iter().collect();
        assert_eq!(hosts, vec!["example.test"]);
        assert!(built.headers().get("content-length").is_none());
    }

    #[test]
    fn build_request_rejects_invalid_header_name() {
        let address: SocketAddr = "127.0.0.1:8080".parse().expect("valid address");
        let request = HttpRequest::get("/").with_header("bad header", "x");

        let error = build_request(address, &request)
            .expect_err("a space in a header name must be rejected");

        assert!(
            matches!(error, ClientError::InvalidRequest { .. }),
            "{error}"
        );
    }
}
