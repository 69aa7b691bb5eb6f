//! One primary's connection: the greeting, then epochs received, staged,
//! committed and acknowledged until the primary leaves, is lost, or a
//! migration arrives.
//!
//! ```text
//!  primary                         secondary
//!  Hello ───────────────────────▶  check (version, guest image, memory size)
//!        ◀─────────────────────── Welcome | Refuse
//!  EpochBegin(n), Pages…, State, Output…, EpochEnd ──▶ stage, then commit
//!        ◀─────────────────────── Ack(n)
//!  Input(e) at any time ────────▶  logged for a takeover (COLO: fed to
//!                                  the running guest, see `colo`)
//!        ◀─────────────────────── SecondaryOutput (COLO: the running
//!                                  guest's frames, for the compare proxy)
//!  Sync(t) ─────────────────────▶  ◀── Synced(t)
//!  Goodbye ─────────────────────▶  closed, no takeover
//! ```
//!
//! The backup exists only after `Hello`: [`receive`] greets first and hands
//! the rest of the connection a `&mut Backup`.

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use understudy_checkpoint::channel::{Channel, DeadlineReader, HeartbeatKeys, Security};
use understudy_checkpoint::heartbeat::{HeartbeatPolicy, Heartbeats};
use understudy_checkpoint::link::{LinkSender, LivenessReader, is_peer_lost};
use understudy_checkpoint::protocol::{
    Action, Hello, MAX_PAYLOAD, MAX_PAYLOAD_BEFORE_WELCOME, Message, PROTOCOL_VERSION,
    ProtocolError, Purpose, Receiver, read_message_within,
};
use understudy_compress::{Decoder, PageBatch};
use understudy_vm::postcopy::FaultHandler;
use understudy_vm::state::VmState;
use understudy_vm::tap::Tap;
use understudy_vm::{PAGE_SIZE, memory, usize_from};

use understudy_checkpoint::witness::Witness;

use crate::backup::{Backup, Staging};
use crate::postcopy::{Arrivals, Requester, receive_pages};
use crate::{ConnectionError, PostcopyReport, SecondaryEvent, SecondaryOptions, anyhow_chain};

pub(crate) enum Ended {
    /// A migration's last epoch was applied: the guest runs here now.
    MigratedIn,
    /// A planned switchover: the primary's guest is paused at the last
    /// committed epoch; this side takes it over and protects it by the old
    /// primary at `protect_to`, which keeps the image `kept_image`.
    HandedOver {
        /// The old primary's image tag.
        kept_image: u64,
        /// Where the old primary waits as the secondary.
        protect_to: String,
    },
    /// The primary went silent or the connection broke.
    Lost { last_heard: Instant, reason: String },
    /// The primary said goodbye.
    Closed(String),
}

/// A connection whose peer proved its key (on an authenticated channel) and
/// said `Hello` in time: only such a connection reaches the main loop.
pub(crate) struct Greeted {
    channel: Channel,
    receiver: Receiver,
    hello: Hello,
    /// The peer's address.
    pub peer: SocketAddr,
}

/// The part of a connection that runs before the peer is trusted, on a
/// thread of its own (several at once, so a squatter cannot keep the real
/// primary out): the channel handshake, then `Hello`, within `deadline` in
/// all. Nothing larger than a `Hello` is read, and nothing is created.
pub(crate) fn greet(
    stream: TcpStream,
    peer: SocketAddr,
    security: &Security,
    deadline: Duration,
) -> Result<Greeted, ConnectionError> {
    let until = Instant::now() + deadline;
    let mut channel = Channel::accept(stream, security, deadline)?;
    let mut receiver = Receiver::new();
    let socket = channel
        .reader
        .stream()
        .try_clone()
        .map_err(ProtocolError::Io)?;
    let mut reader = DeadlineReader::new(&mut channel.reader, socket, until, deadline);
    let envelope = match read_message_within(&mut reader, MAX_PAYLOAD_BEFORE_WELCOME) {
        Err(ProtocolError::Io(error)) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(ConnectionError::NoHello(
                "the peer closed the connection before Hello".to_owned(),
            ));
        }
        Err(ProtocolError::Io(error)) if error.kind() == std::io::ErrorKind::TimedOut => {
            return Err(ConnectionError::NoHello(error.to_string()));
        }
        other => other?,
    };
    match receiver.accept(envelope)? {
        Action::Greet(hello) => Ok(Greeted {
            channel,
            receiver,
            hello,
            peer,
        }),
        other => Err(ConnectionError::BeforeHello(other.name())),
    }
}

