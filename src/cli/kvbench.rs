//! `understudy bench kv`: what protection costs a real client. The `kv`
//! guest runs in the [`Lab`], first alone (`understudy run`), then
//! protected with output released only at epoch ends (Remus), then
//! protected with Understudy's early checkpoint on output;
//! `redis-benchmark` measures each from the client namespace, side by side.

use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;

use super::drill::start_protected;
use super::netlab::{GUEST_IP, Host, Lab, Process, guest_vm_arguments};

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

/// One redis-benchmark test's numbers.
#[derive(Clone, Debug)]
struct Row {
    test: String,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Parses `redis-benchmark --csv` output.
fn parse_csv(text: &str) -> Vec<Row> {
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

fn run_benchmark(lab: &Lab, arguments: &KvBenchArguments, name: &str) -> anyhow::Result<Vec<Row>> {
    let benchmark_arguments: Vec<String> = vec![
        "-h".into(),
        GUEST_IP.into(),
        "-t".into(),
        arguments.tests.clone(),
        "-n".into(),
        arguments.requests.to_string(),
        "-c".into(),
        arguments.clients.to_string(),
        "--csv".into(),
    ];
    let benchmark = lab.spawn(Host::Client, name, "redis-benchmark", &benchmark_arguments)?;
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

/// Runs the benchmark.
pub fn bench_kv(arguments: KvBenchArguments) -> anyhow::Result<()> {
    let program = std::env::current_exe().context("cannot find the understudy binary")?;
    let program = program.to_string_lossy().into_owned();
    let lab = Lab::build(0)?;
    let mut alone = start_alone(&lab, &program)?;
    let unprotected = run_benchmark(&lab, &arguments, "benchmark-alone")?;
    alone.kill()?;
    let mut runs = vec![("alone".to_owned(), unprotected)];
    for (name, output_epoch) in [("remus", "0ms"), ("understudy", "2ms")] {
        let extra = [format!("--output-epoch={output_epoch}")];
        let (mut secondary, mut primary) =
            start_protected(&lab, &program, arguments.epoch, &[], &extra)?;
        runs.push((
            name.to_owned(),
            run_benchmark(&lab, &arguments, &format!("benchmark-{name}"))?,
        ));
        primary.kill()?;
        secondary.kill()?;
    }
    if arguments.json {
        let runs: serde_json::Map<String, serde_json::Value> = runs
            .iter()
            .map(|(name, rows)| {
                let rows: Vec<_> = rows
                    .iter()
                    .map(|row| json!({"test": row.test, "rps": row.rps, "p50_ms": row.p50_ms, "p99_ms": row.p99_ms}))
                    .collect();
                (name.clone(), json!(rows))
            })
            .collect();
        println!(
            "{}",
            json!({"epoch_ms": arguments.epoch.as_secs_f64() * 1e3, "clients": arguments.clients,
                   "requests": arguments.requests, "runs": runs})
        );
        return Ok(());
    }
    println!(
        "redis-benchmark -c {} -n {} against the kv guest, {} ms epochs:\n  alone: unprotected\n  remus: protected, output released at each epoch's checkpoint (--output-epoch 0ms)\n  understudy: protected, a checkpoint taken 2 ms after the guest's first output (default)",
        arguments.clients,
        arguments.requests,
        arguments.epoch.as_millis()
    );
    print!("{:<12}", "test");
    for (name, _) in &runs {
        print!(
            " | {:>10} {:>8} {:>8}",
            format!("{name} rps"),
            "p50 ms",
            "p99 ms"
        );
    }
    println!();
    for (index, row) in runs[0].1.iter().enumerate() {
        print!("{:<12}", row.test);
        for (_, rows) in &runs {
            if let Some(row) = rows.get(index) {
                print!(
                    " | {:>10.0} {:>8.3} {:>8.3}",
                    row.rps, row.p50_ms, row.p99_ms
                );
            }
        }
        println!();
    }
    Ok(())
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
