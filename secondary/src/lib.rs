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
//! - Silence (neither bytes nor UDP heartbeats for the heartbeat timeout)
//!   or a connection that breaks without `Goodbye` means the primary is
//!   lost: with a committed epoch, the backup VM is resumed from it.
//!
//! The listening address serves TCP (the connection) and UDP (heartbeats).
//!
//! A guest with a network interface gets its own on takeover: a virtio-net
//! device restored from the checkpoint, on this host's tap, and a gratuitous
//! ARP on the guest's behalf so switches and neighbours send its traffic
//! here. Its TCP connections go on: whatever the client did not see
//! acknowledged it sends again.

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use understudy_checkpoint::heartbeat::Heartbeats;
use understudy_checkpoint::link::{HeartbeatPolicy, LinkSender, LivenessReader, is_peer_lost};
use understudy_checkpoint::protocol::{
    Action, EpochEnd, Hello, MAX_UNACKNOWLEDGED_EPOCHS, Message, PROTOCOL_VERSION, ProtocolError,
    Purpose, Receiver,
};
use understudy_compress::{CodecError, Decoder, PageBatch};
use understudy_vm::memory::{self, MemoryError};
use understudy_vm::progress::ProgressSample;
use understudy_vm::state::{StateError, VmState};
use understudy_vm::tap::{Tap, TapError};
use understudy_vm::virtio_net::FrameSink;
use understudy_vm::{Vm, VmConfig, VmError};

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
    /// acknowledgement (a slow secondary).
    pub ack_delay: Duration,
}

/// The backup: a VM that has not run, and what it holds.
struct Backup {
    vm: Vm,
    vm_id: u64,
    committed: Option<(u64, VmState)>,
    /// Frames the guest received in epochs not committed yet, in order.
    input_log: InputLog,
    /// Frames the guest sent in the last few committed epochs: the primary
    /// may have died before releasing them, so a takeover sends them again
    /// (a receiver drops what it already has: TCP by sequence number).
    recent_output: std::collections::VecDeque<(u64, Vec<Vec<u8>>)>,
}

/// Committed epochs whose output a takeover sends again: as many as the
/// primary may have outstanding without an acknowledgement, plus the last.
const RECENT_OUTPUT_EPOCHS: usize = MAX_UNACKNOWLEDGED_EPOCHS as usize + 1;

/// Most frames kept for replay; older ones are dropped beyond it.
const INPUT_LOG_FRAMES: usize = 16_384;

/// The frames a takeover replays: those the primary's guest received in
/// epochs that never committed here.
#[derive(Default)]
struct InputLog {
    frames: std::collections::VecDeque<(u64, Vec<u8>)>,
}

impl InputLog {
    fn record(&mut self, epoch: u64, frame: Vec<u8>, committed: Option<u64>) {
        if committed.is_some_and(|committed| epoch <= committed) {
            return;
        }
        if self.frames.len() == INPUT_LOG_FRAMES {
            self.frames.pop_front();
        }
        self.frames.push_back((epoch, frame));
    }

    /// Forgets the frames of `epoch` and earlier (the guest state has them).
    fn committed(&mut self, epoch: u64) {
        self.frames.retain(|(frame_epoch, _)| *frame_epoch > epoch);
    }

