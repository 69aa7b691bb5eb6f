//! The secondary: accepts a primary, holds the backup VM (its memory and the
//! last committed vCPU/VM state), applies each epoch atomically and
//! acknowledges it, and resumes the guest when the primary is lost.
//!
//! Per connection:
//!
//! - Connections are accepted concurrently: each gets a `greeter` thread
//!   that runs the channel handshake ([`understudy_checkpoint::channel`]:
//!   the peer must prove a key this secondary lists) and reads `Hello`,
//!   within [`HANDSHAKE_DEADLINE`] and with a payload bound of a `Hello`.
//!   Nothing is created before; a peer that stalls is dropped at the
//!   deadline, so a squatter cannot keep the real primary out. Greeted
//!   connections are then served one at a time.
//! - `Hello` is checked against this build (protocol version, guest image,
//!   a version store no larger than the guest, heartbeat settings that
//!   work with ours); the backup VM is created with the primary's memory
//!   size and vCPUs.
//! - Epoch 0 (the initial copy) is written into the backup memory as it
//!   arrives: until it commits there is nothing to fail over to.
//! - Every later epoch is staged (decoded pages, each at most once, page
//!   numbers inside guest memory, output within its budget) and applied
//!   only on its `EpochEnd`, once everything about it checked out (the
//!   memory hash too, computed before memory changes); a torn or invalid
//!   epoch is dropped whole. Then `Ack`.
//! - A malformed, corrupted, replayed or out-of-order message closes the
//!   connection with `Goodbye` and changes nothing: the primary is alive
//!   but cannot be trusted, so this is no reason to take over.
//! - A migration (`Hello` with purpose `Migrate`) ends with epoch 0 and a
//!   commit: once epoch 0 is applied and acknowledged, the guest is resumed
//!   here only on the source's `Handover` (answered `TookOver`). A source
//!   that vanishes before it never has its guest resumed here: it runs it.
//! - A planned switchover (`Handover` on a `Replicate` connection, after
//!   the primary's last checkpoint was acknowledged): the guest is resumed
//!   here from that epoch (through the witness when fencing is on) and the
//!   caller protects it by the old primary at the address the handover
//!   names ([`Failover::protect_to`]).
//! - A kept image ([`KeptImage`], [`serve_with`]): the paused VM of a guest
//!   that left this host (a migration with `--keep-image`, or a switchover's
//!   old primary), its writes counted since. A `Hello` naming its tag, of
//!   the same VM and shape, while it is unchanged, gets `BaseImage {tag}`
//!   and the VM itself as the backup: epoch 0 then brings only the pages
//!   changed since. Anything else (another tag: the guest went elsewhere
//!   since; a changed or expired image) gets `BaseImage {0}` and a fresh
//!   backup, copied whole.
//! - COLO (`Hello` with purpose `Colo`, served only with
//!   [`SecondaryOptions::colo`]): from epoch 0's commit on, the backup VM
//!   *runs*, fed the primary's input, its output sent back for comparison;
//!   each epoch is loaded into it; a takeover lets it run on (see `colo`).
//! - Silence (neither bytes nor UDP heartbeats for the heartbeat timeout),
//!   a primary that is heard but commits no epoch for the progress
//!   deadline beyond the checkpoint interval its `Hello` announced, or a
//!   connection that breaks without `Goodbye` means the
//!   primary is lost: if *this connection* committed an epoch, the backup
//!   VM is resumed from it. A connection that ends with `Goodbye` or a
//!   protocol error, that never sent `Hello`, or that committed nothing,
//!   never leads to a takeover: each connection has a fresh backup of its
//!   own, so state committed by an earlier connection (of a primary that
//!   may have run on unprotected since) is never resumed.
//!
//! The listening address serves TCP (the connection) and UDP (heartbeats,
//! MACed with keys from the handshake).
//!
//! A stop request (SIGTERM) ends a served connection with `Goodbye` (no
//! takeover). A takeover that fails saves the committed checkpoint as a
//! snapshot in [`SecondaryOptions::rescue_dir`] and reports where.
//!
//! Files: `connection` (one primary's connection: the receive loop and the
//! Hello checks), `backup` (the backup VM, staging, commit and takeover),
//! `colo` (COLO mode: the backup VM runs in lockstep, fed the primary's
//! input, its output compared on the primary; a takeover lets it run on).
//!
//! A guest with a network interface gets its own on takeover: a virtio-net
//! device restored from the checkpoint, on this host's tap, and a gratuitous
//! ARP on the guest's behalf so switches and neighbours send its traffic
//! here. Its TCP connections go on: whatever the client did not see
//! acknowledged it sends again.

