//! Live migration: the same connection and epoch 0 as replication, with the
//! target resuming the guest once epoch 0 is applied.
//!
//! Pre-copy rounds run while the guest runs. After each round the remaining
//! dirty pages and the rate the last round achieved give the estimated
//! downtime of stopping now; once it is under the target, the guest is
//! paused for good, the rest and the state are sent, and the source waits
//! for the target's acknowledgement (the downtime is pause to
//! acknowledgement). When rounds stop shrinking (the guest dirties memory
//! faster than the link carries it) the policy decides: keep trying until the
//! deadline, throttle the guest (pause its vCPUs for a growing share of each
//! chunk's time, as QEMU's auto-converge does), or abort with the guest
//! still running here.
//!
//! Post-copy stops the guest at once and sends only its state; hybrid runs
//! pre-copy rounds first and names the pages that went stale (`Discard`).
//! Either way the target runs the guest and epoch 1 brings the pages it
//! lacks (see `Protection::push_postcopy`).
//!
//! Failure model of post-copy: the guest lives on both hosts until the
//! target acknowledges epoch 1. This side keeps its paused copy until then.
//! A connection that breaks (or a target that stops making progress) is
//! resumed: this side reconnects with `PostcopyResume` for the recovery
//! window, learns which pages the target holds and sends the rest. When the
//! window passes, the migration fails and the caller keeps the copy (the
//! CLI saves it as a snapshot): if the target is gone, that copy runs; if
//! it is not, it stops its guest when its own window passes.

use std::time::{Duration, Instant};

use understudy_checkpoint::protocol::Purpose;
use understudy_vm::dirty::DirtyBitmap;
use understudy_vm::{PAGE_SIZE, Vm};

use crate::protection::{Protection, Switchover};
use crate::{Identity, PrimaryError, PrimaryOptions};

/// What to do when pre-copy does not converge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoConvergence {
    /// Keep going until the deadline, then abort.
    Wait,
    /// Slow the guest down, more each round, until it converges.
    Throttle,
    /// Give up at once.
    Abort,
}

/// How memory moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MigrationMode {
    /// Copy memory while the guest runs here, then stop it briefly.
    #[default]
    Precopy,
    /// Stop the guest here at once, send its state, run it there; its
    /// memory follows, pages it faults on first. While pages are missing
    /// the guest lives on two hosts: losing either loses it (this side
    /// keeps its paused copy until the target has every page).
    Postcopy,
    /// Pre-copy rounds while they pay (the dirty set shrinks), then
    /// post-copy for what is left: the pages dirtied since they were sent
    /// are dropped on the target and follow on demand. Total time bounded
    /// like post-copy's, far fewer faults.
    Hybrid,
}

/// How a migration runs.
#[derive(Clone, Debug)]
pub struct MigrationOptions {
    /// Pre-copy or post-copy.
    pub mode: MigrationMode,
    /// Connection, codec, bandwidth limit.
    pub link: PrimaryOptions,
    /// Stop-and-copy once the estimated downtime is under this.
    pub max_downtime: Duration,
    /// Give up after this long.
    pub deadline: Duration,
    /// What to do when rounds stop shrinking.
    pub on_no_convergence: NoConvergence,
    /// Post-copy: how long to keep reconnecting to a target whose
    /// connection broke (it keeps the guest running and resumes the page
    /// epoch); zero gives up at once.
    pub postcopy_recovery: Duration,
    /// Pre-copy: keep this side's memory as an image after the guest left
    /// (tagged; the summary says with which tag), so that migrating it back
    /// sends only the pages changed meanwhile. The caller holds on to the
    /// VM, paused, for as long as it keeps the image.
    pub keep_image: bool,
    /// The tag of an image of this guest the target kept (0: none): when
    /// the target still holds it unchanged, only the pages written here
    /// since it arrived are sent.
    pub base_image: u64,
}

/// One pre-copy round, for progress reports.
#[derive(Clone, Copy, Debug)]
pub struct Round {
    /// Round number (1 is all of memory).
    pub round: u32,
    /// Pages sent in it.
    pub pages: usize,
    /// Pages dirtied meanwhile (left for the next round).
    pub pages_left: usize,
    /// Raw page rate it achieved, bytes per second.
    pub bytes_per_second: f64,
    /// Estimated downtime of stopping now.
    pub estimated_downtime: Duration,
    /// Share of time the guest is paused by throttling.
    pub throttle: f64,
}

