//! Builds the built-in guest (`guest/`, its own workspace) with the machine's
//! host toolchain and leaves the ELF in `OUT_DIR` for `include_bytes!`.

use std::path::PathBuf;
use std::process::Command;

include!("guest_sources.rs");

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let guest_dir = manifest_dir.join("../guest");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    let target_dir = out_dir.join("guest-target");
    println!("cargo:rerun-if-changed=guest_sources.rs");
    for path in guest_sources(&guest_dir) {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut command = Command::new(cargo);
    command
        .current_dir(&guest_dir)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's flags and wrappers (coverage, clippy, sanitizers) are for
    // the VMM; the guest has its own (.cargo/config.toml and build.rs).
    for variable in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
    ] {
        command.env_remove(variable);
    }
    let status = command
        .status()
        .expect("failed to run cargo to build the guest");
    assert!(
        status.success(),
        "building the guest (guest/) failed: {status}"
    );

    let built = target_dir.join("x86_64-unknown-linux-gnu/release/understudy-guest");
    std::fs::copy(&built, out_dir.join("understudy-guest"))
        .unwrap_or_else(|error| panic!("cannot copy {}: {error}", built.display()));
}
