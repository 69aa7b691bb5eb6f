//! The failover drill: a real client against a protected guest whose host
//! fails at a random moment (`understudy drill`, and `understudy demo` as a
//! single narrated round).
//!
//! Each round builds a [`Lab`] (client, primary host, secondary host,
//! switch), starts the secondary, the primary with the `kv` guest, and in
//! the client namespace a writer that records every acknowledged write (plus
//! `redis-benchmark` connections when asked); fails the primary at a random
//! moment; lets the guest run on the secondary; and checks:
//!
//! - **no connection was reset**: the writer's connection and every
//!   `redis-benchmark` connection went on (redis-benchmark exits on a reset);
//!   a reset or a connection that stops answering fails the round, it does
//!   not abort the drill;
//! - **no acknowledged write was lost**: after the failover, on the same
//!   connection, the counter equals the last `INCR` reply and every
//!   acknowledged `SET` reads back;
//! - **no output escaped early**: the `INCR` replies are exactly 1, 2, 3, …
//!   A reply sent from an epoch that was never committed would be produced
//!   again after the rollback, and show up as a repeated number.
//!
//! The client-visible outage is the longest silence between two replies the
//! writer received around the failure.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::network::guest_vm_arguments;
use crate::network::{GUEST_IP, GUEST_PORT, Host, Lab, PRIMARY_IP, Process, SECONDARY_LISTEN};
use crate::resp::RespClient;
use crate::tools::require_tool;

/// How the primary fails in a drill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// SIGKILL the primary process: its connections close at once.
    Sigkill,
    /// Take the primary host's switch port down: nobody is told, the
    /// secondary notices only when heartbeats stop.
    Isolate,
    /// The replication link between the hosts fails; clients still reach
    /// the primary host, and both hosts the witness.
    Partition,
    /// The primary process stops (SIGSTOP) for the drill's stall time, then
    /// goes on (SIGCONT): a zombie that must not release output.
    StallPrimary,
    /// The secondary process stops for the stall time, then goes on.
    StallSecondary,
    /// The witness dies, then the primary (SIGKILL); the witness comes
    /// back after the stall time. Nobody may run the guest meanwhile.
    WitnessDown,
    /// Intruders without the key, on the client host, besiege the secondary
    /// (squatters that connect and say nothing, a plain-text `Hello`, a
    /// stranger's Noise key, forged heartbeat datagrams); then the primary
    /// is killed (SIGKILL). The secondary must take over as if they were
    /// not there.
    Impostor,
    /// Not a failure: a planned switchover (`ctl switchover` on the
    /// primary), and after half the run a second one back. The guest must
    /// move with no lost write, no reset, no repeated reply, be protected
    /// the other way after each, and the side that handed over must send
    /// nothing while the other runs the guest.
    Switchover,
}

impl Failure {
    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Failure::Sigkill => "sigkill",
            Failure::Isolate => "isolate",
            Failure::Partition => "partition",
            Failure::StallPrimary => "stall-primary",
            Failure::StallSecondary => "stall-secondary",
            Failure::WitnessDown => "witness-down",
            Failure::Impostor => "impostor",
            Failure::Switchover => "switchover",
        }
    }
}

/// Which side ran the guest after the failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Survivor {
    /// The primary went on (alone).
    Primary,
    /// The secondary took over.
    Secondary,
}

/// How a drill runs.
#[derive(Clone, Debug)]
pub struct DrillOptions {
    /// The `understudy` binary to run on the lab's hosts.
    pub program: String,
    /// Rounds, each with a fresh lab and a fresh random failure point.
    pub rounds: u32,
    /// Epoch length of the primary.
    pub epoch: Duration,
    /// Earliest failure, after the primary synchronised.
    pub fail_after_min: Duration,
    /// Latest failure.
    pub fail_after_max: Duration,
    /// How long the client goes on after the failure.
    pub run_after: Duration,
    /// redis-benchmark connections beside the writer (0: no redis-benchmark).
    pub benchmark_clients: u32,
    /// Seed of the failure points.
    pub seed: u64,
    /// How the primary fails.
    pub failure: Failure,
    /// Extra arguments for the primary.
    pub primary_arguments: Vec<String>,
    /// Run a witness (etcd on a host of its own) and give it to both sides.
    pub witness: bool,
    /// How long a stalled process stays stopped.
    pub stall: Duration,
    /// Run the pair in COLO mode (the secondary's guest runs in lockstep;
    /// a failover lets it run on) instead of Remus.
    pub colo: bool,
    /// A storage-backed secondary (`--store` in the lab's private
    /// directory): the backup lives on disk, the failover faults it in.
    pub store: bool,
}

