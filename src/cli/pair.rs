//! The two parts a process of a protected pair plays, and how it passes
//! from one to the other: the *lead* runs the guest and protects it
//! (`understudy_primary::run`), the *understudy* holds its backup and
//! takes over (`understudy_secondary::serve_with`). `understudy primary`
//! starts as the lead, `understudy secondary` as the understudy; a planned
//! switchover (`ctl switchover`) swaps them:
//!
//! ```text
//!  lead (old primary)                         understudy (old secondary)
//!   pause at epoch n, checkpoint, Ack n  ───▶  committed n
//!   Handover {image tag, --listen}       ───▶  resumes the guest from n,
//!                                        ◀───  TookOver
//!   keeps its paused VM as the image,           becomes the lead: protects the
//!   becomes the understudy at --listen   ◀───  guest by the old primary, naming
//!   BaseImage {tag}                      ───▶  the image: epoch 0 is only the
//!                                               pages written since it resumed
//! ```
//!
//! Output commit holds across the handover: everything the guest sent up
//! to epoch n was acknowledged before the handover (and released); after
//! it, the new lead's guest output waits for the old primary's
//! acknowledgements. Clients keep their connections: the guest's address
//! moves with a gratuitous ARP, and TCP retransmits whatever was in flight.
//!
//! Failure model: a failure before the handover went out leaves the guest
//! running where it was (the secondary lost, as any other time); once it
//! went out, the old primary never resumes the guest (the secondary takes
//! over on the handover or, if the link broke, on losing a primary whose
//! last epoch it committed). With a witness, the new lead claims the
//! generation before it resumes the guest, as in any takeover.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use serde_json::json;
use understudy_checkpoint::witness::Witness;
use understudy_primary::output::{InputRecorder, OutputCommit};
use understudy_primary::{
    ColoOptions, Controls, EpochPolicy, PrimaryEvent, PrimaryOptions, Retune, RunEnd, RunOptions,
};
use understudy_proxy::Limits;
use understudy_secondary::{Extras, Failover, KeptImage, SecondaryEvent, SecondaryOptions};
use understudy_vm::Vm;
use understudy_vm::progress::ProgressSample;
use understudy_vm::tap::Tap;
use understudy_vm::virtio_net::FrameSink;

use super::host::{
    Departure, Guest, Host, MigrateRequest, Reach, StandaloneOptions, standalone, summary_json,
};
use super::replicate::{
    print_colo, print_output_commit, print_primary_event, print_secondary_event, vcpus_json,
};
use super::{check_events, wait_until_running};
use crate::control::{ControlError, Request, Role, Settings};

/// What a process needs to play either part.
pub struct Pair {
    /// How it protects a guest when it leads (the secondary's address is
    /// the part's own).
    pub primary: PrimaryOptions,
    /// The witness, if fencing is on.
    pub witness: Option<Witness>,
    /// This process, as the witness knows it.
    pub owner: u64,
    /// Output commit: checkpoint early once output waits this long.
    pub output_epoch: Duration,
    /// The lead stops after this long (the `primary` command's
    /// `--duration`).
    pub lead_duration: Option<Duration>,
    /// COLO mode (no switchover).
    pub colo: Option<ColoOptions>,
    /// How it serves as the understudy; none: it cannot (a primary without
    /// `--listen`: no switchover).
    pub understudy: Option<SecondaryOptions>,
    /// The guest's tap, opened once for every part.
    pub tap: Option<Arc<Tap>>,
    /// After a failover, run the guest this long (the `secondary`
    /// command's `--duration`).
    pub standalone_duration: Option<Duration>,
    /// Events as JSON lines.
    pub json: bool,
    /// How migrations reach their targets.
    pub reach: Reach,
}

/// The part a process plays.
pub enum Part {
    /// It runs the guest and protects it.
    Lead(LeadPart),
    /// It holds the backup.
    Understudy(UnderstudyPart),
}

/// A lead's guest.
pub struct LeadPart {
    /// The VM, running.
    pub vm: Vm,
    /// The guest's id.
    pub vm_id: u64,
    /// Where its secondary listens.
    pub secondary: SocketAddr,
    /// An image of the guest the secondary keeps (0: none).
    pub base_image: u64,
    /// The output-commit gate in front of the guest's network.
    pub gate: Option<Arc<OutputCommit>>,
}

