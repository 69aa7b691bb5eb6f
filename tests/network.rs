//! The guest on the network: output commit holds replies until the
//! secondary acknowledged their epoch, and a failover drill with a real
//! Redis client loses nothing and resets nothing.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{NetNamespace, event, json_lines, require_kvm, require_program, until_event};

/// Sends one RESP command on `stream` and reads the reply line.
fn ask(stream: &mut TcpStream, request: &[u8]) -> String {
    stream.write_all(request).expect("send the request");
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while !reply.ends_with(b"\r\n") {
        stream.read_exact(&mut byte).expect("read the reply");
        reply.push(byte[0]);
    }
    String::from_utf8_lossy(&reply).trim_end().to_owned()
}

#[test]
fn a_reply_is_not_seen_before_the_secondary_acknowledged_its_epoch() {
    if !require_kvm() {
        return;
    }
    // Arrange: one namespace; the guest's tap has the client's address, the
    // secondary (on loopback) acknowledges each epoch only after 400 ms.
    let ack_delay = Duration::from_millis(400);
    let namespace = NetNamespace::new("commit");
    let name = namespace.name.clone();
    namespace.ip(&["-n", &name, "tuntap", "add", "dev", "tap0", "mode", "tap"]);
    namespace.ip(&["-n", &name, "addr", "add", "10.0.0.1/24", "dev", "tap0"]);
    namespace.ip(&["-n", &name, "link", "set", "tap0", "up"]);
    let (_secondary, secondary_lines) = namespace.spawn_json(&[
        "secondary",
        "--listen",
        "127.0.0.1:7100",
        "--ack-delay",
        "400ms",
        "--json",
    ]);
    let mut seen = Vec::new();
    until_event(
        &secondary_lines,
        "listening",
        Duration::from_secs(10),
        &mut seen,
    );
    let (_primary, primary_lines) = namespace.spawn_json(&[
        "primary",
        "--secondary",
        "127.0.0.1:7100",
        "--workload",
        "kv:ip=10.0.0.10/24",
        "--tap",
        "tap0",
        "--memory",
        "64M",
        "--json",
    ]);
    until_event(
        &primary_lines,
        "synchronised",
        Duration::from_secs(20),
        &mut seen,
    );
    let client = std::thread::spawn(move || {
        namespace.enter();
        let address: SocketAddr = "10.0.0.10:6379".parse().expect("address");
        let mut stream =
            TcpStream::connect_timeout(&address, Duration::from_secs(10)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        // Warm the connection (and the neighbour caches) first.
        ask(&mut stream, b"PING\r\n");
        let asked = Instant::now();

        // Act
        let reply = ask(&mut stream, b"*2\r\n$4\r\nINCR\r\n$7\r\ncommits\r\n");

        (reply, asked.elapsed(), namespace)
    });
    let (reply, waited, _namespace) = client.join().expect("the client thread");

    // Assert: the reply came, and not before an acknowledgement could have.
    assert_eq!(reply, ":1");
    assert!(
        waited >= ack_delay,
        "the reply arrived {waited:?} after the request, before any epoch could be acknowledged ({ack_delay:?})"
    );
}

#[test]
fn three_failovers_lose_no_acknowledged_write_and_reset_no_connection() {
    if !require_kvm() {
        return;
    }
    require_program("redis-benchmark", "redis-tools");

    let output = common::understudy(&["drill", "--rounds", "3", "--json"]);

    let lines = json_lines(&output);
    assert!(
        output.status.success(),
        "the drill failed: {lines:?}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary = event(&lines, "summary");
    assert_eq!(summary["rounds"], 3);
    assert_eq!(summary["failed"], 0, "{lines:?}");
    assert_eq!(summary["lost_writes"], 0, "{lines:?}");
    assert_eq!(summary["resets"], 0, "{lines:?}");
}
