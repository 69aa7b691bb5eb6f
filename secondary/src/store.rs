//! A storage-backed backup (HydraVM's idea): the protected guest's memory
//! lives in a file instead of this process's memory, and each committed
//! epoch is durable before it is acknowledged. The backup VM exists (its
//! memory mapped, never touched), so the secondary's own memory stays at
//! the staging of one epoch whatever the guest's size; a failover runs the
//! guest at once on that VM with its memory registered with userfaultfd,
//! pages read from the image on fault and prefetched behind.
//!
//! Layout, one directory per VM (`DIR/<vm id in hex>/`):
//!
//! ```text
//! image            guest memory, page p at offset p × 4096 (sparse)
//! epoch-0, epoch-1 the last two committed epochs, alternately (epoch n in
//!                  epoch-(n % 2)): a header, the page numbers, the pages,
//!                  the encoded VM state; checksummed
//! ```
//!
//! Commit of epoch n (the caller acknowledges after it returns):
//!
//! ```text
//! 1. fdatasync(image)       every earlier epoch's pages are on disk (skipped
//!                           when no page was written since the last one)
//! 2. write epoch-(n % 2)    its record (overwrites epoch n − 2's, whose
//!    fdatasync              pages step 1 made durable in the image)
//! 3. pwrite pages → image   in the page cache; step 1 of epoch n + 1 (or
//!                           recovery's replay) makes them durable
//! ```
//!
//! Epoch 0 (the initial copy) writes its pages into the image as they
//! arrive; its record holds only the state. Both records are invalidated
//! (truncated, synced) before epoch 0 starts, so a crash during the
//! initial copy recovers nothing rather than a half-written image.
//!
//! Recovery ([`Store::recover`]): the newest record whose checksums hold is
//! the committed epoch; its pages are written into the image again (its
//! predecessors' are already there, step 1), and its state is the state to
//! resume. A torn newest record (a crash in step 2) leaves the other: the
//! epoch before, whose pages step 1 made durable before the tear.
//!
//! Failure model: a crash of the secondary at any moment leaves the last
//! acknowledged epoch recoverable (step 2 precedes the acknowledgement),
//! never a torn one (checksums); a full disk or an I/O error fails the
//! commit, which is then not acknowledged (the primary, getting no
//! acknowledgement, declares this secondary lost and runs on; nothing
//! half-written is ever resumed).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use understudy_compress::PageBatch;
use understudy_vm::{PAGE_BYTES, PAGE_SIZE, usize_from};
use xxhash_rust::xxh3::{Xxh3, xxh3_64};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// An epoch record's magic.
const MAGIC: [u8; 4] = *b"USEP";
/// Its format version.
const VERSION: u32 = 1;

/// Why a store cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file of the store failed.
    #[error("the store file {path} failed")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A page outside guest memory.
    #[error("page {0} is outside the stored guest's memory")]
    OutsideMemory(u64),
    /// The store holds no committed epoch.
    #[error("{0} holds no committed epoch")]
    Empty(PathBuf),
    /// The store holds another VM or shape.
    #[error("{path} holds VM {found:#x} of {memory_bytes} bytes, not the one asked for")]
    Foreign {
        /// The store.
        path: PathBuf,
        /// The VM it holds.
        found: u64,
        /// Its memory size.
        memory_bytes: u64,
    },
}

/// An epoch record's header, little-endian.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
struct RecordHeader {
    magic: [u8; 4],
    version: U32,
    vm_id: U64,
    epoch: U64,
    pages: U64,
    state_len: U64,
    memory_bytes: U64,
    /// xxh3 of everything after the header.
    body_checksum: U64,
    /// xxh3 of the header's bytes before this field.
    header_checksum: U64,
}

const HEADER_LEN: usize = std::mem::size_of::<RecordHeader>();

/// What a store holds, as recovery found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovered {
    /// The VM.
    pub vm_id: u64,
    /// The last committed epoch.
    pub epoch: u64,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// The encoded VM state of that epoch.
    pub state: Vec<u8>,
}

