//! A local HTTPS server that answers the Kubernetes API calls tether makes, with the real
//! JSON shapes (authentication.k8s.io/v1 TokenReview, coordination.k8s.io/v1 Lease), and a
//! kubeconfig file that points at it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tether::tls::{self, testpki::Ca};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// The bearer token the kubeconfig gives the server (what kube-apiserver would check).
pub const CLIENT_TOKEN: &str = "tether-server-sa-token";

/// How the fake answers a TokenReview of one token.
#[derive(Clone, Debug)]
pub enum Review {
    /// Authenticated as `username` with these extras.
    Ok {
        username: String,
        pod: Option<String>,
        node: Option<String>,
    },
    /// `authenticated: false` with this error.
    No(String),
    /// A 500 with a Status body.
    Fail,
    /// No answer for a minute.
    Slow,
    /// Authenticated as `username`, but for another audience than the one asked for.
    OtherAudience { username: String },
}

/// How the fake frames its response bodies (Go's net/http uses all three).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Framing {
    /// `Transfer-Encoding: chunked`.
    #[default]
    Chunked,
    /// `Content-Length`.
    Length,
    /// Neither: the body runs to the close (after TLS close_notify).
    Close,
}

#[derive(Default)]
pub struct State {
    pub reviews: BTreeMap<String, Review>,
    pub nodes: BTreeMap<String, Vec<String>>,
    pub framing: Framing,
    pub leases: BTreeMap<String, Value>,
    pub review_calls: AtomicUsize,
    pub unauthenticated_calls: AtomicUsize,
    next_rv: AtomicUsize,
}

pub struct FakeKube {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<State>>,
    pub ca: Ca,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeKube {
    pub async fn start() -> FakeKube {
        let ca = Ca::new("fake kube CA");
        let leaf = ca.leaf("kube-apiserver", &["localhost", "127.0.0.1"]);
        let tls = tls::server_config(leaf.cert.as_bytes(), leaf.key.as_bytes(), None).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let task = tokio::spawn(async move {
            let acceptor = TlsAcceptor::from(tls);
            while let Ok((tcp, _)) = l.accept().await {
                let acceptor = acceptor.clone();
                let st = st.clone();
                tokio::spawn(async move {
                    if let Ok(s) = acceptor.accept(tcp).await {
                        let _ = serve(s, st).await;
                    }
                });
            }
        });
        FakeKube {
            addr,
            state,
            ca,
            task,
        }
    }

    pub fn review(&self, token: &str, r: Review) {
        self.state.lock().unwrap().reviews.insert(token.into(), r);
    }

    pub fn node(&self, name: &str, addresses: &[&str]) {
        self.state.lock().unwrap().nodes.insert(
            name.into(),
            addresses.iter().map(|a| (*a).to_owned()).collect(),
        );
    }

    pub fn framing(&self, f: Framing) {
        self.state.lock().unwrap().framing = f;
    }

    pub fn review_calls(&self) -> usize {
        self.state
            .lock()
            .unwrap()
            .review_calls
            .load(Ordering::SeqCst)
    }

    pub fn lease_names(&self) -> Vec<String> {
        self.state.lock().unwrap().leases.keys().cloned().collect()
    }

    pub fn put_lease(&self, name: &str, lease: Value) {
        self.state.lock().unwrap().leases.insert(name.into(), lease);
    }

    /// A kubeconfig in `dir` for this server: CA inline as base64 data, the token in a file
    /// next to it (relative path), as kubeadm and kubectl write them.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        use base64::Engine;
        let ca = base64::engine::general_purpose::STANDARD.encode(self.ca.pem.cert.as_bytes());
        std::fs::write(dir.join("token"), format!("{CLIENT_TOKEN}\n")).unwrap();
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: https://127.0.0.1:{}\n    certificate-authority-data: {ca}\n    tls-server-name: localhost\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: tether\n    namespace: kube-system\ncurrent-context: fake\nusers:\n- name: tether\n  user:\n    tokenFile: token\n",
            self.addr.port()
        );
        let p = dir.join("kubeconfig");
        std::fs::write(&p, text).unwrap();
        p
    }
}

