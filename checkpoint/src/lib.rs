//! Checkpoint formats: how a VM's state and memory leave the process.
//!
//! - [`snapshot`]: a paused VM in one checksummed file (`understudy snapshot`
//!   and `restore`). The replication protocol (epochs of dirty pages streamed
//!   to a secondary) will live beside it.

pub mod snapshot;
