//! COLO mode end to end: a primary and a secondary running the `kv` guest in
//! lockstep, a real client in a network namespace. Matching replies go out
//! without a checkpoint; a reply that depends on the vCPU's clock (`TIME`)
//! differs between the copies and costs one; a secondary that stops
//! answering holds replies until a compare-timeout checkpoint is
//! acknowledged. Three failovers of a COLO pair (with periodic checkpoints
//! under way) lose nothing and reset nothing.

mod common;

use std::net::SocketAddr;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use common::{
    namespace as test_namespace, require_kvm, require_program, spawn_json_in, until_event,
};
use understudy_lab::network::Namespace;
use understudy_lab::resp::RespClient;

/// A COLO pair in `namespace` (the secondary on loopback, the guest on the
/// namespace's tap); returns both processes, the primary's lines and the
/// secondary's pid, once the initial synchronisation is acknowledged.
fn start_pair(
    namespace: &Namespace,
    port: u16,
    extra_secondary: &[&str],
    extra_primary: &[&str],
) -> (
    std::process::Child,
    std::process::Child,
    Receiver<serde_json::Value>,
) {
    let listen = format!("127.0.0.1:{port}");
    let mut secondary_arguments: Vec<String> =
        ["secondary", "--listen", &listen, "--mode", "colo", "--json"]
            .map(String::from)
            .to_vec();
    secondary_arguments.extend(
        extra_secondary
            .iter()
            .map(|argument| (*argument).to_owned()),
    );
    secondary_arguments.extend(common::channel_arguments("secondary"));
    let (secondary, secondary_lines) = spawn_json_in(namespace, &secondary_arguments);
    let mut seen = Vec::new();
    until_event(
        &secondary_lines,
        "listening",
        Duration::from_secs(10),
        &mut seen,
    );
    let mut primary_arguments: Vec<String> = [
        "primary",
        "--secondary",
        &listen,
        "--mode",
        "colo",
        "--workload",
        "kv:ip=10.0.0.10/24",
        "--tap",
        "tap0",
        "--memory",
        "64M",
        "--json",
    ]
    .map(String::from)
    .to_vec();
    primary_arguments.extend(extra_primary.iter().map(|argument| (*argument).to_owned()));
    primary_arguments.extend(common::channel_arguments("primary"));
    let (primary, primary_lines) = spawn_json_in(namespace, &primary_arguments);
    until_event(
        &primary_lines,
        "synchronised",
        Duration::from_secs(30),
        &mut seen,
    );
    (secondary, primary, primary_lines)
}

/// The causes of the checkpoints the primary reported so far (after epoch 0).
fn checkpoint_causes(lines: &Receiver<serde_json::Value>) -> Vec<String> {
    lines
        .try_iter()
        .filter(|line| line["event"] == "checkpoint" && line["epoch"] != 0)
        .map(|line| line["cause"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Runs `client` in `namespace` against the guest, on a thread of its own.
fn with_client<T: Send + 'static>(
    namespace: Namespace,
    client: impl FnOnce(&mut RespClient) -> T + Send + 'static,
) -> (T, Namespace) {
    std::thread::spawn(move || {
        namespace.enter().expect("enter the namespace");
        let address: SocketAddr = "10.0.0.10:6379".parse().expect("address");
        let mut connection =
            RespClient::connect(address, Duration::from_secs(10)).expect("connect to the guest");
        (client(&mut connection), namespace)
    })
    .join()
    .expect("the client thread")
}

/// Kills a child on drop, so that a failing test leaves no VM behind.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn matching_replies_need_no_checkpoint_and_a_divergent_one_costs_one() {
    if !require_kvm() {
        return;
    }
    // Arrange: a COLO pair with no periodic checkpoint during the test; the
    // connection is opened and warmed before counting.
    let namespace = test_namespace("colocmp");
    namespace.add_client_tap().expect("a client tap");
    let (secondary, primary, lines) = start_pair(
        &namespace,
        7110,
        &[],
        // No periodic checkpoint, and no compare timeout even on a busy
        // machine where the secondary lags: only a mismatch may count.
        &["--colo-interval", "10m", "--colo-timeout", "5s"],
    );
    let _guards = (Killed(secondary), Killed(primary));
    let (warm, namespace) =
        with_client(namespace, |client| client.command(&["PING"]).expect("PING"));
    assert_eq!(warm, "+PONG");
    std::thread::sleep(Duration::from_millis(500));
    let before = checkpoint_causes(&lines);

    // Act: 50 INCRs (both copies answer alike), then TIME (they differ),
    // then INCR on the same connection.
    let ((incr_replies, time_reply, after_time), _namespace) = with_client(namespace, |client| {
        let incr_replies: Vec<String> = (0..50)
            .map(|_| client.command(&["INCR", "colo"]).expect("INCR"))
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        let time_reply = client.command(&["TIME"]).expect("TIME");
        let after_time = client.command(&["INCR", "colo"]).expect("INCR after TIME");
        (incr_replies, time_reply, after_time)
    });
    // The INCRs' checkpoints (none expected) were reported before TIME's
    // (the client waited 500 ms in between); collect what came, waiting
    // (up to 10 s, a busy machine) for TIME's.
    let mut during = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while during.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        during.extend(checkpoint_causes(&lines));
    }
    std::thread::sleep(Duration::from_millis(300));
    during.extend(checkpoint_causes(&lines));

    // Assert
    let expected: Vec<String> = (1..=50).map(|n| format!(":{n}")).collect();
    assert_eq!(incr_replies, expected);
    assert_eq!(
        time_reply.split(' ').count(),
        2,
        "TIME answered {time_reply:?}"
    );
    assert_eq!(after_time, ":51");
    assert!(before.iter().all(|cause| cause != "periodic"), "{before:?}");
    assert_eq!(
        during,
        vec!["mismatch-tcp-payload".to_owned()],
        "exactly one checkpoint, for TIME's divergent reply (before the test: {before:?})"
    );
}

