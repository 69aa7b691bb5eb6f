//! Benchmarks of the VM core, run by `understudy bench vm`:
//!
//! - guest dirtying throughput (`memtouch` at full speed) with the dirty log
//!   harvested every 25 ms (as replication will), harvested once a second,
//!   and with dirty logging off (the baseline), for `seq` and `random`;
//! - the cost of one dirty-log harvest for 256 MiB and 1 GiB guests, clean
//!   and with every work-area page dirty;
//! - the cost of pausing the vCPUs and of a full state capture;
//! - the time from starting `understudy run` to the guest's first progress.
//!
//! And, in [`compress`], the codec tradeoff benchmark on memory traces
//! (`understudy bench compress`); in [`replication`], checkpoint pauses and
//! guest slowdown under protection (`understudy bench replication`).

pub mod bfmig;
pub mod compress;
pub mod encryption;
pub mod freepages;
pub mod migration;
pub mod replication;
mod svg;

use std::fmt;
use std::process::Command;
use std::time::{Duration, Instant};

use understudy_vm::progress::ProgressSample;
use understudy_vm::workload::WorkloadSpec;
use understudy_vm::{Vm, VmConfig, VmError};

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The VM failed.
    #[error("the benchmark VM failed")]
    Vm(#[from] VmError),
    /// A workload string in the benchmark is wrong.
    #[error("bad benchmark workload")]
    Workload(#[from] understudy_vm::workload::WorkloadError),
    /// The guest did not start.
    #[error("the guest did not start within {0:?}")]
    GuestDidNotStart(Duration),
    /// The replication benchmark failed.
    #[error("replication benchmark: {0}")]
    Replication(String),
    /// Running `understudy run` as a child failed.
    #[error("cannot run `understudy run` for the start-up measurement: {0}")]
    Child(String),
}

/// Percentiles of a set of durations, in microseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Micros {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Number of samples.
    pub samples: usize,
}

/// The index of the `fraction` (0 to 1) quantile among `len` sorted samples.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "the value is within 0..len, and float-to-int `as` saturates"
)]
pub fn nearest_rank(len: usize, fraction: f64) -> usize {
    ((len as f64 - 1.0) * fraction.clamp(0.0, 1.0))
        .round()
        .max(0.0) as usize
}

impl Micros {
    fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        let at = |fraction: f64| {
            let index = nearest_rank(samples.len(), fraction);
            samples.get(index).map_or(0.0, |d| d.as_secs_f64() * 1e6)
        };
        Self {
            p50: at(0.5),
            p99: at(0.99),
            samples: samples.len(),
        }
    }
}

/// One dirtying-throughput measurement.
#[derive(Clone, Debug)]
pub struct Throughput {
    /// Working-set size.
    pub wss: &'static str,
    /// memtouch pattern.
    pub pattern: &'static str,
    /// How the dirty log was handled.
    pub mode: &'static str,
    /// MB/s (10^6) of pages the guest wrote.
    pub mb_per_s: f64,
}

/// One harvest-cost measurement.
#[derive(Clone, Debug)]
pub struct HarvestCost {
    /// Guest memory size.
    pub memory_bytes: u64,
    /// Cost with nothing dirty.
    pub clean: Micros,
    /// Cost right after the guest dirtied its whole work area.
    pub all_dirty: Micros,
    /// Pages in the all-dirty harvests.
    pub dirty_pages: usize,
}

/// The VM-core report.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Dirtying throughput per pattern and dirty-log mode.
    pub throughput: Vec<Throughput>,
    /// Harvest costs per memory size.
    pub harvest: Vec<HarvestCost>,
    /// Time for `Vm::pause` (all vCPUs parked), 2 vCPUs running memtouch.
    pub pause: Micros,
    /// Time for `Vm::capture_state`, 2 vCPUs.
    pub capture: Micros,
    /// Bytes of one encoded VM state, 2 vCPUs.
    pub state_bytes: usize,
    /// `understudy run` start to first guest progress, measured inside the process.
    pub first_progress_in_process: Micros,
    /// `understudy run` spawn to its "guest running" line, measured by the parent.
    pub first_progress_spawned: Micros,
}

