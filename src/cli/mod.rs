//! The subcommands, and what they share: VM options, the live statistics
//! loop, and Ctrl-C handling.

pub mod bench;
pub mod ctl;
pub mod demo;
pub mod drill;
pub mod host;
pub mod keygen;
pub mod kvbench;
pub mod migrate;
pub mod pair;
pub mod replicate;
pub mod run;
pub mod snapshot;
pub mod storebench;
pub mod trace;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;
use understudy_vm::progress::{self, ProgressSample, Stats, WatchOptions};
use understudy_vm::tap::Tap;
use understudy_vm::virtio_net::FrameSink;
use understudy_vm::workload::{WorkloadSpec, parse_size};
use understudy_vm::{Vm, VmConfig};

/// Prints a line on stdout, like `println!`, but a closed or broken stdout
/// (`understudy secondary | head`, a log collector that died) is ignored:
/// a process that holds the only copy of a guest must not die of a reader.
#[macro_export]
macro_rules! say {
    ($($argument:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($argument)*);
    }};
}

/// How this process's replication or migration connections are secured.
#[derive(clap::Args, Clone, Debug)]
pub struct ChannelOptions {
    /// This host's Noise key (from `understudy keygen`): connections are
    /// mutually authenticated and encrypted.
    #[arg(long, requires = "peer_keys")]
    key: Option<std::path::PathBuf>,
    /// A file of public keys (`.pub` from `understudy keygen`, one per
    /// line) of the peers this host accepts; repeat for more files.
    #[arg(long = "peer-key")]
    peer_keys: Vec<std::path::PathBuf>,
    /// No authentication, no encryption: anyone who reaches the port can
    /// drive the secondary and read guest memory. For local experiments only.
    #[arg(long, conflicts_with_all = ["key", "peer_keys"])]
    plaintext: bool,
}

impl ChannelOptions {
    /// The security asked for, or none when neither --key nor --plaintext
    /// was given (a command that connects only on request).
    pub fn security_if_given(
        &self,
    ) -> anyhow::Result<Option<understudy_checkpoint::channel::Security>> {
        if self.key.is_none() && !self.plaintext {
            return Ok(None);
        }
        self.security().map(Some)
    }

    /// The security these options ask for; says so on stderr when plain.
    pub fn security(&self) -> anyhow::Result<understudy_checkpoint::channel::Security> {
        use understudy_checkpoint::channel::{Keyring, Security};
        match (&self.key, self.plaintext) {
            (Some(key), false) => Ok(Security::Noise(Arc::new(Keyring::load(
                key,
                &self.peer_keys,
            )?))),
            (None, true) => {
                eprintln!(
                    "WARNING: --plaintext: replication is neither authenticated nor encrypted;                      anyone who reaches the port can read guest memory or drive the secondary.                      For local experiments only."
                );
                Ok(Security::Plaintext)
            }
            _ => bail!(
                "say how connections are secured: --key FILE --peer-key FILE (make them with                  `understudy keygen`), or --plaintext for local experiments"
            ),
        }
    }
}

/// Options that shape a new VM.
#[derive(clap::Args, Clone, Debug)]
pub struct VmOptions {
    /// Guest memory (e.g. 512M, 1G).
    #[arg(long, default_value = "512M", value_parser = parse_memory)]
    pub memory: u64,
    /// Number of vCPUs; each runs the workload on its share of the working set.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Workload: idle, counter[:spin=N],
    /// memtouch:rate=200MB/s,wss=128M,pattern=seq|random|hotspot|sparse|zero[,free=75%[,churn]],
    /// or kv[:ip=10.0.0.10/24][,port=6379][,heap=16M] (needs --tap).
    #[arg(long, default_value = "memtouch:rate=200MB/s,wss=128M,pattern=random")]
    pub workload: WorkloadSpec,
    /// Give the guest a virtio-net interface on this tap (created if it does
    /// not exist; attach it to a bridge and bring it up yourself).
    #[arg(long)]
    pub tap: Option<String>,
}

impl VmOptions {
    /// The VM shape.
    pub fn config(&self) -> VmConfig {
        VmConfig::new(self.memory, self.vcpus)
    }

    /// Boots the VM, with its network interface when `--tap` is given; the
    /// guest's frames go straight to the tap.
    pub fn boot(&self) -> anyhow::Result<Vm> {
        self.boot_with_output(|tap| (tap, None))
    }

