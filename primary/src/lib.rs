//! The primary: runs the guest and protects it by streaming checkpoints to a
//! secondary.
//!
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
//!   guest keeps running, unprotected, loudly reported (the caller may
//!   connect again: a new [`Protection`] resynchronises from scratch).
//! - [`migrate`]: live migration over the same connection and epoch 0.
//! - [`output`]: output commit: the guest's network frames are held until
//!   the secondary acknowledged the epoch that produced them.
//!
//! Threads: the caller's (checkpoints), `sender` (encode and send, in epoch
//! order), `acks` (reads acknowledgements), `heartbeat`, `heartbeat-in` and
//! `heartbeat-out` (UDP).

pub mod migrate;
pub mod output;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use understudy_checkpoint::heartbeat::Heartbeats;
use understudy_checkpoint::link::{HeartbeatPolicy, LinkSender, LivenessReader};
use understudy_checkpoint::protocol::{
    EpochEnd, Hello, MAX_UNACKNOWLEDGED_EPOCHS, Message, PROTOCOL_VERSION, ProtocolError, Purpose,
};
use understudy_compress::batch::is_zero_page;
use understudy_compress::codec::MAX_PAGES_PER_FRAME;
use understudy_compress::{CodecError, CodecSpec, Encoder, PageBatch};
use understudy_vm::memory::{self, MemoryError};
use understudy_vm::progress::ProgressSample;
use understudy_vm::{Vm, VmError};

const PAGE_SIZE: u64 = 4096;
/// Pages read per batch during pre-copy.
const PRECOPY_CHUNK_PAGES: usize = 16384;
/// Pre-copy stops when a round finds fewer dirty pages than this.
const PRECOPY_DONE_PAGES: usize = 2048;

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
}

/// How long epochs are: the target length, shortened (down to `min`) while
/// checkpoint pauses exceed `max_pause`, and lengthened back (by 20 % per
/// epoch) once pauses fall under half of it. A shorter epoch leaves the guest
/// less time to dirty pages, so the next pause is shorter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochPolicy {
    /// The epoch length when pauses are within budget.
    pub target: Duration,
    /// The shortest epoch.
    pub min: Duration,
    /// The pause budget per checkpoint.
    pub max_pause: Duration,
}

impl EpochPolicy {
    /// The length of the next epoch after one of `current` whose checkpoint
    /// paused the guest for `pause`.
    pub fn next(&self, current: Duration, pause: Duration) -> Duration {
        let next = if pause > self.max_pause {
            current.mul_f64(0.7)
        } else if pause < self.max_pause / 2 {
            current.mul_f64(1.2)
        } else {
            current
        };
        next.clamp(self.min.min(self.target), self.target)
    }
}

impl std::fmt::Display for EpochPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "epochs of {:?}, shortened down to {:?} while a checkpoint pauses the guest for more than {:?}",
            self.target, self.min, self.max_pause
        )
    }
}

/// A vCPU's counter at a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterReading {
    /// Counter value.
    pub counter: u64,
    /// Its hash chain value.
    pub counter_hash: u64,
}

/// One checkpoint, as it went.
#[derive(Clone, Debug, Default)]
pub struct EpochMetrics {
    /// Epoch number.
    pub epoch: u64,
    /// Time since the previous checkpoint.
    pub epoch_length: Duration,
    /// How long the guest was paused.
    pub pause: Duration,
    /// Dirty pages in the checkpoint.
    pub dirty_pages: usize,
    /// Bytes of page contents.
    pub raw_bytes: u64,
    /// Bytes on the wire (frames and state).
    pub wire_bytes: u64,
    /// Time spent encoding.
    pub encode: Duration,
    /// Time spent writing to the socket.
    pub send: Duration,
    /// Memory hash at the checkpoint (with `verify`).
    pub memory_hash: Option<u64>,
    /// Counters at the checkpoint.
    pub counters: Vec<CounterReading>,
}

/// What the primary reports.
#[derive(Clone, Debug)]
pub enum PrimaryEvent {
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
}

/// Received frames waiting to be logged to the secondary; beyond this they
/// are dropped from the log (not from the guest): a takeover then misses
/// them, as if the network had lost them.
const INPUT_LOG_QUEUE: usize = 4096;

