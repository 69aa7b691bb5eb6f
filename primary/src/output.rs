//! The output-commit gate between the guest's network device and the
//! outside: the primary's half of the proxy (Remus output commit).
//!
//! ```text
//! guest frame (vCPU thread)   -> held, tagged with the epoch being run
//! checkpoint N taken (paused) -> frames from now on belong to epoch N + 1
//! Ack N (acks thread)         -> frames of epochs <= N go to the tap, in order
//! protection ends             -> everything held is released; frames pass
//!                                straight through until the next protection
//! ```
//!
//! The same gate knows which epoch the guest runs, so it also tags the
//! frames the guest *receives* ([`InputRecorder`]): while protected they go
//! to the secondary, which replays those of uncommitted epochs into the
//! guest when it takes over. A client's request that reached the primary
//! just before it died is then answered by the secondary at once, instead
//! of after the client's retransmission timeout (200 ms or more on Linux).
//!
//! The holding rule itself is `understudy_proxy::OutputBuffer`; this is its
//! wiring: a [`FrameSink`] for the virtio-net device, a release sink (the
//! tap), and the epoch counter the checkpoint loop advances while the guest
//! is paused, so a frame's epoch is exact.
//!
//! In COLO mode ([`OutputCommit::colo`]) the same gate compares instead of
//! holding until the acknowledgement (see [`crate::colo`]): a frame goes
//! out as soon as the secondary's guest sent the same one; the received
//! frames it logs are what the secondary's running guest is fed; and a
//! mismatch or a compare timeout asks the checkpoint loop for a checkpoint
//! ([`OutputCommit::wait_for_checkpoint_request`]).

use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use understudy_checkpoint::link::LinkSender;
use understudy_checkpoint::protocol::Message;
use understudy_proxy::compare::{CheckpointCause, CompareConfig};
use understudy_proxy::{Held, Limits, Metrics, OutputBuffer, Released};

use crate::colo::{ColoCompare, ColoMetrics};
use understudy_vm::log_limited;
use understudy_vm::virtio_net::FrameSink;

enum Mode {
    /// Hold frames until their epoch is acknowledged.
    Hold,
    /// Unprotected: frames go straight out.
    PassThrough,
}

/// Where the frames the guest receives go while protected.
pub enum InputLog {
    /// Into a bounded queue, for a thread that writes them to the
    /// secondary in bursts (Remus: the log is for a takeover's replay, and
    /// the guest never waits for it; a full queue drops and counts).
    Queued(SyncSender<(u64, Vec<u8>)>),
    /// Straight onto the link, on the vCPU thread, before the guest sees
    /// the frame (COLO: the secondary's guest must get every frame the
    /// primary's does; a frame written before the primary dies reaches the
    /// secondary, so a request the dying primary took is not lost with it).
    Direct(LinkSender),
}

/// How held frames are released.
enum Holding {
    /// Remus: when their epoch is acknowledged.
    Epochs(Box<OutputBuffer>),
    /// COLO: when the secondary sent the same, or a checkpoint is
    /// acknowledged.
    Compare(Box<ColoCompare>),
}

struct Gate {
    holding: Holding,
    running_epoch: u64,
    mode: Mode,
    /// Where received frames go while protected, tagged with their epoch.
    input_log: Option<InputLog>,
    /// Received frames that could not be logged (the log queue was full).
    input_dropped: u64,
}

/// Holds the guest's output until the secondary has its epoch.
pub struct OutputCommit {
    gate: Mutex<Gate>,
    /// Woken when the guest's output is held (an early checkpoint waits on it).
    output_held: Condvar,
    release: Arc<dyn FrameSink>,
}

impl OutputCommit {
    /// A gate that releases to `release` and holds at most `limits`. It
    /// passes frames through until a protection begins.
    pub fn new(release: Arc<dyn FrameSink>, limits: Limits) -> Self {
        Self::with(
            release,
            Holding::Epochs(Box::new(OutputBuffer::new(limits))),
        )
    }

    /// A COLO gate: compares the guest's output with the secondary's
    /// within `config`'s bounds and timeout. It passes frames through until
    /// a protection begins.
    pub fn colo(release: Arc<dyn FrameSink>, config: CompareConfig) -> Self {
        Self::with(
            release,
            Holding::Compare(Box::new(ColoCompare::new(config))),
        )
    }

