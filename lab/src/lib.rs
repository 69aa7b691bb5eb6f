//! The lab: hosts made of network namespaces on one machine, processes
//! started in them, a RESP client, and what is built from them: the failover
//! drill (`understudy drill`, `understudy demo`), the key-value benchmark
//! (`understudy bench kv`) and the integration tests' networks. The CLI
//! parses arguments and prints; everything that runs lives here.
//!
//! Needs root, iproute2 (`ip`) and `/dev/net/tun`; `redis-benchmark` only
//! for what names it. A missing tool is an error naming its package.

pub mod drill;
pub mod etcd;
pub mod kvbench;
pub mod network;
pub mod resp;
pub mod tools;
