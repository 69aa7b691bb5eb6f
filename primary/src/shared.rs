//! State shared by a [`Protection`](crate::Protection)'s threads: what the
//! secondary has acknowledged and synced, whether it was lost (and why),
//! when each unacknowledged checkpoint was taken, bytes on the wire, and
//! page batches kept for reuse. Waiters block on a condition variable that
//! every change of acknowledgement, sync or loss wakes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use understudy_checkpoint::link::LinkSender;
use understudy_compress::PageBatch;

use crate::output::OutputCommit;

/// Why a wait on the secondary failed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WaitFailed {
    /// It was lost, for this reason.
    Lost(String),
    /// It made no progress for this long.
    NoProgress(Duration),
}

/// What the secondary has confirmed, and whether it is still there.
#[derive(Debug)]
pub(crate) struct Progress {
    /// The last acknowledged epoch.
    pub acknowledged: Option<u64>,
    /// The last `Synced` token received.
    pub synced: u64,
    /// Why the secondary was lost, once it was.
    pub lost: Option<String>,
    /// The last sign that the secondary works: an acknowledgement, a sync
    /// answer, or a message it took from the link.
    pub progressed: Instant,
    /// Post-copy: pages the target's guest faulted on, in the order asked.
    pub page_requests: Vec<u64>,
    /// A migration's target took the guest over (`TookOver`).
    pub took_over: bool,
}

impl Progress {
    /// How long the secondary has made no progress, counting from `since`
    /// at the earliest.
    fn idle_since(&self, since: Instant) -> Duration {
        self.progressed.max(since).elapsed()
    }

