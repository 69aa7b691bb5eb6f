//! The cost of the authenticated channel, run by `understudy bench
//! encryption`: each measurement in plain text and over Noise, side by side
//! in one run, on loopback.
//!
//! - Channel throughput: 1 GiB of incompressible bytes through one
//!   connection (the channel alone: records, AES-256-GCM, the socket).
//! - Migration: a 1 GiB idle guest whose memory above 64 MiB is filled
//!   with incompressible pages, migrated with `--codec raw` (total time
//!   and the rate it reached).
//! - Checkpoints at 25 ms epochs of a `memtouch` guest: pause and
//!   acknowledgement latency.

use std::fmt;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use understudy_checkpoint::channel::Channel;
use understudy_primary::migrate::{MigrationMode, MigrationOptions, NoConvergence};

use crate::replication::{Wire, protected};
use crate::{BenchError, Micros};

/// One measurement, plain and encrypted.
#[derive(Clone, Debug)]
pub struct Pair {
    /// What was measured, with its unit.
    pub what: String,
    /// Plain text.
    pub plain: f64,
    /// Noise.
    pub noise: f64,
    /// Whether larger is better (throughput) or smaller (latency).
    pub higher_is_better: bool,
}

/// The report.
#[derive(Clone, Debug, Default)]
pub struct EncryptionReport {
    /// The rows.
    pub rows: Vec<Pair>,
}

/// Bytes that do not compress: xxh3 of a counter, 8 bytes at a time.
pub(crate) fn incompressible(buffer: &mut [u8], seed: u64) {
    for (index, chunk) in buffer.chunks_mut(8).enumerate() {
        let value = xxhash_rust::xxh3::xxh3_64(&(seed ^ index as u64).to_le_bytes());
        chunk.copy_from_slice(&value.to_le_bytes()[..chunk.len()]);
    }
}

/// MB/s of `total` bytes through one channel.
fn channel_throughput(wire: Wire, total: usize) -> Result<f64, BenchError> {
    let (client_security, server_security) = wire.pair();
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io)?;
    let address = listener.local_addr().map_err(io)?;
    let reader = std::thread::spawn(move || -> Result<usize, BenchError> {
        let (stream, _) = listener.accept().map_err(io)?;
        let mut channel = Channel::accept(stream, &server_security, Duration::from_secs(5))
            .map_err(|error| BenchError::Replication(error.to_string()))?;
        let mut buffer = vec![0u8; 1 << 20];
        let mut received = 0;
        loop {
            match channel.reader.read(&mut buffer).map_err(io)? {
                0 => return Ok(received),
                read => received += read,
            }
        }
    });
    let stream = TcpStream::connect(address).map_err(io)?;
    let mut channel = Channel::connect(stream, &client_security, Duration::from_secs(5))
        .map_err(|error| BenchError::Replication(error.to_string()))?;
    let mut chunk = vec![0u8; 1 << 20];
    incompressible(&mut chunk, 7);
    let started = Instant::now();
    let mut sent = 0;
    while sent < total {
        channel.writer.write_all(&chunk).map_err(io)?;
        sent += chunk.len();
    }
    channel.writer.flush().map_err(io)?;
    channel
        .writer
        .stream()
        .shutdown(std::net::Shutdown::Write)
        .map_err(io)?;
    let received = reader
        .join()
        .map_err(|_| BenchError::Replication("the reader panicked".to_owned()))??;
    let elapsed = started.elapsed().as_secs_f64();
    if received != sent {
        return Err(BenchError::Replication(format!(
            "sent {sent} bytes, received {received}"
        )));
    }
    Ok(sent as f64 / elapsed / 1e6)
}

fn io(error: std::io::Error) -> BenchError {
    BenchError::Replication(error.to_string())
}

