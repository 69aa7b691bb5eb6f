//! The guest's workloads: `memtouch` (dirty memory at a rate, with a pattern)
//! and `counter` (a hash-chained counter the VMM can verify).

use crate::{Status, rdtsc};
use understudy_guest_abi::{
    BootInfo, FLAG_FREE_CHURN, FLAG_FREE_REPORT, FLAG_WRITE_LOG, PAGE_SIZE, Pattern, SPARSE_WORDS,
    STATE_RUNNING, WORK_AREA_GPA, WRITE_LOG_GPA, counter_seed, counter_step,
};

const WORDS_PER_PAGE: u64 = PAGE_SIZE / 8;
/// Pages written between two status updates and rate checks.
const PAGES_PER_REPORT: u64 = 16;

/// xorshift64*: small, fast, good enough to scatter pages and fill them.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    #[inline(always)]
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    #[inline(always)]
    fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(bound)) >> 64) as u64
    }
}

#[inline(always)]
fn page_words(page: u64) -> *mut u64 {
    (WORK_AREA_GPA + page * PAGE_SIZE) as *mut u64
}

#[inline(always)]
fn write_word(page: u64, word: u64, value: u64) {
    // SAFETY: `page` is inside the work area the VMM sized from `wss_bytes`
    // (checked against guest memory before boot), `word < WORDS_PER_PAGE`.
    unsafe { core::ptr::write_volatile(page_words(page).add(word as usize), value) };
}

fn fill_structured(page: u64, version: u64) {
    let base = (version << 40) ^ (page << 12);
    for word in 0..WORDS_PER_PAGE {
        write_word(page, word, base | word);
    }
}

fn fill_random(page: u64, rng: &mut Rng) {
    for word in 0..WORDS_PER_PAGE {
        write_word(page, word, rng.next());
    }
}

fn fill_sparse(page: u64, rng: &mut Rng) {
    for _ in 0..SPARSE_WORDS {
        let word = rng.below(WORDS_PER_PAGE);
        write_word(page, word, rng.next());
    }
}

fn fill_zero(page: u64) {
    for word in 0..WORDS_PER_PAGE {
        write_word(page, word, 0);
    }
}

/// Sets the page's bit in the write log (shared by all vCPUs, hence atomic).
#[inline(always)]
fn log_write(page: u64) {
    let word = (WRITE_LOG_GPA + (page / 64) * 8) as *const core::sync::atomic::AtomicU64;
    // SAFETY: the write log covers every work-area page; AtomicU64 is 8-byte aligned there.
    unsafe { (*word).fetch_or(1 << (page % 64), core::sync::atomic::Ordering::Relaxed) };
}

