//! `understudy demo`: what Understudy is for, in one command. A `kv` guest
//! runs protected on a primary host, a client writes to it, the primary
//! host fails at a random moment, and the client's view is printed with a
//! one-line verdict. One round of [`understudy_lab::drill`], narrated.

use std::time::{Duration, Instant};

use anyhow::bail;
use understudy_lab::drill::{self, DrillEvent, DrillOptions, RoundResult};

use super::drill::{FailureArgument, this_program};
use super::{clock_seed, stop_flag};

/// Arguments of `understudy demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArguments {
    /// Seed of the failure point (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// How the primary host fails: `sigkill` (its process dies) or
    /// `isolate` (it drops off the network, silently).
    #[arg(long, value_enum, default_value_t = FailureArgument::Sigkill)]
    failure: FailureArgument,
}

/// Runs the demo.
pub fn demo(arguments: DemoArguments) -> anyhow::Result<()> {
    let stop = stop_flag()?;
    let options = DrillOptions {
        program: this_program()?,
        rounds: 1,
        epoch: Duration::from_millis(25),
        fail_after_min: Duration::from_secs(1),
        fail_after_max: Duration::from_secs(4),
        run_after: Duration::from_secs(2),
        benchmark_clients: 0,
        seed: arguments.seed.unwrap_or_else(clock_seed),
        failure: arguments.failure.into(),
        primary_arguments: Vec::new(),
        // The demo needs nothing beyond a fresh machine: no etcd.
        witness: false,
        stall: Duration::from_secs(1),
        colo: false,
        store: false,
    };
    let started = Instant::now();
    let say = |text: String| crate::say!("[{:5.1} s] {text}", started.elapsed().as_secs_f64());
    crate::say!(
        "Understudy demo (seed {}): a key-value guest on a primary host, protected by a secondary \
         host, each host a network namespace on this machine; a client writes to the guest; the \
         primary host fails at a random moment.",
        options.seed
    );
    say("building the lab: client, primary host, secondary host, one switch".to_owned());
    let results = drill::run(&options, &stop, |event| match event {
        DrillEvent::Protected { .. } => say(format!(
            "the guest runs on the primary host, checkpointed to the secondary at least every {} ms \
             (sooner when it has replies to release); the client starts INCR/SET on one connection",
            options.epoch.as_millis()
        )),
        DrillEvent::Failed { after, .. } => say(format!(
            "the primary host FAILS ({}), {:.1} s into the client's writes",
            match options.failure {
                drill::Failure::Isolate => "its network port goes dark",
                _ => "its understudy process is killed with SIGKILL",
            },
            after.as_secs_f64()
        )),
        DrillEvent::Resumed {
            epoch, failover, ..
        } => say(format!(
            "the secondary resumed the guest from checkpoint {epoch}, {:.0} ms after it last heard the primary",
            failover.as_secs_f64() * 1e3
        )),
        DrillEvent::Round { result, .. } => say(format!(
            "the client read back every write on the same connection: {} INCR and {} SET acknowledged, {} missing",
            result.incr_acked, result.sets_acked, result.lost_writes
        )),
    })?;
    let Some(result) = results.first() else {
        bail!("the demo ran no round");
    };
    crate::say!("{}", verdict(result));
    if !result.passed() {
        bail!("the guest did not survive its host unharmed");
    }
    Ok(())
}

/// The one-line verdict.
fn verdict(result: &RoundResult) -> String {
    let writes = result.incr_acked + result.sets_acked;
    if result.passed() {
        format!(
            "VERDICT: PASS: the guest outlived its host; the client waited {:.0} ms, kept its connection, and lost none of its {writes} acknowledged writes",
            result.outage.as_secs_f64() * 1e3
        )
    } else {
        format!(
            "VERDICT: FAIL: outage {:.0} ms; of {writes} acknowledged writes: {}",
            result.outage.as_secs_f64() * 1e3,
            result.findings()
        )
    }
}
