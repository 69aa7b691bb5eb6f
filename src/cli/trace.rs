//! `understudy trace`: capture memory traces (from a process or the built-in
//! guest) and summarise them.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde_json::json;
use understudy_compress::trace::process::{self, CaptureLimits, EpochReport};
use understudy_compress::trace::{
    TraceInfo, TraceReader, TraceSource, TraceWriter, duration_nanos,
};
use understudy_primary::trace::capture_guest_trace;
use understudy_vm::PAGE_SIZE;

use super::{VmOptions, parse_duration, stop_flag, wait_until_running};

/// `understudy trace` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum TraceCommand {
    /// Record a trace: every resident page, then the pages changed each interval.
    ///
    /// From a process: `--pid PID`, or `-- CMD ARGS` to start one (stopped
    /// when the capture ends). From the built-in guest: `--guest` with the VM
    /// options.
    Capture(Box<CaptureArguments>),
    /// Summarise a trace (and check every checksum in it).
    Info {
        /// The trace file.
        path: PathBuf,
    },
}

impl CaptureArguments {
    fn limits(&self) -> CaptureLimits {
        CaptureLimits {
            duration: self.duration,
            epochs: self.epochs,
        }
    }
}

/// Arguments of `understudy trace capture`.
#[derive(clap::Args, Debug)]
pub struct CaptureArguments {
    /// Time between epochs.
    #[arg(long, default_value = "25ms", value_parser = parse_duration)]
    interval: Duration,
    /// How long to capture.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Stop after this many epochs (epoch 0 included), if before --duration.
    #[arg(long)]
    epochs: Option<u64>,
    /// Let the process (or guest) run this long before epoch 0, past its start-up.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    warmup: Duration,
    /// The trace file to write (default: NAME-PID.trace, or guest.trace).
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Capture this running process.
    #[arg(long, conflicts_with = "guest")]
    pid: Option<i32>,
    /// Capture the built-in guest (see --workload, --memory, --vcpus).
    #[arg(long)]
    guest: bool,
    #[command(flatten)]
    vm: VmOptions,
    /// Print one JSON line per epoch.
    #[arg(long)]
    json: bool,
    /// The command to start and capture.
    #[arg(last = true)]
    command: Vec<String>,
}

/// Runs an `understudy trace` subcommand.
pub fn trace(command: TraceCommand) -> anyhow::Result<()> {
    match command {
        TraceCommand::Capture(arguments) => capture(*arguments),
        TraceCommand::Info { path } => info(path),
    }
}

fn now_unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Prints an epoch line, and keeps the totals for the closing summary.
struct Reporter {
    json: bool,
    pages: u64,
    pauses: Vec<Duration>,
    last_print: Instant,
}

impl Reporter {
    fn new(json: bool) -> Self {
        Self {
            json,
            pages: 0,
            pauses: Vec::new(),
            last_print: Instant::now(),
        }
    }

    fn epoch(&mut self, report: &EpochReport) {
        self.pages += report.pages as u64;
        self.pauses.push(report.pause);
        if self.json {
            println!(
                "{}",
                json!({
                    "event": "epoch",
                    "index": report.index,
                    "pages": report.pages,
                    "resident_pages": report.resident_pages,
                    "pause_ms": report.pause.as_secs_f64() * 1e3,
                })
            );
        } else if report.index == 0 || self.last_print.elapsed() >= Duration::from_secs(1) {
            self.last_print = Instant::now();
            println!(
                "epoch {:5}: {:7} pages changed, {:8} resident, paused {:.2} ms",
                report.index,
                report.pages,
                report.resident_pages,
                report.pause.as_secs_f64() * 1e3
            );
        }
    }

    fn finish(mut self, path: &std::path::Path, epochs: u64) {
        self.pauses.sort();
        let pause_at = |fraction: f64| {
            let index = understudy_bench::nearest_rank(self.pauses.len(), fraction);
            self.pauses
                .get(index)
                .map_or(0.0, |pause| pause.as_secs_f64() * 1e3)
        };
        if self.json {
            println!(
                "{}",
                json!({
                    "event": "captured",
                    "path": path.display().to_string(),
                    "epochs": epochs,
                    "pages": self.pages,
                    "pause_p50_ms": pause_at(0.5),
                    "pause_max_ms": pause_at(1.0),
                })
            );
        } else {
            println!(
                "wrote {}: {epochs} epochs, {} pages ({:.1} MiB); pause p50 {:.2} ms, max {:.2} ms",
                path.display(),
                self.pages,
                self.pages as f64 * PAGE_SIZE as f64 / f64::from(1 << 20),
                pause_at(0.5),
                pause_at(1.0)
            );
        }
    }
}

/// A child's process id as the kernel's calls take it.
fn pid_of(child: &Child) -> anyhow::Result<i32> {
    i32::try_from(child.id()).context("a process id out of range")
}

fn sleep_unless_stopped(duration: Duration, stop: &AtomicBool) {
    let until = Instant::now() + duration;
    while Instant::now() < until && !stop.load(Ordering::Relaxed) {
        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(20)));
    }
}

