//! Live migration between two processes on loopback: a guest that can be
//! caught converges and runs on at the target; one that dirties memory
//! faster than the bandwidth limit gets the non-convergence policy; in
//! post-copy the guest runs on the target before its memory arrives.

mod common;

use std::process::{Command, Output, Stdio};

use common::{
    assert_counter_chains_continue, channel_arguments, event, free_address, json_lines,
    require_kvm, u64_of, understudy,
};

/// Runs a target in the background and the migration in the foreground;
/// returns (migration output, target output).
fn migrate(target_duration: &str, migrate_args: &[&str]) -> (Output, Output) {
    let address = free_address();
    let target = Command::new(env!("CARGO_BIN_EXE_understudy"))
        .args([
            "secondary",
            "--listen",
            &address,
            "--duration",
            target_duration,
            "--json",
        ])
        .args(channel_arguments("secondary"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the target");
    // The target binds before printing anything; give it a moment.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let keys = channel_arguments("primary");
    let mut args = vec!["migrate", "--to", &address, "--json"];
    args.extend(keys.iter().map(String::as_str));
    args.extend_from_slice(migrate_args);
    let source = understudy(&args);
    if !source.status.success() {
        // The target waits for another primary: stop it.
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(target.id().cast_signed(), libc::SIGTERM) };
    }
    let target = target.wait_with_output().expect("the target exits");
    (source, target)
}

/// Migrates a 2-vCPU counter guest in `mode`; checks that both sides
/// succeeded, the target resumed the guest and each counter's chain
/// continued unbroken there; returns the source's `migrated` line.
fn migrate_a_counter_guest(mode: &str) -> serde_json::Value {
    let (source, target) = migrate(
        "500ms",
        &[
            "--mode",
            mode,
            "--workload",
            "counter",
            "--vcpus",
            "2",
            "--memory",
            "64M",
            "--after",
            "300ms",
        ],
    );
    assert!(
        source.status.success(),
        "migration failed: {}",
        String::from_utf8_lossy(&source.stderr)
    );
    assert!(
        target.status.success(),
        "target failed: {}",
        String::from_utf8_lossy(&target.stderr)
    );
    let lines = json_lines(&target);
    let resumed = event(&lines, "resumed");
    let stopped = event(&lines, "stopped");
    assert_eq!(resumed["migrated"], true);
    assert_counter_chains_continue(&resumed["vcpus"], &stopped["vcpus"], 2);
    event(&json_lines(&source), "migrated")
}

#[test]
fn a_counter_guest_migrates_and_continues_exactly_on_the_target() {
    if !require_kvm() {
        return;
    }

    let migrated = migrate_a_counter_guest("precopy");

    assert!(migrated["downtime_ms"].as_f64().expect("downtime") > 0.0);
    assert!(u64_of(&migrated["rounds"]) >= 1);
}

#[test]
fn a_counter_guest_runs_on_the_target_before_its_memory_arrives_and_continues_exactly() {
    if !require_kvm() {
        return;
    }

    let migrated = migrate_a_counter_guest("postcopy");

    assert_eq!(u64_of(&migrated["rounds"]), 0);
}

#[test]
fn a_hybrid_migration_pre_copies_then_continues_exactly_on_the_target() {
    if !require_kvm() {
        return;
    }

    let migrated = migrate_a_counter_guest("hybrid");

    assert!(u64_of(&migrated["rounds"]) >= 1, "{migrated}");
    // Pre-copy sent memory before the switchover: post-copy had less.
    assert!(
        u64_of(&migrated["postcopy_pages"]) < 64 << 20 >> 12,
        "{migrated}"
    );
}

/// Migrates a guest writing a 32 MiB working set at random (50 MB/s) in
/// `mode`, the target running it 2.5 s; checks that the source succeeded and the target resumed it;
/// returns the source's and the target's lines.
fn migrate_a_memtouch_guest(
    mode: &str,
    extra: &[&str],
) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    // Long enough for two of the target's once-a-second progress lines.
    let mut arguments = extra.to_vec();
    arguments.extend_from_slice(&[
        "--mode",
        mode,
        "--workload",
        "memtouch:rate=50MB/s,wss=32M,pattern=random",
        "--memory",
        "256M",
        "--after",
        "300ms",
    ]);
    let (source, target) = migrate("2500ms", &arguments);
    assert!(
        source.status.success(),
        "migration failed: {}",
        String::from_utf8_lossy(&source.stderr)
    );
    let target_lines = json_lines(&target);
    assert_eq!(event(&target_lines, "resumed")["migrated"], true);
    (json_lines(&source), target_lines)
}

