//! Post-copy on the target: guest memory whose pages arrive on demand.
//!
//! The guest's memory is registered with a userfaultfd in *missing* mode.
//! A page nobody wrote yet is missing: the first access to it, by a vCPU
//! (KVM resolves guest faults through the host page tables, a kernel-mode
//! fault, so the userfaultfd must not be user-mode-only) or by the VMM,
//! blocks the accessing thread and queues a fault event. The handler thread
//! ([`FaultHandler`]) reads the events, asks its [`PageSource`] for the
//! page (over the network, in a migration), and installs it with
//! `UFFDIO_COPY`, or `UFFDIO_ZEROPAGE` when the source says it is zero
//! (nothing is copied or sent for it); the blocked thread then goes on.
//! Pages can also be installed without a fault ([`Installer`]: the
//! source's background push); a fault and a push racing for a page are
//! both fine (the second install finds the page present and only wakes).
//!
//! ```text
//! vCPU touches page p (missing) -> blocked in KVM's fault path
//! handler: fault event (p)      -> source.fetch(p) -> UFFDIO_COPY / ZEROPAGE, wake
//! vCPU                          -> retries the access, runs on
//! background push of page q     -> Installer::install(q): present from now on
//! ```
//!
//! Verified on this host (software-assisted KVM, `kvm_pvm`): a vCPU
//! touching a missing page blocks in `KVM_RUN` and resumes once the page is
//! installed; see `a_guest_runs_on_memory_that_arrives_on_demand` below.
//!
//! Failure model: a source that cannot provide a page fails the handler
//! (the fault stays unresolved: the vCPU stays blocked, and the caller
//! learns why from [`FaultHandler::stop`]); stopping the handler while a
//! vCPU waits leaves it waiting until the memory is unregistered (the VM is
//! paused or dropped first).

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;
use crate::{PAGE_BYTES, PAGE_SIZE, usize_from};

mod uffd;

use uffd::{Resolved, Userfaultfd};

