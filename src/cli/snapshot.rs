//! `understudy snapshot` and `understudy restore`: a paused VM to a file and back.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use serde_json::json;
use understudy_checkpoint::snapshot;
use understudy_vm::Vm;
use understudy_vm::progress::ProgressSample;

use super::{
    MonitorOptions, VmOptions, check_events, monitor, open_tap, parse_duration, stop_flag,
    wait_until_running,
};

/// Arguments of `understudy snapshot`.
#[derive(clap::Args, Debug)]
pub struct SnapshotArguments {
    #[command(flatten)]
    vm: VmOptions,
    /// Let the guest run this long before the snapshot.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    after: Duration,
    /// The snapshot file to write.
    #[arg(long, short)]
    output: PathBuf,
}

/// Arguments of `understudy restore`.
#[derive(clap::Args, Debug)]
pub struct RestoreArguments {
    /// The snapshot file to read.
    input: PathBuf,
    /// A guest with a network interface gets it on this tap.
    #[arg(long)]
    tap: Option<String>,
    /// A store (a directory): hash the guest's memory before it runs
    /// (reads every page from the store first).
    #[arg(long)]
    verify: bool,
    #[command(flatten)]
    monitor: MonitorOptions,
}

/// A vCPU's progress at a moment the VM was paused (a consistent reading).
#[derive(Serialize)]
struct VcpuProgress {
    counter: u64,
    counter_hash: u64,
    pages_written: u64,
}

fn paused_progress(vm: &Vm) -> anyhow::Result<Vec<VcpuProgress>> {
    Ok(ProgressSample::read(vm)?
        .vcpus
        .iter()
        .map(|status| VcpuProgress {
            counter: status.counter,
            counter_hash: status.counter_hash,
            pages_written: status.pages_written,
        })
        .collect())
}

/// Boots, runs, pauses and writes the snapshot.
pub fn snapshot(arguments: SnapshotArguments) -> anyhow::Result<()> {
    let mut vm = arguments.vm.boot()?;
    vm.resume()?;
    wait_until_running(&vm, Duration::from_secs(10))?;
    std::thread::sleep(arguments.after);
    check_events(&vm)?;
    let pause = vm.pause()?;
    let progress = paused_progress(&vm)?;
    let writing = Instant::now();
    let summary = snapshot::write(&vm, &arguments.output)
        .with_context(|| format!("cannot write the snapshot {}", arguments.output.display()))?;
    crate::say!(
        "{}",
        json!({
            "event": "snapshot",
            "path": arguments.output,
            "memory_hash": summary.memory_hash,
            "memory_bytes": summary.memory_bytes,
            "stored_pages": summary.stored_pages,
            "file_bytes": summary.file_bytes,
            "pause_us": pause.as_secs_f64() * 1e6,
            "write_ms": writing.elapsed().as_secs_f64() * 1e3,
            "vcpus": progress,
        })
    );
    vm.shutdown();
    Ok(())
}

/// Restores a snapshot and lets the guest continue.
pub fn restore(arguments: RestoreArguments) -> anyhow::Result<()> {
    let stop = stop_flag()?;
    let restoring = Instant::now();
    let tap = arguments.tap.as_deref().map(open_tap).transpose()?;
    if arguments.input.is_dir() {
        return restore_stored(&arguments, tap, &stop, restoring);
    }
    let (mut vm, summary) = snapshot::restore(&arguments.input, tap)
        .with_context(|| format!("cannot restore the snapshot {}", arguments.input.display()))?;
    crate::say!(
        "{}",
        json!({
            "event": "restored",
            "memory_hash": summary.memory_hash,
            "memory_bytes": summary.memory_bytes,
            "restore_ms": restoring.elapsed().as_secs_f64() * 1e3,
            "vcpus": paused_progress(&vm)?,
        })
    );
    vm.resume()?;
    if let Some(net) = vm.net() {
        // The guest may be on another host now: tell the network.
        net.announce(vm.boot_info()?.net_ipv4);
    }
    wait_until_running(&vm, Duration::from_secs(10))?;
    monitor(&vm, arguments.monitor, &stop)?;
    vm.pause()?;
    check_events(&vm)?;
    crate::say!(
        "{}",
        json!({ "event": "stopped", "vcpus": paused_progress(&vm)? })
    );
    vm.shutdown();
    Ok(())
}

/// Runs the guest a storage-backed secondary's store holds (its last
/// committed epoch), pages on demand: after a double failure, or to
/// inspect what a store holds.
fn restore_stored(
    arguments: &RestoreArguments,
    tap: Option<std::sync::Arc<understudy_vm::tap::Tap>>,
    stop: &std::sync::atomic::AtomicBool,
    restoring: Instant,
) -> anyhow::Result<()> {
    let (mut vm, recovered, memory_hash, progress) =
        understudy_secondary::store::resume_stored(&arguments.input, tap, arguments.verify)
            .with_context(|| format!("cannot run the store {}", arguments.input.display()))?;
    crate::say!(
        "{}",
        json!({
            "event": "restored",
            "store": arguments.input,
            "vm_id": format!("{:016x}", recovered.vm_id),
            "epoch": recovered.epoch,
            "memory_hash": memory_hash,
            "memory_bytes": recovered.memory_bytes,
            "restore_ms": restoring.elapsed().as_secs_f64() * 1e3,
            "vcpus": progress
                .vcpus
                .iter()
                .map(|status| json!({"counter": status.counter, "counter_hash": status.counter_hash}))
                .collect::<Vec<_>>(),
        })
    );
    wait_until_running(&vm, Duration::from_secs(10))?;
    monitor(&vm, arguments.monitor, stop)?;
    vm.pause()?;
    check_events(&vm)?;
    crate::say!(
        "{}",
        json!({ "event": "stopped", "vcpus": paused_progress(&vm)? })
    );
    vm.shutdown();
    Ok(())
}
