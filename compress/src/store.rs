//! The bounded store of page versions that encoder and decoder both keep: the
//! last version of each page the receiver holds, as far as the capacity
//! allows. `delta` encodes a page against its own earlier version here;
//! `similarity` against any page here.
//!
//! Both sides must hold exactly the same pages, so the store changes only
//! through [`PageStore::put`], which the encoder and the decoder call with
//! the same pages in the same order once a batch is committed. Eviction is
//! CLOCK (second chance), deterministic given that order.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use understudy_guest_abi::usize_from;

use crate::batch::{PAGE_BYTES, Page, as_page, as_page_mut};

/// Hashes page numbers with one multiplication (Fibonacci hashing): page
/// numbers are not attacker-chosen keys the way strings are, and SipHash
/// would cost more than the rest of a lookup.
#[derive(Default)]
pub struct PageNumberHasher(u64);

impl Hasher for PageNumberHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0 ^ value).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A map keyed by page number.
pub type PageNumberMap<V> = HashMap<u64, V, BuildHasherDefault<PageNumberHasher>>;

/// Page versions, bounded, with CLOCK eviction.
#[derive(Debug, Default)]
pub struct PageStore {
    capacity: usize,
    contents: Vec<u8>,
    slot_page_numbers: Vec<u64>,
    referenced: Vec<bool>,
    slots: PageNumberMap<u32>,
    hand: usize,
}

impl PageStore {
    /// A store holding at most `capacity` pages (0 holds nothing).
    ///
    /// The address space for all of them is reserved at once, so the store
    /// never moves as it fills; memory is only used as pages arrive.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.min(usize_from(u64::from(u32::MAX)));
        Self {
            capacity,
            contents: Vec::with_capacity(capacity * PAGE_BYTES),
            slot_page_numbers: Vec::with_capacity(capacity),
            referenced: Vec::with_capacity(capacity),
            slots: PageNumberMap::with_capacity_and_hasher(capacity, Default::default()),
            hand: 0,
        }
    }

    /// Most pages this store holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Pages held now.
    pub fn len(&self) -> usize {
        self.slot_page_numbers.len()
    }

    /// Whether no page is held.
    pub fn is_empty(&self) -> bool {
        self.slot_page_numbers.is_empty()
    }

    /// Bytes held: page contents plus bookkeeping, for the pages held (the
    /// rest of the reservation is address space the kernel has not backed).
    pub fn memory_bytes(&self) -> usize {
        self.contents.len() + self.len() * (8 + 1) + self.slots.capacity() * (8 + 4 + 1)
    }

    /// The version of page `page_number` held, if any.
    pub fn get(&self, page_number: u64) -> Option<&Page> {
        let slot = *self.slots.get(&page_number)? as usize;
        Some(as_page(&self.contents[slot * PAGE_BYTES..]))
    }

    /// Records `contents` as the version of `page_number` the receiver holds,
    /// evicting another page if the store is full.
    pub fn put(&mut self, page_number: u64, contents: &Page) {
        if self.capacity == 0 {
            return;
        }
        let slot = match self.slots.get(&page_number) {
            Some(&slot) => slot as usize,
            None if self.len() < self.capacity => {
                let slot = self.len();
                self.slot_page_numbers.push(page_number);
                self.referenced.push(true);
                self.contents.extend_from_slice(contents);
                self.slots.insert(page_number, slot_index(slot));
                return;
            }
            None => {
                let slot = self.evict();
                self.slot_page_numbers[slot] = page_number;
                self.slots.insert(page_number, slot_index(slot));
                slot
            }
        };
        self.referenced[slot] = true;
        as_page_mut(&mut self.contents[slot * PAGE_BYTES..]).copy_from_slice(contents);
    }

    /// Frees a slot by CLOCK: the hand clears reference bits until it finds
    /// a slot whose bit is already clear.
    fn evict(&mut self) -> usize {
        loop {
            let slot = self.hand;
            self.hand = (self.hand + 1) % self.len();
            if self.referenced[slot] {
                self.referenced[slot] = false;
            } else {
                self.slots.remove(&self.slot_page_numbers[slot]);
                return slot;
            }
        }
    }
}

/// A slot as the page-number map stores it.
fn slot_index(slot: usize) -> u32 {
    u32::try_from(slot).expect("a store holds at most u32::MAX pages")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(value: u8) -> Page {
        [value; PAGE_BYTES]
    }

    #[test]
    fn put_then_get_returns_the_latest_version() {
        let mut store = PageStore::new(4);

        store.put(10, &page(1));
        store.put(10, &page(2));

        assert_eq!(store.get(10), Some(&page(2)));
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn full_store_evicts_and_stays_at_capacity() {
        let mut store = PageStore::new(2);

        store.put(1, &page(1));
        store.put(2, &page(2));
        store.put(3, &page(3));

        assert_eq!(store.len(), 2);
        assert_eq!(store.get(3), Some(&page(3)));
        assert_eq!(
            usize::from(store.get(1).is_some()) + usize::from(store.get(2).is_some()),
            1
        );
    }

    #[test]
    fn page_untouched_since_the_last_sweep_is_evicted_before_a_newer_one() {
        let mut store = PageStore::new(2);
        store.put(1, &page(1));
        store.put(2, &page(2));
        store.put(3, &page(3)); // The sweep clears both bits and evicts page 1.

        store.put(5, &page(5));

        assert_eq!(store.get(2), None);
        assert_eq!(store.get(3), Some(&page(3)));
        assert_eq!(store.get(5), Some(&page(5)));
    }

    #[test]
    fn zero_capacity_holds_nothing() {
        let mut store = PageStore::new(0);

        store.put(1, &page(1));

        assert!(store.get(1).is_none());
        assert!(store.is_empty());
    }

    #[test]
    fn same_puts_give_same_contents() {
        let mut a = PageStore::new(3);
        let mut b = PageStore::new(3);
        for n in [1u64, 2, 3, 1, 4, 5, 2, 6, 7, 1] {
            a.put(n, &page(n.to_le_bytes()[0]));
            b.put(n, &page(n.to_le_bytes()[0]));
        }

        let held = |store: &PageStore| (0..8).map(|n| store.get(n).is_some()).collect::<Vec<_>>();

        assert_eq!(held(&a), held(&b));
    }
}
