//! Snapshot files: a paused VM's complete state and memory, checksummed.
//!
//! # Layout (little-endian)
//!
//! ```text
//! header (64 bytes)
//!   magic "USNAPSHT" | version u32 | page_size u32 | memory_bytes u64
//!   | memory_hash u64 | state_len u64 | state_checksum u64 | stored_pages u64
//!   | header_checksum u64 (of the 56 bytes before)
//! state      state_len bytes: the VmState encoding
//! memory     for each 1 MiB chunk of guest memory, in address order:
//!              bitmap [32 bytes]: bit i set = page i of the chunk is stored
//!              the stored (non-zero) pages, 4 KiB each, in page order
//! trailer    file_checksum u64 (xxh3-64 of every byte between header and
//!            trailer; the header has its own checksum) | "USNAPEND"
//! ```
//!
//! `memory_hash` is [`memory::hash`] of the guest memory the file holds, so a
//! restored VM can be checked end to end. `stored_pages` fixes the file's
//! length, so truncation is caught before anything is read, and a damaged
//! chunk bitmap is caught as corruption.
//!
//! Writing makes one pass over memory (the header, which needs the memory
//! hash and page count, is written last, in place) into a temporary file that
//! is synced and renamed into place, so a crash never leaves a half-written
//! snapshot under the final name. Reading
//! verifies the header and state checksums before using them, loads memory
//! into a VM that has not run, and returns that VM only if the file checksum
//! and the memory hash match: a damaged snapshot is never half-loaded.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use understudy_compress::file::PartialFile;
use understudy_vm::memory::{self, MemoryError};
use understudy_vm::state::{StateError, VmState};
use understudy_vm::tap::Tap;
use understudy_vm::{PAGE_BYTES, PAGE_SIZE, Vm, VmConfig, VmError, usize_from};
use xxhash_rust::xxh3::{Xxh3, xxh3_64};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// First bytes of a snapshot file.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"USNAPSHT";
/// Last bytes of a snapshot file.
pub const SNAPSHOT_END_MAGIC: [u8; 8] = *b"USNAPEND";
/// Format version written and read by this build.
pub const SNAPSHOT_VERSION: u32 = 1;
const CHUNK_PAGES: usize = 256;
const CHUNK_BYTES: usize = CHUNK_PAGES * PAGE_BYTES;
const HEADER_LEN: usize = 64;
const TRAILER_LEN: u64 = 16;