/// One VM's store.
pub struct Store {
    directory: PathBuf,
    image: File,
    /// Pages were written into the image since its last `fdatasync`.
    image_unsynced: std::cell::Cell<bool>,
    records: [File; 2],
    vm_id: u64,
    memory_bytes: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Keeps the process's memory at what it uses: buffers of 1 MiB or more
/// (page frames, epochs) are mapped for themselves and returned when freed.
/// glibc's default raises that threshold to the largest buffer freed, after
/// which 16 MiB frames stay in its arenas for good: tens of MiB that a
/// storage-backed secondary exists not to hold.
pub fn return_large_buffers() {
    // SAFETY: mallopt only changes the allocator's tuning; any value is
    // valid for M_MMAP_THRESHOLD up to its documented maximum.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
}

/// The directory of VM `vm_id`'s store under `root`.
pub fn vm_directory(root: &Path, vm_id: u64) -> PathBuf {
    root.join(format!("{vm_id:016x}"))
}

impl Store {
    /// A fresh store for VM `vm_id` of `memory_bytes` under `root`: its
    /// records invalidated (nothing committed until epoch 0 commits), its
    /// image sized (sparse).
    pub fn create(root: &Path, vm_id: u64, memory_bytes: u64) -> Result<Self, StoreError> {
        let directory = vm_directory(root, vm_id);
        std::fs::create_dir_all(&directory).map_err(io(&directory))?;
        let open = |name: &str| -> Result<File, StoreError> {
            let path = directory.join(name);
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io(&path))
        };
        let records = [open("epoch-0")?, open("epoch-1")?];
        for (index, record) in records.iter().enumerate() {
            let path = directory.join(format!("epoch-{index}"));
            record.set_len(0).map_err(io(&path))?;
            record.sync_all().map_err(io(&path))?;
        }
        let image = open("image")?;
        let image_path = directory.join("image");
        image.set_len(memory_bytes).map_err(io(&image_path))?;
        File::open(&directory)
            .and_then(|dir| dir.sync_all())
            .map_err(io(&directory))?;
        Ok(Self {
            directory,
            image,
            image_unsynced: std::cell::Cell::new(true),
            records,
            vm_id,
            memory_bytes,
        })
    }

    /// The directory.
    pub fn directory(&self) -> &Path {
        &self.directory
    }

    fn check_pages(&self, pages: &PageBatch) -> Result<(), StoreError> {
        let limit = self.memory_bytes / PAGE_SIZE;
        match pages.iter().find(|(page_number, _)| *page_number >= limit) {
            Some((page_number, _)) => Err(StoreError::OutsideMemory(page_number)),
            None => Ok(()),
        }
    }

    /// Writes pages into the image (the initial copy, before anything is
    /// committed); none unless every page is inside guest memory.
    pub fn write_pages(&self, pages: &PageBatch) -> Result<(), StoreError> {
        self.check_pages(pages)?;
        let path = self.directory.join("image");
        if !pages.is_empty() {
            self.image_unsynced.set(true);
        }
        for (page_number, page) in pages.iter() {
            self.image
                .write_all_at(page, page_number * PAGE_SIZE)
                .map_err(io(&path))?;
        }
        Ok(())
    }

    /// Commits epoch `epoch` (its pages, none for epoch 0, and its encoded
    /// state): durable when this returns (see the module's steps).
    pub fn commit(
        &mut self,
        epoch: u64,
        pages: &PageBatch,
        state: &[u8],
    ) -> Result<(), StoreError> {
        self.check_pages(pages)?;
        let image_path = self.directory.join("image");
        // Nothing written since the last sync (an idle epoch before): the
        // earlier epochs' pages are on disk already.
        if self.image_unsynced.get() {
            self.image.sync_data().map_err(io(&image_path))?;
            self.image_unsynced.set(false);
        }
        let record = encode_record(self.vm_id, epoch, self.memory_bytes, pages, state);
        let slot = usize_from(epoch % 2);
        let path = self.directory.join(format!("epoch-{slot}"));
        let file = &mut self.records[slot];
        file.set_len(0).map_err(io(&path))?;
        file.write_all_at(&record, 0).map_err(io(&path))?;
        file.sync_data().map_err(io(&path))?;
        self.write_pages(pages)
    }