/// Greeted connections waiting for the main loop (a broken post-copy takes
/// its resumption from here).
pub(crate) type Pending = std::sync::mpsc::Receiver<(SocketAddr, Result<Greeted, ConnectionError>)>;

/// Where connections come from: greeted ones waiting (a broken post-copy
/// takes its resumption from here) and the heartbeat socket.
pub(crate) struct Endpoints<'a> {
    pub pending: &'a Pending,
    pub udp: &'a UdpSocket,
    /// An image of a guest this host kept (it migrated away from here).
    pub kept: &'a std::sync::Mutex<Option<crate::KeptImage>>,
}

pub(crate) fn serve_connection(
    greeted: Greeted,
    Endpoints { pending, udp, kept }: Endpoints<'_>,
    options: &SecondaryOptions,
    tap: Option<&Arc<Tap>>,
    backup: &mut Option<Backup>,
    stop: &AtomicBool,
    report: &mut impl FnMut(&SecondaryEvent),
) -> Result<Ended, ConnectionError> {
    let heartbeat = options.heartbeat;
    let Greeted {
        channel,
        mut receiver,
        hello,
        peer,
    } = greeted;
    let heartbeat_keys = channel.heartbeat_keys;
    let mut opened = Link::open(channel, heartbeat)?;
    let mut link = Connection {
        reader: &mut opened.reader,
        sender: &opened.sender,
        peer,
        udp,
        heartbeat,
        heartbeat_keys,
        udp_heartbeats: None,
        ack_delay: options.ack_delay,
        witness: options.witness.as_ref(),
        colo: options.colo,
        tap,
        stop,
        pending,
        postcopy_recovery: options.postcopy_recovery,
        kept,
        store: options.store.clone(),
    };
    let result = receive(&mut link, &mut receiver, hello, backup, report);
    // The heartbeat threads notice their stop flags within an interval;
    // nobody waits for them, so a takeover starts at once.
    drop(link.udp_heartbeats.take());
    opened.stop_heartbeats();
    if let Err(error) = &result {
        // Tell a live primary why it is being dropped.
        let _ = opened
            .sender
            .send(0, &Message::Goodbye(anyhow_chain(error)));
    }
    opened.sender.shutdown();
    match result {
        Err(ConnectionError::Protocol(error)) if is_peer_lost(&error) => Ok(Ended::Lost {
            last_heard: opened.reader.last_progress(),
            reason: anyhow_chain(&error),
        }),
        Err(error @ ConnectionError::NoProgress(_)) => Ok(Ended::Lost {
            last_heard: opened.reader.last_progress(),
            reason: anyhow_chain(&error),
        }),
        other => other,
    }
}

/// A greeted connection's two halves, its TCP heartbeats running; dropping
/// it stops them and shuts the socket down.
struct Link {
    sender: LinkSender,
    reader: LivenessReader,
    stop_heartbeats: Arc<AtomicBool>,
    _heartbeats: std::thread::JoinHandle<()>,
}

impl Link {
    /// Opens `channel`'s halves and starts heartbeats on it; the reader
    /// takes nothing larger than a `Hello` until its owner sends `Welcome`.
    fn open(channel: Channel, heartbeat: HeartbeatPolicy) -> Result<Self, ConnectionError> {
        let sender =
            LinkSender::new(channel.writer, heartbeat.progress).map_err(ProtocolError::Io)?;
        let mut reader =
            LivenessReader::new(channel.reader, heartbeat).map_err(ProtocolError::Io)?;
        reader.limit_payload(MAX_PAYLOAD_BEFORE_WELCOME);
        let stop_heartbeats = Arc::new(AtomicBool::new(false));
        let heartbeats = sender.start_heartbeats(heartbeat, stop_heartbeats.clone());
        Ok(Self {
            sender,
            reader,
            stop_heartbeats,
            _heartbeats: heartbeats,
        })
    }

