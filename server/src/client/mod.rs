//! Clients in kube-apiserver's two dialects, for tests, examples, benchmarks and load tools:
//! HTTP CONNECT ([`connect`]) and Konnectivity's gRPC ProxyService ([`grpc`]).

pub mod connect;
pub mod grpc;
