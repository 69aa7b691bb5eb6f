//! The outside programs the lab runs, and a clear error when one is missing.
//! Nothing here installs anything: `.ci/run` installs what the tests need,
//! and a person is told which package to install.

use std::path::Path;

use anyhow::bail;

/// Whether `program` is on the `PATH`.
pub fn has_tool(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|directory| is_executable(&directory.join(program)))
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
}

/// Fails unless `program` (from the Debian package `package`) is on the
/// `PATH`, saying which package to install.
pub fn require_tool(program: &str, package: &str) -> anyhow::Result<()> {
    if has_tool(program) {
        return Ok(());
    }
    bail!("`{program}` is missing: install the {package} package (apt-get install {package})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_that_exists_is_found() {
        assert!(has_tool("sh"));
    }

    #[test]
    fn a_missing_program_names_its_package() {
        let error = require_tool("no-such-program-here", "some-package")
            .expect_err("the program does not exist");

        assert!(error.to_string().contains("apt-get install some-package"));
    }
}
