//! Guest-assisted transfer (JAVMM's experiment, on `memtouch`), run by
//! `understudy bench free-pages`: a 1 GiB guest whose memory above 64 MiB
//! is incompressible, writing at random over 1008 MiB; after its first
//! second it frees a share of that working set and reports it
//! (`memtouch:free=P%`), working on the rest. Migrated (pre-copy, raw
//! codec) with and without the report: the pages it freed are not sent.

use std::fmt;
use std::time::Duration;

use understudy_primary::migrate::{
    MigrationMode, MigrationOptions, MigrationSummary, NoConvergence,
};

use crate::BenchError;
use crate::migration::{filled_guest, migrate_in_process};
use crate::replication::Wire;

/// One migration.
#[derive(Clone, Debug)]
pub struct FreeRow {
    /// The share freed (0: no report).
    pub freed_percent: u32,
    /// How it went.
    pub summary: MigrationSummary,
}

/// Every row.
#[derive(Clone, Debug, Default)]
pub struct FreeReport {
    /// The rows.
    pub rows: Vec<FreeRow>,
}

/// Migrates the guest freeing each share in `shares` (0: none), `repeat` times.
pub fn free_pages(shares: &[u32], repeat: usize) -> Result<FreeReport, BenchError> {
    let mut report = FreeReport::default();
    for _ in 0..repeat {
        for &share in shares {
            let free = if share == 0 {
                String::new()
            } else {
                format!(",free={share}%")
            };
            let vm = filled_guest(&format!(
                "memtouch:rate=50MB/s,wss=1008M,pattern=random{free}"
            ))?;
            let (summary, _) = migrate_in_process(
                Wire::Plain,
                vm,
                Duration::from_secs(2),
                "raw".parse().expect("raw is a codec"),
                |link| MigrationOptions {
                    mode: MigrationMode::Precopy,
                    link,
                    max_downtime: Duration::from_millis(30),
                    deadline: Duration::from_secs(120),
                    on_no_convergence: NoConvergence::Throttle,
                    postcopy_recovery: Duration::ZERO,
                    keep_image: false,
                    base_image: 0,
                },
            )?;
            report.rows.push(FreeRow {
                freed_percent: share,
                summary,
            });
        }
    }
    Ok(report)
}

impl fmt::Display for FreeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Migration of a 1 GiB guest (memory above 64 MiB incompressible) that freed a share of its 1008 MiB working set, pre-copy, raw codec, plain text"
        )?;
        writeln!(
            f,
            "| freed and reported | pages sent | MB on the wire | total | downtime |"
        )?;
        writeln!(f, "|---|---|---|---|---|")?;
        for row in &self.rows {
            writeln!(
                f,
                "| {} | {} | {:.0} | {:.2} s | {:.1} ms |",
                if row.freed_percent == 0 {
                    "none".to_owned()
                } else {
                    format!("{} %", row.freed_percent)
                },
                row.summary.pages,
                row.summary.wire_bytes as f64 / 1e6,
                row.summary.total.as_secs_f64(),
                row.summary.downtime.as_secs_f64() * 1e3
            )?;
        }
        Ok(())
    }
}