/// Errors of writing or reading a snapshot file.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file could not be created, written, read or renamed.
    #[error("snapshot file {path}: I/O error")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file ended before the named part was complete.
    #[error("snapshot is truncated: it ends inside the {0}")]
    Truncated(&'static str),
    /// Not a snapshot file.
    #[error("not an Understudy snapshot: bad magic bytes")]
    BadMagic,
    /// A snapshot of another format version.
    #[error(
        "snapshot format version {found} is not supported (this build reads {SNAPSHOT_VERSION})"
    )]
    UnsupportedVersion {
        /// The version found.
        found: u32,
    },
    /// A checksum did not match: the named part is corrupted.
    #[error("snapshot is corrupted: the {part} checksum does not match")]
    Corrupted {
        /// Which part: "header", "state", "memory bitmap" or "file".
        part: &'static str,
    },
    /// The memory loaded does not hash to the value the snapshot recorded.
    #[error("restored memory hashes to {found:#018x}, the snapshot recorded {expected:#018x}")]
    MemoryHashMismatch {
        /// Recorded hash.
        expected: u64,
        /// Hash of what was loaded.
        found: u64,
    },
    /// Bytes follow the trailer.
    #[error("snapshot has data after its trailer")]
    TrailingData,
    /// The header's page size or memory size is not usable.
    #[error("snapshot header is inconsistent: {0}")]
    BadHeader(String),
    /// The VM state could not be decoded.
    #[error("snapshot VM state is invalid")]
    State(#[from] StateError),
    /// Reading guest memory failed.
    #[error("cannot access guest memory")]
    Memory(#[from] MemoryError),
    /// Creating or restoring the VM failed.
    #[error("cannot restore the VM")]
    Vm(#[from] VmError),
}

/// What a snapshot holds, as reported after writing or reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotSummary {
    /// Guest memory size.
    pub memory_bytes: u64,
    /// [`memory::hash`] of the guest memory.
    pub memory_hash: u64,
    /// Pages stored (non-zero pages).
    pub stored_pages: u64,
    /// Size of the file.
    pub file_bytes: u64,
}

struct Header {
    memory_bytes: u64,
    memory_hash: u64,
    state_len: u64,
    state_checksum: u64,
    stored_pages: u64,
}

/// The header as it is on disk (see the module docs), little-endian.
#[repr(C)]
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
struct HeaderLayout {
    magic: [u8; 8],
    version: U32,
    page_size: U32,
    memory_bytes: U64,
    memory_hash: U64,
    state_len: U64,
    state_checksum: U64,
    stored_pages: U64,
    /// xxh3 of the bytes before it.
    header_checksum: U64,
}

const _: () = assert!(std::mem::size_of::<HeaderLayout>() == HEADER_LEN);

impl HeaderLayout {
    fn checksummed(&self) -> &[u8] {
        &self.as_bytes()[..HEADER_LEN - 8]
    }
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut layout = HeaderLayout {
            magic: SNAPSHOT_MAGIC,
            version: SNAPSHOT_VERSION.into(),
            page_size: U32::new(u32::try_from(PAGE_BYTES).expect("the page size fits a u32")),
            memory_bytes: self.memory_bytes.into(),
            memory_hash: self.memory_hash.into(),
            state_len: self.state_len.into(),
            state_checksum: self.state_checksum.into(),
            stored_pages: self.stored_pages.into(),
            header_checksum: 0.into(),
        };
        layout.header_checksum = xxh3_64(layout.checksummed()).into();
        let mut bytes = [0u8; HEADER_LEN];
        bytes.copy_from_slice(layout.as_bytes());
        bytes
    }

    fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Self, SnapshotError> {
        let layout = HeaderLayout::read_from_bytes(bytes).expect("the header has its exact size");
        if layout.magic != SNAPSHOT_MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        if xxh3_64(layout.checksummed()) != layout.header_checksum.get() {
            return Err(SnapshotError::Corrupted { part: "header" });
        }
        let version = layout.version.get();
        if version != SNAPSHOT_VERSION {
            return Err(SnapshotError::UnsupportedVersion { found: version });
        }
        let page_size = layout.page_size.get();
        if u64::from(page_size) != PAGE_SIZE {
            return Err(SnapshotError::BadHeader(format!(
                "page size {page_size} is not {PAGE_SIZE}"
            )));
        }
        let header = Self {
            memory_bytes: layout.memory_bytes.get(),
            memory_hash: layout.memory_hash.get(),
            state_len: layout.state_len.get(),
            state_checksum: layout.state_checksum.get(),
            stored_pages: layout.stored_pages.get(),
        };
        if header.stored_pages > header.memory_bytes / PAGE_BYTES as u64 {
            return Err(SnapshotError::BadHeader(format!(
                "{} stored pages in {} bytes of memory",
                header.stored_pages, header.memory_bytes
            )));
        }
        if !header.memory_bytes.is_multiple_of(CHUNK_BYTES as u64) {
            return Err(SnapshotError::BadHeader(format!(
                "memory size {} is not a whole number of MiB",
                header.memory_bytes
            )));
        }
        if header.state_len > 64 << 20 {
            return Err(SnapshotError::BadHeader(format!(
                "state of {} bytes",
                header.state_len
            )));
        }
        Ok(header)
    }

    /// The exact length of a file with this header.
    fn file_len(&self) -> u64 {
        let chunks = self.memory_bytes / CHUNK_BYTES as u64;
        HEADER_LEN as u64
            + self.state_len
            + chunks * (CHUNK_PAGES / 8) as u64
            + self.stored_pages * PAGE_BYTES as u64
            + TRAILER_LEN
    }
}

/// A writer that hashes everything written through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Xxh3,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        self.inner.write_all(bytes)
    }
}

/// A reader that hashes everything read through it.
struct HashingReader<R> {
    inner: R,
    hasher: Xxh3,
}

