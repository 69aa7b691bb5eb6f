//! Capturing a trace from a live Linux process.
//!
//! Each epoch the process is stopped (`SIGSTOP`, then every thread is seen
//! stopped in `/proc/PID/task/*/stat`), its writable mappings are read from
//! `/proc/PID/maps`, `/proc/PID/pagemap` says which of their pages are
//! resident, those pages are read from `/proc/PID/mem` and hashed (xxh3),
//! and the process continues (`SIGCONT`, also on every error path). A page
//! goes into the epoch when its hash differs from the one it had in the
//! previous epoch, or it was not resident before; epoch 0 holds every
//! resident page. Pages never touched are not resident and not recorded.
//!
//! This kernel has no soft-dirty bits (`CONFIG_MEM_SOFT_DIRTY` is off), so
//! every epoch reads all resident writable memory: the pause grows with the
//! process's resident size, and each epoch records how long it was.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use understudy_guest_abi::usize_from;
use xxhash_rust::xxh3::xxh3_64;

use super::{TraceError, TraceWriter, duration_nanos};
use crate::batch::{PAGE_BYTES, PAGE_SIZE, PageBatch, as_page};
use crate::store::PageNumberMap;

const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
/// Pages read from `/proc/PID/mem` per call.
const READ_CHUNK_PAGES: usize = 256;
/// How long a process may take to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// A capture that failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The process is gone.
    #[error("process {0} has exited")]
    Exited(i32),
    /// A signal could not be sent.
    #[error("cannot send {signal} to process {pid}")]
    Signal {
        /// The process.
        pid: i32,
        /// Which signal.
        signal: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The process did not stop.
    #[error("process {0} did not stop within {STOP_TIMEOUT:?}")]
    NotStopped(i32),
    /// A /proc file could not be read.
    #[error("cannot read {path}")]
    Proc {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Writing the trace failed.
    #[error("cannot write the trace")]
    Trace(#[from] TraceError),
}

/// One writable mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mapping {
    start: u64,
    end: u64,
}

/// Parses `/proc/PID/maps`, keeping writable mappings.
fn writable_mappings(maps: &str) -> Vec<Mapping> {
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let range = fields.next()?;
            let permissions = fields.next()?;
            if permissions.as_bytes().get(1) != Some(&b'w') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            Some(Mapping {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
            })
        })
        .filter(|mapping| mapping.start < mapping.end && mapping.start % PAGE_BYTES as u64 == 0)
        .collect()
}

