//! The fault suite, third parties (docs/SECURITY.md, "Nothing stranded"): destinations that
//! misbehave (read one byte a second, close or reset mid-response, accept and never answer)
//! and clients that leave before the 200 or mid-download, over TCP, TLS, the Unix socket and
//! gRPC. Each case must end visibly where it should (a reset is never a clean end) and give
//! back every stream, dial and destination connection (`common::at_rest`).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tether_agent::Agent;
use tether_server::Server;
use tether_server::client::grpc::{AuthorityStyle, GrpcClient};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A client connection on any CONNECT frontend.
trait Conn: AsyncRead + AsyncWrite + Unpin + Send {
    /// Makes the next close a reset (SO_LINGER 0 on the TCP socket underneath), where there
    /// is one.
    fn reset_on_close(&self);
}

impl Conn for TcpStream {
    fn reset_on_close(&self) {
        self.set_zero_linger().unwrap();
    }
}

impl Conn for tokio::net::UnixStream {
    fn reset_on_close(&self) {}
}

impl Conn for tokio_rustls::client::TlsStream<TcpStream> {
    fn reset_on_close(&self) {
        self.get_ref().0.set_zero_linger().unwrap();
    }
}

#[derive(Clone, Copy, Debug)]
enum Front {
    Tcp,
    Tls,
    Uds,
}

/// A server with every frontend (CONNECT on TLS when `tls`, else plain TCP; CONNECT and gRPC
/// on Unix sockets) and one agent.
struct Rig {
    pki: Pki,
    server: Server,
    agent: Agent,
    dir: std::path::PathBuf,
    tls: bool,
}

async fn rig(tls: bool) -> Rig {
    let pki = Pki::new();
    let dir = tempdir("third");
    let mut cfg = server_config(&pki);
    // A short linger (the default is 10 s): a client that leaves over the Unix socket ends
    // with a close, and its stream waits that long for the destination's credit.
    cfg.linger = Duration::from_millis(500);
    cfg.uds_path = Some(dir.join("c.sock"));
    cfg.grpc_uds_path = Some(dir.join("g.sock"));
    if tls {
        cfg.connect_tls = Some(
            tether::tls::server_config(pki.server.cert.as_bytes(), pki.server.key.as_bytes(), None)
                .unwrap()
                .into(),
        );
    }
    let server = Server::start(cfg).await.unwrap();
    let agent = Agent::start(agent_config(&pki, server.agent_addr, "agent-1"));
    assert!(server.wait_agents(1, WAIT).await);
    Rig {
        pki,
        server,
        agent,
        dir,
        tls,
    }
}

impl Rig {
    /// A connection to `front` with the CONNECT request for `target` sent, the answer unread.
    async fn request(&self, front: Front, target: SocketAddr) -> Box<dyn Conn> {
        let req = format!("CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        let mut c: Box<dyn Conn> = match front {
            Front::Tcp | Front::Tls => {
                assert_eq!(self.tls, matches!(front, Front::Tls));
                let tcp = TcpStream::connect(self.server.connect_addr.unwrap())
                    .await
                    .unwrap();
                if self.tls {
                    let cfg = tether::tls::client_config(self.pki.ca_pem(), None).unwrap();
                    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
                    Box::new(
                        tokio_rustls::TlsConnector::from(cfg)
                            .connect(name, tcp)
                            .await
                            .unwrap(),
                    )
                } else {
                    Box::new(tcp)
                }
            }
            Front::Uds => Box::new(
                tokio::net::UnixStream::connect(self.dir.join("c.sock"))
                    .await
                    .unwrap(),
            ),
        };
        c.write_all(req.as_bytes()).await.unwrap();
        c
    }

    /// A connection to `front`, tunnelled to `target` (after the 200).
    async fn open(&self, front: Front, target: SocketAddr) -> Box<dyn Conn> {
        let mut c = self.request(front, target).await;
        let (head, rest) = read_head(&mut c).await;
        assert_eq!(status_of(&head), 200, "{head}");
        assert!(rest.is_empty());
        c
    }

