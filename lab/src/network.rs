//! Hosts as network namespaces: a single [`Namespace`] (a test's private
//! network), and the [`Lab`], a small network for drills, benchmarks and the
//! demo: a client, a primary host and a secondary host, joined by a switch
//! (a bridge in a namespace of its own). Each host bridges its uplink with a
//! tap for the guest, so the guest sits on the same Ethernet segment as the
//! client wherever it runs.
//!
//! ```text
//!  client ns          switch ns             primary ns              secondary ns
//!  c0 10.0.0.1 ---- vc [br0] vp ---- p0 [br0 10.0.0.2] tap0   s0 [br0 10.0.0.3] tap0
//!                          [br0] vs ------------------------------ s0
//! ```
//!
//! Everything is made with `ip` (iproute2) and removed on drop: processes
//! still inside a namespace are killed first, then the namespace deleted.
//! Namespaces are named `us-PID-TAG`; those left by a process that died are
//! removed by the next lab.
//!
//! Failure model: a lab that cannot be built (no `ip`, no `/dev/net/tun`, not
//! root) is an error saying which; a process that dies inside it is seen by
//! [`Process::running`] and in its log; a lab dropped during a panic still
//! removes its namespaces.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use understudy_checkpoint::channel::{KeyPair, write_key_files};

/// The guest's address on the lab network.
pub const GUEST_IP: &str = "10.0.0.10";
/// The port of the `kv` guest's service.
pub const GUEST_PORT: u16 = 6379;
/// The client's address on the lab network (and on a test's client tap).
pub const CLIENT_IP: &str = "10.0.0.1";
/// The secondary's replication address.
pub const SECONDARY_LISTEN: &str = "10.0.0.3:7000";
/// The primary host's address.
pub const PRIMARY_IP: &str = "10.0.0.2";
/// The secondary host's address.
pub const SECONDARY_IP: &str = "10.0.0.3";
/// The witness host's address.
pub const WITNESS_IP: &str = "10.0.0.4";
/// The witness's client port.
pub const WITNESS_PORT: u16 = 2379;

/// The VM options of the lab's guest: `kv` at [`GUEST_IP`] on the host's tap.
pub fn guest_vm_arguments() -> Vec<String> {
    [
        "--workload",
        &format!("kv:ip={GUEST_IP}/24"),
        "--tap",
        "tap0",
        "--memory",
        "64M",
    ]
    .map(String::from)
    .to_vec()
}

/// Prefix of every namespace made here.
const PREFIX: &str = "us-";

/// Runs `ip ARGUMENTS`.
pub fn ip(arguments: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args(arguments)
        .output()
        .context("cannot run `ip`: install iproute2")?;
    if !output.status.success() {
        bail!(
            "ip {} failed: {}",
            arguments.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Whether `tag` may end a namespace name: 1 to 12 lowercase letters and
/// digits.
fn valid_tag(tag: &str) -> bool {
    (1..=12).contains(&tag.len())
        && tag
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit())
}

/// The process id in `name` if it is exactly a name this lab makes
/// (`us-PID-TAG`); any other namespace is someone else's.
fn lab_namespace_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, tag) = rest.split_once('-')?;
    if pid.is_empty() || !pid.bytes().all(|byte| byte.is_ascii_digit()) || !valid_tag(tag) {
        return None;
    }
    pid.parse().ok()
}

