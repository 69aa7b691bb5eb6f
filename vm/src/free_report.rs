//! The guest's free-page report (guest-assisted transfer, after JAVMM and
//! virtio-balloon's free page hinting): work-area pages whose contents the
//! guest does not care about, one bit each at
//! [`FREE_REPORT_GPA`](understudy_guest_abi::FREE_REPORT_GPA), kept by a
//! guest that says so in its boot page ([`FLAG_FREE_REPORT`]).
//!
//! What the VMM does with it, always while the guest is paused (a
//! checkpoint, a pre-copy round's harvest, the switchover):
//! - a dirty page reported free is not sent; it is put back into the dirty
//!   log, so that if the guest takes it back (clearing its bit before
//!   writing it) it goes with the next checkpoint;
//! - the memory hash ([`crate::memory::hash`]) counts reported pages as
//!   zero on both sides, so a page the other side holds stale or zero
//!   compares equal.
//!
//! Failure model: a guest that lies (reports a page it then reads without
//! writing) sees zero or older contents after a failover or migration: it
//! harms only itself. A report that cannot be read (a guest that does not
//! keep one) skips nothing.

use understudy_guest_abi::{
    BOOT_INFO_GPA, BootInfo, FLAG_FREE_REPORT, FREE_REPORT_GPA, FREE_REPORT_SIZE, WORK_AREA_GPA,
};
use zerocopy::FromBytes;

use crate::dirty::{DirtyBitmap, DirtySet};
use crate::memory::{self, GuestMemory, MemoryError};
use crate::{PAGE_SIZE, usize_from};

/// The report as read at one moment.
#[derive(Clone, Debug)]
pub struct FreePages {
    words: Vec<u64>,
    /// Work-area pages the report covers.
    pages: u64,
}

impl FreePages {
    /// Reads the report of the guest in `memory` (paused), or `None` if the
    /// guest keeps none.
    pub fn read(memory: &GuestMemory) -> Result<Option<Self>, MemoryError> {
        let mut boot = [0u8; std::mem::size_of::<BootInfo>()];
        memory::read(memory, BOOT_INFO_GPA, &mut boot)?;
        let Ok(boot) = BootInfo::read_from_bytes(&boot) else {
            return Ok(None);
        };
        Ok(
            Self::words_for(&boot, memory::size(memory)).map(|(pages, bytes)| {
                let mut raw = vec![0u8; bytes];
                // Unreadable: report nothing free.
                if memory::read(memory, FREE_REPORT_GPA, &mut raw).is_err() {
                    raw.fill(0);
                }
                Self::from_bytes(&raw, pages)
            }),
        )
    }

    /// How many work-area pages and report bytes `boot` implies, if it
    /// keeps a report.
    fn words_for(boot: &BootInfo, memory_bytes: u64) -> Option<(u64, usize)> {
        if boot.flags & FLAG_FREE_REPORT == 0 {
            return None;
        }
        let pages = memory_bytes.saturating_sub(WORK_AREA_GPA) / PAGE_SIZE;
        let pages = pages.min(FREE_REPORT_SIZE * 8);
        Some((pages, usize_from(pages.div_ceil(64) * 8)))
    }

    fn from_bytes(raw: &[u8], pages: u64) -> Self {
        Self {
            words: raw
                .chunks_exact(8)
                .map(|word| u64::from_le_bytes(word.try_into().expect("8 bytes")))
                .collect(),
            pages,
        }
    }

    /// Whether the page at guest address `gpa` is reported free.
    pub fn contains(&self, gpa: u64) -> bool {
        if gpa < WORK_AREA_GPA {
            return false;
        }
        let page = (gpa - WORK_AREA_GPA) / PAGE_SIZE;
        page < self.pages
            && self
                .words
                .get(usize_from(page / 64))
                .is_some_and(|word| word & (1 << (page % 64)) != 0)
    }

    /// Pages reported free.
    pub fn count(&self) -> usize {
        self.words
            .iter()
            .map(|word| word.count_ones() as usize)
            .sum()
    }

    /// The report word for `region_start`'s bitmap word `word`, if any
    /// (work-area page `p` is guest page `WORK_AREA_GPA / PAGE_SIZE + p`,
    /// and both start on a word: 1024 pages in).
    fn word_at(&self, region_start: u64, word: usize) -> u64 {
        let first_page = region_start / PAGE_SIZE + word as u64 * 64;
        let work_area_page = WORK_AREA_GPA / PAGE_SIZE;
        if first_page < work_area_page {
            return 0;
        }
        self.words
            .get(usize_from((first_page - work_area_page) / 64))
            .copied()
            .unwrap_or(0)
    }

    /// Splits `dirty` into the pages to send and those reported free
    /// (word by word: it runs while the guest is paused).
    pub fn split(&self, dirty: DirtySet) -> (DirtySet, DirtySet) {
        let mut free_regions = Vec::with_capacity(dirty.regions.len());
        let mut send_regions = Vec::with_capacity(dirty.regions.len());
        for (start, bitmap) in dirty.regions {
            let (mut send, mut free) = (Vec::new(), Vec::new());
            for (index, word) in bitmap.words().iter().enumerate() {
                let reported = self.word_at(start, index);
                send.push(word & !reported);
                free.push(word & reported);
            }
            send_regions.push((start, DirtyBitmap::from_words(send, bitmap.len())));
            free_regions.push((start, DirtyBitmap::from_words(free, bitmap.len())));
        }
        (
            DirtySet {
                regions: send_regions,
            },
            DirtySet {
                regions: free_regions,
            },
        )
    }

