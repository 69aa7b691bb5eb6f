//! [`run`]: a protected guest's whole life on the primary, mirroring
//! `understudy_secondary::serve`. Connect and synchronise, then checkpoint
//! every epoch until stopped; when the secondary is lost, the guest runs on
//! unprotected (loudly reported) and the secondary's address is tried again
//! every second, with a full resynchronisation when one answers.
//!
//! ```text
//!  connect ─▶ synchronise (epoch 0) ─▶ ┌ wait for the epoch boundary (or early, on output)
//!     ▲                                 │ checkpoint and queue it
//!     │                                 └ drain events ─▶ repeat until stop / duration / guest stopped
//!     └── secondary lost: run unprotected, retry every second
//! ```
//!
//! In COLO mode ([`ColoOptions`]) the loop waits instead for the compare
//! proxy to ask for a checkpoint (a mismatch, a compare timeout) or for the
//! periodic interval, takes it, and waits for its acknowledgement before
//! looking again: one checkpoint in flight at a time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use understudy_checkpoint::protocol::Purpose;
use understudy_vm::Vm;
use understudy_vm::progress;

use crate::output::OutputCommit;
use crate::policy::{EpochPolicy, wait_for_epoch};
use crate::protection::Protection;
use understudy_checkpoint::witness::Witness;

use crate::fence::Fence;
use crate::{Identity, PrimaryError, PrimaryEvent, PrimaryOptions};

/// How long between attempts to reach a lost secondary again.
const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);

/// How a protected guest runs.
#[derive(Clone)]
pub struct RunOptions {
    /// Connection, epochs, codec, heartbeats.
    pub primary: PrimaryOptions,
    /// This VM's identity for the secondary.
    pub vm_id: u64,
    /// This process, as the witness knows it.
    pub owner: u64,
    /// The witness, if fencing is on (see [`crate::fence`]). Without it the
    /// pair assumes crash-stop failures: a partition or a stalled host can
    /// leave two copies running.
    pub witness: Option<Witness>,
    /// The guest's output-commit gate, when it has a network.
    pub gate: Option<Arc<OutputCommit>>,
    /// With a gate: take the checkpoint early once the guest has sent
    /// output and this long has passed since the last one (zero: output
    /// waits for the epoch's end, as in Remus).
    pub output_epoch: Duration,
    /// Stop after this long (default: until `stop`).
    pub duration: Option<Duration>,
    /// Keep trying the first connection this long (a secondary that is
    /// still starting); later losses are retried until stopped.
    pub connect_patience: Duration,
    /// COLO mode: the secondary runs its copy of the guest and `gate`
    /// compares (built with `OutputCommit::colo`); none: Remus.
    pub colo: Option<ColoOptions>,
    /// Live control (the control API): settings changed while running, and
    /// a request to hand the guest back to the caller.
    pub controls: Option<Arc<Controls>>,
    /// The tag of an image of this guest the secondary keeps (after a
    /// planned switchover, the old primary): the first synchronisation
    /// sends only the pages written since, if it still holds it. 0: none.
    pub base_image: u64,
}

/// Live control of a running protection, shared with the control API.
#[derive(Debug, Default)]
pub struct Controls {
    retune: Mutex<Option<Retune>>,
    /// A planned switchover asked for: where this side then waits, as the
    /// secondary, for the new primary's protection.
    switchover: Mutex<Option<String>>,
    /// Set: [`run`] closes the protection cleanly at the next epoch
    /// boundary (or stops waiting for a lost secondary) and returns
    /// [`RunEnd::Interrupted`], the guest running.
    pub interrupt: Arc<AtomicBool>,
}

/// Settings to change while protecting; `None` keeps the current one.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Retune {
    /// The target epoch (the minimum follows at a fifth of it).
    pub epoch: Option<Duration>,
    /// The pause budget of the adaptive policy.
    pub max_pause: Option<Duration>,
    /// The page codec: applied by a new connection (a full
    /// resynchronisation), since both ends' codec state starts afresh.
    pub codec: Option<understudy_compress::CodecSpec>,
}

