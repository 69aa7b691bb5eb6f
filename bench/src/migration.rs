//! Migration side by side, run by `understudy bench migration`: every mode
//! of `understudy migrate` on the same memory in one run, and QEMU's
//! pre-copy when `qemu-system-x86_64` is installed.
//!
//! Two guests, both 1 GiB whose memory above 64 MiB is incompressible
//! (filled from the host, so nothing compresses or deduplicates):
//! - idle: the guest writes nothing while it migrates;
//! - dirtying: `memtouch` writes 100 MB/s at random over 1008 MiB.
//!
//! Modes: pre-copy with the default codec and with `raw`, post-copy,
//! hybrid. Each row: total time, downtime (pause to acknowledgement), bytes
//! on the wire; for post-copy and hybrid, the pages the target lacked at
//! the switchover, how many it asked for (faults that reached the source:
//! the background push brought the rest first), and its fault latency.
//!
//! QEMU (TCG, started with `-S` so its guest never runs, memory from a
//! file of the same incompressible bytes, bandwidth unlimited) is run
//! through QMP: `migrate`, then `query-migrate` until it completes.

use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use understudy_checkpoint::heartbeat::HeartbeatPolicy;
use understudy_compress::CodecSpec;
use understudy_primary::migrate::{
    MigrationMode, MigrationOptions, MigrationSummary, NoConvergence, migrate,
};
use understudy_primary::{EpochPolicy, PrimaryOptions};
use understudy_secondary::{PostcopyReport, SecondaryEvent};
use understudy_vm::{Vm, VmConfig, memory};

use crate::encryption::incompressible;
use crate::replication::{Wire, free_address, spawn_secondary_reporting};
use crate::{BenchError, start};

const MEMORY: u64 = 1 << 30;
/// Where the built-in guest lives; memory above it is filled.
const FILL_FROM: u64 = 64 << 20;

/// One migration.
#[derive(Clone, Debug)]
pub struct MigrationRow {
    /// The guest: idle or dirtying.
    pub guest: &'static str,
    /// The mode and codec.
    pub mode: String,
    /// Start to acknowledgement.
    pub total: Duration,
    /// Guest paused to acknowledged (QEMU: its own `downtime`).
    pub downtime: Duration,
    /// Bytes on the wire.
    pub wire_bytes: u64,
    /// Pre-copy rounds (QEMU: none reported).
    pub rounds: u32,
    /// Post-copy and hybrid: what the page epoch did.
    pub postcopy: Option<PostcopyNumbers>,
}

/// A post-copy's page epoch, from both ends.
#[derive(Clone, Debug)]
pub struct PostcopyNumbers {
    /// Pages the target lacked at the switchover.
    pub missing: u64,
    /// Pages the target asked for.
    pub requested: u64,
    /// The target's report (faults and their latency).
    pub target: PostcopyReport,
}

/// The report: every row, in the order run.
#[derive(Clone, Debug, Default)]
pub struct MigrationReport {
    /// The rows.
    pub rows: Vec<MigrationRow>,
    /// Why QEMU was not run, if it was not.
    pub qemu_skipped: Option<String>,
    /// How our migrations were carried.
    pub wire: &'static str,
}

