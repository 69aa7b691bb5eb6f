//! COLO on the primary: the compare proxy's epochs. The packet comparison
//! itself is `understudy_proxy::compare`; this is which epoch's output is
//! compared with which, and what a checkpoint releases.
//!
//! ```text
//! primary frame of the compared epoch   -> Comparer::primary (held or released)
//! primary frame of a later epoch        -> waits (bounded): the secondary
//!                                          cannot run that epoch before the
//!                                          checkpoint that starts it is loaded
//! secondary frame of the compared epoch -> Comparer::secondary
//! secondary frame of an older epoch     -> dropped (output of a state the
//!                                          secondary has since replaced)
//! Ack N                                 -> every held frame released, the
//!                                          secondary's output forgotten; the
//!                                          compared epoch is N + 1, and the
//!                                          frames waiting for it are compared
//! ```
//!
//! The secondary's guest runs epoch N + 1 from the moment it loaded
//! checkpoint N; the primary's runs it from the moment checkpoint N was
//! taken. One checkpoint is in flight at a time (the primary waits for the
//! acknowledgement of the last before taking the next), so frames wait for
//! at most one epoch.
//!
//! A lease keeps a stalled primary silent: frames the comparer lets go are
//! sent out only while the secondary was heard within the lease (half the
//! heartbeat timeout); otherwise they wait for the next message from it.
//! A primary that was stopped (SIGSTOP, a hung host) and goes on finds its
//! lease expired: its acknowledgement thread then sees the gap, declares
//! the secondary lost, and fencing decides whether anything it holds ever
//! goes out. Without the lease, its guest's frames could match output the
//! secondary sent before it took over, and both copies would talk.
//!
//! Bounds: the comparer's (held frames and bytes, the secondary's unmatched
//! bytes) and the waiting queue's ([`MAX_WAITING_FRAMES`], also for frames
//! waiting for the lease): a frame beyond it is dropped, as a congested
//! link would (the guest's TCP sends it again), and counted.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use understudy_proxy::compare::{Action, CheckpointCause, CompareConfig, CompareMetrics, Comparer};

/// Primary frames of the next epoch kept while a checkpoint is in flight.
pub const MAX_WAITING_FRAMES: usize = 4096;

/// What COLO's compare did, over all protections so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ColoMetrics {
    /// The comparer's counters (compared, matched, passed, checkpoints
    /// asked for by cause, dropped, latency histogram) of the current
    /// protection.
    pub compare: CompareMetrics,
    /// Checkpoints taken, by cause (`periodic` and the comparer's).
    pub checkpoints: BTreeMap<&'static str, u64>,
    /// Frames released by a checkpoint's acknowledgement (not matched).
    pub released_by_checkpoint: u64,
    /// Secondary frames of an epoch it no longer runs, dropped.
    pub stale_secondary_frames: u64,
    /// Primary frames dropped because the waiting queue was full.
    pub waiting_dropped: u64,
    /// Frames that waited for the lease (the secondary unheard for half
    /// the heartbeat timeout) before going out.
    pub unleased: u64,
}

/// The compare state of one protection; see the module docs.
pub(crate) struct ColoCompare {
    config: CompareConfig,
    comparer: Comparer,
    /// The epoch whose output is compared: the one the secondary runs.
    compared_epoch: u64,
    /// Primary frames of later epochs, in order.
    waiting: VecDeque<(u64, Vec<u8>)>,
    /// A checkpoint asked for and not taken yet.
    wanted: Option<CheckpointCause>,
    /// Frames may go out until then (the secondary was heard recently).
    lease: Option<Instant>,
    /// Frames let go while the lease had run out, in order.
    unleased: Vec<Vec<u8>>,
    metrics: ColoMetrics,
}

impl ColoCompare {
    pub fn new(config: CompareConfig) -> Self {
        Self {
            config,
            comparer: Comparer::new(config),
            compared_epoch: 0,
            waiting: VecDeque::new(),
            wanted: None,
            lease: None,
            unleased: Vec::new(),
            metrics: ColoMetrics::default(),
        }
    }

    /// The secondary was heard at `at` (a message read, past the gap
    /// check): frames may go out until `at + lease`. Returns those that
    /// waited for it, if that is still ahead of `now`.
    pub fn heard(&mut self, at: Instant, lease: Duration, now: Instant) -> Vec<Vec<u8>> {
        self.lease = Some(at + lease);
        let waiting = std::mem::take(&mut self.unleased);
        self.out(waiting, now)
    }

    /// Frames the comparer let go: out now while the lease runs, else kept
    /// for the next message from the secondary.
    fn out(&mut self, frames: Vec<Vec<u8>>, now: Instant) -> Vec<Vec<u8>> {
        if self.lease.is_some_and(|until| now < until) {
            return frames;
        }
        for frame in frames {
            if self.unleased.len() >= MAX_WAITING_FRAMES {
                self.metrics.waiting_dropped += 1;
            } else {
                self.metrics.unleased += 1;
                self.unleased.push(frame);
            }
        }
        Vec::new()
    }

