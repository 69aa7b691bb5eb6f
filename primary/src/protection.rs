//! One connection to a secondary and the threads that serve it: the
//! greeting, the initial synchronisation (epoch 0 by pre-copy), each later
//! checkpoint (pause, harvest, copy, resume, queue for the sender), and the
//! graceful close.
//!
//! Threads, owned by name in [`Threads`]: the caller's (checkpoints),
//! `sender` (encode and send, in epoch order), `acks` (reads
//! acknowledgements), `heartbeat` (on the connection when idle), the UDP
//! heartbeat pair (`heartbeat-in`, `heartbeat-out`) and, with output commit,
//! `input-log`.

use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use understudy_checkpoint::channel::{Channel, HANDSHAKE_DEADLINE};
use understudy_checkpoint::heartbeat::Heartbeats;
use understudy_checkpoint::link::{LinkSender, LivenessReader};
use understudy_checkpoint::protocol::{
    Handover, Hello, MAX_DISCARD_PAGES, MAX_PAYLOAD, MAX_PAYLOAD_BEFORE_WELCOME,
    MAX_UNACKNOWLEDGED_EPOCHS, Message, PROTOCOL_VERSION, ProtocolError, Purpose,
};
use understudy_compress::PageBatch;
use understudy_compress::batch::is_zero_page;
use understudy_vm::dirty::DirtyBitmap;
use understudy_vm::free_report::FreePages;
use understudy_vm::memory;
use understudy_vm::progress::ProgressSample;
use understudy_vm::{PAGE_BYTES, PAGE_SIZE, Vm, usize_from};

use crate::acks::ack_loop;
use crate::output::{InputLog, OutputCommit};
use crate::pages::{read_nonzero_pages, read_pages};
use crate::sender::{Work, send_loop};
use crate::shared::{Progress, Shared, WaitFailed};
use crate::{CheckpointPhases, EpochMetrics, Identity, PrimaryError, PrimaryEvent, PrimaryOptions};

/// Pages read per batch during pre-copy.
const PRECOPY_CHUNK_PAGES: usize = 16384;
/// Pre-copy stops when a round finds fewer dirty pages than this.
const PRECOPY_DONE_PAGES: usize = 2048;
/// Received frames waiting to be logged to the secondary; beyond this they
/// are dropped from the log (not from the guest): a takeover then misses
/// them, as if the network had lost them.
const INPUT_LOG_QUEUE: usize = 4096;
/// Checkpoints queued for the sender at most (backpressure beyond).
const QUEUED_CHECKPOINTS: usize = 2;

/// A thread whose end can be awaited with a deadline.
struct Worker {
    handle: JoinHandle<()>,
    /// Disconnected when the thread ends.
    finished: Receiver<()>,
}

impl Worker {
    fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> Self {
        let (finished_sender, finished) = sync_channel::<()>(0);
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let _finished = finished_sender;
                body();
            })
            .unwrap_or_else(|error| panic!("cannot spawn the {name} thread: {error}"));
        Self { handle, finished }
    }

    /// Waits until the thread ended or `deadline` passed.
    fn wait_until(&self, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = self.finished.recv_timeout(left);
    }

    fn join(self) {
        let _ = self.handle.join();
    }
}

/// The threads of one protection.
struct Threads {
    heartbeat: JoinHandle<()>,
    sender: Worker,
    acks: Worker,
}

/// A connection to a secondary with its threads.
pub struct Protection {
    link: LinkSender,
    udp: Heartbeats,
    work: Option<SyncSender<Work>>,
    events: Receiver<PrimaryEvent>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    threads: Threads,
    options: PrimaryOptions,
    next_epoch: u64,
    last_checkpoint: Instant,
    epoch_length: Duration,
    next_sync: u64,
    /// A resumed post-copy: the pages the target holds.
    pages_held: Option<DirtyBitmap>,
    /// The image the receiver keeps and builds on (0: none, a full copy).
    base_image: u64,
}

/// What a post-copy's page epoch sent.
pub(crate) struct Pushed {
    /// Pages sent.
    pub sent: u64,
    /// Pages the target asked for.
    pub requested: u64,
}

/// What a post-copy's switchover leaves for the page epoch.
pub(crate) struct Switchover {
    /// The state the target resumed (sent again to end the page epoch).
    state: Vec<u8>,
    metrics: EpochMetrics,
    /// Per page: whether the target lacks it (every page in a post-copy;
    /// in a hybrid migration, those that went stale after pre-copy sent
    /// them).
    missing: Vec<bool>,
}

impl Switchover {
    /// Pages the target lacked at the switchover.
    pub(crate) fn missing_pages(&self) -> usize {
        self.missing.iter().filter(|missing| **missing).count()
    }
}

/// The checkpoint thread at real-time priority (`SCHED_FIFO` 1) while the
/// guest is paused, back to its policy after: on a host whose cores are
/// busy (the sender encoding the last epoch, the secondary, other guests)
/// a checkpoint preempted mid-pause stretches the guest's pause. Needs
/// `CAP_SYS_NICE` (root); without it nothing changes. The pause is bounded
/// (the copy of the dirty set), so the boost cannot starve the host.
/// `UNDERSTUDY_PAUSE_BOOST=0` turns it off.
struct PauseBoost(Option<(libc::c_int, libc::sched_param)>);

