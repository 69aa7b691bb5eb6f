//! Output commit (Remus): network output the guest produces during epoch N
//! depends on state that only checkpoint N makes durable, so no one outside
//! may see it before the secondary has acknowledged epoch N.
//!
//! ```text
//! guest sends frame      -> hold(epoch N, frame)      the epoch being run
//! checkpoint N taken     -> (the next frames are epoch N + 1)
//! secondary acks N       -> acknowledge(N) releases every frame of
//!                           epochs <= N, in the order the guest sent them
//! primary dies           -> held frames die with it: nothing of an
//!                           unacknowledged epoch ever escaped
//! ```
//!
//! [`OutputBuffer`] is that rule and nothing else: no sockets, no taps, so
//! the rule can be tested on its own. The buffer is bounded in frames and
//! bytes; when it is full, [`WhenFull`] says whether a new frame is dropped
//! (the guest's TCP retransmits it, as after a congested link) or refused so
//! that the caller stops taking frames from the guest (backpressure).
//!
//! The COLO mode's pieces (issue 13, not wired into the primary and
//! secondary yet): [`compare`] releases a frame as soon as the secondary
//! produced the same one and asks for a checkpoint otherwise;
//! [`rewrite`] keeps the secondary's TCP sequence numbers in step with the
//! primary's until a checkpoint makes the copies equal.

pub mod compare;
pub mod rewrite;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A frame the buffer refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyError {
    /// Frames of an epoch already acknowledged cannot be held any more.
    #[error("a frame of epoch {epoch} arrived after epoch {acknowledged} was acknowledged")]
    EpochAlreadyAcknowledged {
        /// The frame's epoch.
        epoch: u64,
        /// The last acknowledged epoch.
        acknowledged: u64,
    },
    /// Epochs go forward only.
    #[error("a frame of epoch {epoch} arrived after frames of epoch {newest}")]
    EpochWentBack {
        /// The frame's epoch.
        epoch: u64,
        /// The newest epoch held.
        newest: u64,
    },
    /// Full, and the policy is backpressure.
    #[error(
        "the output buffer is full ({frames} frames, {bytes} bytes held): stop taking frames from the guest until an acknowledgement releases some"
    )]
    Full {
        /// Frames held.
        frames: usize,
        /// Bytes held.
        bytes: usize,
    },
}

/// What to do with a frame that does not fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenFull {
    /// Drop it (counted): the guest's transport protocol retransmits.
    Drop,
    /// Refuse it with [`ProxyError::Full`]: the caller stops reading the
    /// guest's transmit queue until frames are released.
    Backpressure,
}

/// Limits of an [`OutputBuffer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most frames held.
    pub frames: usize,
    /// Most bytes held.
    pub bytes: usize,
    /// What happens beyond them.
    pub when_full: WhenFull,
}

impl Default for Limits {
    /// 8 MiB or 16,384 frames: at 1 Gbit/s, about two 25 ms epochs of
    /// output.
    fn default() -> Self {
        Self {
            frames: 16_384,
            bytes: 8 << 20,
            when_full: WhenFull::Drop,
        }
    }
}

/// What happened to a frame given to [`OutputBuffer::hold`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// Held until its epoch is acknowledged.
    Held,
    /// Dropped: the buffer was full.
    Dropped,
}

/// A frame released to the outside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Released {
    /// The epoch it belonged to.
    pub epoch: u64,
    /// The frame.
    pub frame: Vec<u8>,
    /// How long it was held.
    pub held_for: Duration,
}

/// Counters and the distribution of the latency output commit adds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Frames held now.
    pub frames_held: usize,
    /// Bytes held now.
    pub bytes_held: usize,
    /// Frames released so far.
    pub frames_released: u64,
    /// Frames dropped because the buffer was full.
    pub frames_dropped: u64,
    /// Frames refused because the buffer was full (backpressure).
    pub frames_refused: u64,
    /// Released frames by time held: bucket `i` counts holds of less than
    /// 2^i microseconds (the last bucket: all longer ones).
    pub held_histogram: [u64; 24],
}

impl Metrics {
    /// The time held by the `quantile` (0 to 1) of released frames, as the
    /// upper bound of its histogram bucket.
    pub fn held_quantile(&self, quantile: f64) -> Option<Duration> {
        let total: u64 = self.held_histogram.iter().sum();
        if total == 0 {
            return None;
        }
        let wanted = rank(total, quantile);
        let mut seen = 0;
        for (bucket, count) in self.held_histogram.iter().enumerate() {
            seen += count;
            if seen >= wanted {
                return Some(Duration::from_micros(1 << bucket));
            }
        }
        None
    }

