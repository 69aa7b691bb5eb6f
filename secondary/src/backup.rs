//! The backup: a VM that has not run, created from a primary's `Hello`, and
//! what it holds: the memory as of the last committed epoch, that epoch's
//! vCPU/VM state, the frames a takeover replays and the recent output it
//! resends. An epoch is staged ([`Staging`]) and applied by [`Backup::commit`]
//! only when everything about it checks out; the takeover
//! ([`Backup::take_over`]) resumes the guest from the committed epoch.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use understudy_checkpoint::link::LinkSender;
use understudy_checkpoint::protocol::{EpochEnd, Hello, MAX_UNACKNOWLEDGED_EPOCHS, Purpose};
use understudy_compress::PageBatch;
use understudy_vm::memory;
use understudy_vm::progress::ProgressSample;
use understudy_vm::state::VmState;
use understudy_vm::tap::Tap;
use understudy_vm::virtio_net::FrameSink;
use understudy_vm::{PAGE_BYTES, PAGE_SIZE, Vm, VmConfig, usize_from};

use crate::colo::{Lockstep, MAX_WAITING_INPUT};
use crate::fence::SyncedWith;
use crate::{ConnectionError, Failover, SecondaryError};

/// Committed epochs whose output a takeover sends again: as many as the
/// primary may have outstanding without an acknowledgement, plus the last.
const RECENT_OUTPUT_EPOCHS: usize = usize_from(MAX_UNACKNOWLEDGED_EPOCHS) + 1;

/// Most frames kept for replay; older ones are dropped beyond it.
const INPUT_LOG_FRAMES: usize = 16_384;

/// The frames a takeover replays: those the primary's guest received in
/// epochs that never committed here.
#[derive(Default)]
pub(crate) struct InputLog {
    frames: VecDeque<(u64, Vec<u8>)>,
}

impl InputLog {
    /// Keeps a frame of `epoch`, unless that epoch is already committed.
    pub fn record(&mut self, epoch: u64, frame: Vec<u8>, committed: Option<u64>) {
        if committed.is_some_and(|committed| epoch <= committed) {
            return;
        }
        if self.frames.len() == INPUT_LOG_FRAMES {
            self.frames.pop_front();
        }
        self.frames.push_back((epoch, frame));
    }

    /// Forgets the frames of `epoch` and earlier (the guest state has them).
    pub fn committed(&mut self, epoch: u64) {
        self.frames.retain(|(frame_epoch, _)| *frame_epoch > epoch);
    }

    fn len(&self) -> usize {
        self.frames.len()
    }

    fn replay(self) -> impl Iterator<Item = Vec<u8>> {
        self.frames.into_iter().map(|(_, frame)| frame)
    }
}

/// Most bytes of guest output one epoch may stage: far beyond what a guest
/// sends in an epoch at any link rate we reach (the primary checkpoints
/// early when output waits), small enough that the few epochs a takeover
/// keeps stay small.
pub const MAX_OUTPUT_BYTES_PER_EPOCH: usize = 32 << 20;

/// An epoch being received: its pages (each at most once), state and
/// output, checked as they arrive. Public so that the receive path can be
/// fuzzed without KVM (`checkpoint/fuzz`).
#[derive(Default)]
pub struct Staging {
    /// When its `EpochBegin` arrived.
    pub begun: Option<Instant>,
    /// Its decoded pages (later epochs; epoch 0 is written in place).
    pub pages: PageBatch,
    /// Which guest pages are staged (one bit per page): a page staged twice
    /// is refused, so staging never holds more than the guest.
    staged: Vec<u64>,
    /// Pages received, staged or written.
    pub received: u64,
    /// Its VM state.
    pub state: Option<VmState>,
    /// Frames its guest sent.
    pub output: Vec<Vec<u8>>,
    output_bytes: usize,
}

impl Staging {
    /// Gives back the memory of the largest epoch staged so far (after the
    /// initial copy, whose frames are the largest).
    pub fn release_buffers(&mut self) {
        self.clear_staged_bits();
        self.pages = PageBatch::new();
    }

    /// Clears only the bits of the pages staged last time: a pass over the
    /// whole bitmap every epoch would grow with the guest.
    fn clear_staged_bits(&mut self) {
        for page_number in self.pages.page_numbers() {
            if let Some(word) = self.staged.get_mut(usize_from(page_number / 64)) {
                *word = 0;
            }
        }
    }

