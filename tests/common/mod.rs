//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::process::{Command, Output};

use understudy_lab::network::Namespace;

pub use understudy_vm::testing::require_kvm;

/// Runs the `understudy` binary with `args` and returns its output.
pub fn understudy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_understudy"))
        .args(args)
        .output()
        .expect("failed to start the understudy binary")
}

/// The JSON lines of a command's standard output.
pub fn json_lines(output: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

/// The first JSON line whose "event" is `event`.
pub fn event(lines: &[serde_json::Value], event: &str) -> serde_json::Value {
    lines
        .iter()
        .find(|line| line["event"] == event)
        .unwrap_or_else(|| panic!("no '{event}' line in {lines:?}"))
        .clone()
}

/// A free loopback address (bound, then released for a child to bind).
pub fn free_address() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port();
    format!("127.0.0.1:{port}")
}

/// Starts `understudy ARGS` with its JSON lines delivered on a channel.
pub fn spawn_json(
    args: &[&str],
) -> (
    std::process::Child,
    std::sync::mpsc::Receiver<serde_json::Value>,
) {
    spawn_json_program(env!("CARGO_BIN_EXE_understudy"), args)
}

/// Starts `program ARGS` with its JSON lines delivered on a channel.
pub fn spawn_json_program(
    program: &str,
    args: &[&str],
) -> (
    std::process::Child,
    std::sync::mpsc::Receiver<serde_json::Value>,
) {
    use std::io::BufRead;

    let mut child = Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start understudy");
    let stdout = child.stdout.take().expect("stdout");
    let (lines, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line)
                && lines.send(value).is_err()
            {
                return;
            }
        }
    });
    (child, receiver)
}

/// Collects lines into `seen` until one has `event`, and returns that one.
pub fn until_event(
    lines: &std::sync::mpsc::Receiver<serde_json::Value>,
    event: &str,
    timeout: std::time::Duration,
    seen: &mut Vec<serde_json::Value>,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no '{event}' line within {timeout:?}; saw {seen:?}"));
        seen.push(line.clone());
        if line["event"] == event {
            return line;
        }
    }
}

/// Runs `understudy drill ARGS --json`; fails the test, with every line
/// and stderr, unless every round passed; returns the summary and all lines.
pub fn drill(args: &[&str]) -> (serde_json::Value, Vec<serde_json::Value>) {
    let mut full = vec!["drill"];
    full.extend_from_slice(args);
    full.push("--json");
    let output = understudy(&full);
    let lines = json_lines(&output);
    assert!(
        output.status.success(),
        "the drill failed: {lines:?}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    (event(&lines, "summary"), lines)
}

/// A JSON number as u64.
pub fn u64_of(value: &serde_json::Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("not a u64: {value}"))
}

/// Asserts that each of `vcpus` counters advanced from `from` to `to`
/// (lists of `{counter, counter_hash}`) along an unbroken hash chain: no
/// gap, no repeat, no corruption.
pub fn assert_counter_chains_continue(
    from: &serde_json::Value,
    to: &serde_json::Value,
    vcpus: usize,
) {
    for vcpu in 0..vcpus {
        let start = u64_of(&from[vcpu]["counter"]);
        let start_hash = u64_of(&from[vcpu]["counter_hash"]);
        let end = u64_of(&to[vcpu]["counter"]);
        let end_hash = u64_of(&to[vcpu]["counter_hash"]);
        assert!(
            end > start,
            "vCPU {vcpu}: the counter did not advance ({start} -> {end})"
        );
        assert_eq!(
            understudy_guest_abi::counter_replay(start, start_hash, end),
            Some(end_hash),
            "vCPU {vcpu}: the chain from {start} to {end} is broken (a gap, a repeat or corruption)"
        );
    }
}

/// Fails the test unless `program` (from the Debian package `package`) is
/// installed; `.ci/run` installs what the tests need.
pub fn require_program(program: &str, package: &str) {
    if let Err(error) = understudy_lab::tools::require_tool(program, package) {
        panic!("this test needs a tool: {error:#}");
    }
}

/// A network namespace of the test's own (see [`understudy_lab::network`]).
pub fn namespace(tag: &str) -> Namespace {
    Namespace::create(tag).unwrap_or_else(|error| panic!("{error:#}"))
}

/// Starts `understudy ARGS` inside `namespace`, JSON lines on a channel.
pub fn spawn_json_in<S: AsRef<str>>(
    namespace: &Namespace,
    args: &[S],
) -> (
    std::process::Child,
    std::sync::mpsc::Receiver<serde_json::Value>,
) {
    let mut full = vec![
        "netns",
        "exec",
        namespace.name(),
        env!("CARGO_BIN_EXE_understudy"),
    ];
    full.extend(args.iter().map(AsRef::as_ref));
    spawn_json_program("ip", &full)
}