/// The scheduler state letter of one thread's `stat` line.
fn thread_state(stat: &str) -> Option<char> {
    // The command name is in parentheses and may hold spaces or ')'.
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// The process's memory and page map, opened for one epoch.
struct ProcFiles {
    mem: File,
    pagemap: File,
}

/// Sends `SIGCONT` when dropped, so a stopped process always continues.
struct StoppedProcess(i32);

impl Drop for StoppedProcess {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// Reads epochs of one process.
pub struct ProcessCapture {
    pid: i32,
    /// Hash of every resident writable page as of the last epoch, with the
    /// epoch that last saw it.
    hashes: PageNumberMap<(u64, u64)>,
    epoch: u64,
    buffer: Vec<u8>,
    entries: Vec<u8>,
}

impl ProcessCapture {
    /// Prepares to capture process `pid` (reading its memory needs ptrace
    /// access: root, or the parent under the default Yama setting).
    pub fn attach(pid: i32) -> Result<Self, CaptureError> {
        if !PathBuf::from(format!("/proc/{pid}")).exists() {
            return Err(CaptureError::Exited(pid));
        }
        Ok(Self {
            pid,
            hashes: PageNumberMap::default(),
            epoch: 0,
            buffer: vec![0; READ_CHUNK_PAGES * PAGE_BYTES],
            entries: Vec::new(),
        })
    }

    /// The process.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    fn proc_error(&self, name: &str, source: std::io::Error) -> CaptureError {
        if source.raw_os_error() == Some(libc::ESRCH)
            || source.kind() == std::io::ErrorKind::NotFound
        {
            CaptureError::Exited(self.pid)
        } else {
            CaptureError::Proc {
                path: PathBuf::from(format!("/proc/{}/{name}", self.pid)),
                source,
            }
        }
    }

    /// Opens a /proc file of the process. Done every epoch: a process that
    /// called `exec` has a new address space, which files opened before do
    /// not see.
    fn open(&self, name: &str) -> Result<File, CaptureError> {
        File::open(format!("/proc/{}/{name}", self.pid))
            .map_err(|error| self.proc_error(name, error))
    }

    fn stop(&self) -> Result<StoppedProcess, CaptureError> {
        // SAFETY: kill has no memory-safety preconditions.
        if unsafe { libc::kill(self.pid, libc::SIGSTOP) } != 0 {
            let source = std::io::Error::last_os_error();
            return Err(if source.raw_os_error() == Some(libc::ESRCH) {
                CaptureError::Exited(self.pid)
            } else {
                CaptureError::Signal {
                    pid: self.pid,
                    signal: "SIGSTOP",
                    source,
                }
            });
        }
        let stopped = StoppedProcess(self.pid);
        let deadline = Instant::now() + STOP_TIMEOUT;
        let tasks = PathBuf::from(format!("/proc/{}/task", self.pid));
        loop {
            let mut all_stopped = true;
            let entries =
                std::fs::read_dir(&tasks).map_err(|error| self.proc_error("task", error))?;
            for entry in entries.flatten() {
                let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                    continue; // The thread exited meanwhile.
                };
                match thread_state(&stat) {
                    Some('T' | 't') => {}
                    Some('Z' | 'X')
                        if entry.file_name().to_str() == Some(&self.pid.to_string()) =>
                    {
                        return Err(CaptureError::Exited(self.pid));
                    }
                    Some('Z' | 'X') => {}
                    _ => all_stopped = false,
                }
            }
            if all_stopped {
                return Ok(stopped);
            }
            if Instant::now() > deadline {
                return Err(CaptureError::NotStopped(self.pid));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Stops the process, collects the pages changed since the last epoch
    /// into `out` (cleared first), and lets the process continue. Returns how
    /// long the process was stopped.
    pub fn take_epoch(&mut self, out: &mut PageBatch) -> Result<Duration, CaptureError> {
        out.clear();
        let started = Instant::now();
        let stopped = self.stop()?;
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.pid))
            .map_err(|error| self.proc_error("maps", error))?;
        let files = ProcFiles {
            mem: self.open("mem")?,
            pagemap: self.open("pagemap")?,
        };
        self.epoch += 1;
        for mapping in writable_mappings(&maps) {
            self.read_mapping(&files, mapping, out)?;
        }
        drop(stopped);
        let pause = started.elapsed();
        let epoch = self.epoch;
        self.hashes.retain(|_, (_, seen)| *seen == epoch);
        Ok(pause)
    }

    fn read_mapping(
        &mut self,
        files: &ProcFiles,
        mapping: Mapping,
        out: &mut PageBatch,
    ) -> Result<(), CaptureError> {
        let first_page = mapping.start / PAGE_BYTES as u64;
        let pages = usize_from((mapping.end - mapping.start) / PAGE_SIZE);
        let mut entries = std::mem::take(&mut self.entries);
        entries.resize(pages * 8, 0);
        let read = files
            .pagemap
            .read_at(&mut entries, first_page * 8)
            .map_err(|error| self.proc_error("pagemap", error));
        let read = match read {
            Ok(read) => read,
            Err(error) => {
                self.entries = entries;
                return Err(error);
            }
        };
        let resident = |index: usize| {
            index * 8 + 8 <= read && {
                let entry = u64::from_le_bytes(
                    entries[index * 8..index * 8 + 8]
                        .try_into()
                        .expect("8 bytes"),
                );
                entry & (PRESENT | SWAPPED) != 0
            }
        };
        let mut index = 0;
        while index < pages {
            if !resident(index) {
                index += 1;
                continue;
            }
            let mut run = 1;
            while index + run < pages && run < READ_CHUNK_PAGES && resident(index + run) {
                run += 1;
            }
            if let Err(error) = self.read_run(&files.mem, first_page + index as u64, run, out) {
                self.entries = entries;
                return Err(error);
            }
            index += run;
        }
        self.entries = entries;
        Ok(())
    }

    /// Reads `count` resident pages from `page_number` on, recording the
    /// changed ones. A page the kernel refuses to read is skipped.
    fn read_run(
        &mut self,
        mem: &File,
        page_number: u64,
        count: usize,
        out: &mut PageBatch,
    ) -> Result<(), CaptureError> {
        let bytes = count * PAGE_BYTES;
        let address = page_number * PAGE_BYTES as u64;
        let whole = mem.read_at(&mut self.buffer[..bytes], address);
        let readable = match whole {
            Ok(read) if read == bytes => count,
            _ => {
                // Read page by page to keep what can be read.
                let mut readable = 0;
                for page in 0..count {
                    let slice = &mut self.buffer[page * PAGE_BYTES..(page + 1) * PAGE_BYTES];
                    match mem.read_at(slice, address + (page * PAGE_BYTES) as u64) {
                        Ok(read) if read == PAGE_BYTES => readable = page + 1,
                        Err(error) if error.raw_os_error() == Some(libc::ESRCH) => {
                            return Err(CaptureError::Exited(self.pid));
                        }
                        _ => break,
                    }
                }
                readable
            }
        };
        for page in 0..readable {
            let contents = as_page(&self.buffer[page * PAGE_BYTES..]);
            let hash = xxh3_64(contents);
            let number = page_number + page as u64;
            let previous = self.hashes.insert(number, (hash, self.epoch));
            if previous.is_none_or(|(old, _)| old != hash) {
                out.push(number, contents);
            }
        }
        Ok(())
    }
}

/// One epoch as it was captured, for progress reports.
#[derive(Clone, Copy, Debug)]
pub struct EpochReport {
    /// Epoch index.
    pub index: u64,
    /// Pages recorded.
    pub pages: usize,
    /// How long the process was stopped.
    pub pause: Duration,
    /// Resident writable pages seen.
    pub resident_pages: usize,
}

/// When a capture ends: after `duration`, or after `epochs` epochs if that
/// comes first (a capture that must hold a number of epochs, whatever the
/// machine's speed, sets both: the epochs and a generous duration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaptureLimits {
    /// The longest capture.
    pub duration: Duration,
    /// The most epochs.
    pub epochs: Option<u64>,
}

