//! The dirty set: which guest pages changed since the last harvest.
//!
//! Two sources write guest memory, and both must be seen:
//! - the guest's vCPUs, which KVM records in its dirty log for every slot
//!   registered with `KVM_MEM_LOG_DIRTY_PAGES` (read and cleared by
//!   `KVM_GET_DIRTY_LOG`);
//! - the VMM itself (device emulation, DMA, the boot loader), which KVM does not
//!   see; vm-memory's `AtomicBitmap` records those writes.
//!
//! A [`DirtyTracker::harvest`] ORs both into one [`DirtyBitmap`] per memory
//! region. Reading KVM's log clears it, so a harvest whose consumer fails must
//! hand the pages back with [`DirtyTracker::put_back`], and a harvest that fails
//! half-way puts back what it already took: no dirty page is ever lost.

use std::sync::Mutex;

use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;
use crate::{PAGE_SIZE, usize_from};

/// Errors of dirty-page tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// KVM refused to return a slot's dirty log.
    #[error("failed to read KVM's dirty log of memory slot {slot}")]
    GetDirtyLog {
        /// The memory slot.
        slot: u32,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Two bitmaps of different lengths were combined.
    #[error("dirty bitmaps of {left} and {right} pages cannot be combined")]
    LengthMismatch {
        /// Pages in the first bitmap.
        left: usize,
        /// Pages in the second bitmap.
        right: usize,
    },
    /// A harvest was put back into a tracker for another memory layout.
    #[error("a harvest of {harvested} regions does not fit a tracker of {tracked} regions")]
    LayoutMismatch {
        /// Regions in the harvest.
        harvested: usize,
        /// Regions the tracker tracks.
        tracked: usize,
    },
}

/// A bitmap with one bit per guest page of one memory region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: usize,
}

impl DirtyBitmap {
    /// An empty bitmap for `pages` pages.
    pub fn new(pages: usize) -> Self {
        Self {
            words: vec![0; pages.div_ceil(64)],
            pages,
        }
    }

    /// Wraps KVM's (or vm-memory's) bitmap words for `pages` pages. Bits past
    /// `pages` are cleared; missing words count as clean.
    pub fn from_words(mut words: Vec<u64>, pages: usize) -> Self {
        words.resize(pages.div_ceil(64), 0);
        if !pages.is_multiple_of(64)
            && let Some(last) = words.last_mut()
        {
            *last &= (1u64 << (pages % 64)) - 1;
        }
        Self { words, pages }
    }

    /// The words as little-endian bytes (how the replication protocol
    /// carries a bitmap).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        self.words
            .iter()
            .flat_map(|word| word.to_le_bytes())
            .collect()
    }

    /// A bitmap for `pages` pages from [`Self::to_le_bytes`]'s bytes, if
    /// they are exactly its words.
    pub fn from_le_bytes(bytes: &[u8], pages: usize) -> Option<Self> {
        if bytes.len() != pages.div_ceil(64) * 8 {
            return None;
        }
        let words = bytes
            .chunks_exact(8)
            .map(|word| u64::from_le_bytes(word.try_into().expect("8 bytes")))
            .collect();
        Some(Self::from_words(words, pages))
    }

    /// Number of pages the bitmap covers.
    pub fn len(&self) -> usize {
        self.pages
    }

    /// Whether the bitmap covers no pages.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// The underlying words, bit `i % 64` of word `i / 64` for page `i`.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Marks page `page` dirty; pages past the end are ignored.
    pub fn set(&mut self, page: usize) {
        if page < self.pages {
            self.words[page / 64] |= 1 << (page % 64);
        }
    }

    /// Whether page `page` is dirty.
    pub fn is_set(&self, page: usize) -> bool {
        page < self.pages && self.words[page / 64] & (1 << (page % 64)) != 0
    }

    /// Marks every page overlapping `[offset, offset + len)` (bytes) dirty.
    pub fn set_byte_range(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / PAGE_SIZE;
        let last = (offset + len - 1) / PAGE_SIZE;
        for page in first..=last.min(self.pages as u64 - 1) {
            self.set(usize_from(page));
        }
    }

    /// Number of dirty pages.
    pub fn count(&self) -> usize {
        self.words
            .iter()
            .map(|word| word.count_ones() as usize)
            .sum()
    }

    /// ORs `other` into `self`.
    pub fn union_with(&mut self, other: &DirtyBitmap) -> Result<(), DirtyLogError> {
        if self.pages != other.pages {
            return Err(DirtyLogError::LengthMismatch {
                left: self.pages,
                right: other.pages,
            });
        }
        for (mine, theirs) in self.words.iter_mut().zip(&other.words) {
            *mine |= theirs;
        }
        Ok(())
    }

    /// Whether every page dirty in `self` is also dirty in `other`.
    pub fn is_subset_of(&self, other: &DirtyBitmap) -> bool {
        self.pages == other.pages
            && self
                .words
                .iter()
                .zip(&other.words)
                .all(|(mine, theirs)| mine & !theirs == 0)
    }

    /// Dirty page numbers in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(index, &word)| {
            let mut bits = word;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let bit = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                Some(index * 64 + bit)
            })
        })
    }

    /// Runs of consecutive dirty pages as `(first_page, page_count)`, ascending.
    pub fn runs(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let mut pages = self.iter().peekable();
        std::iter::from_fn(move || {
            let first = pages.next()?;
            let mut count = 1;
            while pages.peek() == Some(&(first + count)) {
                pages.next();
                count += 1;
            }
            Some((first, count))
        })
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }
}

