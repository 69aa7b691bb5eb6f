//! `understudy primary` and `understudy secondary`: continuous replication
//! and failover.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use serde_json::json;
use understudy_checkpoint::heartbeat::HeartbeatPolicy;
use understudy_checkpoint::witness::Witness;
use understudy_compress::CodecSpec;
use understudy_primary::colo::ColoMetrics;
use understudy_primary::output::{InputRecorder, OutputCommit};
use understudy_primary::{ColoOptions, EpochMetrics, EpochPolicy, PrimaryEvent, PrimaryOptions};
use understudy_proxy::compare::CompareConfig;
use understudy_proxy::{Limits, Metrics};
use understudy_secondary::{SecondaryEvent, SecondaryOptions};
use understudy_vm::progress::ProgressSample;
use understudy_vm::virtio_net::FrameSink;

use super::host::{ControlOptions, Reach};
use super::pair::{LeadPart, Pair, Part, UnderstudyPart, perform};
use super::{VmOptions, parse_duration, stop_flag, wait_until_running};
use crate::control::Role;

/// How a pair replicates.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The secondary stands by, paused; every epoch is a checkpoint, and
    /// output waits for its acknowledgement (Remus output commit).
    Remus,
    /// The secondary's guest runs in lockstep, fed the same input; output
    /// goes out as soon as both copies sent the same, and a checkpoint is
    /// taken only on a mismatch, a compare timeout or --colo-interval.
    Colo,
}

/// Heartbeat options shared by both sides.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct HeartbeatOptions {
    /// Send a heartbeat after this long without sending anything.
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    /// Declare the peer lost after this many silent intervals.
    #[arg(long, default_value_t = 5)]
    heartbeat_misses: u32,
    /// Declare the peer lost when it is heard but makes no progress for
    /// this long (no acknowledgement on the primary, no committed epoch on
    /// the secondary), and fail any write that makes no progress for it.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    progress_timeout: Duration,
}

impl HeartbeatOptions {
    /// The policy these options describe, checked.
    pub fn policy(self) -> anyhow::Result<HeartbeatPolicy> {
        let policy = HeartbeatPolicy {
            interval: self.heartbeat_interval,
            misses: self.heartbeat_misses,
            progress: self.progress_timeout,
        };
        policy.check()?;
        Ok(policy)
    }
}

/// The witness options of both sides.
#[derive(clap::Args, Clone, Debug)]
pub struct WitnessOptions {
    /// An etcd endpoint (`http://HOST:2379`) of the witness that decides
    /// which side may run the guest alone; repeat for each member of an
    /// etcd cluster. Without it, a partition or a stalled host can leave
    /// two copies running (the crash-stop assumption).
    #[arg(long = "witness")]
    endpoints: Vec<String>,
}

impl WitnessOptions {
    /// The witness, or none (with the warning the failure model asks for).
    pub fn witness(&self) -> Option<Witness> {
        if self.endpoints.is_empty() {
            eprintln!(
                "WARNING: no --witness: failover assumes crash-stop failures; a partition or a \
                 stalled host can leave two copies of the guest running"
            );
            return None;
        }
        Some(Witness::new(self.endpoints.clone()))
    }
}