    /// Starts a new epoch of a guest of `guest_pages` pages.
    pub fn begin(&mut self, guest_pages: u64) {
        self.begun = Some(Instant::now());
        self.clear_staged_bits();
        self.staged.resize(usize_from(guest_pages.div_ceil(64)), 0);
        self.pages.clear();
        self.received = 0;
        self.state = None;
        self.output.clear();
        self.output_bytes = 0;
    }

    /// Stages decoded pages (their numbers were checked against the guest
    /// by the decoder). A page already staged in this epoch is refused.
    pub fn stage_pages(&mut self, epoch: u64, pages: &PageBatch) -> Result<(), ConnectionError> {
        for (page_number, page) in pages.iter() {
            let (word, bit) = (usize_from(page_number / 64), 1u64 << (page_number % 64));
            let slot = self
                .staged
                .get_mut(word)
                .ok_or(ConnectionError::PageOutOfRange { epoch, page_number })?;
            if *slot & bit != 0 {
                return Err(ConnectionError::DuplicatePage { epoch, page_number });
            }
            *slot |= bit;
            self.pages.push(page_number, page);
        }
        self.received += pages.len() as u64;
        Ok(())
    }

    /// Stages a frame the guest sent, within the epoch's output budget.
    pub fn stage_output(&mut self, epoch: u64, frame: Vec<u8>) -> Result<(), ConnectionError> {
        self.output_bytes += frame.len();
        if self.output_bytes > MAX_OUTPUT_BYTES_PER_EPOCH {
            return Err(ConnectionError::OutputTooLarge(epoch));
        }
        self.output.push(frame);
        Ok(())
    }

    /// Time since the epoch began.
    pub fn elapsed(&self) -> Duration {
        self.begun.map_or(Duration::ZERO, |begun| begun.elapsed())
    }
}

/// The hash of `memory` as it would be with `pages` written into it,
/// computed without writing them.
fn hash_after(memory: &memory::GuestMemory, pages: &PageBatch) -> Result<u64, SecondaryError> {
    let mut order: Vec<usize> = (0..pages.len()).collect();
    order.sort_unstable_by_key(|index| pages.page_number(*index));
    let mut next = 0;
    let hash = memory::hash_overlaid(memory, |address, chunk| {
        let end = address + chunk.len() as u64;
        while let Some(&index) = order.get(next) {
            let page_address = pages.page_number(index) * PAGE_SIZE;
            if page_address >= end {
                break;
            }
            if page_address >= address {
                let offset = usize_from(page_address - address);
                chunk[offset..offset + PAGE_BYTES].copy_from_slice(pages.page(index));
            }
            next += 1;
        }
    })?;
    Ok(hash)
}

/// A backup VM, created from a primary's `Hello`.
pub(crate) struct Backup {
    vm: Vm,
    /// The primary this backup is in sync with.
    synced_with: SyncedWith,
    committed: Option<(u64, VmState)>,
    /// Frames the guest received in epochs not committed yet, in order.
    pub input_log: InputLog,
    /// Frames the guest sent in the last few committed epochs: the primary
    /// may have died before releasing them, so a takeover sends them again
    /// (a receiver drops what it already has: TCP by sequence number).
    recent_output: VecDeque<(u64, Vec<Vec<u8>>)>,
    /// COLO: the guest runs from epoch 0's commit on.
    colo: bool,
    /// COLO: the running guest, once epoch 0 is committed.
    lockstep: Option<Lockstep>,
    /// COLO: frames the primary's guest received in epochs this one does
    /// not run yet, in order.
    waiting_input: VecDeque<(u64, Vec<u8>)>,
    /// The guest runs already (post-copy): a takeover hands it over as is.
    running: bool,
    /// A pre-copy migration: resumed only once its source hands it over.
    migration: bool,
    /// The source handed the guest over, keeping an image with this tag
    /// (0: none).
    handed_over: Option<u64>,
    /// Storage-backed: the guest's memory lives in this store, not in the
    /// backup VM's (which stays untouched until a takeover).
    store: Option<crate::store::Store>,
}

impl Backup {
    /// A fresh backup VM of the shape `hello` describes.
    pub fn create(hello: &Hello) -> Result<Self, SecondaryError> {
        let vm = Vm::new(VmConfig::new(hello.memory_bytes, hello.vcpus))?;
        Ok(Self::from_kept(vm, hello))
    }

    /// A backup whose memory lives in a store under `root` (see
    /// [`crate::store`]): the VM is created but its memory never touched.
    pub fn create_stored(hello: &Hello, root: &std::path::Path) -> Result<Self, SecondaryError> {
        let mut backup = Self::create(hello)?;
        backup.store = Some(crate::store::Store::create(
            root,
            hello.vm_id,
            hello.memory_bytes,
        )?);
        Ok(backup)
    }

