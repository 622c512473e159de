//! `deploy/kubernetes/` is checked against the binaries: every manifest parses, every tether
//! container's arguments go through the real flag parsers (so no manifest carries a flag the
//! binary does not have, or a value it refuses), every file a flag names is inside a volume
//! the container mounts, and what the server, the agent, the egress configuration and the
//! RBAC say about each other agrees.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;
use serde_yaml_ng::Value;
use tether_agent::cli::AgentArgs;
use tether_server::cli::ServerArgs;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// Every document of every manifest, with its file name.
fn documents() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "{files:?}");
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).unwrap_or_else(|e| panic!("{name}: {e}"));
            if v.is_null() {
                continue;
            }
            assert!(v["kind"].is_string(), "{name}: a document without a kind");
            out.push((name.clone(), v));
        }
    }
    out
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// A container of a pod spec, with what it mounts and its environment's sample values.
struct Container {
    file: String,
    binary: String,
    args: Vec<String>,
    mounts: Vec<String>,
    probes: Vec<(String, u64)>,
    pod: Value,
}

fn containers(docs: &[(String, Value)]) -> Vec<Container> {
    // What kubelet would put in $(NODE_NAME) and $(HOST_IP).
    let sample = BTreeMap::from([("spec.nodeName", "node-1"), ("status.hostIP", "10.0.0.5")]);
    let mut out = Vec::new();
    for (file, doc) in docs {
        let pod = match s(&doc["kind"]) {
            "Pod" => doc["spec"].clone(),
            "DaemonSet" | "Deployment" => doc["spec"]["template"]["spec"].clone(),
            _ => continue,
        };
        for c in pod["containers"].as_sequence().unwrap() {
            let command = s(&c["command"][0]).to_owned();
            let binary = command.rsplit('/').next().unwrap().to_owned();
            let mut env = BTreeMap::new();
            for e in c["env"].as_sequence().into_iter().flatten() {
                let field = s(&e["valueFrom"]["fieldRef"]["fieldPath"]);
                let value = sample.get(field).copied().unwrap_or(s(&e["value"]));
                env.insert(s(&e["name"]).to_owned(), value.to_owned());
            }
            let args = c["args"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|a| {
                    let mut a = s(a).to_owned();
                    for (k, v) in &env {
                        a = a.replace(&format!("$({k})"), v);
                    }
                    assert!(!a.contains("$("), "{file}: unresolved variable in {a}");
                    a
                })
                .collect();
            let mounts = c["volumeMounts"]
                .as_sequence()
                .into_iter()
                .flatten()
                .map(|m| s(&m["mountPath"]).to_owned())
                .collect();
            let probes = ["livenessProbe", "readinessProbe"]
                .iter()
                .filter_map(|p| {
                    let g = &c[*p]["httpGet"];
                    g["port"]
                        .as_u64()
                        .map(|port| (s(&g["host"]).to_owned(), port))
                })
                .collect();
            out.push(Container {
                file: file.clone(),
                binary,
                args,
                mounts,
                probes,
                pod: pod.clone(),
            });
        }
    }
    out
}

fn mounted(c: &Container, path: &Path, automount: bool) {
    let p = path.display().to_string();
    let ok = c
        .mounts
        .iter()
        .any(|m| p == *m || p.starts_with(&format!("{}/", m.trim_end_matches('/'))))
        || (automount && p.starts_with("/var/run/secrets/kubernetes.io/serviceaccount/"));
    assert!(
        ok,
        "{}: {p} is in no volume the container mounts ({:?})",
        c.file, c.mounts
    );
}

fn server_args(c: &Container) -> ServerArgs {
    let mut argv = vec!["tether-server".to_owned()];
    argv.extend(c.args.iter().cloned());
    ServerArgs::try_parse_from(&argv).unwrap_or_else(|e| panic!("{}: {e}", c.file))
}

fn agent_args(c: &Container) -> AgentArgs {
    let mut argv = vec!["tether-agent".to_owned()];
    argv.extend(c.args.iter().cloned());
    AgentArgs::try_parse_from(&argv).unwrap_or_else(|e| panic!("{}: {e}", c.file))
}