    /// Stops the heartbeats (the thread notices within an interval).
    fn stop_heartbeats(&self) {
        self.stop_heartbeats
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop_heartbeats();
        self.sender.shutdown();
    }
}

/// Starts UDP heartbeats with the peer at `peer_ip` for `vm_id`, and lets
/// `reader` count them as signs of life.
fn udp_heartbeats(
    udp: &UdpSocket,
    reader: &mut LivenessReader,
    peer_ip: std::net::IpAddr,
    vm_id: u64,
    heartbeat: HeartbeatPolicy,
    keys: Option<HeartbeatKeys>,
) -> Result<Heartbeats, ConnectionError> {
    let heartbeats =
        Heartbeats::to_primary(udp, peer_ip, vm_id, heartbeat, keys).map_err(ProtocolError::Io)?;
    reader.hear(heartbeats.heard());
    Ok(heartbeats)
}

/// One primary's connection, as `receive` uses it.
struct Connection<'a> {
    reader: &'a mut LivenessReader,
    sender: &'a LinkSender,
    peer: SocketAddr,
    udp: &'a UdpSocket,
    heartbeat: HeartbeatPolicy,
    heartbeat_keys: Option<HeartbeatKeys>,
    udp_heartbeats: Option<Heartbeats>,
    ack_delay: Duration,
    witness: Option<&'a Witness>,
    /// Whether COLO primaries are served (else Remus ones).
    colo: bool,
    /// The tap a migrated guest's network uses.
    tap: Option<&'a Arc<Tap>>,
    /// Set by SIGTERM/SIGINT: the secondary says goodbye and stops.
    stop: &'a AtomicBool,
    /// Connections greeted meanwhile (a resumed post-copy).
    pending: &'a Pending,
    /// How long a broken post-copy waits to be resumed.
    postcopy_recovery: Duration,
    /// An image kept here that a return trip may build on.
    kept: &'a std::sync::Mutex<Option<crate::KeptImage>>,
    /// Storage-backed: where the stores are.
    store: Option<std::path::PathBuf>,
}

fn receive(
    link: &mut Connection<'_>,
    receiver: &mut Receiver,
    hello: Hello,
    slot: &mut Option<Backup>,
    report: &mut impl FnMut(&SecondaryEvent),
) -> Result<Ended, ConnectionError> {
    if let Err(reason) = check_hello(&hello, &link.heartbeat, link.colo)
        .and_then(|()| check_owner(link.witness, &hello))
    {
        link.sender.send(0, &Message::Refuse(reason.clone()))?;
        return Ok(Ended::Closed(format!("refused the primary: {reason}")));
    }
    if hello.purpose == Purpose::PostcopyResume {
        let reason = format!(
            "no broken post-copy of VM {:#x} waits here to be resumed",
            hello.vm_id
        );
        link.sender.send(0, &Message::Refuse(reason.clone()))?;
        return Ok(Ended::Closed(format!("refused the source: {reason}")));
    }
    let (backup, base) = match crate::take_kept_image(link.kept, &hello) {
        Some(vm) => (Backup::from_kept(vm, &hello), hello.base_image),
        None => match (&link.store, hello.purpose) {
            (Some(root), Purpose::Replicate) => (Backup::create_stored(&hello, root)?, 0),
            _ => (Backup::create(&hello)?, 0),
        },
    };
    let backup = slot.insert(backup);
    link.udp_heartbeats = Some(udp_heartbeats(
        link.udp,
        link.reader,
        link.peer.ip(),
        hello.vm_id,
        link.heartbeat,
        link.heartbeat_keys,
    )?);
    link.sender.send(0, &Message::Welcome)?;
    if hello.base_image != 0 {
        link.sender.send(0, &Message::BaseImage(base))?;
    }
    link.reader.limit_payload(MAX_PAYLOAD);
    report(&SecondaryEvent::Connected {
        peer: link.peer,
        hello: hello.clone(),
    });
    let decoder = Decoder::bounded(
        usize_from(u64::from(hello.store_pages)),
        backup.guest_pages(),
    );
    receive_epochs(link, receiver, backup, decoder, &hello, report)
}

