//! A scripted Konnectivity agent (AgentService over HTTP/2, written here packet by packet)
//! against the server: the bounds docs/SECURITY.md states for Konnectivity's agents, whatever
//! such an agent or a client does. Needs no Konnectivity binary.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use common::*;
use prost::Message as _;
use tether_server::grpc::konnectivity::{self as k, Packet, PacketType, packet::Payload};
use tether_server::{KonnectivityAgents, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A Konnectivity agent written packet by packet.
struct Scripted {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    buf: BytesMut,
    headers: http::HeaderMap,
    status_on_open: Option<String>,
}

/// Connects as `id` (its own certificate), calls `/AgentService/Connect` with `metadata`,
/// and waits for the response headers.
async fn scripted(pki: &Pki, server: SocketAddr, id: &str, metadata: &[(&str, &str)]) -> Scripted {
    let cert = pki.ca.leaf(id, &[id]);
    let tls = tether::tls::client_config(
        pki.ca_pem(),
        Some((cert.cert.as_bytes(), cert.key.as_bytes())),
    )
    .unwrap();
    let mut tls = Arc::unwrap_or_clone(tls);
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(server).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (client, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = http::Request::builder()
        .method("POST")
        .uri("https://localhost/AgentService/Connect")
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in metadata {
        req = req.header(*k, *v);
    }
    let mut client = client.ready().await.unwrap();
    let (resp, send) = client.send_request(req.body(()).unwrap(), false).unwrap();
    let resp = tokio::time::timeout(WAIT, resp)
        .await
        .expect("headers at once")
        .unwrap();
    let headers = resp.headers().clone();
    let status_on_open = headers
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned());
    Scripted {
        send,
        recv: resp.into_body(),
        buf: BytesMut::new(),
        headers,
        status_on_open,
    }
}

fn framed(p: &Packet) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(0);
    b.put_u32(u32::try_from(p.encoded_len()).unwrap());
    p.encode(&mut b).unwrap();
    b.freeze()
}

impl Scripted {
    /// Sends `bytes` as its window allows; `false` if the window stayed shut for `stall`.
    async fn send_raw(&mut self, bytes: Bytes, stall: Duration) -> bool {
        self.send_until(bytes, stall).await.is_ok()
    }

    /// Sends `bytes` as its window allows; what is left unsent if the window stayed shut for
    /// `stall`.
    async fn send_until(&mut self, mut bytes: Bytes, stall: Duration) -> Result<(), Bytes> {
        while !bytes.is_empty() {
            self.send.reserve_capacity(bytes.len());
            let cap = tokio::time::timeout(
                stall,
                std::future::poll_fn(|cx| self.send.poll_capacity(cx)),
            )
            .await;
            let n = match cap {
                Ok(Some(Ok(n))) => n.min(bytes.len()),
                _ => return Err(bytes),
            };
            if n > 0 {
                self.send.send_data(bytes.split_to(n), false).unwrap();
            }
        }
        Ok(())
    }

    async fn send(&mut self, p: &Packet) {
        assert!(self.send_raw(framed(p), WAIT).await, "the window opened");
    }

    /// The next packet; `None` when the call ended.
    async fn recv(&mut self) -> Option<Packet> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                if self.buf.len() >= 5 + len {
                    self.buf.advance(5);
                    return Some(Packet::decode(self.buf.split_to(len).freeze()).unwrap());
                }
            }
            let chunk = tokio::time::timeout(WAIT, self.recv.data())
                .await
                .expect("a packet in time")?
                .ok()?;
            let _ = self.recv.flow_control().release_capacity(chunk.len());
            self.buf.extend_from_slice(&chunk);
        }
    }

    /// Waits for DIAL_REQ and accepts it as connection `connect_id`; returns its address.
    async fn accept_dial(&mut self, connect_id: i64) -> String {
        let p = self.recv().await.expect("DIAL_REQ");
        let Some(Payload::DialRequest(d)) = p.payload else {
            panic!("not a DIAL_REQ: {p:?}")
        };
        self.send(&Packet {
            r#type: PacketType::DialRsp as i32,
            payload: Some(Payload::DialResponse(k::DialResponse {
                error: String::new(),
                connect_id,
                random: d.random,
            })),
        })
        .await;
        d.address
    }
}