impl Controls {
    /// Controls whose interrupt is `interrupt`.
    pub fn new(interrupt: Arc<AtomicBool>) -> Self {
        Self {
            retune: Mutex::new(None),
            switchover: Mutex::new(None),
            interrupt,
        }
    }

    /// Asks for a planned switchover at the next epoch boundary: the
    /// secondary takes the guest over and protects it by this side, which
    /// then waits at `protect_to` (see [`RunEnd::HandedOver`]).
    pub fn request_switchover(&self, protect_to: String) {
        *self.switchover.lock().expect("controls lock poisoned") = Some(protect_to);
        self.interrupt.store(true, Ordering::Relaxed);
    }

    /// Withdraws a switchover asked for (protection ended before it could
    /// happen).
    pub fn cancel_switchover(&self) -> bool {
        self.take_switchover().is_some()
    }

    fn take_switchover(&self) -> Option<String> {
        self.switchover
            .lock()
            .expect("controls lock poisoned")
            .take()
    }

    /// Asks for new settings (merged with any not applied yet).
    pub fn retune(&self, retune: Retune) {
        let mut pending = self.retune.lock().expect("controls lock poisoned");
        let merged = pending.take().unwrap_or_default();
        *pending = Some(Retune {
            epoch: retune.epoch.or(merged.epoch),
            max_pause: retune.max_pause.or(merged.max_pause),
            codec: retune.codec.or(merged.codec),
        });
    }

    /// The codec asked for and not applied yet (taken).
    fn take_codec(&self) -> Option<understudy_compress::CodecSpec> {
        self.retune
            .lock()
            .expect("controls lock poisoned")
            .as_mut()
            .and_then(|retune| retune.codec.take())
    }

    fn take_retune(&self) -> Option<Retune> {
        self.retune.lock().expect("controls lock poisoned").take()
    }

    fn interrupted(&self) -> bool {
        self.interrupt.load(Ordering::Relaxed)
    }
}

impl Retune {
    /// `policy` with these settings.
    fn apply_to(&self, policy: &mut EpochPolicy) {
        if let Some(epoch) = self.epoch {
            policy.target = epoch;
            policy.min = (epoch / 5).max(Duration::from_millis(1));
        }
        if let Some(max_pause) = self.max_pause {
            policy.max_pause = max_pause;
        }
    }
}

/// How COLO mode checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColoOptions {
    /// A checkpoint at least this often, even when every output matched:
    /// it bounds how far the copies drift apart in state that has not
    /// shown in output yet, and how many pages the next checkpoint moves.
    pub interval: Duration,
}

impl Default for ColoOptions {
    /// 5 s: a kv guest under load dirties a few hundred pages between two
    /// checkpoints, so a periodic one costs a few milliseconds of pause
    /// every 5 s (well under 0.1 %), while a divergence hidden in memory is
    /// corrected within seconds; QEMU's default of 20 s lets copies drift
    /// four times longer for little saving.
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
        }
    }
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunEnd {
    /// Stopped, or its duration was over; the guest is still running.
    Stopped,
    /// The guest stopped by itself (exited, panicked, or a vCPU failed).
    GuestStopped(String),
    /// [`Controls::interrupt`] was set: protection was closed cleanly (the
    /// secondary stands down), the guest is running.
    Interrupted,
    /// A planned switchover: the secondary took the guest over from the
    /// last checkpoint; the guest stays paused here, its memory the image
    /// `kept_image` (the new primary builds on it). `confirmed` is false
    /// when the secondary's `TookOver` never came: it takes over anyway
    /// (the handover, or the connection's loss after a committed epoch),
    /// unless it died too.
    HandedOver {
        /// The image's tag.
        kept_image: u64,
        /// The secondary confirmed.
        confirmed: bool,
    },
}

