//! Listeners for the ext_authz gRPC service on TCP (cleartext or mTLS) and on a Unix socket.
//!
//! Each accepted connection must open with the HTTP/2 client preface before it reaches the
//! gRPC server. On an mTLS listener the preface is checked inside TLS, after the handshake. Anything else (an HTTP/1.1 request, a TLS handshake, a port scan) is logged
//! with what it sent and closed, so a misconfigured Envoy cluster shows up in the log
//! instead of as an opaque protocol error.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo, UdsConnectInfo};
use tracing::{debug, warn};

/// The first bytes of every HTTP/2 connection (RFC 9113, section 3.4).
const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How long a new connection may take to send the preface. Envoy sends it at once, so a
/// connection that stays silent this long only ties up a file descriptor.
const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections that passed the preface check and wait for the gRPC server to take them.
const ACCEPTED_BACKLOG: usize = 128;
/// Sent to an HTTP/1.x client before closing, so `curl` users learn what is wrong.
const HTTP1_REJECTION: &[u8] = b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: h2c\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: 57\r\n\r\nthis port serves ext_authz over gRPC (HTTP/2) only, h2c\r\n";

/// The stream of accepted, checked connections that the gRPC server reads from.
pub type Incoming<S> = ReceiverStream<io::Result<Preface<S>>>;

/// Binds a TCP listener and returns the stream of connections that sent the HTTP/2 preface.
pub async fn bind_tcp(address: std::net::SocketAddr) -> io::Result<(std::net::SocketAddr, Incoming<tokio::net::TcpStream>)> {
    let listener = TcpListener::bind(address).await?;
    let local = listener.local_addr()?;
    let (sender, receiver) = mpsc::channel(ACCEPTED_BACKLOG);
    spawn_tcp_accept_loop(listener, local, sender, |stream, peer, sender| {
        tokio::spawn(check_preface(stream, peer, sender));
    });
    Ok((local, ReceiverStream::new(receiver)))
}

/// Binds a TCP listener that requires mTLS and returns the stream of connections that
/// completed the handshake and then sent the HTTP/2 preface. `acceptor` decides which
/// certificate is presented and which client certificates are accepted, per handshake.
pub async fn bind_tcp_tls(
    address: std::net::SocketAddr,
    acceptor: TlsAcceptor,
) -> io::Result<(std::net::SocketAddr, Incoming<TlsStream<tokio::net::TcpStream>>)> {
    let listener = TcpListener::bind(address).await?;
    let local = listener.local_addr()?;
    let (sender, receiver) = mpsc::channel(ACCEPTED_BACKLOG);
    spawn_tcp_accept_loop(listener, local, sender, move |stream, peer, sender| {
        tokio::spawn(accept_tls(stream, peer, acceptor.clone(), sender));
    });
    Ok((local, ReceiverStream::new(receiver)))
}

/// Accepts connections and hands each to `handle` with the peer's address, until the gRPC
/// server stops reading from `sender`.
fn spawn_tcp_accept_loop<T: Send + 'static>(
    listener: TcpListener,
    local: std::net::SocketAddr,
    sender: mpsc::Sender<T>,
    handle: impl Fn(tokio::net::TcpStream, String, mpsc::Sender<T>) + Send + 'static,
) {
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    handle(stream, peer.to_string(), sender.clone());
                }
                Err(error) => {
                    warn!(listener = %local, %error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            if sender.is_closed() {
                break;
            }
        }
    });
}

/// Completes the TLS handshake, then checks the HTTP/2 preface inside TLS.
async fn accept_tls(
    stream: tokio::net::TcpStream,
    peer: String,
    acceptor: TlsAcceptor,
    accepted: mpsc::Sender<io::Result<Preface<TlsStream<tokio::net::TcpStream>>>>,
) {
    // A TLS client starts with a handshake record (0x16). Anything else is a client that was
    // not configured for TLS, which deserves a clearer log line than a TLS error.
    let mut first = [0u8; 1];
    match tokio::time::timeout(PREFACE_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(0)) => return debug!(peer = %peer, "connection closed before sending anything"),
        Ok(Ok(_)) if first[0] != 0x16 => {
            return warn!(peer = %peer, "rejected a cleartext connection: this listener requires mTLS; give the Envoy cluster a transport_socket with an UpstreamTlsContext and a client certificate");
        }
        Ok(Ok(_)) => {}
        Ok(Err(error)) => return debug!(peer = %peer, %error, "connection failed before the TLS handshake"),
        Err(_) => return warn!(peer = %peer, timeout = ?PREFACE_TIMEOUT, "rejected a connection that sent nothing in time"),
    }

    match tokio::time::timeout(PREFACE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            let (_, connection) = tls.get_ref();
            debug!(peer = %peer, tls.version = ?connection.protocol_version(), tls.alpn = ?connection.alpn_protocol().map(String::from_utf8_lossy), "TLS handshake completed");
            check_preface(tls, peer, accepted).await;
        }
        Ok(Err(error)) => warn!(peer = %peer, %error, "TLS handshake failed; clients must present a certificate that chains to the trust bundle"),
        Err(_) => warn!(peer = %peer, timeout = ?PREFACE_TIMEOUT, "TLS handshake timed out"),
    }
}

/// Binds a Unix socket, replacing a stale socket file left by an earlier run, and returns
/// the stream of connections that sent the HTTP/2 preface.
pub fn bind_unix(path: &Path) -> io::Result<Incoming<tokio::net::UnixStream>> {
    remove_stale_socket(path)?;
    if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let listener = UnixListener::bind(path)?;
    // Envoy usually runs as another user in the same pod; access is controlled by the
    // permissions of the socket's folder.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    }
    let (sender, receiver) = mpsc::channel(ACCEPTED_BACKLOG);
    let socket_name = path.display().to_string();
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(check_preface(stream, socket_name.clone(), sender.clone()));
                }
                Err(error) => {
                    warn!(listener = %socket_name, %error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            if sender.is_closed() {
                break;
            }
        }
    });
    Ok(ReceiverStream::new(receiver))
}