    /// Finds what the store of `directory` holds: the newest committed
    /// epoch (its pages written into the image again, made durable) and
    /// its state. `Ok(None)` when nothing was committed.
    pub fn recover(directory: &Path) -> Result<Option<Recovered>, StoreError> {
        let mut newest: Option<(RecordHeader, Vec<u8>)> = None;
        for slot in 0..2 {
            let path = directory.join(format!("epoch-{slot}"));
            let bytes = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => return Err(io(&path)(error)),
            };
            let Some(header) = valid_record(&bytes) else {
                continue;
            };
            if newest
                .as_ref()
                .is_none_or(|(best, _)| header.epoch.get() > best.epoch.get())
            {
                newest = Some((header, bytes));
            }
        }
        let Some((header, bytes)) = newest else {
            return Ok(None);
        };
        let pages = usize_from(header.pages.get());
        let numbers = &bytes[HEADER_LEN..HEADER_LEN + pages * 8];
        let contents = &bytes[HEADER_LEN + pages * 8..HEADER_LEN + pages * (8 + PAGE_BYTES)];
        let state = bytes[HEADER_LEN + pages * (8 + PAGE_BYTES)..].to_vec();
        let image_path = directory.join("image");
        let image = OpenOptions::new()
            .write(true)
            .open(&image_path)
            .map_err(io(&image_path))?;
        for (number, page) in numbers
            .chunks_exact(8)
            .zip(contents.chunks_exact(PAGE_BYTES))
        {
            let page_number = u64::from_le_bytes(number.try_into().expect("8 bytes"));
            if page_number >= header.memory_bytes.get() / PAGE_SIZE {
                return Err(StoreError::OutsideMemory(page_number));
            }
            image
                .write_all_at(page, page_number * PAGE_SIZE)
                .map_err(io(&image_path))?;
        }
        image.sync_data().map_err(io(&image_path))?;
        Ok(Some(Recovered {
            vm_id: header.vm_id.get(),
            epoch: header.epoch.get(),
            memory_bytes: header.memory_bytes.get(),
            state,
        }))
    }

    /// The stores under `root`, each as recovered (those holding nothing
    /// committed are left out; unreadable ones are reported as errors).
    pub fn find_all(root: &Path) -> Vec<(PathBuf, Result<Recovered, StoreError>)> {
        let Ok(entries) = std::fs::read_dir(root) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.join("image").exists() {
                continue;
            }
            match Store::recover(&path) {
                Ok(Some(recovered)) => found.push((path, Ok(recovered))),
                Ok(None) => {}
                Err(error) => found.push((path, Err(error))),
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found
    }
}

/// A page source reading the image of a store (a failover's faults and
/// prefetch).
pub struct ImageReader {
    image: File,
    path: PathBuf,
}

impl ImageReader {
    /// Opens the image of the store in `directory`.
    pub fn open(directory: &Path) -> Result<Self, StoreError> {
        let path = directory.join("image");
        Ok(Self {
            image: File::open(&path).map_err(io(&path))?,
            path,
        })
    }

    /// Reads page `page_number`; true if it is all zeroes.
    pub fn read(&self, page_number: u64, page: &mut [u8; PAGE_BYTES]) -> Result<bool, StoreError> {
        self.image
            .read_exact_at(page, page_number * PAGE_SIZE)
            .map_err(io(&self.path))?;
        Ok(page.iter().all(|byte| *byte == 0))
    }
}

impl understudy_vm::postcopy::PageSource for ImageReader {
    fn fetch(
        &mut self,
        page_number: u64,
        page: &mut [u8; PAGE_BYTES],
    ) -> Result<understudy_vm::postcopy::Fetched, String> {
        match self.read(page_number, page) {
            Ok(true) => Ok(understudy_vm::postcopy::Fetched::Zero),
            Ok(false) => Ok(understudy_vm::postcopy::Fetched::Page),
            Err(error) => Err(error.to_string()),
        }
    }
}

