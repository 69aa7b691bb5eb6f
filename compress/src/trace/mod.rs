//! Memory traces: what a program's (or a guest's) memory did, epoch by
//! epoch, kept on disk so codec experiments run on real data.
//!
//! Epoch 0 holds every resident page; each later epoch holds the pages whose
//! contents changed since the epoch before, with their new contents. Page
//! numbers are addresses divided by the page size, 4096 (virtual for processes, guest
//! physical for VMs), strictly increasing within an epoch.
//!
//! ```text
//! file header (64 bytes, little-endian)
//!    0  magic "USTRACE\0"
//!    8  version u32 (1)
//!   12  page size u32 (4096)
//!   16  source u32 (1 process, 2 guest, 3 synthetic)
//!   20  description length u32 (at most 64 KiB)
//!   24  interval ns u64 (asked for)
//!   32  created, Unix seconds u64
//!   40  reserved, 16 zero bytes
//!   56  checksum u64: xxh3 of bytes 0..56 and the description
//!   64  description (UTF-8: the command line, the workload)
//! epoch (repeated)
//!    0  magic "EPOC"
//!    4  reserved u32 (0)
//!    8  index u64 (0, 1, 2, ...)
//!   16  time ns u64 (since the capture started)
//!   24  pause ns u64 (how long the source was stopped for it)
//!   32  page count u64
//!   40  checksum u64: xxh3 of bytes 0..40, the page numbers, the contents
//!   48  page numbers (u64 each), then contents (4096 bytes each)
//! end (24 bytes)
//!    0  magic "UEND"
//!    4  reserved u32 (0)
//!    8  epoch count u64
//!   16  checksum u64: xxh3 of bytes 0..16
//! ```
//!
//! A writer fills a private temporary file ([`crate::file`]) and renames it once the end record is
//! synced, so a trace file that exists is complete; a reader still checks
//! every checksum and refuses a file without its end record.

pub mod process;
pub mod synthetic;

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::{Xxh3, xxh3_64};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::batch::{PAGE_BYTES, PageBatch};
use crate::file::PartialFile;

const MAGIC: [u8; 8] = *b"USTRACE\0";
const VERSION: u32 = 1;
const EPOCH_MAGIC: [u8; 4] = *b"EPOC";
const END_MAGIC: [u8; 4] = *b"UEND";
const HEADER_LEN: usize = 64;
const EPOCH_HEADER_LEN: usize = 48;
const END_LEN: usize = 24;
const MAX_DESCRIPTION: usize = 64 << 10;

/// The file header (see the module docs), little-endian.
#[repr(C)]
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
struct FileHeader {
    magic: [u8; 8],
    version: U32,
    page_size: U32,
    source: U32,
    description_len: U32,
    interval_ns: U64,
    created_unix_s: U64,
    reserved: [u8; 16],
    /// xxh3 of the bytes before it and of the description.
    checksum: U64,
}

/// An epoch's header, little-endian.
#[repr(C)]
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
struct EpochHeader {
    magic: [u8; 4],
    reserved: U32,
    index: U64,
    time_ns: U64,
    pause_ns: U64,
    page_count: U64,
    /// xxh3 of the bytes before it, the page numbers and the contents.
    checksum: U64,
}

/// The end record, little-endian.
#[repr(C)]
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
struct EndRecord {
    magic: [u8; 4],
    reserved: U32,
    epochs: U64,
    /// xxh3 of the bytes before it.
    checksum: U64,
}

const _: () = assert!(std::mem::size_of::<FileHeader>() == HEADER_LEN);
const _: () = assert!(std::mem::size_of::<EpochHeader>() == EPOCH_HEADER_LEN);
const _: () = assert!(std::mem::size_of::<EndRecord>() == END_LEN);

/// A record's bytes before its trailing checksum.
fn before_checksum<T: IntoBytes + Immutable>(record: &T) -> &[u8] {
    let bytes = record.as_bytes();
    &bytes[..bytes.len() - 8]
}

