//! The control API: every long-running `understudy` process (`primary`,
//! `secondary`, `run`, `migrate`) listens on a Unix socket (`--control
//! PATH`, mode 0600: only its owner may connect) and speaks JSON lines;
//! `understudy ctl` is its client, and `--metrics ADDR` serves the same
//! figures to Prometheus ([`telemetry`]).
//!
//! ```text
//! client                                   process
//!   {"id":1,"command":"status"}      ──▶
//!                                    ◀──   {"id":1,"ok":true,"result":{...}}
//!   {"id":2,"command":"set","epoch":"50ms"} ──▶
//!                                    ◀──   {"id":2,"ok":true,"result":{"applied":...}}
//!   {"id":3,"command":"migrate","to":"10.0.0.2:7000"} ──▶   (the main loop runs it)
//!                                    ◀──   {"id":3,"ok":true,"result":{"total_ms":...}}
//!   {"id":4,"command":"subscribe"}   ──▶
//!                                    ◀──   {"id":4,"ok":true,"result":{"subscribed":true}}
//!                                    ◀──   {"event":"secondary_lost","reason":...,"t_ms":...}
//!   garbage                          ──▶
//!                                    ◀──   {"id":null,"ok":false,"error":{"code":"malformed","message":...}}
//! ```
//!
//! Each client has a thread of its own (at most [`MAX_CLIENTS`]); requests
//! on one connection are answered in order. `status`, `set`, `stop` and
//! `subscribe` are answered by the client's thread; `migrate` and
//! `switchover` are queued to the process's main loop (one at a time:
//! another gets `busy`) and answered when they are done.
//!
//! Failure model: a malformed line, an unknown command or bad arguments get
//! an error reply and change nothing; a client that disconnects mid-request
//! loses the reply, not the operation; a subscriber that does not read is
//! dropped once [`EVENT_QUEUE`] events wait for it (the process never
//! blocks on a client). A stale socket file from a crashed process is
//! replaced; one a live process listens on is an error.

pub mod telemetry;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

pub use telemetry::{Role, Telemetry};

/// Clients connected at once; more are told `busy` and closed.
pub const MAX_CLIENTS: usize = 16;
/// Longest request line.
pub const MAX_LINE: u64 = 64 * 1024;
/// Events waiting for a subscriber before it is dropped.
pub const EVENT_QUEUE: usize = 1024;

