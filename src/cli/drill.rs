//! `understudy drill`: arguments and printing; the drill itself is
//! [`understudy_lab::drill`].

use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;
use understudy_lab::drill::{
    self, DrillEvent, DrillOptions, DrillSummary, Failure, RoundResult, Survivor,
};

use super::replicate::Mode;
use super::{clock_seed, parse_duration, stop_flag};

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
    /// What fails: `sigkill` (the primary process dies; its connections
    /// close at once), `isolate` (the primary host drops off the network;
    /// the secondary notices only when heartbeats stop), `partition` (only
    /// the replication link between the hosts fails), `stall-primary` or
    /// `stall-secondary` (SIGSTOP for --stall, then SIGCONT), `witness-down`
    /// (the witness dies, then the primary; the witness returns after
    /// --stall: nobody may take over meanwhile).
    #[arg(long, value_enum, default_value_t = FailureArgument::Sigkill)]
    failure: FailureArgument,
    /// How long a stalled process stays stopped.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    stall: Duration,
    /// Run without a witness (the crash-stop assumption: partitions and
    /// stalls can leave two copies, which the drill then reports).
    #[arg(long)]
    no_witness: bool,
    /// How the pair replicates: `remus` (the secondary waits, paused) or
    /// `colo` (its guest runs in lockstep and runs on after a failover).
    #[arg(long, value_enum, default_value_t = Mode::Remus)]
    mode: Mode,
    /// A storage-backed secondary (`--store` in the lab's directory).
    #[arg(long)]
    store: bool,
    /// Extra arguments for the primary (e.g. --primary-arg=--output-epoch=0ms).
    #[arg(long = "primary-arg", allow_hyphen_values = true)]
    primary_args: Vec<String>,
}

/// How the primary fails in a drill.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureArgument {
    /// SIGKILL the primary process.
    Sigkill,
    /// Take the primary host's switch port down.
    Isolate,
    /// Cut the replication link only.
    Partition,
    /// SIGSTOP the primary, then SIGCONT.
    StallPrimary,
    /// SIGSTOP the secondary, then SIGCONT.
    StallSecondary,
    /// Kill the witness, then the primary; the witness returns after --stall.
    WitnessDown,
    /// Intruders without the key besiege the secondary, then SIGKILL the primary.
    Impostor,
    /// No failure: a planned switchover (`ctl switchover`), and one back
    /// after half the run.
    Switchover,
}

impl From<FailureArgument> for Failure {
    fn from(argument: FailureArgument) -> Self {
        match argument {
            FailureArgument::Sigkill => Failure::Sigkill,
            FailureArgument::Isolate => Failure::Isolate,
            FailureArgument::Partition => Failure::Partition,
            FailureArgument::StallPrimary => Failure::StallPrimary,
            FailureArgument::StallSecondary => Failure::StallSecondary,
            FailureArgument::WitnessDown => Failure::WitnessDown,
            FailureArgument::Impostor => Failure::Impostor,
            FailureArgument::Switchover => Failure::Switchover,
        }
    }
}

/// The `understudy` binary, for the lab's hosts to run.
pub fn this_program() -> anyhow::Result<String> {
    let program = std::env::current_exe().context("cannot find the understudy binary")?;
    Ok(program.to_string_lossy().into_owned())
}