/// Arguments of `understudy primary`. When the secondary is lost the guest
/// runs on unprotected, and the primary reconnects to `--secondary` every
/// second, protecting the guest again (a full resynchronisation) as soon as
/// a secondary answers there.
#[derive(clap::Args, Debug)]
pub struct PrimaryArguments {
    /// The secondary's address (host:port).
    #[arg(long)]
    secondary: SocketAddr,
    /// Time between checkpoints (the target: see --min-epoch and --max-pause).
    #[arg(long, default_value = "25ms", value_parser = parse_duration)]
    epoch: Duration,
    /// The shortest epoch the adaptive policy may use (default: a fifth of --epoch).
    #[arg(long, value_parser = parse_duration)]
    min_epoch: Option<Duration>,
    /// Shorten epochs while a checkpoint pauses the guest for longer than this.
    #[arg(long, default_value = "2ms", value_parser = parse_duration)]
    max_pause: Duration,
    /// While the guest is idle (checkpoints of at most 64 dirty pages), let
    /// epochs double up to this long; the first busier checkpoint brings
    /// them back (0ms: never stretch). Guests with a network (--tap) never
    /// stretch for now.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    idle_epoch: Duration,
    /// With a network: take the checkpoint early once the guest has sent
    /// output and at least this long has passed since the last one, so a
    /// reply waits about this long instead of a whole epoch (0ms: off, the
    /// Remus behaviour: output waits for the epoch's end).
    #[arg(long, default_value = "2ms", value_parser = parse_duration)]
    output_epoch: Duration,
    /// Page codec (see `understudy bench compress --help`).
    #[arg(long, default_value = "delta+zstd:level=1")]
    codec: CodecSpec,
    /// Remus (checkpoint every epoch, output held until acknowledged) or
    /// COLO (the secondary's guest runs too; output released when both
    /// copies agree). The secondary must run the same mode.
    #[arg(long, value_enum, default_value_t = Mode::Remus)]
    mode: Mode,
    /// COLO: a frame the secondary has not matched after this long forces
    /// a checkpoint.
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    colo_timeout: Duration,
    /// COLO: a checkpoint at least this often, even when all output
    /// matched (bounds how far the copies drift in state not yet seen in
    /// output).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    colo_interval: Duration,
    /// Compute the memory hash at every checkpoint and have the secondary check it.
    #[arg(long)]
    verify: bool,
    /// Most pre-copy rounds before the initial synchronisation's final pause.
    #[arg(long, default_value_t = 5)]
    precopy_rounds: u32,
    /// Stop after this long (default: until Ctrl-C).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Where this host waits as the secondary after a planned switchover
    /// (`ctl switchover`), reachable from the secondary's host; without it
    /// there is no switchover.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Print events as JSON lines.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    heartbeat: HeartbeatOptions,
    #[command(flatten)]
    witness: WitnessOptions,
    #[command(flatten)]
    channel: super::ChannelOptions,
    #[command(flatten)]
    control: ControlOptions,
    #[command(flatten)]
    vm: VmOptions,
}

/// Arguments of `understudy secondary`.
#[derive(clap::Args, Debug)]
pub struct SecondaryArguments {
    /// Where to listen for a primary (host:port). Repeat to protect several
    /// primaries at once, one per address, each with its own connection,
    /// backup (a store of its own with --store) and failover (then without
    /// --tap, switchover or a control API per guest).
    #[arg(long, required = true)]
    listen: Vec<SocketAddr>,
    #[command(flatten)]
    heartbeat: HeartbeatOptions,
    /// Hash the backup memory before resuming it, and report the hash.
    #[arg(long)]
    verify: bool,
    /// The tap a resumed guest's network interface uses (on takeover the
    /// guest's address is announced there with a gratuitous ARP).
    #[arg(long)]
    tap: Option<String>,
    /// Fault injection: wait this long before acknowledging each epoch after
    /// the initial synchronisation (a slow secondary; shows output commit
    /// holding the guest's replies, and the primary's progress deadline).
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    ack_delay: Duration,
    /// After a failover, run the guest this long (default: until Ctrl-C).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Print events as JSON lines.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    witness: WitnessOptions,
    /// Where a takeover that fails saves the guest's last committed
    /// checkpoint (a snapshot file for `understudy restore`).
    #[arg(long, default_value = ".")]
    rescue_dir: std::path::PathBuf,
    /// Which primaries to serve: Remus (the guest waits here, paused) or
    /// COLO (it runs here in lockstep and holds its memory twice).
    #[arg(long, value_enum, default_value_t = Mode::Remus)]
    mode: Mode,
    /// A post-copy whose connection breaks: how long the guest runs on
    /// here (waiting on pages it lacks) for its source to resume it, before
    /// it is stopped. Longer than the source's own window.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    postcopy_recovery: Duration,
    /// Keep each protected guest's memory in a store under this directory
    /// (one per VM id: an image updated in place and the last two epochs,
    /// each durable before it is acknowledged) instead of in this
    /// process's memory; a takeover runs the guest at once, its pages read
    /// from the store on demand and prefetched behind.
    #[arg(long)]
    store: Option<std::path::PathBuf>,
    #[command(flatten)]
    channel: super::ChannelOptions,
    #[command(flatten)]
    control: ControlOptions,
}

pub(crate) fn vcpus_json(sample: &ProgressSample) -> serde_json::Value {
    json!(
        sample
            .vcpus
            .iter()
            .map(|status| json!({"counter": status.counter, "counter_hash": status.counter_hash}))
            .collect::<Vec<_>>()
    )
}

/// A duration in microseconds, for JSON.
fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