    /// A new protection: epochs count from 0 again, and both copies will
    /// be equal at epoch 0. Returns whatever was still held, to release.
    pub fn restart(&mut self) -> Vec<Vec<u8>> {
        let released = self.release_all();
        self.comparer = Comparer::new(self.config);
        self.compared_epoch = 0;
        self.wanted = None;
        released
    }

    /// Everything held or waiting, in order (the protection ended).
    pub fn release_all(&mut self) -> Vec<Vec<u8>> {
        let mut released = std::mem::take(&mut self.unleased);
        released.extend(self.comparer.checkpointed());
        released.extend(self.waiting.drain(..).map(|(_, frame)| frame));
        released
    }

    /// A frame the primary's guest sent while running `epoch`; returns the
    /// frames to send out now.
    pub fn primary(&mut self, epoch: u64, frame: Vec<u8>, now: Instant) -> Vec<Vec<u8>> {
        if epoch != self.compared_epoch {
            if self.waiting.len() >= MAX_WAITING_FRAMES {
                self.metrics.waiting_dropped += 1;
            } else {
                self.waiting.push_back((epoch, frame));
            }
            return Vec::new();
        }
        let actions = self.comparer.primary(frame, now);
        let released = self.take(actions);
        self.out(released, now)
    }

    /// A frame the secondary's guest sent while running `epoch`; returns
    /// the primary frames to send out now.
    pub fn secondary(&mut self, epoch: u64, frame: &[u8], now: Instant) -> Vec<Vec<u8>> {
        if epoch != self.compared_epoch {
            self.metrics.stale_secondary_frames += 1;
            return Vec::new();
        }
        let actions = self.comparer.secondary(frame, now);
        let released = self.take(actions);
        self.out(released, now)
    }

    /// Checkpoint `epoch` was acknowledged: the secondary runs epoch + 1
    /// from the primary's state. Returns the frames to send out: all those
    /// held, then those of the new epoch the comparer lets pass at once.
    pub fn acknowledged(&mut self, epoch: u64, now: Instant) -> Vec<Vec<u8>> {
        // What waited for the lease goes first, all of it under the lease
        // the caller renewed from when the acknowledgement was read.
        let mut released = std::mem::take(&mut self.unleased);
        let checkpointed = self.comparer.checkpointed();
        self.metrics.released_by_checkpoint += checkpointed.len() as u64;
        released.extend(checkpointed);
        self.compared_epoch = epoch + 1;
        self.wanted = None;
        while self
            .waiting
            .front()
            .is_some_and(|(waiting_epoch, _)| *waiting_epoch <= self.compared_epoch)
        {
            let (_, frame) = self.waiting.pop_front().expect("just seen");
            let actions = self.comparer.primary(frame, now);
            released.extend(self.take(actions));
        }
        self.out(released, now)
    }

    /// Looks for held frames that waited too long; asks for a checkpoint if
    /// one did.
    pub fn expire(&mut self, now: Instant) {
        if let Some(Action::Checkpoint(cause)) = self.comparer.expire(now) {
            self.wanted.get_or_insert(cause);
        }
    }