/// The dirty pages of every memory region, in region order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtySet {
    /// One bitmap per region, with the region's guest-physical start address.
    pub regions: Vec<(u64, DirtyBitmap)>,
}

impl DirtySet {
    /// Total dirty pages over all regions.
    pub fn count(&self) -> usize {
        self.regions.iter().map(|(_, bitmap)| bitmap.count()).sum()
    }

    /// Guest-physical addresses of all dirty pages, ascending within each region.
    pub fn page_addresses(&self) -> impl Iterator<Item = u64> + '_ {
        self.regions.iter().flat_map(|(start, bitmap)| {
            bitmap
                .iter()
                .map(move |page| start + page as u64 * PAGE_SIZE)
        })
    }

    /// Whether the page at guest-physical address `gpa` is dirty.
    pub fn contains(&self, gpa: u64) -> bool {
        self.regions.iter().any(|(start, bitmap)| {
            gpa >= *start && bitmap.is_set(((gpa - start) / PAGE_SIZE) as usize)
        })
    }
}

/// Harvests the dirty set of a VM: KVM's log OR the VMM's own writes.
pub struct DirtyTracker {
    /// Pages taken from KVM or the VMM bitmap but not consumed: returned by a
    /// failed harvest or consumer, added to the next harvest.
    put_back: Mutex<Vec<DirtyBitmap>>,
    /// Every page harvested since [`DirtyTracker::mark`], when marked: what
    /// changed since an image of this memory was kept elsewhere.
    since_mark: Mutex<Option<Vec<DirtyBitmap>>>,
}

impl DirtyTracker {
    /// A tracker for `memory`, whose region `i` is KVM memory slot `i`.
    pub fn new(memory: &GuestMemory) -> Self {
        let put_back = memory
            .iter()
            .map(|region| DirtyBitmap::new((region.len() / PAGE_SIZE) as usize))
            .collect();
        Self {
            put_back: Mutex::new(put_back),
            since_mark: Mutex::new(None),
        }
    }

    /// From now on, remembers every page harvested (whoever harvests) until
    /// [`DirtyTracker::forget_mark`]: the memory as it is now is the image
    /// the pages are counted against. What was dirty before is dropped.
    pub fn mark(&self, vm: &VmFd, memory: &GuestMemory) -> Result<(), DirtyLogError> {
        self.harvest(vm, memory)?;
        self.mark_as_of_last_harvest(memory);
        Ok(())
    }

