//! What every long-running command shares: the control socket and the
//! metrics endpoint (`--control`, `--metrics`), and the loop of a guest
//! that runs here unprotected (`run`, a secondary after a takeover or a
//! migration arrived, a migration's source after a failed migration),
//! which `ctl migrate` can move elsewhere, and back.
//!
//! A migration away with `keep_image` leaves this process holding the
//! guest's memory (the paused VM) for a while, listening for the guest to
//! come back: a return that names the image sends only the pages written
//! over there (BFMig). The image is dropped when the time passes, when the
//! guest comes back, or when a return names another image (then the guest
//! is copied whole).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use understudy_checkpoint::channel::Security;
use understudy_checkpoint::heartbeat::HeartbeatPolicy;
use understudy_compress::CodecSpec;
use understudy_primary::migrate::{
    MigrationError, MigrationMode, MigrationOptions, MigrationSummary, NoConvergence, migrate,
};
use understudy_primary::{EpochPolicy, PrimaryOptions};
use understudy_secondary::{Extras, KeptImage, SecondaryEvent, SecondaryOptions};
use understudy_vm::Vm;

use crate::control::{Control, ControlError, Pending, Request, Role, Telemetry, duration_argument};

/// `--control` and `--metrics`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ControlOptions {
    /// Listen for control commands on this Unix socket (mode 0600; see
    /// `understudy ctl`).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
}

/// A process's control plane: its telemetry, and the socket if asked for.
pub struct Host {
    /// Status and metrics.
    pub telemetry: Arc<Telemetry>,
    /// The control socket.
    pub control: Option<Control>,
    /// Set by a queued request, `stop`, or a signal: long waits end.
    pub interrupt: Arc<AtomicBool>,
    /// Set by `stop` or a signal.
    pub stop: Arc<AtomicBool>,
}

impl ControlOptions {
    /// Opens the control socket and the metrics endpoint.
    pub fn start(&self, role: Role, stop: Arc<AtomicBool>) -> anyhow::Result<Host> {
        let telemetry = Arc::new(Telemetry::new(role));
        if let Some(address) = self.metrics {
            let bound = crate::control::telemetry::serve_metrics(address, telemetry.clone())
                .with_context(|| format!("cannot serve metrics on {address}"))?;
            tracing::info!(%bound, "metrics at /metrics");
        }
        let control = self
            .control
            .as_deref()
            .map(|path| Control::start(path, telemetry.clone(), stop.clone()))
            .transpose()?;
        let interrupt = control
            .as_ref()
            .map_or_else(|| Arc::new(AtomicBool::new(false)), Control::interrupt);
        // A signal ends long waits too, like `stop` does.
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(signal, interrupt.clone())
                .context("cannot install the Ctrl-C handler")?;
        }
        Ok(Host {
            telemetry,
            control,
            interrupt,
            stop,
        })
    }
}

impl Host {
    /// Tells subscribers.
    pub fn publish(&self, event: Value) {
        if let Some(control) = &self.control {
            control.publish(event);
        }
    }

