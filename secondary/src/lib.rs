//! The secondary: accepts a primary, holds the backup VM (its memory and the
//! last committed vCPU/VM state), applies each epoch atomically and
//! acknowledges it, and resumes the guest when the primary is lost.
//!
//! Per connection:
//!
//! - `Hello` is checked against this build (protocol version, guest image);
//!   the backup VM is created with the primary's memory size and vCPUs.
//! - Epoch 0 (the initial copy) is written into the backup memory as it
//!   arrives: until it commits there is nothing to fail over to.
//! - Every later epoch is staged (decoded pages, state) and applied only on
//!   its `EpochEnd`; a torn epoch is dropped. Then `Ack`.
//! - A malformed, corrupted, replayed or out-of-order message closes the
//!   connection with `Goodbye` and changes nothing: the primary is alive
//!   but cannot be trusted, so this is no reason to take over.
//! - A migration (`Hello` with purpose `Migrate`) ends with epoch 0: once
//!   it is applied and acknowledged, the guest is resumed here.
//! - Silence (neither bytes nor UDP heartbeats for the heartbeat timeout),
//!   a primary that is heard but commits no epoch for the progress
//!   deadline, or a connection that breaks without `Goodbye` means the
//!   primary is lost: if *this connection* committed an epoch, the backup
//!   VM is resumed from it. A connection that ends with `Goodbye` or a
//!   protocol error, that never sent `Hello`, or that committed nothing,
//!   never leads to a takeover: each connection has a fresh backup of its
//!   own, so state committed by an earlier connection (of a primary that
//!   may have run on unprotected since) is never resumed.
//!
//! The listening address serves TCP (the connection) and UDP (heartbeats).
//!
//! Files: `connection` (one primary's connection: the receive loop and the
//! Hello checks), `backup` (the backup VM, staging, commit and takeover).
//!
//! A guest with a network interface gets its own on takeover: a virtio-net
//! device restored from the checkpoint, on this host's tap, and a gratuitous
//! ARP on the guest's behalf so switches and neighbours send its traffic
//! here. Its TCP connections go on: whatever the client did not see
//! acknowledged it sends again.

mod backup;
mod connection;
mod fence;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use understudy_checkpoint::heartbeat::HeartbeatPolicy;
use understudy_checkpoint::protocol::{Hello, ProtocolError};
use understudy_compress::CodecError;
use understudy_vm::memory::MemoryError;
use understudy_vm::progress::ProgressSample;
use understudy_vm::state::StateError;
use understudy_vm::tap::{Tap, TapError};
use understudy_vm::{Vm, VmError};

use backup::Backup;
use connection::{Ended, serve_connection};
use fence::{SyncedWith, Verdict, may_take_over};
use understudy_checkpoint::witness::Witness;

