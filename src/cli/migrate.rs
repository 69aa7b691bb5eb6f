//! `understudy migrate`: run a guest, then live-migrate it to a target
//! (`understudy secondary`), which resumes it.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use understudy_compress::CodecSpec;
use understudy_primary::migrate::{MigrationMode, MigrationOptions, NoConvergence, Round, migrate};
use understudy_primary::{EpochPolicy, PrimaryOptions};
use understudy_vm::PAGE_SIZE;
use understudy_vm::workload::parse_rate;

use super::host::{Guest, Reach, StandaloneOptions, standalone};
use super::replicate::HeartbeatOptions;
use super::{VmOptions, check_events, parse_duration, wait_until_running};
use crate::control::Role;
use understudy_primary::migrate::MigrationError;

/// Arguments of `understudy migrate`.
#[derive(clap::Args, Debug)]
pub struct MigrateArguments {
    /// The target's address (an `understudy secondary`).
    #[arg(long)]
    to: SocketAddr,
    /// Let the guest run this long before migrating.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    after: Duration,
    /// Switch over once the estimated downtime is under this.
    #[arg(long, default_value = "30ms", value_parser = parse_duration)]
    max_downtime: Duration,
    /// Most bytes per second on the wire (e.g. 100MB/s); default: unlimited.
    #[arg(long, value_parser = parse_bandwidth)]
    max_bandwidth: Option<u64>,
    /// Give up after this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    deadline: Duration,
    /// When the guest dirties memory faster than the link carries it: keep
    /// trying until the deadline (wait), slow the guest down (throttle), or
    /// give up at once (abort).
    #[arg(long, default_value = "throttle", value_parser = parse_policy)]
    on_no_convergence: NoConvergence,
    /// Page codec.
    #[arg(long, default_value = "delta+zstd:level=1")]
    codec: CodecSpec,
    /// precopy: copy memory while the guest runs here, then stop it
    /// briefly; postcopy: stop it here at once and run it there while its
    /// memory follows (pages it touches first); hybrid: pre-copy rounds
    /// while they shrink what is left, then post-copy for the rest. During
    /// a post-copy the guest lives on both hosts: losing either loses it.
    #[arg(long, value_enum, default_value_t = ModeArgument::Precopy)]
    mode: ModeArgument,
    /// Post-copy and hybrid: when the connection breaks, keep reconnecting
    /// this long to resume it (the target keeps the guest running); 0 gives
    /// up at once. Either way this side keeps its paused copy until the
    /// target holds every page, and saves it if the migration fails.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    postcopy_recovery: Duration,
    /// Post-copy and hybrid: send the hash of every page, and have the
    /// target check each page the guest did not write there meanwhile
    /// before it acknowledges (costs a pass over memory on both sides).
    #[arg(long)]
    verify: bool,
    /// Pre-copy: after the guest left, keep its memory here this long
    /// (with --listen) so that migrating it back sends only the pages it
    /// wrote over there; the image is tagged, and a return that names
    /// another image (the guest went elsewhere since) is copied whole.
    #[arg(long, value_parser = parse_duration, requires = "listen")]
    keep_image: Option<Duration>,
    /// With --keep-image: where to listen for the guest's return.
    #[arg(long, requires = "keep_image")]
    listen: Option<SocketAddr>,
    /// When the migration fails and the guest runs on here (or once it came
    /// back): run it this long (default: until Ctrl-C or `ctl stop`).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Print progress and the summary as JSON lines.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    control: super::host::ControlOptions,
    #[command(flatten)]
    heartbeat: HeartbeatOptions,
    #[command(flatten)]
    channel: super::ChannelOptions,
    #[command(flatten)]
    vm: VmOptions,
}

/// `--mode` of `understudy migrate`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeArgument {
    /// Pre-copy.
    Precopy,
    /// Post-copy.
    Postcopy,
    /// Pre-copy rounds, then post-copy.
    Hybrid,
}

fn parse_bandwidth(value: &str) -> Result<u64, String> {
    match parse_rate(value) {
        Ok(0) => Err("a bandwidth limit must be more than zero".to_owned()),
        Ok(rate) => Ok(rate),
        Err(error) => Err(error.to_string()),
    }
}

