//! A CONNECT client in kube-apiserver's dialect, for tests, examples and benchmarks.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::connect::MAX_HEAD;

/// A client connection through the CONNECT frontend: the TCP stream, with any tunnel bytes
/// that arrived together with the response head served first.
#[derive(Debug)]
pub struct ClientStream {
    stream: tokio::net::TcpStream,
    early: Bytes,
}

impl ClientStream {
    /// The TCP connection to the frontend.
    pub fn get_ref(&self) -> &tokio::net::TcpStream {
        &self.stream
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.early.is_empty() {
            let n = self.early.len().min(buf.remaining());
            buf.put_slice(&self.early.split_to(n));
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A CONNECT client: opens a TCP connection to `frontend`, asks for `target` (`host:port`)
/// the way kube-apiserver does, and returns the connection once the tunnel is up. A refusal is
/// an error carrying the server's status line.
pub async fn client(frontend: std::net::SocketAddr, target: &str) -> std::io::Result<ClientStream> {
    let mut stream = tokio::net::TcpStream::connect(frontend).await?;
    stream.set_nodelay(true)?;
    stream
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await?;
    let mut buf = BytesMut::with_capacity(256);
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD || stream.read_buf(&mut buf).await? == 0 {
            return Err(std::io::Error::other("the server closed the CONNECT"));
        }
    };
    if !buf.starts_with(b"HTTP/1.1 200 ") {
        let line = String::from_utf8_lossy(&buf[..end]);
        return Err(std::io::Error::other(format!(
            "CONNECT refused: {}",
            line.lines().next().unwrap_or_default()
        )));
    }
    let early = buf.split_off(end).freeze();
    Ok(ClientStream { stream, early })
}