/// A secondary that cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum SecondaryError {
    /// The listening socket failed.
    #[error("cannot listen on {address}")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The backup VM failed.
    #[error("the backup VM failed")]
    Vm(#[from] VmError),
    /// Backup memory could not be written or read.
    #[error("the backup memory failed")]
    Memory(#[from] MemoryError),
    /// The tap for the guest's network could not be opened.
    #[error("cannot open the guest's tap")]
    Tap(#[from] TapError),
}

/// Why one connection ended (the secondary goes on either way).
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The protocol was violated.
    #[error("protocol violation")]
    Protocol(#[from] ProtocolError),
    /// A page frame did not decode.
    #[error("a page frame of epoch {epoch} is invalid")]
    Pages {
        /// The epoch.
        epoch: u64,
        /// Why.
        #[source]
        source: CodecError,
    },
    /// A state did not decode or does not fit.
    #[error("the VM state of epoch {epoch} is invalid")]
    State {
        /// The epoch.
        epoch: u64,
        /// Why.
        #[source]
        source: StateError,
    },
    /// The primary was heard but committed no epoch for too long.
    #[error("the primary committed no epoch for {0:?} although it was heard")]
    NoProgress(Duration),
    /// An epoch ended without its state.
    #[error("epoch {0} ended without its VM state")]
    MissingState(u64),
    /// A message other than `Hello` came first.
    #[error("the primary sent {0} before Hello")]
    BeforeHello(&'static str),
    /// The state describes another VM shape.
    #[error("the VM state of epoch {0} does not match the backup VM's shape")]
    StateShape(u64),
    /// The pages the epoch announced are not the pages that came.
    #[error("epoch {epoch} announced {announced} pages but carried {received}")]
    PageCount {
        /// The epoch.
        epoch: u64,
        /// Announced in `EpochEnd`.
        announced: u64,
        /// Received.
        received: u64,
    },
    /// The memory hash after applying differs from the primary's.
    #[error(
        "after epoch {epoch} the backup memory hash is {actual:#x}, the primary's was {expected:#x}"
    )]
    MemoryHash {
        /// The epoch.
        epoch: u64,
        /// The primary's hash.
        expected: u64,
        /// Ours.
        actual: u64,
    },
    /// The backup VM or memory failed.
    #[error("the backup failed")]
    Secondary(#[from] SecondaryError),
}

/// What the secondary reports as it goes.
#[derive(Debug)]
pub enum SecondaryEvent {
    /// The listening sockets are bound: primaries can connect.
    Listening {
        /// The address.
        address: SocketAddr,
    },
    /// A primary connected and was accepted.
    Connected {
        /// Its address.
        peer: SocketAddr,
        /// What it asked for.
        hello: Hello,
    },
    /// An epoch was applied and acknowledged.
    Committed {
        /// The epoch.
        epoch: u64,
        /// Pages applied.
        pages: u64,
        /// Time from `EpochBegin` to the acknowledgement.
        receive: Duration,
    },
    /// A connection ended without failover.
    Disconnected {
        /// Why.
        reason: String,
    },
    /// The witness could not decide whether this side may take over; the
    /// guest stays paused while it is asked again.
    WitnessWaiting {
        /// Why.
        reason: String,
    },
}

/// A guest resumed after its primary was lost.
pub struct Failover {
    /// The resumed VM (running).
    pub vm: Vm,
    /// The epoch it resumed from.
    pub epoch: u64,
    /// Memory hash of the backup at that epoch, before the guest ran (with
    /// `verify`: hashing a large memory delays the takeover).
    pub memory_hash: Option<u64>,
    /// The guest's per-vCPU status as of that epoch (counters), read before
    /// it ran again.
    pub progress: ProgressSample,
    /// From the last bytes heard from the primary to the guest running.
    pub since_last_heartbeat: Duration,
    /// Why the primary was declared lost.
    pub reason: String,
    /// Whether this was a migration's switchover rather than a failover.
    pub migrated: bool,
    /// Received frames of uncommitted epochs replayed into the guest.
    pub replayed_frames: usize,
}

/// How the secondary runs.
#[derive(Clone, Debug)]
pub struct SecondaryOptions {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Heartbeats.
    pub heartbeat: HeartbeatPolicy,
    /// Hash the backup memory before resuming it (reported in [`Failover`]).
    pub verify: bool,
    /// The tap a resumed guest's network interface uses (none: a guest
    /// with a network resumes unreachable, which is reported).
    pub tap: Option<String>,
    /// Fault injection for tests and drills: wait this long before each
    /// acknowledgement after epoch 0's (a slow secondary).
    pub ack_delay: Duration,
    /// The witness, if fencing is on: a takeover must win its test-and-set
    /// first. Without it, a lost primary is assumed dead (crash-stop).
    pub witness: Option<Witness>,
    /// This process, as the witness knows it.
    pub instance: u64,
}

/// Serves primaries until one is lost after committing an epoch; then
/// resumes its guest and returns it.
pub fn serve(
    options: SecondaryOptions,
    stop: &AtomicBool,
    mut report: impl FnMut(&SecondaryEvent),
) -> Result<Option<Failover>, SecondaryError> {
    let listener = TcpListener::bind(options.listen).map_err(|source| SecondaryError::Listen {
        address: options.listen,
        source,
    })?;
    let udp = UdpSocket::bind(options.listen).map_err(|source| SecondaryError::Listen {
        address: options.listen,
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| SecondaryError::Listen {
            address: options.listen,
            source,
        })?;
    // Opened now, so a bad name fails before any primary is accepted.
    let tap = options
        .tap
        .as_deref()
        .map(Tap::open)
        .transpose()?
        .map(Arc::new);
    report(&SecondaryEvent::Listening {
        address: options.listen,
    });
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(source) => {
                return Err(SecondaryError::Listen {
                    address: options.listen,
                    source,
                });
            }
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_nodelay(true);
        // Each connection has a backup of its own, made from its Hello:
        // state committed by an earlier connection is never resumed (that
        // primary may have run on unprotected since).
        let mut backup: Option<Backup> = None;
        match serve_connection(stream, peer, &udp, &options, &mut backup, &mut report) {
            Ok(Ended::Lost { last_heard, reason }) => {
                if let (Some(witness), Some(synced)) = (&options.witness, in_sync(&backup))
                    && let Verdict::Stale(why) =
                        may_take_over(witness, synced, options.instance, stop, &mut report)
                {
                    report(&SecondaryEvent::Disconnected { reason: why });
                    continue;
                }
                if let Some(failover) = take_over(
                    &mut backup,
                    last_heard,
                    reason,
                    options.verify,
                    tap.as_ref(),
                )? {
                    return Ok(Some(failover));
                }
                report(&SecondaryEvent::Disconnected {
                    reason: "the connection was lost before it committed an epoch: nothing of it to resume"
                        .to_owned(),
                });
            }
            Ok(Ended::MigratedIn) => {
                let mut arrived = take_over(
                    &mut backup,
                    Instant::now(),
                    "migrated in".to_owned(),
                    options.verify,
                    tap.as_ref(),
                )?;
                if let Some(arrived) = &mut arrived {
                    arrived.migrated = true;
                }
                return Ok(arrived);
            }
            Ok(Ended::Closed(reason)) => report(&SecondaryEvent::Disconnected { reason }),
            Err(error) => {
                let reason = format!("{:#}", anyhow_chain(&error));
                tracing::warn!(%peer, %reason, "connection refused");
                report(&SecondaryEvent::Disconnected { reason });
            }
        }
    }
    Ok(None)
}

/// The error and its causes on one line.
pub(crate) fn anyhow_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The primary a backup with a committed epoch was in sync with.
fn in_sync(slot: &Option<Backup>) -> Option<SyncedWith> {
    slot.as_ref()
        .filter(|backup| backup.committed_epoch().is_some())
        .map(Backup::synced_with)
}

/// Resumes the backup in `slot` from its last committed epoch, if it has one.
fn take_over(
    slot: &mut Option<Backup>,
    last_heard: Instant,
    reason: String,
    verify: bool,
    tap: Option<&Arc<Tap>>,
) -> Result<Option<Failover>, SecondaryError> {
    let Some(backup) = slot.take() else {
        return Ok(None);
    };
    match backup.take_over(last_heard, reason, verify, tap)? {
        Ok(failover) => Ok(Some(failover)),
        Err(backup) => {
            *slot = Some(backup);
            Ok(None)
        }
    }
}
