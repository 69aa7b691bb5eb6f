//! For tests that need KVM: whether to run them. A machine without a usable
//! `/dev/kvm` fails such a test with a message saying so, unless the user
//! opted out with `UNDERSTUDY_SKIP_KVM_TESTS=1` (then the test is skipped).

/// The environment variable that lets a machine without /dev/kvm skip KVM tests.
pub const SKIP_KVM_TESTS: &str = "UNDERSTUDY_SKIP_KVM_TESTS";

/// Whether a KVM test should run; panics with what to do when /dev/kvm
/// cannot be opened and the user did not opt out.
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