    fn record_held(&mut self, held_for: Duration) {
        let bucket = log2_bucket(held_for.as_micros().max(1), self.held_histogram.len());
        self.held_histogram[bucket] += 1;
    }
}

struct HeldFrame {
    epoch: u64,
    frame: Vec<u8>,
    since: Instant,
}

/// The held output of one guest.
pub struct OutputBuffer {
    limits: Limits,
    queue: VecDeque<HeldFrame>,
    acknowledged: Option<u64>,
    metrics: Metrics,
}

impl OutputBuffer {
    /// An empty buffer.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            queue: VecDeque::new(),
            acknowledged: None,
            metrics: Metrics::default(),
        }
    }

    /// Holds `frame`, sent by the guest while it ran epoch `epoch`.
    pub fn hold(&mut self, epoch: u64, frame: &[u8], now: Instant) -> Result<Held, ProxyError> {
        if let Some(acknowledged) = self.acknowledged
            && epoch <= acknowledged
        {
            return Err(ProxyError::EpochAlreadyAcknowledged {
                epoch,
                acknowledged,
            });
        }
        if let Some(newest) = self.queue.back().map(|held| held.epoch)
            && epoch < newest
        {
            return Err(ProxyError::EpochWentBack { epoch, newest });
        }
        let frames = self.metrics.frames_held + 1;
        let bytes = self.metrics.bytes_held + frame.len();
        if frames > self.limits.frames || bytes > self.limits.bytes {
            return match self.limits.when_full {
                WhenFull::Drop => {
                    self.metrics.frames_dropped += 1;
                    Ok(Held::Dropped)
                }
                WhenFull::Backpressure => {
                    self.metrics.frames_refused += 1;
                    Err(ProxyError::Full {
                        frames: self.metrics.frames_held,
                        bytes: self.metrics.bytes_held,
                    })
                }
            };
        }
        self.queue.push_back(HeldFrame {
            epoch,
            frame: frame.to_vec(),
            since: now,
        });
        self.metrics.frames_held = frames;
        self.metrics.bytes_held = bytes;
        Ok(Held::Held)
    }

    /// The secondary acknowledged `epoch`: returns every frame of that epoch
    /// and the ones before, in the order the guest sent them.
    pub fn acknowledge(&mut self, epoch: u64, now: Instant) -> Vec<Released> {
        self.acknowledged = Some(self.acknowledged.map_or(epoch, |last| last.max(epoch)));
        let mut released = Vec::new();
        while self.queue.front().is_some_and(|held| held.epoch <= epoch) {
            let held = self.queue.pop_front().expect("checked above");
            let held_for = now.saturating_duration_since(held.since);
            self.metrics.frames_held -= 1;
            self.metrics.bytes_held -= held.frame.len();
            self.metrics.frames_released += 1;
            self.metrics.record_held(held_for);
            released.push(Released {
                epoch: held.epoch,
                frame: held.frame,
                held_for,
            });
        }
        released
    }

    /// The frames held for `epoch`, in the order the guest sent them.
    pub fn frames_of(&self, epoch: u64) -> impl Iterator<Item = &[u8]> {
        self.queue
            .iter()
            .filter(move |held| held.epoch == epoch)
            .map(|held| held.frame.as_slice())
    }

    /// A new protection numbers its epochs from 0 again: returns the frames
    /// still held (the caller releases them: nobody will acknowledge their
    /// epochs now) and forgets the last acknowledged epoch. Metrics go on.
    pub fn restart_epochs(&mut self, now: Instant) -> Vec<Released> {
        let released = self.acknowledge(u64::MAX, now);
        self.acknowledged = None;
        released
    }

    /// The newest epoch with a frame held, if any frame is.
    pub fn newest_epoch(&self) -> Option<u64> {
        self.queue.back().map(|held| held.epoch)
    }

    /// The last acknowledged epoch.
    pub fn acknowledged(&self) -> Option<u64> {
        self.acknowledged
    }

    /// Counters and latencies so far.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// The bucket of a log2 histogram of `buckets` buckets that `micros` falls
/// in: bucket `i` holds values below `2^i` (the last: the rest).
pub(crate) fn log2_bucket(micros: u128, buckets: usize) -> usize {
    let bits = usize::try_from(128 - micros.leading_zeros()).expect("at most 128");
    bits.min(buckets - 1)
}