#[test]
fn every_manifest_parses_and_every_container_runs_the_real_flag_parsers() {
    let docs = documents();
    let all = containers(&docs);
    let servers: Vec<&Container> = all.iter().filter(|c| c.binary == "tether-server").collect();
    let agents: Vec<&Container> = all.iter().filter(|c| c.binary == "tether-agent").collect();
    assert!(
        servers.len() >= 2 && agents.len() == 1,
        "a server per frontend, one agent"
    );
    for c in &servers {
        let a = server_args(c);
        assert!(a.notices().is_empty(), "{}: {:?}", c.file, a.notices());
        tether_server::parse_strategies(&a.proxy_strategies).unwrap();
        tether_ops::lease::parse_labels(&a.lease_label).unwrap();
        let files = [
            Some(&a.cluster_cert),
            Some(&a.cluster_key),
            a.cluster_ca_cert.as_ref(),
            a.server_cert.as_ref(),
            a.server_key.as_ref(),
            a.server_ca_cert.as_ref(),
            a.kubeconfig.as_ref(),
            a.agent_tokens_file.as_ref(),
            a.uds_name.as_ref(),
        ];
        for f in files.into_iter().flatten() {
            mounted(c, f, false);
        }
        // The probes reach the health port where it listens.
        assert!(!c.probes.is_empty(), "{}: probes", c.file);
        for (host, port) in &c.probes {
            assert_eq!(*port, u64::from(a.health_port), "{}", c.file);
            assert_eq!(host, &a.health_bind_address.to_string(), "{}", c.file);
        }
    }
    for c in &agents {
        let a = agent_args(c);
        assert!(a.notices().is_empty(), "{}: {:?}", c.file, a.notices());
        tether_ops::cli::parse_identifiers(&a.agent_identifiers).unwrap();
        tether_agent::Allowlist::parse(&a.allowed_destinations).unwrap();
        for f in [
            Some(&a.ca_cert),
            a.agent_cert.as_ref(),
            a.agent_key.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            mounted(c, f, true);
        }
        let token = a.service_account_token_path.as_ref().expect("a token");
        mounted(c, token, false);
        assert!(!c.probes.is_empty(), "{}: probes", c.file);
        for (_, port) in &c.probes {
            assert_eq!(*port, u64::from(a.health_server_port), "{}", c.file);
        }
    }
}

