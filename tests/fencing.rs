//! Fencing with a witness on etcd (Debian's etcd-server, started by the
//! test): whichever side goes on alone first wins the witness's
//! test-and-set, and the other never runs the guest or releases output.

mod common;

use std::time::Duration;

use common::{free_address, require_kvm, require_program, scripted_hello, spawn_json, until_event};
use understudy_lab::etcd::Etcd;

type Lines = std::sync::mpsc::Receiver<serde_json::Value>;

fn start_etcd() -> Etcd {
    require_program("etcd", "etcd-server");
    Etcd::start_on_free_ports("127.0.0.1").unwrap_or_else(|error| panic!("{error:#}"))
}

fn signal(child: &std::process::Child, signal: libc::c_int) {
    // SAFETY: a signal to our own child process.
    let result = unsafe { libc::kill(child.id().cast_signed(), signal) };
    assert_eq!(result, 0, "kill: {}", std::io::Error::last_os_error());
}

/// The lines that arrive within `window`.
fn lines_for(lines: &Lines, window: Duration) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + window;
    let mut seen = Vec::new();
    while let Ok(line) =
        lines.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
    {
        seen.push(line);
    }
    seen
}

/// A secondary and a primary (counter guest) with the witness at `witness`;
/// returns once the witness recorded the pair in sync.
fn start_pair(
    witness: &str,
    seen: &mut Vec<serde_json::Value>,
) -> ((std::process::Child, Lines), (std::process::Child, Lines)) {
    let address = free_address();
    let (secondary, secondary_lines) = spawn_json(&[
        "secondary",
        "--plaintext",
        "--listen",
        &address,
        "--witness",
        witness,
        "--duration",
        "2s",
        "--json",
    ]);
    until_event(&secondary_lines, "listening", Duration::from_secs(10), seen);
    let (primary, primary_lines) = spawn_json(&[
        "primary",
        "--plaintext",
        "--secondary",
        &address,
        "--witness",
        witness,
        "--workload",
        "counter",
        "--memory",
        "64M",
        "--json",
    ]);
    let in_sync = until_event(&primary_lines, "witness", Duration::from_secs(30), seen);
    assert_eq!(in_sync["state"], "in_sync", "{seen:?}");
    ((secondary, secondary_lines), (primary, primary_lines))
}

#[test]
fn a_stalled_primary_that_wakes_up_after_the_takeover_stops_without_releasing_anything() {
    if !require_kvm() {
        return;
    }
    // Arrange: a protected pair, in sync at the witness.
    let etcd = start_etcd();
    let mut seen = Vec::new();
    let ((mut secondary, secondary_lines), (mut primary, primary_lines)) =
        start_pair(&etcd.url, &mut seen);

    // Act: the primary stalls (SIGSTOP) long enough for the secondary to
    // take over, then wakes up.
    signal(&primary, libc::SIGSTOP);
    let resumed = until_event(
        &secondary_lines,
        "resumed",
        Duration::from_secs(20),
        &mut seen,
    );
    signal(&primary, libc::SIGCONT);
    let primary_status = primary.wait().expect("the primary ends");

    // Assert: the secondary won and runs the guest; the woken primary was
    // fenced off (it exited with an error) and never went solo.
    let _ = secondary.kill();
    let primary_seen = lines_for(&primary_lines, Duration::from_secs(2));
    assert_eq!(resumed["migrated"], false);
    assert!(
        !primary_status.success(),
        "the zombie primary kept running: {primary_seen:?}"
    );
    assert!(
        !primary_seen
            .iter()
            .any(|line| line["event"] == "witness" && line["state"] == "solo"),
        "the zombie primary went solo: {primary_seen:?}"
    );
}

#[test]
fn a_secondary_whose_primary_went_solo_does_not_resume_its_stale_backup() {
    if !require_kvm() {
        return;
    }
    // Arrange: a protected pair; then the secondary stalls and the primary,
    // on its own, wins the witness and runs on alone.
    let etcd = start_etcd();
    let mut seen = Vec::new();
    let ((mut secondary, secondary_lines), (mut primary, primary_lines)) =
        start_pair(&etcd.url, &mut seen);
    signal(&secondary, libc::SIGSTOP);
    let solo = until_event(
        &primary_lines,
        "witness",
        Duration::from_secs(20),
        &mut seen,
    );

    // Act: the secondary wakes up and finds its primary gone quiet.
    signal(&secondary, libc::SIGCONT);

    // Assert: it does not resume; the primary keeps running alone.
    let secondary_seen = lines_for(&secondary_lines, Duration::from_secs(3));
    let primary_running = primary.try_wait().expect("try_wait").is_none();
    let _ = primary.kill();
    let _ = secondary.kill();
    assert_eq!(solo["state"], "solo");
    assert!(
        !secondary_seen.iter().any(|line| line["event"] == "resumed"),
        "the stale secondary resumed: {secondary_seen:?}"
    );
    assert!(primary_running, "the primary stopped: {seen:?}");
}

#[test]
fn a_primary_that_does_not_own_the_vm_is_refused_at_hello() {
    use understudy_checkpoint::protocol::{Hello, Message, Sender, read_message};
    use understudy_checkpoint::witness::{OwnerState, Record, Witness};

    if !require_kvm() {
        return;
    }
    // Arrange: the witness says instance 1 owns VM 7; a secondary with it.
    let etcd = start_etcd();
    let witness = Witness::new(vec![etcd.url.clone()]);
    let owner = Record {
        vm_id: 7,
        owner: 1,
        state: OwnerState::Solo,
        generation: 1,
    };
    assert!(witness.create(owner).expect("the record"));
    let address = free_address();
    let mut seen = Vec::new();
    let (mut secondary, lines) = spawn_json(&[
        "secondary",
        "--plaintext",
        "--listen",
        &address,
        "--witness",
        &etcd.url,
        "--json",
    ]);
    until_event(&lines, "listening", Duration::from_secs(10), &mut seen);

    // Act: instance 99 says Hello for VM 7 (a zombie, or a confused peer).
    let mut stream = std::net::TcpStream::connect(&address).expect("connect");
    let hello = Hello {
        owner: 99,
        generation: 2,
        ..scripted_hello(7, 64 << 20)
    };
    let bytes = Sender::new()
        .encode(0, &Message::Hello(hello))
        .expect("encodes");
    std::io::Write::write_all(&mut stream, &bytes).expect("send Hello");
    let answer = loop {
        let envelope = read_message(&mut stream).expect("an answer");
        if !matches!(envelope.message, Message::Heartbeat(_)) {
            break envelope.message;
        }
    };

    // Assert
    let _ = secondary.kill();
    let Message::Refuse(reason) = answer else {
        panic!("the secondary accepted a primary the witness does not name: {answer:?}");
    };
    assert!(reason.contains("not its owner"), "{reason}");
}