    /// Which main-loop commands are possible now.
    pub fn accept(&self, commands: &[&'static str]) {
        if let Some(control) = &self.control {
            control.accept(commands);
        }
    }

    /// The next queued request.
    pub fn take_request(&self) -> Option<Pending> {
        let pending = self.control.as_ref().and_then(Control::take_request);
        if pending.is_none() && !self.stop.load(Ordering::Relaxed) {
            self.interrupt.store(false, Ordering::Relaxed);
        }
        pending
    }

    /// Answers a request.
    pub fn finished(&self, pending: Pending, result: Result<Value, ControlError>) {
        match &self.control {
            Some(control) => control.finished(pending, result),
            None => pending.answer(result),
        }
    }
}

/// How this process reaches other hosts (migrations, returns).
#[derive(Clone, Debug)]
pub struct Reach {
    /// Channel security, if the command configured one.
    pub security: Option<Security>,
    /// Heartbeats.
    pub heartbeat: HeartbeatPolicy,
}

/// What `ctl migrate` asks for.
#[derive(Clone, Debug)]
pub struct MigrateRequest {
    /// The target.
    pub to: SocketAddr,
    /// Pre-copy, post-copy or hybrid.
    pub mode: MigrationMode,
    /// Stop-and-copy once the estimated downtime is under this.
    pub max_downtime: Duration,
    /// Give up after this long.
    pub deadline: Duration,
    /// The page codec.
    pub codec: CodecSpec,
    /// Have the target check the memory hash.
    pub verify: bool,
    /// When pre-copy does not converge.
    pub on_no_convergence: NoConvergence,
    /// Keep the image this long after the guest left, listening on
    /// `listen` for it to come back.
    pub keep_image: Option<(Duration, SocketAddr)>,
}

impl MigrateRequest {
    /// Parses a `migrate` request's arguments.
    pub fn parse(request: &Value) -> Result<Self, ControlError> {
        let object = request
            .as_object()
            .ok_or_else(|| ControlError::new("malformed", "a request is a JSON object"))?;
        let address = |name: &str| -> Result<Option<SocketAddr>, ControlError> {
            match object.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(text)) => text.parse().map(Some).map_err(|error| {
                    ControlError::new("bad_argument", format!("{name}: {text:?}: {error}"))
                }),
                Some(other) => Err(ControlError::new(
                    "bad_argument",
                    format!("{name}: expected \"HOST:PORT\", got {other}"),
                )),
            }
        };
        let to = address("to")?.ok_or_else(|| {
            ControlError::new(
                "bad_argument",
                "migrate needs \"to\": the target's HOST:PORT",
            )
        })?;
        let mode = match object.get("mode").and_then(Value::as_str) {
            None | Some("precopy") => MigrationMode::Precopy,
            Some("postcopy") => MigrationMode::Postcopy,
            Some("hybrid") => MigrationMode::Hybrid,
            Some(other) => {
                return Err(ControlError::new(
                    "bad_argument",
                    format!("mode: {other:?}: expected precopy, postcopy or hybrid"),
                ));
            }
        };
        let codec =
            match object.get("codec").and_then(Value::as_str) {
                None => "delta+zstd:level=1".parse().map_err(
                    |error: understudy_compress::SpecError| {
                        ControlError::new("failed", error.to_string())
                    },
                )?,
                Some(text) => text
                    .parse()
                    .map_err(|error: understudy_compress::SpecError| {
                        ControlError::new("bad_argument", format!("codec: {error}"))
                    })?,
            };
        let on_no_convergence = match object.get("on_no_convergence").and_then(Value::as_str) {
            None | Some("throttle") => NoConvergence::Throttle,
            Some("wait") => NoConvergence::Wait,
            Some("abort") => NoConvergence::Abort,
            Some(other) => {
                return Err(ControlError::new(
                    "bad_argument",
                    format!("on_no_convergence: {other:?}: expected wait, throttle or abort"),
                ));
            }
        };
        let keep = duration_argument(object, "keep_image")?;
        let listen = address("listen")?;
        let keep_image = match (keep, listen) {
            (Some(keep), Some(listen)) if mode == MigrationMode::Precopy => Some((keep, listen)),
            (Some(_), Some(_)) => {
                return Err(ControlError::new(
                    "bad_argument",
                    "keep_image works with pre-copy only",
                ));
            }
            (None, None) => None,
            _ => {
                return Err(ControlError::new(
                    "bad_argument",
                    "keep_image and listen go together: how long to keep the image, and where to listen for the guest's return",
                ));
            }
        };
        Ok(Self {
            to,
            mode,
            max_downtime: duration_argument(object, "max_downtime")?
                .unwrap_or(Duration::from_millis(30)),
            deadline: duration_argument(object, "deadline")?.unwrap_or(Duration::from_secs(60)),
            codec,
            verify: object
                .get("verify")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            on_no_convergence,
            keep_image,
        })
    }
}