    /// Like [`DirtyTracker::mark`], but the image is the memory as of the
    /// last harvest: whatever was written since (not harvested yet) counts
    /// as changed.
    pub fn mark_as_of_last_harvest(&self, memory: &GuestMemory) {
        let empty = memory
            .iter()
            .map(|region| DirtyBitmap::new(usize_from(region.len() / PAGE_SIZE)))
            .collect();
        *self.since_mark.lock().expect("dirty tracker lock poisoned") = Some(empty);
    }

    /// The pages harvested since the mark (harvest first to include the
    /// latest writes), if there is a mark.
    pub fn since_mark(&self, memory: &GuestMemory) -> Option<DirtySet> {
        let since_mark = self.since_mark.lock().expect("dirty tracker lock poisoned");
        since_mark.as_ref().map(|bitmaps| DirtySet {
            regions: memory
                .iter()
                .zip(bitmaps)
                .map(|(region, bitmap)| (region.start_addr().0, bitmap.clone()))
                .collect(),
        })
    }

    /// Stops remembering pages since the mark.
    pub fn forget_mark(&self) {
        *self.since_mark.lock().expect("dirty tracker lock poisoned") = None;
    }

    /// Reads and clears the dirty set since the previous harvest.
    ///
    /// On error nothing is lost: the pages already taken from KVM go back to
    /// the tracker and are reported by the next successful harvest.
    pub fn harvest(&self, vm: &VmFd, memory: &GuestMemory) -> Result<DirtySet, DirtyLogError> {
        let mut put_back = self.put_back.lock().expect("dirty tracker lock poisoned");
        let mut regions = Vec::with_capacity(memory.num_regions());
        for (slot, region) in memory.iter().enumerate() {
            let pages = usize_from(region.len() / PAGE_SIZE);
            let slot_number = u32::try_from(slot).expect("a handful of memory slots");
            let kvm_words = match vm.get_dirty_log(slot_number, usize_from(region.len())) {
                Ok(words) => words,
                Err(source) => {
                    // KVM cleared the logs of the slots before this one: keep them.
                    for (index, (_, bitmap)) in regions.into_iter().enumerate() {
                        put_back[index].union_with(&bitmap)?;
                    }
                    return Err(DirtyLogError::GetDirtyLog {
                        slot: slot_number,
                        source,
                    });
                }
            };
            let mut bitmap = DirtyBitmap::from_words(kvm_words, pages);
            let vmm_words = vmm_bitmap(region).get_and_reset();
            bitmap.union_with(&DirtyBitmap::from_words(vmm_words, pages))?;
            bitmap.union_with(&put_back[slot])?;
            put_back[slot].clear();
            regions.push((region.start_addr().0, bitmap));
        }
        if let Some(since_mark) = self
            .since_mark
            .lock()
            .expect("dirty tracker lock poisoned")
            .as_mut()
        {
            for (remembered, (_, bitmap)) in since_mark.iter_mut().zip(&regions) {
                remembered.union_with(bitmap)?;
            }
        }
        Ok(DirtySet { regions })
    }

    /// Returns a harvest whose consumer failed; its pages join the next harvest.
    pub fn put_back(&self, set: &DirtySet) -> Result<(), DirtyLogError> {
        let mut put_back = self.put_back.lock().expect("dirty tracker lock poisoned");
        if set.regions.len() != put_back.len() {
            return Err(DirtyLogError::LayoutMismatch {
                harvested: set.regions.len(),
                tracked: put_back.len(),
            });
        }
        for (pending, (_, bitmap)) in put_back.iter_mut().zip(&set.regions) {
            pending.union_with(bitmap)?;
        }
        Ok(())
    }
}

