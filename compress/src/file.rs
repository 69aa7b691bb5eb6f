//! Files written whole or not at all: [`PartialFile`] fills a private
//! temporary file beside the destination and renames it into place only
//! when the writer commits.
//!
//! Failure model: an error (a full disk included) or a crash before
//! [`PartialFile::commit`] leaves the destination as it was; an error or a
//! drop removes the temporary file (a crash leaves it behind, named
//! `.NAME.<unique>.partial`, never mistaken for the destination). The
//! temporary file is created new (never an existing file, never through a
//! symbolic link), readable by its owner only, under a name no other
//! writer picks; committing syncs the file, renames it, and syncs the
//! directory, also when the destination is a bare file name.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A file being written to `path`; see the module docs.
#[derive(Debug)]
pub struct PartialFile {
    file: File,
    partial: PathBuf,
    path: PathBuf,
    committed: bool,
}

/// The directory a path is in (`.` for a bare name).
fn directory_of(path: &Path) -> &Path {
    path.parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

impl PartialFile {
    /// Starts writing `path`.
    pub fn create(path: &Path) -> io::Result<Self> {
        let name = path.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} names no file", path.display()),
            )
        })?;
        let directory = directory_of(path);
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.subsec_nanos());
        for attempt in 0..64u32 {
            let mut partial_name = std::ffi::OsString::from(".");
            partial_name.push(name);
            partial_name.push(format!(
                ".{}-{clock:08x}-{attempt}.partial",
                std::process::id()
            ));
            let partial = directory.join(partial_name);
            match OpenOptions::new()
                .write(true)
                .read(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&partial)
            {
                Ok(file) => {
                    return Ok(Self {
                        file,
                        partial,
                        path: path.to_owned(),
                        committed: false,
                    });
                }
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
                Err(error) => return Err(error),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "no unused temporary name beside the destination",
        ))
    }

    /// The file being written.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The temporary file's path (for error messages).
    pub fn partial_path(&self) -> &Path {
        &self.partial
    }

    /// Syncs the file, renames it to the destination and syncs the
    /// directory: after this returns, the whole file is there.
    pub fn commit(mut self) -> io::Result<PathBuf> {
        self.file.sync_all()?;
        std::fs::rename(&self.partial, &self.path)?;
        self.committed = true;
        File::open(directory_of(&self.path))?.sync_all()?;
        Ok(self.path.clone())
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_committed_file_is_in_place_with_owner_only_permissions() {
        let directory = tempfile::tempdir().expect("a directory");
        let path = directory.path().join("out.bin");
        let partial = PartialFile::create(&path).expect("create");
        partial.file().write_all(b"whole").expect("write");

        partial.commit().expect("commit");

        assert_eq!(std::fs::read(&path).expect("read"), b"whole");
        let mode = std::fs::metadata(&path)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_dropped_file_leaves_nothing_behind() {
        let directory = tempfile::tempdir().expect("a directory");
        let path = directory.path().join("out.bin");
        let partial = PartialFile::create(&path).expect("create");
        partial.file().write_all(b"half").expect("write");

        drop(partial);

        let left: Vec<_> = std::fs::read_dir(directory.path()).expect("list").collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn two_writers_of_one_destination_get_different_temporary_files() {
        let directory = tempfile::tempdir().expect("a directory");
        let path = directory.path().join("out.bin");

        let first = PartialFile::create(&path).expect("create");
        let second = PartialFile::create(&path).expect("create");

        assert_ne!(first.partial_path(), second.partial_path());
    }

    #[test]
    fn a_symbolic_link_at_the_destination_is_replaced_not_followed() {
        let directory = tempfile::tempdir().expect("a directory");
        let target = directory.path().join("victim");
        std::fs::write(&target, b"keep").expect("write");
        let path = directory.path().join("out.bin");
        std::os::unix::fs::symlink(&target, &path).expect("symlink");
        let partial = PartialFile::create(&path).expect("create");
        partial.file().write_all(b"new").expect("write");

        partial.commit().expect("commit");

        assert_eq!(std::fs::read(&target).expect("read"), b"keep");
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
    }
}
