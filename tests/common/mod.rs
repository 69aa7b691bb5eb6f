//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::process::{Command, Output};

/// Environment variable that lets a machine without /dev/kvm skip KVM tests.
pub const SKIP_KVM_TESTS: &str = "UNDERSTUDY_SKIP_KVM_TESTS";

/// Whether KVM tests should run. Fails the test with a clear message when
/// /dev/kvm is missing, unless the user opted out with UNDERSTUDY_SKIP_KVM_TESTS=1.
pub fn require_kvm() -> bool {
    let opted_out = std::env::var(SKIP_KVM_TESTS).is_ok_and(|value| value == "1");
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(_) if opted_out => {
            eprintln!("skipped: /dev/kvm is not usable and {SKIP_KVM_TESTS}=1");
            false
        }
        Err(error) => panic!(
            "this test needs /dev/kvm (read-write, usually as root), which failed to open: {error}. \
             Set {SKIP_KVM_TESTS}=1 to skip KVM tests on this machine."
        ),
    }
}

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