/// A trace that cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// I/O on the trace file failed.
    #[error("cannot {action} trace {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// Not a trace.
    #[error("{0} is not an understudy trace (bad magic)")]
    BadMagic(PathBuf),
    /// Another version or page size.
    #[error("{path}: trace version {version} with {page_size}-byte pages is not supported")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// Its version.
        version: u32,
        /// Its page size.
        page_size: u32,
    },
    /// A checksum failed.
    #[error("{path}: {what} is corrupted (checksum mismatch)")]
    Corrupted {
        /// The file.
        path: PathBuf,
        /// Which part.
        what: String,
    },
    /// The file ends early.
    #[error("{path} is truncated after {epochs} epochs (the capture did not finish?)")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Complete epochs read.
        epochs: u64,
    },
    /// Structurally wrong.
    #[error("{path}: {what}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A writer was given pages out of order.
    #[error("page numbers of an epoch must be strictly increasing")]
    Unordered,
}

/// Where a trace came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceSource {
    /// A Linux process (`/proc/PID/mem`).
    Process,
    /// The built-in guest in an understudy VM.
    Guest,
    /// Generated (tests only).
    Synthetic,
}

impl TraceSource {
    fn code(self) -> u32 {
        match self {
            Self::Process => 1,
            Self::Guest => 2,
            Self::Synthetic => 3,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(Self::Process),
            2 => Some(Self::Guest),
            3 => Some(Self::Synthetic),
            _ => None,
        }
    }

    /// A lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Process => "process",
            Self::Guest => "guest",
            Self::Synthetic => "synthetic",
        }
    }
}

/// What a trace says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceInfo {
    /// Where it came from.
    pub source: TraceSource,
    /// The command line or workload.
    pub description: String,
    /// The interval asked for, in nanoseconds.
    pub interval_ns: u64,
    /// When it was made, Unix seconds.
    pub created_unix_s: u64,
}

/// One epoch of a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Epoch {
    /// 0 for the first (every resident page), then 1, 2, ...
    pub index: u64,
    /// When the epoch was taken, since the capture started.
    pub time_ns: u64,
    /// How long the source was stopped to take it.
    pub pause_ns: u64,
    /// The pages.
    pub pages: PageBatch,
}

/// Writes a trace, epoch by epoch.
pub struct TraceWriter {
    path: PathBuf,
    partial: PartialFile,
    file: BufWriter<File>,
    epochs: u64,
}

impl TraceWriter {
    /// Starts `path` (written to a private temporary file beside it until
    /// [`finish`](Self::finish); dropped unfinished, it leaves nothing).
    pub fn create(path: &Path, info: &TraceInfo) -> Result<Self, TraceError> {
        let io = |action| {
            move |source| TraceError::Io {
                action,
                path: path.to_owned(),
                source,
            }
        };
        let partial = PartialFile::create(path).map_err(io("create"))?;
        let file = partial.file().try_clone().map_err(io("create"))?;
        let mut writer = Self {
            path: path.to_owned(),
            partial,
            file: BufWriter::with_capacity(1 << 20, file),
            epochs: 0,
        };
        let description = truncated_description(&info.description);
        let mut header = FileHeader {
            magic: MAGIC,
            version: VERSION.into(),
            page_size: U32::new(u32::try_from(PAGE_BYTES).expect("the page size fits a u32")),
            source: info.source.code().into(),
            description_len: U32::new(
                u32::try_from(description.len()).expect("at most 64 KiB of description"),
            ),
            interval_ns: info.interval_ns.into(),
            created_unix_s: info.created_unix_s.into(),
            reserved: [0; 16],
            checksum: 0.into(),
        };
        let mut hasher = Xxh3::new();
        hasher.update(before_checksum(&header));
        hasher.update(description.as_bytes());
        header.checksum = hasher.digest().into();
        writer.write(header.as_bytes())?;
        writer.write(description.as_bytes())?;
        Ok(writer)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), TraceError> {
        self.file.write_all(bytes).map_err(|source| TraceError::Io {
            action: "write",
            path: self.partial.partial_path().to_owned(),
            source,
        })
    }

    /// Epochs written so far.
    pub fn epochs(&self) -> u64 {
        self.epochs
    }