/// What an epoch holds, printed before any of it is sent.
fn print_checkpoint(metrics: &EpochMetrics, as_json: bool) {
    if as_json {
        crate::say!(
            "{}",
            json!({
                "event": "checkpoint",
                "epoch": metrics.epoch,
                "pause_us": metrics.pause.as_secs_f64() * 1e6,
                "phases_us": {
                    "stop": micros(metrics.phases.stop),
                    "harvest": micros(metrics.phases.harvest),
                    "copy": micros(metrics.phases.copy),
                    "state": micros(metrics.phases.state),
                    "other": micros(metrics.phases.other),
                    "resume": micros(metrics.phases.resume),
                },
                "dirty_pages": metrics.dirty_pages,
                "free_pages_skipped": metrics.free_pages,
                "memory_hash": metrics.memory_hash,
                "cause": metrics.cause,
                "vcpus": vcpus_json(&metrics.progress),
            })
        );
    }
}

pub(crate) fn print_primary_event(event: &PrimaryEvent, as_json: bool, secondary: SocketAddr) {
    match event {
        PrimaryEvent::Checkpointed(metrics) => print_checkpoint(metrics, as_json),
        PrimaryEvent::Synchronised {
            rounds,
            pages,
            pause,
            total,
        } => {
            if as_json {
                crate::say!(
                    "{}",
                    json!({"event": "synchronised", "rounds": rounds, "pages": pages,
                           "pause_us": pause.as_secs_f64() * 1e6, "total_ms": total.as_secs_f64() * 1e3})
                );
            } else {
                crate::say!(
                    "synchronised: {pages} pages in {rounds} pre-copy round(s), {:.0} ms, final pause {:.0} µs",
                    total.as_secs_f64() * 1e3,
                    pause.as_secs_f64() * 1e6
                );
            }
        }
        PrimaryEvent::Sent(metrics) => {
            if as_json {
                crate::say!(
                    "{}",
                    json!({
                        "event": "epoch",
                        "epoch": metrics.epoch,
                        "epoch_ms": metrics.epoch_length.as_secs_f64() * 1e3,
                        "pause_us": metrics.pause.as_secs_f64() * 1e6,
                        "dirty_pages": metrics.dirty_pages,
                        "raw_bytes": metrics.raw_bytes,
                        "wire_bytes": metrics.wire_bytes,
                        "encode_us": metrics.encode.as_secs_f64() * 1e6,
                        "send_us": metrics.send.as_secs_f64() * 1e6,
                    })
                );
            }
        }
        PrimaryEvent::Acknowledged { epoch, latency } => {
            if as_json {
                crate::say!(
                    "{}",
                    json!({"event": "ack", "epoch": epoch, "ack_us": latency.as_secs_f64() * 1e6})
                );
            }
        }
        PrimaryEvent::Witness { state, generation } => {
            if as_json {
                crate::say!(
                    "{}",
                    json!({"event": "witness", "state": state, "generation": generation})
                );
            } else {
                crate::say!("witness: {state}, generation {generation}");
            }
        }
        PrimaryEvent::WitnessWaiting { reason } => {
            eprintln!("WAITING for the witness ({reason}); held output stays held");
            if as_json {
                crate::say!("{}", json!({"event": "witness_waiting", "reason": reason}));
            }
        }
        PrimaryEvent::SecondaryLost { reason } => {
            eprintln!(
                "WARNING: the secondary was lost ({reason}); the guest keeps running UNPROTECTED; \
                 trying {secondary} again every second"
            );
            if as_json {
                crate::say!("{}", json!({"event": "secondary_lost", "reason": reason}));
            }
        }
    }
}