/// Kills every process inside namespace `name`.
fn kill_processes_in(name: &str) {
    if let Ok(output) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<libc::pid_t>() {
                // SAFETY: SIGKILL to a process inside a namespace this lab made.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Removes namespaces this lab made in processes that are gone, with the
/// processes those left inside.
fn remove_stale_namespaces() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = lab_namespace_owner(name) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            kill_processes_in(name);
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// A line a child printed, with when it arrived.
pub struct Line {
    /// When the lab read it.
    pub at: Instant,
    /// The line.
    pub text: String,
}

/// A process running in a namespace; killed when dropped.
pub struct Process {
    child: Child,
    /// Its standard output, line by line.
    pub lines: Receiver<Line>,
    name: String,
}

impl Process {
    /// Waits for a JSON line whose `event` is `event`; returns it and when it came.
    pub fn wait_event(
        &mut self,
        event: &str,
        timeout: Duration,
    ) -> anyhow::Result<(serde_json::Value, Instant)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => {
                    let status = self.child.try_wait().ok().flatten();
                    bail!(
                        "{} printed no '{event}' event within {timeout:?} (exit status: {status:?})",
                        self.name
                    )
                }
            };
            if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line.text)
                && value["event"] == event
            {
                return Ok((value, line.at));
            }
        }
    }

    /// The next JSON line already printed that `wanted` accepts, without
    /// waiting; lines before it are passed over.
    pub fn poll_event(
        &mut self,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<(serde_json::Value, Instant)> {
        while let Ok(line) = self.lines.try_recv() {
            if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line.text)
                && wanted(&value)
            {
                return Some((value, line.at));
            }
        }
        None
    }

    /// Sends `signal` to the process (SIGSTOP, SIGCONT: a stalled host).
    pub fn signal(&self, signal: libc::c_int) -> anyhow::Result<()> {
        let pid = libc::pid_t::try_from(self.child.id()).context("a process id out of range")?;
        // SAFETY: a signal to our own child process.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error()).context("cannot signal a lab process");
        }
        Ok(())
    }

    /// Kills the process with SIGKILL now (a host failure) and reaps it.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().context("cannot kill a lab process")?;
        let _ = self.child.wait();
        Ok(())
    }

    /// Asks the process to stop (SIGINT) and waits up to `timeout`, then kills it.
    pub fn interrupt(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: sending a signal to our own child's pid.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }

    /// Waits for the process to end by itself.
    pub fn wait(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.child
            .wait()
            .with_context(|| format!("cannot wait for {}", self.name))
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One network namespace, deleted (with every process still in it) when
/// dropped.
pub struct Namespace {
    name: String,
}

impl Namespace {
    /// Creates namespace `us-PID-TAG` with loopback up. Needs root, `ip` and
    /// `/dev/net/tun` (for the taps the guests use).
    pub fn create(tag: &str) -> anyhow::Result<Self> {
        if !Path::new("/dev/net/tun").exists() {
            bail!(
                "/dev/net/tun is missing: the lab needs tap devices (run as root with the tun module)"
            );
        }
        if !valid_tag(tag) {
            bail!("a lab namespace tag is 1 to 12 lowercase letters and digits, not {tag:?}");
        }
        remove_stale_namespaces();
        let name = format!("{PREFIX}{}-{tag}", std::process::id());
        ip(&["netns", "add", &name])
            .with_context(|| format!("cannot create network namespace {name} (are you root?)"))?;
        let namespace = Self { name };
        namespace.ip(&["link", "set", "lo", "up"])?;
        Ok(namespace)
    }

    /// Its name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip ARGUMENTS` inside the namespace.
    pub fn ip(&self, arguments: &[&str]) -> anyhow::Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(arguments);
        ip(&full)
    }

    /// Adds tap `tap0` holding the client's address [`CLIENT_IP`]/24, up:
    /// a guest at [`GUEST_IP`] behind it is one hop away.
    pub fn add_client_tap(&self) -> anyhow::Result<()> {
        self.ip(&["tuntap", "add", "dev", "tap0", "mode", "tap"])?;
        self.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "tap0"])?;
        self.ip(&["link", "set", "tap0", "up"])
    }

    /// A command that runs `program` inside the namespace. The child is
    /// killed if the thread that started it dies (a lab that panicked or was
    /// killed leaves no guest running).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.name])
            .arg(program.as_ref());
        // SAFETY: prctl is async-signal-safe; the closure touches no memory
        // of the parent. `ip netns exec` execs the program in the same
        // process, which keeps the parent-death signal.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command
    }

    /// Starts `program ARGUMENTS` inside the namespace; its standard output
    /// is read line by line, its standard error goes to `log`.
    pub fn spawn(
        &self,
        name: &str,
        program: &str,
        arguments: &[String],
        log: &Path,
    ) -> anyhow::Result<Process> {
        let log = File::create(log).context("cannot create a lab log file")?;
        let mut child = self
            .command(program)
            .args(arguments)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {program} in namespace {}", self.name))?;
        let stdout = child.stdout.take().context("no standard output to read")?;
        let (sender, lines) = channel();
        std::thread::Builder::new()
            .name(format!("lab-{name}"))
            .spawn(move || {
                for text in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let line = Line {
                        at: Instant::now(),
                        text,
                    };
                    if sender.send(line).is_err() {
                        break;
                    }
                }
            })
            .context("cannot start a lab reader thread")?;
        Ok(Process {
            child,
            lines,
            name: name.to_owned(),
        })
    }

    /// Moves the calling thread into the namespace (only this thread:
    /// sockets it opens from now on live there).
    pub fn enter(&self) -> anyhow::Result<()> {
        let path = format!("/run/netns/{}", self.name);
        let namespace = File::open(&path).with_context(|| format!("cannot open {path}"))?;
        // SAFETY: setns on a namespace file we hold open; it only changes the
        // calling thread's network namespace.
        if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns into the lab namespace");
        }
        Ok(())
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        // Processes still inside would keep it alive: kill them first.
        kill_processes_in(&self.name);
        if let Err(error) = ip(&["netns", "del", &self.name]) {
            tracing::warn!("{error:#}");
        }
    }
}