async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    st: Arc<Mutex<State>>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let (method, path, auth, body) = loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = req.parse(&buf) {
            let len: usize = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                .unwrap_or(0);
            if buf.len() >= head + len {
                let auth = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("authorization"))
                    .map(|h| String::from_utf8_lossy(h.value).into_owned());
                break (
                    req.method.unwrap().to_owned(),
                    req.path.unwrap().to_owned(),
                    auth,
                    buf[head..head + len].to_vec(),
                );
            }
        }
    };
    let (status, reply) = if auth.as_deref() != Some(&format!("Bearer {CLIENT_TOKEN}")) {
        st.lock()
            .unwrap()
            .unauthenticated_calls
            .fetch_add(1, Ordering::SeqCst);
        (401, json!({"kind": "Status", "message": "Unauthorized"}))
    } else {
        match route(&method, &path, &body, &st) {
            Some(Answer::Now(status, v)) => (status, v),
            Some(Answer::Never) => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                return Ok(());
            }
            None => (404, json!({"kind": "Status", "message": "not found"})),
        }
    };
    let body = serde_json::to_vec(&reply).unwrap();
    let framing = st.lock().unwrap().framing;
    let mut out = format!("HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n").into_bytes();
    match framing {
        // As Go's net/http answers bodies it has not measured.
        Framing::Chunked => {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
            for piece in body.chunks(100) {
                out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                out.extend_from_slice(piece);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
        }
        Framing::Length => {
            out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
            out.extend_from_slice(&body);
        }
        Framing::Close => {
            out.extend_from_slice(b"Connection: close\r\n\r\n");
            out.extend_from_slice(&body);
        }
    }
    s.write_all(&out).await?;
    s.shutdown().await
}

enum Answer {
    Now(u16, Value),
    Never,
}

