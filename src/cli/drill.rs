//! `understudy drill`: a failover drill with a real client.
//!
//! Each round builds a [`Lab`] (client, primary host, secondary host,
//! switch), starts the secondary, the primary with the `kv` guest, and in
//! the client namespace `redis-benchmark` plus a writer that records every
//! acknowledged write; kills the primary with SIGKILL at a random moment;
//! lets the guest run on the secondary; and checks:
//!
//! - **no connection was reset**: the writer's connection and every
//!   `redis-benchmark` connection went on (redis-benchmark exits on a reset);
//! - **no acknowledged write was lost**: after the failover, on the same
//!   connection, the counter equals the last `INCR` reply and every
//!   acknowledged `SET` reads back;
//! - **no output escaped early**: the `INCR` replies are exactly 1, 2, 3, …
//!   A reply sent from an epoch that was never committed would be produced
//!   again after the rollback, and show up as a repeated number.
//!
//! The client-visible outage is the longest silence between two replies the
//! writer received around the kill.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

use super::netlab::{GUEST_IP, Host, Lab, Process, SECONDARY_LISTEN, guest_vm_arguments};
use super::{parse_duration, stop_flag};

/// Arguments of `understudy drill`.
#[derive(clap::Args, Debug)]
pub struct DrillArguments {
    /// Rounds, each with a fresh lab and a fresh random kill point.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// Epoch length of the primary.
    #[arg(long, default_value = "25ms", value_parser = parse_duration)]
    epoch: Duration,
    /// Earliest kill, after the client's first reply.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    kill_after_min: Duration,
    /// Latest kill.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    kill_after_max: Duration,
    /// How long the client goes on after the guest resumed on the secondary.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    run_after: Duration,
    /// redis-benchmark connections beside the writer (0: no redis-benchmark).
    #[arg(long, default_value_t = 4)]
    benchmark_clients: u32,
    /// Seed of the kill points (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Print rounds and the summary as JSON lines.
    #[arg(long)]
    json: bool,
    /// How the primary fails: `sigkill` (the process dies; its connections
    /// close at once) or `isolate` (its host drops off the network; the
    /// secondary notices only when heartbeats stop).
    #[arg(long, value_enum, default_value_t = Failure::Sigkill)]
    failure: Failure,
    /// Extra arguments for the primary (e.g. --primary-arg=--output-epoch=0ms).
    #[arg(long = "primary-arg", allow_hyphen_values = true)]
    primary_args: Vec<String>,
}

/// How the primary fails in a drill.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// SIGKILL the primary process.
    Sigkill,
    /// Take the primary host's switch port down.
    Isolate,
}

/// What one round found.
#[derive(Debug, Default)]
struct RoundResult {
    outage: Duration,
    failover: Duration,
    kill_after: Duration,
    incr_acked: u64,
    sets_acked: u64,
    lost_writes: u64,
    repeated_replies: u64,
    resets: u64,
    benchmark_failure: Option<String>,
}

impl RoundResult {
    fn passed(&self) -> bool {
        self.lost_writes == 0
            && self.repeated_replies == 0
            && self.resets == 0
            && self.benchmark_failure.is_none()
    }
}

/// xorshift64*: kill points only.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn between(&mut self, low: Duration, high: Duration) -> Duration {
        let span = high.saturating_sub(low).as_micros() as u64;
        low + Duration::from_micros(if span == 0 { 0 } else { self.next() % span })
    }
}

