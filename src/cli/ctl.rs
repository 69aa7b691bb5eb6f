//! `understudy ctl`: the control API's client. Sends one request to a
//! running process's `--control` socket and prints the reply (or, for
//! `subscribe`, every event until interrupted).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use serde_json::{Value, json};

use super::parse_duration;

/// Arguments of `understudy ctl`.
#[derive(clap::Args, Debug)]
pub struct CtlArguments {
    /// The process's control socket (its `--control`).
    #[arg(long)]
    control: PathBuf,
    /// Print the whole reply line (with `id` and `ok`) instead of its result.
    #[arg(long, global = true)]
    raw: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

/// What to ask.
#[derive(clap::Subcommand, Debug)]
pub enum CtlCommand {
    /// Role, VM, protection, epochs, latencies, codec, held output.
    Status,
    /// Change live settings of a primary.
    Set {
        /// Target epoch (e.g. 50ms).
        #[arg(long)]
        epoch: Option<String>,
        /// Pause budget of the adaptive epoch policy (e.g. 2ms).
        #[arg(long)]
        max_pause: Option<String>,
        /// Page codec (applied by a full resynchronisation).
        #[arg(long)]
        codec: Option<String>,
    },
    /// Migrate the running guest to a target (`understudy secondary`).
    Migrate {
        /// The target's address.
        #[arg(long)]
        to: SocketAddr,
        /// precopy, postcopy or hybrid.
        #[arg(long, default_value = "precopy")]
        mode: String,
        /// Keep the guest's memory here this long after it left (pre-copy),
        /// listening on --listen for its return, which then sends only the
        /// pages it changed.
        #[arg(long, requires = "listen")]
        keep_image: Option<String>,
        /// With --keep-image: where to listen for the return.
        #[arg(long, requires = "keep_image")]
        listen: Option<SocketAddr>,
        /// Switch over once the estimated downtime is under this.
        #[arg(long)]
        max_downtime: Option<String>,
        /// Give up after this long.
        #[arg(long)]
        deadline: Option<String>,
        /// Page codec.
        #[arg(long)]
        codec: Option<String>,
        /// Have the target check the memory hash.
        #[arg(long)]
        verify: bool,
        /// When pre-copy does not converge: wait (until the deadline),
        /// throttle the guest, or abort.
        #[arg(long)]
        on_no_convergence: Option<String>,
    },
    /// Hand the guest over to the secondary (planned switchover).
    Switchover,
    /// Stop the process (a primary says goodbye to its secondary).
    Stop,
    /// Print events (failover, secondary lost, protection resumed, …) as
    /// they happen, until Ctrl-C.
    Subscribe,
    /// Send a request written as JSON (e.g. '{"command":"status"}').
    Send {
        /// The request.
        request: String,
    },
}

/// Sends the request and prints the reply.
pub fn ctl(arguments: CtlArguments) -> anyhow::Result<()> {
    let (request, follow, timeout) = match &arguments.command {
        CtlCommand::Status => (
            json!({"command": "status"}),
            false,
            Some(Duration::from_secs(10)),
        ),
        CtlCommand::Set {
            epoch,
            max_pause,
            codec,
        } => (
            without_nulls(
                json!({"command": "set", "epoch": epoch, "max_pause": max_pause, "codec": codec}),
            ),
            false,
            Some(Duration::from_secs(10)),
        ),
        CtlCommand::Migrate {
            to,
            mode,
            keep_image,
            listen,
            max_downtime,
            deadline,
            codec,
            verify,
            on_no_convergence,
        } => {
            for duration in [keep_image, max_downtime, deadline].into_iter().flatten() {
                parse_duration(duration).map_err(anyhow::Error::msg)?;
            }
            (
                without_nulls(
                    json!({"command": "migrate", "to": to.to_string(), "mode": mode,
                    "keep_image": keep_image, "listen": listen.map(|listen| listen.to_string()),
                    "max_downtime": max_downtime, "deadline": deadline, "codec": codec,
                    "verify": verify, "on_no_convergence": on_no_convergence}),
                ),
                false,
                None,
            )
        }
        CtlCommand::Switchover => (json!({"command": "switchover"}), false, None),
        CtlCommand::Stop => (
            json!({"command": "stop"}),
            false,
            Some(Duration::from_secs(10)),
        ),
        CtlCommand::Subscribe => (json!({"command": "subscribe"}), true, None),
        CtlCommand::Send { request } => (
            serde_json::from_str(request).map_err(|error| anyhow::anyhow!("not JSON: {error}"))?,
            false,
            None,
        ),
    };
    let mut request = request;
    if let Some(object) = request.as_object_mut() {
        object.entry("id").or_insert(json!(std::process::id()));
    }
    let raw = arguments.raw;
    let reply = crate::control::call(
        &arguments.control,
        &request,
        timeout,
        |line| crate::say!("{line}"),
        follow,
    )?;
    if follow {
        return Ok(());
    }
    if raw {
        crate::say!("{reply}");
    }
    if reply["ok"] == Value::Bool(true) {
        if !raw {
            crate::say!("{}", serde_json::to_string_pretty(&reply["result"])?);
        }
        return Ok(());
    }
    let error = &reply["error"];
    bail!(
        "{} ({})",
        error["message"].as_str().unwrap_or("the request failed"),
        error["code"].as_str().unwrap_or("?")
    )
}

fn without_nulls(mut value: Value) -> Value {
    if let Some(object) = value.as_object_mut() {
        object.retain(|_, field| !field.is_null() && *field != Value::Bool(false));
    }
    value
}