    /// A backup on `vm`: a fresh one, or an image of the guest kept here
    /// (paused, its writes counted since it was kept and found none), on
    /// which epoch 0 brings only the pages changed since.
    pub fn from_kept(vm: Vm, hello: &Hello) -> Self {
        Self {
            vm,
            synced_with: SyncedWith {
                vm_id: hello.vm_id,
                owner: hello.owner,
                generation: hello.generation,
            },
            committed: None,
            input_log: InputLog::default(),
            recent_output: VecDeque::new(),
            colo: hello.purpose == Purpose::Colo,
            lockstep: None,
            waiting_input: VecDeque::new(),
            running: false,
            migration: hello.purpose == Purpose::Migrate,
            handed_over: None,
            store: None,
        }
    }

    /// Whether this is a pre-copy migration's target whose source has not
    /// handed the guest over: it must not be resumed (the source runs it).
    pub fn awaits_handover(&self) -> bool {
        self.migration && self.handed_over.is_none()
    }

    /// The source handed the guest over (keeping the image `kept`, 0: none).
    pub fn hand_over(&mut self, kept: u64) {
        self.handed_over = Some(kept);
    }

    /// The backup VM's memory.
    pub fn memory(&self) -> &memory::GuestMemory {
        self.vm.memory()
    }

    /// Runs the guest now from its committed state, on `tap` (post-copy:
    /// before its memory is all here).
    pub fn run_now(&mut self, tap: Option<&Arc<Tap>>) -> Result<(), SecondaryError> {
        let Some((_, state)) = &self.committed else {
            return Err(SecondaryError::Vm(understudy_vm::VmError::NotPaused(
                "run a guest that has no committed state",
            )));
        };
        if state.net.is_some() {
            self.vm.attach_guest_tap(tap.cloned())?;
        }
        self.vm.restore_state(state)?;
        if let (Some(net), Some(_)) = (self.vm.net(), tap) {
            net.announce(self.vm.boot_info()?.net_ipv4);
        }
        self.vm.resume()?;
        self.running = true;
        Ok(())
    }

    /// Hybrid migration: drops pre-copied pages that went stale on the
    /// source after they were sent (they fault in again).
    pub fn discard(&self, page_numbers: &[u64]) -> Result<(), ConnectionError> {
        let started = Instant::now();
        understudy_vm::postcopy::discard(self.vm.memory(), page_numbers)?;
        tracing::info!(
            pages = page_numbers.len(),
            micros = started.elapsed().as_micros(),
            "dropped stale pages"
        );
        Ok(())
    }

    /// Forgets the writes into guest memory so far (the received pages):
    /// from now on the dirty log shows what is written here.
    pub fn forget_writes(&self) -> Result<(), SecondaryError> {
        self.vm.harvest_dirty()?;
        Ok(())
    }

    /// A verified post-copy, once every page is here: pauses the guest,
    /// checks every page not written here since [`Self::forget_writes`]
    /// against the source's `hashes` (xxh3 per page, in address order),
    /// and resumes it. Returns the pages checked and the pages written here.
    pub fn verify_pages(&mut self, hashes: &[u64]) -> Result<(u64, u64), ConnectionError> {
        self.vm.pause().map_err(SecondaryError::Vm)?;
        let checked = (|| {
            let written = self.vm.harvest_dirty().map_err(SecondaryError::Vm)?;
            let here = memory::page_hashes(self.vm.memory()).map_err(SecondaryError::Memory)?;
            if here.len() != hashes.len() {
                return Err(ConnectionError::Postcopy(format!(
                    "the source hashed {} pages, this guest has {}",
                    hashes.len(),
                    here.len()
                )));
            }
            let written_here: Vec<bool> = written
                .regions
                .iter()
                .flat_map(|(_, bitmap)| (0..bitmap.len()).map(|page| bitmap.is_set(page)))
                .collect();
            let mut pages = 0u64;
            for (index, (ours, theirs)) in here.iter().zip(hashes).enumerate() {
                if written_here.get(index).copied().unwrap_or(false) {
                    continue;
                }
                if ours != theirs {
                    return Err(ConnectionError::PageDiffers {
                        page_number: index as u64,
                        pages,
                    });
                }
                pages += 1;
            }
            Ok((pages, written.count() as u64))
        })();
        if checked.is_ok() {
            self.vm.resume().map_err(SecondaryError::Vm)?;
        } else {
            self.running = false;
        }
        checked
    }

