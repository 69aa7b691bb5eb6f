//! An etcd server for the witness (`etcd` from Debian's etcd-server), on a
//! loopback port or inside a lab namespace, with its data in a temporary
//! directory; killed and removed when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::tools::require_tool;

/// A running etcd.
pub struct Etcd {
    child: Child,
    /// The whole command line (wrapper included), to start it again.
    command: Vec<String>,
    data: PathBuf,
    /// Its client URL (`http://HOST:PORT`).
    pub url: String,
}

impl Etcd {
    /// Starts etcd on this host (`host`, a loopback address) on two free
    /// ports, its client URL in [`url`](Self::url). Ports found free can be
    /// taken by someone else before etcd binds them (tests run in
    /// parallel): a start that fails is tried again on other ports.
    pub fn start_on_free_ports(host: &str) -> anyhow::Result<Self> {
        let mut last_error = None;
        for _ in 0..5 {
            let (client_port, peer_port) = two_free_ports(host)?;
            let address = format!("{host}:{client_port}");
            match Self::start_wrapped(host, client_port, peer_port, &[], || {
                std::net::TcpStream::connect(&address).is_ok()
            }) {
                Ok(etcd) => return Ok(etcd),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.expect("five attempts were made"))
    }

    /// Starts etcd through `wrap` (e.g. `ip netns exec NS`); `ready` says
    /// when it accepts clients (from wherever they are).
    pub fn start_wrapped(
        host: &str,
        client_port: u16,
        peer_port: u16,
        wrap: &[&str],
        ready: impl Fn() -> bool,
    ) -> anyhow::Result<Self> {
        require_tool("etcd", "etcd-server")?;
        let data = std::env::temp_dir().join(format!(
            "understudy-etcd-{}-{client_port}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&data);
        let url = format!("http://{host}:{client_port}");
        let peer = format!("http://{host}:{peer_port}");
        let mut command: Vec<String> = wrap.iter().map(|part| (*part).to_owned()).collect();
        command.extend(
            [
                "etcd",
                "--name",
                "witness",
                "--data-dir",
                &data.to_string_lossy(),
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &format!("witness={peer}"),
            ]
            .map(String::from),
        );
        let child = spawn(&command)?;
        let mut etcd = Self {
            child,
            command,
            data,
            url,
        };
        etcd.wait_ready(ready)?;
        Ok(etcd)
    }

    /// Starts it again after [`kill`](Self::kill), with the data it had.
    pub fn restart(&mut self, ready: impl Fn() -> bool) -> anyhow::Result<()> {
        self.kill();
        self.child = spawn(&self.command)?;
        self.wait_ready(ready)
    }

    fn wait_ready(&mut self, ready: impl Fn() -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!("etcd exited at start: {status}");
            }
            if ready() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("etcd did not listen on {} within 20 s", self.url)
    }

    /// Kills it now (a witness failure).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two distinct ports free on `host` now.
fn two_free_ports(host: &str) -> anyhow::Result<(u16, u16)> {
    let bind =
        || std::net::TcpListener::bind((host, 0)).context("cannot find a free port for etcd");
    let (first, second) = (bind()?, bind()?);
    Ok((first.local_addr()?.port(), second.local_addr()?.port()))
}

fn spawn(command: &[String]) -> anyhow::Result<Child> {
    let (program, arguments) = command.split_first().context("an empty etcd command")?;
    Command::new(program)
        .args(arguments)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start etcd")
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}