/// The 1-based rank of the `quantile` (clamped to 0..=1) among `total` values.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "the product is within 1..=total, and float-to-int `as` saturates"
)]
fn rank(total: u64, quantile: f64) -> u64 {
    ((total as f64) * quantile.clamp(0.0, 1.0)).ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffer() -> OutputBuffer {
        OutputBuffer::new(Limits::default())
    }

    fn frames(released: &[Released]) -> Vec<Vec<u8>> {
        released.iter().map(|r| r.frame.clone()).collect()
    }

    #[test]
    fn restarted_epochs_accept_epoch_zero_again_and_keep_metrics() {
        let now = Instant::now();
        let mut buffer = OutputBuffer::new(Limits::default());
        buffer.hold(3, b"old", now).expect("held");
        buffer.acknowledge(2, now);

        let released = buffer.restart_epochs(now);

        assert_eq!(released.len(), 1);
        assert_eq!(buffer.acknowledged(), None);
        assert_eq!(buffer.hold(0, b"new", now), Ok(Held::Held));
        assert_eq!(buffer.metrics().frames_released, 1);
    }

    #[test]
    fn nothing_leaves_before_its_epoch_is_acknowledged() {
        let mut output = buffer();
        let now = Instant::now();
        output.hold(3, b"reply", now).expect("held");

        let early = output.acknowledge(2, now);

        assert!(early.is_empty());
        assert_eq!(output.metrics().frames_held, 1);
    }

    #[test]
    fn acknowledgement_releases_its_epoch_and_earlier_ones_in_order() {
        let mut output = buffer();
        let now = Instant::now();
        output.hold(1, b"a", now).expect("held");
        output.hold(1, b"b", now).expect("held");
        output.hold(2, b"c", now).expect("held");
        output.hold(3, b"d", now).expect("held");

        let released = output.acknowledge(2, now + Duration::from_millis(30));

        assert_eq!(
            frames(&released),
            vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
        );
        assert_eq!(released[0].held_for, Duration::from_millis(30));
        assert_eq!(output.metrics().frames_held, 1);
    }

    #[test]
    fn frame_of_an_acknowledged_epoch_is_refused() {
        let mut output = buffer();
        let now = Instant::now();
        output.acknowledge(5, now);

        assert_eq!(
            output.hold(5, b"late", now),
            Err(ProxyError::EpochAlreadyAcknowledged {
                epoch: 5,
                acknowledged: 5
            })
        );
    }

    #[test]
    fn epochs_cannot_go_back() {
        let mut output = buffer();
        let now = Instant::now();
        output.hold(4, b"x", now).expect("held");

        assert_eq!(
            output.hold(3, b"y", now),
            Err(ProxyError::EpochWentBack {
                epoch: 3,
                newest: 4
            })
        );
    }

    #[test]
    fn full_buffer_drops_and_counts_by_default() {
        let mut output = OutputBuffer::new(Limits {
            frames: 2,
            ..Limits::default()
        });
        let now = Instant::now();
        output.hold(1, b"a", now).expect("held");
        output.hold(1, b"b", now).expect("held");

        let third = output.hold(1, b"c", now);

        assert_eq!(third, Ok(Held::Dropped));
        assert_eq!(output.metrics().frames_dropped, 1);
        assert_eq!(
            frames(&output.acknowledge(1, now)),
            vec![b"a".to_vec(), b"b".to_vec()]
        );
    }

    #[test]
    fn full_buffer_refuses_under_backpressure() {
        let mut output = OutputBuffer::new(Limits {
            frames: 100,
            bytes: 4,
            when_full: WhenFull::Backpressure,
        });
        let now = Instant::now();
        output.hold(1, b"abc", now).expect("held");

        let refused = output.hold(1, b"de", now);

        assert_eq!(
            refused,
            Err(ProxyError::Full {
                frames: 1,
                bytes: 3
            })
        );
        assert_eq!(output.metrics().frames_refused, 1);
    }

    #[test]
    fn held_latency_quantiles_come_from_the_histogram() {
        let mut output = buffer();
        let start = Instant::now();
        for _ in 0..99 {
            output.hold(1, b"fast", start).expect("held");
        }
        output.acknowledge(1, start + Duration::from_micros(900));
        output.hold(2, b"slow", start).expect("held");
        output.acknowledge(2, start + Duration::from_millis(40));

        let p50 = output.metrics().held_quantile(0.5).expect("p50");
        let p100 = output.metrics().held_quantile(1.0).expect("max");

        assert_eq!(p50, Duration::from_micros(1024));
        assert_eq!(p100, Duration::from_micros(65536));
    }
}
