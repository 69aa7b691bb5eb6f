//! The `kv` guest's heap, which reports what it frees (JAVMM's idea on a
//! Redis-protocol store): small allocations come from a linked-list heap
//! in the first part of the work area; allocations of [`RUN_BYTES`] or more
//! (large values) take whole pages from the rest, and when freed those
//! pages are reported free at `FREE_REPORT_GPA`, so checkpoints and
//! migrations do not send them.
//!
//! The report's rule holds by construction: a run's pages are taken back
//! (their bits cleared) before the allocation is returned, so before the
//! program can write them; they are reported when freed, after which
//! Rust never reads them. The allocator's own bookkeeping (the bitmap of
//! used pages) lives in the linked-list heap, never reported.

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use linked_list_allocator::LockedHeap;
use understudy_guest_abi::{FREE_REPORT_GPA, PAGE_SIZE, WORK_AREA_GPA};

/// Allocations at least this large take whole pages of their own.
pub(crate) const RUN_BYTES: usize = 16 * 1024;
/// Pages the run area can hold at most (1 GiB: its bitmap is a fixed
/// array in the guest image's memory, 32 KiB).
const MAX_RUN_PAGES: usize = 1 << 18;

/// The heap.
pub(crate) struct ReportingHeap {
    small: LockedHeap,
    lock: AtomicBool,
    /// First page (work-area page number) of the run area, and its length.
    first: AtomicU64,
    pages: AtomicU64,
}

/// One bit per run-area page: in use.
static mut USED: [u64; MAX_RUN_PAGES / 64] = [0; MAX_RUN_PAGES / 64];

impl ReportingHeap {
    pub(crate) const fn empty() -> Self {
        Self {
            small: LockedHeap::empty(),
            lock: AtomicBool::new(false),
            first: AtomicU64::new(0),
            pages: AtomicU64::new(0),
        }
    }

    /// Takes the work area `[WORK_AREA_GPA, +bytes)`: a quarter (at least
    /// 4 MiB, at most all of it) for small allocations, the rest in runs,
    /// all of it reported free to begin with.
    ///
    /// # Safety
    /// The work area is identity-mapped memory only this heap uses; called
    /// once, before any allocation.
    pub(crate) unsafe fn init(&self, bytes: u64) {
        let small = (bytes / 4).max(4 << 20).min(bytes) / PAGE_SIZE * PAGE_SIZE;
        // SAFETY: as the caller promised, for the first part.
        unsafe {
            self.small
                .lock()
                .init(WORK_AREA_GPA as *mut u8, small as usize)
        };
        let first = small / PAGE_SIZE;
        let pages = ((bytes - small) / PAGE_SIZE).min(MAX_RUN_PAGES as u64);
        self.first.store(first, Ordering::Relaxed);
        self.pages.store(pages, Ordering::Relaxed);
        report_free(first..first + pages, true);
    }

    fn locked<T>(&self, work: impl FnOnce(&mut [u64; MAX_RUN_PAGES / 64]) -> T) -> T {
        while self
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        // SAFETY: the lock gives this thread the only access to USED.
        let result = work(unsafe { &mut *core::ptr::addr_of_mut!(USED) });
        self.lock.store(false, Ordering::Release);
        result
    }

    /// Finds `count` free pages in a row, marks them used; their first.
    fn take_run(&self, count: u64) -> Option<u64> {
        let pages = self.pages.load(Ordering::Relaxed);
        self.locked(|used| {
            let mut start = 0;
            while start + count <= pages {
                match (start..start + count).find(|page| is_set(used, *page)) {
                    Some(taken) => start = taken + 1,
                    None => {
                        for page in start..start + count {
                            used[(page / 64) as usize] |= 1 << (page % 64);
                        }
                        return Some(start);
                    }
                }
            }
            None
        })
    }

    fn give_back(&self, start: u64, count: u64) {
        self.locked(|used| {
            for page in start..start + count {
                used[(page / 64) as usize] &= !(1 << (page % 64));
            }
        });
    }
}

fn is_set(used: &[u64; MAX_RUN_PAGES / 64], page: u64) -> bool {
    used[(page / 64) as usize] & (1 << (page % 64)) != 0
}

/// Reports work-area pages `pages` free (their contents no longer matter)
/// or in use again; in use again is reported *before* the pages are
/// written (the rule of `FREE_REPORT_GPA`). Shared by every workload that
/// keeps the report.
pub(crate) fn report_free(pages: core::ops::Range<u64>, free: bool) {
    for page in pages {
        let word = (FREE_REPORT_GPA + (page / 64) * 8) as *const AtomicU64;
        let bit = 1u64 << (page % 64);
        // SAFETY: the report covers every work-area page (16 GiB of them);
        // AtomicU64 is 8-byte aligned there; vCPUs share words, hence atomics.
        unsafe {
            if free {
                (*word).fetch_or(bit, Ordering::SeqCst);
            } else {
                (*word).fetch_and(!bit, Ordering::SeqCst);
            }
        }
    }
}

fn run_pages(layout: Layout) -> u64 {
    (layout.size() as u64).div_ceil(PAGE_SIZE)
}

// SAFETY: runs are whole pages, page-aligned (every alignment up to a page
// holds), handed out at most once until freed (the used bitmap under its
// lock); the rest is the linked-list heap's.
unsafe impl GlobalAlloc for ReportingHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= RUN_BYTES && layout.align() <= PAGE_SIZE as usize {
            let count = run_pages(layout);
            if let Some(start) = self.take_run(count) {
                let first = self.first.load(Ordering::Relaxed) + start;
                // Taken back before the program can write them.
                report_free(first..first + count, false);
                return (WORK_AREA_GPA + first * PAGE_SIZE) as *mut u8;
            }
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { self.small.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let address = ptr as u64;
        let first = self.first.load(Ordering::Relaxed);
        let runs_start = WORK_AREA_GPA + first * PAGE_SIZE;
        let runs_end = runs_start + self.pages.load(Ordering::Relaxed) * PAGE_SIZE;
        if (runs_start..runs_end).contains(&address) {
            let start = (address - runs_start) / PAGE_SIZE;
            let count = run_pages(layout);
            // Freed: the program never reads these again.
            report_free(first + start..first + start + count, true);
            self.give_back(start, count);
            return;
        }
        // SAFETY: not a run, so the linked-list heap's, with its layout.
        unsafe { self.small.dealloc(ptr, layout) }
    }
}