/// Protects `vm` (running) until `stop`, the duration, or the guest ends.
/// `on_event` hears every event, on the calling thread; a
/// [`PrimaryEvent::Checkpointed`] always comes before anything of its epoch
/// is sent. Fails only when the first connection cannot be made or a
/// protection fails otherwise than by losing the secondary.
pub fn run(
    vm: &mut Vm,
    options: &RunOptions,
    stop: &AtomicBool,
    mut on_event: impl FnMut(PrimaryEvent),
) -> Result<RunEnd, PrimaryError> {
    let started = Instant::now();
    let deadline = options.duration.map(|duration| started + duration);
    let interrupted = || {
        options
            .controls
            .as_ref()
            .is_some_and(|controls| controls.interrupted())
    };
    let finished = || {
        stop.load(Ordering::Relaxed)
            || deadline.is_some_and(|end| Instant::now() >= end)
            || interrupted()
    };
    let mut fence = match &options.witness {
        Some(witness) => Some(Fence::claim(
            witness.clone(),
            options.vm_id,
            options.owner,
            stop,
            &mut on_event,
        )?),
        None => None,
    };
    // Epochs stretch while the guest is idle only for a guest without a
    // network. With one, `drill --failure stall-primary` let a resumed,
    // stalled primary send frames after the takeover in 2 rounds of 35
    // with stretching, 0 of 32 without (cause not found yet: NOTES.md).
    let mut primary = options.primary.clone();
    if options.gate.is_some() {
        primary.epoch.idle = Duration::ZERO;
    }
    let mut protected_before = false;
    while !finished() {
        let identity = Identity {
            vm_id: options.vm_id,
            owner: options.owner,
            generation: fence.as_ref().map_or(0, Fence::next_generation),
        };
        let purpose = if options.colo.is_some() {
            Purpose::Colo
        } else {
            Purpose::Replicate
        };
        let mut protection = match Protection::connect(
            vm,
            primary.clone(),
            identity,
            purpose,
            options
                .colo
                .map_or(primary.epoch.target.max(primary.epoch.idle), |colo| {
                    colo.interval
                }),
            options.base_image,
        ) {
            Ok(protection) => protection,
            Err(error) if protected_before || started.elapsed() < options.connect_patience => {
                // Unprotected (or not yet): the guest runs on; try again soon.
                tracing::debug!("protection failed to start: {error}");
                if let Some(reason) = guest_stopped(vm) {
                    return Ok(RunEnd::GuestStopped(reason));
                }
                let pause = if protected_before {
                    RECONNECT_INTERVAL
                } else {
                    Duration::from_millis(20)
                };
                std::thread::sleep(pause);
                continue;
            }
            Err(error) => return Err(error),
        };
        if let Some(gate) = &options.gate {
            protection.commit_output(gate.clone());
        }
        let outcome = protection
            .synchronise(vm, |metrics| {
                on_event(PrimaryEvent::Checkpointed(metrics.clone()));
            })
            .and_then(|synchronised| {
                on_event(synchronised);
                protected_before = true;
                if let Some(fence) = &mut fence {
                    fence.in_sync(&mut on_event)?;
                }
                match options.colo {
                    Some(colo) => protect_colo(
                        vm,
                        &mut protection,
                        options.gate.as_deref(),
                        colo,
                        stop,
                        deadline,
                        &mut on_event,
                    ),
                    None => protect(
                        vm,
                        &mut protection,
                        options,
                        &mut primary.epoch,
                        stop,
                        deadline,
                        &mut on_event,
                    ),
                }
            });
        for event in protection.events() {
            on_event(event);
        }
        match outcome {
            Ok(end @ RunEnd::HandedOver { .. }) => {
                // The guest is the secondary's now: nothing of it may run
                // here, and the witness is the new primary's to claim.
                drop(protection.close_holding("the guest was handed over"));
                return Ok(end);
            }
            Ok(end) => {
                // A clean stop: the secondary hears Goodbye and stands down.
                // With a witness, held output goes out only once this side
                // owns the VM alone: a secondary that missed the goodbye
                // could otherwise take over from an older epoch.
                let held = protection.close_holding(if end == RunEnd::Interrupted {
                    "the primary pauses protection for a control request"
                } else {
                    "the primary is stopping"
                });
                if let Some(fence) = &mut fence {
                    fence.go_solo(stop, &mut on_event)?;
                }
                held.open();
                return Ok(end);
            }
            Err(PrimaryError::SecondaryLost(reason)) if protected_before => {
                let held = protection.close_holding("the primary lost its secondary");
                tracing::warn!(
                    "the secondary was lost ({reason}); the guest keeps running UNPROTECTED; \
                     trying {} again every second",
                    options.primary.secondary
                );
                on_event(PrimaryEvent::SecondaryLost { reason });
                if let Some(fence) = &mut fence {
                    // Output stays held unless this side wins the witness:
                    // the secondary may have taken over.
                    fence.go_solo(stop, &mut on_event)?;
                }
                held.open();
            }
            Err(PrimaryError::Resynchronise(why)) => {
                tracing::info!("resynchronising protection: {why}");
                protection.close(&why);
                if let Some(codec) = options
                    .controls
                    .as_ref()
                    .and_then(|controls| controls.take_codec())
                {
                    primary.codec = codec;
                }
            }
            Err(error @ PrimaryError::Fenced(_)) => {
                // Never release what is held: another copy runs the guest.
                drop(protection.close_holding("this copy is fenced off"));
                return Err(error);
            }
            Err(error) => {
                protection.close("the primary is stopping");
                return Err(error);
            }
        }
    }
    if interrupted() && !stop.load(Ordering::Relaxed) {
        return Ok(RunEnd::Interrupted);
    }
    Ok(RunEnd::Stopped)
}

