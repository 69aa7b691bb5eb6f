//! The replication benchmark, run by `understudy bench replication`: a
//! primary and a secondary in one process over loopback TCP.
//!
//! - Guest pause per checkpoint at dirty sets of about 250, 1,000 and 10,000
//!   pages of a 1 GiB guest (a `memtouch` rate and epoch length chosen for
//!   each; the epoch is fixed, not adapted, so the dirty set stays put), with
//!   the median of each phase of the pause.
//! - Guest slowdown under protection: `memtouch` throughput with checkpoints
//!   every 25 ms divided by the same guest's throughput unprotected, for a
//!   light (50 MB/s) and a heavy (as fast as it can) dirty rate.

use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use understudy_checkpoint::channel::{KeyPair, Keyring, Security};
use understudy_checkpoint::heartbeat::HeartbeatPolicy;
use understudy_primary::{
    CheckpointPhases, EpochPolicy, PrimaryEvent, PrimaryOptions, RunEnd, RunOptions,
};
use understudy_secondary::{Failover, SecondaryError, SecondaryOptions};
use understudy_vm::VmConfig;
use understudy_vm::progress::ProgressSample;

use crate::{BenchError, Micros, start};

/// Pause at one dirty-set size.
#[derive(Clone, Debug)]
pub struct PauseRow {
    /// Workload.
    pub workload: String,
    /// Epoch length.
    pub epoch: Duration,
    /// Mean dirty pages per checkpoint.
    pub dirty_pages: f64,
    /// Guest pause per checkpoint.
    pub pause: Micros,
    /// The longest pause, µs.
    pub pause_max: f64,
    /// Median of each phase (stop, harvest, copy, state, other, resume), µs.
    pub phases_p50: [f64; 6],
    /// 99th percentile of each phase, µs.
    pub phases_p99: [f64; 6],
    /// Checkpoint to acknowledgement.
    pub ack: Micros,
    /// Mean bytes on the wire per epoch.
    pub wire_bytes: f64,
}

/// Throughput with and without protection.
#[derive(Clone, Debug)]
pub struct SlowdownRow {
    /// Workload.
    pub workload: String,
    /// MB/s unprotected.
    pub unprotected: f64,
    /// MB/s protected.
    pub protected: f64,
}

/// The replication report.
#[derive(Clone, Debug, Default)]
pub struct ReplicationReport {
    /// Pauses per dirty-set size.
    pub pauses: Vec<PauseRow>,
    /// Slowdowns.
    pub slowdown: Vec<SlowdownRow>,
}

pub(crate) struct Protected {
    pub pauses: Vec<Duration>,
    pub phases: Vec<CheckpointPhases>,
    pub acks: Vec<Duration>,
    pub dirty_pages: Vec<usize>,
    pub wire_bytes: Vec<u64>,
    pub mb_per_s: f64,
}

/// An in-process secondary (or migration target) on `address`, serving
/// until `stop`.
pub(crate) fn spawn_secondary(
    address: SocketAddr,
    security: Security,
    heartbeat: HeartbeatPolicy,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<Option<Failover>, SecondaryError>> {
    spawn_secondary_reporting(address, security, heartbeat, stop, |_| {})
}

/// [`spawn_secondary`], with its events handed to `report`.
pub(crate) fn spawn_secondary_reporting(
    address: SocketAddr,
    security: Security,
    heartbeat: HeartbeatPolicy,
    stop: Arc<AtomicBool>,
    report: impl FnMut(&understudy_secondary::SecondaryEvent) + Send + 'static,
) -> std::thread::JoinHandle<Result<Option<Failover>, SecondaryError>> {
    std::thread::spawn(move || {
        understudy_secondary::serve(
            SecondaryOptions {
                listen: address,
                heartbeat,
                verify: false,
                tap: None,
                ack_delay: Duration::ZERO,
                witness: None,
                instance: 2,
                security,
                rescue_dir: std::env::temp_dir(),
                colo: false,
                postcopy_recovery: Duration::ZERO,
                store: None,
            },
            &stop,
            report,
        )
    })
}

/// How a benchmark's in-process pair talks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wire {
    /// Plain text.
    Plain,
    /// Noise, with two fresh keys that accept each other.
    Noise,
}

impl Wire {
    /// The two ends' security.
    pub(crate) fn pair(self) -> (Security, Security) {
        match self {
            Wire::Plain => (Security::Plaintext, Security::Plaintext),
            Wire::Noise => {
                let primary = KeyPair::generate().expect("a key pair");
                let secondary = KeyPair::generate().expect("a key pair");
                let keyring = |local: &KeyPair, peer: &KeyPair| {
                    Security::Noise(Arc::new(Keyring {
                        local: local.clone(),
                        peers: vec![peer.public],
                    }))
                };
                (keyring(&primary, &secondary), keyring(&secondary, &primary))
            }
        }
    }
}