/// `--key`/`--peer-key` arguments for a test's `primary` or `secondary`
/// (any other role: the primary's); the keys are made once per test binary
/// under Cargo's target tmp directory, and each side accepts only the other.
pub fn channel_arguments(role: &str) -> Vec<String> {
    use understudy_checkpoint::channel::{KeyPair, write_key_files};
    static KEYS: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let directory = KEYS.get_or_init(|| {
        let directory = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&directory);
        std::fs::create_dir_all(&directory).expect("a key directory");
        for name in ["primary", "secondary"] {
            let keypair = KeyPair::generate().expect("a key pair");
            write_key_files(&directory.join(name), &keypair).expect("key files");
        }
        directory
    });
    let (own, peer) = if role == "secondary" {
        ("secondary", "primary")
    } else {
        ("primary", "secondary")
    };
    vec![
        "--key".to_owned(),
        directory.join(format!("{own}.key")).display().to_string(),
        "--peer-key".to_owned(),
        directory.join(format!("{peer}.pub")).display().to_string(),
    ]
}

/// The `Hello` a scripted primary of this build sends for VM `vm_id` with
/// `memory_bytes` of guest memory and one vCPU (owner 1, generation 0, no
/// version store, 10 ms heartbeats lost after 50 ms).
pub fn scripted_hello(vm_id: u64, memory_bytes: u64) -> understudy_checkpoint::protocol::Hello {
    use understudy_checkpoint::protocol::{Hello, PROTOCOL_VERSION, Purpose};
    Hello {
        version: PROTOCOL_VERSION,
        purpose: Purpose::Replicate,
        memory_bytes,
        vcpus: 1,
        guest_image_hash: understudy_vm::boot::guest_image_hash(),
        vm_id,
        owner: 1,
        generation: 0,
        store_pages: 0,
        heartbeat_interval: std::time::Duration::from_millis(10),
        heartbeat_timeout: std::time::Duration::from_millis(50),
        checkpoint_interval: std::time::Duration::from_millis(25),
        base_image: 0,
    }
}

/// A TCP relay from the source to the target that breaks its first
/// connection once `cut_after` bytes went from the source through it, and
/// then runs `on_cut`; later connections are relayed whole.
pub fn cutting_relay(
    target: String,
    cut_after: u64,
    on_cut: impl FnOnce() + Send + 'static,
) -> String {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
    let address = listener.local_addr().expect("relay address").to_string();
    let on_cut = std::sync::Mutex::new(Some(on_cut));
    let on_cut = std::sync::Arc::new(on_cut);
    std::thread::spawn(move || {
        for (index, source) in listener.incoming().enumerate() {
            let Ok(source) = source else { continue };
            let Ok(target) = TcpStream::connect(&target) else {
                continue;
            };
            let _ = (source.set_nodelay(true), target.set_nodelay(true));
            let (mut source_in, mut target_out) = (
                source.try_clone().expect("clone"),
                target.try_clone().expect("clone"),
            );
            let (mut target_in, mut source_out) = (target, source);
            let on_cut = on_cut.clone();
            let cut_here = index == 0;
            std::thread::spawn(move || {
                let mut buffer = vec![0u8; 64 << 10];
                let mut relayed = 0u64;
                while let Ok(read) = source_in.read(&mut buffer) {
                    if read == 0 || target_out.write_all(&buffer[..read]).is_err() {
                        break;
                    }
                    relayed += read as u64;
                    if cut_here && relayed >= cut_after {
                        let _ = source_in.shutdown(Shutdown::Both);
                        let _ = target_out.shutdown(Shutdown::Both);
                        if let Some(on_cut) = on_cut.lock().expect("cut once").take() {
                            on_cut();
                        }
                        break;
                    }
                }
                let _ = target_out.shutdown(Shutdown::Both);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut target_in, &mut source_out);
                let _ = source_out.shutdown(Shutdown::Both);
            });
        }
    });
    address
}

/// The highest epoch a primary's lines say was acknowledged.
pub fn last_acknowledged(primary_lines: &[serde_json::Value]) -> u64 {
    primary_lines
        .iter()
        .filter(|line| line["event"] == "ack")
        .map(|line| u64_of(&line["epoch"]))
        .max()
        .expect("acknowledgements")
}

/// A primary's `checkpoint` line of `epoch`.
pub fn checkpoint_of(primary_lines: &[serde_json::Value], epoch: u64) -> serde_json::Value {
    primary_lines
        .iter()
        .find(|line| line["event"] == "checkpoint" && line["epoch"] == epoch)
        .unwrap_or_else(|| panic!("the primary reported no checkpoint of epoch {epoch}"))
        .clone()
}