fn parse_policy(value: &str) -> Result<NoConvergence, String> {
    match value {
        "wait" => Ok(NoConvergence::Wait),
        "throttle" => Ok(NoConvergence::Throttle),
        "abort" => Ok(NoConvergence::Abort),
        _ => Err(format!("'{value}': expected wait, throttle or abort")),
    }
}

fn print_round(round: &Round, as_json: bool) {
    if as_json {
        crate::say!(
            "{}",
            json!({
                "event": "round",
                "round": round.round,
                "pages": round.pages,
                "pages_left": round.pages_left,
                "mb_per_s": round.bytes_per_second / 1e6,
                "estimated_downtime_ms": round.estimated_downtime.as_secs_f64() * 1e3,
                "throttle": round.throttle,
            })
        );
    } else {
        // A progress line per round: a bar of what this round sent against
        // what is left, how fast, what stopping now would cost.
        let done = round.pages as f64 / (round.pages + round.pages_left).max(1) as f64;
        // Of 21 positions: 0 to 20 cells filled.
        let filled = understudy_bench::nearest_rank(21, done);
        crate::say!(
            "[{}{}] round {:3}: sent {:8} pages, {:8} left, {:8.1} MB/s, estimated downtime {:8.1} ms{}",
            "#".repeat(filled),
            "-".repeat(20 - filled.min(20)),
            round.round,
            round.pages,
            round.pages_left,
            round.bytes_per_second / 1e6,
            round.estimated_downtime.as_secs_f64() * 1e3,
            if round.throttle > 0.0 {
                format!(", guest throttled {:.0} %", round.throttle * 100.0)
            } else {
                String::new()
            }
        );
    }
}