mod backup;
mod colo;
mod connection;
mod fence;
mod postcopy;
pub mod store;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use understudy_checkpoint::heartbeat::HeartbeatPolicy;
use understudy_checkpoint::protocol::{Hello, ProtocolError};
use understudy_compress::CodecError;
use understudy_vm::memory::MemoryError;
use understudy_vm::progress::ProgressSample;
use understudy_vm::state::StateError;
use understudy_vm::tap::{Tap, TapError};
use understudy_vm::virtio_net::FrameSink;
use understudy_vm::{Vm, VmError};

use backup::Backup;
pub use backup::{MAX_OUTPUT_BYTES_PER_EPOCH, Staging};
use connection::{Ended, Endpoints, Greeted, greet, serve_connection};
use fence::{SyncedWith, Verdict, may_take_over};
use understudy_checkpoint::channel::{ChannelError, HANDSHAKE_DEADLINE, Security};
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
    /// A page outside guest memory.
    #[error("page {0} is outside guest memory")]
    PageOutOfRange(u64),
    /// The store (a storage-backed secondary) failed.
    #[error("the backup's store failed")]
    Store(#[from] store::StoreError),
    /// A stored state does not decode.
    #[error("the stored VM state is invalid")]
    StoredState(#[source] StateError),
    /// The guest's memory could not be backed by the store lazily.
    #[error("the guest's memory could not be served from the store")]
    LazyMemory(#[from] understudy_vm::postcopy::PostcopyError),
    /// The takeover failed; the committed checkpoint was saved (or not).
    #[error("{}", takeover_failed_message(saved))]
    TakeoverFailed {
        /// Why the guest could not be resumed.
        #[source]
        source: Box<SecondaryError>,
        /// Where the committed checkpoint was saved (`understudy restore`
        /// resumes it), or why it could not be.
        saved: Result<std::path::PathBuf, String>,
    },
}

fn takeover_failed_message(saved: &Result<std::path::PathBuf, String>) -> String {
    match saved {
        Ok(path) => format!(
            "the takeover failed; the guest's last committed checkpoint was saved to {} (resume it with `understudy restore {}`)",
            path.display(),
            path.display()
        ),
        Err(why) => format!(
            "the takeover failed, and saving the guest's last committed checkpoint failed too ({why})"
        ),
    }
}

/// Why one connection ended (the secondary goes on either way).
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The protocol was violated.
    #[error("protocol violation")]
    Protocol(#[from] ProtocolError),
    /// The secure channel could not be opened (the peer is not trusted).
    #[error("the channel handshake failed")]
    Channel(#[from] ChannelError),
    /// A page number outside guest memory.
    #[error("epoch {epoch} carries page {page_number}, outside guest memory")]
    PageOutOfRange {
        /// The epoch.
        epoch: u64,
        /// The page.
        page_number: u64,
    },
    /// A page sent twice in one epoch.
    #[error("epoch {epoch} carries page {page_number} twice")]
    DuplicatePage {
        /// The epoch.
        epoch: u64,
        /// The page.
        page_number: u64,
    },
    /// More guest output than an epoch may hold.
    #[error("epoch {0} carries more guest output than an epoch may hold")]
    OutputTooLarge(u64),
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
    /// The peer sent no `Hello` (closed, or missed the deadline).
    #[error("no Hello: {0}")]
    NoHello(String),
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
    /// Post-copy memory failed.
    #[error("post-copy memory failed")]
    PostcopyMemory(#[from] understudy_vm::postcopy::PostcopyError),
    /// A post-copy broke before every page arrived: the guest could not go
    /// on here.
    #[error("the post-copy broke before every page arrived; the guest was stopped here: {0}")]
    Postcopy(String),
    /// A page differs from the source's after a verified post-copy.
    #[error(
        "after the post-copy, guest page {page_number} differs from the source's ({pages} pages checked before it); the guest was stopped here"
    )]
    PageDiffers {
        /// The first page that differs.
        page_number: u64,
        /// Pages that matched before it.
        pages: u64,
    },
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
    /// Every page of a post-copy is here.
    PostcopyComplete(PostcopyReport),
    /// The witness could not decide whether this side may take over; the
    /// guest stays paused while it is asked again.
    WitnessWaiting {
        /// Why.
        reason: String,
    },
}

/// How a post-copy went, on the target.
#[derive(Clone, Debug)]
pub struct PostcopyReport {
    /// Pages that arrived in the page epoch.
    pub pages: u64,
    /// Faults the guest (or the VMM) took on missing pages.
    pub faults: u64,
    /// Of them, resolved with a zero page.
    pub zero_pages: u64,
    /// Fault latency quantiles (upper bounds of log2 buckets), microseconds.
    pub fault_p50_us: Option<u64>,
    /// See `fault_p50_us`.
    pub fault_p99_us: Option<u64>,
    /// Connections that broke and were resumed.
    pub reconnections: u32,
    /// With `--verify` on the source: pages found equal to the source's
    /// (every page the guest did not write here since it resumed).
    pub verified_pages: Option<u64>,
    /// Pages the guest wrote here during the post-copy (not comparable).
    pub written_here: u64,
}

/// A guest resumed after its primary was lost.
pub struct Failover {
    /// The resumed VM (running).
    pub vm: Vm,
    /// The guest's VM id (it keeps it wherever it runs).
    pub vm_id: u64,
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
    /// A planned switchover: protect the guest by the old primary, which
    /// waits at this address and keeps an image of the guest with this tag
    /// (the first synchronisation sends only what changed since).
    pub protect_to: Option<(SocketAddr, u64)>,
    /// A migration whose source kept its image: the VM id and the image's
    /// tag. Migrating the guest back there sends only the pages written
    /// here since it arrived.
    pub source_image: Option<(u64, u64)>,
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
    /// How connections are authenticated and encrypted.
    pub security: Security,
    /// Where a takeover that fails saves the committed checkpoint.
    pub rescue_dir: std::path::PathBuf,
    /// Serve COLO primaries (the guest runs here in lockstep, holding its
    /// memory twice) rather than Remus ones; a primary of the other mode
    /// is refused. Migrations are accepted either way.
    pub colo: bool,
    /// How long a post-copy whose connection broke waits for its source to
    /// resume it before the guest is stopped here.
    pub postcopy_recovery: Duration,
    /// Storage-backed: keep each protected guest's memory in a store under
    /// this directory (one per VM id) instead of in memory (see
    /// [`store`]). Replication only; migrations and COLO stay in memory.
    pub store: Option<std::path::PathBuf>,
}

/// An image of a guest that migrated away from this host, kept so that a
/// return trip sends only the pages changed meanwhile (BFMig). The VM is
/// the one the guest ran in, paused; every write to its memory since the
/// handover is counted ([`Vm::mark_image`]), so a changed image is never
/// built on. Memory: the guest's own (nothing is copied); time: until
/// `until`, then it is dropped.
pub struct KeptImage {
    /// The VM, paused, its memory the image.
    pub vm: Vm,
    /// The guest's VM id.
    pub vm_id: u64,
    /// The tag the target was told (`Handover`).
    pub tag: u64,
    /// When the image is dropped.
    pub until: Instant,
}

/// The kept image `hello` names, if it is the one kept here, unchanged and
/// of the same shape; taken (it becomes the backup). Otherwise none (a
/// full copy), with the reason logged.
pub(crate) fn take_kept_image(
    kept: &std::sync::Mutex<Option<KeptImage>>,
    hello: &Hello,
) -> Option<Vm> {
    if hello.base_image == 0 {
        return None;
    }
    let mut kept = kept.lock().expect("kept image lock poisoned");
    let image = kept.as_ref()?;
    let config = image.vm.config();
    let unchanged = image
        .vm
        .dirty_since_mark()
        .ok()
        .flatten()
        .map(|changed| changed.count());
    let why_not = if image.vm_id != hello.vm_id {
        Some(format!(
            "it is of VM {:#x}, not {:#x}",
            image.vm_id, hello.vm_id
        ))
    } else if image.tag != hello.base_image {
        Some(format!(
            "it is image {:#x}, the source builds on {:#x} (a stale image: the guest went elsewhere since)",
            image.tag, hello.base_image
        ))
    } else if config.memory_bytes != hello.memory_bytes || config.vcpus != hello.vcpus {
        Some("its shape differs".to_owned())
    } else if Instant::now() >= image.until {
        Some("it expired".to_owned())
    } else if unchanged != Some(0) {
        Some(format!(
            "{unchanged:?} of its pages changed since it was kept"
        ))
    } else {
        None
    };
    if let Some(why) = why_not {
        tracing::warn!("the kept image is not used ({why}): the guest is copied whole");
        return None;
    }
    kept.take().map(|image| image.vm)
}

/// What [`serve_with`] holds between connections.
struct Held<'a> {
    kept: &'a std::sync::Mutex<Option<KeptImage>>,
    until: Option<Instant>,
    net_sinks: Option<&'a NetSinks>,
}

/// Makes, from the tap, where a resumed guest's frames go and who hears of
/// the frames it receives (the new primary's output-commit gate after a
/// planned switchover); without it they go straight to the tap.
pub type NetSinks =
    dyn Fn(Arc<Tap>) -> (Arc<dyn FrameSink>, Option<Arc<dyn FrameSink>>) + Send + Sync;

/// What else a secondary may hold: an image of a guest that left (with
/// when serving ends, if it should), and how a resumed guest's network is
/// wired.
#[derive(Default)]
pub struct Extras<'a> {
    /// A kept image a return trip or a switchover's protection builds on.
    pub kept: Option<KeptImage>,
    /// Serving ends then (`Ok(None)`), if set.
    pub until: Option<Instant>,
    /// See [`NetSinks`].
    pub net_sinks: Option<&'a NetSinks>,
    /// The tap, already open (a process that opened it once for all the
    /// parts it plays); without it, `SecondaryOptions::tap` is opened.
    pub tap: Option<Arc<Tap>>,
}