/// Runs the drill.
pub fn drill(arguments: DrillArguments) -> anyhow::Result<()> {
    let stop = stop_flag()?;
    let program = std::env::current_exe().context("cannot find the understudy binary")?;
    let program = program.to_string_lossy().into_owned();
    let seed = arguments.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |elapsed| elapsed.as_nanos() as u64)
    });
    let mut rng = Rng(seed | 1);
    if arguments.json {
        println!(
            "{}",
            json!({"event": "drill", "rounds": arguments.rounds, "seed": seed,
                   "failure": format!("{:?}", arguments.failure).to_lowercase()})
        );
    } else {
        println!(
            "failover drill: {} round(s), failure {:?}, seed {seed}",
            arguments.rounds, arguments.failure
        );
    }
    let mut results = Vec::new();
    for round in 0..arguments.rounds {
        if stop.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        let kill_after = rng.between(arguments.kill_after_min, arguments.kill_after_max);
        let result = run_round(&arguments, &program, round, kill_after, &stop)
            .with_context(|| format!("round {round} failed"))?;
        report_round(round, &result, arguments.json);
        results.push(result);
    }
    summarise(&results, arguments.json)
}

fn report_round(round: u32, result: &RoundResult, as_json: bool) {
    if as_json {
        println!(
            "{}",
            json!({
                "event": "round", "round": round, "passed": result.passed(),
                "outage_ms": result.outage.as_secs_f64() * 1e3,
                "failover_ms": result.failover.as_secs_f64() * 1e3,
                "kill_after_ms": result.kill_after.as_secs_f64() * 1e3,
                "incr_acked": result.incr_acked, "sets_acked": result.sets_acked,
                "lost_writes": result.lost_writes, "repeated_replies": result.repeated_replies,
                "resets": result.resets, "benchmark_failure": result.benchmark_failure,
            })
        );
    } else {
        println!(
            "round {round}: {} — primary failed {:.0} ms in; guest resumed {:.1} ms after the last heartbeat; client outage {:.0} ms; {} INCR and {} SET acknowledged, {} lost, {} repeated replies, {} resets{}",
            if result.passed() { "PASS" } else { "FAIL" },
            result.kill_after.as_secs_f64() * 1e3,
            result.failover.as_secs_f64() * 1e3,
            result.outage.as_secs_f64() * 1e3,
            result.incr_acked,
            result.sets_acked,
            result.lost_writes,
            result.repeated_replies,
            result.resets,
            result
                .benchmark_failure
                .as_ref()
                .map_or(String::new(), |failure| format!(
                    "; redis-benchmark: {failure}"
                )),
        );
    }
}

fn summarise(results: &[RoundResult], as_json: bool) -> anyhow::Result<()> {
    let mut outages: Vec<Duration> = results.iter().map(|result| result.outage).collect();
    outages.sort();
    let median = outages.get(outages.len() / 2).copied().unwrap_or_default();
    let worst = outages.last().copied().unwrap_or_default();
    let failed = results.iter().filter(|result| !result.passed()).count();
    let lost: u64 = results.iter().map(|result| result.lost_writes).sum();
    let resets: u64 = results.iter().map(|result| result.resets).sum();
    if as_json {
        println!(
            "{}",
            json!({"event": "summary", "rounds": results.len(), "failed": failed,
                   "outage_median_ms": median.as_secs_f64() * 1e3,
                   "outage_worst_ms": worst.as_secs_f64() * 1e3,
                   "lost_writes": lost, "resets": resets})
        );
    } else {
        println!(
            "summary: {} round(s), {failed} failed; client outage median {:.0} ms, worst {:.0} ms; {lost} acknowledged writes lost, {resets} connections reset",
            results.len(),
            median.as_secs_f64() * 1e3,
            worst.as_secs_f64() * 1e3
        );
    }
    if failed > 0 {
        bail!("{failed} of {} drill round(s) failed", results.len());
    }
    Ok(())
}