/// After `Hello`: epochs until the primary leaves or is lost, or a migration
/// arrives.
fn receive_epochs(
    link: &mut Connection<'_>,
    receiver: &mut Receiver,
    backup: &mut Backup,
    mut decoder: Decoder,
    hello: &Hello,
    report: &mut impl FnMut(&SecondaryEvent),
) -> Result<Ended, ConnectionError> {
    let (purpose, checkpoint_interval) = (hello.purpose, hello.checkpoint_interval);
    let sender = link.sender;
    let mut staging = Staging::default();
    let mut decoded = PageBatch::new();
    let mut last_commit: Option<Instant> = None;
    loop {
        let envelope = link.reader.receive()?;
        if link.stop.load(std::sync::atomic::Ordering::Relaxed) {
            // A clean stop: the primary runs on and reconnects later.
            answer(
                sender,
                0,
                &Message::Goodbye("the secondary is stopping".to_owned()),
            );
            return Ok(Ended::Closed("stopping on request".to_owned()));
        }
        // Heard is not working: a primary whose epochs stopped committing
        // (after the first) is lost too, once it let more than its
        // checkpoint interval pass beyond the progress deadline.
        let deadline = link.heartbeat.progress + checkpoint_interval;
        if last_commit.is_some_and(|at| at.elapsed() > deadline) {
            return Err(ConnectionError::NoProgress(deadline));
        }
        let epoch = envelope.epoch;
        match receiver.accept(envelope)? {
            Action::Greet(_) => return Err(ConnectionError::BeforeHello("a second Hello")),
            Action::BeginEpoch(_) => staging.begin(backup.guest_pages()),
            Action::StageOutput(frame) => staging.stage_output(epoch, frame)?,
            Action::StagePages(frame) => {
                decoder
                    .decode(&frame, &mut decoded)
                    .map_err(|source| ConnectionError::Pages { epoch, source })?;
                if backup.writes_in_place() {
                    // The initial copy: nothing to protect yet, write it in
                    // place (every page number was checked by the decoder).
                    staging.received += decoded.len() as u64;
                    backup.apply(&decoded)?;
                } else {
                    staging.stage_pages(epoch, &decoded)?;
                }
            }
            Action::StageState(bytes) => {
                staging.state = Some(check_state(&bytes, epoch, backup)?);
            }
            Action::Discard(pages) if purpose == Purpose::MigratePostcopy && epoch == 0 => {
                backup.discard(&pages)?;
            }
            action @ (Action::Discard(_) | Action::VerifyPages(_)) => {
                return Err(ProtocolError::Unexpected {
                    kind: action.name(),
                    epoch,
                    state: "outside a post-copy's switchover".to_owned(),
                }
                .into());
            }
            Action::Commit { epoch, end } => {
                backup.commit(epoch, end, &mut staging)?;
                if epoch == 0 {
                    // The initial copy's frames were the largest this
                    // connection sees: give their buffers back.
                    decoded = PageBatch::new();
                    staging.release_buffers();
                    decoder.release_buffers();
                }
                backup.start_lockstep(sender)?;
                last_commit = Some(Instant::now());
                // Committed, whether or not the acknowledgement gets out.
                report(&SecondaryEvent::Committed {
                    epoch,
                    pages: staging.received,
                    receive: staging.elapsed(),
                });
                if epoch > 0 && !link.ack_delay.is_zero() {
                    std::thread::sleep(link.ack_delay);
                }
                answer(sender, epoch, &Message::Ack);
                if purpose == Purpose::Migrate {
                    // The guest is the source's until its Handover.
                    continue;
                }
                if purpose == Purpose::MigratePostcopy {
                    return run_postcopy(link, receiver, backup, &mut decoder, hello, report);
                }
                // COLO: after the Ack, so that the primary compares the
                // guest's next output with the epoch it belongs to.
                backup.run_on()?;
            }
            Action::Handover(handover) if purpose == Purpose::Migrate => {
                backup.hand_over(handover.kept_image);
                answer(sender, epoch, &Message::TookOver);
                return Ok(Ended::MigratedIn);
            }
            Action::Handover(handover) if purpose == Purpose::Replicate => {
                answer(sender, epoch, &Message::TookOver);
                return Ok(Ended::HandedOver {
                    kept_image: handover.kept_image,
                    protect_to: handover.protect_to,
                });
            }
            action @ Action::Handover(_) => {
                return Err(ProtocolError::Unexpected {
                    kind: action.name(),
                    epoch,
                    state: "a COLO connection (a planned switchover needs Remus)".to_owned(),
                }
                .into());
            }
            Action::Heartbeat(_) => {}
            Action::Sync(token) => answer(sender, epoch, &Message::Synced(token)),
            Action::LogInput { epoch, frame } => backup.input(epoch, frame),
            Action::Close(reason) => {
                return Ok(Ended::Closed(format!("the primary left: {reason}")));
            }
        }
    }
}