/// Removes `path` if it is a socket; refuses to remove anything else.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket; remove it or choose another listen.unix_socket", path.display()),
        )),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    }
}

/// Removes the socket file at shutdown.
pub fn remove_socket(path: &PathBuf) {
    if let Err(error) = remove_stale_socket(path) {
        debug!(path = %path.display(), %error, "socket file not removed");
    }
}

async fn check_preface<S>(mut stream: S, peer: String, accepted: mpsc::Sender<io::Result<Preface<S>>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut received = [0u8; 24];
    let mut length = 0;
    let outcome = tokio::time::timeout(PREFACE_TIMEOUT, async {
        while length < received.len() {
            let read = stream.read(&mut received[length..]).await?;
            if read == 0 {
                break;
            }
            length += read;
            if received[..length] != HTTP2_PREFACE[..length] {
                break;
            }
        }
        io::Result::Ok(())
    })
    .await;

    match outcome {
        Ok(Ok(())) if length == received.len() && &received == HTTP2_PREFACE => {
            let _ = accepted.send(Ok(Preface { stream, replayed: 0 })).await;
        }
        Ok(Ok(())) if length == 0 => debug!(peer = %peer, "connection closed before sending anything"),
        Ok(Ok(())) => {
            let sent = describe_bytes(&received[..length]);
            if looks_like_http1(&received[..length]) {
                warn!(peer = %peer, received = %sent, "rejected an HTTP/1.x request: this listener serves ext_authz over gRPC (HTTP/2 cleartext) only; configure the Envoy cluster with http2_protocol_options");
                let _ = stream.write_all(HTTP1_REJECTION).await;
                let _ = stream.shutdown().await;
                discard_unread(&mut stream).await;
                return;
            } else if received[0] == 0x16 {
                warn!(peer = %peer, "rejected a TLS handshake: this listener serves cleartext gRPC; disable TLS in the Envoy cluster for this address");
            } else {
                warn!(peer = %peer, received = %sent, "rejected a connection that is not HTTP/2 gRPC");
            }
            let _ = stream.shutdown().await;
        }
        Ok(Err(error)) => debug!(peer = %peer, %error, "connection failed before the HTTP/2 preface"),
        Err(_) => warn!(peer = %peer, timeout = ?PREFACE_TIMEOUT, "rejected a connection that sent no HTTP/2 preface in time"),
    }
}

/// Reads and drops what the client sent after its first bytes, briefly, so that closing the
/// socket does not reset the connection before the client has read the rejection.
async fn discard_unread<S: AsyncRead + Unpin>(stream: &mut S) {
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut total = 0;
        while total < 64 * 1024 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(read) => total += read,
            }
        }
    })
    .await;
}

/// Tells whether a client's first bytes start an HTTP/1.x request line.
fn looks_like_http1(bytes: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] = [b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"PATCH ", b"OPTIONS ", b"CONNECT ", b"TRACE "];
    METHODS.iter().any(|method| bytes.starts_with(method))
}

/// Shows the first bytes a client sent, printable ASCII as is and the rest escaped.
fn describe_bytes(bytes: &[u8]) -> String {
    bytes.iter().flat_map(|byte| std::ascii::escape_default(*byte)).map(char::from).collect()
}

/// A connection whose HTTP/2 preface was already read; it replays the preface to the
/// gRPC server before the rest of the stream.
pub struct Preface<S> {
    stream: S,
    replayed: usize,
}

impl<S: AsyncRead + Unpin> AsyncRead for Preface<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.replayed < HTTP2_PREFACE.len() {
            let remaining = &HTTP2_PREFACE[self.replayed..];
            let count = remaining.len().min(buf.remaining());
            buf.put_slice(&remaining[..count]);
            self.replayed += count;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Preface<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl Connected for Preface<tokio::net::TcpStream> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl Connected for Preface<TlsStream<tokio::net::TcpStream>> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.get_ref().0.connect_info()
    }
}

impl Connected for Preface<tokio::net::UnixStream> {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn http1_request_is_rejected_with_426() {
        let (address, _incoming) = bind_tcp("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let mut client = tokio::net::TcpStream::connect(address).await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();

        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8(answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 426 Upgrade Required\r\n"), "{answer}");
        assert!(answer.ends_with("this port serves ext_authz over gRPC (HTTP/2) only, h2c\r\n"), "{answer}");
    }

    #[tokio::test]
    async fn http2_preface_is_replayed_to_the_server() {
        use tokio_stream::StreamExt;

        let (address, mut incoming) = bind_tcp("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let mut client = tokio::net::TcpStream::connect(address).await.unwrap();
        client.write_all(HTTP2_PREFACE).await.unwrap();
        client.write_all(b"rest").await.unwrap();

        let mut accepted = incoming.next().await.unwrap().unwrap();
        let mut received = [0u8; 28];
        accepted.read_exact(&mut received).await.unwrap();
        assert_eq!(&received[..24], HTTP2_PREFACE);
        assert_eq!(&received[24..], b"rest");
    }

    #[test]
    fn unexpected_bytes_are_escaped() {
        assert_eq!(describe_bytes(b"\x16\x03\x01ab"), "\\x16\\x03\\x01ab");
    }

    #[test]
    fn regular_file_is_not_removed_as_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authz.sock");
        std::fs::write(&path, "keep").unwrap();
        assert!(remove_stale_socket(&path).is_err());
        assert!(path.exists());
    }
}
