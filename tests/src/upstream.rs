//! An HTTP/1.1 upstream that records every request and responds 200 with the body "upstream".

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::LaunchError;

/// Body of every upstream response.
pub const UPSTREAM_BODY: &str = "upstream";

/// Pause after a failed `accept`, so that a persistent error (such as too many open files)
/// does not spin the loop.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(10);

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: Method,
    /// Path and query as received.
    pub path: String,
    pub headers: HeaderMap,
    /// The body, or the part read before the body failed.
    pub body: Bytes,
}

impl RecordedRequest {
    /// Returns the first value of a header as text, or `None` when it is missing or not text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

/// The server stops when this value is dropped.
pub struct Upstream {
    address: SocketAddr,
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
    accept_task: JoinHandle<()>,
}

impl Upstream {
    /// Binds 127.0.0.1 on a port chosen by the kernel and starts serving on the current Tokio
    /// runtime.
    pub async fn start() -> Result<Self, LaunchError> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(|source| LaunchError::io("binding the upstream on 127.0.0.1:0", source))?;
        let address = listener
            .local_addr()
            .map_err(|source| LaunchError::io("reading the upstream's address", source))?;
        let requests = Arc::new(Mutex::new(Vec::new()));
        let accept_task = tokio::spawn(accept_connections(listener, Arc::clone(&requests)));
        Ok(Upstream {
            address,
            requests,
            accept_task,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Returns every request received so far, in order of arrival.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Returns the received requests whose path (with query) starts with `prefix`.
    pub fn requests_with_prefix(&self, prefix: &str) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|request| request.path.starts_with(prefix))
            .collect()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection task.
        self.accept_task.abort();
    }
}

async fn accept_connections(listener: TcpListener, requests: Arc<Mutex<Vec<RecordedRequest>>>) {
    let mut connections = JoinSet::new();
    loop {
        // Reap finished connection tasks so the set does not grow without bound.
        while connections.try_join_next().is_some() {}

        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(_error) => {
                tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                continue;
            }
        };
        let requests = Arc::clone(&requests);
        connections.spawn(async move {
            let service =
                service_fn(move |request| record_and_answer(request, Arc::clone(&requests)));
            // A client that closes mid-request ends only its own connection.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn record_and_answer(
    request: Request<Incoming>,
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_error) => Bytes::new(),
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.to_string(), |path| path.as_str().to_string());

    requests
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(RecordedRequest {
            method: parts.method,
            path,
            headers: parts.headers,
            body,
        });
    Ok(Response::new(Full::new(Bytes::from_static(
        UPSTREAM_BODY.as_bytes(),
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HttpRequest, send};

    #[tokio::test]
    async fn upstream_records_request_and_returns_200() {
        let upstream = Upstream::start()
            .await
            .expect("starting the upstream failed");
        let request =
            HttpRequest::post("/orders?id=7", "{\"quantity\":2}").with_header("x-trace", "abc");

        let response = send(upstream.address(), &request)
            .await
            .expect("request failed");

        assert_eq!(response.status, 200);
        assert_eq!(response.body_text(), UPSTREAM_BODY);
        let recorded = upstream.requests();
        assert_eq!(recorded.len(), 1);
        assert_eq!(recorded[0].method, Method::POST);
        assert_eq!(recorded[0].path, "/orders?id=7");
        assert_eq!(recorded[0].header("x-trace"), Some("abc"));
        assert_eq!(recorded[0].body, Bytes::from_static(b"{\"quantity\":2}"));
    }

    #[tokio::test]
    async fn requests_with_prefix_filters_by_path() {
        let upstream = Upstream::start()
            .await
            .expect("starting the upstream failed");
        for path in ["/a/1", "/b/1", "/a/2"] {
            send(upstream.address(), &HttpRequest::get(path))
                .await
                .expect("request failed");
        }

        let paths: Vec<String> = upstream
            .requests_with_prefix("/a/")
            .into_iter()
            .map(|request| request.path)
            .collect();

        assert_eq!(paths, vec!["/a/1".to_string(), "/a/2".to_string()]);
    }
}
