//! COLO on the secondary: the backup VM runs in lockstep with the primary's
//! guest instead of waiting paused.
//!
//! ```text
//! epoch 0 committed   -> the committed memory is copied aside; the guest's
//!                        network device sends to the primary's compare
//!                        proxy; the guest resumes, running epoch 1
//! Input (epoch e)     -> e == running epoch: injected into the guest now
//!                        (acknowledgement numbers rewritten, see below)
//!                        e >  running epoch: waits for the checkpoint that
//!                        starts e (bounded, MAX_WAITING_INPUT)
//!                        e <  running epoch: dropped (the checkpoint has it)
//! guest output        -> SecondaryOutput (tagged with the running epoch),
//!                        through a bounded queue and the `colo-output` thread
//! epoch n committed   -> the guest pauses; the pages it wrote since the last
//!                        checkpoint (its dirty log) and the epoch's pages are
//!                        copied from the committed memory (n applied); the
//!                        primary's vCPU and device state replace its own;
//!                        Ack n; the guest resumes, running epoch n + 1
//! primary lost        -> the guest runs on: its output goes to this host's
//!                        tap (sequence numbers rewritten), the tap feeds it,
//!                        its address is announced, and its recent output is
//!                        sent again (the primary may have died holding it)
//! ```
//!
//! Sequence rewriting (`understudy_proxy::rewrite`): the guest picks its
//! own TCP initial sequence numbers; until a checkpoint makes the copies
//! equal, acknowledgements from clients (which know the primary's) are
//! moved into its space on the way in, and after a takeover its segments
//! are moved back into the clients' space on the way out. With the kv
//! guest's smoltcp both copies draw the same numbers from the same random
//! state, so the offset is usually zero; it matters when they diverge.
//!
//! Memory: a COLO secondary holds the guest twice (the running copy and the
//! committed one). Failure model: a load that fails (the dirty log cannot
//! be read: everything is copied instead; the state does not restore: the
//! connection ends, and the primary resynchronises a fresh backup) never
//! leaves a half-loaded guest running; a full output queue drops the frame
//! (the primary then sees a mismatch or a timeout and checkpoints); a full
//! input queue drops the frame (the copies diverge, and a checkpoint
//! corrects it).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};

use understudy_checkpoint::link::LinkSender;
use understudy_checkpoint::protocol::Message;
use understudy_compress::PageBatch;
use understudy_proxy::rewrite::SequenceRewriter;
use understudy_vm::memory::{self, GuestMemory};
use understudy_vm::state::VmState;
use understudy_vm::tap::Tap;
use understudy_vm::virtio_net::{FrameFilter, FrameSink};
use understudy_vm::{PAGE_BYTES, PAGE_SIZE, Vm, log_limited};

use crate::SecondaryError;

/// Input frames of later epochs kept at most.
pub(crate) const MAX_WAITING_INPUT: usize = 16_384;
/// Output frames queued for the primary at most.
const OUTPUT_QUEUE: usize = 4096;
/// Output frames since the last checkpoint kept for a takeover to resend.
const RECENT_OUTPUT_FRAMES: usize = 256;

/// Where the running guest's frames go.
enum Route {
    /// To the primary's compare proxy (tagged with the running epoch).
    Primary(SyncSender<(u64, Vec<u8>)>),
    /// Out, after a takeover (none: this host has no tap).
    Tap(Option<Arc<Tap>>),
}

struct OutputState {
    route: Route,
    /// Output since the last checkpoint, for a takeover to resend.
    recent: VecDeque<Vec<u8>>,
}

/// The running guest's network output; see the module docs.
pub(crate) struct ColoOutput {
    /// The epoch the guest runs (set while it is paused).
    running_epoch: AtomicU64,
    state: Mutex<OutputState>,
    rewriter: Arc<Mutex<SequenceRewriter>>,
}

fn lock_rewriter(rewriter: &Mutex<SequenceRewriter>) -> MutexGuard<'_, SequenceRewriter> {
    rewriter
        .lock()
        .expect("no panics while the sequence rewriter is held")
}

impl ColoOutput {
    fn lock(&self) -> MutexGuard<'_, OutputState> {
        self.state
            .lock()
            .expect("no panics while the COLO output is held")
    }
}

impl FrameSink for ColoOutput {
    fn send(&self, frame: &[u8]) {
        let mut guard = self.lock();
        let state = &mut *guard;
        let mut frame = frame.to_vec();
        match &state.route {
            Route::Primary(queue) => {
                lock_rewriter(&self.rewriter).learn_output(&frame);
                if state.recent.len() == RECENT_OUTPUT_FRAMES {
                    state.recent.pop_front();
                }
                state.recent.push_back(frame.clone());
                let epoch = self.running_epoch.load(Ordering::Relaxed);
                match queue.try_send((epoch, frame)) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                        log_limited!(
                            warn,
                            "a frame of the secondary's guest could not be queued for the primary's compare proxy; dropped"
                        );
                    }
                }
            }
            Route::Tap(tap) => {
                lock_rewriter(&self.rewriter).rewrite_output(&mut frame);
                if let Some(tap) = tap {
                    tap.send(&frame);
                }
            }
        }
    }
}

/// Rewrites frames from the tap into the guest's sequence space (after a
/// takeover).
struct InputRewriter(Arc<Mutex<SequenceRewriter>>);

impl FrameFilter for InputRewriter {
    fn filter(&self, frame: &mut [u8]) {
        let mut rewriter = lock_rewriter(&self.0);
        rewriter.learn_input(frame);
        rewriter.rewrite_input(frame);
    }
}