fn route(method: &str, path: &str, body: &[u8], st: &Mutex<State>) -> Option<Answer> {
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    if method == "POST" && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
        let req: Value = serde_json::from_slice(body).ok()?;
        assert_eq!(req["apiVersion"], "authentication.k8s.io/v1");
        assert_eq!(req["kind"], "TokenReview");
        let token = req["spec"]["token"].as_str()?.to_owned();
        let audiences = req["spec"]["audiences"].clone();
        let st = st.lock().unwrap();
        st.review_calls.fetch_add(1, Ordering::SeqCst);
        let status = match st.reviews.get(&token) {
            Some(Review::Ok {
                username,
                pod,
                node,
            }) => {
                let mut extra = serde_json::Map::new();
                if let Some(p) = pod {
                    extra.insert("authentication.kubernetes.io/pod-name".into(), json!([p]));
                    extra.insert(
                        "authentication.kubernetes.io/pod-uid".into(),
                        json!(["3f5c"]),
                    );
                }
                if let Some(n) = node {
                    extra.insert("authentication.kubernetes.io/node-name".into(), json!([n]));
                }
                json!({"authenticated": true, "audiences": audiences,
                       "user": {"username": username, "uid": "u-1",
                                "groups": ["system:serviceaccounts", "system:authenticated"],
                                "extra": extra}})
            }
            Some(Review::No(e)) => json!({"authenticated": false, "error": e, "user": {}}),
            Some(Review::Fail) => {
                return Some(Answer::Now(
                    500,
                    json!({"kind": "Status", "status": "Failure", "message": "etcdserver: request timed out", "code": 500}),
                ));
            }
            Some(Review::Slow) => return Some(Answer::Never),
            Some(Review::OtherAudience { username }) => {
                json!({"authenticated": true, "audiences": ["some-other-audience"],
                       "user": {"username": username}})
            }
            None => json!({"authenticated": false, "error": "invalid bearer token", "user": {}}),
        };
        return Some(Answer::Now(
            201,
            json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                   "metadata": {"creationTimestamp": null},
                   "spec": {"token": token, "audiences": audiences}, "status": status}),
        ));
    }
    if let Some(name) = path.strip_prefix("/api/v1/nodes/") {
        let st = st.lock().unwrap();
        return Some(match st.nodes.get(name) {
            Some(addrs) => {
                let addresses: Vec<Value> = addrs
                    .iter()
                    .map(|a| json!({"type": "InternalIP", "address": a}))
                    .chain([json!({"type": "Hostname", "address": name})])
                    .collect();
                Answer::Now(
                    200,
                    json!({"kind": "Node", "apiVersion": "v1", "metadata": {"name": name},
                           "status": {"addresses": addresses}}),
                )
            }
            None => Answer::Now(
                404,
                json!({"kind": "Status", "reason": "NotFound", "message": "nodes not found"}),
            ),
        });
    }
    let rest = path.strip_prefix("/apis/coordination.k8s.io/v1/namespaces/")?;
    let (ns, rest) = rest.split_once('/')?;
    let name = rest
        .strip_prefix("leases")
        .map(|r| r.trim_start_matches('/'))?;
    let mut guard = st.lock().unwrap();
    let State {
        leases, next_rv, ..
    } = &mut *guard;
    let rv = || next_rv.fetch_add(1, Ordering::SeqCst).to_string();
    let answer = match (method, name) {
        ("GET", "") => {
            let selector = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("labelSelector="))
                .map(|s| s.replace("%3D", "=").replace("%2C", ","))
                .unwrap_or_default();
            let items: Vec<Value> = leases
                .values()
                .filter(|l| {
                    l["metadata"]["namespace"] == ns
                        && selector.split(',').filter(|s| !s.is_empty()).all(|kv| {
                            let (k, v) = kv.split_once('=').unwrap();
                            l["metadata"]["labels"][k] == v
                        })
                })
                .cloned()
                .collect();
            Answer::Now(
                200,
                json!({"kind": "LeaseList", "apiVersion": "coordination.k8s.io/v1", "metadata": {}, "items": items}),
            )
        }
        ("GET", n) => match leases.get(n) {
            Some(l) => Answer::Now(200, l.clone()),
            None => Answer::Now(
                404,
                json!({"kind": "Status", "reason": "NotFound", "message": "not found"}),
            ),
        },
        ("POST", "") => {
            let mut l: Value = serde_json::from_slice(body).ok()?;
            let n = l["metadata"]["name"].as_str()?.to_owned();
            match leases.entry(n) {
                std::collections::btree_map::Entry::Occupied(_) => Answer::Now(
                    409,
                    json!({"kind": "Status", "reason": "AlreadyExists", "message": "exists"}),
                ),
                std::collections::btree_map::Entry::Vacant(slot) => {
                    l["metadata"]["namespace"] = json!(ns);
                    l["metadata"]["resourceVersion"] = json!(rv());
                    slot.insert(l.clone());
                    Answer::Now(201, l)
                }
            }
        }
        ("PUT", n) => {
            let mut l: Value = serde_json::from_slice(body).ok()?;
            match leases.get(n) {
                Some(old)
                    if old["metadata"]["resourceVersion"] == l["metadata"]["resourceVersion"] =>
                {
                    l["metadata"]["resourceVersion"] = json!(rv());
                    leases.insert(n.to_owned(), l.clone());
                    Answer::Now(200, l)
                }
                Some(_) => Answer::Now(
                    409,
                    json!({"kind": "Status", "reason": "Conflict", "message": "conflict"}),
                ),
                None => Answer::Now(
                    404,
                    json!({"kind": "Status", "reason": "NotFound", "message": "not found"}),
                ),
            }
        }
        ("DELETE", n) => {
            // DeleteOptions preconditions, as the API server checks them.
            let want: Option<String> = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
                v["preconditions"]["resourceVersion"]
                    .as_str()
                    .map(str::to_owned)
            });
            match leases.get(n) {
                None => Answer::Now(
                    404,
                    json!({"kind": "Status", "reason": "NotFound", "message": "not found"}),
                ),
                Some(l)
                    if want
                        .as_deref()
                        .is_some_and(|w| l["metadata"]["resourceVersion"] != w) =>
                {
                    Answer::Now(
                        409,
                        json!({"kind": "Status", "reason": "Conflict", "message": "precondition failed"}),
                    )
                }
                Some(_) => {
                    leases.remove(n);
                    Answer::Now(200, json!({"kind": "Status", "status": "Success"}))
                }
            }
        }
        _ => return None,
    };
    Some(answer)
}