/// A resumed guest's network: the tap, and what sits in front of it.
pub(crate) struct Network<'a> {
    pub tap: Option<&'a Arc<Tap>>,
    pub sinks: Option<&'a NetSinks>,
}

/// How long the acceptor waits for a connection before it looks at the
/// stop flags again (an idle secondary wakes this often, no more).
const ACCEPT_POLL: Duration = Duration::from_millis(50);

/// Waits until `listener` has a connection to accept, or `timeout`.
fn wait_readable(listener: &TcpListener, timeout: Duration) {
    use std::os::fd::AsRawFd;
    let mut poll = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `poll` is one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut poll, 1, millis) };
}

/// Connections still in their handshake at once; more are closed at once.
const MAX_PENDING_HANDSHAKES: usize = 32;

/// Serves primaries until one is lost after committing an epoch; then
/// resumes its guest and returns it.
pub fn serve(
    options: SecondaryOptions,
    stop: &AtomicBool,
    report: impl FnMut(&SecondaryEvent),
) -> Result<Option<Failover>, SecondaryError> {
    serve_with(options, Extras::default(), stop, report)
}

/// [`serve`], holding [`Extras`]: an image of a guest that left (a
/// migration of it back, or a switchover's protection, that names the
/// image sends only what changed), when to stop serving, and the network
/// wiring of a resumed guest.
pub fn serve_with(
    options: SecondaryOptions,
    extras: Extras<'_>,
    stop: &AtomicBool,
    mut report: impl FnMut(&SecondaryEvent),
) -> Result<Option<Failover>, SecondaryError> {
    let Extras {
        kept,
        until,
        net_sinks,
        tap: open_tap,
    } = extras;
    let kept = std::sync::Mutex::new(kept);
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
    let tap = match open_tap {
        Some(tap) => Some(tap),
        None => options
            .tap
            .as_deref()
            .map(Tap::open)
            .transpose()?
            .map(Arc::new),
    };
    report(&SecondaryEvent::Listening {
        address: options.listen,
    });
    let (greeted_sender, greeted) = std::sync::mpsc::channel();
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let acceptor = std::thread::Builder::new()
            .name("acceptor".to_owned())
            .spawn_scoped(scope, || {
                accept_loop(&listener, &options.security, stop, &done, &greeted_sender);
            })
            .map_err(|source| SecondaryError::Listen {
                address: options.listen,
                source,
            });
        let result = match acceptor {
            Ok(_) => {
                let held = Held {
                    kept: &kept,
                    until,
                    net_sinks,
                };
                serve_greeted(
                    &greeted,
                    &udp,
                    &options,
                    tap.as_ref(),
                    held,
                    stop,
                    &mut report,
                )
            }
            Err(error) => Err(error),
        };
        done.store(true, Ordering::Relaxed);
        result
    })
}