/// The running side of a COLO backup; see the module docs.
pub(crate) struct Lockstep {
    /// Memory as of the last committed epoch (the VM's is the running copy).
    committed: GuestMemory,
    output: Arc<ColoOutput>,
    rewriter: Arc<Mutex<SequenceRewriter>>,
}

impl Lockstep {
    /// Epoch 0 is committed in `vm`'s memory with `state`: keeps a copy of
    /// the memory, gives the guest a network device whose output goes to
    /// the primary over `link`, and loads the state. The guest resumes with
    /// [`run_on`](Self::run_on).
    pub fn start(vm: &mut Vm, state: &VmState, link: LinkSender) -> Result<Self, SecondaryError> {
        let committed = memory::create(memory::size(vm.memory()))?;
        memory::copy_all(vm.memory(), &committed)?;
        let rewriter = Arc::new(Mutex::new(SequenceRewriter::new()));
        let (queue, queued) = sync_channel::<(u64, Vec<u8>)>(OUTPUT_QUEUE);
        // Ends when the route changes (a takeover), the guest is gone, or
        // the link fails.
        link.spawn_frame_writer("colo-output", queued, Message::SecondaryOutput)
            .map_err(|source| SecondaryError::Vm(understudy_vm::VmError::SpawnThread(source)))?;
        let output = Arc::new(ColoOutput {
            running_epoch: AtomicU64::new(1),
            state: Mutex::new(OutputState {
                route: Route::Primary(queue),
                recent: VecDeque::new(),
            }),
            rewriter: rewriter.clone(),
        });
        if state.net.is_some() {
            vm.attach_guest_net(None, output.clone(), None)?;
        }
        vm.restore_state(state)?;
        // The copy's own writes are not the guest's.
        vm.harvest_dirty()?;
        Ok(Self {
            committed,
            output,
            rewriter,
        })
    }

    /// Memory as of the last committed epoch.
    pub fn committed_memory(&self) -> &GuestMemory {
        &self.committed
    }

    /// The epoch the guest runs.
    pub fn running_epoch(&self) -> u64 {
        self.output.running_epoch.load(Ordering::Relaxed)
    }

    /// Feeds a frame the primary's guest received to this one (its
    /// acknowledgement number rewritten).
    pub fn inject(&self, vm: &Vm, mut frame: Vec<u8>) {
        {
            let mut rewriter = lock_rewriter(&self.rewriter);
            rewriter.learn_input(&frame);
            rewriter.rewrite_input(&mut frame);
        }
        if let Some(net) = vm.net() {
            net.inject([frame]);
        }
    }

    /// Loads committed epoch `epoch` (its `pages`, already checked, and
    /// `state`) into the paused guest: the committed memory gets the pages,
    /// and every page either copy wrote since the last checkpoint is copied
    /// from it. The guest stays paused until [`run_on`](Self::run_on).
    pub fn load(
        &mut self,
        vm: &mut Vm,
        epoch: u64,
        pages: &PageBatch,
        state: &VmState,
    ) -> Result<(), SecondaryError> {
        vm.pause()?;
        let own_writes = match vm.harvest_dirty() {
            Ok(dirty) => Some(dirty),
            Err(error) => {
                tracing::warn!(%error, "the running copy's dirty log could not be read: all of its memory is replaced");
                None
            }
        };
        for (page_number, page) in pages.iter() {
            memory::write(&self.committed, page_number * PAGE_SIZE, page)?;
            memory::write(vm.memory(), page_number * PAGE_SIZE, page)?;
        }
        match own_writes {
            Some(dirty) => {
                let mut page = [0u8; PAGE_BYTES];
                for address in dirty.page_addresses() {
                    memory::read(&self.committed, address, &mut page)?;
                    memory::write(vm.memory(), address, &page)?;
                }
            }
            None => memory::copy_all(&self.committed, vm.memory())?,
        }
        vm.restore_state(state)?;
        // The copy's own writes are not the guest's.
        vm.harvest_dirty()?;
        if let Some(net) = vm.net() {
            // Frames of the epoch just committed that this copy had not
            // taken yet: the primary's state has them.
            net.clear_injected();
        }
        lock_rewriter(&self.rewriter).checkpointed();
        let mut output = self.output.lock();
        output.recent.clear();
        self.output
            .running_epoch
            .store(epoch + 1, Ordering::Relaxed);
        Ok(())
    }

    /// The primary is lost: the guest's output goes to `tap` from now on
    /// and the tap feeds it, both rewritten; its address is announced at
    /// `ipv4` and its output since the last checkpoint is sent again.
    /// Returns how many frames were resent.
    pub fn take_over(&self, vm: &Vm, tap: Option<&Arc<Tap>>, ipv4: [u8; 4]) -> usize {
        let recent = {
            let mut output = self.output.lock();
            // Dropping the primary's queue ends the `colo-output` thread.
            output.route = Route::Tap(tap.cloned());
            std::mem::take(&mut output.recent)
        };
        let Some(net) = vm.net() else {
            return 0;
        };
        net.plug_input(
            tap.cloned(),
            Some(Arc::new(InputRewriter(self.rewriter.clone()))),
        );
        net.announce(ipv4);
        // What the primary may have held when it died: receivers drop what
        // they already have (TCP by sequence number).
        let mut resent = 0;
        for frame in recent {
            self.output.send(&frame);
            resent += 1;
        }
        resent
    }
}