/// Registers `vm`'s memory (untouched) so that every page the guest or the
/// VMM touches is read from the image of the store in `directory`.
pub(crate) fn start_lazy_memory(
    vm: &understudy_vm::Vm,
    directory: &Path,
) -> Result<understudy_vm::postcopy::FaultHandler, crate::SecondaryError> {
    let reader = ImageReader::open(directory)?;
    Ok(understudy_vm::postcopy::FaultHandler::start(
        vm.memory(),
        reader,
    )?)
}

/// Runs the guest the store in `directory` holds, as of its last committed
/// epoch, in a new VM at once: its pages are read from the image on demand
/// and prefetched behind. With `verify`, the memory hash is computed first
/// (reading every page through the faults). Returns the VM (running), what
/// was recovered, the hash, and the guest's progress as of the epoch.
pub fn resume_stored(
    directory: &Path,
    tap: Option<std::sync::Arc<understudy_vm::tap::Tap>>,
    verify: bool,
) -> Result<
    (
        understudy_vm::Vm,
        Recovered,
        Option<u64>,
        understudy_vm::progress::ProgressSample,
    ),
    crate::SecondaryError,
> {
    let recovered =
        Store::recover(directory)?.ok_or_else(|| StoreError::Empty(directory.to_owned()))?;
    let state = understudy_vm::state::VmState::decode(&recovered.state)
        .map_err(crate::SecondaryError::StoredState)?;
    let vcpus = u32::try_from(state.vcpus.len()).unwrap_or(u32::MAX);
    let mut vm =
        understudy_vm::Vm::new(understudy_vm::VmConfig::new(recovered.memory_bytes, vcpus))?;
    let handler = start_lazy_memory(&vm, directory)?;
    let memory_hash = if verify {
        Some(understudy_vm::memory::hash(vm.memory())?)
    } else {
        None
    };
    if state.net.is_some() {
        vm.attach_guest_tap(tap.clone())?;
    }
    vm.restore_state(&state)?;
    let progress = understudy_vm::progress::ProgressSample::read(&vm)?;
    vm.resume()?;
    if let (Some(net), Some(_)) = (vm.net(), &tap) {
        net.announce(vm.boot_info()?.net_ipv4);
    }
    prefetch(
        handler,
        directory.to_owned(),
        recovered.memory_bytes / PAGE_SIZE,
    );
    Ok((vm, recovered, memory_hash, progress))
}

/// Installs every page of the image behind the running guest, in order
/// (faulted ones are there already, and stay), then unregisters the
/// memory: from then on the guest runs on its own memory alone.
pub(crate) fn prefetch(
    handler: understudy_vm::postcopy::FaultHandler,
    directory: PathBuf,
    pages: u64,
) {
    let spawned = std::thread::Builder::new()
        .name("store-prefetch".to_owned())
        .spawn(move || {
            let started = std::time::Instant::now();
            let result = (|| -> Result<(), String> {
                let reader = ImageReader::open(&directory).map_err(|error| error.to_string())?;
                let installer = handler.installer();
                let mut page = [0u8; PAGE_BYTES];
                for page_number in 0..pages {
                    let zero = reader
                        .read(page_number, &mut page)
                        .map_err(|error| error.to_string())?;
                    installer
                        .install(page_number, (!zero).then_some(&page))
                        .map_err(|error| error.to_string())?;
                }
                Ok(())
            })();
            match result {
                Ok(()) => match handler.finish() {
                    Ok(counts) => tracing::info!(
                        pages,
                        faults = counts.faults,
                        seconds = started.elapsed().as_secs_f64(),
                        "every page of the store is in memory"
                    ),
                    Err(error) => tracing::error!(%error, "unregistering the guest's memory failed"),
                },
                Err(error) => {
                    // The fault handler keeps serving what the guest touches.
                    tracing::error!(%error, "prefetching the store failed; pages are read on fault only");
                    std::mem::forget(handler);
                }
            }
        });
    if let Err(error) = spawned {
        tracing::error!(%error, "cannot start the prefetch thread; pages are read on fault only");
    }
}

