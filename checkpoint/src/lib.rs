//! Checkpoint formats: how a VM's state and memory leave the process.
//!
//! - [`snapshot`]: a paused VM in one checksummed file (`understudy snapshot`
//!   and `restore`).
//! - [`protocol`]: the replication protocol (epochs of dirty pages streamed
//!   to a secondary): framing, messages, the receiver's state machine.
//! - [`link`]: one replication connection: senders shared between threads,
//!   liveness on receive, heartbeat messages.
//! - [`heartbeat`]: heartbeats over UDP beside the connection.

pub mod channel;
pub mod heartbeat;
pub mod link;
pub mod protocol;
pub mod snapshot;
pub mod witness;