/// Accepts connections and hands each to a greeter thread of its own (the
/// channel handshake and `Hello`, under a deadline), until `stop` or `done`.
fn accept_loop(
    listener: &TcpListener,
    security: &Security,
    stop: &AtomicBool,
    done: &AtomicBool,
    greeted: &Sender<(SocketAddr, Result<Greeted, ConnectionError>)>,
) {
    let pending = Arc::new(AtomicUsize::new(0));
    let mut last_overflow_log: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) && !done.load(Ordering::Relaxed) {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                wait_readable(listener, ACCEPT_POLL);
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, "accepting a connection failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if pending.load(Ordering::Relaxed) >= MAX_PENDING_HANDSHAKES {
            // Rate-limited: a flood must not flood the log too.
            if last_overflow_log.is_none_or(|at| at.elapsed() > Duration::from_secs(1)) {
                tracing::warn!(%peer, "too many connections in their handshake; closing new ones");
                last_overflow_log = Some(Instant::now());
            }
            continue;
        }
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_nodelay(true);
        pending.fetch_add(1, Ordering::Relaxed);
        let (pending, security, greeted) = (pending.clone(), security.clone(), greeted.clone());
        let spawned = std::thread::Builder::new()
            .name("greeter".to_owned())
            .spawn(move || {
                let result = greet(stream, peer, &security, HANDSHAKE_DEADLINE);
                pending.fetch_sub(1, Ordering::Relaxed);
                // The main loop may be gone (a takeover): nothing to tell.
                let _ = greeted.send((peer, result));
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start a greeter thread");
        }
    }
}