/// What a drill reports as it goes.
#[derive(Debug)]
pub enum DrillEvent<'a> {
    /// The guest runs protected on the primary host; the client starts.
    Protected {
        /// The round.
        round: u32,
    },
    /// The primary was made to fail.
    Failed {
        /// The round.
        round: u32,
        /// How long after the client started.
        after: Duration,
    },
    /// The secondary resumed the guest.
    Resumed {
        /// The round.
        round: u32,
        /// The epoch it resumed from.
        epoch: u64,
        /// From the last heartbeat heard to the guest running.
        failover: Duration,
    },
    /// A round ended.
    Round {
        /// The round.
        round: u32,
        /// What it found.
        result: &'a RoundResult,
    },
}

/// What one round found.
#[derive(Clone, Debug, Default)]
pub struct RoundResult {
    /// Longest silence between two replies around the failure.
    pub outage: Duration,
    /// Last heartbeat to the guest running on the secondary.
    pub failover: Duration,
    /// When the primary failed, after the client started.
    pub fail_after: Duration,
    /// `INCR`s acknowledged.
    pub incr_acked: u64,
    /// `SET`s acknowledged.
    pub sets_acked: u64,
    /// Acknowledged writes missing afterwards.
    pub lost_writes: u64,
    /// `INCR` replies out of sequence (output of a rolled-back epoch).
    pub repeated_replies: u64,
    /// Connections reset or closed under the client.
    pub resets: u64,
    /// Requests the guest never answered (within 10 s).
    pub unanswered: u64,
    /// Whether the writes could be read back (not after a reset).
    pub verified: bool,
    /// Which side ran the guest after the failure, if one did.
    pub survivor: Option<Survivor>,
    /// Frames the other side's guest sent out after the survivor took
    /// over: anything but 0 means two copies released output.
    pub loser_frames: u64,
    /// How redis-benchmark failed, if it did.
    pub benchmark_failure: Option<String>,
    /// Switchover: the pages each reverse protection's first
    /// synchronisation sent (it builds on the old primary's memory).
    pub switchover_pages: Vec<u64>,
    /// Switchover: the guest came back to the primary host (the second
    /// switchover), protected again.
    pub switched_back: bool,
}

impl RoundResult {
    /// What the checks found, in words: lost writes, repeated replies,
    /// resets, unanswered requests, and whether the writes were read back.
    pub fn findings(&self) -> String {
        format!(
            "{} lost, {} repeated replies, {} resets, {} unanswered{}",
            self.lost_writes,
            self.repeated_replies,
            self.resets,
            self.unanswered,
            if self.verified {
                ""
            } else {
                "; writes not read back"
            }
        )
    }

    /// Whether the round passed every check.
    pub fn passed(&self) -> bool {
        (self.switchover_pages.is_empty() || self.switched_back)
            && self.verified
            && self.loser_frames == 0
            && self.survivor.is_some()
            && self.lost_writes == 0
            && self.repeated_replies == 0
            && self.resets == 0
            && self.unanswered == 0
            && self.benchmark_failure.is_none()
    }
}

/// All rounds together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DrillSummary {
    /// Rounds run.
    pub rounds: usize,
    /// Rounds that failed a check.
    pub failed: usize,
    /// Median outage.
    pub outage_median: Duration,
    /// Worst outage.
    pub outage_worst: Duration,
    /// Acknowledged writes lost, all rounds.
    pub lost_writes: u64,
    /// Connections reset, all rounds.
    pub resets: u64,
    /// Rounds in which both copies released output after the failure.
    pub two_copies: usize,
}

impl DrillSummary {
    /// Sums up `results`.
    pub fn of(results: &[RoundResult]) -> Self {
        let mut outages: Vec<Duration> = results.iter().map(|result| result.outage).collect();
        outages.sort();
        Self {
            rounds: results.len(),
            failed: results.iter().filter(|result| !result.passed()).count(),
            outage_median: outages.get(outages.len() / 2).copied().unwrap_or_default(),
            outage_worst: outages.last().copied().unwrap_or_default(),
            lost_writes: results.iter().map(|result| result.lost_writes).sum(),
            resets: results.iter().map(|result| result.resets).sum(),
            two_copies: results
                .iter()
                .filter(|result| result.loser_frames > 0)
                .count(),
        }
    }
}