/// An understudy's holdings.
#[derive(Default)]
pub struct UnderstudyPart {
    /// The paused VM of a guest handed over from here, and its tag.
    pub kept: Option<KeptImage>,
    /// That VM's output-commit gate (its network device keeps it).
    pub gate: Option<Arc<OutputCommit>>,
}

/// Plays `part`, and the parts it turns into, until the process is done.
pub fn perform(pair: &Pair, host: &Host, stop: &Arc<AtomicBool>, part: Part) -> anyhow::Result<()> {
    let mut part = part;
    loop {
        part = match part {
            Part::Lead(lead_part) => match lead(pair, host, stop, lead_part)? {
                Some(next) => next,
                None => return Ok(()),
            },
            Part::Understudy(understudy_part) => {
                match understudy(pair, host, stop, understudy_part)? {
                    Some(next) => next,
                    None => return Ok(()),
                }
            }
        };
    }
}

/// Leads until stopped, moved away, or handed over (then the understudy
/// part follows).
fn lead(
    pair: &Pair,
    host: &Host,
    stop: &Arc<AtomicBool>,
    part: LeadPart,
) -> anyhow::Result<Option<Part>> {
    let LeadPart {
        mut vm,
        vm_id,
        secondary,
        base_image,
        gate,
    } = part;
    let controls = Arc::new(Controls::new(host.interrupt.clone()));
    let mut primary = pair.primary.clone();
    primary.secondary = secondary;
    let mut options = RunOptions {
        primary,
        vm_id,
        owner: pair.owner,
        witness: pair.witness.clone(),
        gate: gate.clone(),
        output_epoch: pair.output_epoch,
        duration: pair.lead_duration,
        connect_patience: if base_image == 0 {
            Duration::ZERO
        } else {
            // The old primary is turning into the secondary right now.
            Duration::from_secs(10)
        },
        colo: pair.colo,
        controls: Some(controls.clone()),
        base_image,
    };
    host.telemetry.set_role(Role::Primary, "synchronising");
    host.telemetry.set_state(
        "synchronising",
        false,
        Some("epoch 0 is not acknowledged yet".to_owned()),
    );
    host.telemetry
        .set_guest(vm_id, vm.config().memory_bytes, vm.config().vcpus);
    host.telemetry.set_peer(Some(secondary.to_string()));
    let settings = Arc::new(LiveSettings::new(&options.primary));
    settings.show(&host.telemetry);
    let switchover_to = pair
        .understudy
        .as_ref()
        .filter(|_| pair.colo.is_none())
        .map(|understudy| understudy.listen.to_string());
    if let Some(control) = &host.control {
        let (telemetry, controls_for_set, settings) =
            (host.telemetry.clone(), controls.clone(), settings.clone());
        control.on_set(Some(Box::new(move |asked: &Settings| {
            settings.set(asked, &controls_for_set, &telemetry)
        })));
        let (controls, switchover_to) = (controls.clone(), switchover_to.clone());
        control.before_queue(Some(Box::new(move |request: &Request| {
            if let (Request::Switchover, Some(listen)) = (request, &switchover_to) {
                controls.request_switchover(listen.clone());
            }
        })));
    }
    host.accept(&["migrate", "switchover"]);
    let end = loop {
        let end = understudy_primary::run(&mut vm, &options, stop, |event| {
            print_primary_event(&event, pair.json, secondary);
            record_primary_event(host, &event, gate.as_deref());
        })?;
        if end == RunEnd::Interrupted {
            // Whatever happens next, a run that starts again is a primary
            // that protected before: it keeps trying its secondary.
            options.connect_patience = Duration::MAX;
            let Some(pending) = host.take_request() else {
                continue;
            };
            if matches!(pending.request, Request::Switchover) {
                let why = if switchover_to.is_none() {
                    "this primary has no --listen (where it would wait as the secondary), or runs COLO: no switchover"
                } else {
                    "the guest is not protected right now: there is no secondary to switch over to"
                };
                controls.cancel_switchover();
                host.finished(pending, Err(ControlError::new("not_supported", why)));
                continue;
            }
            vm = match serve_request(vm, vm_id, pending, host, &pair.reach)? {
                Moved::Stayed(vm) => vm,
                Moved::Away => return Ok(None),
                Moved::Back(guest) => guest.vm,
            };
            continue;
        }
        break end;
    };
    if let Some(control) = &host.control {
        control.before_queue(None);
        control.on_set(None);
    }
    match end {
        RunEnd::HandedOver {
            kept_image,
            confirmed,
        } => {
            let reply = json!({"kept_image": format!("{kept_image:016x}"), "confirmed": confirmed,
                               "now": "secondary"});
            if pair.json {
                crate::say!(
                    "{}",
                    json!({"event": "handed_over", "kept_image": format!("{kept_image:016x}"), "confirmed": confirmed})
                );
            }
            if !confirmed {
                eprintln!(
                    "WARNING: the secondary did not confirm the handover; it takes the guest over anyway (its last epoch is committed). This side keeps the paused guest and waits as the secondary."
                );
            }
            host.publish(json!({"event": "handed_over", "confirmed": confirmed}));
            if let Some(pending) = host.take_request() {
                host.finished(pending, Ok(reply));
            }
            let Some(understudy) = &pair.understudy else {
                bail!("handed over without a place to wait as the secondary");
            };
            let _ = understudy;
            Ok(Some(Part::Understudy(UnderstudyPart {
                kept: Some(KeptImage {
                    vm,
                    vm_id,
                    tag: kept_image,
                    until: far_future(),
                }),
                gate,
            })))
        }
        RunEnd::Stopped | RunEnd::Interrupted | RunEnd::GuestStopped(_) => {
            if let Some(gate) = &gate {
                match gate.colo_metrics() {
                    Some(metrics) => print_colo(&metrics, pair.json),
                    None => print_output_commit(&gate.metrics(), pair.json),
                }
            }
            vm.pause()?;
            vm.shutdown();
            if let RunEnd::GuestStopped(reason) = end {
                bail!("{reason}");
            }
            Ok(None)
        }
    }
}