/// Whether [`PauseBoost`] is on (read once).
fn pause_boost_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED
        .get_or_init(|| std::env::var("UNDERSTUDY_PAUSE_BOOST").map_or(true, |value| value != "0"))
}

impl PauseBoost {
    fn new() -> Self {
        if !pause_boost_enabled() {
            return Self(None);
        }
        let mut previous = libc::sched_param { sched_priority: 0 };
        // SAFETY: 0 is the calling thread; `previous` is a valid out-pointer.
        let policy = unsafe { libc::sched_getscheduler(0) };
        // SAFETY: as above.
        if policy < 0 || unsafe { libc::sched_getparam(0, &mut previous) } != 0 {
            return Self(None);
        }
        let boosted = libc::sched_param { sched_priority: 1 };
        // SAFETY: 0 is the calling thread; `boosted` is a valid parameter.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &boosted) } != 0 {
            return Self(None);
        }
        Self(Some((policy, previous)))
    }
}

impl Drop for PauseBoost {
    fn drop(&mut self) {
        if let Some((policy, previous)) = self.0 {
            // SAFETY: 0 is the calling thread; `previous` is the parameter
            // read before the boost.
            unsafe { libc::sched_setscheduler(0, policy, &previous) };
        }
    }
}

/// A resumed post-copy's first message from the target: the pages it holds
/// (heartbeats before it are skipped), checked against the guest's size.
fn read_pages_held(reader: &mut LivenessReader, pages: u64) -> Result<DirtyBitmap, PrimaryError> {
    loop {
        match reader.receive()?.message {
            Message::PagesHeld(bytes) => {
                return DirtyBitmap::from_le_bytes(&bytes, usize_from(pages)).ok_or_else(|| {
                    PrimaryError::Refused(format!(
                        "the target reported {} pages held for a guest of {pages} pages",
                        bytes.len() * 8
                    ))
                });
            }
            Message::Heartbeat(_) => {}
            Message::Goodbye(reason) => return Err(PrimaryError::Refused(reason)),
            other => {
                return Err(PrimaryError::Refused(format!(
                    "a resumed post-copy's target sent {} where the pages it holds were due",
                    other.name()
                )));
            }
        }
    }
}

/// The receiver's answer to a `Hello` that named a base image: the tag it
/// builds on, or 0 (heartbeats before it are skipped).
fn read_base_image(reader: &mut LivenessReader) -> Result<u64, PrimaryError> {
    loop {
        match reader.receive()?.message {
            Message::BaseImage(tag) => return Ok(tag),
            Message::Heartbeat(_) => {}
            Message::Goodbye(reason) => return Err(PrimaryError::Refused(reason)),
            other => {
                return Err(PrimaryError::Refused(format!(
                    "the receiver sent {} where its answer about the base image was due",
                    other.name()
                )));
            }
        }
    }
}

/// `dirty` less the pages the guest reports free (see
/// `understudy_vm::free_report`), and how many those were; with `put_back`
/// they go back into the dirty log, to be sent once the guest takes them
/// back (it clears their report before writing them).
fn skip_free(
    vm: &Vm,
    dirty: understudy_vm::dirty::DirtySet,
    put_back: bool,
) -> Result<(understudy_vm::dirty::DirtySet, usize), PrimaryError> {
    let Some(free) = FreePages::read(vm.memory())? else {
        return Ok((dirty, 0));
    };
    let (send, held) = free.split(dirty);
    let skipped = held.count();
    if put_back && skipped > 0 {
        vm.put_back_dirty(&held)?;
    }
    Ok((send, skipped))
}

/// Frames waiting on the tap a planned switchover forwards at most.
const MAX_FORWARDED_FRAMES: usize = 256;

/// Pages per background push of post-copy: small, so that a page the
/// target faults on waits behind little.
const POSTCOPY_CHUNK_PAGES: u64 = 64;
/// Push chunks the target may not have processed yet (1 MiB).
const POSTCOPY_WINDOW_CHUNKS: usize = 4;

