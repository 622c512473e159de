//! Server messages onto the call, each byte sent only as h2 grants capacity.

use std::sync::{Mutex, MutexGuard};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message as _;
use tether::Chunks;

use super::konnectivity::{self, Packet, PacketType, packet::Payload};
use super::{ANSWER_DEADLINE, code, percent_encode};

/// Server messages onto the call, each byte sent only as h2 grants capacity (the client's
/// window). The h2 stream is locked for one call at a time, never across a wait, so the
/// relay's way up can watch it for a reset while the way down sends on it.
pub(super) struct Sender {
    send: Mutex<h2::SendStream<Bytes>>,
    /// Set before this end resets the call itself, so its own CANCEL is never taken for
    /// the client's.
    reset_here: std::sync::atomic::AtomicBool,
}

impl Sender {
    pub(super) fn new(send: h2::SendStream<Bytes>) -> Sender {
        Sender {
            send: Mutex::new(send),
            reset_here: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether a failed send was the client cancelling the call (RST_STREAM(CANCEL)).
    pub(super) fn is_client_cancel(e: &std::io::Error) -> bool {
        e.get_ref()
            .and_then(|i| i.downcast_ref::<h2::Error>())
            .is_some_and(super::cancelled_by_client)
    }

    fn lock(&self) -> MutexGuard<'_, h2::SendStream<Bytes>> {
        self.send.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves when the client resets the call or its connection goes, with why, and
    /// whether it was the client cancelling the call (RST_STREAM(CANCEL)).
    pub(super) async fn reset(&self) -> (bool, String) {
        match std::future::poll_fn(|cx| self.lock().poll_reset(cx)).await {
            Ok(reason) => (
                reason == h2::Reason::CANCEL
                    && !self.reset_here.load(std::sync::atomic::Ordering::Relaxed),
                format!("the client reset the call ({reason})"),
            ),
            Err(e) => (false, format!("the client's connection ended: {e}")),
        }
    }

    /// Sends `buf` as it gets capacity; `Err` when the client reset the call or left.
    async fn send_all(&self, mut buf: Bytes) -> std::io::Result<()> {
        while !buf.is_empty() {
            self.lock().reserve_capacity(buf.len());
            let granted = std::future::poll_fn(|cx| self.lock().poll_capacity(cx)).await;
            let n = match granted {
                Some(Ok(n)) => n.min(buf.len()),
                Some(Err(e)) => return Err(std::io::Error::other(e)),
                None => return Err(std::io::Error::other("the gRPC call is closed")),
            };
            if n == 0 {
                continue;
            }
            self.lock()
                .send_data(buf.split_to(n), false)
                .map_err(std::io::Error::other)?;
        }
        Ok(())
    }

    /// One packet; a client that grants no window for it within [`ANSWER_DEADLINE`] loses
    /// the call (an answer never waits on a client for ever).
    async fn packet(&self, p: &Packet) -> std::io::Result<()> {
        let len = p.encoded_len();
        let mut b = BytesMut::with_capacity(5 + len);
        b.put_u8(0);
        b.put_u32(u32::try_from(len).expect("a packet under 4 GiB"));
        p.encode(&mut b).expect("capacity reserved");
        tokio::time::timeout(ANSWER_DEADLINE, self.send_all(b.freeze()))
            .await
            .unwrap_or_else(|_| {
                self.reset_here
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                self.lock().send_reset(h2::Reason::CANCEL);
                Err(std::io::Error::other(
                    "the client granted no window for an answer in 10 s",
                ))
            })
    }

    pub(super) async fn dial_response(
        &self,
        random: i64,
        connect_id: i64,
        error: &str,
    ) -> std::io::Result<()> {
        self.packet(&Packet {
            r#type: PacketType::DialRsp as i32,
            payload: Some(Payload::DialResponse(konnectivity::DialResponse {
                error: error.into(),
                connect_id,
                random,
            })),
        })
        .await
    }

    pub(super) async fn close_response(&self, connect_id: i64, error: &str) -> std::io::Result<()> {
        self.packet(&Packet {
            r#type: PacketType::CloseRsp as i32,
            payload: Some(Payload::CloseResponse(konnectivity::CloseResponse {
                error: error.into(),
                connect_id,
            })),
        })
        .await
    }

    /// One DATA packet carrying all of `chunks`, without copying them: the framing and the
    /// protobuf field headers go first, then the bytes as they are.
    pub(super) async fn data(&self, connect_id: i64, chunks: &mut Chunks) -> std::io::Result<()> {
        let n = chunks.remaining();
        let head = data_head(connect_id, n);
        self.send_all(head).await?;
        while let Some(piece) = chunks.pop() {
            self.send_all(piece).await?;
        }
        Ok(())
    }

    /// Ends the call: trailers with status OK (the outcome is in the packets).
    pub(super) fn end(&self) {
        self.end_with(code::OK, "");
    }

    /// Ends the call with `status` and, if not OK, its reason.
    pub(super) fn end_with(&self, status: u32, message: &str) {
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", http::HeaderValue::from(status));
        if status != code::OK
            && let Ok(v) = http::HeaderValue::from_str(&percent_encode(message))
        {
            t.insert("grpc-message", v);
        }
        let _ = self.lock().send_trailers(t);
    }
}

/// The gRPC prefix and protobuf headers of `Packet{type: DATA, data: Data{connectID, data}}`
/// whose `data` is `n` bytes that follow: what prost writes before those bytes (a test holds
/// the two equal).
pub fn data_head(connect_id: i64, n: usize) -> Bytes {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
    // Data: connectID (field 1, omitted when 0 as proto3 does), data (field 3, omitted when empty).
    let id_len = if connect_id != 0 {
        key_len(1) + encoded_len_varint(connect_id as u64)
    } else {
        0
    };
    let bytes_len = if n > 0 {
        key_len(3) + encoded_len_varint(n as u64) + n
    } else {
        0
    };
    let data_len = id_len + bytes_len;
    // Packet: type (field 1) = DATA, data (field 4).
    let packet_len = key_len(1)
        + encoded_len_varint(PacketType::Data as u64)
        + key_len(4)
        + encoded_len_varint(data_len as u64)
        + data_len;
    let mut b = BytesMut::with_capacity(32);
    b.put_u8(0);
    b.put_u32(u32::try_from(packet_len).expect("a packet under 4 GiB"));
    encode_key(1, WireType::Varint, &mut b);
    encode_varint(PacketType::Data as u64, &mut b);
    encode_key(4, WireType::LengthDelimited, &mut b);
    encode_varint(data_len as u64, &mut b);
    if connect_id != 0 {
        encode_key(1, WireType::Varint, &mut b);
        encode_varint(connect_id as u64, &mut b);
    }
    if n > 0 {
        encode_key(3, WireType::LengthDelimited, &mut b);
        encode_varint(n as u64, &mut b);
    }
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_head_and_its_bytes_are_what_prost_encodes() {
        for (id, n) in [
            (1i64, 1usize),
            (7, 0),
            (0, 5),
            (1 << 40, 70_000),
            (-3, 127),
            (300, 128),
        ] {
            let data = Bytes::from(vec![0xa5; n]);
            let p = Packet {
                r#type: PacketType::Data as i32,
                payload: Some(Payload::Data(konnectivity::Data {
                    connect_id: id,
                    error: String::new(),
                    data: data.clone(),
                })),
            };
            let mut want = BytesMut::new();
            want.put_u8(0);
            want.put_u32(u32::try_from(p.encoded_len()).unwrap());
            p.encode(&mut want).unwrap();
            let mut got = BytesMut::from(&data_head(id, n)[..]);
            got.extend_from_slice(&data);
            assert_eq!(got, want, "connect id {id}, {n} bytes");
        }
    }
}