    /// Appends the next epoch.
    pub fn write_epoch(
        &mut self,
        time_ns: u64,
        pause_ns: u64,
        pages: &PageBatch,
    ) -> Result<(), TraceError> {
        if pages
            .page_numbers()
            .windows(2)
            .any(|pair| pair[0] >= pair[1])
        {
            return Err(TraceError::Unordered);
        }
        let mut header = EpochHeader {
            magic: EPOCH_MAGIC,
            reserved: 0.into(),
            index: self.epochs.into(),
            time_ns: time_ns.into(),
            pause_ns: pause_ns.into(),
            page_count: (pages.len() as u64).into(),
            checksum: 0.into(),
        };
        let numbers: Vec<u8> = pages
            .page_numbers()
            .iter()
            .flat_map(|number| number.to_le_bytes())
            .collect();
        let mut hasher = Xxh3::new();
        hasher.update(before_checksum(&header));
        hasher.update(&numbers);
        hasher.update(pages.contents());
        header.checksum = hasher.digest().into();
        self.write(header.as_bytes())?;
        self.write(&numbers)?;
        self.write(pages.contents())?;
        self.epochs += 1;
        Ok(())
    }

    /// Writes the end record, syncs, and renames the file into place.
    pub fn finish(mut self) -> Result<PathBuf, TraceError> {
        let mut end = EndRecord {
            magic: END_MAGIC,
            reserved: 0.into(),
            epochs: self.epochs.into(),
            checksum: 0.into(),
        };
        end.checksum = xxh3_64(before_checksum(&end)).into();
        self.write(end.as_bytes())?;
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| TraceError::Io {
                action,
                path,
                source,
            }
        };
        let file = self
            .file
            .into_inner()
            .map_err(|error| error.into_error())
            .map_err(io("write", self.partial.partial_path()))?;
        drop(file);
        self.partial.commit().map_err(io("commit", &self.path))
    }
}

/// Reads a trace, epoch by epoch.
pub struct TraceReader {
    path: PathBuf,
    file: BufReader<File>,
    remaining: u64,
    info: TraceInfo,
    epochs: u64,
    finished: bool,
}

impl TraceReader {
    /// Opens `path` and checks its header.
    pub fn open(path: &Path) -> Result<Self, TraceError> {
        let io = |action| {
            let path = path.to_owned();
            move |source| TraceError::Io {
                action,
                path,
                source,
            }
        };
        let mut file = File::open(path).map_err(io("open"))?;
        let length = file.seek(std::io::SeekFrom::End(0)).map_err(io("read"))?;
        file.rewind().map_err(io("read"))?;
        let mut reader = Self {
            path: path.to_owned(),
            file: BufReader::with_capacity(1 << 20, file),
            remaining: length,
            info: TraceInfo {
                source: TraceSource::Synthetic,
                description: String::new(),
                interval_ns: 0,
                created_unix_s: 0,
            },
            epochs: 0,
            finished: false,
        };
        let mut header = FileHeader::new_zeroed();
        reader.read_exact(header.as_mut_bytes())?;
        if header.magic != MAGIC {
            return Err(TraceError::BadMagic(path.to_owned()));
        }
        let description_len = usize::try_from(header.description_len.get()).unwrap_or(usize::MAX);
        if description_len > MAX_DESCRIPTION {
            return Err(reader.malformed("the description is longer than 64 KiB".to_owned()));
        }
        let mut description = vec![0u8; description_len];
        reader.read_exact(&mut description)?;
        let mut hasher = Xxh3::new();
        hasher.update(before_checksum(&header));
        hasher.update(&description);
        if hasher.digest() != header.checksum.get() {
            return Err(reader.corrupted("the header".to_owned()));
        }
        let (version, page_size) = (header.version.get(), header.page_size.get());
        if version != VERSION || u64::from(page_size) != crate::batch::PAGE_SIZE {
            return Err(TraceError::Unsupported {
                path: path.to_owned(),
                version,
                page_size,
            });
        }
        reader.info = TraceInfo {
            source: TraceSource::from_code(header.source.get()).ok_or_else(|| {
                reader.malformed(format!("unknown source {}", header.source.get()))
            })?,
            description: String::from_utf8_lossy(&description).into_owned(),
            interval_ns: header.interval_ns.get(),
            created_unix_s: header.created_unix_s.get(),
        };
        Ok(reader)
    }

    /// The trace's header.
    pub fn info(&self) -> &TraceInfo {
        &self.info
    }

    fn malformed(&self, what: String) -> TraceError {
        TraceError::Malformed {
            path: self.path.clone(),
            what,
        }
    }

    fn corrupted(&self, what: String) -> TraceError {
        TraceError::Corrupted {
            path: self.path.clone(),
            what,
        }
    }