/// Runs a protected VM.
pub fn primary(arguments: PrimaryArguments) -> anyhow::Result<()> {
    let stop = stop_flag()?;
    let mut gate = None;
    let mut opened_tap = None;
    if arguments.colo_timeout.is_zero() || arguments.colo_interval.is_zero() {
        bail!("--colo-timeout and --colo-interval must be longer than 0");
    }
    let colo = arguments.mode == Mode::Colo;
    let compare = CompareConfig {
        timeout: arguments.colo_timeout,
        ..CompareConfig::default()
    };
    let mut vm = arguments.vm.boot_with_output(|tap| {
        opened_tap = Some(tap.clone());
        let commit = Arc::new(if colo {
            OutputCommit::colo(tap, compare)
        } else {
            OutputCommit::new(tap, Limits::default())
        });
        gate = Some(commit.clone());
        let recorder: Arc<dyn FrameSink> = Arc::new(InputRecorder(commit.clone()));
        (commit as Arc<dyn FrameSink>, Some(recorder))
    })?;
    vm.resume()?;
    wait_until_running(&vm, Duration::from_secs(10))?;
    let host = arguments.control.start(Role::Primary, stop.clone())?;
    let primary = PrimaryOptions {
        secondary: arguments.secondary,
        epoch: EpochPolicy {
            target: arguments.epoch,
            min: arguments
                .min_epoch
                .unwrap_or(arguments.epoch / 5)
                .max(Duration::from_millis(1)),
            max_pause: arguments.max_pause,
            idle: arguments.idle_epoch,
        },
        codec: arguments.codec,
        heartbeat: arguments.heartbeat.policy()?,
        verify: arguments.verify,
        precopy_rounds: arguments.precopy_rounds.max(1),
        max_bandwidth: None,
        security: arguments.channel.security()?,
    };
    if arguments.json {
        crate::say!(
            "{}",
            json!({"event": "policy", "epoch_ms": arguments.epoch.as_secs_f64() * 1e3,
                   "min_epoch_ms": primary.epoch.min.as_secs_f64() * 1e3,
                   "max_pause_us": primary.epoch.max_pause.as_secs_f64() * 1e6,
                   "idle_epoch_ms": primary.epoch.idle.as_secs_f64() * 1e3,
                   "codec": primary.codec.to_string()})
        );
    } else {
        crate::say!(
            "protecting with {} and codec {}",
            primary.epoch,
            primary.codec
        );
    }
    let witness = arguments.witness.witness();
    let owner = super::new_vm_id();
    let understudy = arguments.listen.map(|listen| SecondaryOptions {
        listen,
        heartbeat: primary.heartbeat,
        verify: arguments.verify,
        tap: None,
        ack_delay: Duration::ZERO,
        witness: witness.clone(),
        instance: owner,
        security: primary.security.clone(),
        rescue_dir: std::path::PathBuf::from("."),
        colo,
        postcopy_recovery: Duration::from_secs(60),
        store: None,
    });
    let reach = Reach {
        security: Some(primary.security.clone()),
        heartbeat: primary.heartbeat,
    };
    let pair = Pair {
        primary,
        witness,
        owner,
        output_epoch: arguments.output_epoch,
        lead_duration: arguments.duration,
        colo: colo.then_some(ColoOptions {
            interval: arguments.colo_interval,
        }),
        understudy,
        tap: opened_tap,
        standalone_duration: None,
        json: arguments.json,
        reach,
    };
    let lead = LeadPart {
        vm,
        vm_id: super::new_vm_id(),
        secondary: arguments.secondary,
        base_image: 0,
        gate,
    };
    perform(&pair, &host, &stop, Part::Lead(lead))
}

/// What COLO's compare proxy did.
pub(crate) fn print_colo(metrics: &ColoMetrics, as_json: bool) {
    let compare = &metrics.compare;
    let mismatches: std::collections::BTreeMap<&str, u64> = compare
        .checkpoints
        .iter()
        .map(|(cause, count)| (cause.name(), *count))
        .collect();
    if as_json {
        crate::say!(
            "{}",
            json!({"event": "colo", "compared": compare.compared, "matched": compare.matched,
                   "passed": compare.passed, "dropped": compare.dropped,
                   "checkpoints_asked": mismatches, "checkpoints": metrics.checkpoints,
                   "released_by_checkpoint": metrics.released_by_checkpoint,
                   "stale_secondary_frames": metrics.stale_secondary_frames,
                   "waiting_dropped": metrics.waiting_dropped,
                   "compare_latency_us_log2": compare.latency_micros_log2})
        );
    } else {
        crate::say!(
            "colo: {} frames compared, {} matched, {} passed (ACKs), {} released by a checkpoint; checkpoints {:?}",
            compare.compared,
            compare.matched,
            compare.passed,
            metrics.released_by_checkpoint,
            metrics.checkpoints
        );
    }
}

/// What output commit did: frames released and how long they were held.
pub(crate) fn print_output_commit(metrics: &Metrics, as_json: bool) {
    let quantile = |q| metrics.held_quantile(q).map(|d| d.as_secs_f64() * 1e3);
    if as_json {
        crate::say!(
            "{}",
            json!({"event": "output_commit", "frames_released": metrics.frames_released,
                   "frames_dropped": metrics.frames_dropped, "frames_held": metrics.frames_held,
                   "held_p50_ms_at_most": quantile(0.5), "held_p99_ms_at_most": quantile(0.99)})
        );
    } else {
        crate::say!(
            "output commit: {} frames released, {} dropped; held p50 <= {:.1} ms, p99 <= {:.1} ms",
            metrics.frames_released,
            metrics.frames_dropped,
            quantile(0.5).unwrap_or(0.0),
            quantile(0.99).unwrap_or(0.0)
        );
    }
}