    /// Stops a running guest (a post-copy that broke).
    pub fn stop_guest(&mut self) {
        if let Err(error) = self.vm.pause() {
            tracing::warn!(%error, "the guest could not be stopped");
        }
        self.running = false;
    }

    /// Memory as of the last committed epoch: the VM's own, except in COLO
    /// mode, where the VM runs a copy.
    fn committed_memory(&self) -> &memory::GuestMemory {
        self.lockstep
            .as_ref()
            .map_or(self.vm.memory(), Lockstep::committed_memory)
    }

    /// COLO: once epoch 0 is committed, starts the guest's copy here (see
    /// [`crate::colo`]): its output goes to the primary over `link`. It
    /// runs from [`run_on`](Self::run_on). Nothing in Remus mode.
    pub fn start_lockstep(&mut self, link: &LinkSender) -> Result<(), SecondaryError> {
        if !self.colo || self.lockstep.is_some() {
            return Ok(());
        }
        let Some((_, state)) = &self.committed else {
            return Ok(());
        };
        self.lockstep = Some(Lockstep::start(&mut self.vm, state, link.clone())?);
        Ok(())
    }

    /// COLO: lets the guest run after a commit (and feeds it the input of
    /// the epoch it now runs). Nothing in Remus mode.
    pub fn run_on(&mut self) -> Result<(), SecondaryError> {
        let Some(lockstep) = &self.lockstep else {
            return Ok(());
        };
        self.vm.resume()?;
        let running = lockstep.running_epoch();
        while let Some((epoch, _)) = self.waiting_input.front() {
            if *epoch > running {
                break;
            }
            let (epoch, frame) = self.waiting_input.pop_front().expect("just seen");
            if epoch == running {
                lockstep.inject(&self.vm, frame);
            }
        }
        Ok(())
    }

    /// A frame the primary's guest received while running `epoch`: kept
    /// for a takeover (Remus), or fed to the running guest (COLO: now if it
    /// runs that epoch, once it does if later, never if earlier).
    pub fn input(&mut self, epoch: u64, frame: Vec<u8>) {
        if !self.colo {
            let committed = self.committed_epoch();
            self.input_log.record(epoch, frame, committed);
            return;
        }
        let running = self.lockstep.as_ref().map_or(0, Lockstep::running_epoch);
        if epoch == running && self.waiting_input.is_empty() {
            if let Some(lockstep) = &self.lockstep {
                lockstep.inject(&self.vm, frame);
            }
        } else if epoch >= running.max(1) {
            if self.waiting_input.len() == MAX_WAITING_INPUT {
                understudy_vm::log_limited!(
                    warn,
                    "the COLO input queue is full: a received frame is dropped"
                );
                self.waiting_input.pop_front();
            }
            self.waiting_input.push_back((epoch, frame));
        }
    }

    /// The primary this backup is in sync with.
    pub fn synced_with(&self) -> SyncedWith {
        self.synced_with
    }

    /// The backup VM's shape.
    pub fn config(&self) -> VmConfig {
        self.vm.config()
    }

    /// The last committed epoch.
    pub fn committed_epoch(&self) -> Option<u64> {
        self.committed.as_ref().map(|(epoch, _)| *epoch)
    }

    /// The guest's size in pages (the highest page number is one less).
    pub fn guest_pages(&self) -> u64 {
        self.vm.config().memory_bytes / PAGE_SIZE
    }

    /// Whether pages go straight into memory: during the initial copy, when
    /// there is nothing to protect yet.
    pub fn writes_in_place(&self) -> bool {
        self.committed.is_none()
    }

    /// Writes pages into the backup memory; writes none unless every page
    /// is inside guest memory.
    pub fn apply(&self, pages: &PageBatch) -> Result<(), SecondaryError> {
        if let Some(store) = &self.store {
            return Ok(store.write_pages(pages)?);
        }
        if let Some((page_number, _)) = pages
            .iter()
            .find(|(page_number, _)| !memory::holds_page(self.vm.memory(), *page_number))
        {
            return Err(SecondaryError::PageOutOfRange(page_number));
        }
        for (page_number, page) in pages.iter() {
            memory::write(self.vm.memory(), page_number * PAGE_SIZE, page)?;
        }
        Ok(())
    }