/// A kept image of a switchover does not expire: the process serves as
/// the secondary from now on.
fn far_future() -> std::time::Instant {
    std::time::Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600)
}

/// Serves as the understudy until a takeover (then leads if it was a
/// planned switchover, or runs the guest standalone after a failover) or
/// until stopped.
fn understudy(
    pair: &Pair,
    host: &Host,
    stop: &Arc<AtomicBool>,
    part: UnderstudyPart,
) -> anyhow::Result<Option<Part>> {
    let Some(options) = pair.understudy.clone() else {
        bail!("this process has no secondary settings");
    };
    host.telemetry.set_role(Role::Secondary, "waiting");
    host.telemetry.set_state(
        "waiting",
        false,
        Some("no primary has synchronised with this secondary".to_owned()),
    );
    host.accept(&[]);
    // A guest resumed here gets an output-commit gate in front of its tap:
    // if it was a planned switchover, this side protects it next.
    let fresh_gate: Arc<Mutex<Option<Arc<OutputCommit>>>> = Arc::default();
    let slot = fresh_gate.clone();
    let sinks = move |tap: Arc<Tap>| -> (Arc<dyn FrameSink>, Option<Arc<dyn FrameSink>>) {
        let commit = Arc::new(OutputCommit::new(tap, Limits::default()));
        *slot.lock().expect("gate slot lock poisoned") = Some(commit.clone());
        let recorder: Arc<dyn FrameSink> = Arc::new(InputRecorder(commit.clone()));
        (commit as Arc<dyn FrameSink>, Some(recorder))
    };
    let colo = options.colo;
    let extras = Extras {
        kept: part.kept,
        until: None,
        net_sinks: if colo { None } else { Some(&sinks) },
        tap: pair.tap.clone(),
    };
    let failover = understudy_secondary::serve_with(options, extras, stop, |event| {
        record_secondary_event(host, event);
        print_secondary_event(event, pair.json);
    })?;
    let Some(failover) = failover else {
        return Ok(None);
    };
    print_resumed(&failover, pair.json);
    let gate = fresh_gate
        .lock()
        .expect("gate slot lock poisoned")
        .take()
        .or(part.gate);
    if let Some((secondary, base_image)) = failover.protect_to {
        host.publish(json!({"event": "switchover", "epoch": failover.epoch,
                            "protect_by": secondary.to_string()}));
        return Ok(Some(Part::Lead(LeadPart {
            vm: failover.vm,
            vm_id: failover.vm_id,
            secondary,
            base_image,
            gate,
        })));
    }
    host.telemetry.took_over(if failover.migrated {
        "the guest migrated here; no secondary protects it"
    } else {
        "this secondary took over from its lost primary; no secondary protects the guest"
    });
    host.publish(
        json!({"event": if failover.migrated { "migrated_in" } else { "failover" },
               "epoch": failover.epoch, "reason": failover.reason}),
    );
    wait_until_running(&failover.vm, Duration::from_secs(10))?;
    let guest = Guest {
        vm: failover.vm,
        vm_id: failover.vm_id,
        source_image: failover.source_image.map(|(_, tag)| tag),
    };
    let options = StandaloneOptions {
        duration: pair.standalone_duration,
        json: pair.json,
        harvest_interval: Duration::from_secs(1),
        reach: pair.reach.clone(),
    };
    let super::host::Ended::Stopped(mut guest) = standalone(guest, host, &options)? else {
        return Ok(None);
    };
    guest.vm.pause()?;
    check_events(&guest.vm)?;
    if pair.json {
        crate::say!(
            "{}",
            json!({"event": "stopped", "vcpus": vcpus_json(&ProgressSample::read(&guest.vm)?)})
        );
    }
    guest.vm.shutdown();
    Ok(None)
}