    /// Whether this gate compares (COLO) rather than holds (Remus).
    pub fn compares(&self) -> bool {
        matches!(self.lock().holding, Holding::Compare(_))
    }

    fn with(release: Arc<dyn FrameSink>, holding: Holding) -> Self {
        Self {
            gate: Mutex::new(Gate {
                holding,
                running_epoch: 0,
                mode: Mode::PassThrough,
                input_log: None,
                input_dropped: 0,
            }),
            output_held: Condvar::new(),
            release,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Gate> {
        self.gate
            .lock()
            .expect("no panics while the output gate is held")
    }

    /// A protection begins (its epochs count from 0): hold output from now
    /// on, and send received frames to `input_log`.
    pub fn begin(&self, input_log: Option<InputLog>) {
        let mut gate = self.lock();
        gate.input_log = input_log;
        match &mut gate.holding {
            Holding::Epochs(buffer) => {
                let released = buffer.restart_epochs(Instant::now());
                self.send_out(released);
            }
            Holding::Compare(colo) => self.send_frames(colo.restart()),
        }
        gate.running_epoch = 0;
        gate.mode = Mode::Hold;
    }

    /// Checkpoint `epoch` was taken (the guest is paused): later frames
    /// belong to the next epoch.
    pub fn checkpointed(&self, epoch: u64) {
        self.lock().running_epoch = epoch + 1;
    }

    /// The secondary acknowledged `epoch`: release its frames and earlier ones.
    pub fn acknowledge(&self, epoch: u64) {
        let mut gate = self.lock();
        if matches!(gate.mode, Mode::PassThrough) {
            return;
        }
        match &mut gate.holding {
            Holding::Epochs(buffer) => {
                let released = buffer.acknowledge(epoch, Instant::now());
                self.send_out(released);
            }
            Holding::Compare(colo) => self.send_frames(colo.acknowledged(epoch, Instant::now())),
        }
    }

    /// COLO: a message from the secondary was read at `at` (the link is
    /// fresh): compared frames may go out until `at + lease` (see
    /// [`crate::colo`]); those that waited for it go now if that is still
    /// ahead.
    pub fn secondary_heard(&self, at: Instant, lease: Duration) {
        let mut gate = self.lock();
        if let Holding::Compare(colo) = &mut gate.holding {
            let released = colo.heard(at, lease, Instant::now());
            self.send_frames(released);
        }
    }

    /// COLO: a frame the secondary's guest sent while running `epoch`.
    /// Returns false when this gate does not compare (a confused peer).
    pub fn secondary_output(&self, epoch: u64, frame: &[u8]) -> bool {
        let mut gate = self.lock();
        let passing = matches!(gate.mode, Mode::PassThrough);
        let Holding::Compare(colo) = &mut gate.holding else {
            return false;
        };
        if !passing {
            let released = colo.secondary(epoch, frame, Instant::now());
            self.send_frames(released);
            if colo.wanted().is_some() {
                self.output_held.notify_all();
            }
        }
        true
    }

    /// COLO: blocks until a checkpoint is asked for (a mismatch, a compare
    /// timeout: returned) or `until` (`None`). Held frames are checked
    /// against the timeout as their deadlines pass.
    pub fn wait_for_checkpoint_request(&self, until: Instant) -> Option<CheckpointCause> {
        let mut gate = self.lock();
        loop {
            let Holding::Compare(colo) = &mut gate.holding else {
                return None;
            };
            let now = Instant::now();
            if colo.next_expiry().is_some_and(|expiry| expiry <= now) {
                colo.expire(now);
            }
            if let Some(cause) = colo.wanted() {
                return Some(cause);
            }
            let wake = colo.next_expiry().map_or(until, |expiry| expiry.min(until));
            if now >= until {
                return None;
            }
            let left = wake
                .saturating_duration_since(now)
                .max(Duration::from_micros(50));
            gate = self
                .output_held
                .wait_timeout(gate, left)
                .expect("no panics while the output gate is held")
                .0;
        }
    }

    /// COLO: a checkpoint is taken now, for `cause` (`None`: periodic);
    /// counted, and the request cleared.
    pub fn colo_checkpoint_taken(&self, cause: Option<CheckpointCause>) {
        if let Holding::Compare(colo) = &mut self.lock().holding {
            colo.checkpoint_taken(cause);
        }
    }

    /// COLO's counters, when this gate compares.
    pub fn colo_metrics(&self) -> Option<ColoMetrics> {
        match &self.lock().holding {
            Holding::Compare(colo) => Some(colo.metrics()),
            Holding::Epochs(_) => None,
        }
    }

    /// Sends frames on, in order (with the gate locked).
    fn send_frames(&self, frames: Vec<Vec<u8>>) {
        for frame in frames {
            self.release.send(&frame);
        }
    }

    /// Sends released frames on, in order (with the gate locked, so that
    /// nothing the guest sends later overtakes them).
    fn send_out(&self, released: Vec<Released>) {
        for frame in released {
            self.release.send(&frame.frame);
        }
    }

    /// The protection ended: release everything held and pass frames through.
    pub fn open(&self) {
        let mut gate = self.lock();
        gate.input_log = None;
        match &mut gate.holding {
            Holding::Epochs(buffer) => {
                let released = buffer.acknowledge(u64::MAX, Instant::now());
                self.send_out(released);
            }
            Holding::Compare(colo) => self.send_frames(colo.release_all()),
        }
        gate.mode = Mode::PassThrough;
    }

    /// The guest received `frame`: log it with the epoch being run.
    fn record_input(&self, frame: &[u8]) {
        let mut gate = self.lock();
        let epoch = gate.running_epoch;
        let link = match &gate.input_log {
            None => return,
            Some(InputLog::Queued(log)) => {
                match log.try_send((epoch, frame.to_vec())) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => gate.input_dropped += 1,
                    Err(TrySendError::Disconnected(_)) => gate.input_log = None,
                }
                return;
            }
            Some(InputLog::Direct(link)) => link.clone(),
        };
        // Written without the gate held: output and acknowledgements go on.
        drop(gate);
        if link.send(epoch, &Message::Input(frame.to_vec())).is_err() {
            // The link failed: the protection finds out and ends.
            let mut gate = self.lock();
            gate.input_dropped += 1;
            gate.input_log = None;
        }
    }

    /// Copies of the frames held for `epoch` (they go to the secondary with
    /// the epoch's checkpoint).
    /// In COLO mode none: the secondary's guest runs on after a takeover
    /// and resends its own.
    pub fn frames_of(&self, epoch: u64) -> Vec<Vec<u8>> {
        match &self.lock().holding {
            Holding::Epochs(buffer) => buffer.frames_of(epoch).map(<[u8]>::to_vec).collect(),
            Holding::Compare(_) => Vec::new(),
        }
    }

    /// Whether the guest sent output during the epoch it is running (output
    /// that waits for the next checkpoint: taking it early cuts the wait).
    pub fn output_waiting(&self) -> bool {
        Self::waiting(&self.lock())
    }

    fn waiting(gate: &Gate) -> bool {
        match &gate.holding {
            Holding::Epochs(buffer) => {
                matches!(gate.mode, Mode::Hold) && buffer.newest_epoch() == Some(gate.running_epoch)
            }
            Holding::Compare(_) => false,
        }
    }

    /// Blocks until the guest has output waiting (see
    /// [`output_waiting`](Self::output_waiting)) or `deadline`; returns
    /// whether it has.
    pub fn wait_for_output(&self, deadline: Instant) -> bool {
        let mut gate = self.lock();
        loop {
            if Self::waiting(&gate) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            gate = self
                .output_held
                .wait_timeout(gate, left)
                .expect("no panics while the output gate is held")
                .0;
        }
    }

    /// Received frames that could not be logged for replay.
    pub fn input_dropped(&self) -> u64 {
        self.lock().input_dropped
    }

    /// Counters and hold times over all protections so far (Remus; in
    /// COLO mode see [`colo_metrics`](Self::colo_metrics)).
    pub fn metrics(&self) -> Metrics {
        match &self.lock().holding {
            Holding::Epochs(buffer) => buffer.metrics().clone(),
            Holding::Compare(_) => Metrics::default(),
        }
    }
}

impl FrameSink for OutputCommit {
    fn send(&self, frame: &[u8]) {
        let mut gate = self.lock();
        if matches!(gate.mode, Mode::PassThrough) {
            self.release.send(frame);
            return;
        }
        let epoch = gate.running_epoch;
        match &mut gate.holding {
            Holding::Epochs(buffer) => match buffer.hold(epoch, frame, Instant::now()) {
                Ok(Held::Held) => self.output_held.notify_all(),
                Ok(Held::Dropped) => {
                    log_limited!(warn, epoch, "output buffer full: a guest frame was dropped");
                }
                Err(error) => {
                    log_limited!(warn, %error, "a guest frame could not be held; dropped");
                }
            },
            Holding::Compare(colo) => {
                let released = colo.primary(epoch, frame.to_vec(), Instant::now());
                self.send_frames(released);
                if colo.wanted().is_some() {
                    self.output_held.notify_all();
                }
            }
        }
    }
}

/// The virtio-net device's delivery observer: logs received frames through
/// the gate (see the module docs).
pub struct InputRecorder(pub Arc<OutputCommit>);

impl FrameSink for InputRecorder {
    fn send(&self, frame: &[u8]) {
        self.0.record_input(frame);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use understudy_vm::virtio_net::FrameRecorder;

    fn gate() -> (Arc<FrameRecorder>, OutputCommit) {
        let out = Arc::new(FrameRecorder::default());
        let gate = OutputCommit::new(out.clone(), Limits::default());
        (out, gate)
    }

    #[test]
    fn frames_pass_through_before_protection_begins() {
        let (out, gate) = gate();
        gate.send(b"a");
        assert_eq!(out.frames(), vec![b"a".to_vec()]);
    }

    #[test]
    fn a_frame_waits_for_the_acknowledgement_of_its_epoch() {
        let (out, gate) = gate();
        gate.begin(None);
        gate.checkpointed(0);
        gate.send(b"epoch 1");
        gate.acknowledge(0);
        assert!(out.frames().is_empty());
        gate.acknowledge(1);
        assert_eq!(out.frames(), vec![b"epoch 1".to_vec()]);
    }

    #[test]
    fn frames_after_a_checkpoint_belong_to_the_next_epoch() {
        let (out, gate) = gate();
        gate.begin(None);
        gate.send(b"epoch 0");
        gate.checkpointed(0);
        gate.send(b"epoch 1");
        gate.acknowledge(0);
        assert_eq!(out.frames(), vec![b"epoch 0".to_vec()]);
    }

    #[test]
    fn output_waits_only_for_frames_of_the_running_epoch() {
        let (_out, gate) = gate();
        gate.begin(None);
        gate.send(b"epoch 0");
        let before = gate.output_waiting();
        gate.checkpointed(0);

        let after = gate.output_waiting();

        assert!(before);
        assert!(!after);
    }

    #[test]
    fn opening_releases_everything_and_passes_through() {
        let (out, gate) = gate();
        gate.begin(None);
        gate.send(b"held");
        gate.open();
        gate.send(b"direct");
        assert_eq!(out.frames(), vec![b"held".to_vec(), b"direct".to_vec()]);
    }

    #[test]
    fn received_frames_are_logged_with_the_running_epoch_while_protected() {
        let (_out, gate) = gate();
        let gate = Arc::new(gate);
        let (log, logged) = std::sync::mpsc::sync_channel(8);
        let recorder = InputRecorder(gate.clone());
        recorder.send(b"before");
        gate.begin(Some(InputLog::Queued(log)));
        gate.checkpointed(3);
        recorder.send(b"request");
        gate.open();
        recorder.send(b"after");

        let frames: Vec<(u64, Vec<u8>)> = logged.try_iter().collect();

        assert_eq!(frames, vec![(4, b"request".to_vec())]);
    }

    #[test]
    fn a_new_protection_counts_epochs_from_zero_again() {
        let (out, gate) = gate();
        gate.begin(None);
        gate.checkpointed(5);
        gate.acknowledge(6);
        gate.open();
        gate.begin(None);
        gate.send(b"new epoch 0");
        gate.acknowledge(0);
        assert_eq!(out.frames(), vec![b"new epoch 0".to_vec()]);
        assert_eq!(gate.metrics().frames_released, 1);
    }
}