    /// When [`expire`](Self::expire) should look next, if anything is held.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.comparer
            .oldest_held()
            .map(|oldest| oldest + self.comparer.timeout())
    }

    /// The checkpoint asked for, if one is (cleared when taken).
    pub fn wanted(&self) -> Option<CheckpointCause> {
        self.wanted
    }

    /// A checkpoint is being taken for `cause` (`None`: periodic).
    pub fn checkpoint_taken(&mut self, cause: Option<CheckpointCause>) {
        let name = cause.map_or("periodic", CheckpointCause::name);
        *self.metrics.checkpoints.entry(name).or_default() += 1;
        self.wanted = None;
    }

    pub fn metrics(&self) -> ColoMetrics {
        ColoMetrics {
            compare: self.comparer.metrics().clone(),
            ..self.metrics.clone()
        }
    }

    fn take(&mut self, actions: Vec<Action>) -> Vec<Vec<u8>> {
        let mut released = Vec::new();
        for action in actions {
            match action {
                Action::Release(frame) => released.push(frame),
                Action::Checkpoint(cause) => {
                    self.wanted.get_or_insert(cause);
                }
            }
        }
        released
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UDP datagram from the guest with `payload`.
    fn udp(payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0u8; 14];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        let total = 20 + 8 + payload.len();
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 10, 10, 0, 0, 1,
        ];
        ip[2..4].copy_from_slice(&u16::try_from(total).expect("small").to_be_bytes());
        frame.extend_from_slice(&ip);
        let mut datagram = vec![0u8; 8];
        datagram[0..2].copy_from_slice(&53u16.to_be_bytes());
        datagram[2..4].copy_from_slice(&5353u16.to_be_bytes());
        datagram[4..6].copy_from_slice(
            &u16::try_from(8 + payload.len())
                .expect("small")
                .to_be_bytes(),
        );
        frame.extend_from_slice(&datagram);
        frame.extend_from_slice(payload);
        frame
    }

    /// A lease far longer than any test.
    const LEASE: Duration = Duration::from_secs(3600);

    fn synchronised() -> (ColoCompare, Instant) {
        let mut colo = ColoCompare::new(CompareConfig::default());
        let now = Instant::now();
        colo.heard(now, LEASE, now);
        colo.acknowledged(0, now);
        (colo, now)
    }

    #[test]
    fn output_of_the_initial_synchronisation_waits_for_its_acknowledgement() {
        let mut colo = ColoCompare::new(CompareConfig::default());
        let now = Instant::now();
        colo.heard(now, LEASE, now);

        let at_once = colo.primary(0, udp(b"early"), now);
        let acknowledged = colo.acknowledged(0, now);

        assert!(at_once.is_empty());
        assert_eq!(acknowledged, vec![udp(b"early")]);
    }

    #[test]
    fn matching_output_is_released_at_once() {
        let (mut colo, now) = synchronised();

        let held = colo.primary(1, udp(b"same"), now);
        let released = colo.secondary(1, &udp(b"same"), now);

        assert!(held.is_empty());
        assert_eq!(released, vec![udp(b"same")]);
        assert_eq!(colo.wanted(), None);
    }

    #[test]
    fn different_output_asks_for_a_checkpoint_whose_acknowledgement_releases_the_primarys() {
        let (mut colo, now) = synchronised();
        colo.primary(1, udp(b"primary"), now);

        let released = colo.secondary(1, &udp(b"secondary"), now);
        let wanted = colo.wanted();
        colo.checkpoint_taken(wanted);
        let after = colo.acknowledged(1, now);

        assert!(released.is_empty());
        assert!(matches!(wanted, Some(CheckpointCause::Mismatch(_))));
        assert_eq!(after, vec![udp(b"primary")]);
    }

    #[test]
    fn output_of_the_next_epoch_waits_for_the_checkpoint_then_is_compared() {
        let (mut colo, now) = synchronised();

        let waiting = colo.primary(2, udp(b"next epoch"), now);
        let stale = colo.secondary(1, &udp(b"next epoch"), now);
        let acknowledged = colo.acknowledged(1, now);
        let matched = colo.secondary(2, &udp(b"next epoch"), now);

        assert!(waiting.is_empty());
        assert!(stale.is_empty());
        assert!(acknowledged.is_empty());
        assert_eq!(matched, vec![udp(b"next epoch")]);
    }

    #[test]
    fn secondary_output_of_a_replaced_state_is_dropped() {
        let (mut colo, now) = synchronised();
        colo.acknowledged(1, now);
        colo.primary(2, udp(b"answer"), now);

        let stale = colo.secondary(1, &udp(b"answer"), now);

        assert!(stale.is_empty());
        assert_eq!(colo.metrics().stale_secondary_frames, 1);
    }

    #[test]
    fn a_full_waiting_queue_drops_new_frames() {
        let (mut colo, now) = synchronised();
        for _ in 0..MAX_WAITING_FRAMES {
            colo.primary(2, udp(b"wait"), now);
        }

        colo.primary(2, udp(b"one too many"), now);

        assert_eq!(colo.metrics().waiting_dropped, 1);
    }

    #[test]
    fn a_frame_held_past_the_timeout_asks_for_a_checkpoint() {
        let (mut colo, now) = synchronised();
        colo.primary(1, udp(b"alone"), now);
        let expiry = colo.next_expiry().expect("a frame is held");

        colo.expire(expiry + std::time::Duration::from_millis(1));

        assert_eq!(colo.wanted(), Some(CheckpointCause::Timeout));
    }

    #[test]
    fn matching_output_waits_while_the_secondary_was_not_heard_within_the_lease() {
        let mut colo = ColoCompare::new(CompareConfig::default());
        let start = Instant::now();
        colo.heard(start, Duration::from_millis(25), start);
        colo.acknowledged(0, start);
        let stalled = start + Duration::from_secs(1);
        colo.primary(1, udp(b"late"), stalled);

        let while_stalled = colo.secondary(1, &udp(b"late"), stalled);
        let when_heard = colo.heard(stalled, Duration::from_millis(25), stalled);

        assert!(while_stalled.is_empty());
        assert_eq!(when_heard, vec![udp(b"late")]);
        assert_eq!(colo.metrics().unleased, 1);
    }

    #[test]
    fn a_message_read_before_a_stall_renews_no_lease_after_it() {
        let mut colo = ColoCompare::new(CompareConfig::default());
        let read = Instant::now();
        let resumed = read + Duration::from_secs(1);
        colo.acknowledged(0, read);
        colo.primary(1, udp(b"zombie"), resumed);

        let at_heard = colo.heard(read, Duration::from_millis(25), resumed);
        let matched = colo.secondary(1, &udp(b"zombie"), resumed);

        assert!(at_heard.is_empty());
        assert!(matched.is_empty());
    }

    #[test]
    fn checkpoints_are_counted_by_cause() {
        let (mut colo, _) = synchronised();

        colo.checkpoint_taken(None);
        colo.checkpoint_taken(Some(CheckpointCause::Timeout));
        colo.checkpoint_taken(None);

        let checkpoints = colo.metrics().checkpoints;
        assert_eq!(checkpoints.get("periodic"), Some(&2));
        assert_eq!(checkpoints.get("timeout"), Some(&1));
    }
}
