//! A small network of namespaces for drills and benchmarks: a client, a
//! primary host and a secondary host, joined by a switch (a bridge in a
//! namespace of its own). Each host bridges its uplink with a tap for the
//! guest, so the guest sits on the same Ethernet segment as the client
//! wherever it runs.
//!
//! ```text
//!  client ns          switch ns             primary ns              secondary ns
//!  c0 10.0.0.1 ---- vc [br0] vp ---- p0 [br0 10.0.0.2] tap0   s0 [br0 10.0.0.3] tap0
//!                          [br0] vs ------------------------------ s0
//! ```
//!
//! Everything is made with `ip` (iproute2) and removed when the [`Lab`] is
//! dropped: child processes are killed first, then the namespaces deleted.
//! Namespaces left by a lab whose process died are removed by the next one.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The guest's address on the lab network.
pub const GUEST_IP: &str = "10.0.0.10";
/// The secondary's replication address.
pub const SECONDARY_LISTEN: &str = "10.0.0.3:7000";
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

/// Prefix of every namespace a lab creates.
const PREFIX: &str = "usd";

/// A host of the lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    /// Runs the client workload.
    Client,
    /// Runs the primary.
    Primary,
    /// Runs the secondary.
    Secondary,
}

impl Host {
    fn suffix(self) -> &'static str {
        match self {
            Host::Client => "c",
            Host::Primary => "p",
            Host::Secondary => "s",
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

/// A process running in a lab namespace.
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

    /// Kills the process with SIGKILL now (a host failure) and reaps it.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().context("cannot kill a lab process")?;
        let _ = self.child.wait();
        Ok(())
    }

    /// Asks the process to stop (SIGINT) and waits up to `timeout`.
    pub fn interrupt(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: sending a signal to our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
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

/// The namespaces of one lab.
pub struct Lab {
    name: String,
    namespaces: Vec<String>,
    /// Where child processes' standard error goes.
    pub logs: PathBuf,
}

fn ip(arguments: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args(arguments)
        .output()
        .context("cannot run `ip` (install iproute2)")?;
    if !output.status.success() {
        bail!(
            "ip {} failed: {}",
            arguments.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Removes namespaces of labs whose process is gone.
fn remove_stale_namespaces() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').nth(1) else {
            continue;
        };
        if !pid.is_empty() && !PathBuf::from(format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

impl Lab {
    /// Builds a lab; `round` makes the names unique within this process.
    pub fn build(round: u32) -> anyhow::Result<Self> {
        if !PathBuf::from("/dev/net/tun").exists() {
            bail!(
                "/dev/net/tun is missing: the lab needs tap devices (run as root with the tun module)"
            );
        }
        remove_stale_namespaces();
        let name = format!("{PREFIX}{round}-{}", std::process::id());
        let logs = std::env::temp_dir().join(format!("understudy-lab-{name}"));
        std::fs::create_dir_all(&logs).context("cannot create the lab's log directory")?;
        let mut lab = Self {
            name,
            namespaces: Vec::new(),
            logs,
        };
        lab.create().context("cannot build the lab network")?;
        Ok(lab)
    }

    /// The namespace name of `host`.
    pub fn namespace(&self, host: Host) -> String {
        format!("{}-{}", self.name, host.suffix())
    }

    fn switch(&self) -> String {
        format!("{}-w", self.name)
    }

    fn create(&mut self) -> anyhow::Result<()> {
        let switch = self.switch();
        for namespace in [
            switch.clone(),
            self.namespace(Host::Client),
            self.namespace(Host::Primary),
            self.namespace(Host::Secondary),
        ] {
            ip(&["netns", "add", &namespace])?;
            self.namespaces.push(namespace.clone());
            ip(&["-n", &namespace, "link", "set", "lo", "up"])?;
        }
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;
        for host in [Host::Client, Host::Primary, Host::Secondary] {
            let namespace = self.namespace(host);
            let inside = format!("{}0", host.suffix());
            let port = format!("v{}", host.suffix());
            ip(&[
                "link", "add", &inside, "netns", &namespace, "type", "veth", "peer", "name", &port,
                "netns", &switch,
            ])?;
            ip(&["-n", &switch, "link", "set", &port, "master", "br0", "up"])?;
        }
        let client = self.namespace(Host::Client);
        ip(&["-n", &client, "addr", "add", "10.0.0.1/24", "dev", "c0"])?;
        ip(&["-n", &client, "link", "set", "c0", "up"])?;
        for (host, address) in [
            (Host::Primary, "10.0.0.2/24"),
            (Host::Secondary, "10.0.0.3/24"),
        ] {
            let namespace = self.namespace(host);
            let uplink = format!("{}0", host.suffix());
            ip(&["-n", &namespace, "link", "add", "br0", "type", "bridge"])?;
            ip(&[
                "-n", &namespace, "link", "set", &uplink, "master", "br0", "up",
            ])?;
            ip(&[
                "-n", &namespace, "tuntap", "add", "dev", "tap0", "mode", "tap",
            ])?;
            ip(&[
                "-n", &namespace, "link", "set", "tap0", "master", "br0", "up",
            ])?;
            ip(&["-n", &namespace, "addr", "add", address, "dev", "br0"])?;
            ip(&["-n", &namespace, "link", "set", "br0", "up"])?;
        }
        Ok(())
    }

    /// Starts `program` with `arguments` in `host`'s namespace; its
    /// standard output is read line by line, its standard error goes to a
    /// log file named `name`.
    pub fn spawn(
        &self,
        host: Host,
        name: &str,
        program: &str,
        arguments: &[String],
    ) -> anyhow::Result<Process> {
        let log = File::create(self.logs.join(format!("{name}.log")))
            .context("cannot create a lab log file")?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.namespace(host), program])
            .args(arguments)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {program} in the {host:?} namespace"))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (sender, lines) = channel();
        std::thread::Builder::new()
            .name(format!("lab-{name}"))
            .spawn(move || {
                for text in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if sender
                        .send(Line {
                            at: Instant::now(),
                            text,
                        })
                        .is_err()
                    {
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

    /// Cuts `host` off the network: its switch port goes down, as when a
    /// host loses power or its uplink (nothing is closed, so nobody is told).
    pub fn isolate(&self, host: Host) -> anyhow::Result<()> {
        let port = format!("v{}", host.suffix());
        ip(&["-n", &self.switch(), "link", "set", &port, "down"])
    }

    /// The last `lines` lines of the standard error of the process `name`.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let text =
            std::fs::read_to_string(self.logs.join(format!("{name}.log"))).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Moves the calling thread into `host`'s network namespace (only this
    /// thread: sockets it opens from now on live there).
    pub fn enter(&self, host: Host) -> anyhow::Result<()> {
        let path = format!("/run/netns/{}", self.namespace(host));
        let namespace = File::open(&path).with_context(|| format!("cannot open {path}"))?;
        // SAFETY: setns on a namespace file we hold open; it only changes the
        // calling thread's network namespace.
        if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns into the lab namespace");
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for namespace in self.namespaces.drain(..).rev() {
            // Processes still inside would keep it alive: kill them first.
            let _ = Command::new("ip")
                .args(["netns", "pids", &namespace])
                .output()
                .map(|output| {
                    for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
                        if let Ok(pid) = pid.parse::<i32>() {
                            // SAFETY: SIGKILL to a process in our own lab namespace.
                            unsafe { libc::kill(pid, libc::SIGKILL) };
                        }
                    }
                });
            if let Err(error) = ip(&["netns", "del", &namespace]) {
                tracing::warn!("{error:#}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.logs);
    }
}