    /// Applies a staged epoch, atomically: everything about it is checked
    /// before memory or the committed epoch change (page count, state
    /// present, every page inside guest memory, and the memory hash the
    /// primary sent, computed over memory as it would be after the epoch),
    /// so an epoch is applied whole or not at all.
    pub fn commit(
        &mut self,
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
        if staging.state.is_none() {
            return Err(ConnectionError::MissingState(epoch));
        }
        for (page_number, _) in staging.pages.iter() {
            if !memory::holds_page(self.vm.memory(), page_number) {
                return Err(ConnectionError::PageOutOfRange { epoch, page_number });
            }
        }
        // A stored backup's memory is in the store: its hash is checked when
        // a takeover reads it back (with --verify), not at every epoch.
        if let Some(expected) = end.memory_hash.filter(|_| self.store.is_none()) {
            let actual = hash_after(self.committed_memory(), &staging.pages)?;
            if actual != expected {
                return Err(ConnectionError::MemoryHash {
                    epoch,
                    expected,
                    actual,
                });
            }
        }
        let state = staging
            .state
            .take()
            .ok_or(ConnectionError::MissingState(epoch))?;
        match (&mut self.lockstep, &mut self.store) {
            (Some(lockstep), _) => lockstep.load(&mut self.vm, epoch, &staging.pages, &state)?,
            // Durable before the acknowledgement.
            (None, Some(store)) => store
                .commit(epoch, &staging.pages, &state.encode())
                .map_err(SecondaryError::from)?,
            (None, None) => self.apply(&staging.pages)?,
        }
        self.committed = Some((epoch, state));
        self.input_log.committed(epoch);
        self.recent_output
            .push_back((epoch, std::mem::take(&mut staging.output)));
        while self.recent_output.len() > RECENT_OUTPUT_EPOCHS {
            self.recent_output.pop_front();
        }
        Ok(())
    }

    /// Resumes the backup VM from its last committed epoch; gives the backup
    /// back when nothing is committed yet.
    pub fn take_over(
        self,
        last_heard: Instant,
        reason: String,
        verify: bool,
        network: crate::Network<'_>,
        rescue_dir: &std::path::Path,
    ) -> Result<Result<Failover, Backup>, SecondaryError> {
        let tap = network.tap;
        if self.lockstep.is_some() {
            return self.run_on_alone(last_heard, reason, tap).map(Ok);
        }
        if self.running {
            let progress = ProgressSample::read(&self.vm)?;
            return Ok(Ok(Failover {
                vm_id: self.synced_with.vm_id,
                epoch: self.committed_epoch().unwrap_or(0),
                vm: self.vm,
                replayed_frames: 0,
                memory_hash: None,
                progress,
                since_last_heartbeat: last_heard.elapsed(),
                reason,
                migrated: false,
                source_image: None,
                protect_to: None,
            }));
        }
        let Backup {
            mut vm,
            synced_with,
            committed,
            input_log,
            recent_output,
            colo,
            lockstep,
            waiting_input,
            running,
            migration,
            handed_over,
            store,
        } = self;
        let Some((epoch, state)) = committed else {
            return Ok(Err(Backup {
                vm,
                synced_with,
                committed: None,
                input_log,
                recent_output,
                colo,
                lockstep,
                waiting_input,
                running,
                migration,
                handed_over,
                store,
            }));
        };
        // A stored backup: the guest's memory comes from the store, on
        // fault and prefetched behind, from the moment it runs.
        let lazy = match &store {
            Some(store) => Some((
                crate::store::start_lazy_memory(&vm, store.directory())?,
                store.directory().to_owned(),
            )),
            None => None,
        };
        let resumed = (|| -> Result<_, SecondaryError> {
            let memory_hash = if verify {
                Some(memory::hash(vm.memory())?)
            } else {
                None
            };
            // A kept image's VM has its network device already (it ran
            // here before): it is restored with the state, on its tap.
            if state.net.is_some() && vm.net().is_none() {
                if tap.is_none() {
                    tracing::warn!(
                        "the guest has a network interface but this secondary has no --tap: it resumes unreachable"
                    );
                }
                match (network.sinks, tap) {
                    (Some(sinks), Some(tap)) => {
                        let (output, observer) = sinks(tap.clone());
                        vm.attach_guest_net(Some(tap.clone()), output, observer)?;
                    }
                    _ => {
                        vm.attach_guest_tap(tap.cloned())?;
                    }
                }
            }
            vm.restore_state(&state)?;
            let progress = ProgressSample::read(&vm)?;
            let replayed = input_log.len();
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
            // From here every page the guest (or a device) writes is
            // remembered: a return trip to a source that kept its image
            // sends only those.
            vm.mark_image()?;
            vm.resume()?;
            Ok((memory_hash, progress, replayed))
        })();
        if let (Ok(_), Some((handler, directory))) = (&resumed, lazy) {
            crate::store::prefetch(handler, directory, vm.config().memory_bytes / PAGE_SIZE);
        }
        let (memory_hash, progress, replayed) = match resumed {
            Ok(resumed) => resumed,
            Err(error) => {
                // Never lose the only copy: keep the committed checkpoint on
                // disk before giving up.
                let _ = vm.pause();
                let path = rescue_dir.join(format!(
                    "understudy-rescue-vm{:x}-epoch{epoch}.snap",
                    synced_with.vm_id
                ));
                let saved = understudy_checkpoint::snapshot::write_with_state(&vm, &state, &path)
                    .map(|_| path)
                    .map_err(|error| error.to_string());
                return Err(SecondaryError::TakeoverFailed {
                    source: Box::new(error),
                    saved,
                });
            }
        };
        Ok(Ok(Failover {
            vm,
            vm_id: synced_with.vm_id,
            epoch,
            replayed_frames: replayed,
            memory_hash,
            progress,
            since_last_heartbeat: last_heard.elapsed(),
            reason,
            migrated: false,
            source_image: handed_over
                .filter(|tag| *tag != 0)
                .map(|tag| (synced_with.vm_id, tag)),
            protect_to: None,
        }))
    }
}