/// Runs the drill.
pub fn drill(arguments: DrillArguments) -> anyhow::Result<()> {
    let stop = stop_flag()?;
    let options = DrillOptions {
        program: this_program()?,
        rounds: arguments.rounds,
        epoch: arguments.epoch,
        fail_after_min: arguments.kill_after_min,
        fail_after_max: arguments.kill_after_max,
        run_after: arguments.run_after,
        benchmark_clients: arguments.benchmark_clients,
        seed: arguments.seed.unwrap_or_else(clock_seed),
        failure: arguments.failure.into(),
        primary_arguments: arguments.primary_args.clone(),
        witness: !arguments.no_witness,
        stall: arguments.stall,
        colo: arguments.mode == Mode::Colo,
        store: arguments.store,
    };
    if arguments.json {
        crate::say!(
            "{}",
            json!({"event": "drill", "rounds": options.rounds, "seed": options.seed,
                   "failure": options.failure.name()})
        );
    } else {
        crate::say!(
            "failover drill: {} round(s), failure {}, seed {}",
            options.rounds,
            options.failure.name(),
            options.seed
        );
    }
    let results = drill::run(&options, &stop, |event| {
        if let DrillEvent::Round { round, result } = event {
            report_round(round, result, arguments.json);
        }
    })?;
    let summary = DrillSummary::of(&results);
    report_summary(&summary, arguments.json);
    if summary.failed > 0 {
        bail!(
            "{} of {} drill round(s) failed",
            summary.failed,
            summary.rounds
        );
    }
    Ok(())
}

fn report_round(round: u32, result: &RoundResult, as_json: bool) {
    if as_json {
        crate::say!(
            "{}",
            json!({
                "event": "round", "round": round, "passed": result.passed(),
                "outage_ms": result.outage.as_secs_f64() * 1e3,
                "failover_ms": result.failover.as_secs_f64() * 1e3,
                "kill_after_ms": result.fail_after.as_secs_f64() * 1e3,
                "incr_acked": result.incr_acked, "sets_acked": result.sets_acked,
                "lost_writes": result.lost_writes, "repeated_replies": result.repeated_replies,
                "resets": result.resets, "unanswered": result.unanswered,
                "verified": result.verified, "benchmark_failure": result.benchmark_failure,
                "survivor": result.survivor.map(survivor_name),
                "loser_frames": result.loser_frames,
                "switchover_pages": result.switchover_pages,
                "switched_back": result.switched_back,
            })
        );
    } else {
        crate::say!(
            "round {round}: {} — failure {:.0} ms in; the {} ran the guest after it ({} frames from the other copy); guest resumed {:.1} ms after the last heartbeat; client outage {:.0} ms; {} INCR and {} SET acknowledged, {}{}",
            if result.passed() { "PASS" } else { "FAIL" },
            result.fail_after.as_secs_f64() * 1e3,
            result.survivor.map_or("nobody", survivor_name),
            result.loser_frames,
            result.failover.as_secs_f64() * 1e3,
            result.outage.as_secs_f64() * 1e3,
            result.incr_acked,
            result.sets_acked,
            result.findings(),
            result
                .benchmark_failure
                .as_ref()
                .map_or(String::new(), |failure| format!(
                    "; redis-benchmark: {failure}"
                )),
        );
        if !result.switchover_pages.is_empty() {
            crate::say!(
                "  switchovers: reverse protection synchronised {:?} pages; back home: {}",
                result.switchover_pages,
                result.switched_back
            );
        }
    }
}

fn survivor_name(survivor: Survivor) -> &'static str {
    match survivor {
        Survivor::Primary => "primary",
        Survivor::Secondary => "secondary",
    }
}

fn report_summary(summary: &DrillSummary, as_json: bool) {
    if as_json {
        crate::say!(
            "{}",
            json!({"event": "summary", "rounds": summary.rounds, "failed": summary.failed,
                   "outage_median_ms": summary.outage_median.as_secs_f64() * 1e3,
                   "outage_worst_ms": summary.outage_worst.as_secs_f64() * 1e3,
                   "lost_writes": summary.lost_writes, "resets": summary.resets,
                   "two_copies": summary.two_copies})
        );
    } else {
        crate::say!(
            "summary: {} round(s), {} failed; client outage median {:.0} ms, worst {:.0} ms; {} acknowledged writes lost, {} connections reset, {} rounds with two copies",
            summary.rounds,
            summary.failed,
            summary.outage_median.as_secs_f64() * 1e3,
            summary.outage_worst.as_secs_f64() * 1e3,
            summary.lost_writes,
            summary.resets,
            summary.two_copies
        );
    }
}