/// Why post-copy memory failed.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    /// The userfaultfd could not be created or set up.
    #[error("cannot set up userfaultfd for guest memory")]
    Userfaultfd(#[source] std::io::Error),
    /// A page could not be installed.
    #[error("cannot install guest page {page_number}")]
    Install {
        /// The page.
        page_number: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The page source failed.
    #[error("the page source cannot provide page {page_number}: {reason}")]
    Source {
        /// The page.
        page_number: u64,
        /// Why.
        reason: String,
    },
    /// A fault outside guest memory (or an event the handler does not
    /// expect).
    #[error("an unexpected userfaultfd event: {0}")]
    Unexpected(String),
    /// The handler thread failed.
    #[error("the fault handler thread failed")]
    Thread(#[source] std::io::Error),
    /// A page number beyond guest memory.
    #[error("page {0} is outside guest memory")]
    OutsideMemory(u64),
    /// Stale pages could not be dropped.
    #[error("cannot drop stale guest pages")]
    Discard(#[source] std::io::Error),
}

/// What a [`PageSource`] did for a faulted page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fetched {
    /// The page is in the buffer: install it.
    Page,
    /// The page is all zeroes: install a zero page.
    Zero,
    /// The page was installed meanwhile (through an [`Installer`]).
    Installed,
}

/// Where faulted pages come from.
pub trait PageSource: Send + 'static {
    /// Provides page `page_number`: in `page`, as a zero page, or by
    /// having it installed before returning.
    fn fetch(&mut self, page_number: u64, page: &mut [u8; PAGE_BYTES]) -> Result<Fetched, String>;
}

/// One region of guest memory, as the handler maps addresses.
#[derive(Clone, Copy, Debug)]
struct Mapping {
    guest_start: u64,
    len: u64,
    host_start: usize,
}

/// Installs pages into registered guest memory (from any thread).
#[derive(Clone)]
pub struct Installer {
    uffd: Arc<Userfaultfd>,
    mappings: Arc<[Mapping]>,
}

impl Installer {
    fn host_address(&self, page_number: u64) -> Option<usize> {
        let address = page_number.checked_mul(PAGE_SIZE)?;
        self.mappings
            .iter()
            .find(|mapping| {
                (mapping.guest_start..mapping.guest_start + mapping.len).contains(&address)
            })
            .map(|mapping| mapping.host_start + usize_from(address - mapping.guest_start))
    }

    fn page_number(&self, host_address: usize) -> Option<u64> {
        self.mappings
            .iter()
            .find(|mapping| {
                (mapping.host_start..mapping.host_start + usize_from(mapping.len))
                    .contains(&host_address)
            })
            .map(|mapping| {
                (mapping.guest_start + (host_address - mapping.host_start) as u64) / PAGE_SIZE
            })
    }

    /// Wakes whoever waits for page `page_number` (installed already).
    pub fn wake(&self, page_number: u64) -> Result<(), PostcopyError> {
        let host = self.host_address(page_number).ok_or_else(|| {
            PostcopyError::Unexpected(format!("page {page_number} is outside guest memory"))
        })?;
        self.uffd
            .wake(host, PAGE_BYTES)
            .map_err(|source| PostcopyError::Install {
                page_number,
                source,
            })
    }

    /// Installs page `page_number` (`None`: a zero page) and wakes whoever
    /// waits for it. Returns false when it was already there (installed by
    /// an earlier fault or push: nothing changes).
    pub fn install(
        &self,
        page_number: u64,
        page: Option<&[u8; PAGE_BYTES]>,
    ) -> Result<bool, PostcopyError> {
        let host = self.host_address(page_number).ok_or_else(|| {
            PostcopyError::Unexpected(format!("page {page_number} is outside guest memory"))
        })?;
        let resolved = match page {
            // SAFETY: `page` is valid for reading a page; `host` is the
            // start of one page inside a registered mapping of guest memory.
            Some(page) => unsafe { self.uffd.copy(page.as_ptr(), host, PAGE_BYTES) },
            None => self.uffd.zeropage(host, PAGE_BYTES),
        }
        .map_err(|source| PostcopyError::Install {
            page_number,
            source,
        })?;
        Ok(resolved == Resolved::Installed)
    }
}

/// Drops pages of guest memory (`page_numbers`, each inside it): their
/// next access finds them missing (a fault, once memory is registered) or
/// zero. A hybrid migration's target drops the pre-copied pages that changed
/// since they were sent. Nothing is dropped unless every page is inside
/// guest memory.
pub fn discard(memory: &GuestMemory, page_numbers: &[u64]) -> Result<(), PostcopyError> {
    let mut hosts = Vec::with_capacity(page_numbers.len());
    for page_number in page_numbers {
        let host = page_number
            .checked_mul(PAGE_SIZE)
            .and_then(|address| {
                memory
                    .get_host_address(vm_memory::GuestAddress(address))
                    .ok()
            })
            .ok_or(PostcopyError::OutsideMemory(*page_number))?;
        hosts.push(host as usize);
    }
    hosts.sort_unstable();
    hosts.dedup();
    let mut index = 0;
    while index < hosts.len() {
        // One call per run of adjacent pages (within one region: a region's
        // host mapping is contiguous, two regions' need not be adjacent).
        let start = hosts[index];
        let mut len = PAGE_BYTES;
        while index + 1 < hosts.len() && hosts[index + 1] == start + len {
            len += PAGE_BYTES;
            index += 1;
        }
        index += 1;
        // SAFETY: [start, start + len) is whole pages of guest memory's
        // anonymous private mappings (checked above); dropping them only
        // makes their next read return zeroes or fault into the handler.
        // Nothing in this process holds a reference into guest memory
        // across this call (the guest is not running yet).
        let dropped =
            unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) };
        if dropped != 0 {
            return Err(PostcopyError::Discard(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// What the handler did so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Faults resolved.
    pub faults: u64,
    /// Of them, resolved with a zero page.
    pub zero_pages: u64,
    /// Fault to resolution: bucket `i` counts latencies below `2^i`
    /// microseconds (the last: the rest).
    pub latency_micros_log2: [u64; 24],
}

impl FaultCounts {
    /// The `quantile` (0 to 1) of the fault latency, as the upper bound of
    /// its log2 bucket in microseconds (none without faults).
    pub fn latency_quantile_micros(&self, quantile: f64) -> Option<u64> {
        let total: u64 = self.latency_micros_log2.iter().sum();
        if total == 0 {
            return None;
        }
        let mut seen = 0u64;
        for (bucket, count) in self.latency_micros_log2.iter().enumerate() {
            seen += count;
            if seen as f64 >= quantile.clamp(0.0, 1.0) * total as f64 {
                return Some(1u64 << bucket);
            }
        }
        Some(1u64 << (self.latency_micros_log2.len() - 1))
    }
}

#[derive(Default)]
struct Counters {
    faults: AtomicU64,
    zero_pages: AtomicU64,
    latency: [AtomicU64; 24],
}

impl Counters {
    fn snapshot(&self) -> FaultCounts {
        FaultCounts {
            faults: self.faults.load(Ordering::Relaxed),
            zero_pages: self.zero_pages.load(Ordering::Relaxed),
            latency_micros_log2: std::array::from_fn(|bucket| {
                self.latency[bucket].load(Ordering::Relaxed)
            }),
        }
    }
}

/// Serves the faults of registered guest memory from a [`PageSource`].
pub struct FaultHandler {
    installer: Installer,
    stop: Arc<EventFd>,
    counters: Arc<Counters>,
    thread: JoinHandle<Result<(), PostcopyError>>,
}

impl FaultHandler {
    /// Registers every region of `memory` (whose pages must not be mapped
    /// yet, or only those already received) and starts the handler thread.
    pub fn start(memory: &GuestMemory, source: impl PageSource) -> Result<Self, PostcopyError> {
        let uffd = Userfaultfd::new().map_err(PostcopyError::Userfaultfd)?;
        let mut mappings = Vec::new();
        for region in memory.iter() {
            let host_start = region.as_ptr() as usize;
            let len = region.len();
            uffd.register(host_start, usize_from(len))
                .map_err(PostcopyError::Userfaultfd)?;
            mappings.push(Mapping {
                guest_start: region.start_addr().0,
                len,
                host_start,
            });
        }
        let installer = Installer {
            uffd: Arc::new(uffd),
            mappings: mappings.into(),
        };
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(PostcopyError::Thread)?);
        let counters = Arc::new(Counters::default());
        let thread = {
            let (installer, stop, counters) = (installer.clone(), stop.clone(), counters.clone());
            std::thread::Builder::new()
                .name("postcopy-faults".to_owned())
                .spawn(move || serve_faults(&installer, &stop, &counters, source))
                .map_err(PostcopyError::Thread)?
        };
        Ok(Self {
            installer,
            stop,
            counters,
            thread,
        })
    }

    /// Installs pages without a fault (the background push).
    pub fn installer(&self) -> Installer {
        self.installer.clone()
    }

    /// What the handler did so far.
    pub fn counts(&self) -> FaultCounts {
        self.counters.snapshot()
    }

    /// Every page that will ever come has come: unregisters guest memory
    /// (pages never installed fill with zeroes on access, without a fault
    /// event), stops the handler thread, and returns its counts or why it
    /// failed.
    pub fn finish(self) -> Result<FaultCounts, PostcopyError> {
        let installer = self.installer.clone();
        let counts = self.stop();
        // After the handler: a thread that faulted meanwhile is woken by
        // the unregistration and finds a zero page.
        for mapping in installer.mappings.iter() {
            installer
                .uffd
                .unregister(mapping.host_start, usize_from(mapping.len))
                .map_err(PostcopyError::Userfaultfd)?;
        }
        counts
    }

    /// Stops the handler thread; returns its counts, or why it failed.
    pub fn stop(self) -> Result<FaultCounts, PostcopyError> {
        let _ = self.stop.write(1);
        self.thread
            .join()
            .map_err(|_| PostcopyError::Unexpected("the fault handler panicked".to_owned()))??;
        Ok(self.counters.snapshot())
    }
}

/// How long a poll for faults waits before looking at the stop flag again
/// (the stop eventfd wakes it at once; this bounds a missed wake-up).
const POLL: Duration = Duration::from_millis(100);

fn serve_faults(
    installer: &Installer,
    stop: &EventFd,
    counters: &Counters,
    mut source: impl PageSource,
) -> Result<(), PostcopyError> {
    let mut page = [0u8; PAGE_BYTES];
    loop {
        let mut polls = [
            libc::pollfd {
                fd: installer.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let millis = i32::try_from(POLL.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `polls` is an array of two valid pollfds for the call.
        let ready = unsafe { libc::poll(polls.as_mut_ptr(), 2, millis) };
        if polls[1].revents != 0 {
            return Ok(());
        }
        if ready <= 0 {
            continue;
        }
        while let Some(address) = installer
            .uffd
            .next_fault()
            .map_err(PostcopyError::Userfaultfd)?
        {
            let started = Instant::now();
            let host = address & !(PAGE_BYTES - 1);
            let page_number = installer.page_number(host).ok_or_else(|| {
                PostcopyError::Unexpected(format!("a fault at {host:#x}, outside guest memory"))
            })?;
            let fetched =
                source
                    .fetch(page_number, &mut page)
                    .map_err(|reason| PostcopyError::Source {
                        page_number,
                        reason,
                    })?;
            match fetched {
                Fetched::Page => {
                    installer.install(page_number, Some(&page))?;
                }
                Fetched::Zero => {
                    installer.install(page_number, None)?;
                    counters.zero_pages.fetch_add(1, Ordering::Relaxed);
                }
                Fetched::Installed => installer.wake(page_number)?,
            }
            counters.faults.fetch_add(1, Ordering::Relaxed);
            let micros = started.elapsed().as_micros();
            let bucket = usize::try_from(128 - micros.leading_zeros())
                .unwrap_or(usize::MAX)
                .min(23);
            counters.latency[bucket].fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::memory;
    use crate::testing::require_kvm;
    use crate::workload::WorkloadSpec;
    use crate::{Vm, VmConfig};

    /// Pages from a copy of another VM's memory (zero pages reported as such).
    struct CopiedMemory {
        pages: Vec<u8>,
    }

    impl PageSource for CopiedMemory {
        fn fetch(
            &mut self,
            page_number: u64,
            page: &mut [u8; PAGE_BYTES],
        ) -> Result<Fetched, String> {
            let start = usize_from(page_number * PAGE_SIZE);
            let bytes = self
                .pages
                .get(start..start + PAGE_BYTES)
                .ok_or_else(|| format!("no page {page_number}"))?;
            page.copy_from_slice(bytes);
            Ok(if bytes.iter().any(|byte| *byte != 0) {
                Fetched::Page
            } else {
                Fetched::Zero
            })
        }
    }

    /// Runs `workload` 300 ms on a VM, pauses it, and resumes its state on
    /// a second VM whose pages all arrive by fault from a copy of the
    /// first's memory; returns the progress before and after 300 ms there,
    /// and the handler's counts.
    fn resume_on_demand(
        workload: &str,
    ) -> (
        crate::progress::ProgressSample,
        crate::progress::ProgressSample,
        FaultCounts,
    ) {
        let config = VmConfig::new(64 << 20, 1);
        let workload: WorkloadSpec = workload.parse().expect("a workload");
        let mut source_vm = Vm::boot(config, &workload).expect("boot");
        source_vm.resume().expect("run");
        std::thread::sleep(Duration::from_millis(300));
        source_vm.pause().expect("pause");
        let state = source_vm.capture_state().expect("state");
        let before = crate::progress::ProgressSample::read(&source_vm).expect("progress");
        let mut pages = vec![0u8; usize_from(config.memory_bytes)];
        memory::read(source_vm.memory(), 0, &mut pages).expect("copy memory");
        drop(source_vm);
        let mut target = Vm::new(config).expect("a target VM");
        let handler =
            FaultHandler::start(target.memory(), CopiedMemory { pages }).expect("userfaultfd");
        target.restore_state(&state).expect("restore");
        target.resume().expect("resume");
        std::thread::sleep(Duration::from_millis(300));
        target.pause().expect("pause");
        let after = crate::progress::ProgressSample::read(&target).expect("progress");
        assert!(crate::progress::guest_stopped(&target).is_none());
        drop(target);
        let counts = handler.stop().expect("the handler ran");
        (before, after, counts)
    }

    /// A source that must never be asked (the pages come by push).
    struct NeverAsked;

    impl PageSource for NeverAsked {
        fn fetch(&mut self, page_number: u64, _: &mut [u8; PAGE_BYTES]) -> Result<Fetched, String> {
            Err(format!("page {page_number} was asked for"))
        }
    }

    #[test]
    fn a_page_installed_twice_is_ignored_and_one_outside_memory_is_refused() {
        // Root (or CAP_SYS_PTRACE) is needed for a userfaultfd that takes
        // kernel faults, as for the KVM tests.
        if !require_kvm() {
            return;
        }
        let memory = memory::create(memory::MIN_MEMORY).expect("memory");
        let handler = FaultHandler::start(&memory, NeverAsked).expect("userfaultfd");
        let installer = handler.installer();
        let page = [7u8; PAGE_BYTES];
        let beyond = memory::size(&memory) / PAGE_SIZE;

        let first = installer.install(5, Some(&page)).expect("installed");
        let second = installer
            .install(5, Some(&[9u8; PAGE_BYTES]))
            .expect("ignored");
        let outside = installer.install(beyond, Some(&page));
        let mut read = [0u8; PAGE_BYTES];
        memory::read(&memory, 5 * PAGE_SIZE, &mut read).expect("read the page");
        handler.finish().expect("finished");

        assert!(first);
        assert!(!second);
        assert!(matches!(outside, Err(PostcopyError::Unexpected(_))));
        assert_eq!(read, page);
    }

    #[test]
    fn a_guest_runs_on_memory_that_arrives_on_demand() {
        if !require_kvm() {
            return;
        }

        let (before, after, counts) = resume_on_demand("counter");

        let (start, start_hash) = (before.vcpus[0].counter, before.vcpus[0].counter_hash);
        let (end, end_hash) = (after.vcpus[0].counter, after.vcpus[0].counter_hash);
        assert!(
            end > start,
            "the counter did not advance ({start} -> {end})"
        );
        assert_eq!(
            understudy_guest_abi::counter_replay(start, start_hash, end),
            Some(end_hash)
        );
        assert!(counts.faults > 0, "{counts:?}");
    }

    #[test]
    fn pages_never_written_arrive_as_zero_pages() {
        if !require_kvm() {
            return;
        }

        let (_, _, counts) = resume_on_demand("memtouch:rate=50MB/s,wss=16M");

        assert!(counts.zero_pages > 0, "{counts:?}");
        assert!(counts.faults > counts.zero_pages, "{counts:?}");
    }

    #[test]
    fn discarded_pages_read_as_zero_and_their_neighbours_keep_their_bytes() {
        let memory = memory::create(memory::MIN_MEMORY).expect("memory");
        for page_number in 3..8u64 {
            memory::write(&memory, page_number * PAGE_SIZE, &[0xab; PAGE_BYTES]).expect("write");
        }

        discard(&memory, &[5, 4, 6]).expect("discarded");
        let read = |page_number: u64| {
            let mut page = [0u8; PAGE_BYTES];
            memory::read(&memory, page_number * PAGE_SIZE, &mut page).expect("read");
            page
        };

        assert_eq!(read(4), [0; PAGE_BYTES]);
        assert_eq!(read(6), [0; PAGE_BYTES]);
        assert_eq!(read(3), [0xab; PAGE_BYTES]);
        assert_eq!(read(7), [0xab; PAGE_BYTES]);
    }

    #[test]
    fn a_discard_reaching_beyond_memory_drops_nothing() {
        let memory = memory::create(memory::MIN_MEMORY).expect("memory");
        memory::write(&memory, 2 * PAGE_SIZE, &[1; PAGE_BYTES]).expect("write");
        let beyond = memory::size(&memory) / PAGE_SIZE;

        let result = discard(&memory, &[2, beyond]);
        let mut page = [0u8; PAGE_BYTES];
        memory::read(&memory, 2 * PAGE_SIZE, &mut page).expect("read");

        assert!(matches!(result, Err(PostcopyError::OutsideMemory(found)) if found == beyond));
        assert_eq!(page, [1; PAGE_BYTES]);
    }
}