#[test]
fn a_memtouch_guest_faults_its_pages_in_after_a_post_copy_and_keeps_dirtying() {
    if !require_kvm() {
        return;
    }

    // It touches pages that are not there yet at once.
    let (_, target_lines) = migrate_a_memtouch_guest("postcopy", &["--verify"]);

    // The guest went on writing pages on the target.
    let written: Vec<u64> = target_lines
        .iter()
        .filter_map(|line| line["pages_written"][0].as_u64())
        .collect();
    assert!(
        written.len() >= 2 && written.last() > written.first(),
        "the guest wrote no pages on the target: {written:?}"
    );
    // Every page it did not write there is the source's; it faulted some
    // in, and pages never written were not sent whole.
    let complete = event(&target_lines, "postcopy_complete");
    assert!(u64_of(&complete["verified_pages"]) > 0, "{complete}");
    assert!(u64_of(&complete["faults"]) > 0, "{complete}");
    assert!(
        u64_of(&complete["pages"]) < 256 << 20 >> 12,
        "zero pages were pushed: {complete}"
    );
}

#[test]
fn a_memtouch_guest_converges_and_keeps_dirtying_on_the_target() {
    if !require_kvm() {
        return;
    }

    let (lines, target_lines) = migrate_a_memtouch_guest("precopy", &[]);

    // Assert: it converged within a few rounds and the guest runs there.
    let migrated = event(&lines, "migrated");
    assert!(u64_of(&migrated["rounds"]) >= 1);
    assert_eq!(event(&target_lines, "resumed")["migrated"], true);
    let dirtying = target_lines
        .iter()
        .filter_map(|line| line["guest_dirtied_mb_per_s"].as_f64())
        .fold(0.0, f64::max);
    assert!(
        dirtying > 10.0,
        "the guest does not dirty memory on the target ({dirtying} MB/s)"
    );
}

#[test]
fn a_guest_faster_than_the_link_is_refused_rather_than_chased_forever() {
    if !require_kvm() {
        return;
    }
    // Arrange and act: a guest dirtying as fast as it can, a 10 MB/s link,
    // and the abort policy.
    let (source, target) = migrate(
        "1s",
        &[
            "--workload",
            "memtouch:rate=max,wss=16M,pattern=random",
            "--memory",
            "64M",
            "--after",
            "200ms",
            "--max-bandwidth",
            "10MB/s",
            "--on-no-convergence",
            "abort",
            "--duration",
            "2500ms",
        ],
    );

    // Assert: the source gives up with the reason, the guest ran on there
    // (its statistics go on: it wrote pages after the failure), and the
    // target never resumed anything.
    assert!(
        !source.status.success(),
        "the migration should not have converged"
    );
    let stderr = String::from_utf8_lossy(&source.stderr);
    assert!(
        stderr.contains("faster than the link carries it"),
        "unclear error: {stderr}"
    );
    assert!(
        stderr.contains("the guest keeps running here"),
        "the source did not say the guest runs on: {stderr}"
    );
    let written_after_failure: Vec<u64> = json_lines(&source)
        .iter()
        .filter_map(|line| line["pages_written"][0].as_u64())
        .collect();
    assert!(
        written_after_failure.len() >= 2
            && written_after_failure[written_after_failure.len() - 1] > written_after_failure[0],
        "the guest did not run on after the failed migration: {written_after_failure:?}"
    );
    assert!(
        json_lines(&target)
            .iter()
            .all(|line| line["event"] != "resumed"),
        "the target resumed a guest from an aborted migration"
    );
}

