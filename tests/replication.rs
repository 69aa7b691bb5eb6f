//! Primary and secondary as separate processes on loopback: the primary is
//! killed with SIGKILL and the secondary resumes the guest from the last
//! committed epoch, bit for bit.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use understudy_checkpoint::protocol::{Header, MessageKind};
use zerocopy::{FromZeros, IntoBytes};

use common::{
    assert_counter_chains_continue, free_address, require_kvm, spawn_json, u64_of, until_event,
};

type Lines = std::sync::mpsc::Receiver<serde_json::Value>;

/// A secondary on `address` that hashes the backup before taking over and
/// then runs the guest for `run_after`. Generous heartbeat timeouts on both
/// sides keep a loaded test machine from declaring a live peer lost.
fn start_secondary(address: &str, run_after: &str) -> (std::process::Child, Lines) {
    spawn_json(&[
        "secondary",
        "--plaintext",
        "--listen",
        address,
        "--duration",
        run_after,
        "--json",
        "--heartbeat-misses",
        "30",
        "--verify",
    ])
}

/// A primary protecting a guest (`guest`: the VM options) through
/// `target`, 20 ms epochs, every checkpoint's memory hash recorded.
fn start_primary(target: &str, guest: &[&str]) -> (std::process::Child, Lines) {
    let mut args = vec!["primary", "--plaintext", "--secondary", target];
    args.extend_from_slice(guest);
    args.extend_from_slice(&[
        "--epoch",
        "20ms",
        "--verify",
        "--json",
        "--heartbeat-misses",
        "30",
    ]);
    spawn_json(&args)
}

/// A pseudo-random count from the clock, so the kill lands at a different
/// moment of an epoch each run.
fn random_below(bound: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos());
    u64::from(nanos) % bound
}

#[test]
fn killed_primary_is_replaced_by_the_secondary_from_its_last_committed_epoch() {
    if !require_kvm() {
        return;
    }
    // Arrange: a secondary, and a primary protecting a 2-vCPU counter guest
    // with every checkpoint's memory hash recorded.
    let address = free_address();
    let (mut secondary, secondary_lines) = start_secondary(&address, "500ms");
    let mut secondary_seen = Vec::new();
    until_event(
        &secondary_lines,
        "listening",
        Duration::from_secs(10),
        &mut secondary_seen,
    );
    let (mut primary, primary_lines) = start_primary(
        &address,
        &["--workload", "counter", "--vcpus", "2", "--memory", "64M"],
    );
    let mut primary_seen = Vec::new();
    until_event(
        &primary_lines,
        "synchronised",
        Duration::from_secs(20),
        &mut primary_seen,
    );
    let acks_before_kill = 5 + random_below(10);
    for _ in 0..acks_before_kill {
        until_event(
            &primary_lines,
            "ack",
            Duration::from_secs(10),
            &mut primary_seen,
        );
    }
    std::thread::sleep(Duration::from_millis(random_below(20)));

    // Act: kill the primary outright.
    primary.kill().expect("SIGKILL the primary");
    primary.wait().expect("reap the primary");
    primary_seen.extend(primary_lines.try_iter());
    let resumed = until_event(
        &secondary_lines,
        "resumed",
        Duration::from_secs(10),
        &mut secondary_seen,
    );
    let stopped = until_event(
        &secondary_lines,
        "stopped",
        Duration::from_secs(10),
        &mut secondary_seen,
    );
    let status = secondary.wait().expect("secondary exits");

    // Assert: the secondary resumed from an epoch at least as recent as the
    // last one acknowledged, with the primary's memory and counters for that
    // epoch, and each counter's chain continued unbroken.
    assert!(status.success(), "secondary failed: {status}");
    let epoch = u64_of(&resumed["epoch"]);
    let last_ack = primary_seen
        .iter()
        .filter(|line| line["event"] == "ack")
        .map(|line| u64_of(&line["epoch"]))
        .max()
        .expect("acknowledgements");
    assert!(
        epoch >= last_ack,
        "resumed from epoch {epoch}, but {last_ack} was acknowledged"
    );
    let checkpoint = primary_seen
        .iter()
        .find(|line| line["event"] == "checkpoint" && line["epoch"] == epoch)
        .unwrap_or_else(|| panic!("the primary reported no epoch {epoch}"));
    assert_eq!(resumed["memory_hash"], checkpoint["memory_hash"]);
    assert_eq!(resumed["vcpus"], checkpoint["vcpus"]);
    assert_counter_chains_continue(&resumed["vcpus"], &stopped["vcpus"], 2);
}

