//! The primary: runs the guest and protects it by streaming checkpoints to a
//! secondary.
//!
//! - [`run`](run()): the whole life of a protected guest (connect,
//!   synchronise, checkpoint every epoch, run on unprotected and reconnect
//!   when the secondary is lost), the entry point mirroring
//!   `understudy_secondary::serve`; the CLI and the benchmarks call it.
//! - **Initial synchronisation** (epoch 0), by iterative pre-copy while the
//!   guest runs: all non-zero memory, then the pages dirtied meanwhile, round
//!   after round until few remain; then one short pause for the rest and the
//!   vCPU/VM state.
//! - **Continuous checkpointing**: every epoch the vCPUs are paused, the dirty
//!   set harvested, the dirty pages and the state copied into a staging
//!   batch, and the guest resumed at once. Encoding, sending and awaiting the
//!   acknowledgement happen on other threads, off the guest's critical path;
//!   a bounded queue of two checkpoints between them applies backpressure
//!   when the link cannot keep up (the epoch then lengthens, and the metrics
//!   show it).
//! - **Adaptive epochs** ([`EpochPolicy`]): shorter while pauses exceed
//!   their budget, back to the target when they fall well under it.
//! - **Heartbeats** go out on the connection whenever nothing else was sent
//!   for an interval, and as UDP datagrams beside it; the secondary is
//!   declared lost after the configured number of silent intervals, and the
//!   guest keeps running, unprotected, loudly reported.
//! - [`migrate`]: live migration over the same connection and epoch 0,
//!   committed by `Handover`: a migration that fails before it leaves the
//!   guest running here.
//! - **Planned switchover** ([`Controls::request_switchover`]): a last
//!   checkpoint with the guest paused for good, acknowledged, then
//!   `Handover`; [`run`] returns [`RunEnd::HandedOver`] with the tag of the
//!   image this side keeps (the paused VM), and the caller serves as the
//!   secondary. The new primary names that image ([`RunOptions::base_image`])
//!   and its first synchronisation sends only the pages written since.
//! - **Live control** ([`Controls`]): epoch settings changed at the next
//!   checkpoint, a codec by a new connection, an interrupt that hands the
//!   running guest back to the caller (a migration asked for).
//! - [`output`]: output commit: the guest's network frames are held until
//!   the secondary acknowledged the epoch that produced them.
//! - **COLO mode** ([`ColoOptions`], [`colo`]): the secondary runs its copy
//!   of the guest, fed the primary's input; output is released as soon as
//!   both copies sent the same, and a checkpoint is taken only on a
//!   mismatch, a compare timeout, or the periodic interval.
//! - [`trace`]: the same capture of dirty pages, written to a trace file.
//!
//! Files, one concern each: `policy` (epoch lengths and waits), `shared`
//! (state the threads share), `protection` (one connection and its
//! threads), `sender` (encode and send), `acks` (acknowledgements), `pages`
//! (reading guest pages), `run` (the protect/reconnect loop).
//!
//! Failure model: a secondary that goes silent, closes, refuses or sends
//! nonsense is *lost*: the guest runs on unprotected, its held output is
//! released (see [`output`]), and a new secondary is synchronised from
//! scratch when one answers. A guest that stops ends the run. The primary's
//! own crash is the secondary's business (it takes over from the last
//! acknowledged epoch).

mod acks;
pub mod colo;
mod fence;
pub mod migrate;
pub mod output;
mod pages;
mod policy;
mod protection;
mod run;
mod sender;
mod shared;
pub mod trace;

use std::net::SocketAddr;
use std::time::Duration;

use understudy_checkpoint::channel::{ChannelError, Security};
use understudy_checkpoint::heartbeat::HeartbeatPolicy;
use understudy_checkpoint::protocol::ProtocolError;
use understudy_compress::{CodecError, CodecSpec};
use understudy_vm::VmError;
use understudy_vm::memory::MemoryError;
use understudy_vm::progress::ProgressSample;

pub use fence::FenceError;
pub use pages::{read_nonzero_pages, read_pages};
pub use policy::EpochPolicy;
pub use run::{ColoOptions, Controls, Retune, RunEnd, RunOptions, run};

