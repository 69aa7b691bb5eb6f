//! `understudy run`: a VM standalone, with live statistics.

use std::time::{Duration, Instant};

use serde_json::json;

use super::host::{Ended, Guest, Reach, StandaloneOptions, standalone};
use super::{MonitorOptions, VmOptions, stop_flag, wait_until_running};
use crate::control::Role;

/// Arguments of `understudy run`.
#[derive(clap::Args, Debug)]
pub struct RunArguments {
    #[command(flatten)]
    vm: VmOptions,
    #[command(flatten)]
    monitor: MonitorOptions,
    #[command(flatten)]
    control: super::host::ControlOptions,
    /// How `ctl migrate` reaches its target (none: migrations are refused).
    #[command(flatten)]
    channel: super::ChannelOptions,
    #[command(flatten)]
    heartbeat: super::replicate::HeartbeatOptions,
}

/// Runs the VM until the duration passes or Ctrl-C.
pub fn run(arguments: RunArguments) -> anyhow::Result<()> {
    let started = Instant::now();
    let stop = stop_flag()?;
    let host = arguments.control.start(Role::Standalone, stop)?;
    let reach = Reach {
        security: arguments.channel.security_if_given()?,
        heartbeat: arguments.heartbeat.policy()?,
    };
    let mut vm = arguments.vm.boot()?;
    vm.resume()?;
    wait_until_running(&vm, Duration::from_secs(10))?;
    let first_progress = started.elapsed();
    if arguments.monitor.json {
        crate::say!(
            "{}",
            json!({
                "event": "guest_running",
                "first_progress_ms": first_progress.as_secs_f64() * 1e3,
                "workload": arguments.vm.workload.to_string(),
                "memory_bytes": arguments.vm.memory,
                "vcpus": arguments.vm.vcpus,
            })
        );
    } else {
        crate::say!(
            "guest running {} on {} vCPU(s) with {} MiB; first progress {:.1} ms after start",
            arguments.vm.workload,
            arguments.vm.vcpus,
            arguments.vm.memory >> 20,
            first_progress.as_secs_f64() * 1e3
        );
    }
    host.telemetry.set_state(
        "running",
        false,
        Some("no secondary: `understudy run` is unprotected".to_owned()),
    );
    let guest = Guest {
        vm,
        vm_id: super::new_vm_id(),
        source_image: None,
    };
    let options = StandaloneOptions {
        duration: arguments.monitor.duration,
        json: arguments.monitor.json,
        harvest_interval: arguments.monitor.harvest_interval,
        reach,
    };
    if let Ended::Stopped(mut guest) = standalone(guest, &host, &options)? {
        guest.vm.pause()?;
        guest.vm.shutdown();
    }
    if !arguments.monitor.json {
        crate::say!("stopped after {:.1} s", started.elapsed().as_secs_f64());
    }
    Ok(())
}
