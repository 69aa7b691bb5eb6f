//! When checkpoints happen: the adaptive epoch length ([`EpochPolicy`]) and
//! the wait for the next epoch boundary, which an output-commit gate may cut
//! short (the early checkpoint on output).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::output::OutputCommit;

/// How long epochs are: the target length, shortened (down to `min`) while
/// checkpoint pauses exceed `max_pause`, and lengthened back (by 20 % per
/// epoch) once pauses fall under half of it. A shorter epoch leaves the guest
/// less time to dirty pages, so the next pause is shorter.
///
/// An idle guest's checkpoints carry almost nothing: while one holds at most
/// [`IDLE_PAGES`] dirty pages, the next epoch is twice as long, up to
/// `idle`; the first busier checkpoint brings it back to the target. A
/// checkpoint is owed before output goes out (the early checkpoint on output
/// cuts a long epoch short: the caller stretches only where that applies)
/// and to bound what a failover loses invisibly (at most `idle` of the
/// guest's work, and only when it did almost nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochPolicy {
    /// The epoch length when pauses are within budget.
    pub target: Duration,
    /// The shortest epoch.
    pub min: Duration,
    /// The pause budget per checkpoint.
    pub max_pause: Duration,
    /// The longest epoch of an idle guest (at most the target: never
    /// stretched).
    pub idle: Duration,
}

/// Dirty pages a checkpoint may carry and still count as idle.
pub const IDLE_PAGES: usize = 64;

impl EpochPolicy {
    /// The length of the next epoch after one of `current` whose checkpoint
    /// paused the guest for `pause` and carried `dirty_pages`.
    pub fn next(&self, current: Duration, pause: Duration, dirty_pages: usize) -> Duration {
        if self.idle > self.target && dirty_pages <= IDLE_PAGES && pause <= self.max_pause {
            return (current.max(self.target) * 2).min(self.idle);
        }
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
        )?;
        if self.idle > self.target {
            write!(
                f,
                ", stretched up to {:?} while the guest is idle",
                self.idle
            )?;
        }
        Ok(())
    }
}

/// How often a wait looks at the stop flag (set from a signal handler,
/// which cannot wake a condition variable).
const STOP_CHECK: Duration = Duration::from_millis(20);

/// Waits for the epoch boundary `next`; returns early when `stop` is set,
/// or, with an output-commit gate, once the guest has sent output and
/// `earliest` has passed (the checkpoint that releases it is then taken at
/// once, so a reply waits about `earliest - last checkpoint` instead of a
/// whole epoch). Output wakes the wait through the gate's condition
/// variable, not by polling.
pub(crate) fn wait_for_epoch(
    next: Instant,
    stop: &AtomicBool,
    early: Option<(&OutputCommit, Instant)>,
) {
    loop {
        let now = Instant::now();
        if now >= next || stop.load(Ordering::Relaxed) {
            return;
        }
        let slice_end = next.min(now + STOP_CHECK);
        match early {
            Some((gate, earliest)) if now >= earliest => {
                if gate.wait_for_output(slice_end) {
                    return;
                }
            }
            Some((_, earliest)) => std::thread::sleep(slice_end.min(earliest) - now),
            None => std::thread::sleep(slice_end - now),
        }
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
            idle: Duration::from_secs(1),
        }
    }

    const BUSY: usize = IDLE_PAGES + 1;

    #[test]
    fn long_pause_shortens_the_epoch() {
        let next = policy().next(Duration::from_millis(25), Duration::from_millis(3), BUSY);
        assert_eq!(next, Duration::from_micros(17_500));
    }

    #[test]
    fn epoch_never_goes_below_the_minimum() {
        let next = policy().next(Duration::from_millis(6), Duration::from_millis(10), BUSY);
        assert_eq!(next, Duration::from_millis(5));
    }

    #[test]
    fn short_pauses_grow_the_epoch_back_to_the_target_only() {
        let next = policy().next(Duration::from_millis(24), Duration::from_micros(100), BUSY);
        assert_eq!(next, Duration::from_millis(25));
    }

    #[test]
    fn pause_within_budget_keeps_the_epoch() {
        let next = policy().next(Duration::from_millis(10), Duration::from_micros(1500), BUSY);
        assert_eq!(next, Duration::from_millis(10));
    }

    #[test]
    fn an_idle_guests_epochs_double_up_to_the_idle_limit() {
        let policy = policy();

        let second = policy.next(Duration::from_millis(25), Duration::from_micros(300), 3);
        let later = policy.next(Duration::from_millis(800), Duration::from_micros(300), 3);

        assert_eq!(second, Duration::from_millis(50));
        assert_eq!(later, Duration::from_secs(1));
    }

    #[test]
    fn a_busy_checkpoint_brings_a_stretched_epoch_back_to_the_target() {
        let next = policy().next(Duration::from_secs(1), Duration::from_micros(300), BUSY);

        assert_eq!(next, Duration::from_millis(25));
    }

    #[test]
    fn without_an_idle_limit_epochs_never_stretch() {
        let policy = EpochPolicy {
            idle: Duration::ZERO,
            ..policy()
        };

        let next = policy.next(Duration::from_millis(25), Duration::from_micros(300), 0);

        assert_eq!(next, Duration::from_millis(25));
    }

    #[test]
    fn the_wait_ends_at_the_deadline() {
        let never = AtomicBool::new(false);
        let deadline = Instant::now() + Duration::from_millis(5);

        wait_for_epoch(deadline, &never, None);

        assert!(Instant::now() >= deadline);
    }

    #[test]
    fn output_ends_the_wait_once_the_earliest_moment_passed() {
        use std::sync::Arc;
        use understudy_proxy::Limits;
        use understudy_vm::virtio_net::{DiscardFrames, FrameSink};

        let gate = Arc::new(OutputCommit::new(
            Arc::new(DiscardFrames),
            Limits::default(),
        ));
        gate.begin(None);
        let guest = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                gate.send(&[0u8; 60]);
            })
        };
        let never = AtomicBool::new(false);
        let far = Instant::now() + Duration::from_secs(3600);

        wait_for_epoch(far, &never, Some((&gate, Instant::now())));

        guest.join().expect("the guest thread");
        assert!(Instant::now() < far);
        assert!(gate.output_waiting());
    }

    #[test]
    fn a_stop_ends_the_wait_at_once() {
        let stopped = AtomicBool::new(true);
        let far = Instant::now() + Duration::from_secs(3600);

        wait_for_epoch(far, &stopped, None);

        assert!(Instant::now() < far);
    }
}