/// A primary that cannot go on protecting.
#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    /// The secondary could not be reached.
    #[error("cannot connect to the secondary at {address}")]
    Connect {
        /// Its address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The secure channel could not be opened.
    #[error("cannot open a secure channel to the secondary at {address}")]
    Channel {
        /// Its address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: ChannelError,
    },
    /// The secondary refused us.
    #[error("the secondary refused this primary: {0}")]
    Refused(String),
    /// The protocol failed.
    #[error("replication protocol failure")]
    Protocol(#[from] ProtocolError),
    /// The VM failed.
    #[error("the VM failed")]
    Vm(#[from] VmError),
    /// Guest memory could not be read.
    #[error("guest memory could not be read")]
    Memory(#[from] MemoryError),
    /// The codec failed.
    #[error("the checkpoint codec failed")]
    Codec(#[from] CodecError),
    /// The secondary was lost (the guest runs on, unprotected).
    #[error("the secondary was lost: {0}")]
    SecondaryLost(String),
    /// The connection must start again (a new codec): not a failure.
    #[error("protection restarts: {0}")]
    Resynchronise(String),
    /// The witness does not let this copy run the guest.
    #[error("fenced")]
    Fenced(#[from] FenceError),
}

/// Who a connection speaks for: the VM, the process that runs it, and the
/// fencing generation the pair will be in sync at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The VM, across reconnections.
    pub vm_id: u64,
    /// This process (the witness record's owner).
    pub owner: u64,
    /// The witness generation (0 without a witness).
    pub generation: u64,
}

/// How the primary protects its guest.
#[derive(Clone, Debug)]
pub struct PrimaryOptions {
    /// The secondary's address.
    pub secondary: SocketAddr,
    /// Time between checkpoints, and how it adapts.
    pub epoch: EpochPolicy,
    /// Page codec.
    pub codec: CodecSpec,
    /// Heartbeats.
    pub heartbeat: HeartbeatPolicy,
    /// Compute the memory hash at every checkpoint (during the pause) and
    /// have the secondary check it: for tests and audits.
    pub verify: bool,
    /// Most pre-copy rounds before the final pause of epoch 0.
    pub precopy_rounds: u32,
    /// Most bytes per second put on the wire (page frames), if limited.
    pub max_bandwidth: Option<f64>,
    /// How the connection is authenticated and encrypted.
    pub security: Security,
}

/// One checkpoint, as it went.
#[derive(Clone, Debug)]
pub struct EpochMetrics {
    /// Epoch number.
    pub epoch: u64,
    /// Time since the previous checkpoint.
    pub epoch_length: Duration,
    /// How long the guest was paused.
    pub pause: Duration,
    /// Where the pause went.
    pub phases: CheckpointPhases,
    /// Dirty pages in the checkpoint.
    pub dirty_pages: usize,
    /// Bytes of page contents.
    pub raw_bytes: u64,
    /// Dirty pages not sent because the guest reported them free.
    pub free_pages: usize,
    /// Bytes on the wire (frames and state).
    pub wire_bytes: u64,
    /// Time spent encoding.
    pub encode: Duration,
    /// Time spent writing to the socket.
    pub send: Duration,
    /// Memory hash at the checkpoint (with `verify`).
    pub memory_hash: Option<u64>,
    /// The guest's progress (every vCPU's status slot) at the checkpoint.
    pub progress: ProgressSample,
    /// Why it was taken: `initial` (epoch 0), `epoch` (Remus: the epoch's
    /// end or output waiting), or in COLO mode `periodic` or the compare
    /// proxy's cause (`mismatch-tcp-payload`, `timeout`, …).
    pub cause: &'static str,
}

/// Where a checkpoint's pause went, phase by phase (they add up to the
/// pause, give or take the timer reads).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckpointPhases {
    /// Stopping the vCPUs (kick, wait until each is out of the guest).
    pub stop: Duration,
    /// Reading and clearing the dirty log (KVM's and the VMM's).
    pub harvest: Duration,
    /// Copying the dirty pages out of guest memory.
    pub copy: Duration,
    /// Capturing and encoding the vCPU and device state.
    pub state: Duration,
    /// The output gate, the memory hash (with `verify`), the progress slots.
    pub other: Duration,
    /// Letting the vCPUs run again.
    pub resume: Duration,
}

/// What the primary reports.
#[derive(Clone, Debug)]
pub enum PrimaryEvent {
    /// A checkpoint was taken; reported before any of it is sent, so a
    /// record of what an epoch holds always precedes its acknowledgement.
    Checkpointed(EpochMetrics),
    /// Epoch 0 was sent and acknowledged.
    Synchronised {
        /// Pre-copy rounds.
        rounds: u32,
        /// Pages sent in all.
        pages: u64,
        /// Pause of the final round.
        pause: Duration,
        /// From start to acknowledgement.
        total: Duration,
    },
    /// A checkpoint was sent.
    Sent(EpochMetrics),
    /// The secondary acknowledged an epoch.
    Acknowledged {
        /// The epoch.
        epoch: u64,
        /// From the end of its pause to its acknowledgement.
        latency: Duration,
    },
    /// The secondary was lost: the guest runs on unprotected, and the
    /// secondary's address is tried again every second.
    SecondaryLost {
        /// Why.
        reason: String,
    },
    /// The witness recorded a state of this VM.
    Witness {
        /// `in_sync` or `solo`.
        state: &'static str,
        /// The generation written.
        generation: u64,
    },
    /// The witness could not decide; the primary waits (output held).
    WitnessWaiting {
        /// Why.
        reason: String,
    },
}