/// Post-copy after its epoch 0 (see [`crate::postcopy`]): the guest runs
/// here now while its pages arrive; returns once every page is here (and,
/// with the source's hashes, checked).
fn run_postcopy(
    link: &mut Connection<'_>,
    receiver: &mut Receiver,
    backup: &mut Backup,
    decoder: &mut Decoder,
    hello: &Hello,
    report: &mut impl FnMut(&SecondaryEvent),
) -> Result<Ended, ConnectionError> {
    let guest_pages = backup.guest_pages();
    let arrivals = Arc::new(Arrivals::new(guest_pages, link.sender.clone()));
    backup.forget_writes()?;
    let handler = FaultHandler::start(
        backup.memory(),
        Requester {
            arrivals: arrivals.clone(),
        },
    )?;
    let installer = handler.installer();
    let (running, first) = std::thread::scope(|scope| {
        // Reads pages while the guest's state is restored (which faults).
        let pages = scope.spawn(|| {
            receive_pages(
                link.reader,
                receiver,
                decoder,
                &installer,
                &arrivals,
                link.sender,
                link.stop,
            )
        });
        let running = backup.run_now(link.tap);
        if running.is_err() {
            // Wakes the page reader: nothing more to wait for.
            link.sender.shutdown();
        }
        let pages = pages.join().unwrap_or_else(|_| {
            Err(ConnectionError::Postcopy(
                "the page reader panicked".to_owned(),
            ))
        });
        (running, pages)
    });
    // A broken connection: the guest runs on while the source comes back.
    let mut reconnections = 0u32;
    let mut current: Option<ResumedLink> = None;
    let mut result = first;
    let pages = loop {
        let error = match result {
            Ok(received) => break Ok(received),
            // The guest did not run, this target was told to stop, or the
            // failure was its own: the guest stops here (the source keeps
            // its copy).
            Err(error)
                if running.is_err()
                    || link.stop.load(std::sync::atomic::Ordering::Relaxed)
                    || !resumable(&error) =>
            {
                break Err(error);
            }
            Err(error) => error,
        };
        tracing::warn!(
            reason = %anyhow_chain(&error),
            window = ?link.postcopy_recovery,
            "the post-copy's connection broke; the guest runs on and waits for the source to resume it"
        );
        // The broken connection's heartbeats stop, its socket closes.
        drop(current.take());
        let mut next = match wait_for_resume(link, hello, &arrivals, &error) {
            Ok(next) => next,
            Err(error) => break Err(error),
        };
        arrivals.replace_link(next.link.sender.clone());
        reconnections += 1;
        let mut decoder = Decoder::bounded(usize_from(u64::from(next.store_pages)), guest_pages);
        result = receive_pages(
            &mut next.link.reader,
            &mut next.receiver,
            &mut decoder,
            &installer,
            &arrivals,
            &next.link.sender,
            link.stop,
        );
        current = Some(next);
    };
    let pages = pages.map(|received| (received, current));
    arrivals.end(pages.as_ref().err().map(|error| anyhow_chain(error)));
    if running.is_err() || pages.is_err() {
        // Its missing pages will never come: the guest must not run on.
        backup.stop_guest();
    }
    let counts = handler.finish();
    running?;
    let (received, resumed_link) = pages?;
    let counts = counts?;
    let (verified_pages, written_here) = match &received.hashes {
        Some(hashes) => {
            let (verified, written) = backup.verify_pages(hashes)?;
            (Some(verified), written)
        }
        None => (None, 0),
    };
    let sender = resumed_link
        .as_ref()
        .map_or(link.sender, |resumed| &resumed.link.sender);
    answer(sender, 1, &Message::Ack);
    let summary = PostcopyReport {
        pages: received.pages,
        faults: counts.faults,
        zero_pages: counts.zero_pages,
        fault_p50_us: counts.latency_quantile_micros(0.5),
        fault_p99_us: counts.latency_quantile_micros(0.99),
        reconnections,
        verified_pages,
        written_here,
    };
    tracing::info!(?summary, "post-copy complete: every page is here");
    report(&SecondaryEvent::PostcopyComplete(summary));
    // A resumed connection closes here (the source closes once it has the
    // acknowledgement).
    drop(resumed_link);
    Ok(Ended::MigratedIn)
}