/// Dirties this vCPU's share of the working set at `rate_bytes_per_sec / vcpu_count`.
pub(crate) fn memtouch(boot: &BootInfo, index: u32, status: &Status) -> ! {
    let total_pages = boot.wss_bytes / PAGE_SIZE;
    let vcpus = u64::from(boot.vcpu_count);
    let first = total_pages * u64::from(index) / vcpus;
    let end = total_pages * (u64::from(index) + 1) / vcpus;
    let pages = end - first;
    if pages == 0 {
        panic!(
            "memtouch: vCPU {index} has no pages (wss {} bytes)",
            boot.wss_bytes
        );
    }
    let pattern = Pattern::from_u32(boot.pattern).unwrap_or(Pattern::Random);
    // With a free-page report: every other second the top `free_percent`
    // of this share is freed (reported, not touched), then taken back
    // (report cleared first) and written again.
    let freeing = boot.flags & FLAG_FREE_REPORT != 0 && boot.free_percent > 0;
    let kept = if freeing {
        (pages * u64::from(100 - boot.free_percent.min(99)) / 100).max(1)
    } else {
        pages
    };
    let churn = boot.flags & FLAG_FREE_CHURN != 0;
    let started_tsc = rdtsc();
    let mut freed = false;
    let write_log = boot.flags & FLAG_WRITE_LOG != 0;
    let hot_pages = (pages / 10).max(1);
    // TSC ticks per page at this vCPU's share of the rate (0: unthrottled).
    let ticks_per_page = if boot.rate_bytes_per_sec == 0 {
        0
    } else {
        let per_vcpu_rate = (boot.rate_bytes_per_sec / vcpus).max(1);
        (u128::from(boot.tsc_khz) * 1000 * u128::from(PAGE_SIZE) / u128::from(per_vcpu_rate)) as u64
    };

    let ticks_per_second = boot.tsc_khz * 1000;
    let mut rng = Rng::new(boot.seed ^ (u64::from(index) << 48) ^ rdtsc());
    // Resume counts after a restore: the status slot is part of guest memory.
    let (mut written, mut passes) = status.memtouch_progress();
    status.set_state(STATE_RUNNING);
    let mut cursor = written % pages;
    let mut start_tsc = rdtsc();
    let mut written_since_start = 0u64;

    loop {
        let in_use = if freed { kept } else { pages };
        let offset = match pattern {
            Pattern::Seq | Pattern::Zero => {
                let offset = cursor;
                cursor += 1;
                if cursor >= in_use {
                    cursor = 0;
                    passes += 1;
                }
                offset
            }
            Pattern::Hotspot if rng.below(10) < 9 => rng.below(hot_pages.min(in_use)),
            Pattern::Random | Pattern::Sparse | Pattern::Hotspot => rng.below(in_use),
        };
        let page = first + offset;
        match pattern {
            Pattern::Seq => fill_structured(page, passes),
            Pattern::Random | Pattern::Hotspot => fill_random(page, &mut rng),
            Pattern::Sparse => fill_sparse(page, &mut rng),
            Pattern::Zero => fill_zero(page),
        }
        if write_log {
            log_write(page);
        }
        written += 1;
        written_since_start += 1;
        if written % PAGES_PER_REPORT == 0 {
            if freeing {
                let seconds = rdtsc().wrapping_sub(started_tsc) / ticks_per_second.max(1);
                let free_now = if churn {
                    seconds % 2 == 1
                } else {
                    seconds >= 1
                };
                if free_now != freed {
                    // Freeing: report after the last write; taking back:
                    // clear the report before the first write.
                    crate::heap::report_free(first + kept..end, free_now);
                    freed = free_now;
                }
            }
            if !matches!(pattern, Pattern::Seq | Pattern::Zero) {
                passes = written / pages;
            }
            status.set_memtouch_progress(written, passes);
            if ticks_per_page != 0 {
                let due = start_tsc + written_since_start * ticks_per_page;
                let now = rdtsc();
                if now.abs_diff(due) > ticks_per_second {
                    // More than a second off schedule (the VM was paused, or restored
                    // with another TSC): pace from here instead of bursting or stalling.
                    start_tsc = now;
                    written_since_start = 0;
                } else {
                    while rdtsc() < due {
                        core::hint::spin_loop();
                    }
                }
            }
        }
    }
}

/// Advances the hash-chained counter; checks memory still holds what it wrote.
pub(crate) fn counter(boot: &BootInfo, index: u32, status: &Status) -> ! {
    let (mut n, mut hash) = status.counter();
    if status.state() != STATE_RUNNING {
        n = 0;
        hash = counter_seed(boot.seed, index);
        status.set_counter(n, hash);
        status.set_state(STATE_RUNNING);
    }
    loop {
        n += 1;
        hash = counter_step(hash, n);
        status.set_counter(n, hash);
        if n % 1024 == 0 {
            status.beat();
        }
        for _ in 0..boot.counter_spin {
            core::hint::spin_loop();
        }
        let (seen_n, seen_hash) = status.counter();
        if seen_n != n || seen_hash != hash {
            panic!("counter: memory holds {seen_n}/{seen_hash:x}, registers {n}/{hash:x}");
        }
    }
}