pub(crate) fn start(config: VmConfig, workload: &str) -> Result<Vm, BenchError> {
    let workload: WorkloadSpec = workload.parse()?;
    let mut vm = Vm::boot(config, &workload)?;
    vm.resume()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ProgressSample::read(&vm)?.all_running() {
        if Instant::now() > deadline {
            return Err(BenchError::GuestDidNotStart(Duration::from_secs(10)));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(vm)
}

/// Guest throughput over `seconds`, harvesting the dirty log every `harvest_every`.
fn dirtying_throughput(
    wss: &'static str,
    pattern: &'static str,
    mode: &'static str,
    dirty_log: bool,
    harvest_every: Option<Duration>,
    seconds: f64,
) -> Result<Throughput, BenchError> {
    let config = VmConfig {
        memory_bytes: 512 << 20,
        vcpus: 1,
        dirty_log,
    };
    let vm = start(
        config,
        &format!("memtouch:rate=max,wss={wss},pattern={pattern}"),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let first = ProgressSample::read(&vm)?;
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        match harvest_every {
            Some(period) => {
                std::thread::sleep(period);
                vm.harvest_dirty()?;
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let last = ProgressSample::read(&vm)?;
    Ok(Throughput {
        wss,
        pattern,
        mode,
        mb_per_s: last.rates_since(&first).dirtied_bytes_per_sec / 1e6,
    })
}

fn harvest_cost(memory_bytes: u64) -> Result<HarvestCost, BenchError> {
    let mut vm = start(
        VmConfig::new(memory_bytes, 1),
        "memtouch:rate=max,pattern=seq",
    )?;
    vm.pause()?;
    vm.harvest_dirty()?;
    let clean = (0..50)
        .map(|_| {
            let started = Instant::now();
            vm.harvest_dirty().map(|_| started.elapsed())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut all_dirty = Vec::new();
    let mut dirty_pages = 0;
    for _ in 0..5 {
        let passes = ProgressSample::read(&vm)?.vcpus[0].passes;
        vm.resume()?;
        while ProgressSample::read(&vm)?.vcpus[0].passes < passes + 2 {
            std::thread::sleep(Duration::from_millis(5));
        }
        vm.pause()?;
        let started = Instant::now();
        let set = vm.harvest_dirty()?;
        all_dirty.push(started.elapsed());
        dirty_pages = set.count();
    }
    Ok(HarvestCost {
        memory_bytes,
        clean: Micros::of(clean),
        all_dirty: Micros::of(all_dirty),
        dirty_pages,
    })
}

fn pause_and_capture(report: &mut Report) -> Result<(), BenchError> {
    let mut vm = start(
        VmConfig::new(512 << 20, 2),
        "memtouch:rate=100MB/s,wss=64M,pattern=random",
    )?;
    let mut pauses = Vec::new();
    let mut captures = Vec::new();
    for _ in 0..200 {
        std::thread::sleep(Duration::from_millis(2));
        pauses.push(vm.pause()?);
        let started = Instant::now();
        let state = vm.capture_state()?;
        captures.push(started.elapsed());
        report.state_bytes = state.encode().len();
        vm.resume()?;
    }
    report.pause = Micros::of(pauses);
    report.capture = Micros::of(captures);
    Ok(())
}

fn first_progress(report: &mut Report) -> Result<(), BenchError> {
    let executable =
        std::env::current_exe().map_err(|error| BenchError::Child(error.to_string()))?;
    let mut in_process = Vec::new();
    let mut spawned = Vec::new();
    for _ in 0..10 {
        let started = Instant::now();
        let output = Command::new(&executable)
            .args([
                "run",
                "--json",
                "--duration",
                "0s",
                "--memory",
                "512M",
                "--workload",
                "counter",
            ])
            .output()
            .map_err(|error| BenchError::Child(error.to_string()))?;
        let total = started.elapsed();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let value = stdout
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|line| line["event"] == "guest_running")
            .and_then(|line| line["first_progress_ms"].as_f64())
            .ok_or_else(|| {
                BenchError::Child(format!(
                    "no guest_running line with first_progress_ms; stderr: {}",
                    String::from_utf8_lossy(&output.stderr)
                ))
            })?;
        in_process.push(Duration::from_secs_f64(value / 1e3));
        spawned.push(total);
    }
    report.first_progress_in_process = Micros::of(in_process);
    report.first_progress_spawned = Micros::of(spawned);
    Ok(())
}

/// Measures the VM core; `seconds` per throughput measurement.
pub fn vm_core(seconds: f64) -> Result<Report, BenchError> {
    let mut report = Report::default();
    let modes: [(&'static str, bool, Option<Duration>); 3] = [
        ("dirty logging off (baseline)", false, None),
        (
            "logging on, harvest every 1 s",
            true,
            Some(Duration::from_secs(1)),
        ),
        (
            "logging on, harvest every 25 ms",
            true,
            Some(Duration::from_millis(25)),
        ),
    ];
    for wss in ["64M", "256M"] {
        for pattern in ["seq", "random"] {
            for (mode, dirty_log, harvest_every) in modes {
                report.throughput.push(dirtying_throughput(
                    wss,
                    pattern,
                    mode,
                    dirty_log,
                    harvest_every,
                    seconds,
                )?);
            }
        }
    }
    for memory_bytes in [256 << 20, 1 << 30] {
        report.harvest.push(harvest_cost(memory_bytes)?);
    }
    pause_and_capture(&mut report)?;
    first_progress(&mut report)?;
    Ok(report)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "guest dirtying throughput (memtouch rate=max, 512 MiB guest, 1 vCPU)"
        )?;
        writeln!(
            f,
            "  {:<5} {:<8} {:<34} {:>10} {:>14}",
            "wss", "pattern", "dirty log", "MB/s", "vs baseline"
        )?;
        for row in &self.throughput {
            let baseline = self
                .throughput
                .iter()
                .find(|other| {
                    other.wss == row.wss
                        && other.pattern == row.pattern
                        && other.mode.starts_with("dirty logging off")
                })
                .map_or(f64::NAN, |base| row.mb_per_s / base.mb_per_s);
            writeln!(
                f,
                "  {:<5} {:<8} {:<34} {:>10.0} {:>13.2}x",
                row.wss, row.pattern, row.mode, row.mb_per_s, baseline
            )?;
        }
        writeln!(
            f,
            "dirty-log harvest (KVM_GET_DIRTY_LOG per slot OR VMM bitmap)"
        )?;
        for row in &self.harvest {
            writeln!(
                f,
                "  {:>5} MiB: clean p50 {:>8.1} us p99 {:>8.1} us | {:>6} pages dirty p50 {:>8.1} us p99 {:>8.1} us",
                row.memory_bytes >> 20,
                row.clean.p50,
                row.clean.p99,
                row.dirty_pages,
                row.all_dirty.p50,
                row.all_dirty.p99
            )?;
        }
        writeln!(
            f,
            "pause and state capture (2 vCPUs running memtouch, {} rounds)",
            self.pause.samples
        )?;
        writeln!(
            f,
            "  pause (all vCPUs parked)   p50 {:>8.1} us  p99 {:>8.1} us",
            self.pause.p50, self.pause.p99
        )?;
        writeln!(
            f,
            "  full state capture         p50 {:>8.1} us  p99 {:>8.1} us  ({} bytes encoded)",
            self.capture.p50, self.capture.p99, self.state_bytes
        )?;
        writeln!(
            f,
            "start-up: `understudy run` to the guest's first progress ({} runs)",
            self.first_progress_spawned.samples
        )?;
        writeln!(
            f,
            "  inside the process         p50 {:>8.1} ms  p99 {:>8.1} ms",
            self.first_progress_in_process.p50 / 1e3,
            self.first_progress_in_process.p99 / 1e3
        )?;
        writeln!(
            f,
            "  whole process (spawn..exit) p50 {:>7.1} ms  p99 {:>8.1} ms",
            self.first_progress_spawned.p50 / 1e3,
            self.first_progress_spawned.p99 / 1e3
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_median_and_the_tail() {
        let samples = (1..=100).map(Duration::from_micros).collect();
        let micros = Micros::of(samples);
        assert_eq!(micros.p50.round(), 51.0);
        assert_eq!(micros.p99.round(), 99.0);
    }

    #[test]
    fn percentiles_of_nothing_are_zero() {
        let micros = Micros::of(Vec::new());
        assert_eq!(micros.p50, 0.0);
        assert_eq!(micros.samples, 0);
    }
}
