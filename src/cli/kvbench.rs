//! `understudy bench kv`: arguments and printing; the benchmark itself is
//! [`understudy_lab::kvbench`].

use std::time::Duration;

use serde_json::json;
use understudy_lab::kvbench::{self, KvBenchOptions};

use super::drill::this_program;

/// Arguments of `understudy bench kv`.
#[derive(clap::Args, Debug)]
pub struct KvBenchArguments {
    /// redis-benchmark tests.
    #[arg(long, default_value = "ping,set,get,incr")]
    tests: String,
    /// Requests per test.
    #[arg(long, default_value_t = 20_000)]
    requests: u32,
    /// Parallel client connections.
    #[arg(long, default_value_t = 50)]
    clients: u32,
    /// Epoch length of the protected run.
    #[arg(long, default_value = "25ms", value_parser = super::parse_duration)]
    epoch: Duration,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs the benchmark.
pub fn bench_kv(arguments: KvBenchArguments) -> anyhow::Result<()> {
    let runs = kvbench::run(&KvBenchOptions {
        program: this_program()?,
        tests: arguments.tests.clone(),
        requests: arguments.requests,
        clients: arguments.clients,
        epoch: arguments.epoch,
    })?;
    let colo_report = runs.iter().find_map(|run| run.colo.clone());
    if arguments.json {
        let runs: serde_json::Map<String, serde_json::Value> = runs
            .iter()
            .map(|run| {
                let rows: Vec<_> = run
                    .rows
                    .iter()
                    .map(|row| json!({"test": row.test, "rps": row.rps, "p50_ms": row.p50_ms, "p99_ms": row.p99_ms}))
                    .collect();
                (run.name.to_owned(), json!(rows))
            })
            .collect();
        let colo = colo_report
            .map(|(report, elapsed)| json!({"report": report, "seconds": elapsed.as_secs_f64()}));
        println!(
            "{}",
            json!({"epoch_ms": arguments.epoch.as_secs_f64() * 1e3, "clients": arguments.clients,
                   "requests": arguments.requests, "runs": runs, "colo": colo})
        );
        return Ok(());
    }
    println!(
        "redis-benchmark -c {} -n {} against the kv guest, {} ms epochs:\n  alone: unprotected\n  remus: protected, output released at each epoch's checkpoint (--output-epoch 0ms)\n  understudy: protected, a checkpoint taken 2 ms after the guest's first output (default)\n  colo: protected in COLO mode (--mode colo: the secondary's guest runs too; output released when both copies agree)",
        arguments.clients,
        arguments.requests,
        arguments.epoch.as_millis()
    );
    print!("{:<12}", "test");
    for run in &runs {
        print!(
            " | {:>10} {:>8} {:>8}",
            format!("{} rps", run.name),
            "p50 ms",
            "p99 ms"
        );
    }
    println!();
    let Some(first) = runs.first() else {
        return Ok(());
    };
    for (index, row) in first.rows.iter().enumerate() {
        print!("{:<12}", row.test);
        for run in &runs {
            if let Some(row) = run.rows.get(index) {
                print!(
                    " | {:>10.0} {:>8.3} {:>8.3}",
                    row.rps, row.p50_ms, row.p99_ms
                );
            }
        }
        println!();
    }
    if let Some((report, elapsed)) = colo_report {
        let total: u64 = report["checkpoints"]
            .as_object()
            .map(|causes| causes.values().filter_map(serde_json::Value::as_u64).sum())
            .unwrap_or(0);
        println!(
            "colo: {total} checkpoints in {:.1} s ({:.2}/s), by cause {}; {} frames compared, {} matched, {} released by a checkpoint, {} ACKs passed",
            elapsed.as_secs_f64(),
            total as f64 / elapsed.as_secs_f64().max(1e-9),
            report["checkpoints"],
            report["compared"],
            report["matched"],
            report["released_by_checkpoint"],
            report["passed"],
        );
    }
    Ok(())
}