#[test]
fn a_primary_that_lost_its_secondary_protects_itself_again_with_a_new_one() {
    if !require_kvm() {
        return;
    }
    // Arrange: a protected counter guest whose secondary is killed.
    let address = free_address();
    let (mut first_secondary, first_lines) = start_secondary(&address, "300ms");
    let mut seen = Vec::new();
    until_event(
        &first_lines,
        "listening",
        Duration::from_secs(10),
        &mut seen,
    );
    let (mut primary, primary_lines) =
        start_primary(&address, &["--workload", "counter", "--memory", "64M"]);
    let mut primary_seen = Vec::new();
    until_event(
        &primary_lines,
        "synchronised",
        Duration::from_secs(20),
        &mut primary_seen,
    );
    until_event(
        &primary_lines,
        "ack",
        Duration::from_secs(10),
        &mut primary_seen,
    );
    first_secondary.kill().expect("SIGKILL the first secondary");
    first_secondary.wait().expect("reap it");
    until_event(
        &primary_lines,
        "secondary_lost",
        Duration::from_secs(10),
        &mut primary_seen,
    );

    // Act: a new secondary at the same address; then the primary dies.
    let (mut second_secondary, second_lines) = start_secondary(&address, "300ms");
    until_event(
        &primary_lines,
        "synchronised",
        Duration::from_secs(20),
        &mut primary_seen,
    );
    for _ in 0..5 {
        until_event(
            &primary_lines,
            "ack",
            Duration::from_secs(10),
            &mut primary_seen,
        );
    }
    primary.kill().expect("SIGKILL the primary");
    primary.wait().expect("reap the primary");
    primary_seen.extend(primary_lines.try_iter());
    let mut second_seen = Vec::new();
    let resumed = until_event(
        &second_lines,
        "resumed",
        Duration::from_secs(10),
        &mut second_seen,
    );
    let status = second_secondary.wait().expect("the new secondary exits");

    // Assert: the new secondary took over with the memory and counters the
    // primary recorded for that epoch of its second protection.
    assert!(status.success(), "the new secondary failed: {status}");
    let epoch = &resumed["epoch"];
    let checkpoint = primary_seen
        .iter()
        .rev()
        .find(|line| line["event"] == "checkpoint" && line["epoch"] == *epoch)
        .unwrap_or_else(|| panic!("the primary reported no epoch {epoch}"));
    assert_eq!(resumed["memory_hash"], checkpoint["memory_hash"]);
    assert_eq!(resumed["vcpus"], checkpoint["vcpus"]);
}

/// Forwards a primary's connection to the secondary and cuts both ends in
/// the middle of the first `Pages` message of epoch `cut_epoch`, after half
/// its payload. Returns the address the primary should connect to.
fn cutting_proxy(secondary: String, cut_epoch: u64) -> String {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
    let address = listener.local_addr().expect("address").to_string();
    std::thread::spawn(move || {
        let (mut from_primary, _) = listener.accept().expect("the primary connects");
        let mut to_secondary = TcpStream::connect(&secondary).expect("reach the secondary");
        let mut back_from_secondary = to_secondary.try_clone().expect("clone");
        let mut back_to_primary = from_primary.try_clone().expect("clone");
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_from_secondary, &mut back_to_primary);
        });
        let mut header = Header::new_zeroed();
        loop {
            if from_primary.read_exact(header.as_mut_bytes()).is_err() {
                return;
            }
            let kind = MessageKind::from_byte(header.kind);
            let epoch = header.epoch.get();
            let length = usize::try_from(header.payload_len.get()).expect("a payload length");
            let mut payload = vec![0u8; length];
            if from_primary.read_exact(&mut payload).is_err() {
                return;
            }
            to_secondary
                .write_all(header.as_bytes())
                .expect("forward a header");
            if kind == Some(MessageKind::Pages) && epoch >= cut_epoch {
                to_secondary
                    .write_all(&payload[..length / 2])
                    .expect("forward half a payload");
                let _ = to_secondary.shutdown(std::net::Shutdown::Both);
                let _ = from_primary.shutdown(std::net::Shutdown::Both);
                return;
            }
            to_secondary.write_all(&payload).expect("forward a payload");
        }
    });
    address
}