/// How the guest came to run here.
fn print_resumed(failover: &Failover, as_json: bool) {
    if as_json {
        crate::say!(
            "{}",
            json!({
                "event": "resumed",
                "epoch": failover.epoch,
                "memory_hash": failover.memory_hash,
                "since_last_heartbeat_ms": failover.since_last_heartbeat.as_secs_f64() * 1e3,
                "reason": failover.reason,
                "migrated": failover.migrated,
                "switchover": failover.protect_to.is_some(),
                "replayed_frames": failover.replayed_frames,
                "vcpus": vcpus_json(&failover.progress),
            })
        );
    } else if failover.migrated {
        crate::say!("migration arrived: the guest runs here now");
    } else if let Some((by, _)) = failover.protect_to {
        crate::say!(
            "planned switchover: the guest runs here from epoch {}; protecting it by {by}",
            failover.epoch
        );
    } else {
        crate::say!(
            "PRIMARY LOST ({}): resumed the guest from epoch {} in {:.1} ms after the last heartbeat",
            failover.reason,
            failover.epoch,
            failover.since_last_heartbeat.as_secs_f64() * 1e3
        );
    }
}

/// Where a migration asked for on the control socket left the guest.
enum Moved {
    /// It stayed here (the migration failed, or was not possible).
    Stayed(Vm),
    /// It runs elsewhere now.
    Away,
    /// It left and came back (a kept image).
    Back(Guest),
}

/// Carries out a `migrate` in a lead, its protection closed (it resumes
/// when the guest stays here).
fn serve_request(
    mut vm: Vm,
    vm_id: u64,
    pending: crate::control::Pending,
    host: &Host,
    reach: &Reach,
) -> anyhow::Result<Moved> {
    let request = match &pending.request {
        Request::Migrate(arguments) => MigrateRequest::parse(arguments),
        Request::Switchover => Err(ControlError::new(
            "not_supported",
            "the guest is not protected right now",
        )),
    };
    let request = match request {
        Ok(request) => request,
        Err(error) => {
            host.finished(pending, Err(error));
            return Ok(Moved::Stayed(vm));
        }
    };
    host.telemetry.set_state(
        "migrating",
        false,
        Some("protection is paused for a migration".to_owned()),
    );
    host.publish(json!({"event": "migration_started", "to": request.to.to_string()}));
    match super::host::migrate_from_here(&mut vm, &request, reach, vm_id, 0, |_| {}) {
        Departure::Left(summary) => {
            let reply = summary_json(&summary);
            crate::say!("{}", json!({"event": "migrated", "summary": reply}));
            host.publish(json!({"event": "migrated", "summary": reply}));
            host.finished(pending, Ok(reply));
            let (Some(tag), Some((keep, listen))) = (summary.kept_image, request.keep_image) else {
                vm.shutdown();
                return Ok(Moved::Away);
            };
            let guest = Guest {
                vm,
                vm_id,
                source_image: None,
            };
            Ok(
                super::host::await_return(guest, tag, keep, listen, host, reach)?
                    .map_or(Moved::Away, Moved::Back),
            )
        }
        Departure::Stayed(error) => {
            let message = format!(
                "{error:#}; the guest keeps running here, unharmed, and protection resumes"
            );
            eprintln!("migration failed: {message}");
            host.publish(
                json!({"event": "migration_failed", "reason": message, "guest": "running here"}),
            );
            host.finished(pending, Err(ControlError::new("failed", message)));
            host.telemetry.set_state(
                "synchronising",
                false,
                Some("protection resumes after a failed migration".to_owned()),
            );
            Ok(Moved::Stayed(vm))
        }
        Departure::Unsure(error) => {
            let message = format!("{error:#}");
            host.publish(
                json!({"event": "migration_failed", "reason": message, "guest": "stopped here"}),
            );
            host.finished(pending, Err(ControlError::new("failed", message.clone())));
            bail!("{message}")
        }
    }
}

