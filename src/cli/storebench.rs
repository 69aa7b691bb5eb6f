//! `understudy bench store`: an in-memory secondary and a storage-backed
//! one side by side, as real processes on this machine (the store on its
//! disk): the backup host's memory per protected VM, acknowledgement
//! latency and checkpoint throughput while the guest writes, and the
//! failover (time to the guest running, and its write rate while its pages
//! still come from the store).

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use super::parse_duration;

/// Arguments of `understudy bench store`.
#[derive(clap::Args, Debug)]
pub struct StoreBenchArguments {
    /// Guest memory (the guest writes at random over all but 16 MiB).
    #[arg(long, default_value = "1G")]
    memory: String,
    /// Guest write rates to measure at.
    #[arg(long, value_delimiter = ',', default_value = "10MB/s,50MB/s")]
    rates: Vec<String>,
    /// How long to measure protection at each rate.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    seconds: Duration,
    /// Where the stores go (default: a temporary directory).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

/// One mode at one rate.
struct Row {
    mode: &'static str,
    rate: String,
    ack_p50_us: f64,
    ack_p99_us: f64,
    epochs_per_second: f64,
    committed_mb_per_second: f64,
    resident_kib: u64,
    peak_kib: u64,
    failover_ms: f64,
    guest_mb_per_s_after: Vec<f64>,
}

/// A child whose JSON lines arrive on a channel; killed when dropped.
struct Spawned {
    child: Child,
    lines: Receiver<Value>,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(args: &[String]) -> anyhow::Result<Spawned> {
    let mut child = Command::new(std::env::current_exe().context("this program")?)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start understudy")?;
    let stdout = child.stdout.take().context("its output")?;
    let (sender, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(value) = serde_json::from_str::<Value>(&line)
                && sender.send(value).is_err()
            {
                return;
            }
        }
    });
    Ok(Spawned { child, lines })
}

impl Spawned {
    fn until(&self, event: &str, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .with_context(|| format!("no {event} within {timeout:?}"))?;
            if line["event"] == event {
                return Ok(line);
            }
        }
    }
}

fn memory_of(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|value| value.parse().ok())
            .with_context(|| format!("no {name}"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

fn free_port() -> anyhow::Result<String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    Ok(format!("127.0.0.1:{port}"))
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[understudy_bench::nearest_rank(sorted.len(), q)]
}

fn one(
    store: Option<&std::path::Path>,
    arguments: &StoreBenchArguments,
    rate: &str,
) -> anyhow::Result<Row> {
    let listen = free_port()?;
    let mut secondary_args: Vec<String> = [
        "secondary",
        "--listen",
        &listen,
        "--plaintext",
        "--json",
        "--duration",
        "3500ms",
    ]
    .map(String::from)
    .to_vec();
    if let Some(store) = store {
        secondary_args.extend(["--store".to_owned(), store.display().to_string()]);
    }
    let secondary = spawn(&secondary_args)?;
    secondary.until("listening", Duration::from_secs(10))?;
    let memory_bytes = understudy_vm::workload::parse_size("memory", &arguments.memory)?;
    let wss_mib = (memory_bytes >> 20).saturating_sub(16).max(16);
    let workload = format!("memtouch:rate={rate},wss={wss_mib}M,pattern=random");
    let mut primary = spawn(
        &[
            "primary",
            "--secondary",
            &listen,
            "--plaintext",
            "--json",
            "--codec",
            "raw",
            "--memory",
            &arguments.memory,
            "--workload",
            &workload,
        ]
        .map(String::from),
    )?;
    primary.until("synchronised", Duration::from_secs(120))?;
    let started = Instant::now();
    let (mut acks, mut epochs, mut raw_bytes) = (Vec::new(), 0u64, 0u64);
    while started.elapsed() < arguments.seconds {
        let Ok(line) = primary.lines.recv_timeout(Duration::from_millis(100)) else {
            continue;
        };
        match line["event"].as_str() {
            Some("ack") => acks.push(line["ack_us"].as_f64().unwrap_or_default()),
            Some("epoch") => {
                epochs += 1;
                raw_bytes += line["raw_bytes"].as_u64().unwrap_or_default();
            }
            _ => {}
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let (resident_kib, peak_kib) = memory_of(secondary.child.id())?;
    primary.child.kill()?;
    primary.child.wait()?;
    let resumed = secondary.until("resumed", Duration::from_secs(60))?;
    let mut guest_mb_per_s_after = Vec::new();
    while guest_mb_per_s_after.len() < 3 {
        let Ok(line) = secondary.lines.recv_timeout(Duration::from_secs(5)) else {
            break;
        };
        if let Some(rate) = line["guest_dirtied_mb_per_s"].as_f64() {
            guest_mb_per_s_after.push(rate);
        }
    }
    acks.sort_by(f64::total_cmp);
    Ok(Row {
        mode: if store.is_some() { "store" } else { "memory" },
        rate: rate.to_owned(),
        ack_p50_us: quantile(&acks, 0.5),
        ack_p99_us: quantile(&acks, 0.99),
        epochs_per_second: epochs as f64 / seconds,
        committed_mb_per_second: raw_bytes as f64 / seconds / 1e6,
        resident_kib,
        peak_kib,
        failover_ms: resumed["since_last_heartbeat_ms"]
            .as_f64()
            .unwrap_or_default(),
        guest_mb_per_s_after,
    })
}

/// Runs both modes at every rate and prints the table.
pub fn bench_store(arguments: &StoreBenchArguments) -> anyhow::Result<()> {
    let temporary;
    let root = match &arguments.dir {
        Some(dir) => dir.clone(),
        None => {
            temporary = tempfile_dir()?;
            temporary.clone()
        }
    };
    if arguments.rates.is_empty() {
        bail!("no --rates");
    }
    let mut rows = Vec::new();
    for rate in &arguments.rates {
        for store in [None, Some(root.as_path())] {
            let row = one(store, arguments, rate).with_context(|| {
                format!(
                    "{rate}, {}",
                    if store.is_some() { "store" } else { "memory" }
                )
            })?;
            eprintln!("  {} at {}: done", row.mode, row.rate);
            rows.push(row);
            let _ = std::fs::remove_dir_all(&root);
        }
    }
    println!(
        "Backup memory, acknowledgements and failover, in-memory vs storage-backed secondary ({} guest, writing at random, raw codec, 25 ms epochs, this machine's disk)",
        arguments.memory
    );
    println!(
        "| secondary | guest writes | ack p50 / p99 | epochs/s | committed MB/s | secondary RSS (peak) | failover to running | guest MB/s, seconds 1–3 after |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for row in &rows {
        println!(
            "| {} | {} | {:.2} / {:.2} ms | {:.1} | {:.1} | {:.0} MiB ({:.0} MiB) | {:.1} ms | {} |",
            row.mode,
            row.rate,
            row.ack_p50_us / 1e3,
            row.ack_p99_us / 1e3,
            row.epochs_per_second,
            row.committed_mb_per_second,
            row.resident_kib as f64 / 1024.0,
            row.peak_kib as f64 / 1024.0,
            row.failover_ms,
            row.guest_mb_per_s_after
                .iter()
                .map(|rate| format!("{rate:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("understudy-store-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