/// A finished migration.
#[derive(Clone, Copy, Debug)]
pub struct MigrationSummary {
    /// Start to acknowledgement.
    pub total: Duration,
    /// Guest paused here to acknowledged there.
    pub downtime: Duration,
    /// Pre-copy rounds.
    pub rounds: u32,
    /// Pages sent (raw bytes = pages × 4 KiB).
    pub pages: u64,
    /// Bytes on the wire (compressed frames and the state).
    pub wire_bytes: u64,
    /// Highest throttle used.
    pub throttle: f64,
    /// Post-copy: pages the target lacked at the switchover.
    pub postcopy_pages: u64,
    /// Post-copy: pages the target asked for (its faults that reached
    /// this side); the background push brought the rest before they were
    /// touched.
    pub requested_pages: u64,
    /// Post-copy: connections that broke and were resumed.
    pub reconnections: u32,
    /// The tag of the image this side keeps (with `keep_image`).
    pub kept_image: Option<u64>,
    /// The target built on its kept image (`base_image`): only changed
    /// pages were sent.
    pub used_base: bool,
}

/// Why a migration stopped without switching over.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The link failed.
    #[error("migration failed")]
    Link(#[from] PrimaryError),
    /// A post-copy's connection broke and could not be resumed.
    #[error(
        "the post-copy's connection broke and the target could not be reached again within {window:?}"
    )]
    PostcopyBroken {
        /// The recovery window.
        window: Duration,
        /// The last failure.
        #[source]
        source: PrimaryError,
    },
    /// The handover went out but the target never confirmed it: it may run
    /// the guest, or not. The guest stays paused here (never two copies).
    #[error(
        "the target did not confirm that it took the guest over: it may be running it; the guest stays paused here"
    )]
    HandoverUnconfirmed(#[source] PrimaryError),
    /// Pre-copy did not converge and the policy gave up.
    #[error(
        "the guest dirties memory faster than the link carries it ({left} pages left after round {round}, estimated downtime {estimated:?} over the {target:?} target); migration aborted; the guest was never stopped here. Try --on-no-convergence throttle, a higher --max-bandwidth or a longer --max-downtime"
    )]
    NoConvergence {
        /// The last round.
        round: u32,
        /// Pages left.
        left: usize,
        /// Downtime if stopped now.
        estimated: Duration,
        /// The target.
        target: Duration,
    },
}

const PAGE_BYTES: f64 = PAGE_SIZE as f64;

/// Migrates `vm` to the target in `options`; the guest stays paused here on
/// success (the caller shuts it down, or keeps it as the image) and runs on
/// when the migration fails before the handover: whatever failed (the
/// target, the link, the deadline, a refusal), the guest is resumed here
/// and the target never runs it. Only a handover the target did not
/// confirm ([`MigrationError::HandoverUnconfirmed`]) and a broken post-copy
/// leave it paused.
pub fn migrate(
    vm: &mut Vm,
    options: &MigrationOptions,
    vm_id: u64,
    mut progress: impl FnMut(&Round),
) -> Result<MigrationSummary, MigrationError> {
    let started = Instant::now();
    let identity = Identity {
        vm_id,
        owner: vm_id,
        generation: 0,
    };
    let purpose = match options.mode {
        MigrationMode::Precopy => Purpose::Migrate,
        MigrationMode::Postcopy | MigrationMode::Hybrid => Purpose::MigratePostcopy,
    };
    let mut link = Protection::connect(
        vm,
        options.link.clone(),
        identity,
        purpose,
        options.link.epoch.target,
        if options.mode == MigrationMode::Precopy {
            options.base_image
        } else {
            0
        },
    )?;
    if options.mode == MigrationMode::Precopy {
        let result = run(vm, &mut link, options, started, &mut progress);
        if !matches!(result, Ok(_) | Err(MigrationError::HandoverUnconfirmed(_))) {
            // Never handed over: the guest is this side's, whatever failed.
            vm.forget_mark();
            vm.resume().map_err(PrimaryError::from)?;
        }
        link.close(match &result {
            Ok(_) => "migration complete",
            Err(_) => "migration aborted",
        });
        return result;
    }
    let hybrid = options.mode == MigrationMode::Hybrid;
    let switched = switch_over(vm, &mut link, options, hybrid, started, &mut progress);
    let (switchover, mut summary) = match switched {
        Ok(switched) => switched,
        Err(error) => {
            link.close("migration aborted");
            if !matches!(error, MigrationError::HandoverUnconfirmed(_)) {
                // Pre-copy rounds of a hybrid: the guest never left.
                vm.resume().map_err(PrimaryError::from)?;
            }
            return Err(error);
        }
    };
    // From here the guest runs on the target; this side holds its pages.
    let mut held = None;
    loop {
        let pushed = link.push_postcopy(vm, &switchover, held.as_ref());
        let pushed = pushed.and_then(|pushed| link.wait_acknowledged(1).map(|()| pushed));
        match pushed {
            Ok(pushed) => {
                summary.wire_bytes += link.wire_bytes();
                link.close("migration complete");
                summary.pages += pushed.sent;
                summary.requested_pages += pushed.requested;
                summary.total = started.elapsed();
                return Ok(summary);
            }
            Err(error) => {
                summary.wire_bytes += link.wire_bytes();
                link.close("post-copy interrupted");
                tracing::warn!(%error, "the post-copy's connection broke; reconnecting to resume it");
                let (resumed, pages_held) = reconnect(vm, options, identity, error)?;
                link = resumed;
                held = Some(pages_held);
                summary.reconnections += 1;
            }
        }
    }
}