    async fn grpc(&self) -> GrpcClient {
        GrpcClient::connect(&self.dir.join("g.sock"), AuthorityStyle::PercentEncoded)
            .await
            .unwrap()
    }

    async fn at_rest(&self) {
        at_rest(&self.server, &[&self.agent]).await;
    }
}

/// A destination that runs `serve` on every connection it accepts, and counts the ones still
/// open at its end.
struct Dest {
    addr: SocketAddr,
    open: Arc<std::sync::atomic::AtomicUsize>,
}

async fn dest<F, Fut>(serve: F) -> Dest
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (o, serve) = (open.clone(), Arc::new(serve));
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (o, serve) = (o.clone(), serve.clone());
            o.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                serve(s).await;
                o.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
    });
    Dest { addr, open }
}

impl Dest {
    /// Whether every connection the destination accepted is over at its end.
    async fn all_over(&self) -> bool {
        eventually(WAIT, || {
            self.open.load(std::sync::atomic::Ordering::SeqCst) == 0
        })
        .await
    }
}

/// Waits until `s` sees its end: EOF or an error, within `WAIT`.
async fn until_end(mut s: TcpStream) {
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(WAIT, async {
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// What a client reads until its stream ends: the bytes and whether the end was clean.
async fn read_all<S: AsyncRead + Unpin + ?Sized>(c: &mut S) -> (usize, bool) {
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(WAIT, c.read(&mut buf)).await {
            Ok(Ok(0)) => return (got, true),
            Ok(Ok(n)) => got += n,
            Ok(Err(_)) => return (got, false),
            Err(_) => panic!("the stream did not end within {WAIT:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_reads_one_byte_a_second_holds_its_stream_only_while_the_client_stays() {
    let r = rig(false).await;
    // Reads a byte a second into a small buffer: the upload waits on it, bytes still move.
    let d = dest(|mut s| async move {
        let mut b = [0u8; 1];
        for _ in 0..60 {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    })
    .await;
    for front in [Front::Tcp, Front::Uds] {
        let mut c = r.open(front, d.addr).await;
        let big = vec![7u8; 64 << 20];
        let wrote = tokio::time::timeout(Duration::from_secs(2), c.write_all(&big)).await;
        assert!(
            wrote.is_err(),
            "{front:?}: the upload should wait on the trickle"
        );
        // The client gives up with a reset (over the Unix socket: a close, seen at once).
        c.reset_on_close();
        drop(c);
        r.at_rest().await;
    }
    // The destination reads what its buffer already holds at a byte a second, so its own end
    // comes late; that the agent closed it when the stream ended, faults.rs checks.
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_closes_mid_response_gives_the_client_what_it_sent_then_a_clean_end() {
    let r = rig(false).await;
    let d = dest(|mut s| async move {
        let _ = s.write_all(&vec![1u8; 100_000]).await;
        // A close with nothing unread: a FIN.
    })
    .await;
    for front in [Front::Tcp, Front::Uds] {
        let mut c = r.open(front, d.addr).await;
        assert_eq!(read_all(&mut c).await, (100_000, true), "{front:?}");
        drop(c);
        r.at_rest().await;
    }
    let client = r.grpc().await;
    let mut call = client.dial(&d.addr.to_string()).await.unwrap();
    let mut got = 0;
    while let Some(b) = tokio::time::timeout(WAIT, call.read())
        .await
        .unwrap()
        .unwrap()
    {
        got += b.len();
    }
    assert_eq!(got, 100_000, "gRPC: every byte, then CLOSE_RSP");
    drop((call, client));
    r.at_rest().await;
    assert!(d.all_over().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_resets_mid_response_is_never_a_clean_end_for_the_client() {
    let r = rig(false).await;
    let d = dest(|mut s| async move {
        let _ = s.write_all(&vec![1u8; 100_000]).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.set_zero_linger().unwrap();
    })
    .await;
    for front in [Front::Tcp, Front::Uds] {
        let mut c = r.open(front, d.addr).await;
        let (got, clean) = read_all(&mut c).await;
        match front {
            // A Unix stream socket has no reset: its only end is a close, which the client
            // reads as an end (docs/CONNECT.md); what was sent arrives whole first.
            Front::Uds => assert_eq!(got, 100_000, "{front:?}"),
            _ => assert!(
                !clean,
                "{front:?}: a reset reached the client as a clean end after {got} bytes"
            ),
        }
        drop(c);
        r.at_rest().await;
    }
    let client = r.grpc().await;
    let mut call = client.dial(&d.addr.to_string()).await.unwrap();
    // gRPC ends every stream with CLOSE_RSP: the reset is its error, never an empty one.
    let clean = tokio::time::timeout(WAIT, async {
        loop {
            match call.read().await {
                Ok(Some(_)) => {}
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap();
    assert!(
        !clean,
        "gRPC: the destination's reset reached the client as a clean CLOSE_RSP"
    );
    drop((call, client));
    r.at_rest().await;
    assert!(d.all_over().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_accepts_and_never_answers_is_given_back_when_its_client_leaves() {
    for tls in [false, true] {
        let r = rig(tls).await;
        let d = dest(until_end).await;
        let fronts: &[Front] = if tls {
            &[Front::Tls]
        } else {
            &[Front::Tcp, Front::Uds]
        };
        for &front in fronts {
            let mut c = r.open(front, d.addr).await;
            c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let answer = tokio::time::timeout(Duration::from_millis(300), c.read_u8()).await;
            assert!(answer.is_err(), "{front:?}: no answer comes");
            c.reset_on_close();
            drop(c);
            r.at_rest().await;
        }
        let client = r.grpc().await;
        let mut call = client.dial(&d.addr.to_string()).await.unwrap();
        call.write(bytes::Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n"))
            .await
            .unwrap();
        drop((call, client));
        r.at_rest().await;
        assert!(d.all_over().await, "tls {tls}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_before_the_200_cancels_its_dial() {
    for tls in [false, true] {
        let r = rig(tls).await;
        // A destination whose SYN is never answered: the dial stays pending at the agent.
        let hole = black_hole().await;
        let target = SocketAddr::from(([127, 0, 0, 1], hole.port));
        let fronts: &[Front] = if tls {
            &[Front::Tls]
        } else {
            &[Front::Tcp, Front::Uds]
        };
        for &front in fronts {
            let c = r.request(front, target).await;
            assert!(
                eventually(WAIT, || r.agent.open_streams() == 1).await,
                "{front:?}: the dial reached the agent"
            );
            drop(c);
            r.at_rest().await;
        }
        let client = r.grpc().await;
        let call = client.start_dial(&target.to_string(), 7).await.unwrap();
        assert!(eventually(WAIT, || r.agent.open_streams() == 1).await);
        drop((call, client));
        r.at_rest().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_download_is_given_back_and_so_is_the_destination() {
    for tls in [false, true] {
        let r = rig(tls).await;
        // A destination that sends for as long as anyone reads.
        let d = dest(|mut s| async move {
            let chunk = vec![3u8; 64 * 1024];
            while s.write_all(&chunk).await.is_ok() {}
        })
        .await;
        let fronts: &[Front] = if tls {
            &[Front::Tls]
        } else {
            &[Front::Tcp, Front::Uds]
        };
        for &front in fronts {
            for reset in [false, true] {
                let mut c = r.open(front, d.addr).await;
                let mut buf = vec![0u8; 1 << 20];
                c.read_exact(&mut buf).await.unwrap();
                if reset {
                    c.reset_on_close();
                }
                drop(c);
                r.at_rest().await;
            }
        }
        let client = r.grpc().await;
        let mut call = client.dial(&d.addr.to_string()).await.unwrap();
        let mut got = 0;
        while got < 1 << 20 {
            got += call.read().await.unwrap().unwrap().len();
        }
        drop((call, client));
        r.at_rest().await;
        assert!(d.all_over().await, "tls {tls}");
    }
}