/// Starts a secondary and a protected `kv` primary in `lab`; returns them
/// once the initial synchronisation is acknowledged.
pub fn start_protected(
    lab: &Lab,
    program: &str,
    epoch: Duration,
    extra_secondary: &[String],
    extra_primary: &[String],
) -> anyhow::Result<(Process, Process)> {
    let mut secondary_arguments: Vec<String> = [
        "secondary",
        "--listen",
        SECONDARY_LISTEN,
        "--tap",
        "tap0",
        "--json",
    ]
    .map(String::from)
    .to_vec();
    secondary_arguments.extend_from_slice(extra_secondary);
    let mut secondary = lab.spawn(Host::Secondary, "secondary", program, &secondary_arguments)?;
    secondary
        .wait_event("listening", Duration::from_secs(10))
        .with_context(|| lab.log_tail("secondary", 20))?;
    let mut primary_arguments: Vec<String> = [
        "primary",
        "--secondary",
        SECONDARY_LISTEN,
        "--epoch",
        &format!("{}ms", epoch.as_millis()),
        "--json",
    ]
    .map(String::from)
    .to_vec();
    primary_arguments.extend(guest_vm_arguments());
    primary_arguments.extend_from_slice(extra_primary);
    let mut primary = lab.spawn(Host::Primary, "primary", program, &primary_arguments)?;
    primary
        .wait_event("synchronised", Duration::from_secs(20))
        .with_context(|| lab.log_tail("primary", 20))?;
    Ok((secondary, primary))
}

fn run_round(
    arguments: &DrillArguments,
    program: &str,
    round: u32,
    kill_after: Duration,
    stop: &AtomicBool,
) -> anyhow::Result<RoundResult> {
    let lab = Arc::new(Lab::build(round)?);
    let (mut secondary, mut primary) =
        start_protected(&lab, program, arguments.epoch, &[], &arguments.primary_args)?;
    let writer_stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let lab = lab.clone();
        let writer_stop = writer_stop.clone();
        std::thread::Builder::new()
            .name("drill-writer".to_owned())
            .spawn(move || -> anyhow::Result<WriterLog> {
                lab.enter(Host::Client)?;
                Writer::connect()?.run(&writer_stop)
            })
            .context("cannot start the writer thread")?
    };
    let mut benchmark = if arguments.benchmark_clients > 0 {
        let benchmark_arguments: Vec<String> = vec![
            "-h".into(),
            GUEST_IP.into(),
            "-c".into(),
            arguments.benchmark_clients.to_string(),
            "-t".into(),
            "set,get,incr".into(),
            "-n".into(),
            "100000000".into(),
            "-r".into(),
            "10000".into(),
            "-q".into(),
        ];
        Some(lab.spawn(
            Host::Client,
            "redis-benchmark",
            "redis-benchmark",
            &benchmark_arguments,
        )?)
    } else {
        None
    };
    let started = Instant::now();
    while started.elapsed() < kill_after && !stop.load(Ordering::Relaxed) && !writer.is_finished() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let killed_at = Instant::now();
    match arguments.failure {
        Failure::Sigkill => primary.kill()?,
        Failure::Isolate => lab.isolate(Host::Primary)?,
    }
    let resumed = secondary.wait_event("resumed", Duration::from_secs(10));
    let after = Instant::now();
    while after.elapsed() < arguments.run_after && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(10));
    }
    writer_stop.store(true, Ordering::Relaxed);
    let benchmark_failure = benchmark.as_mut().and_then(|benchmark| {
        if benchmark.running() {
            benchmark.interrupt(Duration::from_secs(2));
            None
        } else {
            Some(format!(
                "exited during the round: {}",
                lab.log_tail("redis-benchmark", 5)
            ))
        }
    });
    let log = writer
        .join()
        .map_err(|_| anyhow::anyhow!("the writer thread panicked"))?
        .with_context(|| {
            format!(
                "the writer failed; secondary log:\n{}",
                lab.log_tail("secondary", 20)
            )
        })?;
    let (resumed, _) = resumed.with_context(|| lab.log_tail("secondary", 20))?;
    let failover =
        Duration::from_secs_f64(resumed["since_last_heartbeat_ms"].as_f64().unwrap_or(0.0) / 1e3);
    drop(secondary);
    drop(primary);
    Ok(RoundResult {
        outage: log.longest_silence_around(killed_at),
        failover,
        kill_after,
        incr_acked: log.incr_replies.len() as u64,
        sets_acked: log.sets_acked,
        lost_writes: log.lost_writes,
        repeated_replies: log.repeated_replies,
        resets: log.resets,
        benchmark_failure,
    })
}