/// Applies what the controls ask for at an epoch boundary: new epoch
/// settings at once; a new codec by a new connection
/// ([`PrimaryError::Resynchronise`]); an interrupt ends the protection.
fn apply_controls(
    protection: &mut Protection,
    options: &RunOptions,
    policy: &mut EpochPolicy,
) -> Result<Option<RunEnd>, PrimaryError> {
    let Some(controls) = &options.controls else {
        return Ok(None);
    };
    if let Some(retune) = controls.take_retune() {
        retune.apply_to(policy);
        protection.set_epoch_policy(*policy);
        if let Some(codec) = retune.codec {
            controls.retune(Retune {
                codec: Some(codec),
                ..Retune::default()
            });
            return Err(PrimaryError::Resynchronise(format!(
                "the codec changes to {codec}"
            )));
        }
    }
    if controls.interrupted() {
        return Ok(Some(RunEnd::Interrupted));
    }
    Ok(None)
}

/// Checkpoints every epoch until `stop`, `deadline` or the guest stops.
fn protect(
    vm: &mut Vm,
    protection: &mut Protection,
    options: &RunOptions,
    policy: &mut EpochPolicy,
    stop: &AtomicBool,
    deadline: Option<Instant>,
    on_event: &mut impl FnMut(PrimaryEvent),
) -> Result<RunEnd, PrimaryError> {
    let mut next = Instant::now();
    loop {
        if let Some(protect_to) = options
            .controls
            .as_ref()
            .and_then(|controls| controls.take_switchover())
        {
            let (kept_image, confirmed) = protection.hand_over(vm, protect_to, |metrics| {
                on_event(PrimaryEvent::Checkpointed(metrics.clone()));
            })?;
            for event in protection.events() {
                on_event(event);
            }
            return Ok(RunEnd::HandedOver {
                kept_image,
                confirmed,
            });
        }
        if let Some(end) = apply_controls(protection, options, policy)? {
            return Ok(end);
        }
        next += protection.epoch_length();
        let early = options
            .gate
            .as_deref()
            .filter(|_| !options.output_epoch.is_zero())
            .map(|gate| (gate, protection.last_checkpoint() + options.output_epoch));
        wait_for_epoch(deadline.map_or(next, |end| next.min(end)), stop, early);
        if stop.load(Ordering::Relaxed) || deadline.is_some_and(|end| Instant::now() >= end) {
            return Ok(RunEnd::Stopped);
        }
        if let Some(reason) = guest_stopped(vm) {
            return Ok(RunEnd::GuestStopped(reason));
        }
        protection.check_progress()?;
        protection.checkpoint_and_send(vm, "epoch", |metrics| {
            on_event(PrimaryEvent::Checkpointed(metrics.clone()));
        })?;
        for event in protection.events() {
            on_event(event);
        }
        // An epoch that overran (backpressure) starts the next one now.
        next = next.max(Instant::now() - protection.epoch_length());
    }
}

