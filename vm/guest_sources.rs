// The paths the built-in guest is built from, shared by `build.rs` (which
// tells cargo to rebuild the embedded guest when any of them changes) and a
// unit test of the VM core (which checks the list against `cargo metadata`).
// Local crates are found by following `path = "…"` dependencies from the
// guest's manifest, so a crate added to the guest is covered without
// editing this list.

/// The files and directories the guest in `guest_dir` is built from.
pub fn guest_sources(guest_dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut sources: Vec<std::path::PathBuf> = ["Cargo.lock", "link.ld", ".cargo/config.toml"]
        .iter()
        .map(|path| guest_dir.join(path))
        .collect();
    let mut crates = vec![guest_dir.to_path_buf()];
    let mut seen = Vec::new();
    while let Some(crate_dir) = crates.pop() {
        let crate_dir = crate_dir.canonicalize().unwrap_or(crate_dir);
        if seen.contains(&crate_dir) {
            continue;
        }
        for path in ["Cargo.toml", "src", "build.rs"] {
            let source = crate_dir.join(path);
            if source.exists() {
                sources.push(source);
            }
        }
        let manifest = std::fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap_or_default();
        crates.extend(path_dependencies(&manifest).map(|path| crate_dir.join(path)));
        seen.push(crate_dir);
    }
    sources
}

/// The `path = "…"` values of a manifest's dependencies.
fn path_dependencies(manifest: &str) -> impl Iterator<Item = &str> {
    manifest.lines().filter_map(|line| {
        let (_, rest) = line.split_once("path = \"")?;
        let (path, _) = rest.split_once('"')?;
        // `[[bin]] path = "src/main.rs"` names a file, not a crate.
        (!path.ends_with(".rs")).then_some(path)
    })
}
