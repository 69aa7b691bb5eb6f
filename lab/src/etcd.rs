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
    data: PathBuf,
    /// Its client URL (`http://HOST:PORT`).
    pub url: String,
}

impl Etcd {
    /// Starts etcd on this host, listening for clients on
    /// `host:client_port` (peers on `client_port + 1`).
    pub fn start(host: &str, client_port: u16) -> anyhow::Result<Self> {
        let address = format!("{host}:{client_port}");
        Self::start_wrapped(host, client_port, &[], || {
            std::net::TcpStream::connect(&address).is_ok()
        })
    }

    /// Starts etcd through `wrap` (e.g. `ip netns exec NS`); `ready` says
    /// when it accepts clients (from wherever they are).
    pub fn start_wrapped(
        host: &str,
        client_port: u16,
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
        let peer = format!("http://{host}:{}", client_port + 1);
        let mut command = match wrap.split_first() {
            Some((program, arguments)) => {
                let mut command = Command::new(program);
                command.args(arguments).arg("etcd");
                command
            }
            None => Command::new("etcd"),
        };
        let child = command
            .args(["--name", "witness", "--data-dir"])
            .arg(&data)
            .args([
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
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start etcd")?;
        let mut etcd = Self { child, data, url };
        etcd.wait_ready(ready)?;
        Ok(etcd)
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

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}