impl<R: Read> HashingReader<R> {
    fn take(
        &mut self,
        buffer: &mut [u8],
        part: &'static str,
        path: &Path,
    ) -> Result<(), SnapshotError> {
        match self.inner.read_exact(buffer) {
            Ok(()) => {
                self.hasher.update(buffer);
                Ok(())
            }
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(SnapshotError::Truncated(part))
            }
            Err(source) => Err(SnapshotError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

/// Which pages of a chunk are stored: the non-zero ones.
fn chunk_bitmap(chunk: &[u8]) -> [u8; CHUNK_PAGES / 8] {
    let mut bitmap = [0u8; CHUNK_PAGES / 8];
    for (page, contents) in chunk.chunks_exact(PAGE_BYTES).enumerate() {
        if contents.iter().any(|&byte| byte != 0) {
            bitmap[page / 8] |= 1 << (page % 8);
        }
    }
    bitmap
}

/// Writes the paused `vm` to `path` atomically (a private temporary file,
/// sync, rename, directory sync; nothing is left behind on error).
pub fn write(vm: &Vm, path: &Path) -> Result<SnapshotSummary, SnapshotError> {
    write_with_state(vm, &vm.capture_state()?, path)
}

/// Writes `vm`'s memory with `state` (e.g. a committed checkpoint's, when
/// the VM's own vCPUs could not take it) to `path`, like [`write`].
pub fn write_with_state(
    vm: &Vm,
    state: &VmState,
    path: &Path,
) -> Result<SnapshotSummary, SnapshotError> {
    let state = state.encode();
    let memory = vm.memory();
    let memory_bytes = memory::size(memory);
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    // Whole or not at all: a private temporary file beside `path`, removed
    // on any error (a full disk included), renamed once complete and synced.
    let partial = PartialFile::create(path).map_err(io)?;
    let file = partial.file().try_clone().map_err(io)?;
    let mut out = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        hasher: Xxh3::new(),
        written: 0,
    };

    // The header needs the memory hash and page count, known only after the
    // one pass over memory: write a placeholder now, the real header last.
    out.inner.write_all(&[0u8; HEADER_LEN]).map_err(io)?;
    out.put(&state).map_err(io)?;
    // Hashing the chunks in address order gives the same value as
    // `memory::hash`: pages the guest reported free count as zero, and are
    // not stored (a restored guest finds them zero; it did not care).
    let mut memory_hasher = Xxh3::new();
    let mut free = understudy_vm::free_report::HashMask::default();
    let mut chunk = vec![0u8; CHUNK_BYTES];
    let mut stored_pages = 0u64;
    for chunk_start in (0..memory_bytes).step_by(CHUNK_BYTES) {
        memory::read(memory, chunk_start, &mut chunk)?;
        free.apply(memory_bytes, chunk_start, &mut chunk);
        memory_hasher.update(&chunk);
        let bitmap = chunk_bitmap(&chunk);
        out.put(&bitmap).map_err(io)?;
        for (page, contents) in chunk.chunks_exact(PAGE_BYTES).enumerate() {
            if bitmap[page / 8] & (1 << (page % 8)) != 0 {
                out.put(contents).map_err(io)?;
                stored_pages += 1;
            }
        }
    }
    let memory_hash = memory_hasher.digest();
    let checksum = out.hasher.digest();
    out.inner.write_all(&checksum.to_le_bytes()).map_err(io)?;
    out.inner.write_all(&SNAPSHOT_END_MAGIC).map_err(io)?;
    let file_bytes = HEADER_LEN as u64 + out.written + TRAILER_LEN;
    let header = Header {
        memory_bytes,
        memory_hash,
        state_len: state.len() as u64,
        state_checksum: xxh3_64(&state),
        stored_pages,
    };
    let file = out
        .inner
        .into_inner()
        .map_err(|error| io(error.into_error()))?;
    file.write_all_at(&header.encode(), 0).map_err(io)?;
    drop(file);
    partial.commit().map_err(io)?;
    Ok(SnapshotSummary {
        memory_bytes,
        memory_hash,
        stored_pages,
        file_bytes,
    })
}

/// Reads a snapshot into a new, paused VM. The VM is returned only when every
/// checksum and the memory hash match; otherwise it is dropped unused. A
/// guest that had a network interface gets one on `tap` (without a tap it
/// resumes with its interface unplugged from everything).
pub fn restore(path: &Path, tap: Option<Arc<Tap>>) -> Result<(Vm, SnapshotSummary), SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let file_bytes = file.metadata().map_err(io)?.len();
    let mut input = HashingReader {
        inner: BufReader::with_capacity(1 << 20, file),
        hasher: Xxh3::new(),
    };

    let mut header_bytes = [0u8; HEADER_LEN];
    input.take(&mut header_bytes, "header", path)?;
    let header = Header::decode(&header_bytes)?;
    // The file checksum starts after the header, which has its own.
    input.hasher = Xxh3::new();
    if file_bytes < header.file_len() {
        return Err(SnapshotError::Truncated("file"));
    }
    if file_bytes > header.file_len() {
        return Err(SnapshotError::TrailingData);
    }
    let mut state_bytes = vec![0u8; usize_from(header.state_len)];
    input.take(&mut state_bytes, "VM state", path)?;
    if xxh3_64(&state_bytes) != header.state_checksum {
        return Err(SnapshotError::Corrupted { part: "state" });
    }
    let state = VmState::decode(&state_bytes)?;
    if state.memory_bytes != header.memory_bytes {
        return Err(SnapshotError::BadHeader(format!(
            "header says {} bytes of memory, the VM state {}",
            header.memory_bytes, state.memory_bytes
        )));
    }

    let vcpus = u32::try_from(state.vcpus.len())
        .map_err(|_| SnapshotError::BadHeader(format!("{} vCPUs", state.vcpus.len())))?;
    let vm = Vm::new(VmConfig::new(state.memory_bytes, vcpus))?;
    let mut page = vec![0u8; PAGE_BYTES];
    let mut stored_pages = 0u64;
    for chunk_start in (0..header.memory_bytes).step_by(CHUNK_BYTES) {
        let mut bitmap = [0u8; CHUNK_PAGES / 8];
        input.take(&mut bitmap, "memory", path)?;
        for index in 0..CHUNK_PAGES {
            if bitmap[index / 8] & (1 << (index % 8)) != 0 {
                if stored_pages == header.stored_pages {
                    return Err(SnapshotError::Corrupted {
                        part: "memory bitmap",
                    });
                }
                input.take(&mut page, "memory", path)?;
                memory::write(
                    vm.memory(),
                    chunk_start + (index * PAGE_BYTES) as u64,
                    &page,
                )?;
                stored_pages += 1;
            }
        }
    }
    if stored_pages != header.stored_pages {
        return Err(SnapshotError::Corrupted {
            part: "memory bitmap",
        });
    }
    let expected_checksum = input.hasher.digest();
    let mut trailer = [0u8; 16];
    input.take(&mut trailer, "trailer", path)?;
    if trailer[8..] != SNAPSHOT_END_MAGIC {
        return Err(SnapshotError::Corrupted { part: "file" });
    }
    if u64::from_le_bytes(trailer[..8].try_into().expect("8 bytes")) != expected_checksum {
        return Err(SnapshotError::Corrupted { part: "file" });
    }
    let found = memory::hash(vm.memory())?;
    if found != header.memory_hash {
        return Err(SnapshotError::MemoryHashMismatch {
            expected: header.memory_hash,
            found,
        });
    }
    memory::clear_vmm_dirty_bits(vm.memory());
    let mut vm = vm;
    if state.net.is_some() {
        vm.attach_guest_tap(tap)?;
    }
    vm.restore_state(&state)?;
    Ok((
        vm,
        SnapshotSummary {
            memory_bytes: header.memory_bytes,
            memory_hash: found,
            stored_pages,
            file_bytes,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_header() -> Header {
        Header {
            memory_bytes: 8 << 20,
            memory_hash: 1,
            state_len: 100,
            state_checksum: 2,
            stored_pages: 3,
        }
    }

    #[test]
    fn header_round_trips() {
        let decoded = Header::decode(&sample_header().encode()).expect("valid header");
        assert_eq!(decoded.memory_bytes, 8 << 20);
        assert_eq!(decoded.state_len, 100);
    }

    #[test]
    fn a_flipped_header_bit_is_detected() {
        let mut bytes = sample_header().encode();
        bytes[20] ^= 1;
        assert!(matches!(
            Header::decode(&bytes),
            Err(SnapshotError::Corrupted { part: "header" })
        ));
    }

    #[test]
    fn another_file_type_is_not_a_snapshot() {
        let mut bytes = sample_header().encode();
        bytes[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00");
        assert!(matches!(
            Header::decode(&bytes),
            Err(SnapshotError::BadMagic)
        ));
    }

    #[test]
    fn a_truncated_file_is_refused_before_any_vm_is_made() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("short.snap");
        std::fs::write(&path, &sample_header().encode()[..40]).expect("write");
        assert!(matches!(
            restore(&path, None),
            Err(SnapshotError::Truncated("header"))
        ));
    }

    #[test]
    fn a_file_shorter_than_its_header_promises_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("short.snap");
        std::fs::write(&path, sample_header().encode()).expect("write");
        assert!(matches!(
            restore(&path, None),
            Err(SnapshotError::Truncated("file"))
        ));
    }

    #[test]
    fn file_length_counts_bitmaps_pages_and_trailer() {
        let header = sample_header();
        assert_eq!(header.file_len(), 64 + 100 + 8 * 32 + 3 * PAGE_SIZE + 16);
    }
}