pub(crate) fn free_address() -> Result<SocketAddr, BenchError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map_err(|error| BenchError::Replication(format!("no free port: {error}")))
}

/// Runs `workload` protected by an in-process secondary for `seconds`.
pub(crate) fn protected(
    memory_bytes: u64,
    workload: &str,
    epoch: Duration,
    seconds: f64,
    wire: Wire,
) -> Result<Protected, BenchError> {
    let address = free_address()?;
    let stop = Arc::new(AtomicBool::new(false));
    let (primary_security, secondary_security) = wire.pair();
    let secondary = spawn_secondary(
        address,
        secondary_security,
        HeartbeatPolicy::default(),
        stop.clone(),
    );
    let mut lost = None;
    let mut vm = start(VmConfig::new(memory_bytes, 1), workload)?;
    let options = RunOptions {
        primary: PrimaryOptions {
            secondary: address,
            epoch: EpochPolicy {
                target: epoch,
                min: epoch,
                max_pause: Duration::from_secs(1),
                idle: Duration::ZERO,
            },
            codec: "delta+zstd:level=1".parse().expect("a valid codec"),
            heartbeat: HeartbeatPolicy::default(),
            verify: false,
            precopy_rounds: 5,
            max_bandwidth: None,
            security: primary_security,
        },
        vm_id: 1,
        owner: 1,
        witness: None,
        gate: None,
        output_epoch: Duration::ZERO,
        // Measured from the initial synchronisation on (see below).
        duration: None,
        // The secondary may take a moment to listen.
        connect_patience: Duration::from_secs(5),
        colo: None,
        controls: None,
        base_image: 0,
    };
    let mut result = Protected {
        pauses: Vec::new(),
        phases: Vec::new(),
        acks: Vec::new(),
        dirty_pages: Vec::new(),
        wire_bytes: Vec::new(),
        mb_per_s: 0.0,
    };
    let mut first: Option<ProgressSample> = None;
    let mut last: Option<ProgressSample> = None;
    let measure = Duration::from_secs_f64(seconds);
    let mut synchronised = None;
    let done = AtomicBool::new(false);
    let ended = understudy_primary::run(&mut vm, &options, &done, |event| match event {
        PrimaryEvent::Synchronised { .. } => synchronised = Some(Instant::now()),
        // Epoch 0 is the initial copy: steady state starts after it.
        PrimaryEvent::Checkpointed(metrics) if metrics.epoch > 0 => {
            result.pauses.push(metrics.pause);
            result.phases.push(metrics.phases);
            result.dirty_pages.push(metrics.dirty_pages);
            first.get_or_insert_with(|| metrics.progress.clone());
            last = Some(metrics.progress);
            if synchronised.is_some_and(|at| at.elapsed() >= measure) {
                done.store(true, Ordering::Relaxed);
            }
        }
        PrimaryEvent::Acknowledged { epoch, latency } if epoch > 0 => result.acks.push(latency),
        PrimaryEvent::Sent(metrics) if metrics.epoch > 0 => {
            result.wire_bytes.push(metrics.wire_bytes);
        }
        PrimaryEvent::SecondaryLost { reason } => lost = Some(reason),
        _ => {}
    })
    .map_err(|error| BenchError::Replication(format!("{error}")))?;
    if let RunEnd::GuestStopped(reason) = ended {
        return Err(BenchError::Replication(format!(
            "the guest stopped during the benchmark: {reason}"
        )));
    }
    if let Some(reason) = lost {
        return Err(BenchError::Replication(format!(
            "the secondary was lost during the benchmark: {reason}"
        )));
    }
    if let (Some(first), Some(last)) = (&first, &last) {
        result.mb_per_s = last.rates_since(first).dirtied_bytes_per_sec / 1e6;
    }
    stop.store(true, Ordering::Relaxed);
    let took_over = secondary
        .join()
        .map_err(|_| BenchError::Replication("the secondary thread panicked".to_owned()))?
        .map_err(|error| BenchError::Replication(format!("{error}")))?
        .map(|failover| failover.reason);
    if let Some(reason) = took_over {
        return Err(BenchError::Replication(format!(
            "the secondary took over during the benchmark: {reason}"
        )));
    }
    Ok(result)
}

fn unprotected(memory_bytes: u64, workload: &str, seconds: f64) -> Result<f64, BenchError> {
    let vm = start(VmConfig::new(memory_bytes, 1), workload)?;
    let first = ProgressSample::read(&vm)?;
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    // Harvest once a second, as an unprotected `understudy run` does.
    while Instant::now() < end {
        std::thread::sleep(
            Duration::from_secs(1).min(end.saturating_duration_since(Instant::now())),
        );
        vm.harvest_dirty()?;
    }
    let last = ProgressSample::read(&vm)?;
    Ok(last.rates_since(&first).dirtied_bytes_per_sec / 1e6)
}

