//! The backup: a VM that has not run, created from a primary's `Hello`, and
//! what it holds: the memory as of the last committed epoch, that epoch's
//! vCPU/VM state, the frames a takeover replays and the recent output it
//! resends. An epoch is staged ([`Staging`]) and applied by [`Backup::commit`]
//! only when everything about it checks out; the takeover
//! ([`Backup::take_over`]) resumes the guest from the committed epoch.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use understudy_checkpoint::protocol::{EpochEnd, Hello, MAX_UNACKNOWLEDGED_EPOCHS};
use understudy_compress::PageBatch;
use understudy_vm::memory;
use understudy_vm::progress::ProgressSample;
use understudy_vm::state::VmState;
use understudy_vm::tap::Tap;
use understudy_vm::virtio_net::FrameSink;
use understudy_vm::{PAGE_SIZE, Vm, VmConfig, usize_from};

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

/// An epoch being received.
#[derive(Default)]
pub(crate) struct Staging {
    /// When its `EpochBegin` arrived.
    pub begun: Option<Instant>,
    /// Its decoded pages (later epochs; epoch 0 is written in place).
    pub pages: PageBatch,
    /// Pages received, staged or written.
    pub received: u64,
    /// Its VM state.
    pub state: Option<VmState>,
    /// Frames its guest sent.
    pub output: Vec<Vec<u8>>,
}

impl Staging {
    /// Starts a new epoch.
    pub fn begin(&mut self) {
        self.begun = Some(Instant::now());
        self.pages.clear();
        self.received = 0;
        self.state = None;
        self.output.clear();
    }

    /// Time since the epoch began.
    pub fn elapsed(&self) -> Duration {
        self.begun.map_or(Duration::ZERO, |begun| begun.elapsed())
    }
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
}

impl Backup {
    /// A fresh backup VM of the shape `hello` describes.
    pub fn create(hello: &Hello) -> Result<Self, SecondaryError> {
        Ok(Self {
            vm: Vm::new(VmConfig::new(hello.memory_bytes, hello.vcpus))?,
            synced_with: SyncedWith {
                vm_id: hello.vm_id,
                owner: hello.owner,
                generation: hello.generation,
            },
            committed: None,
            input_log: InputLog::default(),
            recent_output: VecDeque::new(),
        })
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

    /// Whether pages go straight into memory: during the initial copy, when
    /// there is nothing to protect yet.
    pub fn writes_in_place(&self) -> bool {
        self.committed.is_none()
    }

    /// Writes pages into the backup memory.
    pub fn apply(&self, pages: &PageBatch) -> Result<(), SecondaryError> {
        for (page_number, page) in pages.iter() {
            memory::write(self.vm.memory(), page_number * PAGE_SIZE, page)?;
        }
        Ok(())
    }

    /// Applies a staged epoch; checks first what can be checked before memory
    /// changes (page count, state present), so a bad epoch changes nothing.
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
        let state = staging
            .state
            .take()
            .ok_or(ConnectionError::MissingState(epoch))?;
        self.apply(&staging.pages)?;
        self.committed = Some((epoch, state));
        self.input_log.committed(epoch);
        self.recent_output
            .push_back((epoch, std::mem::take(&mut staging.output)));
        while self.recent_output.len() > RECENT_OUTPUT_EPOCHS {
            self.recent_output.pop_front();
        }
        if let Some(expected) = end.memory_hash {
            let actual = memory::hash(self.vm.memory()).map_err(SecondaryError::Memory)?;
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

    /// Resumes the backup VM from its last committed epoch; gives the backup
    /// back when nothing is committed yet.
    pub fn take_over(
        self,
        last_heard: Instant,
        reason: String,
        verify: bool,
        tap: Option<&Arc<Tap>>,
    ) -> Result<Result<Failover, Backup>, SecondaryError> {
        let Backup {
            mut vm,
            synced_with,
            committed,
            input_log,
            recent_output,
        } = self;
        let Some((epoch, state)) = committed else {
            return Ok(Err(Backup {
                vm,
                synced_with,
                committed: None,
                input_log,
                recent_output,
            }));
        };
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
        vm.resume()?;
        Ok(Ok(Failover {
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
}

#[cfg(test)]
mod tests {
    use understudy_checkpoint::protocol::{PROTOCOL_VERSION, Purpose};
    use understudy_vm::PAGE_BYTES;
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
        staging.begin();
        for (page_number, byte) in pages {
            staging.pages.push(*page_number, &page_of(*byte));
            staging.received += 1;
        }
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
    fn nothing_committed_means_no_takeover() {
        if !require_kvm() {
            return;
        }
        let backup = Backup::create(&hello(1)).expect("a backup VM");

        let outcome = backup
            .take_over(Instant::now(), "test".to_owned(), false, None)
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

        staging.begin();

        assert_eq!(staging.received, 0);
        assert!(staging.pages.is_empty());
        assert!(staging.output.is_empty());
        assert!(staging.begun.is_some());
    }
}