/// Waits for a primary, and takes over its guest when it is lost (or
/// leads, after a planned switchover).
pub fn secondary(arguments: SecondaryArguments) -> anyhow::Result<()> {
    let stop = stop_flag()?;
    let witness = arguments.witness.witness();
    let instance = super::new_vm_id();
    let options = SecondaryOptions {
        listen: arguments.listen[0],
        heartbeat: arguments.heartbeat.policy()?,
        verify: arguments.verify,
        tap: None,
        ack_delay: arguments.ack_delay,
        witness: witness.clone(),
        instance,
        security: arguments.channel.security()?,
        rescue_dir: arguments.rescue_dir.clone(),
        colo: arguments.mode == Mode::Colo,
        postcopy_recovery: arguments.postcopy_recovery,
        store: arguments.store.clone(),
    };
    if let Some(root) = &arguments.store {
        understudy_secondary::store::return_large_buffers();
        report_stores(root, arguments.json);
    }
    if arguments.listen.len() > 1 {
        return protect_several(&arguments, &options, &stop);
    }
    // Opened once: the guest's network device holds it whichever part
    // this process plays.
    let tap = arguments.tap.as_deref().map(super::open_tap).transpose()?;
    let host = arguments.control.start(Role::Secondary, stop.clone())?;
    let reach = Reach {
        security: Some(options.security.clone()),
        heartbeat: options.heartbeat,
    };
    // After a planned switchover this process leads, with the defaults of
    // `understudy primary`.
    let primary = PrimaryOptions {
        secondary: arguments.listen[0],
        epoch: EpochPolicy {
            target: Duration::from_millis(25),
            min: Duration::from_millis(5),
            max_pause: Duration::from_millis(2),
            idle: Duration::from_secs(1),
        },
        codec: "delta+zstd:level=1".parse()?,
        heartbeat: options.heartbeat,
        verify: arguments.verify,
        precopy_rounds: 5,
        max_bandwidth: None,
        security: options.security.clone(),
    };
    let pair = Pair {
        primary,
        witness,
        owner: instance,
        output_epoch: Duration::from_millis(2),
        lead_duration: None,
        colo: None,
        understudy: Some(options),
        tap,
        standalone_duration: arguments.duration,
        json: arguments.json,
        reach,
    };
    perform(
        &pair,
        &host,
        &stop,
        Part::Understudy(UnderstudyPart::default()),
    )
}

