//! A gRPC client in kube-apiserver's dialect (its Konnectivity client over grpc-go), for the
//! tests and the benchmarks: the socket path as `:authority` (percent-encoded or raw), one
//! `Proxy` call per dial, DIAL_CLS when it gives up on a dial, CLOSE_REQ and a 10 s wait for
//! CLOSE_RSP, and the client's checks: a DIAL_RSP must echo its `random`, only one may come,
//! and success has a non-zero connectID.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::grpc::authority::Rewriter;
use crate::grpc::konnectivity::{self, Packet, PacketType, packet::Payload};

/// How the client names the socket in `:authority`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthorityStyle {
    /// Current grpc-go: the path, percent-encoded (`%2Fetc%2F...`).
    PercentEncoded,
    /// Older grpc-go: the raw path (`/etc/...`).
    Raw,
    /// A valid authority (`localhost`), as a client given a `unix://` target might send.
    Localhost,
}

/// grpc-go's `encodeAuthority`: everything but unreserved, sub-delims and `:[]@` escaped.
pub fn percent_encode_path(path: &str) -> String {
    let mut out = String::new();
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~!$&'()*+,;=:[]@".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The client side of the socket: h2's header blocks re-encoded with the chosen authority.
struct ClientShim<S> {
    inner: S,
    rewriter: Rewriter,
    input: BytesMut,
    out: BytesMut,
}

impl<S: AsyncWrite + Unpin> ClientShim<S> {
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ClientShim<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ClientShim<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.drain(cx))?;
        this.input.extend_from_slice(buf);
        this.rewriter
            .process_all(&mut this.input, &mut this.out)
            .map_err(io::Error::from)?;
        // Whatever was taken is ours to write; a failure to write now shows at the next call.
        let _ = this.drain(cx)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One gRPC channel (an HTTP/2 connection on the socket).
#[derive(Clone)]
pub struct GrpcClient {
    h2: h2::client::SendRequest<Bytes>,
}

/// A dial's failure as the client sees it.
#[derive(Debug)]
pub enum DialFailure {
    /// DIAL_RSP with an error text (the server's reason).
    Refused(String),
    /// The call ended or broke (the text says how).
    Broken(String),
}

impl std::fmt::Display for DialFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DialFailure::Refused(e) => write!(f, "dial refused: {e}"),
            DialFailure::Broken(e) => write!(f, "call broken: {e}"),
        }
    }
}

impl GrpcClient {
    /// Connects to the socket at `path`, naming it in `:authority` the `style` way.
    pub async fn connect(path: &Path, style: AuthorityStyle) -> io::Result<GrpcClient> {
        let s = tokio::net::UnixStream::connect(path).await?;
        let p = path.to_string_lossy();
        let authority = match style {
            AuthorityStyle::PercentEncoded => percent_encode_path(&p),
            AuthorityStyle::Raw => p.into_owned(),
            AuthorityStyle::Localhost => "localhost".into(),
        };
        let shim = ClientShim {
            inner: s,
            rewriter: Rewriter::client(authority.as_bytes()),
            input: BytesMut::new(),
            out: BytesMut::new(),
        };
        let (h2, conn) = h2::client::Builder::new()
            // grpc-go's defaults: 64 KiB windows.
            .initial_window_size(64 * 1024)
            // grpc-go keeps no count of small DATA frames it has not read yet; h2's default
            // (half the 64 KiB window) ends a channel whose many calls each have an unread
            // DIAL_RSP.
            .data_frame_budget(16 << 20)
            .handshake::<_, Bytes>(shim)
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(GrpcClient { h2 })
    }

    /// Starts a `Proxy` call and sends DIAL_REQ for `address`; the returned call waits for
    /// DIAL_RSP in [`Call::dial_response`].
    pub async fn start_dial(&self, address: &str, random: i64) -> Result<Call, DialFailure> {
        let broken = |e: h2::Error| DialFailure::Broken(e.to_string());
        let mut h2 = self.h2.clone().ready().await.map_err(broken)?;
        let req = http::Request::builder()
            .method("POST")
            .uri("http://localhost/ProxyService/Proxy")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .expect("static request");
        let (response, send) = h2.send_request(req, false).map_err(broken)?;
        let mut call = Call {
            send,
            response: Some(response),
            recv: None,
            buf: BytesMut::new(),
            random,
            connect_id: 0,
        };
        call.send_packet(&Packet {
            r#type: PacketType::DialReq as i32,
            payload: Some(Payload::DialRequest(konnectivity::DialRequest {
                protocol: "tcp".into(),
                address: address.into(),
                random,
            })),
        })
        .await
        .map_err(|e| DialFailure::Broken(e.to_string()))?;
        Ok(call)
    }