/// A host of the lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    /// Runs the client workload.
    Client,
    /// Runs the primary.
    Primary,
    /// Runs the secondary.
    Secondary,
    /// Runs the witness (etcd).
    Witness,
}

impl Host {
    fn suffix(self) -> &'static str {
        match self {
            Host::Client => "c",
            Host::Primary => "p",
            Host::Secondary => "s",
            Host::Witness => "x",
        }
    }
}

/// The lab network: client, primary host, secondary host and switch.
pub struct Lab {
    client: Namespace,
    primary: Namespace,
    secondary: Namespace,
    witness: Namespace,
    switch: Namespace,
    /// Where child processes' standard error goes: a private directory
    /// (mode 0700, a fresh random name), removed with the lab.
    logs: tempfile::TempDir,
    /// The hosts' Noise keys, in `logs`.
    keys: LabKeys,
}

/// Key files of the lab's primary and secondary: each accepts the other.
/// Set (to anything) to keep each lab's private directory, with the logs of
/// the processes it ran, after the lab is gone.
pub const KEEP_LOGS: &str = "UNDERSTUDY_KEEP_LAB_LOGS";

struct LabKeys {
    primary: (PathBuf, PathBuf),
    secondary: (PathBuf, PathBuf),
}

impl Lab {
    /// Builds a lab; `round` makes the names unique within this process.
    pub fn build(round: u32) -> anyhow::Result<Self> {
        let make = |host: &str| Namespace::create(&format!("{round}{host}"));
        let mut logs = tempfile::Builder::new()
            .prefix("understudy-lab-")
            .tempdir()
            .context("cannot create the lab's private directory")?;
        if std::env::var_os(KEEP_LOGS).is_some() {
            // The processes' logs (and the lab's keys) outlive the lab.
            logs.disable_cleanup(true);
            eprintln!(
                "{KEEP_LOGS}: the lab's logs stay in {}",
                logs.path().display()
            );
        }
        let write_keys = |name: &str| -> anyhow::Result<(PathBuf, PathBuf)> {
            let keypair = KeyPair::generate()?;
            write_key_files(&logs.path().join(name), &keypair)
                .with_context(|| format!("cannot write the lab's {name} keys"))
        };
        let keys = LabKeys {
            primary: write_keys("primary")?,
            secondary: write_keys("secondary")?,
        };
        let lab = Self {
            switch: make("w")?,
            client: make(Host::Client.suffix())?,
            primary: make(Host::Primary.suffix())?,
            secondary: make(Host::Secondary.suffix())?,
            witness: make(Host::Witness.suffix())?,
            logs,
            keys,
        };
        lab.wire().context("cannot build the lab network")?;
        Ok(lab)
    }

    /// The namespace of `host`.
    pub fn host(&self, host: Host) -> &Namespace {
        match host {
            Host::Client => &self.client,
            Host::Primary => &self.primary,
            Host::Secondary => &self.secondary,
            Host::Witness => &self.witness,
        }
    }