/// The settings `set` may change, as they are now.
struct LiveSettings {
    now: Mutex<(EpochPolicy, understudy_compress::CodecSpec)>,
}

impl LiveSettings {
    fn new(primary: &PrimaryOptions) -> Self {
        Self {
            now: Mutex::new((primary.epoch, primary.codec)),
        }
    }

    fn show(&self, telemetry: &crate::control::Telemetry) {
        let (policy, codec) = *self.now.lock().expect("settings lock poisoned");
        telemetry.set_settings(
            &codec.to_string(),
            policy.target,
            json!({"epoch_ms": policy.target.as_secs_f64() * 1e3,
                   "min_epoch_ms": policy.min.as_secs_f64() * 1e3,
                   "max_pause_us": policy.max_pause.as_secs_f64() * 1e6,
                   "idle_epoch_ms": policy.idle.as_secs_f64() * 1e3,
                   "codec": codec.to_string()}),
        );
    }

    /// `set`: checks every setting before changing any.
    fn set(
        &self,
        asked: &Settings,
        controls: &Controls,
        telemetry: &crate::control::Telemetry,
    ) -> Result<serde_json::Value, ControlError> {
        if let Some(unknown) = asked
            .keys()
            .find(|key| !matches!(key.as_str(), "epoch" | "max_pause" | "codec"))
        {
            return Err(ControlError::new(
                "bad_argument",
                format!("{unknown:?} cannot be set: epoch, max_pause or codec"),
            ));
        }
        let epoch = crate::control::duration_argument(asked, "epoch")?;
        let max_pause = crate::control::duration_argument(asked, "max_pause")?;
        if epoch.is_some_and(|epoch| epoch < Duration::from_millis(1))
            || max_pause.is_some_and(|pause| pause.is_zero())
        {
            return Err(ControlError::new(
                "bad_argument",
                "epoch must be at least 1ms and max_pause more than 0",
            ));
        }
        let codec = match asked.get("codec") {
            None => None,
            Some(serde_json::Value::String(text)) => Some(text.parse().map_err(
                |error: understudy_compress::SpecError| {
                    ControlError::new("bad_argument", format!("codec: {error}"))
                },
            )?),
            Some(other) => {
                return Err(ControlError::new(
                    "bad_argument",
                    format!("codec: expected a codec such as \"raw\", got {other}"),
                ));
            }
        };
        if epoch.is_none() && max_pause.is_none() && codec.is_none() {
            return Err(ControlError::new(
                "bad_argument",
                "set what? epoch, max_pause or codec",
            ));
        }
        {
            let mut now = self.now.lock().expect("settings lock poisoned");
            if let Some(epoch) = epoch {
                now.0.target = epoch;
                now.0.min = (epoch / 5).max(Duration::from_millis(1));
            }
            if let Some(max_pause) = max_pause {
                now.0.max_pause = max_pause;
            }
            if let Some(codec) = codec {
                now.1 = codec;
            }
        }
        controls.retune(Retune {
            epoch,
            max_pause,
            codec,
        });
        self.show(telemetry);
        Ok(json!({
            "applied": if codec.is_some() {
                "epoch settings at the next checkpoint; the codec by a new connection to the secondary (a full resynchronisation, started now)"
            } else {
                "at the next checkpoint"
            },
        }))
    }
}

/// Keeps a lead's telemetry and the control subscribers up to date.
fn record_primary_event(host: &Host, event: &PrimaryEvent, gate: Option<&OutputCommit>) {
    let telemetry = &host.telemetry;
    match event {
        PrimaryEvent::Checkpointed(metrics) => {
            telemetry.checkpointed(metrics.epoch, metrics.pause);
            if let Some(gate) = gate.filter(|gate| !gate.compares()) {
                telemetry.output_held(gate.metrics().frames_held as u64);
            }
        }
        PrimaryEvent::Sent(metrics) => telemetry.sent(metrics.raw_bytes, metrics.wire_bytes),
        PrimaryEvent::Acknowledged { epoch, latency } => telemetry.acknowledged(*epoch, *latency),
        PrimaryEvent::Synchronised { pages, total, .. } => {
            telemetry.protection_started();
            host.publish(json!({"event": "protection_resumed", "pages": pages,
                                "total_ms": total.as_secs_f64() * 1e3}));
        }
        PrimaryEvent::SecondaryLost { reason } => {
            telemetry.secondary_lost(reason);
            host.publish(json!({"event": "secondary_lost", "reason": reason}));
        }
        PrimaryEvent::Witness { state, generation } => {
            telemetry.set_generation(*generation);
            host.publish(json!({"event": "witness", "state": state, "generation": generation}));
        }
        PrimaryEvent::WitnessWaiting { reason } => {
            host.publish(json!({"event": "witness_waiting", "reason": reason}));
        }
    }
}