    /// Dials `address` as kube-apiserver does: DIAL_REQ, then DIAL_RSP within 30 s, else
    /// DIAL_CLS.
    pub async fn dial(&self, address: &str) -> Result<Call, DialFailure> {
        let random = i64::from(rand::random::<u32>()) + 1;
        let mut call = self.start_dial(address, random).await?;
        match tokio::time::timeout(Duration::from_secs(30), call.dial_response()).await {
            Ok(Ok(())) => Ok(call),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                let _ = call.cancel_dial().await;
                Err(DialFailure::Broken("no DIAL_RSP in 30 s".into()))
            }
        }
    }
}

/// One `Proxy` call.
pub struct Call {
    send: h2::SendStream<Bytes>,
    response: Option<h2::client::ResponseFuture>,
    recv: Option<h2::RecvStream>,
    buf: BytesMut,
    random: i64,
    connect_id: i64,
}

impl Call {
    /// The connectID the server gave.
    pub fn connect_id(&self) -> i64 {
        self.connect_id
    }

    async fn send_packet(&mut self, p: &Packet) -> io::Result<()> {
        let mut b = BytesMut::with_capacity(5 + p.encoded_len());
        b.put_u8(0);
        b.put_u32(u32::try_from(p.encoded_len()).expect("a packet under 4 GiB"));
        p.encode(&mut b).expect("capacity reserved");
        self.send_raw(b.freeze()).await
    }

    /// Sends `b` as it is on the call (a hostile client's bytes, say), as the window allows.
    pub async fn send_raw(&mut self, mut b: Bytes) -> io::Result<()> {
        while !b.is_empty() {
            self.send.reserve_capacity(b.len());
            let n = match std::future::poll_fn(|cx| self.send.poll_capacity(cx)).await {
                Some(Ok(n)) => n.min(b.len()),
                Some(Err(e)) => return Err(io::Error::other(e)),
                None => return Err(io::Error::other("call closed")),
            };
            if n > 0 {
                self.send
                    .send_data(b.split_to(n), false)
                    .map_err(io::Error::other)?;
            }
        }
        Ok(())
    }

