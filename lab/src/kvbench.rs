//! What protection costs a real client (`understudy bench kv`). The `kv`
//! guest runs in the [`Lab`], first alone (`understudy run`), then protected
//! with output released only at epoch ends (Remus), then protected with
//! Understudy's early checkpoint on output, then in COLO mode (the
//! secondary's guest runs too; output released when both copies agree);
//! `redis-benchmark` measures each from the client namespace. The COLO run
//! also reports the checkpoints it took, by cause, and the compare counts.

use std::time::Duration;

use anyhow::{Context, bail};

use crate::drill::start_protected;
use crate::network::{GUEST_IP, Host, Lab, Process, guest_vm_arguments};
use crate::tools::require_tool;

/// How the benchmark runs.
#[derive(Clone, Debug)]
pub struct KvBenchOptions {
    /// The `understudy` binary.
    pub program: String,
    /// redis-benchmark tests (`-t`).
    pub tests: String,
    /// Requests per test.
    pub requests: u32,
    /// Parallel client connections.
    pub clients: u32,
    /// Epoch length of the protected runs.
    pub epoch: Duration,
}

/// One redis-benchmark test's numbers.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// The test (e.g. `SET`).
    pub test: String,
    /// Requests per second.
    pub rps: f64,
    /// Median latency.
    pub p50_ms: f64,
    /// 99th percentile latency.
    pub p99_ms: f64,
}

/// One protection mode's results.
#[derive(Clone, Debug)]
pub struct Run {
    /// `alone`, `remus`, `understudy` or `colo`.
    pub name: &'static str,
    /// Its rows, in the order redis-benchmark ran the tests.
    pub rows: Vec<Row>,
    /// COLO: the primary's compare report (its `colo` JSON line: frames
    /// compared and matched, checkpoints by cause) and how long the
    /// benchmark ran.
    pub colo: Option<(serde_json::Value, Duration)>,
}

/// Parses `redis-benchmark --csv` output.
pub fn parse_csv(text: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut header: Vec<String> = Vec::new();
    for line in text.lines() {
        let fields: Vec<String> = line
            .split(',')
            .map(|field| field.trim_matches('"').to_owned())
            .collect();
        if fields.first().is_some_and(|field| field == "test") {
            header = fields;
            continue;
        }
        let column = |name: &str| {
            header
                .iter()
                .position(|field| field == name)
                .and_then(|at| fields.get(at))
                .and_then(|value| value.parse::<f64>().ok())
        };
        if let (Some(rps), Some(p50_ms), Some(p99_ms)) = (
            column("rps"),
            column("p50_latency_ms"),
            column("p99_latency_ms"),
        ) {
            rows.push(Row {
                test: fields[0].clone(),
                rps,
                p50_ms,
                p99_ms,
            });
        }
    }
    rows
}

fn run_benchmark(lab: &Lab, options: &KvBenchOptions, name: &str) -> anyhow::Result<Vec<Row>> {
    let arguments: Vec<String> = vec![
        "-h".into(),
        GUEST_IP.into(),
        "-t".into(),
        options.tests.clone(),
        "-n".into(),
        options.requests.to_string(),
        "-c".into(),
        options.clients.to_string(),
        "--csv".into(),
    ];
    let benchmark = lab.spawn(Host::Client, name, "redis-benchmark", &arguments)?;
    let mut text = String::new();
    while let Ok(line) = benchmark.lines.recv_timeout(Duration::from_secs(300)) {
        text.push_str(&line.text);
        text.push('\n');
    }
    let rows = parse_csv(&text);
    if rows.is_empty() {
        bail!(
            "redis-benchmark printed no results: {text}\n{}",
            lab.log_tail(name, 10)
        );
    }
    Ok(rows)
}

fn start_alone(lab: &Lab, program: &str) -> anyhow::Result<Process> {
    let mut arguments = vec!["run".to_owned(), "--json".to_owned()];
    arguments.extend(guest_vm_arguments());
    let mut alone = lab.spawn(Host::Primary, "alone", program, &arguments)?;
    alone
        .wait_event("guest_running", Duration::from_secs(20))
        .with_context(|| lab.log_tail("alone", 20))?;
    Ok(alone)
}

/// Runs the benchmark: alone, Remus-style, Understudy.
pub fn run(options: &KvBenchOptions) -> anyhow::Result<Vec<Run>> {
    require_tool("redis-benchmark", "redis-tools")?;
    let lab = Lab::build(0)?;
    let mut alone = start_alone(&lab, &options.program)?;
    let unprotected = run_benchmark(&lab, options, "benchmark-alone")?;
    alone.kill()?;
    let mut runs = vec![Run {
        name: "alone",
        rows: unprotected,
        colo: None,
    }];
    for (name, output_epoch) in [("remus", "0ms"), ("understudy", "2ms")] {
        let extra = [format!("--output-epoch={output_epoch}")];
        let (mut secondary, mut primary) =
            start_protected(&lab, &options.program, options.epoch, &[], &extra)?;
        runs.push(Run {
            name,
            rows: run_benchmark(&lab, options, &format!("benchmark-{name}"))?,
            colo: None,
        });
        // The secondary first: a primary killed first is a failover, and the
        // guest's address would move to the secondary's port (the next
        // run's clients then wait for the switch to learn it back).
        secondary.kill()?;
        primary.kill()?;
    }
    let colo = ["--mode".to_owned(), "colo".to_owned()];
    let (mut secondary, mut primary) =
        start_protected(&lab, &options.program, options.epoch, &colo, &colo)?;
    let started = std::time::Instant::now();
    let rows = run_benchmark(&lab, options, "benchmark-colo")?;
    let elapsed = started.elapsed();
    // Stopped, the primary reports what its compare proxy did (and says
    // goodbye: no failover).
    primary.signal(libc::SIGTERM)?;
    let (report, _) = primary
        .wait_event("colo", Duration::from_secs(20))
        .with_context(|| lab.log_tail("primary", 20))?;
    secondary.kill()?;
    primary.kill()?;
    runs.push(Run {
        name: "colo",
        rows,
        colo: Some((report, elapsed)),
    });
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_benchmark_csv_is_parsed() {
        let text = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                    \"PING_INLINE\",\"14084.51\",\"0.682\",\"0.160\",\"0.663\",\"0.927\",\"1.183\",\"3.175\"\n";

        let rows = parse_csv(text);

        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].test, "PING_INLINE");
        assert!((rows[0].p99_ms - 1.183).abs() < 1e-9);
    }
}