    /// Boots the VM; `sinks` makes from the tap where the guest's frames go
    /// (e.g. an output-commit gate in front of it) and who is told of the
    /// frames it receives.
    pub fn boot_with_output(
        &self,
        sinks: impl FnOnce(Arc<Tap>) -> (Arc<dyn FrameSink>, Option<Arc<dyn FrameSink>>),
    ) -> anyhow::Result<Vm> {
        if self.workload.uses_network() && self.tap.is_none() {
            bail!(
                "the {} workload needs a network: add --tap NAME",
                self.workload
            );
        }
        let mut vm = Vm::boot(self.config(), &self.workload)?;
        let Some(name) = &self.tap else {
            return Ok(vm);
        };
        let tap = open_tap(name)?;
        let (output, observer) = sinks(tap.clone());
        vm.attach_guest_net(Some(tap), output, observer)?;
        Ok(vm)
    }
}

/// Opens (or creates) the tap `name` for a guest's interface.
pub fn open_tap(name: &str) -> anyhow::Result<Arc<Tap>> {
    Ok(Arc::new(
        Tap::open(name).with_context(|| format!("cannot open tap {name}"))?,
    ))
}

fn parse_memory(value: &str) -> Result<u64, String> {
    parse_size("memory", value).map_err(|error| error.to_string())
}

/// Parses durations such as `500ms`, `2s`, `1.5s`, `3m`.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let (number, unit) = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map(|at| value.split_at(at))
        .unwrap_or((value, "s"));
    let number: f64 = number
        .parse()
        .map_err(|_| format!("bad duration '{value}'"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        _ => return Err(format!("bad duration unit in '{value}': use ms, s or m")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("bad duration '{value}'"))
}

/// The clock's nanoseconds (low 64 bits): seeds and identities.
pub fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |elapsed| {
            u64::try_from(elapsed.as_nanos() & u128::from(u64::MAX)).unwrap_or(1)
        })
}

/// A VM (or process) identity: the clock mixed with the process id.
pub fn new_vm_id() -> u64 {
    clock_seed() ^ u64::from(std::process::id())
}

/// Set by SIGINT/SIGTERM; the statistics loop stops cleanly when it is.
pub fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, flag.clone())
            .context("cannot install the Ctrl-C handler")?;
    }
    Ok(flag)
}

/// Fails if a vCPU reported that the guest stopped.
pub fn check_events(vm: &Vm) -> anyhow::Result<()> {
    Ok(progress::check_running(vm)?)
}

/// Waits until every vCPU runs its workload; returns the sample that showed it.
pub fn wait_until_running(vm: &Vm, timeout: Duration) -> anyhow::Result<ProgressSample> {
    Ok(progress::wait_until_running(vm, timeout)?)
}

/// How the statistics loop runs.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct MonitorOptions {
    /// Stop after this long (e.g. 10s); default: until Ctrl-C.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Print statistics as JSON lines.
    #[arg(long)]
    pub json: bool,
    /// Harvest the dirty log this often (e.g. 25ms, as a checkpointing epoch would);
    /// the statistics add up the harvests of each second.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub harvest_interval: Duration,
}

/// Prints statistics once a second until the duration passes or Ctrl-C.
pub fn monitor(vm: &Vm, options: MonitorOptions, stop: &AtomicBool) -> anyhow::Result<()> {
    let watch = WatchOptions {
        duration: options.duration,
        harvest_interval: options.harvest_interval,
    };
    progress::watch(vm, watch, stop, |stats| print_stats(stats, options.json))?;
    Ok(())
}

pub(crate) fn print_stats(stats: &Stats, as_json: bool) {
    if as_json {
        crate::say!(
            "{}",
            json!({
                "t": stats.t,
                "guest_dirtied_mb_per_s": stats.guest_dirtied_mb_per_s,
                "dirty_log_pages_per_s": stats.dirty_log_pages_per_s,
                "counter_steps_per_s": stats.counter_steps_per_s,
                "counters": stats.counters,
                "pages_written": stats.pages_written,
            })
        );
    } else {
        crate::say!(
            "t={:6.1}s  guest dirtied {:8.1} MB/s  dirty log {:9.0} pages/s  counter {:11.0} steps/s",
            stats.t,
            stats.guest_dirtied_mb_per_s,
            stats.dirty_log_pages_per_s,
            stats.counter_steps_per_s
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("3h").is_err());
    }
}