/// Several primaries at once, one per `--listen` address: a serving loop
/// each, on a thread of its own; a primary lost is taken over alone (its
/// guest then runs on that thread, the others are still protected).
fn protect_several(
    arguments: &SecondaryArguments,
    options: &SecondaryOptions,
    stop: &Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<()> {
    if arguments.tap.is_some() {
        bail!("--tap names one guest's network: with several --listen, guests run without one");
    }
    let as_json = arguments.json;
    std::thread::scope(|scope| {
        let mut served = Vec::new();
        for listen in &arguments.listen {
            let options = SecondaryOptions {
                listen: *listen,
                ..options.clone()
            };
            served.push(scope.spawn(move || -> anyhow::Result<()> {
                let failover = understudy_secondary::serve(options, stop, |event| {
                    print_secondary_event(event, as_json);
                })?;
                let Some(failover) = failover else {
                    return Ok(());
                };
                if as_json {
                    crate::say!(
                        "{}",
                        json!({"event": "resumed", "listen": listen.to_string(),
                               "vm_id": format!("{:016x}", failover.vm_id),
                               "epoch": failover.epoch, "memory_hash": failover.memory_hash,
                               "reason": failover.reason,
                               "vcpus": vcpus_json(&failover.progress)})
                    );
                } else {
                    crate::say!(
                        "PRIMARY LOST on {listen} ({}): resumed VM {:016x} from epoch {}",
                        failover.reason,
                        failover.vm_id,
                        failover.epoch
                    );
                }
                let mut vm = failover.vm;
                wait_until_running(&vm, Duration::from_secs(10))?;
                let watch = understudy_vm::progress::WatchOptions {
                    duration: arguments.duration,
                    harvest_interval: Duration::from_secs(1),
                };
                understudy_vm::progress::watch(&vm, watch, stop, |_| {})?;
                vm.pause()?;
                if as_json {
                    crate::say!(
                        "{}",
                        json!({"event": "stopped", "listen": listen.to_string(),
                               "vcpus": vcpus_json(&ProgressSample::read(&vm)?)})
                    );
                }
                vm.shutdown();
                Ok(())
            }));
        }
        served
            .into_iter()
            .map(|thread| {
                thread
                    .join()
                    .map_err(|_| anyhow::anyhow!("a serving thread panicked"))?
            })
            .collect::<anyhow::Result<Vec<()>>>()
            .map(|_| ())
    })
}

/// Says what the stores under `root` hold (a restarted storage-backed
/// secondary): each VM's last committed epoch, which `understudy restore
/// DIR` runs. A primary of that VM that connects again is synchronised
/// whole (its store starts afresh).
fn report_stores(root: &std::path::Path, as_json: bool) {
    for (path, found) in understudy_secondary::store::Store::find_all(root) {
        match found {
            Ok(recovered) => {
                if as_json {
                    crate::say!(
                        "{}",
                        json!({"event": "store_found", "path": path, "vm_id": format!("{:016x}", recovered.vm_id),
                               "epoch": recovered.epoch, "memory_bytes": recovered.memory_bytes})
                    );
                } else {
                    crate::say!(
                        "store {}: VM {:016x}, epoch {} committed ({} MiB); `understudy restore {}` runs it; its primary, if it returns, is synchronised whole",
                        path.display(),
                        recovered.vm_id,
                        recovered.epoch,
                        recovered.memory_bytes >> 20,
                        path.display()
                    );
                }
            }
            Err(error) => eprintln!(
                "WARNING: the store {} cannot be read: {:#}",
                path.display(),
                anyhow::Error::new(error)
            ),
        }
    }
}

/// Prints what a secondary reports.
pub(crate) fn print_secondary_event(event: &SecondaryEvent, as_json: bool) {
    match event {
        SecondaryEvent::Listening { address } => {
            if as_json {
                crate::say!(
                    "{}",
                    json!({"event": "listening", "address": address.to_string()})
                );
            } else {
                crate::say!("waiting for a primary on {address}");
            }
        }
        SecondaryEvent::Connected { peer, hello } => {
            if as_json {
                crate::say!(
                    "{}",
                    json!({"event": "connected", "peer": peer.to_string(),
                           "memory_bytes": hello.memory_bytes, "vcpus": hello.vcpus,
                           "base_image": hello.base_image != 0})
                );
            } else {
                crate::say!(
                    "primary {peer} connected: {} MiB, {} vCPU(s)",
                    hello.memory_bytes >> 20,
                    hello.vcpus
                );
            }
        }
        SecondaryEvent::Committed {
            epoch,
            pages,
            receive,
        } => {
            if as_json {
                crate::say!(
                    "{}",
                    json!({"event": "committed", "epoch": epoch, "pages": pages,
                           "receive_us": receive.as_secs_f64() * 1e6})
                );
            }
        }
        SecondaryEvent::PostcopyComplete(done) => {
            if as_json {
                crate::say!(
                    "{}",
                    json!({"event": "postcopy_complete", "pages": done.pages,
                           "faults": done.faults, "zero_page_faults": done.zero_pages,
                           "fault_p50_us_at_most": done.fault_p50_us,
                           "fault_p99_us_at_most": done.fault_p99_us,
                           "reconnections": done.reconnections,
                           "verified_pages": done.verified_pages,
                           "written_here": done.written_here})
                );
            } else {
                crate::say!(
                    "post-copy complete: {} pages arrived, {} faults (p99 <= {} us), {} reconnection(s){}",
                    done.pages,
                    done.faults,
                    done.fault_p99_us.unwrap_or(0),
                    done.reconnections,
                    done.verified_pages.map_or_else(String::new, |pages| format!(
                        ", {pages} pages verified equal to the source's ({} written here meanwhile)",
                        done.written_here
                    ))
                );
            }
        }
        SecondaryEvent::WitnessWaiting { reason } => {
            eprintln!(
                "WAITING for the witness before taking over ({reason}); the guest stays paused"
            );
            if as_json {
                crate::say!("{}", json!({"event": "witness_waiting", "reason": reason}));
            }
        }
        SecondaryEvent::Disconnected { reason } => {
            if as_json {
                crate::say!("{}", json!({"event": "disconnected", "reason": reason}));
            } else {
                crate::say!("primary disconnected: {reason}");
            }
        }
    }
}