fn encode_record(
    vm_id: u64,
    epoch: u64,
    memory_bytes: u64,
    pages: &PageBatch,
    state: &[u8],
) -> Vec<u8> {
    let count = pages.len();
    let mut body = Vec::with_capacity(count * (8 + PAGE_BYTES) + state.len());
    for (page_number, _) in pages.iter() {
        body.extend_from_slice(&page_number.to_le_bytes());
    }
    for (_, page) in pages.iter() {
        body.extend_from_slice(page);
    }
    body.extend_from_slice(state);
    let mut header = RecordHeader {
        magic: MAGIC,
        version: VERSION.into(),
        vm_id: vm_id.into(),
        epoch: epoch.into(),
        pages: (count as u64).into(),
        state_len: (state.len() as u64).into(),
        memory_bytes: memory_bytes.into(),
        body_checksum: xxh3_64(&body).into(),
        header_checksum: 0.into(),
    };
    header.header_checksum = xxh3_64(&header.as_bytes()[..HEADER_LEN - 8]).into();
    let mut record = header.as_bytes().to_vec();
    record.extend_from_slice(&body);
    record
}

/// The header of `bytes` if it is a whole record whose checksums hold.
fn valid_record(bytes: &[u8]) -> Option<RecordHeader> {
    let header = RecordHeader::read_from_prefix(bytes).ok()?.0;
    if header.magic != MAGIC
        || header.version.get() != VERSION
        || header.header_checksum.get() != xxh3_64(&header.as_bytes()[..HEADER_LEN - 8])
    {
        return None;
    }
    let pages = usize::try_from(header.pages.get()).ok()?;
    let state_len = usize::try_from(header.state_len.get()).ok()?;
    let body_len = pages.checked_mul(8 + PAGE_BYTES)?.checked_add(state_len)?;
    let body = bytes.get(HEADER_LEN..)?;
    if body.len() != body_len {
        return None;
    }
    let mut checksum = Xxh3::new();
    checksum.update(body);
    (checksum.digest() == header.body_checksum.get()).then_some(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(pages: &[(u64, u8)]) -> PageBatch {
        let mut batch = PageBatch::new();
        for (page_number, fill) in pages {
            batch.push(*page_number, &[*fill; PAGE_BYTES]);
        }
        batch
    }

    fn page_of(directory: &Path, page_number: u64) -> u8 {
        let reader = ImageReader::open(directory).expect("image");
        let mut page = [0u8; PAGE_BYTES];
        reader.read(page_number, &mut page).expect("read");
        page[0]
    }

    #[test]
    fn nothing_committed_recovers_nothing() {
        let root = tempfile::tempdir().expect("dir");
        let store = Store::create(root.path(), 7, 16 * PAGE_SIZE).expect("store");
        store
            .write_pages(&batch(&[(1, 0xaa)]))
            .expect("initial pages");

        let recovered = Store::recover(store.directory()).expect("recover");

        assert_eq!(recovered, None);
    }

    #[test]
    fn the_last_commit_is_recovered_with_its_pages_and_state() {
        let root = tempfile::tempdir().expect("dir");
        let mut store = Store::create(root.path(), 7, 16 * PAGE_SIZE).expect("store");
        store
            .write_pages(&batch(&[(1, 0xaa), (2, 0xbb)]))
            .expect("initial");
        store
            .commit(0, &PageBatch::new(), b"state0")
            .expect("epoch 0");
        store
            .commit(1, &batch(&[(2, 0xcc)]), b"state1")
            .expect("epoch 1");
        store
            .commit(2, &batch(&[(3, 0xdd)]), b"state2")
            .expect("epoch 2");
        let directory = store.directory().to_owned();
        drop(store);

        let recovered = Store::recover(&directory)
            .expect("recover")
            .expect("committed");

        assert_eq!(recovered.epoch, 2);
        assert_eq!(recovered.state, b"state2");
        assert_eq!(page_of(&directory, 1), 0xaa);
        assert_eq!(page_of(&directory, 2), 0xcc);
        assert_eq!(page_of(&directory, 3), 0xdd);
    }

    #[test]
    fn a_torn_newest_record_recovers_the_epoch_before() {
        let root = tempfile::tempdir().expect("dir");
        let mut store = Store::create(root.path(), 7, 16 * PAGE_SIZE).expect("store");
        store
            .commit(0, &PageBatch::new(), b"state0")
            .expect("epoch 0");
        store
            .commit(1, &batch(&[(4, 0x11)]), b"state1")
            .expect("epoch 1");
        let directory = store.directory().to_owned();
        drop(store);
        // A crash in the middle of writing epoch 2's record (slot 0).
        let record = encode_record(7, 2, 16 * PAGE_SIZE, &batch(&[(5, 0x22)]), b"state2");
        std::fs::write(directory.join("epoch-0"), &record[..record.len() / 2]).expect("torn");

        let recovered = Store::recover(&directory)
            .expect("recover")
            .expect("committed");

        assert_eq!(recovered.epoch, 1);
        assert_eq!(recovered.state, b"state1");
        assert_eq!(page_of(&directory, 4), 0x11);
        assert_eq!(page_of(&directory, 5), 0);
    }

    #[test]
    fn a_corrupted_record_is_never_used() {
        let root = tempfile::tempdir().expect("dir");
        let mut store = Store::create(root.path(), 7, 16 * PAGE_SIZE).expect("store");
        store
            .commit(0, &PageBatch::new(), b"state0")
            .expect("epoch 0");
        store
            .commit(1, &batch(&[(4, 0x11)]), b"state1")
            .expect("epoch 1");
        let directory = store.directory().to_owned();
        drop(store);
        let path = directory.join("epoch-1");
        let mut bytes = std::fs::read(&path).expect("record");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, bytes).expect("corrupt");

        let recovered = Store::recover(&directory)
            .expect("recover")
            .expect("committed");

        assert_eq!(recovered.epoch, 0);
    }

    #[test]
    fn a_page_outside_memory_is_refused_and_nothing_written() {
        let root = tempfile::tempdir().expect("dir");
        let mut store = Store::create(root.path(), 7, 16 * PAGE_SIZE).expect("store");
        store
            .commit(0, &PageBatch::new(), b"state0")
            .expect("epoch 0");

        let result = store.commit(1, &batch(&[(3, 0x33), (16, 0x44)]), b"state1");

        assert!(matches!(result, Err(StoreError::OutsideMemory(16))));
        assert_eq!(page_of(store.directory(), 3), 0);
        assert_eq!(
            Store::recover(store.directory())
                .expect("recover")
                .map(|r| r.epoch),
            Some(0)
        );
    }

    #[test]
    fn a_new_store_for_the_same_vm_forgets_the_old_commits() {
        let root = tempfile::tempdir().expect("dir");
        let mut store = Store::create(root.path(), 7, 16 * PAGE_SIZE).expect("store");
        store
            .commit(0, &PageBatch::new(), b"state0")
            .expect("epoch 0");
        drop(store);

        let fresh = Store::create(root.path(), 7, 16 * PAGE_SIZE).expect("store again");

        assert_eq!(Store::recover(fresh.directory()).expect("recover"), None);
    }

    #[test]
    fn stores_under_a_root_are_found() {
        let root = tempfile::tempdir().expect("dir");
        let mut first = Store::create(root.path(), 1, 16 * PAGE_SIZE).expect("store");
        first.commit(0, &PageBatch::new(), b"a").expect("epoch 0");
        let mut second = Store::create(root.path(), 2, 32 * PAGE_SIZE).expect("store");
        second.commit(0, &PageBatch::new(), b"b").expect("epoch 0");
        second.commit(1, &PageBatch::new(), b"c").expect("epoch 1");

        let found = Store::find_all(root.path());

        let summary: Vec<(u64, u64)> = found
            .iter()
            .map(|(_, recovered)| {
                let recovered = recovered.as_ref().expect("readable");
                (recovered.vm_id, recovered.epoch)
            })
            .collect();
        assert_eq!(summary, vec![(1, 0), (2, 1)]);
    }
}
