//! Guest progress as the VMM sees it: the status slots of all vCPUs, read from
//! shared memory without stopping the guest, and rates between two samples;
//! waiting for a guest to start its workload, noticing that it stopped, and
//! [`watch`]ing a running guest (the statistics `understudy run` prints).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use understudy_guest_abi::{PAGE_SIZE, STATE_PANICKED, STATE_RUNNING, VcpuStatus};

use crate::vm::{Vm, VmError, VmEvent};

/// A guest that does not run as it should.
#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    /// The VM failed.
    #[error("the VM failed")]
    Vm(#[from] VmError),
    /// The guest stopped by itself.
    #[error("{0}")]
    GuestStopped(VmEvent),
    /// The guest never reported running.
    #[error(
        "the guest did not report progress within {timeout:?}: (state, heartbeat) per vCPU {states:?}"
    )]
    NotRunning {
        /// How long it was given.
        timeout: Duration,
        /// Each vCPU's state and heartbeat.
        states: Vec<(u32, u64)>,
    },
}

/// Why the guest stopped, if a vCPU reported it since the last look.
pub fn guest_stopped(vm: &Vm) -> Option<VmEvent> {
    vm.events().try_recv().ok()
}

/// Fails if a vCPU reported that the guest stopped.
pub fn check_running(vm: &Vm) -> Result<(), ProgressError> {
    guest_stopped(vm).map_or(Ok(()), |event| Err(ProgressError::GuestStopped(event)))
}

/// Waits until every vCPU runs its workload; returns the sample that showed it.
pub fn wait_until_running(vm: &Vm, timeout: Duration) -> Result<ProgressSample, ProgressError> {
    let started = Instant::now();
    loop {
        check_running(vm)?;
        let sample = ProgressSample::read(vm)?;
        if sample.all_running() && sample.heartbeats() > 0 {
            return Ok(sample);
        }
        if started.elapsed() > timeout {
            let states = sample
                .vcpus
                .iter()
                .map(|status| (status.state, status.heartbeat))
                .collect();
            return Err(ProgressError::NotRunning { timeout, states });
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// One second of a running guest.
#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    /// Seconds since watching started.
    pub t: f64,
    /// Bytes per second of pages the guest reports writing (memtouch).
    pub guest_dirtied_mb_per_s: f64,
    /// Dirty pages per second seen in the dirty log (KVM OR VMM).
    pub dirty_log_pages_per_s: f64,
    /// Counter steps per second (counter).
    pub counter_steps_per_s: f64,
    /// Per-vCPU counter values.
    pub counters: Vec<u64>,
    /// Per-vCPU pages written.
    pub pages_written: Vec<u64>,
}

/// How [`watch`] runs.
#[derive(Clone, Copy, Debug)]
pub struct WatchOptions {
    /// Stop after this long (default: until `stop`).
    pub duration: Option<Duration>,
    /// Harvest the dirty log this often (as a checkpointing epoch would);
    /// the statistics add up the harvests of each second.
    pub harvest_interval: Duration,
}

/// Reports [`Stats`] once a second until the duration passes or `stop`;
/// fails when the guest stops.
pub fn watch(
    vm: &Vm,
    options: WatchOptions,
    stop: &AtomicBool,
    mut report: impl FnMut(&Stats),
) -> Result<(), ProgressError> {
    let started = Instant::now();
    let deadline = options.duration.map(|duration| started + duration);
    let mut previous = ProgressSample::read(vm)?;
    // Start the dirty-log window now, so the first line's rate is for one second.
    vm.harvest_dirty()?;
    let mut next_report = started + Duration::from_secs(1);
    let mut next_harvest = started + options.harvest_interval;
    let mut dirty_pages = 0;
    loop {
        check_running(vm)?;
        if stop.load(Ordering::Relaxed) || deadline.is_some_and(|end| Instant::now() >= end) {
            return Ok(());
        }
        let now = Instant::now();
        if now >= next_harvest {
            dirty_pages += vm.harvest_dirty()?.count();
            next_harvest += options.harvest_interval;
        }
        if now < next_report {
            let wake = next_report.min(next_harvest);
            std::thread::sleep(
                wake.saturating_duration_since(now)
                    .min(Duration::from_millis(20)),
            );
            continue;
        }
        dirty_pages += vm.harvest_dirty()?.count();
        let sample = ProgressSample::read(vm)?;
        let seconds = sample.at.duration_since(previous.at).as_secs_f64();
        let rates = sample.rates_since(&previous);
        report(&Stats {
            t: started.elapsed().as_secs_f64(),
            guest_dirtied_mb_per_s: rates.dirtied_bytes_per_sec / 1e6,
            dirty_log_pages_per_s: std::mem::take(&mut dirty_pages) as f64 / seconds,
            counter_steps_per_s: rates.counter_steps_per_sec,
            counters: sample.vcpus.iter().map(|status| status.counter).collect(),
            pages_written: sample
                .vcpus
                .iter()
                .map(|status| status.pages_written)
                .collect(),
        });
        previous = sample;
        next_report += Duration::from_secs(1);
    }
}

/// A reading of every vCPU's status slot.
#[derive(Clone, Debug)]
pub struct ProgressSample {
    /// When the slots were read.
    pub at: Instant,
    /// One status per vCPU.
    pub vcpus: Vec<VcpuStatus>,
}

impl ProgressSample {
    /// Reads all status slots (live; a pair of fields may be one step apart).
    pub fn read(vm: &Vm) -> Result<Self, VmError> {
        let vcpus = (0..vm.config().vcpus)
            .map(|index| vm.vcpu_status(index))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            at: Instant::now(),
            vcpus,
        })
    }

    /// Whether every vCPU has started its workload.
    pub fn all_running(&self) -> bool {
        self.vcpus
            .iter()
            .all(|status| status.state == STATE_RUNNING)
    }

    /// Whether any vCPU panicked.
    pub fn any_panicked(&self) -> bool {
        self.vcpus
            .iter()
            .any(|status| status.state == STATE_PANICKED)
    }

    /// memtouch: pages written by all vCPUs.
    pub fn pages_written(&self) -> u64 {
        self.vcpus.iter().map(|status| status.pages_written).sum()
    }

    /// counter: steps taken by all vCPUs.
    pub fn counter_steps(&self) -> u64 {
        self.vcpus.iter().map(|status| status.counter).sum()
    }

    /// Heartbeats of all vCPUs (advances with any workload).
    pub fn heartbeats(&self) -> u64 {
        self.vcpus.iter().map(|status| status.heartbeat).sum()
    }

    /// Rates from `earlier` to `self`.
    pub fn rates_since(&self, earlier: &ProgressSample) -> ProgressRates {
        let seconds = self.at.duration_since(earlier.at).as_secs_f64().max(1e-9);
        let per_second = |now: u64, then: u64| now.saturating_sub(then) as f64 / seconds;
        ProgressRates {
            dirtied_bytes_per_sec: per_second(self.pages_written(), earlier.pages_written())
                * PAGE_SIZE as f64,
            counter_steps_per_sec: per_second(self.counter_steps(), earlier.counter_steps()),
            heartbeats_per_sec: per_second(self.heartbeats(), earlier.heartbeats()),
        }
    }
}

/// Progress per second between two samples.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProgressRates {
    /// memtouch: bytes of pages written per second (whole pages).
    pub dirtied_bytes_per_sec: f64,
    /// counter: steps per second.
    pub counter_steps_per_sec: f64,
    /// Heartbeats per second.
    pub heartbeats_per_sec: f64,
}