    /// Every page reported free, as a dirty set of `memory`'s layout: what
    /// a first copy that skipped them puts back into the dirty log, so that
    /// a page the guest takes back is sent even before it writes it (until
    /// then the other side holds nothing for it, and the page is in use).
    pub fn as_dirty_set(&self, memory: &GuestMemory) -> DirtySet {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        DirtySet {
            regions: memory
                .iter()
                .map(|region| {
                    let start = region.start_addr().0;
                    let pages = usize_from(region.len() / PAGE_SIZE);
                    let words = (0..pages.div_ceil(64))
                        .map(|word| self.word_at(start, word))
                        .collect();
                    (start, DirtyBitmap::from_words(words, pages))
                })
                .collect(),
        }
    }
}

/// Zeroes, in chunks of guest memory read in address order, the pages
/// reported free: what a memory hash hashes (see [`crate::memory::hash`])
/// and what a snapshot stores. Reads
/// the boot page and the report as the chunks go by (both precede the work
/// area), so a hash over memory as overlaid by an epoch sees the report of
/// that epoch.
#[derive(Default)]
pub struct HashMask {
    boot: Vec<u8>,
    report: Option<(u64, Vec<u8>)>,
}

impl HashMask {
    /// Sees the chunk at `address` (after any overlay) and zeroes its
    /// reported pages.
    pub fn apply(&mut self, memory_bytes: u64, address: u64, chunk: &mut [u8]) {
        let end = address + chunk.len() as u64;
        let boot_len = std::mem::size_of::<BootInfo>() as u64;
        if address <= BOOT_INFO_GPA && BOOT_INFO_GPA + boot_len <= end {
            let at = usize_from(BOOT_INFO_GPA - address);
            self.boot = chunk[at..at + usize_from(boot_len)].to_vec();
            self.report = BootInfo::read_from_bytes(&self.boot)
                .ok()
                .and_then(|boot| FreePages::words_for(&boot, memory_bytes))
                .map(|(pages, bytes)| (pages, vec![0u8; bytes]));
        }
        let Some((pages, report)) = &mut self.report else {
            return;
        };
        let report_end = FREE_REPORT_GPA + report.len() as u64;
        if address < report_end && end > FREE_REPORT_GPA {
            let from = address.max(FREE_REPORT_GPA);
            let to = end.min(report_end);
            report[usize_from(from - FREE_REPORT_GPA)..usize_from(to - FREE_REPORT_GPA)]
                .copy_from_slice(&chunk[usize_from(from - address)..usize_from(to - address)]);
        }
        if end <= WORK_AREA_GPA {
            return;
        }
        let mask = FreePages::from_bytes(report, *pages);
        let first = address.max(WORK_AREA_GPA).next_multiple_of(PAGE_SIZE);
        let mut page = first;
        while page + PAGE_SIZE <= end {
            if mask.contains(page) {
                let at = usize_from(page - address);
                chunk[at..at + usize_from(PAGE_SIZE)].fill(0);
            }
            page += PAGE_SIZE;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(free_pages: &[u64], pages: u64) -> FreePages {
        let mut words = vec![0u64; usize_from(pages.div_ceil(64))];
        for page in free_pages {
            words[usize_from(page / 64)] |= 1 << (page % 64);
        }
        FreePages { words, pages }
    }

    #[test]
    fn only_work_area_pages_can_be_free() {
        let free = report(&[0, 5], 100);

        assert!(free.contains(WORK_AREA_GPA));
        assert!(free.contains(WORK_AREA_GPA + 5 * PAGE_SIZE));
        assert!(!free.contains(WORK_AREA_GPA + PAGE_SIZE));
        assert!(!free.contains(BOOT_INFO_GPA));
        assert!(!free.contains(WORK_AREA_GPA + 100 * PAGE_SIZE));
    }

    #[test]
    fn a_dirty_set_splits_into_pages_to_send_and_free_ones() {
        let free = report(&[1, 3], 64);
        let mut bitmap = DirtyBitmap::new(usize_from(WORK_AREA_GPA / PAGE_SIZE) + 64);
        let base = usize_from(WORK_AREA_GPA / PAGE_SIZE);
        for page in [0, 1, 2, 3] {
            bitmap.set(base + page);
        }
        bitmap.set(3); // below the work area: never free
        let dirty = DirtySet {
            regions: vec![(0, bitmap)],
        };

        let (send, skipped) = free.split(dirty);

        let sent: Vec<usize> = send.regions[0].1.iter().collect();
        let held: Vec<usize> = skipped.regions[0].1.iter().collect();
        assert_eq!(sent, vec![3, base, base + 2]);
        assert_eq!(held, vec![base + 1, base + 3]);
    }
}
