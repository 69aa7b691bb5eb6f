//! A VM snapshotted in one process continues bit-for-bit in another.

mod common;

use std::path::Path;

use common::{assert_counter_chains_continue, event, json_lines, require_kvm, understudy};

fn take_snapshot(path: &Path, vcpus: &str) -> serde_json::Value {
    let output = understudy(&[
        "snapshot",
        "--workload",
        "counter",
        "--vcpus",
        vcpus,
        "--memory",
        "64M",
        "--after",
        "300ms",
        "--output",
        path.to_str().expect("utf-8 path"),
    ]);
    assert!(
        output.status.success(),
        "snapshot failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    event(&json_lines(&output), "snapshot")
}

#[test]
fn a_restored_counter_continues_from_the_exact_saved_value() {
    if !require_kvm() {
        return;
    }
    // Arrange: a two-vCPU counter guest saved by one process.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("counter.snap");
    let saved = take_snapshot(&path, "2");

    // Act: restore it in another process and let it run.
    let output = understudy(&[
        "restore",
        path.to_str().expect("utf-8"),
        "--duration",
        "500ms",
        "--json",
    ]);

    // Assert: same memory, same counters, and each counter's hash chain continues unbroken.
    assert!(
        output.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines = json_lines(&output);
    let restored = event(&lines, "restored");
    let stopped = event(&lines, "stopped");
    assert_eq!(
        restored["memory_hash"], saved["memory_hash"],
        "restored memory differs from the saved memory"
    );
    assert_eq!(
        restored["vcpus"], saved["vcpus"],
        "restored counters differ from the saved counters"
    );
    assert_counter_chains_continue(&saved["vcpus"], &stopped["vcpus"], 2);
}

#[test]
fn damaged_snapshots_are_refused_with_a_clear_error() {
    if !require_kvm() {
        return;
    }
    // Arrange: a valid snapshot, then a truncated copy and a copy with one flipped bit in memory.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("good.snap");
    take_snapshot(&path, "1");
    let bytes = std::fs::read(&path).expect("read snapshot");
    let truncated = dir.path().join("truncated.snap");
    std::fs::write(&truncated, &bytes[..bytes.len() - 5000]).expect("write");
    let corrupted = dir.path().join("corrupted.snap");
    let mut flipped = bytes.clone();
    // Header (64 bytes, state length at 32..40), state, the first chunk's bitmap,
    // then the first stored page: flip a bit in that page's contents.
    let state_len = usize::try_from(u64::from_le_bytes(
        bytes[32..40].try_into().expect("8 bytes"),
    ))
    .expect("a small state");
    let in_first_stored_page = 64 + state_len + 32 + 100;
    flipped[in_first_stored_page] ^= 0x40;
    std::fs::write(&corrupted, &flipped).expect("write");

    // Act.
    let truncated_output = understudy(&[
        "restore",
        truncated.to_str().expect("utf-8"),
        "--duration",
        "0s",
    ]);
    let corrupted_output = understudy(&[
        "restore",
        corrupted.to_str().expect("utf-8"),
        "--duration",
        "0s",
    ]);

    // Assert: both refused before the VM ran, each saying why.
    let truncated_error = String::from_utf8_lossy(&truncated_output.stderr);
    let corrupted_error = String::from_utf8_lossy(&corrupted_output.stderr);
    assert!(!truncated_output.status.success());
    assert!(
        truncated_error.contains("snapshot is truncated"),
        "unexpected error: {truncated_error}"
    );
    assert!(
        json_lines(&truncated_output).is_empty(),
        "a truncated snapshot was loaded"
    );
    assert!(!corrupted_output.status.success());
    assert!(
        corrupted_error.contains("snapshot is corrupted"),
        "unexpected error: {corrupted_error}"
    );
    assert!(
        json_lines(&corrupted_output).is_empty(),
        "a corrupted snapshot was loaded"
    );
}