pub(crate) fn mean<T: Copy + Into<f64>>(values: &[T]) -> f64 {
    values.iter().map(|v| (*v).into()).sum::<f64>() / values.len().max(1) as f64
}

/// Runs the replication benchmark; each measurement lasts `seconds`.
pub fn replication(seconds: f64) -> Result<ReplicationReport, BenchError> {
    let mut report = ReplicationReport::default();
    let pause_cases = [
        (
            "memtouch:rate=40MB/s,wss=64M,pattern=seq",
            Duration::from_millis(25),
        ),
        (
            "memtouch:rate=80MB/s,wss=64M,pattern=seq",
            Duration::from_millis(50),
        ),
        (
            "memtouch:rate=82MB/s,wss=256M,pattern=seq",
            Duration::from_millis(500),
        ),
    ];
    for (workload, epoch) in pause_cases {
        let run = protected(
            1 << 30,
            workload,
            epoch,
            seconds.max(epoch.as_secs_f64() * 10.0),
            Wire::Plain,
        )?;
        let phase = |pick: fn(&CheckpointPhases) -> Duration| {
            Micros::of(run.phases.iter().map(pick).collect())
        };
        let picks: [fn(&CheckpointPhases) -> Duration; 6] = [
            |phases| phases.stop,
            |phases| phases.harvest,
            |phases| phases.copy,
            |phases| phases.state,
            |phases| phases.other,
            |phases| phases.resume,
        ];
        report.pauses.push(PauseRow {
            workload: workload.to_owned(),
            epoch,
            dirty_pages: mean(
                &run.dirty_pages
                    .iter()
                    .map(|p| *p as f64)
                    .collect::<Vec<_>>(),
            ),
            pause_max: run
                .pauses
                .iter()
                .max()
                .map_or(0.0, |pause| pause.as_secs_f64() * 1e6),
            phases_p50: picks.map(|pick| phase(pick).p50),
            phases_p99: picks.map(|pick| phase(pick).p99),
            pause: Micros::of(run.pauses),
            ack: Micros::of(run.acks),
            wire_bytes: mean(&run.wire_bytes.iter().map(|b| *b as f64).collect::<Vec<_>>()),
        });
    }
    for workload in [
        "memtouch:rate=50MB/s,wss=64M,pattern=random",
        "memtouch:rate=max,wss=64M,pattern=random",
    ] {
        let unprotected = unprotected(512 << 20, workload, seconds)?;
        let protected = protected(
            512 << 20,
            workload,
            Duration::from_millis(25),
            seconds,
            Wire::Plain,
        )?;
        report.slowdown.push(SlowdownRow {
            workload: workload.to_owned(),
            unprotected,
            protected: protected.mb_per_s,
        });
    }
    Ok(report)
}

impl fmt::Display for ReplicationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "guest pause per checkpoint (primary and secondary in one process, loopback, delta+zstd:level=1)"
        )?;
        writeln!(
            f,
            "  {:<44} {:>6} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "workload",
            "epoch",
            "dirty pg",
            "pause p50",
            "pause p99",
            "pause max",
            "ack p50",
            "KB/epoch"
        )?;
        for row in &self.pauses {
            writeln!(
                f,
                "  {:<44} {:>4}ms {:>8.0} {:>7.0}µs {:>7.0}µs {:>7.0}µs {:>7.0}µs {:>9.1}",
                row.workload,
                row.epoch.as_millis(),
                row.dirty_pages,
                row.pause.p50,
                row.pause.p99,
                row.pause_max,
                row.ack.p50,
                row.wire_bytes / 1e3
            )?;
            for (quantile, phases) in [("p50", row.phases_p50), ("p99", row.phases_p99)] {
                let [stop, harvest, copy, state, other, resume] = phases;
                writeln!(
                    f,
                    "  {:<44} phases {quantile}: stop {stop:.0}µs, harvest {harvest:.0}µs, copy {copy:.0}µs, state {state:.0}µs, other {other:.0}µs, resume {resume:.0}µs",
                    ""
                )?;
            }
        }
        writeln!(f, "guest slowdown with checkpoints every 25 ms")?;
        for row in &self.slowdown {
            writeln!(
                f,
                "  {:<46} unprotected {:>8.1} MB/s, protected {:>8.1} MB/s: {:.2}x",
                row.workload,
                row.unprotected,
                row.protected,
                row.protected / row.unprotected.max(1e-9)
            )?;
        }
        Ok(())
    }
}
