//! `understudy run`: a VM standalone, with live statistics.

use std::time::{Duration, Instant};

use serde_json::json;
use understudy_vm::Vm;

use super::{VmOptions, monitor, parse_duration, stop_flag, wait_until_running};

/// Arguments of `understudy run`.
#[derive(clap::Args, Debug)]
pub struct RunArguments {
    #[command(flatten)]
    vm: VmOptions,
    /// Stop after this long (e.g. 10s); default: until Ctrl-C.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Print statistics as JSON lines.
    #[arg(long)]
    json: bool,
}

/// Runs the VM until the duration passes or Ctrl-C.
pub fn run(arguments: RunArguments) -> anyhow::Result<()> {
    let started = Instant::now();
    let stop = stop_flag()?;
    let mut vm = Vm::boot(arguments.vm.config(), &arguments.vm.workload)?;
    vm.resume()?;
    wait_until_running(&vm, Duration::from_secs(10))?;
    let first_progress = started.elapsed();
    if arguments.json {
        println!(
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
        println!(
            "guest running {} on {} vCPU(s) with {} MiB; first progress {:.1} ms after start",
            arguments.vm.workload,
            arguments.vm.vcpus,
            arguments.vm.memory >> 20,
            first_progress.as_secs_f64() * 1e3
        );
    }
    monitor(&vm, arguments.duration, arguments.json, &stop)?;
    vm.pause()?;
    vm.shutdown();
    if !arguments.json {
        println!("stopped after {:.1} s", started.elapsed().as_secs_f64());
    }
    Ok(())
}
