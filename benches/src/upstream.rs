//! The upstream behind Envoy in the through-Envoy scenarios: an HTTP/1.1 server that responds
//! to every request with 200 and a short body. It keeps nothing per request, so its memory
//! does not grow with the length of a run.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;

/// Body of every response.
pub const UPSTREAM_BODY: &[u8] = b"upstream ok\n";

const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(10);

/// A running upstream on 127.0.0.1; it stops when dropped.
///
/// It serves from its own thread with a single-threaded tokio runtime, so it takes at most
/// one CPU and does not share the load generator's runtime.
pub struct Upstream {
    address: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    /// Binds 127.0.0.1 on a port the system chooses and starts serving.
    pub fn start() -> std::io::Result<Upstream> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (shutdown, stop) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("upstream".to_string())
            .spawn(move || runtime.block_on(serve(listener, stop)))?;
        Ok(Upstream {
            address,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            // The send fails only when the server thread has ended, so nothing is left to stop.
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Accepts connections until `stop` fires. Connections still open then are dropped with the
/// runtime.
async fn serve(listener: std::net::TcpListener, mut stop: oneshot::Receiver<()>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("portcullis-bench: the upstream cannot listen: {error}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(serve_connection(stream));
                }
                Err(error) => {
                    eprintln!("portcullis-bench: the upstream failed to accept a connection: {error}");
                    // Out of file descriptors, for example: wait instead of spinning on it.
                    tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                }
            },
        }
    }
}

async fn serve_connection(stream: tokio::net::TcpStream) {
    let service = service_fn(respond);
    // A connection that the client closes or resets ends here; the load generator counts the
    // failed request on its side.
    let _ = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// Reads the request body to its end, so that the connection can carry the next request, and
/// responds with 200.
async fn respond(
    request: http::Request<Incoming>,
) -> Result<http::Response<Full<Bytes>>, Infallible> {
    let _ = request.into_body().collect().await;
    Ok(http::Response::new(Full::new(Bytes::from_static(
        UPSTREAM_BODY,
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;

    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    #[tokio::test]
    async fn upstream_responds_200_to_every_request() {
        let upstream = Upstream::start().unwrap();
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();

        for (method, body) in [("GET", ""), ("POST", "{\"quantity\": 3}")] {
            let request = http::Request::builder()
                .method(method)
                .uri(format!("http://{}/api/orders", upstream.address()))
                .body(Full::new(Bytes::from(body)))
                .unwrap();

            let response = client.request(request).await.unwrap();

            assert_eq!(response.status(), http::StatusCode::OK, "{method}");
            let received = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(received, Bytes::from_static(UPSTREAM_BODY), "{method}");
        }
    }
}
