//! State shared by a [`Protection`](crate::Protection)'s threads: what the
//! secondary has acknowledged and synced, whether it was lost (and why),
//! when each unacknowledged checkpoint was taken, bytes on the wire, and
//! page batches kept for reuse. Waiters block on a condition variable that
//! every change of acknowledgement, sync or loss wakes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use understudy_compress::PageBatch;

use crate::PrimaryError;
use crate::output::OutputCommit;

/// What the secondary has confirmed, and whether it is still there.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// The last acknowledged epoch.
    pub acknowledged: Option<u64>,
    /// The last `Synced` token received.
    pub synced: u64,
    /// Why the secondary was lost, once it was.
    pub lost: Option<String>,
}

/// Batches kept for reuse at most.
const SPARE_BATCHES: usize = 4;

pub(crate) struct Shared {
    progress: Mutex<Progress>,
    /// Woken on every change of `progress`.
    changed: Condvar,
    /// When each epoch's checkpoint pause ended, until it is acknowledged.
    checkpointed: Mutex<HashMap<u64, Instant>>,
    /// Bytes of page frames and states put on the wire so far.
    wire_bytes: AtomicU64,
    /// Batches the sender is done with, kept with their memory: a fresh
    /// allocation would page-fault on every page copied during the pause.
    spare_batches: Mutex<Vec<PageBatch>>,
    /// The output-commit gate, when the guest has a network.
    pub output: OnceLock<Arc<OutputCommit>>,
}

impl Shared {
    pub fn new() -> Self {
        Self {
            progress: Mutex::new(Progress::default()),
            changed: Condvar::new(),
            checkpointed: Mutex::new(HashMap::new()),
            wire_bytes: AtomicU64::new(0),
            spare_batches: Mutex::new(Vec::new()),
            output: OnceLock::new(),
        }
    }

    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().expect("no panics under this lock")
    }

    fn update(&self, change: impl FnOnce(&mut Progress)) {
        change(&mut self.progress());
        self.changed.notify_all();
    }

    /// Records that the secondary is lost (the first reason stays).
    pub fn lose(&self, reason: String) {
        self.update(|progress| {
            progress.lost.get_or_insert(reason);
        });
    }

    /// Why the secondary was lost, if it was.
    pub fn lost(&self) -> Option<String> {
        self.progress().lost.clone()
    }

    /// Records the acknowledgement of `epoch`; returns when its checkpoint
    /// was taken, if that was recorded.
    pub fn acknowledge(&self, epoch: u64) -> Option<Instant> {
        let checkpointed = self
            .checkpointed
            .lock()
            .expect("no panics under this lock")
            .remove(&epoch);
        self.update(|progress| progress.acknowledged = Some(epoch));
        checkpointed
    }

    /// Records that the secondary processed everything before `token`.
    pub fn synced(&self, token: u64) {
        self.update(|progress| progress.synced = progress.synced.max(token));
    }

    /// Blocks until `reached` holds, or fails when the secondary is lost.
    pub fn wait_for(&self, reached: impl Fn(&Progress) -> bool) -> Result<(), PrimaryError> {
        let mut progress = self.progress();
        loop {
            // What was reached counts even if the secondary left right after
            // (a migration target closes once it acknowledged).
            if reached(&progress) {
                return Ok(());
            }
            if let Some(reason) = &progress.lost {
                return Err(PrimaryError::SecondaryLost(reason.clone()));
            }
            progress = self
                .changed
                .wait(progress)
                .expect("no panics under this lock");
        }
    }

    /// Records when `epoch`'s checkpoint was taken (before it is sent whole).
    pub fn checkpointed(&self, epoch: u64, at: Instant) {
        self.checkpointed
            .lock()
            .expect("no panics under this lock")
            .insert(epoch, at);
    }

    /// Counts bytes put on the wire.
    pub fn add_wire_bytes(&self, bytes: usize) {
        self.wire_bytes
            .fetch_add(u64::try_from(bytes).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Bytes of page frames and states put on the wire so far.
    pub fn wire_bytes(&self) -> u64 {
        self.wire_bytes.load(Ordering::Relaxed)
    }

    /// An empty batch, with memory from an earlier one when there is one.
    pub fn spare_batch(&self) -> PageBatch {
        self.spare_batches
            .lock()
            .expect("no panics under this lock")
            .pop()
            .unwrap_or_default()
    }

    /// Keeps `batch`'s memory for a later checkpoint.
    pub fn recycle(&self, mut batch: PageBatch) {
        batch.clear();
        let mut spare = self
            .spare_batches
            .lock()
            .expect("no panics under this lock");
        if spare.len() < SPARE_BATCHES {
            spare.push(batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_waiter_wakes_when_its_epoch_is_acknowledged() {
        let shared = Arc::new(Shared::new());
        let acknowledger = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                shared.acknowledge(0);
                shared.acknowledge(1);
            })
        };

        let waited = shared.wait_for(|progress| progress.acknowledged.is_some_and(|e| e >= 1));

        acknowledger.join().expect("acknowledger");
        assert!(waited.is_ok());
        assert_eq!(shared.progress().acknowledged, Some(1));
    }

    #[test]
    fn a_waiter_fails_when_the_secondary_is_lost() {
        let shared = Arc::new(Shared::new());
        let loser = {
            let shared = shared.clone();
            std::thread::spawn(move || shared.lose("link down".to_owned()))
        };

        let waited = shared.wait_for(|progress| progress.synced >= 1);

        loser.join().expect("loser");
        assert!(
            matches!(waited, Err(PrimaryError::SecondaryLost(reason)) if reason == "link down")
        );
    }

    #[test]
    fn an_acknowledgement_before_a_loss_still_counts() {
        let shared = Shared::new();
        shared.acknowledge(0);
        shared.lose("the target closed after acknowledging".to_owned());

        let waited = shared.wait_for(|progress| progress.acknowledged == Some(0));

        assert!(waited.is_ok());
    }

    #[test]
    fn the_first_reason_for_a_loss_stays() {
        let shared = Shared::new();

        shared.lose("first".to_owned());
        shared.lose("second".to_owned());

        assert_eq!(shared.lost().as_deref(), Some("first"));
    }

    #[test]
    fn sync_tokens_only_grow() {
        let shared = Shared::new();

        shared.synced(5);
        shared.synced(3);

        assert!(shared.wait_for(|progress| progress.synced == 5).is_ok());
    }

    #[test]
    fn an_acknowledgement_returns_when_its_checkpoint_was_taken() {
        let shared = Shared::new();
        let at = Instant::now();
        shared.checkpointed(7, at);

        let taken = shared.acknowledge(7);

        assert_eq!(taken, Some(at));
    }
}