/// Runs the guest, migrates it, and reports.
pub fn run_migration(arguments: MigrateArguments) -> anyhow::Result<()> {
    let stop = super::stop_flag()?;
    let host = arguments.control.start(Role::Standalone, stop)?;
    let mut vm = arguments.vm.boot()?;
    vm.resume()?;
    wait_until_running(&vm, Duration::from_secs(10))?;
    std::thread::sleep(arguments.after);
    check_events(&vm)?;
    if arguments.mode != ModeArgument::Precopy {
        eprintln!(
            "post-copy: from the switchover until every page has arrived, the guest needs both hosts \
             (losing either loses it); this process keeps the paused copy until then, and a broken \
             connection is resumed for up to {:?}",
            arguments.postcopy_recovery
        );
    }
    let options = MigrationOptions {
        mode: match arguments.mode {
            ModeArgument::Precopy => MigrationMode::Precopy,
            ModeArgument::Postcopy => MigrationMode::Postcopy,
            ModeArgument::Hybrid => MigrationMode::Hybrid,
        },
        link: PrimaryOptions {
            secondary: arguments.to,
            epoch: EpochPolicy {
                target: Duration::from_millis(25),
                min: Duration::from_millis(25),
                max_pause: Duration::from_secs(1),
                idle: Duration::ZERO,
            },
            codec: arguments.codec,
            heartbeat: arguments.heartbeat.policy()?,
            verify: arguments.verify,
            precopy_rounds: u32::MAX,
            max_bandwidth: arguments.max_bandwidth.map(|rate| rate as f64),
            security: arguments.channel.security()?,
        },
        max_downtime: arguments.max_downtime,
        deadline: arguments.deadline,
        on_no_convergence: arguments.on_no_convergence,
        postcopy_recovery: arguments.postcopy_recovery,
        keep_image: arguments.keep_image.is_some(),
        base_image: 0,
    };
    let vm_id = super::new_vm_id();
    let as_json = arguments.json;
    let reach = Reach {
        security: Some(options.link.security.clone()),
        heartbeat: options.link.heartbeat,
    };
    let summary = migrate(&mut vm, &options, vm_id, |round| {
        print_round(round, as_json)
    });
    let summary = match summary {
        Ok(summary) => summary,
        Err(
            error
            @ (MigrationError::PostcopyBroken { .. } | MigrationError::HandoverUnconfirmed(_)),
        ) if options.mode != MigrationMode::Precopy => {
            // The guest stopped here at the switchover and may be running
            // on the target, without its memory: keep this copy on disk.
            vm.pause()?;
            let path = std::path::PathBuf::from(format!("understudy-postcopy-{vm_id:x}.snap"));
            let saved = understudy_checkpoint::snapshot::write(&vm, &path);
            vm.shutdown();
            return Err(match saved {
                Ok(_) => anyhow::Error::new(error).context(format!(
                    "the post-copy did not finish; the guest as it was at the switchover is saved in {} (if the target is gone, `understudy restore {}` resumes it)",
                    path.display(),
                    path.display()
                )),
                Err(saving) => anyhow::Error::new(error).context(format!(
                    "the post-copy did not finish, and saving the guest here failed too ({saving})"
                )),
            });
        }
        Err(error @ MigrationError::HandoverUnconfirmed(_)) => {
            vm.pause()?;
            let path = std::path::PathBuf::from(format!("understudy-migration-{vm_id:x}.snap"));
            let saved = understudy_checkpoint::snapshot::write(&vm, &path);
            vm.shutdown();
            return Err(match saved {
                Ok(_) => anyhow::Error::new(error).context(format!(
                    "the guest as it was at the handover is saved in {} (if the target does not run it, `understudy restore {}` does)",
                    path.display(),
                    path.display()
                )),
                Err(saving) => anyhow::Error::new(error)
                    .context(format!("saving the guest here failed too ({saving})")),
            });
        }
        Err(error) => {
            // Never handed over: the guest runs on here.
            let message = format!("{:#}", anyhow::Error::new(error));
            eprintln!("migration failed: {message}; the guest keeps running here, unharmed");
            if as_json {
                crate::say!(
                    "{}",
                    json!({"event": "migration_failed", "reason": message, "guest": "running here"})
                );
            }
            let guest = Guest {
                vm,
                vm_id,
                source_image: None,
            };
            run_here(guest, &host, &arguments, reach)?;
            anyhow::bail!("the migration failed ({message}); the guest ran on here until stopped");
        }
    };
    let raw_bytes = summary.pages * PAGE_SIZE;
    if as_json {
        crate::say!(
            "{}",
            json!({
                "event": "migrated",
                "total_ms": summary.total.as_secs_f64() * 1e3,
                "downtime_ms": summary.downtime.as_secs_f64() * 1e3,
                "rounds": summary.rounds,
                "pages": summary.pages,
                "raw_bytes": raw_bytes,
                "wire_bytes": summary.wire_bytes,
                "throttle": summary.throttle,
                "postcopy_pages": summary.postcopy_pages,
                "requested_pages": summary.requested_pages,
                "reconnections": summary.reconnections,
            })
        );
    } else {
        crate::say!(
            "migrated in {:.0} ms: downtime {:.1} ms, {} round(s), {} pages ({:.1} MiB raw, {:.1} MiB on the wire){}",
            summary.total.as_secs_f64() * 1e3,
            summary.downtime.as_secs_f64() * 1e3,
            summary.rounds,
            summary.pages,
            raw_bytes as f64 / f64::from(1 << 20),
            summary.wire_bytes as f64 / f64::from(1 << 20),
            if summary.throttle > 0.0 {
                format!(", guest throttled up to {:.0} %", summary.throttle * 100.0)
            } else if options.mode == MigrationMode::Precopy {
                String::new()
            } else {
                format!(
                    "; post-copy: {} pages missing at the switchover, {} asked for by the target, {} reconnection(s)",
                    summary.postcopy_pages, summary.requested_pages, summary.reconnections
                )
            }
        );
    }
    if let (Some(tag), Some(keep), Some(listen)) =
        (summary.kept_image, arguments.keep_image, arguments.listen)
    {
        let guest = Guest {
            vm,
            vm_id,
            source_image: None,
        };
        if let Some(back) = super::host::await_return(guest, tag, keep, listen, &host, &reach)? {
            run_here(back, &host, &arguments, reach)?;
        }
        return Ok(());
    }
    vm.shutdown();
    Ok(())
}

/// Runs the guest here (a failed migration, a return) until stopped.
fn run_here(
    guest: Guest,
    host: &super::host::Host,
    arguments: &MigrateArguments,
    reach: Reach,
) -> anyhow::Result<()> {
    let options = StandaloneOptions {
        duration: arguments.duration,
        json: arguments.json,
        harvest_interval: Duration::from_secs(1),
        reach,
    };
    if let super::host::Ended::Stopped(mut guest) = standalone(guest, host, &options)? {
        guest.vm.pause()?;
        guest.vm.shutdown();
    }
    Ok(())
}