/// How a migration from here ended.
pub enum Departure {
    /// The guest runs on the target; this process may keep its image.
    Left(MigrationSummary),
    /// The migration failed before the handover: the guest runs here.
    Stayed(anyhow::Error),
    /// The guest stopped here and may or may not run on the target (an
    /// unconfirmed handover, a broken post-copy): it was saved to a file.
    Unsure(anyhow::Error),
}

/// Migrates the guest in `vm` (running) as `request` says.
pub fn migrate_from_here(
    vm: &mut Vm,
    request: &MigrateRequest,
    reach: &Reach,
    vm_id: u64,
    base_image: u64,
    mut on_round: impl FnMut(&understudy_primary::migrate::Round),
) -> Departure {
    let Some(security) = reach.security.clone() else {
        return Departure::Stayed(anyhow::anyhow!(
            "this process has no channel settings for migrations: start it with --key/--peer-key or --plaintext"
        ));
    };
    let options = MigrationOptions {
        mode: request.mode,
        link: PrimaryOptions {
            secondary: request.to,
            epoch: EpochPolicy {
                target: Duration::from_millis(25),
                min: Duration::from_millis(25),
                max_pause: Duration::from_secs(1),
                idle: Duration::ZERO,
            },
            codec: request.codec,
            heartbeat: reach.heartbeat,
            verify: request.verify,
            precopy_rounds: u32::MAX,
            max_bandwidth: None,
            security,
        },
        max_downtime: request.max_downtime,
        deadline: request.deadline,
        on_no_convergence: request.on_no_convergence,
        postcopy_recovery: Duration::from_secs(30),
        keep_image: request.keep_image.is_some(),
        base_image,
    };
    match migrate(vm, &options, vm_id, &mut on_round) {
        Ok(summary) => Departure::Left(summary),
        Err(
            error
            @ (MigrationError::HandoverUnconfirmed(_) | MigrationError::PostcopyBroken { .. }),
        ) => Departure::Unsure(save_paused(vm, vm_id, anyhow::Error::new(error))),
        Err(error) => Departure::Stayed(anyhow::Error::new(error)),
    }
}

/// Saves a guest that stopped here and may not run anywhere else.
fn save_paused(vm: &Vm, vm_id: u64, error: anyhow::Error) -> anyhow::Error {
    let path = PathBuf::from(format!("understudy-migration-{vm_id:x}.snap"));
    match understudy_checkpoint::snapshot::write(vm, &path) {
        Ok(_) => error.context(format!(
            "the guest is saved in {} (if the target does not run it, `understudy restore {}` does)",
            path.display(),
            path.display()
        )),
        Err(saving) => error.context(format!("saving the guest here failed too ({saving})")),
    }
}

/// The summary of a migration as JSON (the `migrate` reply and event).
pub fn summary_json(summary: &MigrationSummary) -> Value {
    json!({
        "total_ms": summary.total.as_secs_f64() * 1e3,
        "downtime_ms": summary.downtime.as_secs_f64() * 1e3,
        "rounds": summary.rounds,
        "pages": summary.pages,
        "raw_bytes": summary.pages * understudy_vm::PAGE_SIZE,
        "wire_bytes": summary.wire_bytes,
        "throttle": summary.throttle,
        "postcopy_pages": summary.postcopy_pages,
        "requested_pages": summary.requested_pages,
        "reconnections": summary.reconnections,
        "kept_image": summary.kept_image.map(|tag| format!("{tag:016x}")),
        "used_base_image": summary.used_base,
    })
}

/// A guest running here, unprotected, and where it came from.
pub struct Guest {
    /// The VM (running).
    pub vm: Vm,
    /// Its id, kept across migrations.
    pub vm_id: u64,
    /// The image the host it came from kept (its tag), if any: a return
    /// there sends only what changed here.
    pub source_image: Option<u64>,
}