/// Whether a broken page epoch may be resumed on a new connection: the
/// link failed, stalled or was closed by the source; not when this side
/// failed (a page it could not install) or the peer sent what it must not.
fn resumable(error: &ConnectionError) -> bool {
    matches!(
        error,
        ConnectionError::Protocol(_)
            | ConnectionError::NoProgress(_)
            | ConnectionError::Postcopy(_)
    )
}

/// A resumed post-copy's connection.
struct ResumedLink {
    link: Link,
    receiver: Receiver,
    store_pages: u32,
    _udp_heartbeats: Heartbeats,
}

/// Waits, for the recovery window, for the source of `hello`'s VM to
/// resume the post-copy on a new connection (other connections are
/// refused meanwhile); tells it the pages here.
fn wait_for_resume(
    link: &Connection<'_>,
    hello: &Hello,
    arrivals: &Arrivals,
    broke: &ConnectionError,
) -> Result<ResumedLink, ConnectionError> {
    let deadline = Instant::now() + link.postcopy_recovery;
    loop {
        if link.stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(ConnectionError::Postcopy(
                "stopped on request while waiting for the source".to_owned(),
            ));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ConnectionError::Postcopy(format!(
                "the connection broke ({}) and the source did not resume within {:?}",
                anyhow_chain(broke),
                link.postcopy_recovery
            )));
        }
        match link
            .pending
            .recv_timeout(left.min(Duration::from_millis(100)))
        {
            Ok((_, Ok(greeted))) => match resume_on(greeted, link, hello, arrivals) {
                Ok(resumed) => return Ok(resumed),
                Err(error) => {
                    tracing::warn!(reason = %anyhow_chain(&error), "a connection did not resume the post-copy");
                }
            },
            Ok((peer, Err(error))) => {
                tracing::warn!(%peer, reason = %anyhow_chain(&error), "connection refused");
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(ConnectionError::Postcopy(
                    "no more connections can be accepted".to_owned(),
                ));
            }
        }
    }
}