/// The bitmap of the VMM's own writes to `region` (vm-memory marks it).
fn vmm_bitmap(region: &crate::memory::GuestRegion) -> &vm_memory::bitmap::AtomicBitmap {
    let mapping: &vm_memory::MmapRegion<vm_memory::bitmap::AtomicBitmap> = region;
    mapping.bitmap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_words_masks_bits_past_the_end() {
        let bitmap = DirtyBitmap::from_words(vec![u64::MAX], 10);
        assert_eq!(bitmap.count(), 10);
    }

    #[test]
    fn a_bitmap_survives_its_bytes_and_refuses_a_wrong_length() {
        let mut bitmap = DirtyBitmap::new(130);
        bitmap.set(0);
        bitmap.set(129);

        let bytes = bitmap.to_le_bytes();

        assert_eq!(DirtyBitmap::from_le_bytes(&bytes, 130), Some(bitmap));
        assert_eq!(DirtyBitmap::from_le_bytes(&bytes, 200), None);
    }

    #[test]
    fn from_words_pads_missing_words_as_clean() {
        let bitmap = DirtyBitmap::from_words(vec![1], 200);
        assert_eq!(bitmap.words().len(), 4);
        assert_eq!(bitmap.count(), 1);
    }

    #[test]
    fn set_and_is_set_agree() {
        let mut bitmap = DirtyBitmap::new(130);
        bitmap.set(129);
        assert!(bitmap.is_set(129));
        assert!(!bitmap.is_set(128));
    }

    #[test]
    fn set_past_the_end_is_ignored() {
        let mut bitmap = DirtyBitmap::new(10);
        bitmap.set(10);
        assert_eq!(bitmap.count(), 0);
    }

    #[test]
    fn byte_range_marks_every_overlapped_page() {
        let mut bitmap = DirtyBitmap::new(8);
        bitmap.set_byte_range(PAGE_SIZE - 1, 2);
        assert_eq!(bitmap.iter().collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn byte_range_is_clamped_to_the_bitmap() {
        let mut bitmap = DirtyBitmap::new(2);
        bitmap.set_byte_range(PAGE_SIZE, 1 << 20);
        assert_eq!(bitmap.iter().collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn iter_lists_pages_in_order() {
        let bitmap = DirtyBitmap::from_words(vec![0b1010, 1 << 63], 128);
        assert_eq!(bitmap.iter().collect::<Vec<_>>(), vec![1, 3, 127]);
    }

    #[test]
    fn runs_group_consecutive_pages() {
        let bitmap = DirtyBitmap::from_words(vec![0b1110_0111, 1], 128);
        assert_eq!(
            bitmap.runs().collect::<Vec<_>>(),
            vec![(0, 3), (5, 3), (64, 1)]
        );
    }

    #[test]
    fn runs_cross_word_boundaries() {
        let bitmap = DirtyBitmap::from_words(vec![1 << 63, 1], 128);
        assert_eq!(bitmap.runs().collect::<Vec<_>>(), vec![(63, 2)]);
    }

    #[test]
    fn union_ors_bits() {
        let mut left = DirtyBitmap::from_words(vec![0b01], 64);
        let right = DirtyBitmap::from_words(vec![0b10], 64);
        left.union_with(&right).expect("same length");
        assert_eq!(left.words(), &[0b11]);
    }

    #[test]
    fn union_of_different_lengths_is_an_error() {
        let mut left = DirtyBitmap::new(64);
        let result = left.union_with(&DirtyBitmap::new(65));
        assert!(matches!(
            result,
            Err(DirtyLogError::LengthMismatch {
                left: 64,
                right: 65
            })
        ));
    }

    #[test]
    fn subset_holds_for_fewer_bits_and_fails_for_extra_bits() {
        let small = DirtyBitmap::from_words(vec![0b0100], 64);
        let big = DirtyBitmap::from_words(vec![0b0110], 64);
        assert!(small.is_subset_of(&big));
        assert!(!big.is_subset_of(&small));
    }

    #[test]
    fn dirty_set_reports_addresses_per_region() {
        let set = DirtySet {
            regions: vec![
                (0, DirtyBitmap::from_words(vec![0b10], 4)),
                (0x10_0000, DirtyBitmap::from_words(vec![0b1], 4)),
            ],
        };
        assert_eq!(
            set.page_addresses().collect::<Vec<_>>(),
            vec![0x1000, 0x10_0000]
        );
        assert!(set.contains(0x10_0fff));
        assert!(!set.contains(0x2000));
        assert_eq!(set.count(), 2);
    }
}