/// Reconnects to a post-copy's target whose connection broke, for up to
/// the recovery window: returns the new connection and the pages the
/// target holds. `broke` is the failure reported if the window passes.
fn reconnect(
    vm: &Vm,
    options: &MigrationOptions,
    identity: Identity,
    broke: PrimaryError,
) -> Result<(Protection, DirtyBitmap), MigrationError> {
    let deadline = Instant::now() + options.postcopy_recovery;
    let mut last = broke;
    while Instant::now() < deadline {
        std::thread::sleep(RECONNECT_INTERVAL.min(deadline - Instant::now()));
        match Protection::connect(
            vm,
            options.link.clone(),
            identity,
            Purpose::PostcopyResume,
            options.link.epoch.target,
            0,
        ) {
            Ok(mut link) => {
                let held = link.take_pages_held().ok_or_else(|| {
                    PrimaryError::Refused("the target did not say which pages it holds".to_owned())
                })?;
                tracing::info!(
                    held = held.count(),
                    "reconnected to the post-copy's target; resuming"
                );
                return Ok((link, held));
            }
            // The target is there but will not resume this migration (it
            // gave the guest up): no point trying again.
            Err(error @ PrimaryError::Refused(_)) => return Err(error.into()),
            Err(error) => last = error,
        }
    }
    Err(MigrationError::PostcopyBroken {
        window: options.postcopy_recovery,
        source: last,
    })
}

/// How often a broken post-copy tries to reconnect.
const RECONNECT_INTERVAL: Duration = Duration::from_millis(200);

fn run(
    vm: &mut Vm,
    link: &mut Protection,
    options: &MigrationOptions,
    started: Instant,
    progress: &mut impl FnMut(&Round),
) -> Result<MigrationSummary, MigrationError> {
    link.begin_initial_copy(vm)?;
    let mut throttle = 0.0f64;
    let mut highest_throttle = 0.0f64;
    let mut total_pages = 0u64;
    let mut round = 0u32;
    let mut previous_left = usize::MAX;
    let mut stalled_rounds = 0;
    loop {
        round += 1;
        let round_started = Instant::now();
        let mut throttled = |vm: &mut Vm| -> Result<(), PrimaryError> {
            if throttle > 0.0 {
                // Pause for `throttle` of the time the chunk took.
                let chunk = round_started.elapsed().min(Duration::from_millis(50));
                vm.pause()?;
                std::thread::sleep(chunk.mul_f64(throttle / (1.0 - throttle)));
                vm.resume()?;
            }
            Ok(())
        };
        let done = precopy_round(vm, link, round, throttle, &mut throttled)?;
        progress(&done);
        let Round {
            pages,
            pages_left: left,
            estimated_downtime: estimated,
            ..
        } = done;
        total_pages += pages as u64;
        if estimated <= options.max_downtime {
            break;
        }
        stalled_rounds = if round > 1 && left as f64 >= previous_left as f64 * 0.9 {
            stalled_rounds + 1
        } else {
            0
        };
        previous_left = left;
        let out_of_time = started.elapsed() >= options.deadline;
        let stuck = stalled_rounds >= 2;
        let give_up = match options.on_no_convergence {
            NoConvergence::Abort => stuck || out_of_time,
            NoConvergence::Wait => out_of_time,
            NoConvergence::Throttle => {
                if stuck {
                    throttle = (throttle + 0.2).min(0.95);
                    highest_throttle = highest_throttle.max(throttle);
                    stalled_rounds = 0;
                }
                out_of_time
            }
        };
        if give_up {
            return Err(MigrationError::NoConvergence {
                round,
                left,
                estimated,
                target: options.max_downtime,
            });
        }
    }
    // Switchover: the guest stops here for good.
    let paused = Instant::now();
    let metrics = link.finish_initial_copy(vm, false, |_| {})?;
    total_pages += metrics.dirty_pages as u64;
    link.wait_acknowledged(0)?;
    // The commit: until the target reads the handover it never runs the
    // guest, so any failure up to here resumes it on this side.
    // The final checkpoint marked the image: anything that writes this
    // memory while it is kept (a device) makes it unusable.
    let kept_image = options.keep_image.then(image_tag);
    link.send_handover(kept_image.unwrap_or(0), String::new())?;
    link.wait_took_over()
        .map_err(MigrationError::HandoverUnconfirmed)?;
    let downtime = paused.elapsed();
    Ok(MigrationSummary {
        total: started.elapsed(),
        downtime,
        rounds: round,
        pages: total_pages,
        wire_bytes: link.wire_bytes(),
        throttle: highest_throttle,
        postcopy_pages: 0,
        requested_pages: 0,
        reconnections: 0,
        kept_image,
        used_base: link.builds_on_base(),
    })
}

