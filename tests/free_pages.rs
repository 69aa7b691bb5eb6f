//! Guest-assisted transfer: a guest that reports freed pages
//! (`memtouch:free=P%`) migrates with correspondingly fewer bytes; pages
//! freed and taken back (`churn`) are replicated exactly, every epoch's
//! memory hash checked, and a failover resumes the primary's memory.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{free_address, json_lines, require_kvm, spawn_json, u64_of, until_event};

/// Migrates a 256 MiB guest writing 100 MB/s at random over 128 MiB
/// (`extra` options appended to its workload), four seconds in, with the
/// memory hash checked; returns the pages its first round sent.
fn migrate_pages(extra: &str) -> u64 {
    let address = free_address();
    let mut target = Command::new(env!("CARGO_BIN_EXE_understudy"))
        .args([
            "secondary",
            "--listen",
            &address,
            "--plaintext",
            "--duration",
            "300ms",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the target");
    std::thread::sleep(Duration::from_millis(300));
    let workload = format!("memtouch:rate=100MB/s,wss=128M,pattern=random{extra}");
    // A failed migration runs the guest on for --duration, then fails.
    let source = common::understudy(&[
        "migrate",
        "--to",
        &address,
        "--plaintext",
        "--json",
        "--verify",
        "--codec",
        "raw",
        "--memory",
        "256M",
        "--after",
        "4s",
        "--workload",
        &workload,
        "--deadline",
        "60s",
        "--duration",
        "1s",
    ]);
    let status = target.wait().expect("the target exits");
    assert!(
        source.status.success(),
        "{extra}: the migration failed: {}",
        String::from_utf8_lossy(&source.stderr)
    );
    assert!(status.success(), "{extra}: the target failed");
    // The first round: every page in use; later rounds depend on how fast
    // this build copies against the guest's writes.
    let lines = json_lines(&source);
    let first = lines
        .iter()
        .find(|line| line["event"] == "round" && line["round"] == 1)
        .unwrap_or_else(|| panic!("{extra}: no first round in {lines:?}"));
    u64_of(&first["pages"])
}

#[test]
fn a_guest_that_freed_most_of_its_memory_migrates_with_fewer_bytes() {
    if !require_kvm() {
        return;
    }

    // Act: the same guest, keeping all it wrote, and freeing 75 % of it
    // after its first second (reported); both checked by memory hash.
    let kept = migrate_pages("");
    let freed = migrate_pages(",free=75%");

    // Assert: far fewer pages in use moved (not the exact share: the guest
    // had not written all its working set before freeing).
    assert!(
        freed * 2 < kept,
        "freeing 75 % sent {freed} pages against {kept}"
    );
}

#[test]
fn pages_freed_and_taken_back_are_replicated_exactly() {
    if !require_kvm() {
        return;
    }
    // Arrange: a guest that frees half its working set every other second
    // and writes it again in between, protected with every epoch's memory
    // hash checked by the secondary.
    let address = free_address();
    let (mut secondary, secondary_lines) = spawn_json(&[
        "secondary",
        "--listen",
        &address,
        "--json",
        "--plaintext",
        "--verify",
        "--duration",
        "300ms",
        "--heartbeat-misses",
        "50",
    ]);
    let mut secondary_seen = Vec::new();
    until_event(
        &secondary_lines,
        "listening",
        Duration::from_secs(10),
        &mut secondary_seen,
    );
    let (mut primary, primary_lines) = spawn_json(&[
        "primary",
        "--secondary",
        &address,
        "--json",
        "--plaintext",
        "--verify",
        "--codec",
        "raw",
        "--memory",
        "64M",
        "--workload",
        "memtouch:rate=50MB/s,wss=48M,pattern=random,free=50%,churn",
        // Hashing every epoch is slow in a debug build: no false losses.
        "--heartbeat-misses",
        "50",
    ]);
    let mut primary_seen = Vec::new();
    until_event(
        &primary_lines,
        "synchronised",
        Duration::from_secs(20),
        &mut primary_seen,
    );
    // Over four seconds: two rounds of freeing and taking back.
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        until_event(
            &primary_lines,
            "ack",
            Duration::from_secs(10),
            &mut primary_seen,
        );
    }

    // Act: the primary dies.
    primary.kill().expect("SIGKILL the primary");
    primary.wait().expect("reap");
    primary_seen.extend(primary_lines.try_iter());
    let resumed = until_event(
        &secondary_lines,
        "resumed",
        Duration::from_secs(30),
        &mut secondary_seen,
    );
    let _ = secondary.wait();

    // Assert: every epoch passed the secondary's hash check (it never
    // dropped the primary), some checkpoints skipped freed pages, and the
    // takeover holds the primary's memory of its epoch.
    let refused: Vec<_> = secondary_seen
        .iter()
        .filter(|line| line["event"] == "disconnected")
        .filter(|line| {
            line["reason"]
                .as_str()
                .is_some_and(|why| why.contains("hash"))
        })
        .collect();
    assert!(
        refused.is_empty(),
        "an epoch's memory differed: {refused:?}"
    );
    let skipped: u64 = primary_seen
        .iter()
        .filter(|line| line["event"] == "checkpoint")
        .filter_map(|line| line["free_pages_skipped"].as_u64())
        .sum();
    assert!(skipped > 0, "no checkpoint skipped a freed page");
    let epoch = u64_of(&resumed["epoch"]);
    let checkpoint = common::checkpoint_of(&primary_seen, epoch);
    assert_eq!(resumed["memory_hash"], checkpoint["memory_hash"]);
}

/// Snapshots a 256 MiB guest writing at random over 128 MiB (`extra`
/// options appended), restores it (memory hash checked); returns the
/// pages stored.
fn snapshot_pages(extra: &str, name: &str) -> u64 {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("free-{}-{name}.snap", std::process::id()));
    let path_text = path.display().to_string();
    let workload = format!("memtouch:rate=100MB/s,wss=128M,pattern=random{extra}");
    let written = common::understudy(&[
        "snapshot",
        "--memory",
        "256M",
        "--workload",
        &workload,
        "--after",
        "4s",
        "--output",
        &path_text,
    ]);
    assert!(written.status.success(), "{name}: the snapshot failed");
    let restored = common::understudy(&["restore", &path_text, "--duration", "300ms", "--json"]);
    assert!(
        restored.status.success(),
        "{name}: the restore failed: {}",
        String::from_utf8_lossy(&restored.stderr)
    );
    let _ = std::fs::remove_file(&path);
    u64_of(&common::event(&json_lines(&written), "snapshot")["stored_pages"])
}

#[test]
fn a_snapshot_leaves_out_the_pages_the_guest_freed() {
    if !require_kvm() {
        return;
    }

    let kept = snapshot_pages("", "kept");
    let freed = snapshot_pages(",free=75%", "freed");

    // Assert: both restored with their memory hash; the freed pages not stored.
    assert!(
        freed * 2 < kept,
        "freeing 75 % stored {freed} pages against {kept}"
    );
}