/// How often the COLO loop looks at the stop flag and the guest while no
/// checkpoint is asked for.
const COLO_CHECK: Duration = Duration::from_millis(20);

/// COLO: checkpoints when the compare proxy asks for one or the interval
/// has passed, one at a time, until `stop`, `deadline` or the guest stops.
fn protect_colo(
    vm: &mut Vm,
    protection: &mut Protection,
    gate: Option<&OutputCommit>,
    colo: ColoOptions,
    stop: &AtomicBool,
    deadline: Option<Instant>,
    on_event: &mut impl FnMut(PrimaryEvent),
) -> Result<RunEnd, PrimaryError> {
    loop {
        let periodic = protection.last_checkpoint() + colo.interval;
        let until = deadline
            .map_or(periodic, |end| periodic.min(end))
            .min(Instant::now() + COLO_CHECK);
        let cause = match gate {
            Some(gate) => gate.wait_for_checkpoint_request(until),
            None => {
                std::thread::sleep(until.saturating_duration_since(Instant::now()));
                None
            }
        };
        if stop.load(Ordering::Relaxed) || deadline.is_some_and(|end| Instant::now() >= end) {
            return Ok(RunEnd::Stopped);
        }
        if let Some(reason) = guest_stopped(vm) {
            return Ok(RunEnd::GuestStopped(reason));
        }
        protection.check_progress()?;
        for event in protection.events() {
            on_event(event);
        }
        if cause.is_none() && Instant::now() < periodic {
            continue;
        }
        if let Some(gate) = gate {
            gate.colo_checkpoint_taken(cause);
        }
        let name = cause.map_or("periodic", |cause| cause.name());
        let epoch = protection.checkpoint_and_send(vm, name, |metrics| {
            on_event(PrimaryEvent::Checkpointed(metrics.clone()));
        })?;
        // One checkpoint in flight: what the proxy asks for from here on
        // is about the epoch this one starts.
        protection.wait_acknowledged(epoch)?;
        for event in protection.events() {
            on_event(event);
        }
    }
}

/// Why the guest stopped, if a vCPU reported it.
fn guest_stopped(vm: &Vm) -> Option<String> {
    progress::guest_stopped(vm).map(|event| event.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_asked_twice_merge_the_latest_of_each() {
        let controls = Controls::new(Arc::new(AtomicBool::new(false)));
        controls.retune(Retune {
            epoch: Some(Duration::from_millis(50)),
            max_pause: Some(Duration::from_millis(3)),
            codec: None,
        });

        controls.retune(Retune {
            epoch: Some(Duration::from_millis(40)),
            ..Retune::default()
        });

        assert_eq!(
            controls.take_retune(),
            Some(Retune {
                epoch: Some(Duration::from_millis(40)),
                max_pause: Some(Duration::from_millis(3)),
                codec: None,
            })
        );
    }

    #[test]
    fn a_new_epoch_brings_its_minimum_along() {
        let mut policy = EpochPolicy {
            target: Duration::from_millis(25),
            min: Duration::from_millis(5),
            max_pause: Duration::from_millis(2),
            idle: Duration::ZERO,
        };

        Retune {
            epoch: Some(Duration::from_millis(100)),
            ..Retune::default()
        }
        .apply_to(&mut policy);

        assert_eq!(policy.min, Duration::from_millis(20));
        assert_eq!(policy.max_pause, Duration::from_millis(2));
    }

    #[test]
    fn a_switchover_asked_for_interrupts_and_can_be_withdrawn() {
        let interrupt = Arc::new(AtomicBool::new(false));
        let controls = Controls::new(interrupt.clone());

        controls.request_switchover("10.0.0.2:7001".to_owned());

        assert!(interrupt.load(Ordering::Relaxed));
        assert!(controls.cancel_switchover());
        assert!(!controls.cancel_switchover());
    }
}