/// A fresh tag for a kept image: never 0, unlikely to repeat.
pub(crate) fn image_tag() -> u64 {
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    let mixed = xxhash_rust::xxh3::xxh3_64(
        &[
            clock.to_le_bytes().as_slice(),
            &std::process::id().to_le_bytes(),
        ]
        .concat(),
    );
    mixed.max(1)
}

/// Until the target runs the guest: in a hybrid migration, pre-copy
/// rounds while the dirty set shrinks (at most [`HYBRID_MAX_ROUNDS`], and
/// until the estimated downtime is under the target, or half the deadline
/// passed); then the switchover (pause, `Discard` of the stale pages, the
/// state), acknowledged. Returns the switchover and the summary so far
/// (the downtime: pause to acknowledgement).
fn switch_over(
    vm: &mut Vm,
    link: &mut Protection,
    options: &MigrationOptions,
    hybrid: bool,
    started: Instant,
    progress: &mut impl FnMut(&Round),
) -> Result<(Switchover, MigrationSummary), MigrationError> {
    link.begin_initial_copy(vm)?;
    let mut rounds = 0u32;
    let mut pages = 0u64;
    let mut previous_left = usize::MAX;
    while hybrid && rounds < HYBRID_MAX_ROUNDS {
        rounds += 1;
        let done = precopy_round(vm, link, rounds, 0.0, |_| Ok(()))?;
        progress(&done);
        pages += done.pages as u64;
        let (left, estimated) = (done.pages_left, done.estimated_downtime);
        let shrinking = (left as f64) < previous_left as f64 * 0.5;
        if estimated <= options.max_downtime
            || !shrinking
            || started.elapsed() >= options.deadline / 2
        {
            break;
        }
        previous_left = left;
    }
    let paused = Instant::now();
    // From here the target may run the guest as soon as epoch 0 commits:
    // a failure leaves it paused here (never two copies running).
    let switchover = link
        .switch_to_postcopy(vm, hybrid)
        .map_err(MigrationError::HandoverUnconfirmed)?;
    link.wait_acknowledged(0)
        .map_err(MigrationError::HandoverUnconfirmed)?;
    let downtime = paused.elapsed();
    let summary = MigrationSummary {
        total: started.elapsed(),
        downtime,
        rounds,
        pages,
        wire_bytes: 0,
        throttle: 0.0,
        postcopy_pages: switchover.missing_pages() as u64,
        requested_pages: 0,
        reconnections: 0,
        kept_image: None,
        used_base: false,
    };
    Ok((switchover, summary))
}

/// Most pre-copy rounds of a hybrid migration before it switches.
const HYBRID_MAX_ROUNDS: u32 = 5;

/// One pre-copy round: all of memory (round 1) or the pages dirtied since
/// the last, drained end to end (`Sync`); what it achieved and what
/// stopping now would cost. `between_chunks` runs after each chunk.
fn precopy_round(
    vm: &mut Vm,
    link: &mut Protection,
    round: u32,
    throttle: f64,
    between_chunks: impl FnMut(&mut Vm) -> Result<(), PrimaryError>,
) -> Result<Round, PrimaryError> {
    let started = Instant::now();
    let pages = if round == 1 {
        link.send_all_pages(vm, between_chunks)?
    } else {
        link.send_dirty_pages(vm, between_chunks)?
    };
    link.drain()?;
    let seconds = started.elapsed().as_secs_f64().max(1e-6);
    let bytes_per_second = (pages.max(1) as f64 * PAGE_BYTES) / seconds;
    let left = vm_dirty_count(vm)?;
    Ok(Round {
        round,
        pages,
        pages_left: left,
        bytes_per_second,
        estimated_downtime: Duration::from_secs_f64(left as f64 * PAGE_BYTES / bytes_per_second),
        throttle,
    })
}

/// Pages dirty right now that a round would send, without taking them:
/// harvest, count (less those the guest reports free), put back.
fn vm_dirty_count(vm: &Vm) -> Result<usize, PrimaryError> {
    let dirty = vm.harvest_dirty()?;
    let count = match understudy_vm::free_report::FreePages::read(vm.memory())? {
        Some(free) => free.split(dirty.clone()).0.count(),
        None => dirty.count(),
    };
    vm.put_back_dirty(&dirty)?;
    Ok(count)
}
