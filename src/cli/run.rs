//! `understudy run`: a VM standalone, with live statistics.

use std::time::{Duration, Instant};

use serde_json::json;

use super::{MonitorOptions, VmOptions, monitor, stop_flag, wait_until_running};

/// Arguments of `understudy run`.
#[derive(clap::Args, Debug)]
pub struct RunArguments {
    #[command(flatten)]
    vm: VmOptions,
    #[command(flatten)]
    monitor: MonitorOptions,
}

/// Runs the VM until the duration passes or Ctrl-C.
pub fn run(arguments: RunArguments) -> anyhow::Result<()> {
    let started = Instant::now();
    let stop = stop_flag()?;
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
    monitor(&vm, arguments.monitor, &stop)?;
    vm.pause()?;
    vm.shutdown();
    if !arguments.monitor.json {
        crate::say!("stopped after {:.1} s", started.elapsed().as_secs_f64());
    }
    Ok(())
}