#[test]
fn a_silent_secondary_holds_the_reply_until_a_timeout_checkpoint_is_acknowledged() {
    if !require_kvm() {
        return;
    }
    // Arrange
    let stall = Duration::from_millis(600);
    let namespace = test_namespace("colotime");
    namespace.add_client_tap().expect("a client tap");
    // Heartbeats tolerate the stall (1 s): the secondary is slow, not lost.
    let patient = ["--heartbeat-misses", "100"];
    let (secondary, primary, lines) = start_pair(
        &namespace,
        7111,
        &patient,
        &["--colo-interval", "10m", "--heartbeat-misses", "100"],
    );
    let secondary_pid = i32::try_from(secondary.id()).expect("a pid");
    let _guards = (Killed(secondary), Killed(primary));

    // Act: on a warmed connection, the secondary (the `ip netns exec`
    // wrapper has exec'd it) stops; a request is answered by the primary
    // alone; the secondary goes on after the stall.
    let ((warm, reply, waited), _namespace) = with_client(namespace, move |client| {
        let warm = client.command(&["PING"]).expect("PING");
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: kill(2) with the pid of a child of this test and a valid signal.
        assert_eq!(unsafe { libc::kill(secondary_pid, libc::SIGSTOP) }, 0);
        let resume = std::thread::spawn(move || {
            std::thread::sleep(stall);
            // SAFETY: as above.
            unsafe { libc::kill(secondary_pid, libc::SIGCONT) }
        });
        let asked = Instant::now();
        let reply = client.command(&["INCR", "held"]).expect("INCR");
        let waited = asked.elapsed();
        assert_eq!(resume.join().expect("the resume thread"), 0);
        (warm, reply, waited)
    });
    std::thread::sleep(Duration::from_millis(300));
    let causes = checkpoint_causes(&lines);

    // Assert: the reply waited for the secondary, and a timeout checkpoint
    // released it.
    assert_eq!(warm, "+PONG");
    assert_eq!(reply, ":1");
    assert!(
        waited >= stall / 2,
        "the reply came {waited:?} after the request, while the secondary was stopped for {stall:?}"
    );
    assert!(
        causes.iter().any(|cause| cause == "timeout"),
        "no timeout checkpoint: {causes:?}"
    );
}

#[test]
fn three_colo_failovers_lose_no_acknowledged_write_and_reset_no_connection() {
    if !require_kvm() {
        return;
    }
    require_program("redis-benchmark", "redis-tools");
    require_program("etcd", "etcd-server");

    // Periodic checkpoints every 300 ms: connections live through some
    // before the failure, and the failure may come while one is in flight.
    let (summary, lines) = common::drill(&[
        "--mode",
        "colo",
        "--rounds",
        "3",
        "--primary-arg=--colo-interval=300ms",
    ]);

    assert_eq!(summary["rounds"], 3);
    assert_eq!(summary["failed"], 0, "{lines:?}");
    assert_eq!(summary["lost_writes"], 0, "{lines:?}");
    assert_eq!(summary["resets"], 0, "{lines:?}");
    assert_eq!(summary["two_copies"], 0, "{lines:?}");
}

#[test]
fn a_stalled_colo_primary_stays_silent_once_the_secondary_took_over() {
    if !require_kvm() {
        return;
    }
    require_program("redis-benchmark", "redis-tools");
    require_program("etcd", "etcd-server");

    // The stalled primary goes on after the secondary took over: its guest
    // must not release anything, not even output the secondary had sent
    // the same of before the takeover (redis-benchmark keeps both busy).
    let (summary, lines) = common::drill(&[
        "--mode",
        "colo",
        "--failure",
        "stall-primary",
        "--rounds",
        "2",
    ]);

    assert_eq!(summary["failed"], 0, "{lines:?}");
    assert_eq!(summary["two_copies"], 0, "{lines:?}");
    assert_eq!(summary["lost_writes"], 0, "{lines:?}");
}