impl Backup {
    /// COLO takeover: the guest already runs, its output already matched
    /// the primary's; it goes on alone (see [`crate::colo`]): the frames
    /// waiting for a later epoch are fed to it, its network moves to `tap`.
    fn run_on_alone(
        self,
        last_heard: Instant,
        reason: String,
        tap: Option<&Arc<Tap>>,
    ) -> Result<Failover, SecondaryError> {
        let Backup {
            vm,
            committed,
            lockstep,
            waiting_input,
            synced_with,
            ..
        } = self;
        let lockstep = lockstep.expect("called with a running guest");
        let epoch = committed.map_or(0, |(epoch, _)| epoch);
        if vm.net().is_some() && tap.is_none() {
            tracing::warn!(
                "the guest has a network interface but this secondary has no --tap: it runs on unreachable"
            );
        }
        let replayed = waiting_input.len();
        for (_, frame) in waiting_input {
            lockstep.inject(&vm, frame);
        }
        let ipv4 = vm.boot_info()?.net_ipv4;
        let resent = lockstep.take_over(&vm, tap, ipv4);
        tracing::info!(resent, replayed, "the COLO secondary's guest runs on alone");
        let progress = ProgressSample::read(&vm)?;
        Ok(Failover {
            vm,
            vm_id: synced_with.vm_id,
            epoch,
            replayed_frames: replayed,
            memory_hash: None,
            progress,
            since_last_heartbeat: last_heard.elapsed(),
            reason,
            migrated: false,
            source_image: None,
            protect_to: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use understudy_checkpoint::protocol::{PROTOCOL_VERSION, Purpose};
    use understudy_vm::testing::require_kvm;

    use super::*;

    fn hello(vm_id: u64) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            purpose: Purpose::Replicate,
            memory_bytes: 16 << 20,
            vcpus: 1,
            guest_image_hash: understudy_vm::boot::guest_image_hash(),
            vm_id,
            owner: 1,
            generation: 0,
            store_pages: 1024,
            heartbeat_interval: Duration::from_millis(10),
            heartbeat_timeout: Duration::from_millis(50),
            checkpoint_interval: Duration::from_millis(25),
            base_image: 0,
        }
    }

    /// A VM state of the backup's shape, from a real (never run) VM.
    fn state_of(backup: &Backup) -> VmState {
        backup.vm.capture_state().expect("capture a state")
    }

    fn page_of(byte: u8) -> [u8; PAGE_BYTES] {
        [byte; PAGE_BYTES]
    }

    fn read_page(backup: &Backup, page_number: u64) -> [u8; PAGE_BYTES] {
        let mut page = page_of(0);
        memory::read(backup.vm.memory(), page_number * PAGE_SIZE, &mut page).expect("read");
        page
    }

    fn staged(backup: &Backup, pages: &[(u64, u8)]) -> Staging {
        let mut staging = Staging::default();
        staging.begin(backup.guest_pages());
        let mut batch = PageBatch::new();
        for (page_number, byte) in pages {
            batch.push(*page_number, &page_of(*byte));
        }
        staging.stage_pages(1, &batch).expect("stages");
        staging.state = Some(state_of(backup));
        staging
    }

    fn end(pages: u64) -> EpochEnd {
        EpochEnd {
            pages,
            memory_hash: None,
        }
    }

    #[test]
    fn a_committed_epoch_is_in_memory_and_becomes_the_takeover_point() {
        if !require_kvm() {
            return;
        }
        let mut backup = Backup::create(&hello(1)).expect("a backup VM");
        let mut staging = staged(&backup, &[(5, 0xaa), (6, 0xbb)]);

        backup.commit(1, end(2), &mut staging).expect("commit");

        assert_eq!(backup.committed_epoch(), Some(1));
        assert_eq!(read_page(&backup, 5), page_of(0xaa));
        assert_eq!(read_page(&backup, 6), page_of(0xbb));
    }

    #[test]
    fn an_epoch_missing_pages_changes_nothing() {
        if !require_kvm() {
            return;
        }
        let mut backup = Backup::create(&hello(1)).expect("a backup VM");
        let mut staging = staged(&backup, &[(5, 0xaa)]);

        let result = backup.commit(1, end(2), &mut staging);

        assert!(matches!(
            result,
            Err(ConnectionError::PageCount {
                announced: 2,
                received: 1,
                ..
            })
        ));
        assert_eq!(backup.committed_epoch(), None);
        assert_eq!(read_page(&backup, 5), page_of(0));
    }

    #[test]
    fn an_epoch_without_a_state_changes_nothing() {
        if !require_kvm() {
            return;
        }
        let mut backup = Backup::create(&hello(1)).expect("a backup VM");
        let mut staging = staged(&backup, &[(5, 0xaa)]);
        staging.state = None;

        let result = backup.commit(1, end(1), &mut staging);

        assert!(matches!(result, Err(ConnectionError::MissingState(1))));
        assert_eq!(read_page(&backup, 5), page_of(0));
    }

    #[test]
    fn a_memory_hash_mismatch_is_reported() {
        if !require_kvm() {
            return;
        }
        let mut backup = Backup::create(&hello(1)).expect("a backup VM");
        let mut staging = staged(&backup, &[(5, 0xaa)]);
        let wrong = EpochEnd {
            pages: 1,
            memory_hash: Some(0x1234),
        };

        let result = backup.commit(1, wrong, &mut staging);

        assert!(matches!(
            result,
            Err(ConnectionError::MemoryHash {
                expected: 0x1234,
                ..
            })
        ));
    }

    #[test]
    fn an_epoch_with_a_wrong_memory_hash_changes_neither_memory_nor_the_committed_epoch() {
        if !require_kvm() {
            return;
        }
        let mut backup = Backup::create(&hello(1)).expect("a backup VM");
        let mut first = staged(&backup, &[(5, 0xaa)]);
        backup.commit(1, end(1), &mut first).expect("commit");
        let before = memory::hash(backup.vm.memory()).expect("hash");
        let mut second = staged(&backup, &[(5, 0xbb), (6, 0xcc)]);
        let wrong = EpochEnd {
            pages: 2,
            memory_hash: Some(before),
        };

        let result = backup.commit(2, wrong, &mut second);

        assert!(matches!(result, Err(ConnectionError::MemoryHash { .. })));
        assert_eq!(memory::hash(backup.vm.memory()).expect("hash"), before);
        assert_eq!(backup.committed_epoch(), Some(1));
    }

    #[test]
    fn the_right_memory_hash_is_known_before_the_epoch_is_applied() {
        if !require_kvm() {
            return;
        }
        let mut backup = Backup::create(&hello(1)).expect("a backup VM");
        let pages = [(5, 0xaa), (4095, 0xbb)];
        let mut staging = staged(&backup, &pages);
        let expected = hash_after(backup.vm.memory(), &staging.pages).expect("hash");

        backup
            .commit(
                1,
                EpochEnd {
                    pages: 2,
                    memory_hash: Some(expected),
                },
                &mut staging,
            )
            .expect("the hash computed ahead matches");

        assert_eq!(memory::hash(backup.vm.memory()).expect("hash"), expected);
    }

    #[test]
    fn a_page_beyond_guest_memory_is_refused_and_nothing_is_written() {
        if !require_kvm() {
            return;
        }
        let backup = Backup::create(&hello(1)).expect("a backup VM");
        let mut batch = PageBatch::new();
        batch.push(5, &page_of(0xaa));
        batch.push(backup.guest_pages(), &page_of(0xbb));

        let result = backup.apply(&batch);

        assert!(matches!(result, Err(SecondaryError::PageOutOfRange(_))));
        assert_eq!(read_page(&backup, 5), page_of(0));
    }

    #[test]
    fn a_page_staged_twice_in_one_epoch_is_refused() {
        let mut staging = Staging::default();
        staging.begin(16);
        let mut batch = PageBatch::new();
        batch.push(3, &page_of(1));

        staging.stage_pages(1, &batch).expect("first");
        let again = staging.stage_pages(1, &batch);

        assert!(matches!(
            again,
            Err(ConnectionError::DuplicatePage { page_number: 3, .. })
        ));
        assert_eq!(staging.pages.len(), 1);
    }

    #[test]
    fn a_page_staged_in_one_epoch_may_be_staged_again_in_the_next() {
        let mut staging = Staging::default();
        staging.begin(16);
        let mut batch = PageBatch::new();
        batch.push(3, &page_of(1));
        staging.stage_pages(1, &batch).expect("first epoch");

        staging.begin(16);
        let again = staging.stage_pages(2, &batch);

        assert!(again.is_ok(), "{again:?}");
        assert_eq!(staging.pages.len(), 1);
    }

    #[test]
    fn output_beyond_the_epoch_budget_is_refused() {
        let mut staging = Staging::default();
        staging.begin(16);
        let frame = vec![0u8; 9000];
        let frames_in_budget = MAX_OUTPUT_BYTES_PER_EPOCH / frame.len();
        for _ in 0..frames_in_budget {
            staging
                .stage_output(1, frame.clone())
                .expect("within budget");
        }

        let over = staging.stage_output(1, frame);

        assert!(matches!(over, Err(ConnectionError::OutputTooLarge(1))));
    }

    #[test]
    fn a_takeover_that_fails_saves_the_committed_checkpoint() {
        if !require_kvm() {
            return;
        }
        // A committed state of another shape (two vCPUs): restoring it fails.
        let mut backup = Backup::create(&hello(1)).expect("a backup VM");
        let other = Vm::new(VmConfig::new(16 << 20, 2)).expect("another VM");
        let mut staging = staged(&backup, &[(5, 0xaa)]);
        staging.state = Some(other.capture_state().expect("a state"));
        backup.commit(1, end(1), &mut staging).expect("commit");
        let rescue = tempfile::tempdir().expect("a directory");

        let result = backup.take_over(
            Instant::now(),
            "test".to_owned(),
            false,
            crate::Network {
                tap: None,
                sinks: None,
            },
            rescue.path(),
        );

        let Err(SecondaryError::TakeoverFailed { saved, .. }) = result else {
            panic!("the takeover did not fail as expected");
        };
        let saved = saved.expect("the checkpoint was saved");
        assert!(saved.exists(), "{}", saved.display());
        assert!(saved.starts_with(rescue.path()));
    }

    #[test]
    fn nothing_committed_means_no_takeover() {
        if !require_kvm() {
            return;
        }
        let backup = Backup::create(&hello(1)).expect("a backup VM");

        let outcome = backup
            .take_over(
                Instant::now(),
                "test".to_owned(),
                false,
                crate::Network {
                    tap: None,
                    sinks: None,
                },
                std::path::Path::new("."),
            )
            .expect("no VM failure");

        assert!(
            outcome.is_err(),
            "a backup without a committed epoch resumed"
        );
    }

    #[test]
    fn input_of_committed_epochs_is_not_replayed() {
        let mut log = InputLog::default();
        log.record(1, vec![1], None);
        log.record(2, vec![2], None);
        log.record(3, vec![3], Some(3));

        log.committed(1);

        assert_eq!(log.replay().collect::<Vec<_>>(), vec![vec![2]]);
    }

    #[test]
    fn the_input_log_is_bounded() {
        let mut log = InputLog::default();

        for index in 0..=INPUT_LOG_FRAMES {
            log.record(1, vec![u8::try_from(index % 256).expect("a byte")], None);
        }

        assert_eq!(log.len(), INPUT_LOG_FRAMES);
    }

    #[test]
    fn beginning_an_epoch_clears_the_staging() {
        let mut staging = Staging {
            received: 3,
            output: vec![vec![1]],
            ..Staging::default()
        };
        staging.pages.push_zeroed(1);

        staging.begin(16);

        assert_eq!(staging.received, 0);
        assert!(staging.pages.is_empty());
        assert!(staging.output.is_empty());
        assert!(staging.begun.is_some());
    }
}