/// Work for the sender thread, in order.
enum Work {
    /// Ask the secondary to confirm it processed everything before.
    Sync(u64),
    Begin(u64),
    Pages(u64, PageBatch),
    End {
        epoch: u64,
        state: Vec<u8>,
        /// The frames the guest sent during the epoch (sent after the state).
        output: Vec<Vec<u8>>,
        metrics: Box<EpochMetrics>,
        checkpointed: Instant,
    },
}

struct Shared {
    /// When each epoch's checkpoint pause ended, until it is acknowledged.
    checkpointed: Mutex<HashMap<u64, Instant>>,
    lost: Mutex<Option<String>>,
    acknowledged: Mutex<Option<u64>>,
    /// Bytes of page frames and states put on the wire so far.
    wire_bytes: std::sync::atomic::AtomicU64,
    /// Batches the sender is done with, kept with their memory: a fresh
    /// allocation would page-fault on every page copied during the pause.
    spare_batches: Mutex<Vec<PageBatch>>,
    /// The last `Synced` token received.
    synced: AtomicU64,
    /// The output-commit gate, when the guest has a network.
    output: std::sync::OnceLock<Arc<output::OutputCommit>>,
}

impl Shared {
    fn lose(&self, reason: String) {
        let mut lost = self.lost.lock().expect("no panics under this lock");
        if lost.is_none() {
            *lost = Some(reason);
        }
    }

    fn lost(&self) -> Option<String> {
        self.lost.lock().expect("no panics under this lock").clone()
    }

    /// An empty batch, with memory from an earlier one when there is one.
    fn spare_batch(&self) -> PageBatch {
        self.spare_batches
            .lock()
            .expect("no panics under this lock")
            .pop()
            .unwrap_or_default()
    }

    fn recycle(&self, mut batch: PageBatch) {
        batch.clear();
        let mut spare = self
            .spare_batches
            .lock()
            .expect("no panics under this lock");
        if spare.len() < 4 {
            spare.push(batch);
        }
    }
}

/// A connection to a secondary with its threads.
pub struct Protection {
    link: LinkSender,
    udp: Option<Heartbeats>,
    work: Option<SyncSender<Work>>,
    events: Receiver<PrimaryEvent>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    options: PrimaryOptions,
    next_epoch: u64,
    last_checkpoint: Instant,
    epoch_length: Duration,
    next_sync: u64,
}

fn counters(vm: &Vm) -> Result<Vec<CounterReading>, VmError> {
    Ok(ProgressSample::read(vm)?
        .vcpus
        .iter()
        .map(|status| CounterReading {
            counter: status.counter,
            counter_hash: status.counter_hash,
        })
        .collect())
}

impl Protection {
    /// Connects to the secondary and greets it, for replication.
    pub fn connect(vm: &Vm, options: PrimaryOptions, vm_id: u64) -> Result<Self, PrimaryError> {
        Self::connect_for(vm, options, vm_id, Purpose::Replicate)
    }