/// Migrates a 1 GiB guest of incompressible memory; (seconds, MB/s).
fn migration(wire: Wire) -> Result<(f64, f64), BenchError> {
    let vm = crate::migration::filled_guest("idle")?;
    // Let the secondary listen.
    let raw = "raw".parse().expect("a valid codec");
    let (summary, _) =
        crate::migration::migrate_in_process(wire, vm, Duration::from_millis(200), raw, |link| {
            MigrationOptions {
                mode: MigrationMode::Precopy,
                link,
                max_downtime: Duration::from_millis(300),
                deadline: Duration::from_secs(120),
                on_no_convergence: NoConvergence::Abort,
                postcopy_recovery: Duration::ZERO,
                keep_image: false,
                base_image: 0,
            }
        })?;
    let seconds = summary.total.as_secs_f64();
    Ok((seconds, summary.wire_bytes as f64 / seconds / 1e6))
}

/// Rounds of the throughput and migration measurements.
const ROUNDS: usize = 3;

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

/// Runs every measurement plain and encrypted; checkpoints last `seconds`.
pub fn encryption(seconds: f64) -> Result<EncryptionReport, BenchError> {
    let mut report = EncryptionReport::default();
    // Alternating plain and Noise, medians of ROUNDS: the machine's noise
    // (other work, a cold page cache) falls on both alike.
    let mut throughput = [Vec::new(), Vec::new()];
    let mut totals = [Vec::new(), Vec::new()];
    let mut rates = [Vec::new(), Vec::new()];
    for _ in 0..ROUNDS {
        for (index, wire) in [Wire::Plain, Wire::Noise].into_iter().enumerate() {
            throughput[index].push(channel_throughput(wire, 1 << 30)?);
            let (total, rate) = migration(wire)?;
            totals[index].push(total);
            rates[index].push(rate);
        }
    }
    for (what, values, higher_is_better) in [
        ("channel, 1 GiB incompressible (MB/s)", &throughput, true),
        (
            "migration of 1 GiB incompressible, raw codec: total (s)",
            &totals,
            false,
        ),
        (
            "migration of 1 GiB incompressible, raw codec: rate (MB/s)",
            &rates,
            true,
        ),
    ] {
        report.rows.push(Pair {
            what: format!("{what}, median of {ROUNDS}"),
            plain: median(&values[0]),
            noise: median(&values[1]),
            higher_is_better,
        });
    }
    let workload = "memtouch:rate=50MB/s,wss=64M,pattern=random";
    let epoch = Duration::from_millis(25);
    let runs = [
        protected(512 << 20, workload, epoch, seconds, Wire::Plain)?,
        protected(512 << 20, workload, epoch, seconds, Wire::Noise)?,
    ];
    let pauses = runs.each_ref().map(|run| Micros::of(run.pauses.clone()));
    let acks = runs.each_ref().map(|run| Micros::of(run.acks.clone()));
    for (what, values) in [
        (
            "checkpoint pause p50, 25 ms epochs (µs)",
            [pauses[0].p50, pauses[1].p50],
        ),
        ("checkpoint pause p99 (µs)", [pauses[0].p99, pauses[1].p99]),
        (
            "checkpoint to acknowledgement p50 (µs)",
            [acks[0].p50, acks[1].p50],
        ),
        (
            "checkpoint to acknowledgement p99 (µs)",
            [acks[0].p99, acks[1].p99],
        ),
    ] {
        report.rows.push(Pair {
            what: what.to_owned(),
            plain: values[0],
            noise: values[1],
            higher_is_better: false,
        });
    }
    Ok(report)
}

impl fmt::Display for EncryptionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "| measurement | plain text | Noise (AES-256-GCM) | cost |"
        )?;
        writeln!(f, "|---|---|---|---|")?;
        for row in &self.rows {
            let cost = if row.higher_is_better {
                (1.0 - row.noise / row.plain) * 100.0
            } else {
                (row.noise / row.plain - 1.0) * 100.0
            };
            writeln!(
                f,
                "| {} | {:.1} | {:.1} | {:+.1} % |",
                row.what, row.plain, row.noise, cost
            )?;
        }
        Ok(())
    }
}