/// The modes compared, with their codec.
fn modes() -> [(MigrationMode, &'static str); 6] {
    [
        (MigrationMode::Precopy, "delta+zstd:level=1"),
        (MigrationMode::Precopy, "raw"),
        (MigrationMode::Postcopy, "delta+zstd:level=1"),
        (MigrationMode::Postcopy, "raw"),
        (MigrationMode::Hybrid, "delta+zstd:level=1"),
        (MigrationMode::Hybrid, "raw"),
    ]
}

/// Runs every mode `repeat` times on each guest over `wire` (Noise, or
/// plain text as QEMU's own migration stream is), then QEMU (if `qemu`).
pub fn migration(
    repeat: usize,
    qemu: bool,
    plaintext: bool,
) -> Result<MigrationReport, BenchError> {
    let wire = if plaintext { Wire::Plain } else { Wire::Noise };
    let mut report = MigrationReport {
        wire: if plaintext {
            "plain text"
        } else {
            "Noise channel"
        },
        ..MigrationReport::default()
    };
    for (guest, workload) in [
        ("idle", "idle"),
        ("dirtying", "memtouch:rate=100MB/s,wss=1008M,pattern=random"),
    ] {
        for _ in 0..repeat {
            for (mode, codec) in modes() {
                report
                    .rows
                    .push(one_migration(wire, guest, workload, mode, codec)?);
            }
        }
    }
    if !qemu {
        report.qemu_skipped = Some("not asked for (--qemu)".to_owned());
        return Ok(report);
    }
    for _ in 0..repeat {
        match qemu_migration() {
            Ok(row) => report.rows.push(row),
            Err(QemuError::Missing(why)) => {
                report.qemu_skipped = Some(why);
                break;
            }
            Err(QemuError::Failed(why)) => return Err(BenchError::Replication(why)),
        }
    }
    Ok(report)
}

/// A guest of 1 GiB whose memory above the guest's own is incompressible,
/// running `workload`.
pub(crate) fn filled_guest(workload: &str) -> Result<Vm, BenchError> {
    let vm = start(VmConfig::new(MEMORY, 1), workload)?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut address = FILL_FROM;
    while address < MEMORY {
        incompressible(&mut chunk, address);
        memory::write(vm.memory(), address, &chunk)
            .map_err(|error| BenchError::Replication(error.to_string()))?;
        address += chunk.len() as u64;
    }
    Ok(vm)
}

fn one_migration(
    wire: Wire,
    guest: &'static str,
    workload: &str,
    mode: MigrationMode,
    codec: &str,
) -> Result<MigrationRow, BenchError> {
    let spec = codec
        .parse()
        .map_err(|error| BenchError::Replication(format!("{codec}: {error}")))?;
    let vm = filled_guest(workload)?;
    // Let the guest get going (and the target listen).
    let (summary, postcopy_report) =
        migrate_in_process(wire, vm, Duration::from_secs(1), spec, |link| {
            MigrationOptions {
                mode,
                link,
                max_downtime: Duration::from_millis(30),
                deadline: Duration::from_secs(120),
                on_no_convergence: NoConvergence::Throttle,
                postcopy_recovery: Duration::ZERO,
                keep_image: false,
                base_image: 0,
            }
        })?;
    let postcopy = match mode {
        MigrationMode::Precopy => None,
        MigrationMode::Postcopy | MigrationMode::Hybrid => {
            let target = postcopy_report.ok_or_else(|| {
                BenchError::Replication("the target reported no post-copy".to_owned())
            })?;
            Some(PostcopyNumbers {
                missing: summary.postcopy_pages,
                requested: summary.requested_pages,
                target,
            })
        }
    };
    Ok(MigrationRow {
        guest,
        mode: format!(
            "{} {codec}",
            match mode {
                MigrationMode::Precopy => "pre-copy",
                MigrationMode::Postcopy => "post-copy",
                MigrationMode::Hybrid => "hybrid",
            }
        ),
        total: summary.total,
        downtime: summary.downtime,
        wire_bytes: summary.wire_bytes,
        rounds: summary.rounds,
        postcopy,
    })
}

/// Migrates `vm` to a target in this process over `wire` with `codec`,
/// `settle` after the target started; `options` wraps the link's settings
/// (address, security, heartbeats with a generous timeout: both ends share
/// this machine's cores, and failure detection is not what is measured).
/// Returns the summary and the target's post-copy report, if any.
pub(crate) fn migrate_in_process(
    wire: Wire,
    mut vm: Vm,
    settle: Duration,
    codec: CodecSpec,
    options: impl FnOnce(PrimaryOptions) -> MigrationOptions,
) -> Result<(MigrationSummary, Option<PostcopyReport>), BenchError> {
    let (primary_security, secondary_security) = wire.pair();
    let address = free_address()?;
    let stop = Arc::new(AtomicBool::new(false));
    let heartbeat = HeartbeatPolicy {
        misses: 40,
        ..HeartbeatPolicy::default()
    };
    let postcopy_report = Arc::new(Mutex::new(None));
    let target = {
        let postcopy_report = postcopy_report.clone();
        spawn_secondary_reporting(
            address,
            secondary_security,
            heartbeat,
            stop.clone(),
            move |event| {
                if let SecondaryEvent::PostcopyComplete(done) = event
                    && let Ok(mut slot) = postcopy_report.lock()
                {
                    *slot = Some(done.clone());
                }
            },
        )
    };
    std::thread::sleep(settle);
    let options = options(PrimaryOptions {
        secondary: address,
        epoch: EpochPolicy {
            target: Duration::from_millis(25),
            min: Duration::from_millis(25),
            max_pause: Duration::from_secs(1),
            idle: Duration::ZERO,
        },
        codec,
        heartbeat,
        verify: false,
        precopy_rounds: u32::MAX,
        max_bandwidth: None,
        security: primary_security,
    });
    let summary = migrate(&mut vm, &options, 99, |_| {}).map_err(|error| {
        BenchError::Replication(format!("migration failed: {:#}", anyhow::Error::new(error)))
    });
    stop.store(true, Ordering::Relaxed);
    let arrived = target
        .join()
        .map_err(|_| BenchError::Replication("the target panicked".to_owned()))?
        .map_err(|error| BenchError::Replication(error.to_string()))?;
    let summary = summary?;
    if arrived.is_none_or(|arrived| !arrived.migrated) {
        return Err(BenchError::Replication(
            "the guest did not arrive on the target".to_owned(),
        ));
    }
    let report = postcopy_report.lock().ok().and_then(|mut slot| slot.take());
    Ok((summary, report))
}

/// Why QEMU could not be measured.
enum QemuError {
    /// Not installed (skipped, said so).
    Missing(String),
    /// It ran and failed.
    Failed(String),
}

/// A QEMU process, killed when dropped.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A QMP connection: one command, one answer (events skipped).
struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Qmp {
    fn connect(path: &std::path::Path) -> Result<Self, QemuError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(error) => return Err(failed(format!("QMP at {}: {error}", path.display()))),
            }
        };
        let reader = BufReader::new(
            stream
                .try_clone()
                .map_err(|error| failed(error.to_string()))?,
        );
        let mut qmp = Self {
            writer: stream,
            reader,
        };
        qmp.read()?;
        qmp.execute(serde_json::json!({"execute": "qmp_capabilities"}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<serde_json::Value, QemuError> {
        loop {
            let mut line = String::new();
            if self
                .reader
                .read_line(&mut line)
                .map_err(|error| failed(error.to_string()))?
                == 0
            {
                return Err(failed("QEMU closed its QMP socket".to_owned()));
            }
            let value: serde_json::Value =
                serde_json::from_str(&line).map_err(|error| failed(error.to_string()))?;
            if value.get("event").is_none() {
                return Ok(value);
            }
        }
    }

    fn execute(&mut self, command: serde_json::Value) -> Result<serde_json::Value, QemuError> {
        writeln!(self.writer, "{command}").map_err(|error| failed(error.to_string()))?;
        let answer = self.read()?;
        if let Some(error) = answer.get("error") {
            return Err(failed(format!("QMP {command}: {error}")));
        }
        Ok(answer["return"].clone())
    }
}

fn failed(why: String) -> QemuError {
    QemuError::Failed(why)
}

/// QEMU's pre-copy of the idle guest's equal: 1 GiB from a file of the
/// same incompressible bytes, guest never started, bandwidth unlimited.
fn qemu_migration() -> Result<MigrationRow, QemuError> {
    const QEMU: &str = "qemu-system-x86_64";
    if Command::new(QEMU).arg("--version").output().is_err() {
        return Err(QemuError::Missing(format!(
            "{QEMU} is not installed (apt-get install qemu-system-x86)"
        )));
    }
    // In memory: a file on disk would be written back while QEMU reads it.
    let directory = tempfile::Builder::new()
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .map_err(|error| failed(error.to_string()))?;
    let memory_file = directory.path().join("memory");
    {
        let mut file =
            std::fs::File::create(&memory_file).map_err(|error| failed(error.to_string()))?;
        let mut chunk = vec![0u8; 1 << 20];
        let mut address = 0u64;
        while address < MEMORY {
            if address >= FILL_FROM {
                incompressible(&mut chunk, address);
            } else {
                chunk.fill(0);
            }
            file.write_all(&chunk)
                .map_err(|error| failed(error.to_string()))?;
            address += chunk.len() as u64;
        }
    }
    let port = free_address()
        .map_err(|error| failed(error.to_string()))?
        .port();
    let spawn = |name: &str, memory: String, extra: &[String]| -> Result<Qemu, QemuError> {
        let socket = directory.path().join(format!("{name}.qmp"));
        let child = Command::new(QEMU)
            .args([
                "-machine",
                "pc,memory-backend=m",
                "-accel",
                "tcg",
                "-m",
                "1G",
            ])
            .args(["-object", &memory])
            .args(["-display", "none", "-nodefaults", "-S"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|error| failed(format!("{QEMU}: {error}")))?;
        Ok(Qemu(child))
    };
    let _target = spawn(
        "target",
        "memory-backend-ram,id=m,size=1G".to_owned(),
        &["-incoming".to_owned(), format!("tcp:127.0.0.1:{port}")],
    )?;
    let _source = spawn(
        "source",
        format!(
            "memory-backend-file,id=m,size=1G,mem-path={},share=off",
            memory_file.display()
        ),
        &[],
    )?;
    let mut qmp = Qmp::connect(&directory.path().join("source.qmp"))?;
    // Make sure the target listens before the source connects.
    drop(Qmp::connect(&directory.path().join("target.qmp"))?);
    qmp.execute(serde_json::json!({"execute": "migrate-set-parameters",
        "arguments": {"max-bandwidth": 100_000_000_000u64}}))?;
    qmp.execute(serde_json::json!({"execute": "migrate",
        "arguments": {"uri": format!("tcp:127.0.0.1:{port}")}}))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = qmp.execute(serde_json::json!({"execute": "query-migrate"}))?;
        match status["status"].as_str() {
            Some("completed") => {
                let millis = |key: &str| Duration::from_millis(status[key].as_u64().unwrap_or(0));
                return Ok(MigrationRow {
                    guest: "idle",
                    mode: "QEMU pre-copy".to_owned(),
                    total: millis("total-time"),
                    downtime: millis("downtime"),
                    wire_bytes: status["ram"]["transferred"].as_u64().unwrap_or(0),
                    rounds: 0,
                    postcopy: None,
                });
            }
            Some("failed" | "cancelled") => {
                return Err(failed(format!("QEMU's migration failed: {status}")));
            }
            _ if Instant::now() > deadline => {
                return Err(failed(
                    "QEMU's migration did not finish in 120 s".to_owned(),
                ));
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

impl fmt::Display for MigrationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "1 GiB guests, memory above 64 MiB incompressible, loopback, {} (QEMU: plain text)",
            self.wire
        )?;
        writeln!(
            f,
            "{:<9} {:<30} {:>9} {:>11} {:>9} {:>6}  post-copy: missing / asked / faults, fault p50 / p99",
            "guest", "mode", "total s", "downtime ms", "wire MB", "rounds"
        )?;
        for row in &self.rows {
            write!(
                f,
                "{:<9} {:<30} {:>9.2} {:>11.2} {:>9.0} {:>6}",
                row.guest,
                row.mode,
                row.total.as_secs_f64(),
                row.downtime.as_secs_f64() * 1e3,
                row.wire_bytes as f64 / 1e6,
                row.rounds
            )?;
            if let Some(postcopy) = &row.postcopy {
                write!(
                    f,
                    "  {} / {} / {}, <= {} us / <= {} us",
                    postcopy.missing,
                    postcopy.requested,
                    postcopy.target.faults,
                    postcopy.target.fault_p50_us.unwrap_or(0),
                    postcopy.target.fault_p99_us.unwrap_or(0)
                )?;
            }
            writeln!(f)?;
        }
        if let Some(why) = &self.qemu_skipped {
            writeln!(f, "QEMU not run: {why}")?;
        }
        Ok(())
    }
}