/// How the standalone loop runs.
pub struct StandaloneOptions {
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Statistics as JSON.
    pub json: bool,
    /// How the dirty log is harvested for statistics.
    pub harvest_interval: Duration,
    /// How migrations reach their targets.
    pub reach: Reach,
}

/// Why the standalone loop ended.
pub enum Ended {
    /// Stopped, or its duration passed: the guest is still here, running.
    Stopped(Box<Guest>),
    /// The guest moved away (and any kept image expired or was not kept).
    Moved,
}

/// Runs the guest here, printing statistics, until stopped, its duration
/// passes, or `ctl migrate` moves it away for good.
pub fn standalone(
    mut guest: Guest,
    host: &Host,
    options: &StandaloneOptions,
) -> anyhow::Result<Ended> {
    let started = Instant::now();
    let deadline = options.duration.map(|duration| started + duration);
    loop {
        host.accept(&["migrate"]);
        host.telemetry.set_guest(
            guest.vm_id,
            guest.vm.config().memory_bytes,
            guest.vm.config().vcpus,
        );
        let left = deadline.map(|end| end.saturating_duration_since(Instant::now()));
        if left.is_some_and(|left| left.is_zero()) || host.stop.load(Ordering::Relaxed) {
            return Ok(Ended::Stopped(Box::new(guest)));
        }
        let watch = understudy_vm::progress::WatchOptions {
            duration: left,
            harvest_interval: options.harvest_interval,
        };
        understudy_vm::progress::watch(&guest.vm, watch, &host.interrupt, |stats| {
            super::print_stats(stats, options.json);
            host.telemetry
                .set_progress(&stats.counters, &stats.pages_written);
        })?;
        let Some(pending) = host.take_request() else {
            continue;
        };
        let Request::Migrate(arguments) = &pending.request else {
            host.finished(
                pending,
                Err(ControlError::new(
                    "not_supported",
                    "no secondary protects this guest: there is nothing to switch over to",
                )),
            );
            continue;
        };
        let request = match MigrateRequest::parse(arguments) {
            Ok(request) => request,
            Err(error) => {
                host.finished(pending, Err(error));
                continue;
            }
        };
        host.telemetry.set_state(
            "migrating",
            false,
            Some("a migration is under way".to_owned()),
        );
        host.publish(json!({"event": "migration_started", "to": request.to.to_string()}));
        let departure = migrate_from_here(
            &mut guest.vm,
            &request,
            &options.reach,
            guest.vm_id,
            guest.source_image.unwrap_or(0),
            |_| {},
        );
        match departure {
            Departure::Stayed(error) => {
                let message = format!("{error:#}; the guest keeps running here, unharmed");
                eprintln!("migration failed: {message}");
                host.publish(json!({"event": "migration_failed", "reason": message, "guest": "running here"}));
                host.telemetry
                    .set_state("running", false, Some("no secondary".to_owned()));
                host.finished(pending, Err(ControlError::new("failed", message)));
            }
            Departure::Unsure(error) => {
                let message = format!("{error:#}");
                host.publish(json!({"event": "migration_failed", "reason": message, "guest": "stopped here"}));
                host.finished(pending, Err(ControlError::new("failed", message.clone())));
                anyhow::bail!("{message}");
            }
            Departure::Left(summary) => {
                let reply = summary_json(&summary);
                crate::say!("{}", json!({"event": "migrated", "summary": reply}));
                host.publish(json!({"event": "migrated", "summary": reply}));
                host.finished(pending, Ok(reply));
                let (Some(tag), Some((keep, listen))) = (summary.kept_image, request.keep_image)
                else {
                    guest.vm.shutdown();
                    return Ok(Ended::Moved);
                };
                match await_return(guest, tag, keep, listen, host, &options.reach)? {
                    Some(back) => guest = back,
                    None => return Ok(Ended::Moved),
                }
            }
        }
    }
}