/// Ends a child the capture started: SIGTERM, then SIGKILL after 2 s.
fn end_child(mut child: Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Ok(pid) = pid_of(&child) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, libc::SIGCONT);
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn capture(arguments: CaptureArguments) -> anyhow::Result<()> {
    let stop = stop_flag()?;
    let sources = usize::from(arguments.pid.is_some())
        + usize::from(arguments.guest)
        + usize::from(!arguments.command.is_empty());
    if sources != 1 {
        bail!("name one source to capture: --pid PID, --guest, or -- COMMAND ARGS");
    }
    if arguments.guest {
        return capture_guest(&arguments, &stop);
    }
    let (pid, child, description) = match arguments.pid {
        Some(pid) => {
            let command = std::fs::read(format!("/proc/{pid}/cmdline"))
                .with_context(|| format!("process {pid} does not exist"))?;
            let description = String::from_utf8_lossy(&command).replace('\0', " ");
            (pid, None, description.trim().to_owned())
        }
        None => {
            let child = Command::new(&arguments.command[0])
                .args(&arguments.command[1..])
                .spawn()
                .with_context(|| format!("cannot start {}", arguments.command[0]))?;
            (pid_of(&child)?, Some(child), arguments.command.join(" "))
        }
    };
    sleep_unless_stopped(arguments.warmup, &stop);
    let out = arguments.out.clone().unwrap_or_else(|| {
        let program = description
            .split_whitespace()
            .next()
            .and_then(|path| path.rsplit('/').next())
            .unwrap_or("process")
            .to_owned();
        PathBuf::from(format!("{program}-{pid}.trace"))
    });
    let info = TraceInfo {
        source: TraceSource::Process,
        description,
        interval_ns: duration_nanos(arguments.interval),
        created_unix_s: now_unix_s(),
    };
    let mut writer = TraceWriter::create(&out, &info)?;
    let mut reporter = Reporter::new(arguments.json);
    let captured = process::capture(
        pid,
        arguments.interval,
        arguments.limits(),
        &mut writer,
        &stop,
        |report| reporter.epoch(report),
    );
    if let Some(child) = child {
        end_child(child);
    }
    let epochs = captured.with_context(|| format!("cannot capture process {pid}"))?;
    let path = writer.finish()?;
    reporter.finish(&path, epochs);
    Ok(())
}

fn capture_guest(arguments: &CaptureArguments, stop: &AtomicBool) -> anyhow::Result<()> {
    let mut vm = arguments.vm.boot()?;
    vm.resume()?;
    wait_until_running(&vm, Duration::from_secs(10))?;
    sleep_unless_stopped(arguments.warmup, stop);
    let info = TraceInfo {
        source: TraceSource::Guest,
        description: format!(
            "{} on {} vCPU(s), {} MiB",
            arguments.vm.workload,
            arguments.vm.vcpus,
            arguments.vm.memory >> 20
        ),
        interval_ns: duration_nanos(arguments.interval),
        created_unix_s: now_unix_s(),
    };
    let out = arguments
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("guest.trace"));
    let mut writer = TraceWriter::create(&out, &info)?;
    let mut reporter = Reporter::new(arguments.json);
    let captured = capture_guest_trace(
        &mut vm,
        arguments.interval,
        arguments.limits(),
        &mut writer,
        stop,
        |report| reporter.epoch(report),
    );
    vm.pause()?;
    vm.shutdown();
    let epochs = captured?;
    let path = writer.finish()?;
    reporter.finish(&path, epochs);
    Ok(())
}

fn info(path: PathBuf) -> anyhow::Result<()> {
    let mut reader = TraceReader::open(&path)?;
    let header = reader.info().clone();
    let mut epochs = 0u64;
    let mut first_pages = 0usize;
    let mut later_pages = 0usize;
    let mut last_time = 0u64;
    let mut pause_total = 0u64;
    while let Some(epoch) = reader.next_epoch()? {
        if epoch.index == 0 {
            first_pages = epoch.pages.len();
        } else {
            later_pages += epoch.pages.len();
        }
        epochs += 1;
        last_time = epoch.time_ns;
        pause_total += epoch.pause_ns;
    }
    let later = epochs.saturating_sub(1).max(1);
    println!(
        "{}: {} trace of `{}`",
        path.display(),
        header.source.name(),
        header.description
    );
    println!(
        "  {epochs} epochs over {:.2} s (asked every {:.1} ms, mean pause {:.2} ms); every checksum verified",
        last_time as f64 / 1e9,
        header.interval_ns as f64 / 1e6,
        pause_total as f64 / epochs.max(1) as f64 / 1e6
    );
    println!(
        "  epoch 0: {first_pages} pages ({:.1} MiB); later epochs: {:.0} pages ({:.2} MiB) on average",
        first_pages as f64 * PAGE_SIZE as f64 / f64::from(1 << 20),
        later_pages as f64 / later as f64,
        later_pages as f64 * PAGE_SIZE as f64 / later as f64 / f64::from(1 << 20)
    );
    Ok(())
}
