//! `understudy`: fault tolerance and live migration for KVM virtual machines.
//!
//! This binary is the one entry point: a `demo` of a failover, `run` a VM standalone, `snapshot` and
//! `restore` it, capture memory `trace`s, and `bench` the VM core and the
//! checkpoint codecs. Errors are printed once, here, with
//! their whole chain of causes.

mod cli;
mod control;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "understudy",
    version,
    about = "Fault tolerance and live migration for KVM virtual machines"
)]
struct Arguments {
    /// Log filter (tracing's EnvFilter syntax), e.g. `info` or `understudy_vm=debug`.
    #[arg(long, global = true, default_value = "warn", env = "UNDERSTUDY_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// See what Understudy is for: a protected key-value guest whose host fails while a client
    /// writes to it; prints what the client saw and a verdict (root; about 15 s).
    Demo(cli::demo::DemoArguments),
    /// Run a VM with the built-in guest and print live statistics once a second.
    Run(cli::run::RunArguments),
    /// Run a VM for a while, pause it, and write its complete state and memory to a file.
    Snapshot(cli::snapshot::SnapshotArguments),
    /// Start a VM from a snapshot file and let it continue.
    Restore(cli::snapshot::RestoreArguments),
    /// Run a VM protected by a secondary: checkpoints streamed every epoch.
    Primary(cli::replicate::PrimaryArguments),
    /// Wait for a primary, apply its checkpoints, and take over its guest if it is lost.
    Secondary(cli::replicate::SecondaryArguments),
    /// Run a guest, then live-migrate it to a target (`understudy secondary`), which resumes it.
    Migrate(cli::migrate::MigrateArguments),
    /// Failover drill: a real Redis client on a protected `kv` guest, the primary killed with
    /// SIGKILL at a random moment; checks no reset, no lost acknowledged write, no early output.
    Drill(cli::drill::DrillArguments),
    /// Ask a running process (its `--control` socket): status, set, migrate, switchover, stop,
    /// subscribe.
    Ctl(cli::ctl::CtlArguments),
    /// Make a key pair for authenticated, encrypted replication (`--key`, `--peer-key`).
    Keygen(cli::keygen::KeygenArguments),
    /// Record memory traces from processes or the built-in guest, and summarise them.
    #[command(subcommand)]
    Trace(cli::trace::TraceCommand),
    /// Benchmarks: the VM core (`bench vm`) and checkpoint codecs on traces (`bench compress`).
    #[command(subcommand)]
    Bench(cli::bench::BenchCommand),
}

impl Command {
    /// Whether the process may hold the only copy of a guest (a primary, a
    /// secondary, a migration, a drill's or demo's hosts): it must outlive
    /// its stdout.
    fn holds_a_guest(&self) -> bool {
        matches!(
            self,
            Self::Primary(_)
                | Self::Secondary(_)
                | Self::Migrate(_)
                | Self::Run(_)
                | Self::Restore(_)
                | Self::Drill(_)
                | Self::Demo(_)
        )
    }
}

fn main() -> ExitCode {
    let arguments = Arguments::parse();
    if !arguments.command.holds_a_guest() {
        // SAFETY: called before any other thread exists; restores the default
        // action so `understudy bench ... | head` ends quietly instead of
        // panicking on a write to a closed pipe. Commands that hold a guest
        // keep SIGPIPE ignored and print with `say!`, which ignores a
        // broken stdout.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&arguments.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match arguments.command {
        Command::Demo(arguments) => cli::demo::demo(arguments),
        Command::Run(arguments) => cli::run::run(arguments),
        Command::Snapshot(arguments) => cli::snapshot::snapshot(arguments),
        Command::Restore(arguments) => cli::snapshot::restore(arguments),
        Command::Primary(arguments) => cli::replicate::primary(arguments),
        Command::Secondary(arguments) => cli::replicate::secondary(arguments),
        Command::Migrate(arguments) => cli::migrate::run_migration(arguments),
        Command::Drill(arguments) => cli::drill::drill(arguments),
        Command::Ctl(arguments) => cli::ctl::ctl(arguments),
        Command::Keygen(arguments) => cli::keygen::keygen(arguments),
        Command::Trace(command) => cli::trace::trace(command),
        Command::Bench(command) => cli::bench::bench(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
