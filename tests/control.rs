//! The control API on real processes: `ctl status` on each role, errors
//! that leave the process running, two clients at once, a private socket,
//! live settings, Prometheus metrics, events; and migrations asked for on
//! the socket that fail at each point before the handover, leaving the
//! guest running where it was; and a back-and-forth migration that sends
//! back only what changed.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::{channel_arguments, free_address, require_kvm, u64_of, understudy};

/// A scratch directory for sockets.
fn socket_path(name: &str) -> PathBuf {
    let directory =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("ctl-{}", std::process::id()));
    std::fs::create_dir_all(&directory).expect("socket directory");
    directory.join(name)
}

/// Starts `understudy ARGS` in the background, output discarded.
fn start(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_understudy"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start understudy")
}

/// One request on a fresh connection; the reply.
fn ask(socket: &Path, request: &Value) -> Value {
    let mut stream = UnixStream::connect(socket).expect("connect to the control socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    writeln!(stream, "{request}").expect("send");
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).expect("reply");
    serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line:?}"))
}

/// `status` once `ready` holds for it (the socket may not exist yet).
fn status_when(socket: &Path, timeout: Duration, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + timeout;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        if socket.exists()
            && let Ok(mut stream) = UnixStream::connect(socket)
        {
            let _ = writeln!(stream, "{}", json!({"command": "status"}));
            let mut line = String::new();
            if BufReader::new(stream).read_line(&mut line).is_ok()
                && let Ok(reply) = serde_json::from_str::<Value>(&line)
            {
                last = reply["result"].clone();
                if ready(&last) {
                    return last;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("status never became ready within {timeout:?}; last: {last}");
}

fn stop(mut child: Child, socket: &Path) -> std::process::ExitStatus {
    let reply = ask(socket, &json!({"command": "stop"}));
    assert_eq!(reply["ok"], true, "stop refused: {reply}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "the process did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn each_role_reports_its_status_and_survives_bad_requests() {
    if !require_kvm() {
        return;
    }
    // Arrange: a secondary and a primary, each with a control socket.
    let address = free_address();
    let metrics = free_address();
    let (primary_socket, secondary_socket) = (socket_path("p.sock"), socket_path("s.sock"));
    // Patient heartbeats: a busy debug-build machine must not lose a peer.
    let mut secondary_args = vec![
        "secondary",
        "--heartbeat-misses",
        "50",
        "--listen",
        &address,
        "--control",
    ];
    let secondary_socket_text = secondary_socket.display().to_string();
    secondary_args.push(&secondary_socket_text);
    let keys = channel_arguments("secondary");
    secondary_args.extend(keys.iter().map(String::as_str));
    let secondary = start(&secondary_args);
    std::thread::sleep(Duration::from_millis(300));
    let primary_socket_text = primary_socket.display().to_string();
    let mut primary_args = vec![
        "primary",
        "--heartbeat-misses",
        "50",
        "--secondary",
        &address,
        "--workload",
        "counter",
        "--memory",
        "64M",
        "--control",
        &primary_socket_text,
        "--metrics",
        &metrics,
    ];
    let keys = channel_arguments("primary");
    primary_args.extend(keys.iter().map(String::as_str));
    let primary = start(&primary_args);

    // Act: status once protected, on both.
    let on_primary = status_when(&primary_socket, Duration::from_secs(60), |status| {
        status["protected"] == true && status["last_acknowledged_epoch"].as_u64() >= Some(3)
    });
    let on_secondary = status_when(&secondary_socket, Duration::from_secs(30), |status| {
        status["committed_epoch"].as_u64() >= Some(3)
    });

    // Assert: the documented fields.
    assert_eq!(on_primary["role"], "primary");
    assert_eq!(on_primary["state"], "protecting");
    assert!(on_primary["vm_id"].is_string(), "{on_primary}");
    assert!(on_primary["generation"].is_u64(), "{on_primary}");
    assert!(on_primary["epoch"].is_u64(), "{on_primary}");
    assert!(on_primary["lag_epochs"].is_u64(), "{on_primary}");
    assert!(on_primary["pause"]["p99_us"].is_f64(), "{on_primary}");
    assert!(on_primary["ack_latency"]["p50_us"].is_f64(), "{on_primary}");
    assert!(on_primary["codec"].is_string(), "{on_primary}");
    assert!(on_primary["compression_ratio"].is_f64(), "{on_primary}");
    assert!(on_primary["why_not_protected"].is_null(), "{on_primary}");
    assert_eq!(on_secondary["role"], "secondary");
    assert_eq!(on_secondary["vm_id"], on_primary["vm_id"]);
    assert_eq!(on_secondary["protected"], true);

    // Assert: the socket is its owner's only.
    let mode = std::fs::metadata(&primary_socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o077,
        0,
        "the control socket is accessible to others: {mode:o}"
    );

    // Act and assert: a malformed line and an unknown command get errors on
    // a connection that stays usable, while a second client subscribes.
    let mut subscriber = UnixStream::connect(&primary_socket).expect("second client");
    writeln!(
        subscriber,
        "{}",
        json!({"id": "sub", "command": "subscribe"})
    )
    .expect("subscribe");
    let mut events = BufReader::new(subscriber.try_clone().expect("clone"));
    let mut subscribed = String::new();
    events.read_line(&mut subscribed).expect("subscribed");
    assert!(subscribed.contains("\"subscribed\":true"), "{subscribed}");
    let mut client = UnixStream::connect(&primary_socket).expect("client");
    let mut replies = BufReader::new(client.try_clone().expect("clone"));
    let mut reply = String::new();
    writeln!(client, "{{this is not json").expect("write");
    replies.read_line(&mut reply).expect("reply");
    let malformed: Value = serde_json::from_str(&reply).expect("JSON");
    assert_eq!(malformed["error"]["code"], "malformed");
    reply.clear();
    writeln!(client, "{}", json!({"id": 2, "command": "self-destruct"})).expect("write");
    replies.read_line(&mut reply).expect("reply");
    let unknown: Value = serde_json::from_str(&reply).expect("JSON");
    assert_eq!(unknown["id"], 2);
    assert_eq!(unknown["error"]["code"], "unknown_command");
    let bad_setting = ask(&primary_socket, &json!({"command": "set", "epoch": "soon"}));
    assert_eq!(bad_setting["error"]["code"], "bad_argument");

    // Act and assert: a live setting changes what status reports.
    let set = ask(&primary_socket, &json!({"command": "set", "epoch": "40ms"}));
    assert_eq!(set["ok"], true, "{set}");
    let retuned = status_when(&primary_socket, Duration::from_secs(10), |status| {
        status["settings"]["epoch_ms"] == 40.0
    });
    assert_eq!(retuned["protected"], true);

    // Act and assert: metrics, with conventional names.
    let mut http = std::net::TcpStream::connect(&metrics).expect("metrics endpoint");
    write!(http, "GET /metrics HTTP/1.0\r\n\r\n").expect("request");
    let mut text = String::new();
    std::io::Read::read_to_string(&mut http, &mut text).expect("metrics");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("understudy_checkpoints_total"), "{text}");
    assert!(
        text.contains("understudy_checkpoint_pause_seconds_bucket"),
        "{text}"
    );
    assert!(text.contains("understudy_protected 1"), "{text}");

    // Act: stop the secondary: the primary loses it and tells its
    // subscriber; then stop the primary.
    let secondary_status = stop(secondary, &secondary_socket);
    subscriber
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let lost = loop {
        let mut line = String::new();
        events.read_line(&mut line).expect("an event");
        let event: Value = serde_json::from_str(&line).expect("an event line");
        if event["event"] == "secondary_lost" {
            break event;
        }
    };
    let unprotected = status_when(&primary_socket, Duration::from_secs(10), |status| {
        status["protected"] == false
    });
    let primary_status = stop(primary, &primary_socket);

    // Assert: the event, the status that explains it, clean exits.
    assert!(lost["reason"].is_string(), "{lost}");
    assert!(lost["t_ms"].is_f64(), "{lost}");
    assert_eq!(unprotected["state"], "unprotected");
    assert!(
        unprotected["why_not_protected"]
            .as_str()
            .is_some_and(|why| why.contains("secondary was lost")),
        "{unprotected}"
    );
    assert!(
        primary_status.success(),
        "the primary failed: {primary_status}"
    );
    assert!(
        secondary_status.success(),
        "the secondary failed: {secondary_status}"
    );
    assert!(!primary_socket.exists(), "the socket file stayed behind");
}

/// A `run` guest running `workload`, with a control socket; its socket.
fn run_guest(name: &str, workload: &str) -> (Child, PathBuf) {
    let socket = socket_path(name);
    let socket_text = socket.display().to_string();
    let mut args = vec![
        "run",
        "--workload",
        workload,
        "--memory",
        "64M",
        "--control",
        &socket_text,
    ];
    let keys = channel_arguments("primary");
    args.extend(keys.iter().map(String::as_str));
    let child = start(&args);
    status_when(&socket, Duration::from_secs(30), |status| {
        status["guest_progress"]["pages_written"][0].as_u64() > Some(0)
            || status["guest_progress"]["counters"][0].as_u64() > Some(0)
    });
    (child, socket)
}

/// The guest's first counter, as `status` reports it, once it moved past `after`.
fn counter_after(socket: &Path, after: u64) -> u64 {
    progress_after(socket, "counters", after)
}

/// The guest's progress figure `field` (of vCPU 0), once past `after`.
fn progress_after(socket: &Path, field: &str, after: u64) -> u64 {
    let status = status_when(socket, Duration::from_secs(10), |status| {
        status["guest_progress"][field][0].as_u64() > Some(after)
    });
    u64_of(&status["guest_progress"][field][0])
}

/// Asks `socket` to migrate with `arguments`; asserts it failed with a
/// reply that says the guest runs on here, and that it does.
fn assert_failed_migration_keeps_the_guest(socket: &Path, arguments: Value, case: &str) {
    let before = progress_after(socket, "pages_written", 0);
    let mut request = json!({"command": "migrate"});
    request
        .as_object_mut()
        .expect("object")
        .extend(arguments.as_object().expect("object").clone());

    let reply = ask(socket, &request);

    assert_eq!(
        reply["ok"], false,
        "{case}: the migration should have failed: {reply}"
    );
    let message = reply["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains("the guest keeps running here"),
        "{case}: the reply does not say where the guest is: {reply}"
    );
    let after = progress_after(socket, "pages_written", before);
    assert!(after > before, "{case}: the guest did not run on");
}

#[test]
fn a_migration_that_fails_before_the_handover_leaves_the_guest_running() {
    if !require_kvm() {
        return;
    }
    // A guest that keeps writing memory: pre-copy always has pages left.
    let (guest, socket) = run_guest("failing.sock", "memtouch:rate=max,wss=8M,pattern=random");

    // No target at all.
    assert_failed_migration_keeps_the_guest(&socket, json!({"to": free_address()}), "no target");

    // A target that refuses this source (it does not list the source's key).
    let refusing_address = free_address();
    let mut refusing_args = vec!["secondary", "--listen", &refusing_address];
    let wrong_keys = channel_arguments("primary");
    refusing_args.extend(wrong_keys.iter().map(String::as_str));
    let mut refusing = start(&refusing_args);
    std::thread::sleep(Duration::from_millis(300));
    assert_failed_migration_keeps_the_guest(&socket, json!({"to": refusing_address}), "refused");
    let _ = refusing.kill();
    let _ = refusing.wait();

    // A target killed while the first pre-copy round is under way: a relay
    // that cuts the connection once 16 KiB went through (the guest's
    // non-zero memory is larger), and kills it.
    let target_address = free_address();
    let mut target_args = vec!["secondary", "--listen", &target_address];
    let keys = channel_arguments("secondary");
    target_args.extend(keys.iter().map(String::as_str));
    let mut target = start(&target_args);
    std::thread::sleep(Duration::from_millis(300));
    let target_pid = target.id();
    let relay = common::cutting_relay(target_address, 16 * 1024, move || {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(target_pid.cast_signed(), libc::SIGKILL) };
    });
    assert_failed_migration_keeps_the_guest(&socket, json!({"to": relay}), "target killed");
    let _ = target.wait();

    // The deadline passes (a downtime target no migration can meet).
    let patient_address = free_address();
    let mut patient_args = vec!["secondary", "--listen", &patient_address];
    patient_args.extend(keys.iter().map(String::as_str));
    let mut patient = start(&patient_args);
    std::thread::sleep(Duration::from_millis(300));
    assert_failed_migration_keeps_the_guest(
        &socket,
        json!({"to": patient_address, "max_downtime": "0ms", "deadline": "500ms",
               "on_no_convergence": "wait"}),
        "deadline",
    );

    // A hybrid migration whose link breaks before the post-copy started.
    let hybrid_relay = common::cutting_relay(patient_address.clone(), 16 * 1024, || {});
    assert_failed_migration_keeps_the_guest(
        &socket,
        json!({"to": hybrid_relay, "mode": "hybrid"}),
        "hybrid before its switchover",
    );
    let _ = patient.kill();
    let _ = patient.wait();

    // Assert: after all that, the guest stops cleanly where it always was.
    let status = stop(guest, &socket);
    assert!(status.success(), "the guest's process failed: {status}");
}

/// A process that waits for a migration (plaintext), with a control socket.
fn target(name: &str) -> (Child, String, PathBuf) {
    let address = free_address();
    let socket = socket_path(name);
    let socket_text = socket.display().to_string();
    let child = start(&[
        "secondary",
        "--listen",
        &address,
        "--control",
        &socket_text,
        "--plaintext",
    ]);
    std::thread::sleep(Duration::from_millis(300));
    (child, address, socket)
}

fn migrate(socket: &Path, arguments: Value) -> Value {
    let mut request = json!({"command": "migrate", "verify": true});
    request
        .as_object_mut()
        .expect("object")
        .extend(arguments.as_object().expect("object").clone());
    let reply = ask(socket, &request);
    assert_eq!(reply["ok"], true, "the migration failed: {reply}");
    reply["result"].clone()
}

#[test]
fn a_guest_migrated_back_sends_only_what_changed_and_a_stale_image_is_not_used() {
    if !require_kvm() {
        return;
    }
    // Arrange: a counter guest on A (plaintext links), targets B and C.
    let socket = socket_path("a.sock");
    let socket_text = socket.display().to_string();
    let on_a = start(&[
        "run",
        "--workload",
        "counter",
        "--memory",
        "256M",
        "--control",
        &socket_text,
        "--plaintext",
    ]);
    let a_socket = socket;
    counter_after(&a_socket, 0);
    let (b, b_address, b_socket) = target("b.sock");
    let (c, c_address, c_socket) = target("c.sock");
    let (a_return, b_return) = (free_address(), free_address());

    // Act: A → B keeping A's image; B → A (the return trip).
    let away = migrate(
        &a_socket,
        json!({"to": b_address, "keep_image": "2m", "listen": a_return}),
    );
    let vm_id = status_when(&b_socket, Duration::from_secs(10), |status| {
        status["guest_progress"]["counters"][0].as_u64() > Some(0)
    })["vm_id"]
        .clone();
    let back = migrate(&b_socket, json!({"to": a_return}));

    // Assert: the return built on A's image and sent a small part of what
    // the first trip sent; the memory hash matched (verify); the guest runs
    // on A again, the same VM.
    assert_eq!(back["used_base_image"], true, "{back}");
    let (first, returned) = (u64_of(&away["pages"]), u64_of(&back["pages"]));
    assert!(
        returned * 4 < first,
        "the return sent {returned} pages, the first trip {first}"
    );
    let on_a_again = status_when(&a_socket, Duration::from_secs(10), |status| {
        status["role"] == "standalone" && status["guest_progress"]["counters"][0].as_u64() > Some(0)
    });
    assert_eq!(on_a_again["vm_id"], vm_id);

    // Act: A → D (a fresh target; B left with the guest) keeping a new
    // image, D → C keeping D's image, and C → A, naming D's image, not
    // A's: a stale offer.
    let (d, d_address, d_socket) = target("d.sock");
    migrate(
        &a_socket,
        json!({"to": d_address, "keep_image": "2m", "listen": a_return}),
    );
    counter_after(&d_socket, 0);
    migrate(
        &d_socket,
        json!({"to": c_address, "keep_image": "2m", "listen": b_return}),
    );
    counter_after(&c_socket, 0);
    let home = migrate(&c_socket, json!({"to": a_return}));

    // Assert: A did not build on its image for a guest that came from
    // elsewhere: a whole copy, verified.
    assert_eq!(home["used_base_image"], false, "{home}");
    let on_a_last = status_when(&a_socket, Duration::from_secs(10), |status| {
        status["role"] == "standalone" && status["guest_progress"]["counters"][0].as_u64() > Some(0)
    });
    assert_eq!(on_a_last["vm_id"], vm_id);
    let status = stop(on_a, &a_socket);
    assert!(status.success());
    for mut child in [b, c, d] {
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[test]
fn ctl_reports_an_unreachable_socket_clearly() {
    // Act: a socket nobody listens on.
    let output = understudy(&["ctl", "--control", "/nonexistent/understudy.sock", "status"]);

    // Assert: a clear error, not a panic.
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot reach the control socket"),
        "{stderr}"
    );
}

#[test]
fn the_example_service_files_use_flags_the_commands_have() {
    for (unit, command) in [
        ("deploy/systemd/understudy-primary.service", "primary"),
        ("deploy/systemd/understudy-secondary.service", "secondary"),
    ] {
        // Arrange: the flags of the unit's ExecStart.
        let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(unit))
            .expect("the unit file");
        let exec = text
            .split("ExecStart=")
            .nth(1)
            .expect("an ExecStart")
            .split("\n\n")
            .next()
            .expect("its lines")
            .split('\n')
            .take_while(|line| !line.starts_with('#') && !line.contains('='))
            .collect::<Vec<_>>()
            .join(" ");
        let flags: Vec<&str> = exec
            .split_whitespace()
            .filter(|word| word.starts_with("--"))
            .collect();

        // Act: the command's own help.
        let help = understudy(&[command, "--help"]);
        let help = String::from_utf8_lossy(&help.stdout);

        // Assert: every flag is one it has.
        let unknown: Vec<&&str> = flags.iter().filter(|flag| !help.contains(**flag)).collect();
        assert!(flags.len() > 5, "{unit}: no flags found in {exec:?}");
        assert!(
            unknown.is_empty(),
            "{unit} uses flags `{command}` lacks: {unknown:?}"
        );
    }
}