    /// Connects to a secondary or migration target and greets it.
    pub fn connect_for(
        vm: &Vm,
        options: PrimaryOptions,
        vm_id: u64,
        purpose: Purpose,
    ) -> Result<Self, PrimaryError> {
        let stream = TcpStream::connect_timeout(&options.secondary, Duration::from_secs(2))
            .map_err(|source| PrimaryError::Connect {
                address: options.secondary,
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let read_half = stream.try_clone().map_err(ProtocolError::Io)?;
        let link = LinkSender::new(stream);
        let mut reader =
            LivenessReader::new(read_half, options.heartbeat).map_err(ProtocolError::Io)?;
        let config = vm.config();
        link.send(
            0,
            &Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                purpose,
                memory_bytes: config.memory_bytes,
                vcpus: config.vcpus,
                guest_image_hash: understudy_vm::boot::guest_image_hash(),
                vm_id,
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
        let local_ip = read_half_ip(&link, &options)?;
        let udp = Heartbeats::to_secondary(local_ip, options.secondary, vm_id, options.heartbeat)
            .map_err(ProtocolError::Io)?;
        reader.hear(udp.heard());
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            checkpointed: Mutex::new(HashMap::new()),
            lost: Mutex::new(None),
            acknowledged: Mutex::new(None),
            wire_bytes: std::sync::atomic::AtomicU64::new(0),
            spare_batches: Mutex::new(Vec::new()),
            synced: AtomicU64::new(0),
            output: std::sync::OnceLock::new(),
        });
        let (work_sender, work) = sync_channel::<Work>(2);
        let (events_sender, events) = std::sync::mpsc::channel();
        let mut threads = vec![link.start_heartbeats(options.heartbeat, stop.clone())];
        {
            let link = link.clone();
            let shared = shared.clone();
            let events = events_sender.clone();
            let codec = options.codec;
            let limit = options.max_bandwidth;
            threads.push(
                std::thread::Builder::new()
                    .name("sender".to_owned())
                    .spawn(move || send_loop(&link, &codec, limit, &work, &shared, &events))
                    .expect("spawning the sender thread"),
            );
        }
        {
            let shared = shared.clone();
            let stop = stop.clone();
            let link = link.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("acks".to_owned())
                    .spawn(move || ack_loop(&mut reader, &link, &shared, &events_sender, &stop))
                    .expect("spawning the acknowledgement thread"),
            );
        }
        Ok(Self {
            link,
            udp: Some(udp),
            work: Some(work_sender),
            events,
            shared,
            stop,
            threads,
            next_epoch: 0,
            last_checkpoint: Instant::now(),
            epoch_length: options.epoch.target,
            next_sync: 0,
            options,
        })
    }

    /// Holds the guest's network output until its epoch is acknowledged,
    /// from now until [`Protection::close`]. Call before [`Protection::synchronise`].
    /// Frames the guest receives meanwhile are sent to the secondary, for
    /// replay on takeover.
    pub fn commit_output(&self, gate: Arc<output::OutputCommit>) {
        let (log, logged) = sync_channel::<(u64, Vec<u8>)>(INPUT_LOG_QUEUE);
        let link = self.link.clone();
        let spawned = std::thread::Builder::new()
            .name("input-log".to_owned())
            .spawn(move || {
                // Ends when the gate drops its end (protection over) or the link fails.
                for (epoch, frame) in logged {
                    if link.send(epoch, &Message::Input(frame)).is_err() {
                        break;
                    }
                }
            });
        let log = match spawned {
            Ok(_) => Some(log),
            Err(error) => {
                tracing::warn!(%error, "no input log thread: received frames will not be replayed on takeover");
                None
            }
        };
        gate.begin(log);
        if let Err(gate) = self.shared.output.set(gate) {
            gate.open();
        }
    }