    fn replay(self) -> impl Iterator<Item = Vec<u8>> {
        self.frames.into_iter().map(|(_, frame)| frame)
    }
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
    let mut backup: Option<Backup> = None;
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
        match serve_connection(
            stream,
            peer,
            &udp,
            options.heartbeat,
            options.ack_delay,
            &mut backup,
            &mut report,
        ) {
            Ok(Ended::Lost { last_heard, reason }) => {
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
                    reason: "the primary was lost before its first epoch committed".to_owned(),
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
fn anyhow_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

enum Ended {
    /// A migration's last epoch was applied: the guest runs here now.
    MigratedIn,
    /// The primary went silent or the connection broke.
    Lost { last_heard: Instant, reason: String },
    /// The primary said goodbye.
    Closed(String),
}

fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    udp: &UdpSocket,
    heartbeat: HeartbeatPolicy,
    ack_delay: Duration,
    backup: &mut Option<Backup>,
    report: &mut impl FnMut(&SecondaryEvent),
) -> Result<Ended, ConnectionError> {
    let write_half = stream.try_clone().map_err(ProtocolError::Io)?;
    let sender = LinkSender::new(write_half);
    let mut reader = LivenessReader::new(stream, heartbeat).map_err(ProtocolError::Io)?;
    let stop_heartbeats = Arc::new(AtomicBool::new(false));
    let heartbeats = sender.start_heartbeats(heartbeat, stop_heartbeats.clone());
    let mut link = Connection {
        reader: &mut reader,
        sender: &sender,
        peer,
        udp,
        heartbeat,
        udp_heartbeats: None,
        purpose: None,
        ack_delay,
    };
    let result = receive(&mut link, backup, report);
    // The heartbeat threads notice their stop flags within an interval;
    // nobody waits for them, so a takeover starts at once.
    drop(link.udp_heartbeats.take());
    stop_heartbeats.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Err(error) = &result {
        // Tell a live primary why it is being dropped.
        let _ = sender.send(0, &Message::Goodbye(anyhow_chain(error)));
    }
    sender.shutdown();
    drop(heartbeats);
    match result {
        Err(ConnectionError::Protocol(error)) if is_peer_lost(&error) => Ok(Ended::Lost {
            last_heard: reader.last_progress(),
            reason: anyhow_chain(&error),
        }),
        other => other,
    }
}

/// An epoch being received.
#[derive(Default)]
struct Staging {
    begun: Option<Instant>,
    pages: PageBatch,
    received: u64,
    state: Option<VmState>,
    output: Vec<Vec<u8>>,
}

/// One primary's connection, as `receive` uses it.
struct Connection<'a> {
    reader: &'a mut LivenessReader,
    sender: &'a LinkSender,
    peer: SocketAddr,
    udp: &'a UdpSocket,
    heartbeat: HeartbeatPolicy,
    udp_heartbeats: Option<Heartbeats>,
    purpose: Option<Purpose>,
    ack_delay: Duration,
}

fn receive(
    link: &mut Connection<'_>,
    backup: &mut Option<Backup>,
    report: &mut impl FnMut(&SecondaryEvent),
) -> Result<Ended, ConnectionError> {
    let (sender, peer) = (link.sender, link.peer);
    let mut receiver = Receiver::new();
    let mut decoder = Decoder::new();
    let mut staging = Staging::default();
    let mut decoded = PageBatch::new();
    loop {
        let envelope = link.reader.receive()?;
        let epoch = envelope.epoch;
        match receiver.accept(envelope)? {
            Action::Greet(hello) => {
                if let Err(reason) = check_hello(&hello) {
                    sender.send(0, &Message::Refuse(reason.clone()))?;
                    return Ok(Ended::Closed(format!("refused the primary: {reason}")));
                }
                if backup.as_ref().is_none_or(|b| b.vm_id != hello.vm_id) {
                    let vm = Vm::new(VmConfig::new(hello.memory_bytes, hello.vcpus))
                        .map_err(SecondaryError::Vm)?;
                    *backup = Some(Backup {
                        vm,
                        vm_id: hello.vm_id,
                        committed: None,
                        input_log: InputLog::default(),
                        recent_output: std::collections::VecDeque::new(),
                    });
                }
                if let Some(backup) = backup.as_mut() {
                    // A new connection numbers its epochs from 0 again.
                    backup.input_log = InputLog::default();
                    backup.recent_output.clear();
                }
                let udp_heartbeats =
                    Heartbeats::to_primary(link.udp, peer.ip(), hello.vm_id, link.heartbeat)
                        .map_err(ProtocolError::Io)?;
                link.reader.hear(udp_heartbeats.heard());
                link.udp_heartbeats = Some(udp_heartbeats);
                link.purpose = Some(hello.purpose);
                sender.send(0, &Message::Welcome)?;
                report(&SecondaryEvent::Connected { peer, hello });
            }
            Action::BeginEpoch(_) => {
                staging.begun = Some(Instant::now());
                staging.pages.clear();
                staging.received = 0;
                staging.state = None;
                staging.output.clear();
            }
            Action::StageOutput(frame) => staging.output.push(frame),
            Action::StagePages(frame) => {
                decoder
                    .decode(&frame, &mut decoded)
                    .map_err(|source| ConnectionError::Pages { epoch, source })?;
                let backup = backup.as_mut().expect("Hello created the backup");
                staging.received += decoded.len() as u64;
                if backup.committed.is_none() {
                    // The initial copy: nothing to protect yet, write it in place.
                    apply(&backup.vm, &decoded)?;
                } else {
                    for (page_number, page) in decoded.iter() {
                        staging.pages.push(page_number, page);
                    }
                }
            }
            Action::StageState(bytes) => {
                let state = VmState::decode(&bytes)
                    .map_err(|source| ConnectionError::State { epoch, source })?;
                let config = backup
                    .as_ref()
                    .expect("Hello created the backup")
                    .vm
                    .config();
                if state.memory_bytes != config.memory_bytes
                    || state.vcpus.len() != config.vcpus as usize
                {
                    return Err(ConnectionError::StateShape(epoch));
                }
                staging.state = Some(state);
            }
            Action::Commit { epoch, end } => {
                let backup = backup.as_mut().expect("Hello created the backup");
                commit(backup, epoch, end, &mut staging)?;
                // Committed, whether or not the acknowledgement gets out.
                report(&SecondaryEvent::Committed {
                    epoch,
                    pages: staging.received,
                    receive: staging.begun.map_or(Duration::ZERO, |t| t.elapsed()),
                });
                if !link.ack_delay.is_zero() {
                    std::thread::sleep(link.ack_delay);
                }
                sender.send(epoch, &Message::Ack)?;
                if link.purpose == Some(Purpose::Migrate) {
                    return Ok(Ended::MigratedIn);
                }
            }
            Action::Heartbeat(_) => {}
            Action::Sync(token) => sender.send(epoch, &Message::Synced(token))?,
            Action::LogInput { epoch, frame } => {
                if let Some(backup) = backup.as_mut() {
                    let committed = backup.committed.as_ref().map(|(epoch, _)| *epoch);
                    backup.input_log.record(epoch, frame, committed);
                }
            }
            Action::Close(reason) => {
                return Ok(Ended::Closed(format!("the primary left: {reason}")));
            }
        }
    }
}

fn check_hello(hello: &Hello) -> Result<(), String> {
    if hello.version != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {} is not supported (this secondary speaks {PROTOCOL_VERSION})",
            hello.version
        ));
    }
    if hello.guest_image_hash != understudy_vm::boot::guest_image_hash() {
        return Err("the primary runs a different guest image".to_owned());
    }
    memory::region_layout(hello.memory_bytes).map_err(|error| error.to_string())?;
    Ok(())
}