#[test]
fn an_epoch_torn_by_a_cut_connection_is_discarded_and_the_previous_one_resumed() {
    if !require_kvm() {
        return;
    }
    // Arrange: primary -> cutting proxy -> secondary, a memtouch guest so
    // that every epoch carries pages.
    let secondary_address = free_address();
    let (mut secondary, secondary_lines) = start_secondary(&secondary_address, "300ms");
    let mut secondary_seen = Vec::new();
    until_event(
        &secondary_lines,
        "listening",
        Duration::from_secs(10),
        &mut secondary_seen,
    );
    let cut_epoch = 8 + random_below(8);
    let proxy = cutting_proxy(secondary_address, cut_epoch);

    // Act: the primary runs until the proxy cuts its connection mid-epoch.
    let (mut primary, primary_lines) = start_primary(
        &proxy,
        &[
            "--workload",
            "memtouch:rate=20MB/s,wss=16M,pattern=random",
            "--memory",
            "64M",
        ],
    );
    let mut primary_seen = Vec::new();
    until_event(
        &primary_lines,
        "secondary_lost",
        Duration::from_secs(20),
        &mut primary_seen,
    );
    let resumed = until_event(
        &secondary_lines,
        "resumed",
        Duration::from_secs(10),
        &mut secondary_seen,
    );
    primary.kill().expect("stop the primary");
    primary.wait().expect("reap the primary");
    let status = secondary.wait().expect("the secondary exits");

    // Assert: the secondary resumed its last committed epoch, one before
    // the torn one (or earlier: a reset connection may also drop the end of
    // the epoch before, which then was never committed), with the memory
    // the primary recorded for it.
    assert!(status.success(), "secondary failed: {status}");
    let epoch = u64_of(&resumed["epoch"]);
    let last_committed = secondary_seen
        .iter()
        .filter(|line| line["event"] == "committed")
        .map(|line| u64_of(&line["epoch"]))
        .max()
        .expect("committed epochs");
    assert_eq!(epoch, last_committed);
    assert!(
        epoch < cut_epoch,
        "resumed epoch {epoch}, cut in epoch {cut_epoch}"
    );
    let checkpoint = primary_seen
        .iter()
        .find(|line| line["event"] == "checkpoint" && line["epoch"] == epoch)
        .expect("the primary's record of the resumed epoch");
    assert_eq!(resumed["memory_hash"], checkpoint["memory_hash"]);
}

#[test]
fn a_primary_that_gives_up_on_a_stuck_secondary_says_goodbye_and_is_not_replaced() {
    if !require_kvm() {
        return;
    }
    // Arrange: a secondary that is alive (heartbeats) but acknowledges each
    // epoch only after 2 s, and a primary that wants progress within 500 ms.
    let address = free_address();
    let (mut secondary, secondary_lines) = spawn_json(&[
        "secondary",
        "--plaintext",
        "--listen",
        &address,
        "--ack-delay",
        "2s",
        "--json",
        "--heartbeat-misses",
        "30",
    ]);
    let mut seen = Vec::new();
    until_event(
        &secondary_lines,
        "listening",
        Duration::from_secs(10),
        &mut seen,
    );
    let (mut primary, primary_lines) = spawn_json(&[
        "primary",
        "--plaintext",
        "--secondary",
        &address,
        "--workload",
        "counter",
        "--memory",
        "64M",
        "--progress-timeout",
        "500ms",
        "--json",
        "--heartbeat-misses",
        "30",
    ]);

    // Act: the primary declares its secondary lost for lack of progress.
    let lost = until_event(
        &primary_lines,
        "secondary_lost",
        Duration::from_secs(30),
        &mut seen,
    );

    // Assert: the secondary heard the goodbye and did not take over.
    let disconnected = until_event(
        &secondary_lines,
        "disconnected",
        Duration::from_secs(10),
        &mut seen,
    );
    let _ = primary.kill();
    let _ = secondary.kill();
    assert!(
        lost["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("no progress")),
        "{lost}"
    );
    assert!(
        disconnected["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("the primary lost its secondary")),
        "{disconnected}"
    );
    assert!(
        !seen.iter().any(|line| line["event"] == "resumed"),
        "the secondary took over: {seen:?}"
    );
}