    fn read_exact(&mut self, buffer: &mut [u8]) -> Result<(), TraceError> {
        if (buffer.len() as u64) > self.remaining {
            return Err(TraceError::Truncated {
                path: self.path.clone(),
                epochs: self.epochs,
            });
        }
        self.file
            .read_exact(buffer)
            .map_err(|source| TraceError::Io {
                action: "read",
                path: self.path.clone(),
                source,
            })?;
        self.remaining -= buffer.len() as u64;
        Ok(())
    }

    /// The next epoch, or `None` after the last one (once the end record
    /// checked).
    pub fn next_epoch(&mut self) -> Result<Option<Epoch>, TraceError> {
        if self.finished {
            return Ok(None);
        }
        let mut magic = [0u8; 4];
        self.read_exact(&mut magic)?;
        if magic == END_MAGIC {
            let mut end = EndRecord::new_zeroed();
            end.magic = magic;
            self.read_exact(&mut end.as_mut_bytes()[4..])?;
            let count = end.epochs.get();
            if xxh3_64(before_checksum(&end)) != end.checksum.get() {
                return Err(self.corrupted("the end record".to_owned()));
            }
            if count != self.epochs {
                return Err(self.malformed(format!(
                    "the end record counts {count} epochs where the file holds {}",
                    self.epochs
                )));
            }
            if self.remaining != 0 {
                return Err(
                    self.malformed(format!("{} bytes follow the end record", self.remaining))
                );
            }
            self.finished = true;
            return Ok(None);
        }
        if magic != EPOCH_MAGIC {
            return Err(self.malformed(format!("epoch {} has a bad magic", self.epochs)));
        }
        let mut header = EpochHeader::new_zeroed();
        header.magic = magic;
        self.read_exact(&mut header.as_mut_bytes()[4..])?;
        let (index, time_ns, pause_ns, page_count, checksum) = (
            header.index.get(),
            header.time_ns.get(),
            header.pause_ns.get(),
            header.page_count.get(),
            header.checksum.get(),
        );
        if index != self.epochs {
            return Err(self.malformed(format!(
                "epoch {index} found where epoch {} belongs",
                self.epochs
            )));
        }
        let bytes_needed = page_count.checked_mul(8 + PAGE_BYTES as u64);
        if bytes_needed.is_none_or(|needed| needed > self.remaining) {
            return Err(TraceError::Truncated {
                path: self.path.clone(),
                epochs: self.epochs,
            });
        }
        let page_count = usize::try_from(page_count).map_err(|_| TraceError::Truncated {
            path: self.path.clone(),
            epochs: self.epochs,
        })?;
        let mut numbers = vec![0u8; page_count * 8];
        self.read_exact(&mut numbers)?;
        let mut contents = vec![0u8; page_count * PAGE_BYTES];
        self.read_exact(&mut contents)?;
        let mut hasher = Xxh3::new();
        hasher.update(before_checksum(&header));
        hasher.update(&numbers);
        hasher.update(&contents);
        if hasher.digest() != checksum {
            return Err(self.corrupted(format!("epoch {index}")));
        }
        let page_numbers: Vec<u64> = numbers
            .chunks_exact(8)
            .map(|bytes| u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
            .collect();
        if page_numbers.windows(2).any(|pair| pair[0] >= pair[1]) {
            return Err(self.malformed(format!("epoch {index}: page numbers are not increasing")));
        }
        let pages = PageBatch::from_parts(page_numbers, contents)
            .expect("one page of contents per page number, read above");
        self.epochs += 1;
        Ok(Some(Epoch {
            index,
            time_ns,
            pause_ns,
            pages,
        }))
    }
}

/// Reads a whole trace into memory.
pub fn load(path: &Path) -> Result<(TraceInfo, Vec<Epoch>), TraceError> {
    let mut reader = TraceReader::open(path)?;
    let mut epochs = Vec::new();
    while let Some(epoch) = reader.next_epoch()? {
        epochs.push(epoch);
    }
    Ok((reader.info().clone(), epochs))
}

/// A duration in nanoseconds, as traces record times (saturating at 584 years).
pub fn duration_nanos(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// `description` cut to at most [`MAX_DESCRIPTION`] bytes, at a character boundary.
fn truncated_description(description: &str) -> &str {
    let mut end = description.len().min(MAX_DESCRIPTION);
    while !description.is_char_boundary(end) {
        end -= 1;
    }
    &description[..end]
}

#[cfg(test)]
mod tests;
