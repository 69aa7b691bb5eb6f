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

use std::time::{Duration, Instant};

use understudy_checkpoint::protocol::Purpose;
use understudy_vm::{PAGE_SIZE, Vm};

use crate::protection::Protection;
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
}

/// Why a migration stopped without switching over.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The link failed.
    #[error("migration failed")]
    Link(#[from] PrimaryError),
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
/// success (the caller shuts it down) and runs on when the migration fails.
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
        MigrationMode::Postcopy => Purpose::MigratePostcopy,
    };
    let mut link = Protection::connect(
        vm,
        options.link.clone(),
        identity,
        purpose,
        options.link.epoch.target,
    )?;
    let result = match options.mode {
        MigrationMode::Precopy => run(vm, &mut link, options, started, &mut progress),
        MigrationMode::Postcopy => run_postcopy(vm, &mut link, started),
    };
    link.close(match &result {
        Ok(_) => "migration complete",
        Err(_) => "migration aborted",
    });
    result
}

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
        let pages = if round == 1 {
            link.send_all_pages(vm, &mut throttled)?
        } else {
            link.send_dirty_pages(vm, &mut throttled)?
        };
        link.drain()?;
        total_pages += pages as u64;
        let seconds = round_started.elapsed().as_secs_f64().max(1e-6);
        let bytes_per_second = (pages.max(1) as f64 * PAGE_BYTES) / seconds;
        let left = vm_dirty_count(vm)?;
        let estimated = Duration::from_secs_f64(left as f64 * PAGE_BYTES / bytes_per_second);
        progress(&Round {
            round,
            pages,
            pages_left: left,
            bytes_per_second,
            estimated_downtime: estimated,
            throttle,
        });
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
    let downtime = paused.elapsed();
    Ok(MigrationSummary {
        total: started.elapsed(),
        downtime,
        rounds: round,
        pages: total_pages,
        wire_bytes: link.wire_bytes(),
        throttle: highest_throttle,
    })
}

/// Post-copy: the state first (the downtime: pause to acknowledgement),
/// then every page, until the target acknowledges the page epoch.
fn run_postcopy(
    vm: &mut Vm,
    link: &mut Protection,
    started: Instant,
) -> Result<MigrationSummary, MigrationError> {
    let paused = Instant::now();
    link.send_state_only(vm)?;
    link.wait_acknowledged(0)?;
    let downtime = paused.elapsed();
    let pages = link.push_postcopy(vm)?;
    link.wait_acknowledged(1)?;
    Ok(MigrationSummary {
        total: started.elapsed(),
        downtime,
        rounds: 0,
        pages,
        wire_bytes: link.wire_bytes(),
        throttle: 0.0,
    })
}

/// Pages dirty right now, without taking them: harvest, count, put back.
fn vm_dirty_count(vm: &Vm) -> Result<usize, PrimaryError> {
    let dirty = vm.harvest_dirty()?;
    let count = dirty.count();
    vm.put_back_dirty(&dirty)?;
    Ok(count)
}