fn apply(vm: &Vm, pages: &PageBatch) -> Result<(), SecondaryError> {
    for (page_number, page) in pages.iter() {
        memory::write(vm.memory(), page_number * 4096, page)?;
    }
    Ok(())
}

/// Applies a staged epoch; checks first what can be checked before memory
/// changes (page count, state present), so a bad epoch changes nothing.
fn commit(
    backup: &mut Backup,
    epoch: u64,
    end: EpochEnd,
    staging: &mut Staging,
) -> Result<(), ConnectionError> {
    if end.pages != staging.received {
        return Err(ConnectionError::PageCount {
            epoch,
            announced: end.pages,
            received: staging.received,
        });
    }
    let state = staging
        .state
        .take()
        .expect("the receiver commits only after a State");
    apply(&backup.vm, &staging.pages)?;
    backup.committed = Some((epoch, state));
    backup.input_log.committed(epoch);
    backup
        .recent_output
        .push_back((epoch, std::mem::take(&mut staging.output)));
    while backup.recent_output.len() > RECENT_OUTPUT_EPOCHS {
        backup.recent_output.pop_front();
    }
    if let Some(expected) = end.memory_hash {
        let actual = memory::hash(backup.vm.memory()).map_err(SecondaryError::Memory)?;
        if actual != expected {
            return Err(ConnectionError::MemoryHash {
                epoch,
                expected,
                actual,
            });
        }
    }
    Ok(())
}

/// Resumes the backup VM from its last committed epoch.
fn take_over(
    backup: &mut Option<Backup>,
    last_heard: Instant,
    reason: String,
    verify: bool,
    tap: Option<&Arc<Tap>>,
) -> Result<Option<Failover>, SecondaryError> {
    let Some(Backup {
        committed: Some(_), ..
    }) = backup
    else {
        return Ok(None);
    };
    let Backup {
        mut vm,
        committed,
        input_log,
        recent_output,
        ..
    } = backup.take().expect("checked above");
    let (epoch, state) = committed.expect("checked above");
    let memory_hash = if verify {
        Some(memory::hash(vm.memory())?)
    } else {
        None
    };
    if state.net.is_some() {
        if tap.is_none() {
            tracing::warn!(
                "the guest has a network interface but this secondary has no --tap: it resumes unreachable"
            );
        }
        vm.attach_guest_tap(tap.cloned())?;
    }
    vm.restore_state(&state)?;
    let progress = ProgressSample::read(&vm)?;
    let replayed = input_log.frames.len();
    if let Some(net) = vm.net() {
        // What the guest received after the committed epoch, it receives again.
        net.inject(input_log.replay());
    }
    if let (Some(net), Some(tap)) = (vm.net(), tap) {
        // Switches learn the guest's MAC on this port; neighbours refresh.
        net.announce(vm.boot_info()?.net_ipv4);
        // What the guest sent in committed epochs may never have left the
        // primary: send it again before the guest sends anything new.
        for (_, frames) in &recent_output {
            for frame in frames {
                tap.send(frame);
            }
        }
    }
    vm.resume()?;
    Ok(Some(Failover {
        vm,
        epoch,
        replayed_frames: replayed,
        memory_hash,
        progress,
        since_last_heartbeat: last_heard.elapsed(),
        reason,
        migrated: false,
    }))
}