impl Protection {
    /// Connects to a secondary or migration target and greets it.
    pub(crate) fn connect(
        vm: &Vm,
        mut options: PrimaryOptions,
        identity: Identity,
        purpose: Purpose,
        checkpoint_interval: Duration,
        base_image: u64,
    ) -> Result<Self, PrimaryError> {
        // A version store larger than the guest holds nothing more, and the
        // secondary refuses one: both ends keep at most the guest's pages.
        options.codec.cache_bytes = options.codec.cache_bytes.min(vm.config().memory_bytes);
        let connect_error = |source| PrimaryError::Connect {
            address: options.secondary,
            source,
        };
        let stream = TcpStream::connect_timeout(&options.secondary, Duration::from_secs(2))
            .map_err(connect_error)?;
        let _ = stream.set_nodelay(true);
        let channel =
            Channel::connect(stream, &options.security, HANDSHAKE_DEADLINE).map_err(|source| {
                PrimaryError::Channel {
                    address: options.secondary,
                    source,
                }
            })?;
        let link = LinkSender::new(channel.writer, options.heartbeat.progress)
            .map_err(ProtocolError::Io)?;
        let mut reader =
            LivenessReader::new(channel.reader, options.heartbeat).map_err(ProtocolError::Io)?;
        reader.limit_payload(MAX_PAYLOAD_BEFORE_WELCOME);
        let config = vm.config();
        link.send(
            0,
            &Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                purpose,
                memory_bytes: config.memory_bytes,
                vcpus: config.vcpus,
                guest_image_hash: understudy_vm::boot::guest_image_hash(),
                vm_id: identity.vm_id,
                owner: identity.owner,
                generation: identity.generation,
                store_pages: u32::try_from(options.codec.cache_pages()).unwrap_or(u32::MAX),
                heartbeat_interval: options.heartbeat.interval,
                heartbeat_timeout: options.heartbeat.timeout(),
                checkpoint_interval,
                base_image,
            }),
        )?;
        loop {
            match reader.receive()?.message {
                Message::Welcome => break,
                Message::Refuse(reason) | Message::Goodbye(reason) => {
                    return Err(PrimaryError::Refused(reason));
                }
                Message::Heartbeat(_) => {}
                other => {
                    return Err(PrimaryError::Refused(format!(
                        "the secondary answered Hello with {}",
                        other.name()
                    )));
                }
            }
        }
        reader.limit_payload(MAX_PAYLOAD);
        let base_image = if base_image == 0 {
            0
        } else {
            read_base_image(&mut reader)?
        };
        let pages_held = if purpose == Purpose::PostcopyResume {
            Some(read_pages_held(
                &mut reader,
                config.memory_bytes / PAGE_SIZE,
            )?)
        } else {
            None
        };
        let local_ip = link.local_addr().map_err(connect_error)?.ip();
        let udp = Heartbeats::to_secondary(
            local_ip,
            options.secondary,
            identity.vm_id,
            options.heartbeat,
            channel.heartbeat_keys,
        )
        .map_err(ProtocolError::Io)?;
        reader.hear(udp.heard());
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared::new());
        if purpose == Purpose::PostcopyResume {
            // Epoch 0 was acknowledged on the connection that broke.
            shared.acknowledged_earlier(0);
        }
        let (work_sender, work) = sync_channel::<Work>(QUEUED_CHECKPOINTS);
        let (events_sender, events) = std::sync::mpsc::channel();
        let heartbeat = link.start_heartbeats(options.heartbeat, stop.clone());
        let sender = {
            let link = link.clone();
            let shared = shared.clone();
            let events = events_sender.clone();
            let codec = options.codec;
            let limit = options.max_bandwidth;
            let generation = identity.generation;
            Worker::spawn("sender", move || {
                send_loop(&link, generation, &codec, limit, &work, &shared, &events);
            })
        };
        // A migration target never takes over: a late message is no sign
        // that it did (a busy source's reader may go unscheduled a while).
        let distrust_gaps = !matches!(purpose, Purpose::Migrate | Purpose::MigratePostcopy);
        let acks = {
            let shared = shared.clone();
            let stop = stop.clone();
            let link = link.clone();
            Worker::spawn("acks", move || {
                ack_loop(
                    &mut reader,
                    &link,
                    &shared,
                    &events_sender,
                    &stop,
                    distrust_gaps,
                );
            })
        };
        Ok(Self {
            link,
            udp,
            work: Some(work_sender),
            events,
            shared,
            stop,
            threads: Threads {
                heartbeat,
                sender,
                acks,
            },
            next_epoch: 0,
            last_checkpoint: Instant::now(),
            epoch_length: options.epoch.target,
            next_sync: 0,
            pages_held,
            base_image,
            options,
        })
    }

    /// Holds the guest's network output until its epoch is acknowledged,
    /// from now until [`Protection::close`]. Call before [`Protection::synchronise`].
    /// Frames the guest receives meanwhile are sent to the secondary, for
    /// replay on takeover.
    pub(crate) fn commit_output(&self, gate: Arc<OutputCommit>) {
        let log = if gate.compares() {
            // COLO: the secondary's guest is fed these frames as they come.
            Some(InputLog::Direct(self.link.clone()))
        } else {
            self.start_input_log()
        };
        gate.begin(log);
        if let Err(gate) = self.shared.output.set(gate) {
            gate.open();
        }
    }

    /// The `input-log` thread (Remus): received frames go to the secondary
    /// in bursts, off the guest's path.
    fn start_input_log(&self) -> Option<InputLog> {
        let (log, logged) = sync_channel::<(u64, Vec<u8>)>(INPUT_LOG_QUEUE);
        // Ends when the gate drops its end (protection over) or the link fails.
        let spawned = self
            .link
            .spawn_frame_writer("input-log", logged, Message::Input);
        match spawned {
            Ok(_) => Some(InputLog::Queued(log)),
            Err(error) => {
                tracing::warn!(%error, "no input log thread: received frames will not be replayed on takeover");
                None
            }
        }
    }

    /// Events from the sender and acknowledgement threads since the last call.
    pub(crate) fn events(&self) -> impl Iterator<Item = PrimaryEvent> + '_ {
        self.events.try_iter()
    }

    /// Bytes of page frames and states sent so far on this connection.
    pub(crate) fn wire_bytes(&self) -> u64 {
        self.shared.wire_bytes()
    }

    fn submit(&self, work: Work) -> Result<(), PrimaryError> {
        if let Some(reason) = self.shared.lost() {
            return Err(PrimaryError::SecondaryLost(reason));
        }
        let Some(queue) = &self.work else {
            return Err(PrimaryError::SecondaryLost("the sender stopped".to_owned()));
        };
        queue.send(work).map_err(|_| {
            PrimaryError::SecondaryLost(
                self.shared
                    .lost()
                    .unwrap_or_else(|| "the sender stopped".to_owned()),
            )
        })
    }

    /// Epoch 0: pre-copy rounds while the guest runs, then a final pause.
    /// `checkpointed` hears about the final checkpoint before any of it is
    /// sent. Returns once the secondary acknowledged it.
    pub(crate) fn synchronise(
        &mut self,
        vm: &mut Vm,
        checkpointed: impl FnOnce(&EpochMetrics),
    ) -> Result<PrimaryEvent, PrimaryError> {
        let started = Instant::now();
        self.begin_initial_copy(vm)?;
        let mut pages = self.send_all_pages(vm, |_| Ok(()))? as u64;
        let mut rounds = 1u32;
        while rounds < self.options.precopy_rounds {
            rounds += 1;
            let sent = self.send_dirty_pages(vm, |_| Ok(()))?;
            pages += sent as u64;
            if sent < PRECOPY_DONE_PAGES {
                break;
            }
        }
        let metrics = self.finish_initial_copy(vm, true, checkpointed)?;
        pages += metrics.dirty_pages as u64;
        self.wait_acknowledged(0)?;
        self.last_checkpoint = Instant::now();
        Ok(PrimaryEvent::Synchronised {
            rounds,
            pages,
            pause: metrics.pause,
            total: started.elapsed(),
        })
    }

    /// Starts epoch 0 and clears the dirty log: from now on every write is
    /// seen.
    pub(crate) fn begin_initial_copy(&mut self, vm: &Vm) -> Result<(), PrimaryError> {
        self.submit(Work::Begin(0))?;
        vm.harvest_dirty()?;
        Ok(())
    }

    /// Pre-copy round 1: queues every non-zero page while the guest runs.
    /// `between_chunks` runs after each chunk (progress, throttling).
    pub(crate) fn send_all_pages(
        &mut self,
        vm: &mut Vm,
        mut between_chunks: impl FnMut(&mut Vm) -> Result<(), PrimaryError>,
    ) -> Result<usize, PrimaryError> {
        if self.base_image != 0 {
            return self.send_changed_since_base(vm, between_chunks);
        }
        let size = memory::size(vm.memory());
        let chunk_bytes = PRECOPY_CHUNK_PAGES as u64 * PAGE_SIZE;
        // Pages the guest reports free now are not sent; if it takes one
        // back, it writes it, and a later round sends it.
        let free = FreePages::read(vm.memory())?;
        let mut pages = 0;
        let mut start = 0;
        while start < size {
            let end = (start + chunk_bytes).min(size);
            let mut batch = self.shared.spare_batch();
            read_nonzero_pages(vm, start..end, free.as_ref(), &mut batch)?;
            pages += batch.len();
            self.submit(Work::Pages(0, batch))?;
            between_chunks(vm)?;
            start = end;
        }
        if let Some(free) = &free {
            // The skipped pages are owed until the guest takes them back.
            vm.put_back_dirty(&free.as_dirty_set(vm.memory()))?;
        }
        Ok(pages)
    }

    /// Round 1 when the receiver builds on a kept image of this memory:
    /// only the pages written since that image ([`Vm::mark_image`]).
    fn send_changed_since_base(
        &mut self,
        vm: &mut Vm,
        mut between_chunks: impl FnMut(&mut Vm) -> Result<(), PrimaryError>,
    ) -> Result<usize, PrimaryError> {
        let changed = vm.dirty_since_mark()?.ok_or_else(|| {
            PrimaryError::Refused(
                "the receiver builds on a kept image, but this VM did not count its writes since"
                    .to_owned(),
            )
        })?;
        let changed = match FreePages::read(vm.memory())? {
            Some(free) => {
                let (send, owed) = free.split(changed);
                vm.put_back_dirty(&owed)?;
                send
            }
            None => changed,
        };
        let addresses: Vec<u64> = changed.page_addresses().collect();
        for chunk in addresses.chunks(PRECOPY_CHUNK_PAGES) {
            let batch = read_pages(vm, chunk, self.shared.spare_batch())?;
            self.submit(Work::Pages(0, batch))?;
            between_chunks(vm)?;
        }
        Ok(addresses.len())
    }

    /// Whether the receiver builds on a kept image (only changed pages go).
    pub(crate) fn builds_on_base(&self) -> bool {
        self.base_image != 0
    }

    /// A pre-copy migration's commit, after epoch 0 was acknowledged: the
    /// target resumes the guest once it reads this (`kept`: the tag of the
    /// image this side keeps, 0: none). Fails only if it certainly was not
    /// sent (the target then never resumes the guest).
    pub(crate) fn send_handover(&self, kept: u64, protect_to: String) -> Result<(), PrimaryError> {
        let epoch = self.next_epoch.saturating_sub(1);
        self.submit(Work::Message(
            epoch,
            Message::Handover(Handover {
                kept_image: kept,
                protect_to,
            }),
        ))
    }

    /// Waits for the target's `TookOver`.
    pub(crate) fn wait_took_over(&self) -> Result<(), PrimaryError> {
        self.wait(|progress| progress.took_over)
    }

    /// A later pre-copy round: queues the pages dirtied since the last
    /// round (the guest runs on). Returns how many.
    pub(crate) fn send_dirty_pages(
        &mut self,
        vm: &mut Vm,
        mut between_chunks: impl FnMut(&mut Vm) -> Result<(), PrimaryError>,
    ) -> Result<usize, PrimaryError> {
        let dirty = skip_free(vm, vm.harvest_dirty()?, true)?.0;
        let addresses: Vec<u64> = dirty.page_addresses().collect();
        for chunk in addresses.chunks(PRECOPY_CHUNK_PAGES) {
            let batch = read_pages(vm, chunk, self.shared.spare_batch())?;
            self.submit(Work::Pages(0, batch))?;
            between_chunks(vm)?;
        }
        Ok(addresses.len())
    }

    /// Waits until the secondary has processed every page queued so far
    /// (a `Sync` after them, answered by `Synced`): the end-to-end rate, with
    /// nothing left in buffers, is what a migration's estimate needs.
    pub(crate) fn drain(&mut self) -> Result<(), PrimaryError> {
        self.next_sync += 1;
        let token = self.next_sync;
        self.submit(Work::Sync(token))?;
        self.wait(|progress| progress.synced >= token)
    }

    /// Waits until `reached`; a secondary that makes no progress for the
    /// policy's deadline meanwhile is declared lost.
    fn wait(&self, reached: impl Fn(&Progress) -> bool) -> Result<(), PrimaryError> {
        match self
            .shared
            .wait_for(reached, self.options.heartbeat.progress)
        {
            Ok(()) => Ok(()),
            Err(WaitFailed::Lost(reason)) => Err(PrimaryError::SecondaryLost(reason)),
            Err(WaitFailed::NoProgress(deadline)) => Err(self.no_progress(deadline)),
        }
    }

    fn no_progress(&self, deadline: Duration) -> PrimaryError {
        let reason = format!(
            "no progress from the secondary for {deadline:?} (heard, but nothing acknowledged)"
        );
        self.shared.lose_link(&self.link, reason.clone());
        PrimaryError::SecondaryLost(reason)
    }

    /// Fails, declaring the secondary lost, when checkpoints wait for an
    /// acknowledgement and none came for the policy's progress deadline
    /// (heartbeats prove the secondary alive, not working).
    pub(crate) fn check_progress(&self) -> Result<(), PrimaryError> {
        if let Some(reason) = self.shared.lost() {
            return Err(PrimaryError::SecondaryLost(reason));
        }
        let deadline = self.options.heartbeat.progress;
        let Some(waiting_since) = self.shared.waiting_since() else {
            return Ok(());
        };
        if self.shared.idle_since(waiting_since) > deadline {
            return Err(self.no_progress(deadline));
        }
        Ok(())
    }

    /// The last pause of epoch 0: the remaining dirty pages and the state.
    /// With `resume` false the guest stays paused (a migration's
    /// switchover). `checkpointed` hears about it before it is sent.
    pub(crate) fn finish_initial_copy(
        &mut self,
        vm: &mut Vm,
        resume: bool,
        checkpointed: impl FnOnce(&EpochMetrics),
    ) -> Result<EpochMetrics, PrimaryError> {
        let (batch, state, metrics) = self.checkpoint(vm, 0, resume, "initial")?;
        checkpointed(&metrics);
        self.submit(Work::Pages(0, batch))?;
        self.submit(Work::End {
            epoch: 0,
            state,
            output: self.output_of(0),
            metrics: Box::new(metrics.clone()),
            checkpointed: Instant::now(),
        })?;
        self.next_epoch = 1;
        Ok(metrics)
    }

    /// Post-copy's switchover (after [`Protection::begin_initial_copy`] and,
    /// in a hybrid migration, pre-copy rounds): pauses the guest for good,
    /// tells the target which pre-copied pages went stale since they were
    /// sent (`Discard`), and ends epoch 0 with the state. The target runs the
    /// guest from its commit and asks for pages as it faults.
    pub(crate) fn switch_to_postcopy(
        &mut self,
        vm: &mut Vm,
        hybrid: bool,
    ) -> Result<Switchover, PrimaryError> {
        let paused = Instant::now();
        vm.pause()?;
        let pages = usize_from(memory::size(vm.memory()) / PAGE_SIZE);
        let missing = if hybrid {
            let stale = vm.harvest_dirty()?;
            let mut missing = vec![false; pages];
            let mut discard = Vec::new();
            for address in stale.page_addresses() {
                let page_number = address / PAGE_SIZE;
                if let Some(slot) = missing.get_mut(usize_from(page_number)) {
                    *slot = true;
                }
                discard.push(page_number);
            }
            for chunk in discard.chunks(MAX_DISCARD_PAGES) {
                self.submit(Work::Message(0, Message::Discard(chunk.to_vec())))?;
            }
            missing
        } else {
            vec![true; pages]
        };
        let state = vm.capture_state()?.encode();
        let now = Instant::now();
        let metrics = EpochMetrics {
            epoch: 0,
            epoch_length: now - self.last_checkpoint,
            pause: paused.elapsed(),
            phases: CheckpointPhases::default(),
            dirty_pages: 0,
            raw_bytes: 0,
            wire_bytes: 0,
            encode: Duration::ZERO,
            send: Duration::ZERO,
            memory_hash: None,
            progress: ProgressSample::read(vm)?,
            cause: "postcopy",
            free_pages: 0,
        };
        self.submit(Work::End {
            epoch: 0,
            state: state.clone(),
            output: Vec::new(),
            metrics: Box::new(metrics.clone()),
            checkpointed: now,
        })?;
        self.next_epoch = 1;
        Ok(Switchover {
            state,
            metrics,
            missing,
        })
    }

    /// Post-copy's epoch 1: every page the target lacks (missing at the
    /// switchover and not among `held`, the pages a resumed target reports),
    /// those it asks for first (`PageRequest`), the rest in order from just
    /// after the last one asked for (pages near a fault are likely next);
    /// zero pages are not pushed (the target's untouched pages are zero),
    /// only sent when asked for. With `verify`, the hash of every page
    /// follows. The guest stays paused here. Returns the pages sent.
    pub(crate) fn push_postcopy(
        &mut self,
        vm: &mut Vm,
        switchover: &Switchover,
        held: Option<&DirtyBitmap>,
    ) -> Result<Pushed, PrimaryError> {
        self.submit(Work::Begin(1))?;
        let total = switchover.missing.len() as u64;
        let held_here = |index: usize| held.is_some_and(|held| held.is_set(index));
        // Pages this connection sent, or never needs to.
        let mut sent: Vec<bool> = (0..switchover.missing.len())
            .map(|index| !switchover.missing[index] || held_here(index))
            .collect();
        let mut unsent = sent.iter().filter(|done| !**done).count();
        // Sync tokens after the chunks in flight: the push keeps at most
        // POSTCOPY_WINDOW_CHUNKS of them unprocessed by the target, so that
        // a page it asks for waits behind little (the socket buffers of a
        // fast link would otherwise hold megabytes).
        let mut in_flight = std::collections::VecDeque::new();
        let mut cursor = 0u64;
        let mut sent_count = 0u64;
        let mut requested = 0u64;
        let mut page = [0u8; PAGE_BYTES];
        loop {
            let (wanted, outside): (Vec<u64>, Vec<u64>) = self
                .shared
                .take_page_requests()
                .into_iter()
                .partition(|page| *page < total);
            if let Some(page_number) = outside.first() {
                // A confused target: nothing to send, nothing to fail.
                tracing::warn!(
                    page_number,
                    count = outside.len(),
                    "the target asked for pages outside guest memory; ignored"
                );
            }
            requested += wanted.len() as u64;
            if !wanted.is_empty() {
                // Asked for: sent even if this connection sent it already
                // (asked again after a reconnection), zero or not.
                let mut addresses: Vec<u64> = wanted.iter().map(|page| page * PAGE_SIZE).collect();
                addresses.sort_unstable();
                addresses.dedup();
                for page_number in &wanted {
                    let index = usize_from(*page_number);
                    if !sent[index] {
                        sent[index] = true;
                        unsent -= 1;
                    }
                }
                let batch = read_pages(vm, &addresses, self.shared.spare_batch())?;
                sent_count += batch.len() as u64;
                self.submit(Work::Pages(1, batch))?;
                cursor = wanted.last().map_or(cursor, |page| page + 1) / POSTCOPY_CHUNK_PAGES
                    * POSTCOPY_CHUNK_PAGES;
                continue;
            }
            if unsent == 0 {
                break;
            }
            if in_flight.len() >= POSTCOPY_WINDOW_CHUNKS {
                let oldest = in_flight[0];
                self.wait(|progress| {
                    progress.synced >= oldest || !progress.page_requests.is_empty()
                })?;
                while in_flight
                    .front()
                    .is_some_and(|token| *token <= self.shared.last_synced())
                {
                    in_flight.pop_front();
                }
                continue;
            }
            if cursor >= total {
                cursor = 0;
            }
            let end = (cursor + POSTCOPY_CHUNK_PAGES).min(total);
            let mut batch = self.shared.spare_batch();
            for page_number in cursor..end {
                let index = usize_from(page_number);
                if sent[index] {
                    continue;
                }
                sent[index] = true;
                unsent -= 1;
                memory::read(vm.memory(), page_number * PAGE_SIZE, &mut page)?;
                if !is_zero_page(&page) {
                    batch.push(page_number, &page);
                }
            }
            cursor = end;
            if batch.is_empty() {
                self.shared.recycle(batch);
            } else {
                sent_count += batch.len() as u64;
                self.submit(Work::Pages(1, batch))?;
                self.next_sync += 1;
                self.submit(Work::Sync(self.next_sync))?;
                in_flight.push_back(self.next_sync);
            }
        }
        if self.options.verify {
            let hashes = memory::page_hashes(vm.memory())?;
            self.submit(Work::Message(1, Message::PageHashes(hashes)))?;
        }
        self.submit(Work::End {
            epoch: 1,
            state: switchover.state.clone(),
            output: Vec::new(),
            metrics: Box::new(EpochMetrics {
                epoch: 1,
                dirty_pages: usize::try_from(sent_count).unwrap_or(usize::MAX),
                ..switchover.metrics.clone()
            }),
            checkpointed: Instant::now(),
        })?;
        self.next_epoch = 2;
        Ok(Pushed {
            sent: sent_count,
            requested,
        })
    }

    /// A resumed post-copy's connection: the pages the target said it
    /// holds (`PagesHeld`, read right after `Welcome`).
    pub(crate) fn take_pages_held(&mut self) -> Option<DirtyBitmap> {
        self.pages_held.take()
    }

    /// Waits until `epoch` is acknowledged.
    pub(crate) fn wait_acknowledged(&self, epoch: u64) -> Result<(), PrimaryError> {
        self.wait(|progress| progress.acknowledged.is_some_and(|acked| acked >= epoch))
    }

    /// Pauses the guest, takes its dirty pages and state, and resumes it if
    /// `resume` (the pause then ends at the resume; otherwise when the
    /// checkpoint is taken).
    fn checkpoint(
        &mut self,
        vm: &mut Vm,
        epoch: u64,
        resume: bool,
        cause: &'static str,
    ) -> Result<(PageBatch, Vec<u8>, EpochMetrics), PrimaryError> {
        let mut phases = CheckpointPhases::default();
        let _boost = PauseBoost::new();
        let paused = Instant::now();
        vm.pause()?;
        phases.stop = paused.elapsed();
        let taken = (|| -> Result<_, PrimaryError> {
            let mut phase = Instant::now();
            let mut lap = || {
                let now = Instant::now();
                let took = now - phase;
                phase = now;
                took
            };
            let dirty = vm.harvest_dirty()?;
            // Pages the guest reports free are not sent; those of a
            // checkpoint the guest runs on after are put back (sent once
            // the guest takes them back).
            let (dirty, free_pages) = skip_free(vm, dirty, resume)?;
            if !resume {
                // The guest stops here for good (a migration's switchover,
                // a planned switchover): its memory as of this checkpoint
                // may be kept as an image; anything written from now on
                // (a device) is counted against it.
                vm.mark_image_as_of_last_harvest();
            }
            phases.harvest = lap();
            let addresses: Vec<u64> = dirty.page_addresses().collect();
            let batch = match read_pages(vm, &addresses, self.shared.spare_batch()) {
                Ok(batch) => batch,
                Err(error) => {
                    // The pages stay dirty for the next checkpoint.
                    vm.put_back_dirty(&dirty)?;
                    return Err(error.into());
                }
            };
            phases.copy = lap();
            let state = vm.capture_state()?.encode();
            phases.state = lap();
            if let Some(gate) = self.shared.output.get() {
                // Still paused: every frame from here on is the next epoch's.
                gate.checkpointed(epoch);
            }
            let memory_hash = if self.options.verify {
                Some(memory::hash(vm.memory())?)
            } else {
                None
            };
            let progress = ProgressSample::read(vm)?;
            phases.other = lap();
            Ok((batch, state, memory_hash, progress, free_pages))
        })();
        if resume || taken.is_err() {
            let resuming = Instant::now();
            vm.resume()?;
            phases.resume = resuming.elapsed();
        }
        let pause = paused.elapsed();
        let (batch, state, memory_hash, progress, free_pages) = taken?;
        let now = Instant::now();
        let metrics = EpochMetrics {
            epoch,
            epoch_length: now - self.last_checkpoint,
            pause,
            phases,
            dirty_pages: batch.len(),
            raw_bytes: batch.content_bytes() as u64,
            wire_bytes: 0,
            encode: Duration::ZERO,
            send: Duration::ZERO,
            memory_hash,
            progress,
            cause,
            free_pages,
        };
        self.last_checkpoint = now;
        Ok((batch, state, metrics))
    }

    /// Takes the next checkpoint and queues it for sending. `checkpointed`
    /// hears about it before any of it is sent (so a record of what the epoch
    /// holds always precedes its acknowledgement). Blocks while two
    /// checkpoints are already waiting to be sent, and while
    /// `MAX_UNACKNOWLEDGED_EPOCHS` sent ones are not acknowledged
    /// (backpressure: the guest runs on, the epoch lengthens).
    /// Returns the epoch taken.
    pub(crate) fn checkpoint_and_send(
        &mut self,
        vm: &mut Vm,
        cause: &'static str,
        checkpointed: impl FnOnce(&EpochMetrics),
    ) -> Result<u64, PrimaryError> {
        let epoch = self.next_epoch;
        if let Some(oldest) = epoch.checked_sub(MAX_UNACKNOWLEDGED_EPOCHS + 1) {
            self.wait_acknowledged(oldest)?;
        }
        let (batch, state, metrics) = self.checkpoint(vm, epoch, true, cause)?;
        self.epoch_length =
            self.options
                .epoch
                .next(self.epoch_length, metrics.pause, metrics.dirty_pages);
        checkpointed(&metrics);
        self.queue_epoch(epoch, batch, state, metrics)?;
        Ok(epoch)
    }

    /// Queues a checkpoint taken as `epoch` (its pages, state and output)
    /// for sending; the next checkpoint is the next epoch.
    fn queue_epoch(
        &mut self,
        epoch: u64,
        batch: PageBatch,
        state: Vec<u8>,
        metrics: EpochMetrics,
    ) -> Result<(), PrimaryError> {
        self.submit(Work::Begin(epoch))?;
        self.submit(Work::Pages(epoch, batch))?;
        self.submit(Work::End {
            epoch,
            state,
            output: self.output_of(epoch),
            metrics: Box::new(metrics),
            checkpointed: Instant::now(),
        })?;
        self.next_epoch += 1;
        Ok(())
    }

    /// A planned switchover: a last checkpoint with the guest paused for
    /// good, acknowledged, then `Handover` (this side keeps the image,
    /// tagged, and waits at `protect_to`). Returns the tag and whether the
    /// secondary confirmed. A failure before the handover went out resumes
    /// the guest here (the secondary was lost, as any other time).
    pub(crate) fn hand_over(
        &mut self,
        vm: &mut Vm,
        protect_to: String,
        checkpointed: impl FnOnce(&EpochMetrics),
    ) -> Result<(u64, bool), PrimaryError> {
        let epoch = self.next_epoch;
        let (batch, state, metrics) = self.checkpoint(vm, epoch, false, "switchover")?;
        checkpointed(&metrics);
        let sent = self
            .queue_epoch(epoch, batch, state, metrics)
            .and_then(|()| self.wait_acknowledged(epoch));
        if let Err(error) = sent {
            vm.forget_mark();
            vm.resume()?;
            return Err(error);
        }
        let tag = crate::migrate::image_tag();
        // Requests that reached this host since the pause would wait for a
        // client's retransmission (200 ms or more) once the guest runs
        // elsewhere: they go to the secondary as the next epoch's input,
        // which its takeover replays into the guest.
        if let Some(net) = vm.net() {
            for frame in net.take_waiting_input(MAX_FORWARDED_FRAMES) {
                let _ = self.submit(Work::Message(epoch + 1, Message::Input(frame)));
            }
        }
        // From here the secondary takes over whatever happens to this
        // connection (its last epoch is committed): the guest stays paused.
        if self.send_handover(tag, protect_to).is_err() {
            return Ok((tag, false));
        }
        Ok((tag, self.wait_took_over().is_ok()))
    }

    /// When the last checkpoint's pause ended.
    pub(crate) fn last_checkpoint(&self) -> Instant {
        self.last_checkpoint
    }

    /// The frames the guest sent during `epoch` (none without a network);
    /// they are fixed once its checkpoint is taken.
    fn output_of(&self, epoch: u64) -> Vec<Vec<u8>> {
        self.shared
            .output
            .get()
            .map_or_else(Vec::new, |gate| gate.frames_of(epoch))
    }

    /// The length of the next epoch (see [`EpochPolicy`](crate::EpochPolicy)).
    /// Takes a new epoch policy from the next checkpoint on (the current
    /// epoch length is brought inside its bounds at once).
    pub(crate) fn set_epoch_policy(&mut self, policy: crate::EpochPolicy) {
        self.epoch_length = self
            .epoch_length
            .clamp(policy.min, policy.target.max(policy.idle));
        self.options.epoch = policy;
    }

    pub(crate) fn epoch_length(&self) -> Duration {
        self.epoch_length
    }

    /// Says goodbye and stops the threads. The close is graceful: after the
    /// goodbye only the sending direction is shut, so the secondary can
    /// still acknowledge what it received, reads the goodbye, and closes its
    /// end; a secondary must never mistake a clean stop for a lost primary.
    pub(crate) fn close(self, reason: &str) {
        self.close_holding(reason).open();
    }

    /// Closes like [`close`](Self::close) but keeps the output gate holding
    /// what it holds: the caller releases it once the witness says this
    /// side may run alone (or never).
    pub(crate) fn close_holding(mut self, reason: &str) -> HeldOutput {
        self.work = None;
        self.stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(2);
        // Let the sender drain what is queued before the goodbye.
        self.threads.sender.wait_until(deadline);
        let _ = self.link.send(0, &Message::Goodbye(reason.to_owned()));
        self.link.shutdown_write();
        // The acknowledgement reader ends when the secondary closes its end.
        self.threads.acks.wait_until(deadline);
        self.link.shutdown();
        let Threads {
            heartbeat,
            sender,
            acks,
        } = self.threads;
        let _ = heartbeat.join();
        sender.join();
        acks.join();
        self.udp.stop();
        HeldOutput(self.shared.output.get().cloned())
    }
}

/// The guest's output still held after a protection ended.
#[must_use = "held output is released only by open()"]
pub(crate) struct HeldOutput(Option<Arc<OutputCommit>>);

impl HeldOutput {
    /// Unprotected from here on: releases what is held, and lets later
    /// output pass.
    pub(crate) fn open(self) {
        if let Some(gate) = self.0 {
            gate.open();
        }
    }
}