fn data(connect_id: i64, bytes: Bytes) -> Packet {
    Packet {
        r#type: PacketType::Data as i32,
        payload: Some(Payload::Data(k::Data {
            connect_id,
            error: String::new(),
            data: bytes,
        })),
    }
}

fn config(pki: &Pki, buffer: usize) -> ServerConfig {
    ServerConfig {
        konnectivity_agents: Some(KonnectivityAgents {
            buffer,
            ..KonnectivityAgents::default()
        }),
        server_count: 3,
        ..server_config(pki)
    }
}

/// A CONNECT client whose socket takes little before it stops the sender.
async fn small_client(frontend: SocketAddr, target: &str) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(64 * 1024).unwrap();
    let mut s = sock.connect(frontend).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (head, rest) = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(rest.is_empty());
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_konnectivity_agent_flooding_a_stream_nobody_reads_is_held_to_its_buffer_and_loses_nothing()
 {
    const BUFFER: usize = 1 << 20;
    const FLOOD: usize = 64 << 20;
    let pki = Pki::new();
    let server = Server::start(config(&pki, BUFFER)).await.unwrap();
    let mut agent = scripted(
        &pki,
        server.agent_addr,
        "node-1",
        &[
            ("agentid", "node-1"),
            ("agentidentifiers", "ipv4=127.0.0.2"),
        ],
    )
    .await;
    assert_eq!(agent.status_on_open, None);
    assert_eq!(agent.headers.get("serverid").unwrap(), "server-1");
    assert_eq!(agent.headers.get("servercount").unwrap(), "3");
    assert!(server.wait_agents(1, WAIT).await);
    assert_eq!(series(&server, "tether_konnectivity_agents"), 1.0);

    let frontend = server.connect_addr.unwrap();
    let client = tokio::spawn(async move { small_client(frontend, "127.0.0.2:80").await });
    assert_eq!(agent.accept_dial(1).await, "127.0.0.2:80");
    let mut client = client.await.unwrap();

    // The client reads nothing: the agent sends until its window stays shut.
    let payload = pattern(3, FLOOD);
    let mut sent = 0;
    let mut unsent = Bytes::new();
    while sent < FLOOD {
        let piece = Bytes::copy_from_slice(&payload[sent..sent + 16 * 1024]);
        sent += 16 * 1024;
        if let Err(rest) = agent
            .send_until(framed(&data(1, piece)), Duration::from_secs(2))
            .await
        {
            // The rest of the message it was in, to go first once the window opens.
            unsent = rest;
            break;
        }
    }
    let held = series(&server, "tether_konnectivity_agent_bytes_held");
    eprintln!(
        "flood: the agent sent {} KiB before its window shut; the server holds {:.0} KiB of it (buffer {} KiB)",
        sent >> 10,
        held / 1024.0,
        BUFFER >> 10
    );
    assert!(held <= BUFFER as f64, "held {held} over the buffer");
    // What was sent sits in the server's buffer, its HTTP/2 window, the tether stream's
    // window and the sockets to the client: far from the flood.
    assert!(
        sent < 16 << 20,
        "the agent sent {sent} bytes into a stream nobody reads"
    );

    // Now the client reads: every byte sent arrives, in order.
    let rest = payload[sent..].to_vec();
    let reading = tokio::spawn(async move {
        let mut got = vec![0u8; FLOOD];
        client.read_exact(&mut got).await.map(|_| got)
    });
    assert!(agent.send_raw(unsent, WAIT).await);
    assert!(
        agent
            .send_raw(
                Bytes::from(
                    rest.chunks(16 * 1024)
                        .flat_map(|c| framed(&data(1, Bytes::copy_from_slice(c))))
                        .collect::<Vec<u8>>()
                ),
                WAIT
            )
            .await
    );
    let got = tokio::time::timeout(Duration::from_secs(60), reading)
        .await
        .expect("all of it")
        .unwrap()
        .unwrap();
    assert!(got == payload, "the bytes arrived intact and in order");
    // The node's end, then the client's.
    agent
        .send(&Packet {
            r#type: PacketType::CloseRsp as i32,
            payload: Some(Payload::CloseResponse(k::CloseResponse {
                error: String::new(),
                connect_id: 1,
            })),
        })
        .await;
    at_rest(&server, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_limit_or_a_reused_connect_id_ends_the_agents_tunnel() {
    let pki = Pki::new();
    let server = Server::start(config(&pki, 1 << 20)).await.unwrap();
    let frontend = server.connect_addr.unwrap();

    // A length prefix over the limit: refused before anything is allocated for it.
    let mut agent = scripted(&pki, server.agent_addr, "node-1", &[("agentid", "node-1")]).await;
    assert!(server.wait_agents(1, WAIT).await);
    let mut head = BytesMut::new();
    head.put_u8(0);
    head.put_u32(1 << 30);
    assert!(agent.send_raw(head.freeze(), WAIT).await);
    assert!(
        server.wait_agents_at_most(0, WAIT).await,
        "the agent's tunnel is closed"
    );
    assert!(agent.recv().await.is_none(), "and its call ended");

    // A DIAL_RSP naming a connection that is live.
    let mut agent = scripted(&pki, server.agent_addr, "node-1", &[("agentid", "node-1")]).await;
    assert!(server.wait_agents(1, WAIT).await);
    let c1 = tokio::spawn(async move { connect_tcp(frontend, "127.0.0.2:80").await });
    agent.accept_dial(7).await;
    let (status, _, _c1) = c1.await.unwrap();
    assert_eq!(status, 200);
    let c2 = tokio::spawn(async move { connect_tcp(frontend, "127.0.0.2:81").await });
    agent.accept_dial(7).await;
    assert!(
        server.wait_agents_at_most(0, WAIT).await,
        "the agent's tunnel is closed"
    );
    let (status, head, _) = c2.await.unwrap();
    assert_ne!(status, 200, "{head}");
    at_rest(&server, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_konnectivity_agents_own_id_gives_way_to_the_name_its_certificate_proves() {
    let pki = Pki::new();
    let server = Server::start(config(&pki, 1 << 20)).await.unwrap();
    let _agent = scripted(
        &pki,
        server.agent_addr,
        "node-1",
        &[
            ("agentid", "9a1b2c3d-uuid"),
            ("agentidentifiers", "host=node-1"),
        ],
    )
    .await;
    assert!(server.wait_agents(1, WAIT).await);
    assert_eq!(server.core().registry.agent_ids(), vec!["node-1"]);
    // Its host= claim must still be the proven name's.
    let refused = scripted(
        &pki,
        server.agent_addr,
        "node-3",
        &[
            ("agentid", "0e0e-uuid"),
            ("agentidentifiers", "host=node-1"),
        ],
    )
    .await;
    assert_eq!(
        refused.status_on_open.as_deref(),
        Some("16"),
        "{:?}",
        refused.headers
    );
    assert_eq!(server.core().registry.agent_ids(), vec!["node-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_an_agent_id_or_claiming_another_nodes_name_are_refused_with_a_reason() {
    let pki = Pki::new();
    let server = Server::start(config(&pki, 1 << 20)).await.unwrap();
    let refused = scripted(
        &pki,
        server.agent_addr,
        "node-1",
        &[("agentidentifiers", "host=node-1")],
    )
    .await;
    assert_eq!(
        refused.status_on_open.as_deref(),
        Some("3"),
        "INVALID_ARGUMENT: {:?}",
        refused.headers
    );
    let refused = scripted(
        &pki,
        server.agent_addr,
        "node-1",
        &[("agentid", "node-1"), ("agentidentifiers", "host=node-2")],
    )
    .await;
    assert_eq!(
        refused.status_on_open.as_deref(),
        Some("16"),
        "UNAUTHENTICATED: {:?}",
        refused.headers
    );
    let message = refused
        .headers
        .get("grpc-message")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(
        message.contains("host"),
        "the reason names the rule: {message}"
    );
    assert_eq!(server.core().registry.agent_ids(), Vec::<String>::new());
    at_rest(&server, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_makes_its_call_gives_its_handshake_slot_back_at_the_deadline() {
    let pki = Pki::new();
    let mut cfg = config(&pki, 1 << 20);
    cfg.session.handshake_timeout_ms = 1_000;
    let server = Server::start(cfg).await.unwrap();
    let cert = pki.ca.leaf("node-1", &["node-1"]);
    let tls = tether::tls::client_config(
        pki.ca_pem(),
        Some((cert.cert.as_bytes(), cert.key.as_bytes())),
    )
    .unwrap();
    let mut tls = Arc::unwrap_or_clone(tls);
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(server.agent_addr)
        .await
        .unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    // The HTTP/2 preface, and nothing more.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        series(&server, "tether_agent_handshakes"),
        1.0,
        "it holds a handshake slot"
    );
    let mut sink = Vec::new();
    let end = tokio::time::timeout(WAIT, tls.read_to_end(&mut sink)).await;
    assert!(end.is_ok(), "the server closed it at the deadline");
    at_rest(&server, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_client_reads_nothing_is_reset_once_the_buffer_stays_full_and_the_others_go_on()
 {
    let pki = Pki::new();
    let cfg = ServerConfig {
        konnectivity_agents: Some(KonnectivityAgents {
            buffer: 256 * 1024,
            stall_limit: Duration::from_secs(1),
            ..KonnectivityAgents::default()
        }),
        ..server_config(&pki)
    };
    let server = Server::start(cfg).await.unwrap();
    let mut agent = scripted(&pki, server.agent_addr, "node-1", &[("agentid", "node-1")]).await;
    assert!(server.wait_agents(1, WAIT).await);
    let frontend = server.connect_addr.unwrap();
    let stuck = tokio::spawn(async move { small_client(frontend, "127.0.0.2:80").await });
    agent.accept_dial(1).await;
    let mut stuck = stuck.await.unwrap();
    // The agent floods the stream nobody reads, far past the buffer and the windows.
    let piece = framed(&data(1, Bytes::from(vec![7u8; 16 * 1024])));
    let mut sent = 0usize;
    let flooding = async {
        for _ in 0..4096 {
            if !agent.send_raw(piece.clone(), WAIT).await {
                break;
            }
            sent += 1;
        }
        agent
    };
    let mut agent = tokio::time::timeout(Duration::from_secs(60), flooding)
        .await
        .expect("the flood ends");
    eprintln!(
        "the agent sent {} KiB into the stream nobody read",
        sent * 16
    );
    // The stream was reset (its client sees an error, never a clean end), and the agent was
    // told to close its connection.
    let mut got = Vec::new();
    let end = tokio::time::timeout(WAIT, stuck.read_to_end(&mut got))
        .await
        .expect("the stuck stream ends");
    assert!(
        end.is_err(),
        "a reset, not a clean end: read {} bytes, {end:?}",
        got.len()
    );
    let mut close_req = false;
    for _ in 0..64 {
        match agent.recv().await {
            Some(p) if p.r#type == PacketType::CloseReq as i32 => {
                close_req = true;
                break;
            }
            Some(_) => {}
            None => break,
        }
    }
    assert!(close_req, "CLOSE_REQ for the reset stream");
    // Another stream through the same agent works.
    let other = tokio::spawn(async move { connect_tcp(frontend, "127.0.0.2:81").await });
    agent.accept_dial(2).await;
    let (status, head, mut other) = other.await.unwrap();
    assert_eq!(status, 200, "{head}");
    agent
        .send(&data(2, Bytes::from_static(b"still here")))
        .await;
    let mut b = [0u8; 10];
    tokio::time::timeout(WAIT, other.read_exact(&mut b))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&b, b"still here");
}