/// Takes `greeted` as the resumption of `hello`'s post-copy: the same VM
/// and shape, purpose `PostcopyResume`; anything else is refused.
fn resume_on(
    greeted: Greeted,
    link: &Connection<'_>,
    hello: &Hello,
    arrivals: &Arrivals,
) -> Result<ResumedLink, ConnectionError> {
    let Greeted {
        channel,
        mut receiver,
        hello: offered,
        peer,
    } = greeted;
    let heartbeat = link.heartbeat;
    let heartbeat_keys = channel.heartbeat_keys;
    let mut opened = Link::open(channel, heartbeat)?;
    let same_vm = offered.purpose == Purpose::PostcopyResume
        && offered.vm_id == hello.vm_id
        && offered.memory_bytes == hello.memory_bytes
        && offered.vcpus == hello.vcpus;
    let checked = if same_vm {
        check_hello(&offered, &heartbeat, link.colo)
    } else {
        Err(format!(
            "this target is in the middle of a post-copy of VM {:#x}; only its source may connect (to resume it)",
            hello.vm_id
        ))
    };
    if let Err(reason) = checked {
        let _ = opened.sender.send(0, &Message::Refuse(reason.clone()));
        return Err(ConnectionError::Postcopy(reason));
    }
    let udp_heartbeats = udp_heartbeats(
        link.udp,
        &mut opened.reader,
        peer.ip(),
        offered.vm_id,
        heartbeat,
        heartbeat_keys,
    )?;
    opened.sender.send(0, &Message::Welcome)?;
    opened
        .sender
        .send(0, &Message::PagesHeld(arrivals.held()))?;
    opened.reader.limit_payload(MAX_PAYLOAD);
    // Epoch 0 was committed on the connection that broke.
    receiver.resume_after(0);
    tracing::info!(%peer, "the source resumed the post-copy");
    Ok(ResumedLink {
        link: opened,
        receiver,
        store_pages: offered.store_pages,
        _udp_heartbeats: udp_heartbeats,
    })
}

/// With a witness: the primary must be the VM's owner, proposing the next
/// generation (a zombie that was fenced off, or a confused peer, is
/// refused). A witness that cannot answer now does not keep a pair from
/// forming: a takeover asks it again.
fn check_owner(witness: Option<&Witness>, hello: &Hello) -> Result<(), String> {
    let Some(witness) = witness else {
        return Ok(());
    };
    match witness.read(hello.vm_id) {
        Ok(Some(found))
            if found.record.owner == hello.owner
                && found.record.generation + 1 == hello.generation =>
        {
            Ok(())
        }
        Ok(Some(found)) => Err(format!(
            "the witness says instance {} owns VM {} at generation {}; this primary (instance {}, generation {}) is not its owner",
            found.record.owner, hello.vm_id, found.record.generation, hello.owner, hello.generation
        )),
        Ok(None) => Err(format!("the witness has no record of VM {}", hello.vm_id)),
        Err(error) => {
            tracing::warn!(%error, "the witness cannot check this primary now; a takeover will ask it again");
            Ok(())
        }
    }
}

/// Sends an answer to the primary. A failure is not the end of the
/// connection yet: the primary may have said `Goodbye` just before it
/// closed (it lost this secondary), and that goodbye, still to be read,
/// decides whether this is a clean end or a lost primary. The next read
/// finds out.
fn answer(sender: &LinkSender, epoch: u64, message: &Message) {
    if let Err(error) = sender.send(epoch, message) {
        tracing::debug!(%error, "an answer to the primary did not go out");
    }
}

/// Decodes a VM state and checks it has the backup VM's shape.
fn check_state(bytes: &[u8], epoch: u64, backup: &Backup) -> Result<VmState, ConnectionError> {
    let state =
        VmState::decode(bytes).map_err(|source| ConnectionError::State { epoch, source })?;
    let config = backup.config();
    let vcpus_match = u32::try_from(state.vcpus.len()).is_ok_and(|vcpus| vcpus == config.vcpus);
    if state.memory_bytes != config.memory_bytes || !vcpus_match {
        return Err(ConnectionError::StateShape(epoch));
    }
    Ok(state)
}

/// The longest checkpoint interval a primary may announce.
const MAX_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(3600);