    /// Events since the last call.
    pub fn events(&self) -> impl Iterator<Item = PrimaryEvent> + '_ {
        self.events.try_iter()
    }

    /// Why the secondary was lost, if it was.
    pub fn lost(&self) -> Option<String> {
        self.shared.lost()
    }

    /// Bytes of page frames and states sent so far on this connection.
    pub fn wire_bytes(&self) -> u64 {
        self.shared.wire_bytes.load(Ordering::Relaxed)
    }

    /// The last acknowledged epoch.
    pub fn acknowledged(&self) -> Option<u64> {
        *self
            .shared
            .acknowledged
            .lock()
            .expect("no panics under this lock")
    }

    fn submit(&self, work: Work) -> Result<(), PrimaryError> {
        if let Some(reason) = self.lost() {
            return Err(PrimaryError::SecondaryLost(reason));
        }
        let Some(queue) = &self.work else {
            return Err(PrimaryError::SecondaryLost("the sender stopped".to_owned()));
        };
        queue.send(work).map_err(|_| {
            PrimaryError::SecondaryLost(
                self.lost()
                    .unwrap_or_else(|| "the sender stopped".to_owned()),
            )
        })
    }

    /// Epoch 0: pre-copy rounds while the guest runs, then a final pause.
    /// `checkpointed` hears about the final checkpoint before any of it is
    /// sent. Returns once the secondary acknowledged it.
    pub fn synchronise(
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
    pub fn begin_initial_copy(&mut self, vm: &Vm) -> Result<(), PrimaryError> {
        self.submit(Work::Begin(0))?;
        vm.harvest_dirty()?;
        Ok(())
    }

    /// Pre-copy round 1: queues every non-zero page while the guest runs.
    /// `between_chunks` runs after each chunk (progress, throttling).
    pub fn send_all_pages(
        &mut self,
        vm: &mut Vm,
        mut between_chunks: impl FnMut(&mut Vm) -> Result<(), PrimaryError>,
    ) -> Result<usize, PrimaryError> {
        let size = memory::size(vm.memory());
        let chunk_bytes = PRECOPY_CHUNK_PAGES as u64 * PAGE_SIZE;
        let mut pages = 0;
        for start in (0..size).step_by(chunk_bytes as usize) {
            let mut batch = self.shared.spare_batch();
            read_nonzero_pages(vm, start..(start + chunk_bytes).min(size), &mut batch)?;
            pages += batch.len();
            self.submit(Work::Pages(0, batch))?;
            between_chunks(vm)?;
        }
        Ok(pages)
    }

    /// A later pre-copy round: queues the pages dirtied since the last
    /// round (the guest runs on). Returns how many.
    pub fn send_dirty_pages(
        &mut self,
        vm: &mut Vm,
        mut between_chunks: impl FnMut(&mut Vm) -> Result<(), PrimaryError>,
    ) -> Result<usize, PrimaryError> {
        let dirty = vm.harvest_dirty()?;
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
    pub fn drain(&mut self) -> Result<(), PrimaryError> {
        self.next_sync += 1;
        let token = self.next_sync;
        self.submit(Work::Sync(token))?;
        while self.shared.synced.load(Ordering::Relaxed) < token {
            if let Some(reason) = self.lost() {
                return Err(PrimaryError::SecondaryLost(reason));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// The last pause of epoch 0: the remaining dirty pages and the state.
    /// With `resume` false the guest stays paused (a migration's
    /// switchover). `checkpointed` hears about it before it is sent.
    pub fn finish_initial_copy(
        &mut self,
        vm: &mut Vm,
        resume: bool,
        checkpointed: impl FnOnce(&EpochMetrics),
    ) -> Result<EpochMetrics, PrimaryError> {
        let (batch, state, metrics) = self.checkpoint_with(vm, 0, resume)?;
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

    /// Waits until `epoch` is acknowledged.
    pub fn wait_acknowledged(&self, epoch: u64) -> Result<(), PrimaryError> {
        while self.acknowledged().is_none_or(|acked| acked < epoch) {
            if let Some(reason) = self.lost() {
                return Err(PrimaryError::SecondaryLost(reason));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// Pauses the guest, takes its dirty pages and state, resumes it.
    fn checkpoint(
        &mut self,
        vm: &mut Vm,
        epoch: u64,
    ) -> Result<(PageBatch, Vec<u8>, EpochMetrics), PrimaryError> {
        self.checkpoint_with(vm, epoch, true)
    }

    /// Pauses the guest, takes its dirty pages and state, and resumes it if
    /// `resume` (the pause then ends at the resume; otherwise when the
    /// checkpoint is taken).
    fn checkpoint_with(
        &mut self,
        vm: &mut Vm,
        epoch: u64,
        resume: bool,
    ) -> Result<(PageBatch, Vec<u8>, EpochMetrics), PrimaryError> {
        let paused = Instant::now();
        vm.pause()?;
        let taken = (|| -> Result<_, PrimaryError> {
            let dirty = vm.harvest_dirty()?;
            let addresses: Vec<u64> = dirty.page_addresses().collect();
            let batch = match read_pages(vm, &addresses, self.shared.spare_batch()) {
                Ok(batch) => batch,
                Err(error) => {
                    // The pages stay dirty for the next checkpoint.
                    vm.put_back_dirty(&dirty)?;
                    return Err(error.into());
                }
            };
            let state = vm.capture_state()?.encode();
            if let Some(gate) = self.shared.output.get() {
                // Still paused: every frame from here on is the next epoch's.
                gate.checkpointed(epoch);
            }
            let memory_hash = if self.options.verify {
                Some(memory::hash(vm.memory())?)
            } else {
                None
            };
            Ok((batch, state, memory_hash, counters(vm)?))
        })();
        if resume || taken.is_err() {
            vm.resume()?;
        }
        let pause = paused.elapsed();
        let (batch, state, memory_hash, counters) = taken?;
        let now = Instant::now();
        let metrics = EpochMetrics {
            epoch,
            epoch_length: now - self.last_checkpoint,
            pause,
            dirty_pages: batch.len(),
            raw_bytes: batch.content_bytes() as u64,
            memory_hash,
            counters,
            ..EpochMetrics::default()
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
    pub fn checkpoint_and_send(
        &mut self,
        vm: &mut Vm,
        checkpointed: impl FnOnce(&EpochMetrics),
    ) -> Result<(), PrimaryError> {
        let epoch = self.next_epoch;
        if let Some(oldest) = epoch.checked_sub(MAX_UNACKNOWLEDGED_EPOCHS + 1) {
            self.wait_acknowledged(oldest)?;
        }
        let (batch, state, metrics) = self.checkpoint(vm, epoch)?;
        self.epoch_length = self.options.epoch.next(self.epoch_length, metrics.pause);
        checkpointed(&metrics);
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

    /// When the last checkpoint's pause ended.
    pub fn last_checkpoint(&self) -> Instant {
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

    /// The length of the next epoch (see [`EpochPolicy`]).
    pub fn epoch_length(&self) -> Duration {
        self.epoch_length
    }

    /// Says goodbye and stops the threads. The close is graceful: after the
    /// goodbye only the sending direction is shut, so the secondary can
    /// still acknowledge what it received, reads the goodbye, and closes its
    /// end; a secondary must never mistake a clean stop for a lost primary.
    pub fn close(mut self, reason: &str) {
        self.work = None;
        self.stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(2);
        // Let the sender drain what is queued before the goodbye.
        if let Some(sender) = self.threads.get(1) {
            while !sender.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let _ = self.link.send(0, &Message::Goodbye(reason.to_owned()));
        self.link.shutdown_write();
        // The acknowledgement reader ends when the secondary closes its end.
        if let Some(acks) = self.threads.get(2) {
            while !acks.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.link.shutdown();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        if let Some(udp) = self.udp.take() {
            udp.stop();
        }
        if let Some(gate) = self.shared.output.get() {
            // Unprotected from here on: nothing more to wait for.
            gate.open();
        }
    }
}

/// The local IP address of the connection (heartbeats leave from it).
fn read_half_ip(
    link: &LinkSender,
    options: &PrimaryOptions,
) -> Result<std::net::IpAddr, PrimaryError> {
    link.local_addr()
        .map(|address| address.ip())
        .map_err(|source| PrimaryError::Connect {
            address: options.secondary,
            source,
        })
}

/// Copies the pages at `addresses` (sorted) out of guest memory into
/// `batch` (empty), one copy per run of consecutive pages.
pub fn read_pages(
    vm: &Vm,
    addresses: &[u64],
    mut batch: PageBatch,
) -> Result<PageBatch, MemoryError> {
    let mut index = 0;
    while index < addresses.len() {
        let first = addresses[index];
        let mut count = 1;
        while index + count < addresses.len()
            && addresses[index + count] == first + count as u64 * PAGE_SIZE
        {
            count += 1;
        }
        let run = batch.push_run_zeroed(first / PAGE_SIZE, count);
        memory::read(vm.memory(), first, run)?;
        index += count;
    }
    Ok(batch)
}

/// Appends to `batch` every page of guest memory in `range` (page-aligned)
/// that is not all zero: what a first full copy has to send.
pub fn read_nonzero_pages(
    vm: &Vm,
    range: std::ops::Range<u64>,
    batch: &mut PageBatch,
) -> Result<(), MemoryError> {
    let mut page = [0u8; PAGE_SIZE as usize];
    for address in range.step_by(PAGE_SIZE as usize) {
        memory::read(vm.memory(), address, &mut page)?;
        if !is_zero_page(&page) {
            batch.push(address / PAGE_SIZE, &page);
        }
    }
    Ok(())
}

fn send_loop(
    link: &LinkSender,
    codec: &CodecSpec,
    limit: Option<f64>,
    work: &Receiver<Work>,
    shared: &Shared,
    events: &std::sync::mpsc::Sender<PrimaryEvent>,
) {
    let mut encoder = Encoder::new(codec);
    let mut frame = Vec::new();
    let limiter_started = Instant::now();
    let mut limited_bytes = 0f64;
    let mut pages = 0u64;
    let mut wire = 0u64;
    let mut encode = Duration::ZERO;
    let mut send = Duration::ZERO;
    let result = (|| -> Result<(), PrimaryError> {
        for item in work {
            match item {
                Work::Sync(token) => link.send(0, &Message::Sync(token))?,
                Work::Begin(epoch) => {
                    pages = 0;
                    wire = 0;
                    encode = Duration::ZERO;
                    send = Duration::ZERO;
                    link.send(epoch, &Message::EpochBegin)?;
                }
                Work::Pages(epoch, batch) => {
                    pages += batch.len() as u64;
                    let parts = if batch.len() > MAX_PAGES_PER_FRAME {
                        split(&batch, MAX_PAGES_PER_FRAME)
                    } else {
                        Vec::new()
                    };
                    let whole = [batch];
                    let to_send = if parts.is_empty() {
                        &whole[..]
                    } else {
                        &parts[..]
                    };
                    for part in to_send {
                        frame.clear();
                        let started = Instant::now();
                        encoder.encode(part, &mut frame)?;
                        encode += started.elapsed();
                        let started = Instant::now();
                        let message = Message::Pages(std::mem::take(&mut frame));
                        link.send(epoch, &message)?;
                        send += started.elapsed();
                        if let Message::Pages(bytes) = message {
                            wire += bytes.len() as u64;
                            shared
                                .wire_bytes
                                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                            if let Some(limit) = limit {
                                // Keep the average under the limit.
                                limited_bytes += bytes.len() as f64;
                                let due = Duration::from_secs_f64(limited_bytes / limit);
                                let elapsed = limiter_started.elapsed();
                                if due > elapsed {
                                    std::thread::sleep(due - elapsed);
                                }
                            }
                            frame = bytes;
                        }
                    }
                    let [batch] = whole;
                    shared.recycle(batch);
                }
                Work::End {
                    epoch,
                    state,
                    output,
                    mut metrics,
                    checkpointed,
                } => {
                    let started = Instant::now();
                    wire += state.len() as u64;
                    shared
                        .wire_bytes
                        .fetch_add(state.len() as u64, Ordering::Relaxed);
                    link.send(epoch, &Message::State(state))?;
                    for frame in output {
                        wire += frame.len() as u64;
                        link.send(epoch, &Message::Output(frame))?;
                    }
                    shared
                        .checkpointed
                        .lock()
                        .expect("no panics under this lock")
                        .insert(epoch, checkpointed);
                    link.send(
                        epoch,
                        &Message::EpochEnd(EpochEnd {
                            pages,
                            memory_hash: metrics.memory_hash,
                        }),
                    )?;
                    send += started.elapsed();
                    metrics.wire_bytes = wire;
                    metrics.encode = encode;
                    metrics.send = send;
                    let _ = events.send(PrimaryEvent::Sent(*metrics));
                }
            }
        }
        Ok(())
    })();
    if let Err(error) = result {
        shared.lose(format!("sending failed: {error}"));
        link.shutdown();
    }
}

/// Splits a batch into frames of at most `max` pages.
fn split(batch: &PageBatch, max: usize) -> Vec<PageBatch> {
    let mut parts = Vec::new();
    let mut part = PageBatch::with_capacity(max);
    for (page_number, page) in batch.iter() {
        part.push(page_number, page);
        if part.len() == max {
            parts.push(std::mem::take(&mut part));
        }
    }
    if !part.is_empty() {
        parts.push(part);
    }
    parts
}

/// Reads acknowledgements until the connection ends. When the secondary is
/// lost, the socket is shut down so that a sender blocked in a write wakes
/// up, and the checkpoint loop learns of the loss at its next submission.
fn ack_loop(
    reader: &mut LivenessReader,
    link: &LinkSender,
    shared: &Shared,
    events: &std::sync::mpsc::Sender<PrimaryEvent>,
    stop: &AtomicBool,
) {
    let lose = |reason: String| {
        shared.lose(reason);
        link.shutdown();
    };
    loop {
        let envelope = match reader.receive() {
            Ok(envelope) => envelope,
            Err(error) => {
                if !stop.load(Ordering::Relaxed) {
                    lose(format!("{error}: {}", error_source(&error)));
                }
                return;
            }
        };
        match envelope.message {
            Message::Ack => {
                let epoch = envelope.epoch;
                *shared
                    .acknowledged
                    .lock()
                    .expect("no panics under this lock") = Some(epoch);
                let checkpointed = shared
                    .checkpointed
                    .lock()
                    .expect("no panics under this lock")
                    .remove(&epoch);
                if let Some(gate) = shared.output.get() {
                    gate.acknowledge(epoch);
                }
                let latency = checkpointed.map_or(Duration::ZERO, |at| at.elapsed());
                let _ = events.send(PrimaryEvent::Acknowledged { epoch, latency });
            }
            Message::Heartbeat(_) => {}
            Message::Synced(token) => {
                shared.synced.fetch_max(token, Ordering::Relaxed);
            }
            Message::Goodbye(reason) => {
                lose(format!("the secondary left: {reason}"));
                return;
            }
            other => {
                lose(format!("the secondary sent an unexpected {}", other.name()));
                return;
            }
        }
    }
}

fn error_source(error: &ProtocolError) -> String {
    std::error::Error::source(error).map_or_else(String::new, ToString::to_string)
}

/// Waits for the next epoch boundary, or returns early when `stop` is set.
pub fn wait_for_epoch(next: Instant, stop: &AtomicBool) {
    wait_until(next, stop, Duration::from_millis(2), || false);
}

/// Waits for the epoch boundary `next`, or until the guest has sent output
/// through `gate` and `earliest` has passed (then the checkpoint that
/// releases it is taken at once), or `stop` is set.
pub fn wait_for_epoch_or_output(
    next: Instant,
    stop: &AtomicBool,
    gate: &output::OutputCommit,
    earliest: Instant,
) {
    wait_until(next, stop, Duration::from_micros(200), || {
        Instant::now() >= earliest && gate.output_waiting()
    });
}

/// Sleeps in steps of at most `step` until `deadline`, `stop`, or `ready()`.
fn wait_until(deadline: Instant, stop: &AtomicBool, step: Duration, ready: impl Fn() -> bool) {
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) && !ready() {
        let left = deadline.saturating_duration_since(Instant::now());
        std::thread::sleep(left.min(step));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> EpochPolicy {
        EpochPolicy {
            target: Duration::from_millis(25),
            min: Duration::from_millis(5),
            max_pause: Duration::from_millis(2),
        }
    }

    #[test]
    fn long_pause_shortens_the_epoch() {
        let next = policy().next(Duration::from_millis(25), Duration::from_millis(3));
        assert_eq!(next, Duration::from_micros(17_500));
    }

    #[test]
    fn epoch_never_goes_below_the_minimum() {
        let next = policy().next(Duration::from_millis(6), Duration::from_millis(10));
        assert_eq!(next, Duration::from_millis(5));
    }

    #[test]
    fn short_pauses_grow_the_epoch_back_to_the_target_only() {
        let next = policy().next(Duration::from_millis(24), Duration::from_micros(100));
        assert_eq!(next, Duration::from_millis(25));
    }

    #[test]
    fn pause_within_budget_keeps_the_epoch() {
        let next = policy().next(Duration::from_millis(10), Duration::from_micros(1500));
        assert_eq!(next, Duration::from_millis(10));
    }

    #[test]
    fn large_batches_are_split_into_frames() {
        let mut batch = PageBatch::new();
        for page_number in 0..7 {
            batch.push_zeroed(page_number);
        }

        let parts = split(&batch, 3);

        assert_eq!(
            parts.iter().map(PageBatch::len).collect::<Vec<_>>(),
            vec![3, 3, 1]
        );
    }
}
