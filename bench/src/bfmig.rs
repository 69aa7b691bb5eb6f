//! Back-and-forth migration (BFMig's experiment), run by `understudy bench
//! back-and-forth`: a 1 GiB guest (memory above 64 MiB incompressible)
//! migrates A → B while A keeps its image, runs on B for a while dirtying
//! memory at a given rate, and migrates back B → A naming the image; the
//! return trip sends only the pages written on B. Each point compares the
//! return trip with the full migration of the same guest (the first trip).
//!
//! Both trips are pre-copy with the `raw` codec (nothing here compresses),
//! in one process over loopback, plain text or Noise.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use understudy_checkpoint::channel::Security;
use understudy_checkpoint::heartbeat::HeartbeatPolicy;
use understudy_primary::migrate::{
    MigrationMode, MigrationOptions, MigrationSummary, NoConvergence, migrate,
};
use understudy_primary::{EpochPolicy, PrimaryOptions};
use understudy_secondary::{Extras, Failover, KeptImage, SecondaryOptions};
use understudy_vm::{PAGE_SIZE, Vm};

use crate::BenchError;
use crate::migration::filled_guest;
use crate::replication::{Wire, free_address};
use crate::svg::{Series, scatter};

/// The guest's id on both hosts.
const VM_ID: u64 = 0xbf;
/// Guest memory in pages (1 GiB).
const MEMORY_PAGES: u64 = (1 << 30) / PAGE_SIZE;

/// One point: how long the guest stayed away and how fast it wrote.
#[derive(Clone, Copy, Debug)]
pub struct Point {
    /// Time on B between the trips.
    pub away: Duration,
    /// What the guest writes, MB/s (at random over 1008 MiB).
    pub rate_mb_per_s: u64,
}

/// The default points: from a few percent of memory changed to most of it.
pub const POINTS: [Point; 5] = [
    Point {
        away: Duration::from_secs(2),
        rate_mb_per_s: 5,
    },
    Point {
        away: Duration::from_secs(5),
        rate_mb_per_s: 10,
    },
    Point {
        away: Duration::from_secs(5),
        rate_mb_per_s: 25,
    },
    Point {
        away: Duration::from_secs(10),
        rate_mb_per_s: 50,
    },
    Point {
        away: Duration::from_secs(10),
        rate_mb_per_s: 200,
    },
];

/// What one point measured.
#[derive(Clone, Debug)]
pub struct ReturnRow {
    /// The point.
    pub point: Point,
    /// The first trip: a full migration.
    pub full: MigrationSummary,
    /// The return trip, building on A's image.
    pub back: MigrationSummary,
}

impl ReturnRow {
    /// Return-trip wire bytes as a share of the full migration's.
    pub fn byte_share(&self) -> f64 {
        self.back.wire_bytes as f64 / self.full.wire_bytes.max(1) as f64
    }

    /// Share of guest memory the return trip sent.
    pub fn memory_share(&self) -> f64 {
        self.back.pages as f64 / MEMORY_PAGES as f64
    }
}

/// Every point's row.
#[derive(Clone, Debug, Default)]
pub struct ReturnReport {
    /// The rows, in the order run.
    pub rows: Vec<ReturnRow>,
    /// How the trips were carried.
    pub wire: &'static str,
}

/// Runs `points` over plain text or Noise.
pub fn back_and_forth(points: &[Point], plaintext: bool) -> Result<ReturnReport, BenchError> {
    let wire = if plaintext { Wire::Plain } else { Wire::Noise };
    let mut report = ReturnReport {
        wire: if plaintext {
            "plain text"
        } else {
            "Noise channel"
        },
        rows: Vec::new(),
    };
    for point in points {
        report.rows.push(one_point(wire, *point)?);
    }
    Ok(report)
}

fn failed(what: &str) -> impl FnOnce(String) -> BenchError + '_ {
    move |why| BenchError::Replication(format!("{what}: {why}"))
}

fn one_point(wire: Wire, point: Point) -> Result<ReturnRow, BenchError> {
    let (source_security, target_security) = wire.pair();
    let heartbeat = HeartbeatPolicy {
        misses: 40,
        ..HeartbeatPolicy::default()
    };
    let workload = format!(
        "memtouch:rate={}MB/s,wss=1008M,pattern=random",
        point.rate_mb_per_s
    );
    let mut on_a = filled_guest(&workload)?;
    std::thread::sleep(Duration::from_millis(500));

    // A → B, A keeping its image.
    let b = free_address()?;
    let arrival = spawn_target(b, target_security.clone(), heartbeat, Extras::default());
    std::thread::sleep(Duration::from_millis(200));
    let full = migrate(
        &mut on_a,
        &options(b, source_security.clone(), heartbeat, true, 0),
        VM_ID,
        |_| {},
    )
    .map_err(|error| failed("the first trip")(format!("{:#}", anyhow::Error::new(error))))?;
    let tag = full
        .kept_image
        .ok_or_else(|| failed("the first trip")("no image kept".to_owned()))?;
    let mut on_b = arrival
        .join()
        .map_err(|_| failed("the target")("panicked".to_owned()))?
        .ok_or_else(|| failed("the first trip")("the guest did not arrive".to_owned()))?;

    // Away: the guest runs on B.
    std::thread::sleep(point.away);

    // B → A, naming A's image.
    let a = free_address()?;
    let kept = KeptImage {
        vm: on_a,
        vm_id: VM_ID,
        tag,
        until: Instant::now() + Duration::from_secs(600),
    };
    let coming_home = spawn_target(
        a,
        target_security,
        heartbeat,
        Extras {
            kept: Some(kept),
            ..Extras::default()
        },
    );
    std::thread::sleep(Duration::from_millis(200));
    let base = on_b.source_image.map_or(0, |(_, tag)| tag);
    let back = migrate(
        &mut on_b.vm,
        &options(a, source_security, heartbeat, false, base),
        VM_ID,
        |_| {},
    )
    .map_err(|error| failed("the return trip")(format!("{:#}", anyhow::Error::new(error))))?;
    let mut home = coming_home
        .join()
        .map_err(|_| failed("the target")("panicked".to_owned()))?
        .ok_or_else(|| failed("the return trip")("the guest did not arrive".to_owned()))?;
    if !back.used_base {
        return Err(failed("the return trip")(
            "A did not build on its kept image".to_owned(),
        ));
    }
    shut_down(&mut on_b.vm);
    shut_down(&mut home.vm);
    Ok(ReturnRow { point, full, back })
}