fn check_hello(hello: &Hello, heartbeat: &HeartbeatPolicy, colo: bool) -> Result<(), String> {
    if hello.version != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {} is not supported (this secondary speaks {PROTOCOL_VERSION})",
            hello.version
        ));
    }
    match (hello.purpose, colo) {
        (Purpose::Colo, false) => {
            return Err(
                "this secondary serves Remus primaries; start it with --mode colo to serve a COLO primary"
                    .to_owned(),
            );
        }
        (Purpose::Replicate, true) => {
            return Err(
                "this secondary serves COLO primaries; start the primary with --mode colo, or this secondary with --mode remus"
                    .to_owned(),
            );
        }
        _ => {}
    }
    if hello.guest_image_hash != understudy_vm::boot::guest_image_hash() {
        return Err("the primary runs a different guest image".to_owned());
    }
    memory::region_layout(hello.memory_bytes).map_err(|error| error.to_string())?;
    let guest_pages = hello.memory_bytes / PAGE_SIZE;
    if u64::from(hello.store_pages) > guest_pages {
        return Err(format!(
            "the codec's version store of {} pages is larger than the guest ({guest_pages} pages)",
            hello.store_pages
        ));
    }
    if hello.heartbeat_interval.is_zero() || hello.heartbeat_interval >= heartbeat.timeout() {
        return Err(format!(
            "the primary's heartbeat interval {:?} is not below this secondary's timeout {:?}: it would be declared lost while alive",
            hello.heartbeat_interval,
            heartbeat.timeout()
        ));
    }
    if hello.checkpoint_interval > MAX_CHECKPOINT_INTERVAL {
        return Err(format!(
            "the primary's checkpoint interval {:?} is longer than {MAX_CHECKPOINT_INTERVAL:?}: a primary that stopped checkpointing would go unnoticed that long",
            hello.checkpoint_interval
        ));
    }
    if heartbeat.interval >= hello.heartbeat_timeout {
        return Err(format!(
            "this secondary's heartbeat interval {:?} is not below the primary's timeout {:?}: it would be declared lost while alive",
            heartbeat.interval, hello.heartbeat_timeout
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            purpose: Purpose::Replicate,
            memory_bytes: 64 << 20,
            vcpus: 1,
            guest_image_hash: understudy_vm::boot::guest_image_hash(),
            vm_id: 7,
            owner: 1,
            generation: 0,
            store_pages: 1024,
            heartbeat_interval: Duration::from_millis(10),
            heartbeat_timeout: Duration::from_millis(50),
            checkpoint_interval: Duration::from_millis(25),
            base_image: 0,
        }
    }

    #[test]
    fn a_hello_from_this_build_is_accepted() {
        assert_eq!(
            check_hello(&hello(), &HeartbeatPolicy::default(), false),
            Ok(())
        );
    }

    #[test]
    fn another_protocol_version_is_refused() {
        let other = Hello {
            version: PROTOCOL_VERSION + 1,
            ..hello()
        };

        let refused =
            check_hello(&other, &HeartbeatPolicy::default(), false).expect_err("another version");

        assert!(refused.contains("protocol version"), "{refused}");
    }

    #[test]
    fn a_colo_primary_is_refused_by_a_remus_secondary_and_the_reverse() {
        let colo = Hello {
            purpose: Purpose::Colo,
            ..hello()
        };

        let by_remus = check_hello(&colo, &HeartbeatPolicy::default(), false)
            .expect_err("a Remus secondary refuses COLO");
        let by_colo = check_hello(&hello(), &HeartbeatPolicy::default(), true)
            .expect_err("a COLO secondary refuses Remus");
        let colo_accepted = check_hello(&colo, &HeartbeatPolicy::default(), true);

        assert!(by_remus.contains("--mode colo"), "{by_remus}");
        assert!(by_colo.contains("--mode colo"), "{by_colo}");
        assert_eq!(colo_accepted, Ok(()));
    }

    #[test]
    fn another_guest_image_is_refused() {
        let other = Hello {
            guest_image_hash: hello().guest_image_hash ^ 1,
            ..hello()
        };

        let refused =
            check_hello(&other, &HeartbeatPolicy::default(), false).expect_err("another image");

        assert!(refused.contains("different guest image"), "{refused}");
    }

    #[test]
    fn an_impossible_memory_size_is_refused() {
        let other = Hello {
            memory_bytes: 12345,
            ..hello()
        };

        assert!(check_hello(&other, &HeartbeatPolicy::default(), false).is_err());
    }
}