impl CaptureLimits {
    /// Whether a capture started at `started` that took `epochs` epochs is done.
    pub fn reached(&self, started: Instant, epochs: u64) -> bool {
        started.elapsed() >= self.duration || self.epochs.is_some_and(|most| epochs >= most)
    }
}

/// Captures epochs of process `pid` every `interval` until `duration` has
/// passed, `stop` is set, or the process exits, writing them to `writer`.
/// Calls `report` after each epoch. Returns how many epochs were written.
///
/// Epochs are written by a second thread while the process runs on; if the
/// disk falls behind, the capture waits for it (the epochs' timestamps show
/// the intervals actually achieved).
pub fn capture(
    pid: i32,
    interval: Duration,
    limits: CaptureLimits,
    writer: &mut TraceWriter,
    stop: &AtomicBool,
    mut report: impl FnMut(&EpochReport),
) -> Result<u64, CaptureError> {
    let mut capture = ProcessCapture::attach(pid)?;
    let (to_writer, from_capture) = std::sync::mpsc::sync_channel::<(u64, u64, PageBatch)>(2);
    let (spare_batches, recycled) = std::sync::mpsc::channel::<PageBatch>();
    std::thread::scope(|scope| {
        let writing = scope.spawn(move || -> Result<(), TraceError> {
            for (time_ns, pause_ns, batch) in from_capture {
                writer.write_epoch(time_ns, pause_ns, &batch)?;
                // The capture side may have ended: a batch it no longer wants
                // is simply dropped.
                let _ = spare_batches.send(batch);
            }
            Ok(())
        });
        let started = Instant::now();
        let mut next = started;
        let mut index = 0u64;
        let mut outcome = Ok(());
        while !stop.load(Ordering::Relaxed) && !limits.reached(started, index) {
            let at = started.elapsed();
            let mut batch = recycled.try_recv().unwrap_or_default();
            let pause = match capture.take_epoch(&mut batch) {
                Ok(pause) => pause,
                Err(CaptureError::Exited(_)) if index > 0 => break,
                Err(error) => {
                    outcome = Err(error);
                    break;
                }
            };
            let pages = batch.len();
            if to_writer
                .send((duration_nanos(at), duration_nanos(pause), batch))
                .is_err()
            {
                break; // The writer failed; its error is reported below.
            }
            report(&EpochReport {
                index,
                pages,
                pause,
                resident_pages: capture.hashes.len(),
            });
            index += 1;
            next += interval;
            let now = Instant::now();
            if next < now {
                next = now;
            }
            while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                std::thread::sleep((next - Instant::now()).min(Duration::from_millis(5)));
            }
        }
        drop(to_writer);
        let written = writing
            .join()
            .expect("the trace writer thread does not panic");
        outcome?;
        written?;
        Ok(index)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_writable_mappings_are_kept() {
        let maps = "\
55d0c0000000-55d0c0002000 r--p 00000000 08:01 123 /usr/bin/cat
55d0c0002000-55d0c0003000 rw-p 00002000 08:01 123 /usr/bin/cat
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]";

        let mappings = writable_mappings(maps);

        assert_eq!(
            mappings,
            vec![
                Mapping {
                    start: 0x55d0c0002000,
                    end: 0x55d0c0003000
                },
                Mapping {
                    start: 0x7ffd00000000,
                    end: 0x7ffd00021000
                },
            ]
        );
    }

    #[test]
    fn thread_state_survives_odd_command_names() {
        assert_eq!(thread_state("42 (a) b) T 1 2 3"), Some('T'));
        assert_eq!(thread_state("42 (redis-server) S 1"), Some('S'));
    }
}