/// What the writer saw.
#[derive(Default)]
struct WriterLog {
    /// When each reply arrived.
    reply_times: Vec<Instant>,
    /// Every INCR reply, in order.
    incr_replies: Vec<i64>,
    sets_acked: u64,
    lost_writes: u64,
    repeated_replies: u64,
    resets: u64,
}

impl WriterLog {
    /// The longest gap between two replies where the later one came after `at`.
    fn longest_silence_around(&self, at: Instant) -> Duration {
        self.reply_times
            .windows(2)
            .filter(|pair| pair[1] >= at)
            .map(|pair| pair[1] - pair[0])
            .max()
            .unwrap_or_default()
    }
}

/// A RESP client on one connection that alternates `INCR` and `SET`.
struct Writer {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Writer {
    fn connect() -> anyhow::Result<Self> {
        let address: SocketAddr = format!("{GUEST_IP}:6379").parse().expect("a valid address");
        let stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))
            .context("the writer cannot connect to the guest")?;
        stream.set_nodelay(true)?;
        // A failover takes well under this; longer means the guest is gone.
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Self { stream, reader })
    }

    fn command(&mut self, arguments: &[&str]) -> std::io::Result<String> {
        let mut request = format!("*{}\r\n", arguments.len());
        for argument in arguments {
            request.push_str(&format!("${}\r\n{argument}\r\n", argument.len()));
        }
        self.stream.write_all(request.as_bytes())?;
        self.read_reply()
    }

    fn read_reply(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the guest closed the connection",
            ));
        }
        let line = line.trim_end().to_owned();
        if let Some(length) = line.strip_prefix('$') {
            let Ok(length) = length.parse::<i64>() else {
                return Ok(line);
            };
            if length < 0 {
                return Ok("(nil)".to_owned());
            }
            let mut value = String::new();
            self.reader.read_line(&mut value)?;
            return Ok(value.trim_end().to_owned());
        }
        Ok(line)
    }

    fn run(mut self, stop: &AtomicBool) -> anyhow::Result<WriterLog> {
        let mut log = WriterLog::default();
        let mut sets: Vec<(u64, String)> = Vec::new();
        let mut index = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let incremented = match self.command(&["INCR", "drill:counter"]) {
                Ok(reply) => reply,
                Err(error) => {
                    log.resets += 1;
                    bail!(
                        "INCR failed after {} replies: {error}",
                        log.reply_times.len()
                    );
                }
            };
            log.reply_times.push(Instant::now());
            let value: i64 = incremented
                .strip_prefix(':')
                .and_then(|number| number.parse().ok())
                .with_context(|| format!("INCR answered {incremented:?}"))?;
            if let Some(&previous) = log.incr_replies.last()
                && value != previous + 1
            {
                log.repeated_replies += 1;
            }
            log.incr_replies.push(value);
            index += 1;
            let key = format!("drill:key:{index}");
            let value = format!("value-{index}-{value}");
            match self.command(&["SET", &key, &value]) {
                Ok(reply) if reply == "+OK" => {
                    log.reply_times.push(Instant::now());
                    log.sets_acked += 1;
                    sets.push((index, value));
                }
                Ok(reply) => bail!("SET answered {reply:?}"),
                Err(error) => {
                    log.resets += 1;
                    bail!(
                        "SET failed after {} replies: {error}",
                        log.reply_times.len()
                    );
                }
            }
        }
        // Verify on the same connection, which survived the failover.
        let counter = self.command(&["GET", "drill:counter"])?;
        let expected = log.incr_replies.last().copied().unwrap_or(0);
        if counter.parse::<i64>().ok() != Some(expected) {
            log.lost_writes += 1;
            tracing::error!(%counter, expected, "the counter does not match the last INCR reply");
        }
        for (index, value) in &sets {
            let stored = self.command(&["GET", &format!("drill:key:{index}")])?;
            if &stored != value {
                log.lost_writes += 1;
                tracing::error!(index, %stored, %value, "an acknowledged SET is missing");
            }
        }
        Ok(log)
    }
}