/// Why the control socket cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum ControlSocketError {
    /// Another process answers on the path.
    #[error("{0} is in use by a running process")]
    InUse(PathBuf),
    /// Binding or securing the socket failed.
    #[error("cannot listen on the control socket {path}")]
    Listen {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A failed request: a stable code and a sentence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlError {
    /// `malformed`, `unknown_command`, `bad_argument`, `not_supported`,
    /// `busy` or `failed`.
    pub code: &'static str,
    /// What went wrong.
    pub message: String,
}

impl ControlError {
    /// An error with `code`.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// A command the main loop carries out.
#[derive(Clone, Debug)]
pub enum Request {
    /// Migrate the guest (the request's JSON arguments).
    Migrate(Value),
    /// Hand the guest over to the secondary.
    Switchover,
}

impl Request {
    fn name(&self) -> &'static str {
        match self {
            Self::Migrate(_) => "migrate",
            Self::Switchover => "switchover",
        }
    }
}

/// A queued request and where its reply goes.
pub struct Pending {
    /// What to do.
    pub request: Request,
    reply: Sender<Result<Value, ControlError>>,
}

impl Pending {
    /// Answers the client (gone clients are ignored).
    pub fn answer(self, result: Result<Value, ControlError>) {
        let _ = self.reply.send(result);
    }
}

/// Live settings a `set` asks for; the main loop applies them.
pub type Settings = serde_json::Map<String, Value>;

/// Runs on the client's thread as a main-loop request is queued (before
/// the main loop sees the interrupt): a request the main loop carries out
/// from inside a longer operation is announced to it here.
pub type QueueHook = dyn Fn(&Request) + Send + Sync;

/// Checks a `set` request's arguments; the role's own validation.
pub type SettingsCheck = dyn Fn(&Settings) -> Result<Value, ControlError> + Send + Sync;

struct Shared {
    telemetry: Arc<Telemetry>,
    stop: Arc<AtomicBool>,
    /// Set when a request is queued: long waits in the main loop end.
    interrupt: Arc<AtomicBool>,
    /// Main-loop commands accepted now.
    accepted: Mutex<Vec<&'static str>>,
    requests: Mutex<Sender<Pending>>,
    /// A main-loop request is queued or running.
    busy: AtomicBool,
    subscribers: Mutex<Vec<SyncSender<String>>>,
    settings: Mutex<Option<Box<SettingsCheck>>>,
    before_queue: Mutex<Option<Box<QueueHook>>>,
    clients: AtomicUsize,
    started: std::time::Instant,
}

/// The main loop's end of the control socket.
pub struct Control {
    shared: Arc<Shared>,
    requests: Receiver<Pending>,
    path: PathBuf,
}

impl Control {
    /// Listens on `path` (mode 0600) and serves clients on threads of
    /// their own. `stop` is what `stop` sets.
    pub fn start(
        path: &Path,
        telemetry: Arc<Telemetry>,
        stop: Arc<AtomicBool>,
    ) -> Result<Self, ControlSocketError> {
        let listener = bind_private(path)?;
        let (sender, requests) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared {
            telemetry,
            stop,
            interrupt: Arc::new(AtomicBool::new(false)),
            accepted: Mutex::new(Vec::new()),
            requests: Mutex::new(sender),
            busy: AtomicBool::new(false),
            subscribers: Mutex::new(Vec::new()),
            settings: Mutex::new(None),
            before_queue: Mutex::new(None),
            clients: AtomicUsize::new(0),
            started: std::time::Instant::now(),
        });
        let acceptor = shared.clone();
        std::thread::Builder::new()
            .name("control".to_owned())
            .spawn(move || accept_clients(&listener, &acceptor))
            .map_err(|source| ControlSocketError::Listen {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            shared,
            requests,
            path: path.to_owned(),
        })
    }

    /// Set when a request waits: pass it where the main loop waits long.
    pub fn interrupt(&self) -> Arc<AtomicBool> {
        self.shared.interrupt.clone()
    }

    /// The main-loop commands the process accepts from now on (others get
    /// `not_supported`).
    pub fn accept(&self, commands: &[&'static str]) {
        *self.shared.accepted.lock().expect("control lock poisoned") = commands.to_vec();
    }

    /// How `set` checks and stores settings (none: `set` is not supported).
    pub fn on_set(&self, check: Option<Box<SettingsCheck>>) {
        *self.shared.settings.lock().expect("control lock poisoned") = check;
    }

    /// What runs as a main-loop request is queued (see [`QueueHook`]).
    pub fn before_queue(&self, hook: Option<Box<QueueHook>>) {
        *self
            .shared
            .before_queue
            .lock()
            .expect("control lock poisoned") = hook;
    }

    /// The next queued request, if any (clears the interrupt).
    pub fn take_request(&self) -> Option<Pending> {
        match self.requests.try_recv() {
            Ok(pending) => Some(pending),
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => {
                self.shared.interrupt.store(false, Ordering::Relaxed);
                None
            }
        }
    }

    /// A request is done: others may be queued again.
    pub fn finished(&self, pending: Pending, result: Result<Value, ControlError>) {
        pending.answer(result);
        self.shared.busy.store(false, Ordering::Relaxed);
        self.shared.interrupt.store(false, Ordering::Relaxed);
    }

    /// Sends `event` (a JSON object with an `event` field) to subscribers.
    pub fn publish(&self, mut event: Value) {
        publish(&self.shared, &mut event);
    }
}

fn publish(shared: &Shared, event: &mut Value) {
    if let Some(object) = event.as_object_mut() {
        object.insert(
            "t_ms".to_owned(),
            json!(shared.started.elapsed().as_secs_f64() * 1e3),
        );
    }
    let line = event.to_string();
    let mut subscribers = shared.subscribers.lock().expect("control lock poisoned");
    // A subscriber that stopped reading (its queue full) or left is dropped.
    subscribers.retain(|subscriber| subscriber.try_send(line.clone()).is_ok());
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path` with mode 0600 from the start (no window in which others
/// could connect); replaces a stale socket file no process answers on.
fn bind_private(path: &Path) -> Result<UnixListener, ControlSocketError> {
    let error = |source| ControlSocketError::Listen {
        path: path.to_owned(),
        source,
    };
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ControlSocketError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(error)?;
    }
    // SAFETY: umask only changes this process's file-creation mask; it is
    // restored right after the bind.
    let previous = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(previous) };
    let listener = bound.map_err(error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(error)?;
    Ok(listener)
}

fn accept_clients(listener: &UnixListener, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        if shared.clients.load(Ordering::Relaxed) >= MAX_CLIENTS {
            let _ = writeln!(
                stream,
                "{}",
                error_reply(
                    &Value::Null,
                    &ControlError::new("busy", "too many control clients")
                )
            );
            continue;
        }
        shared.clients.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("control-client".to_owned())
            .spawn(move || {
                serve_client(stream, &shared);
                shared.clients.fetch_sub(1, Ordering::Relaxed);
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start a control client thread");
        }
    }
}

fn error_reply(id: &Value, error: &ControlError) -> Value {
    json!({"id": id, "ok": false, "error": {"code": error.code, "message": error.message}})
}

/// One client: request lines in, replies (and events, once subscribed) out.
fn serve_client(stream: UnixStream, shared: &Arc<Shared>) {
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    let writer = Arc::new(Mutex::new(writer));
    let write_line = |line: &str| -> bool {
        let mut writer = writer.lock().expect("control writer lock poisoned");
        writeln!(writer, "{line}").is_ok()
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        let read = (&mut reader)
            .take(MAX_LINE + 1)
            .read_until(b'\n', &mut line);
        match read {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.len() as u64 > MAX_LINE {
            let error = ControlError::new(
                "malformed",
                format!("a request line is longer than {MAX_LINE} bytes"),
            );
            write_line(&error_reply(&Value::Null, &error).to_string());
            return;
        }
        let (id, result) = match serde_json::from_slice::<Value>(&line) {
            Ok(Value::Object(request)) => {
                let id = request.get("id").cloned().unwrap_or(Value::Null);
                (id, handle(&request, shared, &writer))
            }
            Ok(_) => (
                Value::Null,
                Err(ControlError::new("malformed", "a request is a JSON object")),
            ),
            Err(error) => (
                Value::Null,
                Err(ControlError::new("malformed", format!("not JSON: {error}"))),
            ),
        };
        let reply = match result {
            Ok(result) => json!({"id": id, "ok": true, "result": result}),
            Err(error) => error_reply(&id, &error),
        };
        if !write_line(&reply.to_string()) {
            return;
        }
    }
}

fn handle(
    request: &serde_json::Map<String, Value>,
    shared: &Arc<Shared>,
    writer: &Arc<Mutex<UnixStream>>,
) -> Result<Value, ControlError> {
    let command = request
        .get("command")
        .and_then(Value::as_str)
        .ok_or_else(|| ControlError::new("malformed", "a request names its \"command\""))?;
    match command {
        "status" => Ok(shared.telemetry.status_json()),
        "stop" => {
            shared.stop.store(true, Ordering::Relaxed);
            shared.interrupt.store(true, Ordering::Relaxed);
            Ok(json!({"stopping": true}))
        }
        "set" => {
            let mut settings = request.clone();
            settings.remove("id");
            settings.remove("command");
            let check = shared.settings.lock().expect("control lock poisoned");
            match check.as_ref() {
                Some(check) => check(&settings),
                None => Err(ControlError::new(
                    "not_supported",
                    "this process has no live settings (only a primary has)",
                )),
            }
        }
        "subscribe" => {
            let (sender, events) = std::sync::mpsc::sync_channel::<String>(EVENT_QUEUE);
            let writer = writer.clone();
            std::thread::Builder::new()
                .name("control-events".to_owned())
                .spawn(move || {
                    for line in events {
                        let mut writer = writer.lock().expect("control writer lock poisoned");
                        if writeln!(writer, "{line}").is_err() {
                            return;
                        }
                    }
                })
                .map_err(|error| ControlError::new("failed", error.to_string()))?;
            shared
                .subscribers
                .lock()
                .expect("control lock poisoned")
                .push(sender);
            Ok(json!({"subscribed": true}))
        }
        "migrate" | "switchover" => {
            let request = if command == "migrate" {
                Request::Migrate(Value::Object(request.clone()))
            } else {
                Request::Switchover
            };
            queue(shared, request)
        }
        other => Err(ControlError::new(
            "unknown_command",
            format!(
                "unknown command {other:?}: status, set, migrate, switchover, stop or subscribe"
            ),
        )),
    }
}

/// Queues a main-loop request and waits for its answer.
fn queue(shared: &Shared, request: Request) -> Result<Value, ControlError> {
    let name = request.name();
    if !shared
        .accepted
        .lock()
        .expect("control lock poisoned")
        .contains(&name)
    {
        return Err(ControlError::new(
            "not_supported",
            format!(
                "{name} is not possible here now (this process is a {} in state {})",
                shared.telemetry.status_json()["role"]
                    .as_str()
                    .unwrap_or("?"),
                shared.telemetry.status_json()["state"]
                    .as_str()
                    .unwrap_or("?")
            ),
        ));
    }
    if shared.busy.swap(true, Ordering::Relaxed) {
        return Err(ControlError::new(
            "busy",
            "another migrate or switchover is under way",
        ));
    }
    if let Some(hook) = shared
        .before_queue
        .lock()
        .expect("control lock poisoned")
        .as_ref()
    {
        hook(&request);
    }
    let (reply, answer) = std::sync::mpsc::channel();
    let sent = shared
        .requests
        .lock()
        .expect("control lock poisoned")
        .send(Pending { request, reply });
    if sent.is_err() {
        shared.busy.store(false, Ordering::Relaxed);
        return Err(ControlError::new("failed", "the process is stopping"));
    }
    shared.interrupt.store(true, Ordering::Relaxed);
    answer.recv().unwrap_or_else(|_| {
        shared.busy.store(false, Ordering::Relaxed);
        Err(ControlError::new(
            "failed",
            "the process ended before it answered",
        ))
    })
}

/// Parses a duration argument of a request (`"25ms"`, `"2s"`).
pub fn duration_argument(
    request: &serde_json::Map<String, Value>,
    name: &str,
) -> Result<Option<Duration>, ControlError> {
    match request.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => crate::cli::parse_duration(text)
            .map(Some)
            .map_err(|error| ControlError::new("bad_argument", format!("{name}: {error}"))),
        Some(other) => Err(ControlError::new(
            "bad_argument",
            format!("{name}: expected a duration such as \"25ms\", got {other}"),
        )),
    }
}

/// Connects to a control socket, sends `request`, and returns the reply
/// (and, with `follow`, passes every later line to `on_line`).
pub fn call(
    path: &Path,
    request: &Value,
    timeout: Option<Duration>,
    mut on_line: impl FnMut(&Value),
    follow: bool,
) -> anyhow::Result<Value> {
    use anyhow::Context;
    let mut stream = UnixStream::connect(path)
        .with_context(|| format!("cannot reach the control socket {}", path.display()))?;
    stream.set_read_timeout(timeout)?;
    writeln!(stream, "{request}")?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .context("the process did not answer")?;
    if line.is_empty() {
        anyhow::bail!("the process closed the control connection without answering");
    }
    let reply: Value = serde_json::from_str(&line).context("the process's answer is not JSON")?;
    if follow && reply["ok"] == Value::Bool(true) {
        on_line(&reply);
        for line in reader.lines() {
            let line = line?;
            if let Ok(event) = serde_json::from_str::<Value>(&line) {
                on_line(&event);
            }
        }
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> (tempfile::TempDir, Control) {
        let directory = tempfile::tempdir().expect("temp dir");
        let path = directory.path().join("control.sock");
        let control = Control::start(
            &path,
            Arc::new(Telemetry::new(Role::Primary)),
            Arc::new(AtomicBool::new(false)),
        )
        .expect("control socket");
        (directory, control)
    }

    fn ask(control: &Control, request: Value) -> Value {
        call(
            &control.path,
            &request,
            Some(Duration::from_secs(5)),
            |_| {},
            false,
        )
        .expect("a reply")
    }

    #[test]
    fn socket_is_private_to_its_owner() {
        let (_directory, control) = server();

        let mode = std::fs::metadata(&control.path)
            .expect("socket")
            .permissions()
            .mode();

        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn status_answers_with_the_request_id() {
        let (_directory, control) = server();

        let reply = ask(&control, json!({"id": 7, "command": "status"}));

        assert_eq!(reply["id"], 7);
        assert_eq!(reply["ok"], true);
        assert_eq!(reply["result"]["role"], "primary");
    }

    #[test]
    fn malformed_line_gets_an_error_and_the_connection_goes_on() {
        let (_directory, control) = server();
        let mut stream = UnixStream::connect(&control.path).expect("connect");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));

        writeln!(stream, "this is not json").expect("write");
        let mut first = String::new();
        reader.read_line(&mut first).expect("reply");
        writeln!(stream, "{}", json!({"id": "b", "command": "status"})).expect("write");
        let mut second = String::new();
        reader.read_line(&mut second).expect("reply");

        let first: Value = serde_json::from_str(&first).expect("json");
        let second: Value = serde_json::from_str(&second).expect("json");
        assert_eq!(first["error"]["code"], "malformed");
        assert_eq!(second["ok"], true);
    }

    #[test]
    fn unknown_command_is_named_in_the_error() {
        let (_directory, control) = server();

        let reply = ask(&control, json!({"id": 1, "command": "explode"}));

        assert_eq!(reply["error"]["code"], "unknown_command");
    }

    #[test]
    fn main_loop_command_not_accepted_now_is_not_supported() {
        let (_directory, control) = server();

        let reply = ask(&control, json!({"id": 1, "command": "switchover"}));

        assert_eq!(reply["error"]["code"], "not_supported");
    }

    #[test]
    fn queued_request_is_answered_by_the_main_loop() {
        let (_directory, control) = server();
        control.accept(&["switchover"]);
        let path = control.path.clone();
        let client = std::thread::spawn(move || {
            call(
                &path,
                &json!({"id": 2, "command": "switchover"}),
                None,
                |_| {},
                false,
            )
        });

        let pending = loop {
            if let Some(pending) = control.take_request() {
                break pending;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        control.finished(pending, Ok(json!({"done": true})));
        let reply = client.join().expect("client").expect("reply");

        assert_eq!(reply["result"]["done"], true);
    }

    #[test]
    fn socket_a_live_process_answers_on_is_refused() {
        let (directory, _control) = server();

        let second = Control::start(
            &directory.path().join("control.sock"),
            Arc::new(Telemetry::new(Role::Secondary)),
            Arc::new(AtomicBool::new(false)),
        );

        assert!(matches!(second, Err(ControlSocketError::InUse(_))));
    }

    #[test]
    fn stale_socket_file_is_replaced() {
        let directory = tempfile::tempdir().expect("temp dir");
        let path = directory.path().join("control.sock");
        drop(UnixListener::bind(&path).expect("bind"));

        let control = Control::start(
            &path,
            Arc::new(Telemetry::new(Role::Secondary)),
            Arc::new(AtomicBool::new(false)),
        );

        assert!(control.is_ok());
    }
}