#[test]
fn the_server_the_agent_the_egress_configuration_and_the_rbac_agree() {
    let docs = documents();
    let all = containers(&docs);
    let agent_c = all.iter().find(|c| c.binary == "tether-agent").unwrap();
    let agent = agent_args(agent_c);
    let egress = |file: &str| {
        docs.iter()
            .find(|(f, d)| f == file && s(&d["kind"]) == "EgressSelectorConfiguration")
            .map(|(_, d)| d["egressSelections"][0]["connection"].clone())
            .unwrap()
    };
    for c in all.iter().filter(|c| c.binary == "tether-server") {
        let server = server_args(c);
        // kube-apiserver and the server meet at the same socket, or the same TCP port.
        match &server.uds_name {
            Some(uds) => {
                // --mode picks the egress file: the protocol kube-apiserver speaks on the socket.
                let (file, protocol) = match server.mode.as_str() {
                    "grpc" => ("egress-selector-configuration-grpc.yaml", "GRPC"),
                    _ => ("egress-selector-configuration.yaml", "HTTPConnect"),
                };
                let e = egress(file);
                assert_eq!(s(&e["proxyProtocol"]), protocol, "{}", c.file);
                assert_eq!(s(&e["transport"]["uds"]["udsName"]), uds.to_str().unwrap());
            }
            None => {
                let e = egress("egress-selector-configuration-tcp-mtls.yaml");
                assert_eq!(s(&e["proxyProtocol"]), "HTTPConnect");
                let url = s(&e["transport"]["tcp"]["url"]);
                assert_eq!(
                    url.rsplit(':').next().unwrap().parse::<u16>().unwrap(),
                    server.server_port.unwrap(),
                    "{url}"
                );
                assert!(url.starts_with("https://"), "the TCP frontend is TLS");
                assert!(server.server_ca_cert.is_some(), "and mutual");
                for k in ["caBundle", "clientKey", "clientCert"] {
                    assert!(!s(&e["transport"]["tcp"]["tlsConfig"][k]).is_empty(), "{k}");
                }
            }
        }
        // The agent dials the agent port, and its token is the one the server reviews.
        assert_eq!(agent.proxy_server_port, server.agent_port, "{}", c.file);
        let pod = &agent_c.pod;
        let (ns, sa) = (
            server.agent_namespace.clone().unwrap(),
            server.agent_service_account.clone().unwrap(),
        );
        assert_eq!(s(&pod["serviceAccountName"]), sa);
        let daemonset = docs
            .iter()
            .find(|(_, d)| s(&d["kind"]) == "DaemonSet")
            .map(|(_, d)| d)
            .unwrap();
        assert_eq!(s(&daemonset["metadata"]["namespace"]), ns);
        let projected = pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .flat_map(|v| {
                v["projected"]["sources"]
                    .as_sequence()
                    .cloned()
                    .unwrap_or_default()
            })
            .find_map(|src| {
                let t = &src["serviceAccountToken"];
                t.is_mapping()
                    .then(|| (s(&t["path"]).to_owned(), s(&t["audience"]).to_owned()))
            })
            .expect("a projected service-account token");
        assert_eq!(
            Some(projected.1.as_str()),
            server.authentication_audience.as_deref()
        );
        let token = agent.service_account_token_path.clone().unwrap();
        assert_eq!(token.file_name().unwrap().to_str().unwrap(), projected.0);
        // The agent counts the leases the server holds.
        if agent.count_server_leases {
            assert!(server.enable_lease_controller, "{}", c.file);
            assert_eq!(agent.lease_namespace, server.lease_namespace);
            assert_eq!(
                tether_ops::lease::parse_labels(&agent.lease_label_selector).unwrap(),
                tether_ops::lease::parse_labels(&server.lease_label).unwrap()
            );
        }
        // RBAC: the agent's service account exists; the server may review tokens and keep
        // leases.
        let has = |kind: &str, name: &str| {
            docs.iter()
                .any(|(_, d)| s(&d["kind"]) == kind && s(&d["metadata"]["name"]) == name)
        };
        assert!(has("ServiceAccount", &sa));
        let auth_delegator = docs.iter().any(|(_, d)| {
            s(&d["kind"]) == "ClusterRoleBinding"
                && s(&d["roleRef"]["name"]) == "system:auth-delegator"
        });
        assert!(auth_delegator, "the server may create TokenReviews");
        let lease_verbs: Vec<String> = docs
            .iter()
            .filter(|(_, d)| s(&d["kind"]) == "Role")
            .flat_map(|(_, d)| d["rules"].as_sequence().cloned().unwrap_or_default())
            .filter(|r| {
                r["resources"]
                    .as_sequence()
                    .is_some_and(|x| x.iter().any(|v| s(v) == "leases"))
            })
            .flat_map(|r| r["verbs"].as_sequence().cloned().unwrap_or_default())
            .map(|v| s(&v).to_owned())
            .collect();
        for verb in ["get", "list", "create", "update", "delete"] {
            assert!(lease_verbs.iter().any(|v| v == verb), "leases: {verb}");
        }
        // Node address rules read Node objects: a ClusterRole granting `get` on nodes is
        // bound to the user the server's kubeconfig names.
        if server.address_identifiers == tether_server::AddressClaims::Node {
            assert!(
                server.agent_namespace.is_some(),
                "node rules need token reviews"
            );
            let roles_with_nodes: Vec<&str> = docs
                .iter()
                .filter(|(_, d)| s(&d["kind"]) == "ClusterRole")
                .filter(|(_, d)| {
                    d["rules"].as_sequence().into_iter().flatten().any(|r| {
                        r["resources"]
                            .as_sequence()
                            .is_some_and(|x| x.iter().any(|v| s(v) == "nodes"))
                            && r["verbs"]
                                .as_sequence()
                                .is_some_and(|x| x.iter().any(|v| s(v) == "get"))
                    })
                })
                .map(|(_, d)| s(&d["metadata"]["name"]))
                .collect();
            let bound = docs.iter().any(|(_, d)| {
                s(&d["kind"]) == "ClusterRoleBinding"
                    && roles_with_nodes.contains(&s(&d["roleRef"]["name"]))
                    && d["subjects"].as_sequence().into_iter().flatten().any(|x| {
                        s(&x["kind"]) == "User" && s(&x["name"]) == "system:konnectivity-server"
                    })
            });
            assert!(bound, "the server's user may get nodes");
        }
    }
    // The kustomization names files that exist.
    let k: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(deploy_dir().join("kustomization.yaml")).unwrap(),
    )
    .unwrap();
    for r in k["resources"].as_sequence().unwrap() {
        assert!(deploy_dir().join(s(r)).is_file(), "{r:?}");
    }
}