    /// The next packet from the server; `None` when the call ended. Received bytes are
    /// released (window returned) as they are taken, as grpc-go does once a message is read.
    pub async fn next_packet(&mut self) -> io::Result<Option<Packet>> {
        if self.recv.is_none() {
            let Some(r) = self.response.take() else {
                return Ok(None);
            };
            let resp = r.await.map_err(io::Error::other)?;
            if let Some(status) = resp.headers().get("grpc-status") {
                return Err(io::Error::other(format!(
                    "call ended: grpc-status {status:?} {:?}",
                    resp.headers().get("grpc-message")
                )));
            }
            self.recv = Some(resp.into_body());
        }
        let recv = self.recv.as_mut().expect("set above");
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if len > 4 * 1024 * 1024 {
                    return Err(io::Error::other("message over grpc-go's 4 MiB limit"));
                }
                if self.buf.len() >= 5 + len {
                    self.buf.advance(5);
                    let msg = self.buf.split_to(len).freeze();
                    // As the server's reader: an idle call keeps nothing of a large last
                    // message, and a frame of small messages is not copied once each.
                    if self.buf.is_empty() {
                        self.buf = BytesMut::new();
                    } else if len > crate::grpc::authority::MAX_FRAME {
                        self.buf = BytesMut::from(&self.buf[..]);
                    }
                    return Packet::decode(msg).map(Some).map_err(io::Error::other);
                }
            }
            match recv.data().await {
                Some(Ok(chunk)) => {
                    let _ = recv.flow_control().release_capacity(chunk.len());
                    self.buf.extend_from_slice(&chunk);
                }
                Some(Err(e)) => return Err(io::Error::other(e)),
                None => return Ok(None),
            }
        }
    }

    /// Waits for DIAL_RSP and applies the client's checks.
    pub async fn dial_response(&mut self) -> Result<(), DialFailure> {
        let p = self
            .next_packet()
            .await
            .map_err(|e| DialFailure::Broken(e.to_string()))?
            .ok_or_else(|| DialFailure::Broken("call ended before DIAL_RSP".into()))?;
        let Some(Payload::DialResponse(r)) = p.payload else {
            return Err(DialFailure::Broken(format!(
                "packet type {} before DIAL_RSP (the client kills its tunnel)",
                p.r#type
            )));
        };
        if r.random != self.random {
            return Err(DialFailure::Broken(
                "DIAL_RSP for an unknown random (the client kills its tunnel)".into(),
            ));
        }
        if !r.error.is_empty() {
            return Err(DialFailure::Refused(r.error));
        }
        if r.connect_id == 0 {
            return Err(DialFailure::Broken(
                "DIAL_RSP success with connectID 0".into(),
            ));
        }
        self.connect_id = r.connect_id;
        Ok(())
    }

    /// Gives up on the pending dial: DIAL_CLS.
    pub async fn cancel_dial(&mut self) -> io::Result<()> {
        let random = self.random;
        self.send_packet(&Packet {
            r#type: PacketType::DialCls as i32,
            payload: Some(Payload::CloseDial(konnectivity::CloseDial { random })),
        })
        .await
    }

    /// Sends `data` in one DATA packet.
    pub async fn write(&mut self, data: Bytes) -> io::Result<()> {
        let connect_id = self.connect_id;
        self.send_packet(&Packet {
            r#type: PacketType::Data as i32,
            payload: Some(Payload::Data(konnectivity::Data {
                connect_id,
                error: String::new(),
                data,
            })),
        })
        .await
    }

    /// The next bytes from the node; `Ok(None)` at CLOSE_RSP (the remote end closed, or its
    /// agent went: `Err` then carries the CLOSE_RSP error), or when the call ended.
    pub async fn read(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            let Some(p) = self.next_packet().await? else {
                return Ok(None);
            };
            match p.payload {
                Some(Payload::Data(d)) => {
                    if d.connect_id != self.connect_id {
                        return Err(io::Error::other("DATA for another connectID"));
                    }
                    if !d.data.is_empty() {
                        return Ok(Some(d.data));
                    }
                }
                Some(Payload::CloseResponse(c)) => {
                    if !c.error.is_empty() {
                        return Err(io::Error::other(format!("CLOSE_RSP: {}", c.error)));
                    }
                    return Ok(None);
                }
                Some(Payload::DialResponse(_)) => {
                    return Err(io::Error::other(
                        "a second DIAL_RSP (the client kills its tunnel)",
                    ));
                }
                other => return Err(io::Error::other(format!("unexpected packet {other:?}"))),
            }
        }
    }

    /// Closes the connection: CLOSE_REQ, then CLOSE_RSP within 10 s (DATA meanwhile is
    /// dropped, as the client does).
    pub async fn close(&mut self) -> io::Result<()> {
        let connect_id = self.connect_id;
        self.send_packet(&Packet {
            r#type: PacketType::CloseReq as i32,
            payload: Some(Payload::CloseRequest(konnectivity::CloseRequest {
                connect_id,
            })),
        })
        .await?;
        let wait = async {
            loop {
                match self.next_packet().await? {
                    Some(Packet {
                        payload: Some(Payload::CloseResponse(c)),
                        ..
                    }) if c.connect_id == connect_id => return Ok(()),
                    Some(_) => {}
                    None => return Err(io::Error::other("call ended without CLOSE_RSP")),
                }
            }
        };
        let r = tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .unwrap_or_else(|_| Err(io::Error::other("no CLOSE_RSP in 10 s")));
        let _ = self.send.send_data(Bytes::new(), true);
        r
    }

    /// The random this call dialled with.
    pub fn random(&self) -> i64 {
        self.random
    }
}