/// xorshift64*: failure points only.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn between(&mut self, low: Duration, high: Duration) -> Duration {
        let span = u64::try_from(high.saturating_sub(low).as_micros()).unwrap_or(u64::MAX);
        low + Duration::from_micros(if span == 0 { 0 } else { self.next() % span })
    }
}

/// Runs the drill's rounds; `stop` ends it between rounds.
pub fn run(
    options: &DrillOptions,
    stop: &AtomicBool,
    mut on_event: impl FnMut(DrillEvent<'_>),
) -> anyhow::Result<Vec<RoundResult>> {
    if options.benchmark_clients > 0 {
        require_tool("redis-benchmark", "redis-tools")?;
    }
    let mut rng = Rng(options.seed | 1);
    let mut results = Vec::new();
    for round in 0..options.rounds {
        if stop.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        let fail_after = rng.between(options.fail_after_min, options.fail_after_max);
        let result = run_round(options, round, fail_after, stop, &mut on_event)
            .with_context(|| format!("round {round} could not run"))?;
        on_event(DrillEvent::Round {
            round,
            result: &result,
        });
        results.push(result);
    }
    Ok(results)
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
    secondary_arguments.extend(lab.channel_arguments(Host::Secondary));
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
    primary_arguments.extend(lab.channel_arguments(Host::Primary));
    primary_arguments.extend_from_slice(extra_primary);
    let mut primary = lab.spawn(Host::Primary, "primary", program, &primary_arguments)?;
    primary
        .wait_event("synchronised", Duration::from_secs(20))
        .with_context(|| lab.log_tail("primary", 20))?;
    Ok((secondary, primary))
}

fn start_benchmark(lab: &Lab, clients: u32) -> anyhow::Result<Process> {
    let arguments: Vec<String> = [
        "-h",
        GUEST_IP,
        "-c",
        &clients.to_string(),
        "-t",
        "set,get,incr",
        "-n",
        "100000000",
        "-r",
        "10000",
        "-q",
    ]
    .map(String::from)
    .to_vec();
    lab.spawn(
        Host::Client,
        "redis-benchmark",
        "redis-benchmark",
        &arguments,
    )
}

fn run_round(
    options: &DrillOptions,
    round: u32,
    fail_after: Duration,
    stop: &AtomicBool,
    on_event: &mut impl FnMut(DrillEvent<'_>),
) -> anyhow::Result<RoundResult> {
    let lab = Arc::new(Lab::build(round)?);
    let mut witness = if options.witness || options.failure == Failure::WitnessDown {
        Some(lab.start_witness()?)
    } else {
        None
    };
    let mut both: Vec<String> = witness
        .iter()
        .flat_map(|_| ["--witness".to_owned(), Lab::witness_url()])
        .collect();
    if options.colo {
        both.extend(["--mode".to_owned(), "colo".to_owned()]);
    }
    let mut primary_arguments = both.clone();
    primary_arguments.extend_from_slice(&options.primary_arguments);
    let mut secondary_arguments = both.clone();
    if options.store {
        secondary_arguments.extend([
            "--store".to_owned(),
            lab.private_dir().join("store").display().to_string(),
        ]);
    }
    let sockets = (
        lab.private_dir().join("primary.sock"),
        lab.private_dir().join("secondary.sock"),
    );
    if options.failure == Failure::Switchover {
        primary_arguments.extend([
            "--listen".to_owned(),
            format!("{PRIMARY_IP}:7001"),
            "--control".to_owned(),
            sockets.0.display().to_string(),
        ]);
        secondary_arguments.extend(["--control".to_owned(), sockets.1.display().to_string()]);
    }
    let (mut secondary, mut primary) = start_protected(
        &lab,
        &options.program,
        options.epoch,
        &secondary_arguments,
        &primary_arguments,
    )?;
    on_event(DrillEvent::Protected { round });
    let writer_stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let lab = lab.clone();
        let writer_stop = writer_stop.clone();
        std::thread::Builder::new()
            .name("drill-writer".to_owned())
            .spawn(move || -> anyhow::Result<WriterLog> {
                lab.enter(Host::Client)?;
                let address = SocketAddr::from(([10, 0, 0, 10], GUEST_PORT));
                let client = RespClient::connect(address, Duration::from_secs(10))
                    .context("the writer cannot connect to the guest")?;
                Ok(Writer::new(client).run(&writer_stop))
            })
            .context("cannot start the writer thread")?
    };
    let mut benchmark = match options.benchmark_clients {
        0 => None,
        clients => Some(start_benchmark(&lab, clients)?),
    };
    let started = Instant::now();
    while started.elapsed() < fail_after && !stop.load(Ordering::Relaxed) && !writer.is_finished() {
        std::thread::sleep(Duration::from_millis(5));
    }
    // Intruders arrive before the failure and stay until the round ends.
    let _intruders = if options.failure == Failure::Impostor {
        Some(besiege_secondary(&lab)?)
    } else {
        None
    };
    let failed_at = Instant::now();
    match options.failure {
        Failure::Sigkill | Failure::Impostor => primary.kill()?,
        Failure::Switchover => {
            control_request(&sockets.0, "switchover").context("the switchover was refused")?;
        }
        Failure::Isolate => lab.isolate(Host::Primary)?,
        Failure::Partition => lab.cut_replication()?,
        Failure::StallPrimary => primary.signal(libc::SIGSTOP)?,
        Failure::StallSecondary => secondary.signal(libc::SIGSTOP)?,
        Failure::WitnessDown => {
            if let Some(witness) = &mut witness {
                witness.kill();
            }
            primary.kill()?;
            // Nobody may take over without the witness: the secondary waits.
            std::thread::sleep(options.stall);
            if secondary
                .poll_event(|line| line["event"] == "resumed")
                .is_some()
            {
                bail!("the secondary resumed while the witness was down");
            }
            if let Some(witness) = &mut witness {
                witness.restart(|| lab.witness_reachable())?;
            }
        }
    }
    on_event(DrillEvent::Failed {
        round,
        after: failed_at - started,
    });
    let outcome = first_survivor(
        &mut primary,
        &mut secondary,
        options,
        Duration::from_secs(15),
    );
    if let Some((_, line, _)) = &outcome
        && line["event"] == "resumed"
    {
        on_event(DrillEvent::Resumed {
            round,
            epoch: line["epoch"].as_u64().unwrap_or_default(),
            failover: failover_of(line),
        });
    }
    // The survivor's moment, and what the other side's guest had sent by then.
    let loser = outcome.as_ref().map(|(survivor, _, _)| match survivor {
        Survivor::Primary => Host::Secondary,
        Survivor::Secondary => Host::Primary,
    });
    let loser_frames_then = loser.map(|host| lab.guest_frames_out(host)).transpose()?;
    match options.failure {
        Failure::StallPrimary => primary.signal(libc::SIGCONT)?,
        Failure::StallSecondary => secondary.signal(libc::SIGCONT)?,
        _ => {}
    }
    let after = Instant::now();
    let mut switchover_pages = Vec::new();
    let mut switched_back = false;
    let mut loser_frames_early = 0;
    if options.failure == Failure::Switchover && outcome.is_some() {
        // Reverse protection: the old secondary leads now.
        let (synchronised, _) = secondary
            .wait_event("synchronised", Duration::from_secs(20))
            .with_context(|| lab.log_tail("secondary", 20))?;
        switchover_pages.push(synchronised["pages"].as_u64().unwrap_or_default());
        while after.elapsed() < options.run_after / 2 && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Nothing from the old primary while the guest ran elsewhere.
        if let (Some(host), Some(then)) = (loser, loser_frames_then) {
            loser_frames_early = lab.guest_frames_out(host)?.saturating_sub(then);
        }
        control_request(&sockets.1, "switchover").context("the switchover back was refused")?;
        primary
            .wait_event("resumed", Duration::from_secs(20))
            .with_context(|| lab.log_tail("primary", 20))?;
        let (synchronised, _) = primary
            .wait_event("synchronised", Duration::from_secs(20))
            .with_context(|| lab.log_tail("primary", 20))?;
        switchover_pages.push(synchronised["pages"].as_u64().unwrap_or_default());
        switched_back = true;
    }
    while after.elapsed() < options.run_after && !stop.load(Ordering::Relaxed) {
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
    let loser_frames = match (loser, loser_frames_then) {
        // The guest came back there: only the time it was away counts.
        _ if switched_back => loser_frames_early,
        (Some(host), Some(then)) => lab.guest_frames_out(host)?.saturating_sub(then),
        _ => 0,
    };
    drop(secondary);
    drop(primary);
    drop(witness);
    let mut result = log.result(failed_at);
    if let Some((survivor, line, _)) = &outcome {
        result.survivor = Some(*survivor);
        if line["event"] == "resumed" {
            result.failover = failover_of(line);
        }
    }
    result.loser_frames = loser_frames;
    result.fail_after = fail_after;
    result.benchmark_failure = benchmark_failure;
    result.switchover_pages = switchover_pages;
    result.switched_back = switched_back;
    Ok(result)
}

/// Sends `{"command": COMMAND}` to a control socket and waits for the
/// reply; fails unless it is `ok`.
fn control_request(socket: &std::path::Path, command: &str) -> anyhow::Result<serde_json::Value> {
    use std::io::{BufRead, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("cannot reach {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    writeln!(
        stream,
        "{}",
        serde_json::json!({"id": 1, "command": command})
    )?;
    let mut line = String::new();
    std::io::BufReader::new(stream).read_line(&mut line)?;
    let reply: serde_json::Value =
        serde_json::from_str(&line).with_context(|| format!("not a reply: {line:?}"))?;
    if reply["ok"] != true {
        bail!("{command} failed: {}", reply["error"]);
    }
    Ok(reply["result"].clone())
}

/// Intruders on the client host, without the key, at the secondary's
/// address: eight squatters that connect and say nothing (or only start a
/// handshake), a plain-text `Hello`, a Noise handshake with a stranger's
/// key, and forged heartbeat datagrams. Returns their open connections.
fn besiege_secondary(lab: &Lab) -> anyhow::Result<Vec<std::net::TcpStream>> {
    use std::io::Write;
    use understudy_checkpoint::channel::{Channel, KeyPair, Keyring, Security};
    use understudy_checkpoint::protocol::{Message, Sender};
    let lab_thread = std::thread::scope(|scope| {
        scope
            .spawn(|| -> anyhow::Result<Vec<std::net::TcpStream>> {
                lab.enter(Host::Client)?;
                let address: SocketAddr = SECONDARY_LISTEN
                    .parse()
                    .context("the secondary's address")?;
                let mut open = Vec::new();
                for squatter in 0..8 {
                    let mut stream =
                        std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2))
                            .context("an intruder cannot reach the secondary")?;
                    if squatter % 2 == 0 {
                        stream.write_all(b"URN1")?;
                    }
                    open.push(stream);
                }
                let mut plain =
                    std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
                let goodbye =
                    Sender::new().encode(0, &Message::Goodbye("an intruder".to_owned()))?;
                plain.write_all(&goodbye)?;
                open.push(plain);
                let stranger = Security::Noise(Arc::new(Keyring {
                    local: KeyPair::generate()?,
                    peers: Vec::new(),
                }));
                let stream =
                    std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
                // Refused either way: the stranger lists no key, the secondary
                // does not list the stranger's.
                let _ = Channel::connect(stream, &stranger, Duration::from_secs(2));
                let udp = std::net::UdpSocket::bind("0.0.0.0:0")?;
                let mut forged = [0u8; 64];
                forged[..4].copy_from_slice(b"URHB");
                for counter in 0..200u64 {
                    forged[24..32].copy_from_slice(&counter.to_le_bytes());
                    let _ = udp.send_to(&forged, address);
                }
                Ok(open)
            })
            .join()
    });
    lab_thread.map_err(|_| anyhow::anyhow!("the intruders' thread panicked"))?
}

/// Waits for the side that runs the guest after the failure: the secondary
/// when it resumes; the primary when it goes on alone (with a witness: once
/// the witness records it `solo`; without: once it reports the secondary
/// lost). Returns which, the line that said so, and when.
fn first_survivor(
    primary: &mut Process,
    secondary: &mut Process,
    options: &DrillOptions,
    timeout: Duration,
) -> Option<(Survivor, serde_json::Value, Instant)> {
    let deadline = Instant::now() + timeout;
    let primary_alone = |line: &serde_json::Value| {
        if options.witness {
            line["event"] == "witness" && line["state"] == "solo"
        } else {
            line["event"] == "secondary_lost"
        }
    };
    while Instant::now() < deadline {
        if let Some((line, at)) = secondary.poll_event(|line| line["event"] == "resumed") {
            return Some((Survivor::Secondary, line, at));
        }
        if let Some((line, at)) = primary.poll_event(primary_alone) {
            return Some((Survivor::Primary, line, at));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

fn failover_of(resumed: &serde_json::Value) -> Duration {
    Duration::from_secs_f64(resumed["since_last_heartbeat_ms"].as_f64().unwrap_or(0.0) / 1e3)
}

/// What the writer saw.
#[derive(Debug, Default)]
struct WriterLog {
    /// When each reply arrived.
    reply_times: Vec<Instant>,
    /// Every INCR reply, in order.
    incr_replies: Vec<i64>,
    sets_acked: u64,
    lost_writes: u64,
    repeated_replies: u64,
    resets: u64,
    unanswered: u64,
    verified: bool,
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

    /// Records a request that failed: a reset (or a connection closed under
    /// the client), or no answer in time.
    fn failed(&mut self, error: &std::io::Error) {
        match error.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => self.unanswered += 1,
            _ => self.resets += 1,
        }
    }

    fn result(&self, failed_at: Instant) -> RoundResult {
        RoundResult {
            outage: self.longest_silence_around(failed_at),
            incr_acked: u64::try_from(self.incr_replies.len()).unwrap_or(u64::MAX),
            sets_acked: self.sets_acked,
            lost_writes: self.lost_writes,
            repeated_replies: self.repeated_replies,
            resets: self.resets,
            unanswered: self.unanswered,
            verified: self.verified,
            ..RoundResult::default()
        }
    }
}

/// A RESP client on one connection that alternates `INCR` and `SET`.
struct Writer {
    client: RespClient,
}

impl Writer {
    fn new(client: RespClient) -> Self {
        Self { client }
    }

    /// Writes until `stop`, then verifies on the same connection. A failed
    /// request ends the writing and is counted; nothing is verified then.
    fn run(mut self, stop: &AtomicBool) -> WriterLog {
        let mut log = WriterLog::default();
        let mut sets: Vec<(u64, String)> = Vec::new();
        let mut index = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let incremented = match self.client.command(&["INCR", "drill:counter"]) {
                Ok(reply) => reply,
                Err(error) => {
                    tracing::error!(%error, replies = log.reply_times.len(), "INCR failed");
                    log.failed(&error);
                    return log;
                }
            };
            log.reply_times.push(Instant::now());
            let Some(value) = incremented
                .strip_prefix(':')
                .and_then(|number| number.parse::<i64>().ok())
            else {
                tracing::error!(%incremented, "INCR answered something else than a number");
                log.repeated_replies += 1;
                return log;
            };
            if let Some(&previous) = log.incr_replies.last()
                && value != previous + 1
            {
                log.repeated_replies += 1;
            }
            log.incr_replies.push(value);
            index += 1;
            let key = format!("drill:key:{index}");
            let value = format!("value-{index}-{value}");
            match self.client.command(&["SET", &key, &value]) {
                Ok(reply) if reply == "+OK" => {
                    log.reply_times.push(Instant::now());
                    log.sets_acked += 1;
                    sets.push((index, value));
                }
                Ok(reply) => {
                    tracing::error!(%reply, "SET was refused");
                    log.lost_writes += 1;
                }
                Err(error) => {
                    tracing::error!(%error, replies = log.reply_times.len(), "SET failed");
                    log.failed(&error);
                    return log;
                }
            }
        }
        if let Err(error) = self.verify(&mut log, &sets) {
            tracing::error!(%error, "the writes could not be read back");
            log.failed(&error);
            return log;
        }
        log.verified = true;
        log
    }

    /// Reads back the counter and every acknowledged `SET`.
    fn verify(&mut self, log: &mut WriterLog, sets: &[(u64, String)]) -> std::io::Result<()> {
        let counter = self.client.command(&["GET", "drill:counter"])?;
        let expected = log.incr_replies.last().copied().unwrap_or(0);
        if counter.parse::<i64>().ok() != Some(expected) {
            log.lost_writes += 1;
            tracing::error!(%counter, expected, "the counter does not match the last INCR reply");
        }
        for (index, value) in sets {
            let stored = self
                .client
                .command(&["GET", &format!("drill:key:{index}")])?;
            if &stored != value {
                log.lost_writes += 1;
                tracing::error!(index, %stored, %value, "an acknowledged SET is missing");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