/// Holds the image of a guest that left, listening on `listen` for `keep`
/// for it to come back; returns it running here again, or none.
pub fn await_return(
    guest: Guest,
    tag: u64,
    keep: Duration,
    listen: SocketAddr,
    host: &Host,
    reach: &Reach,
) -> anyhow::Result<Option<Guest>> {
    let Some(security) = reach.security.clone() else {
        anyhow::bail!("no channel settings to listen for the guest's return");
    };
    host.telemetry
        .set_role(Role::Secondary, "keeping the image");
    host.telemetry.set_state(
        "keeping the image",
        false,
        Some(format!(
            "the guest left; its image is kept here for {keep:?}, listening on {listen}"
        )),
    );
    host.accept(&[]);
    let until = Instant::now() + keep;
    let kept = KeptImage {
        vm_id: guest.vm_id,
        vm: guest.vm,
        tag,
        until,
    };
    let options = SecondaryOptions {
        listen,
        heartbeat: reach.heartbeat,
        verify: false,
        tap: None,
        ack_delay: Duration::ZERO,
        witness: None,
        instance: super::new_vm_id(),
        security,
        rescue_dir: PathBuf::from("."),
        colo: false,
        postcopy_recovery: Duration::from_secs(60),
        store: None,
    };
    let returned = understudy_secondary::serve_with(
        options,
        Extras {
            kept: Some(kept),
            until: Some(until),
            net_sinks: None,
            tap: None,
        },
        &host.stop,
        |event| {
            if let SecondaryEvent::Connected { peer, hello } = event {
                crate::say!(
                    "{}",
                    json!({"event": "return_connected", "peer": peer.to_string(),
                           "builds_on_kept_image": hello.base_image == tag})
                );
            }
        },
    )?;
    let Some(failover) = returned else {
        return Ok(None);
    };
    crate::say!(
        "{}",
        json!({"event": "returned", "epoch": failover.epoch, "migrated": failover.migrated})
    );
    host.telemetry
        .took_over("the guest came back; no secondary");
    host.publish(json!({"event": "returned"}));
    Ok(Some(Guest {
        vm: failover.vm,
        vm_id: failover.vm_id,
        source_image: failover.source_image.map(|(_, tag)| tag),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_migrate_request_needs_a_target() {
        let error = MigrateRequest::parse(&json!({"command": "migrate"})).expect_err("no target");

        assert_eq!(error.code, "bad_argument");
    }

    #[test]
    fn a_kept_image_needs_a_place_to_listen() {
        let request = json!({"to": "127.0.0.1:7000", "keep_image": "1m"});

        let error = MigrateRequest::parse(&request).expect_err("no listen");

        assert_eq!(error.code, "bad_argument");
    }

    #[test]
    fn a_kept_image_is_for_pre_copy_only() {
        let request = json!({"to": "127.0.0.1:7000", "keep_image": "1m",
                             "listen": "127.0.0.1:7001", "mode": "postcopy"});

        let error = MigrateRequest::parse(&request).expect_err("post-copy");

        assert!(error.message.contains("pre-copy"), "{error:?}");
    }

    #[test]
    fn a_full_migrate_request_parses() {
        let request = json!({"to": "127.0.0.1:7000", "mode": "hybrid", "max_downtime": "5ms",
                             "deadline": "2s", "codec": "raw", "verify": true});

        let parsed = MigrateRequest::parse(&request).expect("valid");

        assert_eq!(parsed.mode, MigrationMode::Hybrid);
        assert_eq!(parsed.max_downtime, Duration::from_millis(5));
        assert_eq!(parsed.deadline, Duration::from_secs(2));
        assert!(parsed.verify);
        assert!(parsed.keep_image.is_none());
    }

    #[test]
    fn an_unknown_mode_is_named() {
        let error = MigrateRequest::parse(&json!({"to": "127.0.0.1:7000", "mode": "teleport"}))
            .expect_err("unknown mode");

        assert!(error.message.contains("teleport"), "{error:?}");
    }
}