    fn new() -> Self {
        Self {
            acknowledged: None,
            synced: 0,
            lost: None,
            progressed: Instant::now(),
            page_requests: Vec::new(),
            took_over: false,
        }
    }
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
            progress: Mutex::new(Progress::new()),
            changed: Condvar::new(),
            checkpointed: Mutex::new(HashMap::new()),
            wire_bytes: AtomicU64::new(0),
            spare_batches: Mutex::new(Vec::new()),
            output: OnceLock::new(),
        }
    }

    /// Post-copy: the target asks for `page_number` now (wakes a push
    /// waiting for its window).
    pub fn request_page(&self, page_number: u64) {
        self.update(|progress| progress.page_requests.push(page_number));
    }

    /// Post-copy: the pages asked for since the last call, in order.
    pub fn take_page_requests(&self) -> Vec<u64> {
        std::mem::take(&mut self.progress().page_requests)
    }

    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().expect("no panics under this lock")
    }

    fn update(&self, change: impl FnOnce(&mut Progress)) {
        change(&mut self.progress());
        self.changed.notify_all();
    }

    /// Declares the secondary lost: records why, tells it (a `Goodbye`, so
    /// it does not take this for the primary's death, if the link is not
    /// stuck in another message), and shuts the link down so that threads
    /// blocked on it wake up.
    pub fn lose_link(&self, link: &LinkSender, reason: String) {
        link.try_goodbye(&format!("the primary lost its secondary: {reason}"));
        link.shutdown();
        self.lose(reason);
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

    /// Records the acknowledgement of `epoch`, which must be the next one
    /// and one whose end was sent; returns when its checkpoint was taken.
    /// Anything else is a confused or hostile secondary (the reason).
    pub fn acknowledge(&self, epoch: u64) -> Result<Instant, String> {
        let due = self.progress().acknowledged.map_or(0, |acked| acked + 1);
        if epoch != due {
            return Err(format!(
                "the secondary acknowledged epoch {epoch} where epoch {due} was due"
            ));
        }
        let checkpointed = self
            .checkpointed
            .lock()
            .expect("no panics under this lock")
            .remove(&epoch)
            .ok_or_else(|| {
                format!("the secondary acknowledged epoch {epoch}, which was not sent yet")
            })?;
        self.update(|progress| {
            progress.acknowledged = Some(epoch);
            progress.progressed = Instant::now();
        });
        Ok(checkpointed)
    }

    /// A resumed connection: `epoch` was acknowledged on an earlier one, so
    /// the next acknowledgement due is the one after.
    pub fn acknowledged_earlier(&self, epoch: u64) {
        self.update(|progress| progress.acknowledged = Some(epoch));
    }

    /// Records that the secondary processed everything before `token`.
    pub fn synced(&self, token: u64) {
        self.update(|progress| {
            progress.synced = progress.synced.max(token);
            progress.progressed = Instant::now();
        });
    }

    /// Records that a migration's target took the guest over.
    pub fn took_over(&self) {
        self.update(|progress| {
            progress.took_over = true;
            progress.progressed = Instant::now();
        });
    }

    /// The last `Synced` token received.
    pub fn last_synced(&self) -> u64 {
        self.progress().synced
    }

    /// Records that the secondary took a message from the link.
    pub fn progressed(&self) {
        self.progress().progressed = Instant::now();
    }

    /// Since when the oldest epoch whose end was sent has waited for its
    /// acknowledgement, if one does.
    pub fn waiting_since(&self) -> Option<Instant> {
        self.checkpointed
            .lock()
            .expect("no panics under this lock")
            .values()
            .min()
            .copied()
    }

    /// How long the secondary has made no progress, counting from `since`
    /// at the earliest.
    pub fn idle_since(&self, since: Instant) -> Duration {
        self.progress().idle_since(since)
    }

    /// Blocks until `reached` holds; fails when the secondary is lost, or
    /// makes no progress for `deadline` from the later of its last
    /// progress and the start of the wait (then the caller declares it lost).
    pub fn wait_for(
        &self,
        reached: impl Fn(&Progress) -> bool,
        deadline: Duration,
    ) -> Result<(), WaitFailed> {
        let started = Instant::now();
        let mut progress = self.progress();
        loop {
            // What was reached counts even if the secondary left right after
            // (a migration target closes once it acknowledged).
            if reached(&progress) {
                return Ok(());
            }
            if let Some(reason) = &progress.lost {
                return Err(WaitFailed::Lost(reason.clone()));
            }
            let left = deadline.saturating_sub(progress.idle_since(started));
            if left.is_zero() {
                return Err(WaitFailed::NoProgress(deadline));
            }
            progress = self
                .changed
                .wait_timeout(progress, left)
                .expect("no panics under this lock")
                .0;
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
    use super::*;

    const PATIENCE: Duration = Duration::from_secs(60);

    fn sent(shared: &Shared, epochs: std::ops::RangeInclusive<u64>) {
        for epoch in epochs {
            shared.checkpointed(epoch, Instant::now());
        }
    }

    #[test]
    fn a_waiter_wakes_when_its_epoch_is_acknowledged() {
        let shared = Arc::new(Shared::new());
        sent(&shared, 0..=1);
        let acknowledger = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                shared.acknowledge(0).expect("epoch 0 is due");
                shared.acknowledge(1).expect("epoch 1 is due");
            })
        };

        let waited = shared.wait_for(
            |progress| progress.acknowledged.is_some_and(|e| e >= 1),
            PATIENCE,
        );

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

        let waited = shared.wait_for(|progress| progress.synced >= 1, PATIENCE);

        loser.join().expect("loser");
        assert_eq!(waited, Err(WaitFailed::Lost("link down".to_owned())));
    }

    #[test]
    fn an_acknowledgement_before_a_loss_still_counts() {
        let shared = Shared::new();
        sent(&shared, 0..=0);
        shared.acknowledge(0).expect("epoch 0 is due");
        shared.lose("the target closed after acknowledging".to_owned());

        let waited = shared.wait_for(|progress| progress.acknowledged == Some(0), PATIENCE);

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

        assert!(
            shared
                .wait_for(|progress| progress.synced == 5, PATIENCE)
                .is_ok()
        );
    }

    #[test]
    fn an_acknowledgement_returns_when_its_checkpoint_was_taken() {
        let shared = Shared::new();
        let at = Instant::now();
        shared.checkpointed(0, at);

        let taken = shared.acknowledge(0);

        assert_eq!(taken, Ok(at));
    }

    #[test]
    fn an_acknowledgement_out_of_order_is_refused() {
        let shared = Shared::new();
        sent(&shared, 0..=3);

        let skipped = shared.acknowledge(2);

        assert_eq!(
            skipped,
            Err("the secondary acknowledged epoch 2 where epoch 0 was due".to_owned())
        );
    }

    #[test]
    fn an_acknowledgement_of_an_epoch_never_sent_is_refused() {
        let shared = Shared::new();

        let unsent = shared.acknowledge(0);

        assert!(unsent.is_err_and(|reason| reason.contains("not sent yet")));
    }

    #[test]
    fn an_acknowledgement_twice_is_refused() {
        let shared = Shared::new();
        sent(&shared, 0..=1);
        shared.acknowledge(0).expect("epoch 0 is due");

        let again = shared.acknowledge(0);

        assert!(again.is_err());
    }

    #[test]
    fn a_wait_without_progress_ends_at_the_deadline() {
        let shared = Shared::new();

        let waited = shared.wait_for(|progress| progress.synced >= 1, Duration::from_millis(20));

        assert_eq!(
            waited,
            Err(WaitFailed::NoProgress(Duration::from_millis(20)))
        );
    }
}