fn shut_down(vm: &mut Vm) {
    let _ = vm.pause();
    vm.shutdown();
}

/// A pre-copy migration to `target` with the `raw` codec.
fn options(
    target: std::net::SocketAddr,
    security: Security,
    heartbeat: HeartbeatPolicy,
    keep_image: bool,
    base_image: u64,
) -> MigrationOptions {
    MigrationOptions {
        mode: MigrationMode::Precopy,
        link: PrimaryOptions {
            secondary: target,
            epoch: EpochPolicy {
                target: Duration::from_millis(25),
                min: Duration::from_millis(25),
                max_pause: Duration::from_secs(1),
                idle: Duration::ZERO,
            },
            codec: "raw".parse().expect("raw is a codec"),
            heartbeat,
            verify: false,
            precopy_rounds: u32::MAX,
            max_bandwidth: None,
            security,
        },
        max_downtime: Duration::from_millis(30),
        deadline: Duration::from_secs(120),
        on_no_convergence: NoConvergence::Throttle,
        postcopy_recovery: Duration::ZERO,
        keep_image,
        base_image,
    }
}

/// A migration target in a thread of this process: the guest, once it
/// arrived (running).
fn spawn_target(
    listen: std::net::SocketAddr,
    security: Security,
    heartbeat: HeartbeatPolicy,
    extras: Extras<'static>,
) -> std::thread::JoinHandle<Option<Failover>> {
    std::thread::spawn(move || {
        let stop = AtomicBool::new(false);
        let options = SecondaryOptions {
            listen,
            heartbeat,
            verify: false,
            tap: None,
            ack_delay: Duration::ZERO,
            witness: None,
            instance: 3,
            security,
            rescue_dir: std::env::temp_dir(),
            colo: false,
            postcopy_recovery: Duration::ZERO,
            store: None,
        };
        let arrived = understudy_secondary::serve_with(options, extras, &stop, |_| {});
        stop.store(true, Ordering::Relaxed);
        arrived.ok().flatten().filter(|arrived| arrived.migrated)
    })
}

impl ReturnReport {
    /// The return trips as a share of the full migration, against the share
    /// of memory they sent (log-log), as an SVG.
    pub fn plot(&self) -> String {
        let points = self
            .rows
            .iter()
            .map(|row| {
                (
                    row.memory_share() * 100.0,
                    row.byte_share() * 100.0,
                    format!(
                        "{} s @ {} MB/s",
                        row.point.away.as_secs(),
                        row.point.rate_mb_per_s
                    ),
                )
            })
            .collect();
        scatter(
            "Back-and-forth migration: the return trip against a full migration (1 GiB)",
            "guest memory sent back (%)",
            "return-trip bytes (% of a full migration)",
            &[Series {
                name: "return trip on the kept image".to_owned(),
                points,
            }],
            &["labels: time away @ guest write rate".to_owned()],
        )
    }
}

impl fmt::Display for ReturnReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Back-and-forth migration of a 1 GiB guest (memory above 64 MiB incompressible), pre-copy, raw codec, {}",
            self.wire
        )?;
        writeln!(
            f,
            "| away | guest writes | full: MB / time / downtime | return: pages (% of memory) / MB / time / downtime | return bytes vs full |"
        )?;
        writeln!(f, "|---|---|---|---|---|")?;
        for row in &self.rows {
            writeln!(
                f,
                "| {} s | {} MB/s | {:.0} / {:.2} s / {:.1} ms | {} ({:.1} %) / {:.1} / {:.3} s / {:.1} ms | {:.1} % ({:.1} % fewer) |",
                row.point.away.as_secs(),
                row.point.rate_mb_per_s,
                row.full.wire_bytes as f64 / 1e6,
                row.full.total.as_secs_f64(),
                row.full.downtime.as_secs_f64() * 1e3,
                row.back.pages,
                row.memory_share() * 100.0,
                row.back.wire_bytes as f64 / 1e6,
                row.back.total.as_secs_f64(),
                row.back.downtime.as_secs_f64() * 1e3,
                row.byte_share() * 100.0,
                (1.0 - row.byte_share()) * 100.0,
            )?;
        }
        Ok(())
    }
}