/// Serves greeted connections one at a time until one is lost after
/// committing an epoch (or a migration arrives), or `stop`.
fn serve_greeted(
    greeted: &std::sync::mpsc::Receiver<(SocketAddr, Result<Greeted, ConnectionError>)>,
    udp: &UdpSocket,
    options: &SecondaryOptions,
    tap: Option<&Arc<Tap>>,
    Held {
        kept,
        until,
        net_sinks,
    }: Held<'_>,
    stop: &AtomicBool,
    report: &mut impl FnMut(&SecondaryEvent),
) -> Result<Option<Failover>, SecondaryError> {
    while !stop.load(Ordering::Relaxed) {
        if until.is_some_and(|until| Instant::now() >= until) {
            report(&SecondaryEvent::Disconnected {
                reason: "the kept image expired".to_owned(),
            });
            return Ok(None);
        }
        let greeting = match greeted.recv_timeout(Duration::from_millis(20)) {
            Ok((_, Ok(greeting))) => greeting,
            Ok((peer, Err(error))) => {
                let reason = format!("{peer} was not let in: {}", anyhow_chain(&error));
                tracing::warn!(%peer, %reason, "connection refused");
                report(&SecondaryEvent::Disconnected { reason });
                continue;
            }
            Err(_) => continue,
        };
        let peer = greeting.peer;
        // Each connection has a backup of its own, made from its Hello:
        // state committed by an earlier connection is never resumed (that
        // primary may have run on unprotected since).
        let mut backup: Option<Backup> = None;
        let endpoints = Endpoints {
            pending: greeted,
            udp,
            kept,
        };
        match serve_connection(greeting, endpoints, options, tap, &mut backup, stop, report) {
            Ok(Ended::Lost { .. }) if backup.as_ref().is_some_and(Backup::awaits_handover) => {
                report(&SecondaryEvent::Disconnected {
                    reason: "the migration broke before its source handed the guest over: the source runs it on; nothing resumed here"
                        .to_owned(),
                });
            }
            Ok(Ended::Lost { last_heard, reason }) => {
                if let (Some(witness), Some(synced)) = (&options.witness, in_sync(&backup))
                    && let Verdict::Stale(why) =
                        may_take_over(witness, synced, options.instance, stop, report)
                {
                    report(&SecondaryEvent::Disconnected { reason: why });
                    continue;
                }
                if let Some(failover) =
                    take_over(&mut backup, last_heard, reason, options, tap, net_sinks)?
                {
                    return Ok(Some(failover));
                }
                report(&SecondaryEvent::Disconnected {
                    reason: "the connection was lost before it committed an epoch: nothing of it to resume"
                        .to_owned(),
                });
            }
            Ok(Ended::HandedOver {
                kept_image,
                protect_to,
            }) => {
                if let (Some(witness), Some(synced)) = (&options.witness, in_sync(&backup))
                    && let Verdict::Stale(why) =
                        may_take_over(witness, synced, options.instance, stop, report)
                {
                    report(&SecondaryEvent::Disconnected { reason: why });
                    continue;
                }
                let protect_to = match protect_to.parse::<SocketAddr>() {
                    Ok(address) => Some((address, kept_image)),
                    Err(error) => {
                        tracing::warn!(
                            %error,
                            "the old primary gave no usable address ({protect_to:?}): the guest runs here unprotected"
                        );
                        None
                    }
                };
                let resumed = take_over(
                    &mut backup,
                    Instant::now(),
                    "a planned switchover".to_owned(),
                    options,
                    tap,
                    net_sinks,
                )?;
                if let Some(mut failover) = resumed {
                    failover.protect_to = protect_to;
                    return Ok(Some(failover));
                }
            }
            Ok(Ended::MigratedIn) => {
                let mut arrived = take_over(
                    &mut backup,
                    Instant::now(),
                    "migrated in".to_owned(),
                    options,
                    tap,
                    net_sinks,
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
    options: &SecondaryOptions,
    tap: Option<&Arc<Tap>>,
    net_sinks: Option<&NetSinks>,
) -> Result<Option<Failover>, SecondaryError> {
    let Some(backup) = slot.take() else {
        return Ok(None);
    };
    let network = Network {
        tap,
        sinks: net_sinks,
    };
    match backup.take_over(
        last_heard,
        reason,
        options.verify,
        network,
        &options.rescue_dir,
    )? {
        Ok(failover) => Ok(Some(failover)),
        Err(backup) => {
            *slot = Some(backup);
            Ok(None)
        }
    }
}