/// Post-copies a guest writing 64 MiB at random (more than the relay lets
/// through before it cuts) through a relay that breaks the connection
/// after 4 MiB, in the page epoch; `kill_target` also kills the target
/// then. The source runs in `directory`. Returns (source, target) outputs.
fn post_copy_through_a_broken_link(
    kill_target: bool,
    recovery: &str,
    directory: &std::path::Path,
) -> (Output, Output) {
    let address = free_address();
    let target = Command::new(env!("CARGO_BIN_EXE_understudy"))
        .args(["secondary", "--listen", &address, "--duration", "1500ms"])
        .args(["--json"])
        .args(channel_arguments("secondary"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the target");
    let target_pid = target.id().cast_signed();
    let relay = common::cutting_relay(address, 4 << 20, move || {
        if kill_target {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(target_pid, libc::SIGKILL) };
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let source = Command::new(env!("CARGO_BIN_EXE_understudy"))
        .current_dir(directory)
        .args(["migrate", "--to", &relay, "--json", "--mode", "postcopy"])
        .args(["--verify", "--postcopy-recovery", recovery])
        .args(["--workload", "memtouch:rate=100MB/s,wss=64M,pattern=random"])
        .args(["--memory", "256M", "--after", "800ms"])
        .args(channel_arguments("primary"))
        .output()
        .expect("run the source");
    if !source.status.success() && !kill_target {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(target_pid, libc::SIGTERM) };
    }
    let target = target.wait_with_output().expect("the target exits");
    (source, target)
}

#[test]
fn a_post_copy_cut_half_way_resumes_and_ends_with_the_sources_memory() {
    if !require_kvm() {
        return;
    }
    let directory = tempfile::tempdir().expect("a directory");

    let (source, target) = post_copy_through_a_broken_link(false, "20s", directory.path());

    assert!(
        source.status.success(),
        "the post-copy did not resume: {}",
        String::from_utf8_lossy(&source.stderr)
    );
    let migrated = event(&json_lines(&source), "migrated");
    assert_eq!(u64_of(&migrated["reconnections"]), 1);
    let target_lines = json_lines(&target);
    let complete = event(&target_lines, "postcopy_complete");
    assert_eq!(u64_of(&complete["reconnections"]), 1);
    // Every page the guest did not write there since is the source's.
    assert!(u64_of(&complete["verified_pages"]) > 0, "{complete}");
    assert_eq!(event(&target_lines, "resumed")["migrated"], true);
}

#[test]
fn a_post_copy_whose_target_dies_leaves_the_source_a_copy_that_runs() {
    if !require_kvm() {
        return;
    }
    let directory = tempfile::tempdir().expect("a directory");

    let (source, _) = post_copy_through_a_broken_link(true, "1s", directory.path());

    assert!(
        !source.status.success(),
        "the post-copy cannot have finished"
    );
    let stderr = String::from_utf8_lossy(&source.stderr);
    assert!(stderr.contains("is saved in"), "unclear error: {stderr}");
    let saved: Vec<std::path::PathBuf> = std::fs::read_dir(directory.path())
        .expect("list the directory")
        .map(|entry| entry.expect("an entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "snap"))
        .collect();
    assert_eq!(saved.len(), 1, "{saved:?}");
    let restored = understudy(&[
        "restore",
        &saved[0].display().to_string(),
        "--duration",
        "300ms",
    ]);
    assert!(
        restored.status.success(),
        "the saved copy does not run: {}",
        String::from_utf8_lossy(&restored.stderr)
    );
}