    fn wire(&self) -> anyhow::Result<()> {
        let switch = &self.switch;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        for host in [Host::Client, Host::Primary, Host::Secondary, Host::Witness] {
            let inside = format!("{}0", host.suffix());
            let port = format!("v{}", host.suffix());
            ip(&[
                "link",
                "add",
                &inside,
                "netns",
                self.host(host).name(),
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                switch.name(),
            ])?;
            switch.ip(&["link", "set", &port, "master", "br0", "up"])?;
        }
        self.client
            .ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "c0"])?;
        self.client.ip(&["link", "set", "c0", "up"])?;
        self.witness
            .ip(&["addr", "add", &format!("{WITNESS_IP}/24"), "dev", "x0"])?;
        self.witness.ip(&["link", "set", "x0", "up"])?;
        for (host, address) in [
            (Host::Primary, "10.0.0.2/24"),
            (Host::Secondary, "10.0.0.3/24"),
        ] {
            let namespace = self.host(host);
            let uplink = format!("{}0", host.suffix());
            namespace.ip(&["link", "add", "br0", "type", "bridge"])?;
            namespace.ip(&["link", "set", &uplink, "master", "br0", "up"])?;
            namespace.ip(&["tuntap", "add", "dev", "tap0", "mode", "tap"])?;
            namespace.ip(&["link", "set", "tap0", "master", "br0", "up"])?;
            namespace.ip(&["addr", "add", address, "dev", "br0"])?;
            namespace.ip(&["link", "set", "br0", "up"])?;
        }
        Ok(())
    }

    /// Starts `program` with `arguments` on `host`; its standard output is
    /// read line by line, its standard error goes to a log file named `name`.
    pub fn spawn(
        &self,
        host: Host,
        name: &str,
        program: &str,
        arguments: &[String],
    ) -> anyhow::Result<Process> {
        self.host(host)
            .spawn(name, program, arguments, &self.log_path(name))
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.logs.path().join(format!("{name}.log"))
    }

    /// The lab's private directory (logs, keys).
    pub fn private_dir(&self) -> &Path {
        self.logs.path()
    }

    /// `--key` and `--peer-key` arguments for the process on `host`
    /// (primary or secondary; any other host gets the primary's): each
    /// accepts only the other.
    pub fn channel_arguments(&self, host: Host) -> Vec<String> {
        let (own, peer) = match host {
            Host::Secondary => (&self.keys.secondary, &self.keys.primary),
            _ => (&self.keys.primary, &self.keys.secondary),
        };
        vec![
            "--key".to_owned(),
            own.0.display().to_string(),
            "--peer-key".to_owned(),
            peer.1.display().to_string(),
        ]
    }

    /// Cuts `host` off the network: its switch port goes down, as when a
    /// host loses power or its uplink (nothing is closed, so nobody is told).
    pub fn isolate(&self, host: Host) -> anyhow::Result<()> {
        let port = format!("v{}", host.suffix());
        self.switch.ip(&["link", "set", &port, "down"])
    }

    /// Cuts the replication link only: the primary and secondary hosts can
    /// no longer reach each other (blackhole routes both ways), while the
    /// client still reaches the guest and both reach the witness.
    pub fn cut_replication(&self) -> anyhow::Result<()> {
        self.primary
            .ip(&["route", "add", "blackhole", &format!("{SECONDARY_IP}/32")])?;
        self.secondary
            .ip(&["route", "add", "blackhole", &format!("{PRIMARY_IP}/32")])
    }

    /// Frames the guest on `host` has sent out of its tap so far (the tap's
    /// receive counter on the host side).
    pub fn guest_frames_out(&self, host: Host) -> anyhow::Result<u64> {
        let output = self
            .host(host)
            .command("cat")
            .arg("/sys/class/net/tap0/statistics/rx_packets")
            .output()
            .context("cannot read the tap's counters")?;
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .context("the tap's counter is not a number")
    }

    /// Starts the witness (etcd) on the witness host; the hosts reach it at
    /// [`Lab::witness_url`].
    pub fn start_witness(&self) -> anyhow::Result<crate::etcd::Etcd> {
        crate::etcd::Etcd::start_wrapped(
            WITNESS_IP,
            WITNESS_PORT,
            WITNESS_PORT + 1,
            &["ip", "netns", "exec", self.witness.name()],
            || self.witness_reachable(),
        )
    }

    /// Whether the witness accepts connections (seen from the client host).
    pub fn witness_reachable(&self) -> bool {
        self.reachable_from_client(std::net::SocketAddr::from(([10, 0, 0, 4], WITNESS_PORT)))
    }

    /// The witness's URL for the hosts.
    pub fn witness_url() -> String {
        format!("http://{WITNESS_IP}:{WITNESS_PORT}")
    }

    /// Whether `address` accepts TCP connections as seen from the client host.
    pub fn reachable_from_client(&self, address: std::net::SocketAddr) -> bool {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.enter(Host::Client).is_ok()
                        && std::net::TcpStream::connect_timeout(
                            &address,
                            Duration::from_millis(200),
                        )
                        .is_ok()
                })
                .join()
                .unwrap_or(false)
        })
    }

    /// The last `lines` lines of the standard error of the process `name`.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Moves the calling thread into `host`'s network namespace.
    pub fn enter(&self, host: Host) -> anyhow::Result<()> {
        self.host(host).enter()
    }
}

// The namespaces and the private directory go with their fields.