/// Keeps an understudy's telemetry and the control subscribers up to date.
fn record_secondary_event(host: &Host, event: &SecondaryEvent) {
    let telemetry = &host.telemetry;
    match event {
        SecondaryEvent::Listening { .. } => {}
        SecondaryEvent::Connected { peer, hello } => {
            telemetry.set_guest(hello.vm_id, hello.memory_bytes, hello.vcpus);
            telemetry.set_generation(hello.generation);
            telemetry.set_peer(Some(peer.to_string()));
            telemetry.set_state(
                "synchronising",
                false,
                Some("epoch 0 is not committed yet".to_owned()),
            );
            host.publish(json!({"event": "primary_connected", "peer": peer.to_string()}));
        }
        SecondaryEvent::Committed { epoch, receive, .. } => {
            if *epoch == 0 {
                telemetry.set_state("protecting", true, None);
                host.publish(json!({"event": "protection_resumed", "epoch": epoch}));
            }
            telemetry.committed(*epoch, *receive);
        }
        SecondaryEvent::Disconnected { reason } => {
            telemetry.set_peer(None);
            telemetry.set_state("waiting", false, Some(format!("no primary: {reason}")));
            host.publish(json!({"event": "primary_disconnected", "reason": reason}));
        }
        SecondaryEvent::PostcopyComplete(done) => {
            host.publish(
                json!({"event": "postcopy_complete", "pages": done.pages, "faults": done.faults}),
            );
        }
        SecondaryEvent::WitnessWaiting { reason } => {
            host.publish(json!({"event": "witness_waiting", "reason": reason}));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Telemetry;

    fn settings() -> (LiveSettings, Controls, Telemetry) {
        let primary = PrimaryOptions {
            secondary: "127.0.0.1:7000".parse().expect("address"),
            epoch: EpochPolicy {
                target: Duration::from_millis(25),
                min: Duration::from_millis(5),
                max_pause: Duration::from_millis(2),
                idle: Duration::from_secs(1),
            },
            codec: "raw".parse().expect("codec"),
            heartbeat: understudy_checkpoint::heartbeat::HeartbeatPolicy::default(),
            verify: false,
            precopy_rounds: 5,
            max_bandwidth: None,
            security: understudy_checkpoint::channel::Security::Plaintext,
        };
        let (live, telemetry) = (LiveSettings::new(&primary), Telemetry::new(Role::Primary));
        live.show(&telemetry);
        (
            live,
            Controls::new(Arc::new(AtomicBool::new(false))),
            telemetry,
        )
    }

    fn asked(value: serde_json::Value) -> Settings {
        value.as_object().expect("object").clone()
    }

    #[test]
    fn an_unknown_setting_changes_nothing() {
        let (live, controls, telemetry) = settings();

        let result = live.set(
            &asked(json!({"epoch": "50ms", "colour": "blue"})),
            &controls,
            &telemetry,
        );

        assert_eq!(result.expect_err("unknown").code, "bad_argument");
        assert_eq!(telemetry.status_json()["settings"]["epoch_ms"], 25.0);
    }

    #[test]
    fn an_epoch_under_a_millisecond_is_refused() {
        let (live, controls, telemetry) = settings();

        let result = live.set(&asked(json!({"epoch": "0ms"})), &controls, &telemetry);

        assert_eq!(result.expect_err("too short").code, "bad_argument");
    }

    #[test]
    fn a_new_epoch_shows_in_status_at_once() {
        let (live, controls, telemetry) = settings();

        let result = live.set(&asked(json!({"epoch": "50ms"})), &controls, &telemetry);

        assert!(result.is_ok());
        assert_eq!(telemetry.status_json()["settings"]["epoch_ms"], 50.0);
        assert_eq!(telemetry.status_json()["settings"]["min_epoch_ms"], 10.0);
    }
}
