//! A batch of pages: what one epoch of a checkpoint (or one epoch of a trace)
//! carries. Page numbers and contents are stored in two flat vectors, in the
//! order they were pushed, so a batch of a thousand pages is two allocations.

use xxhash_rust::xxh3::Xxh3;

/// The project's one page size (the guest ABI's), in bytes as a length and as a u64.
pub use understudy_guest_abi::{PAGE_BYTES, PAGE_SIZE};

/// The contents of one page.
pub type Page = [u8; PAGE_BYTES];

/// Page numbers and their contents, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageBatch {
    page_numbers: Vec<u64>,
    contents: Vec<u8>,
}

impl PageBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty batch with room for `pages` pages.
    pub fn with_capacity(pages: usize) -> Self {
        Self {
            page_numbers: Vec::with_capacity(pages),
            contents: Vec::with_capacity(pages * PAGE_BYTES),
        }
    }

    /// Appends a page.
    pub fn push(&mut self, page_number: u64, contents: &Page) {
        self.page_numbers.push(page_number);
        self.contents.extend_from_slice(contents);
    }

    /// Appends a page and returns its (zeroed) contents to fill in.
    pub fn push_zeroed(&mut self, page_number: u64) -> &mut Page {
        self.page_numbers.push(page_number);
        let start = self.contents.len();
        self.contents.resize(start + PAGE_BYTES, 0);
        as_page_mut(&mut self.contents[start..])
    }

    /// Appends `count` consecutive pages from `first` and returns their
    /// (zeroed) contents as one slice, to fill in with one copy.
    pub fn push_run_zeroed(&mut self, first: u64, count: usize) -> &mut [u8] {
        self.page_numbers.extend(first..first + count as u64);
        let start = self.contents.len();
        self.contents.resize(start + count * PAGE_BYTES, 0);
        &mut self.contents[start..]
    }

    /// Removes every page, keeping the allocations.
    pub fn clear(&mut self) {
        self.page_numbers.clear();
        self.contents.clear();
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.page_numbers.len()
    }

    /// Whether the batch holds no page.
    pub fn is_empty(&self) -> bool {
        self.page_numbers.is_empty()
    }

    /// Bytes of page contents (pages times 4 KiB).
    pub fn content_bytes(&self) -> usize {
        self.contents.len()
    }

    /// The page numbers, in order.
    pub fn page_numbers(&self) -> &[u64] {
        &self.page_numbers
    }

    /// All contents, page after page.
    pub fn contents(&self) -> &[u8] {
        &self.contents
    }

    /// The page number of the `index`th page.
    pub fn page_number(&self, index: usize) -> u64 {
        self.page_numbers[index]
    }

    /// The contents of the `index`th page.
    pub fn page(&self, index: usize) -> &Page {
        as_page(&self.contents[index * PAGE_BYTES..])
    }

    /// The contents of the `index`th page, to change.
    pub fn page_mut(&mut self, index: usize) -> &mut Page {
        as_page_mut(&mut self.contents[index * PAGE_BYTES..])
    }

    /// Page numbers with their contents, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (u64, &Page)> {
        self.page_numbers
            .iter()
            .copied()
            .zip(self.contents.chunks_exact(PAGE_BYTES).map(as_page))
    }

    /// xxh3 of the page numbers (little-endian) followed by the contents: what
    /// a frame's content checksum and a trace epoch's checksum cover.
    pub fn checksum(&self) -> u64 {
        let mut hasher = Xxh3::new();
        for page_number in &self.page_numbers {
            hasher.update(&page_number.to_le_bytes());
        }
        hasher.update(&self.contents);
        hasher.digest()
    }

    /// Builds a batch from page numbers and their concatenated contents.
    ///
    /// Returns `None` when `contents` is not exactly one page per number.
    pub fn from_parts(page_numbers: Vec<u64>, contents: Vec<u8>) -> Option<Self> {
        (contents.len() == page_numbers.len() * PAGE_BYTES).then_some(Self {
            page_numbers,
            contents,
        })
    }
}

/// Views the first page of `bytes` as a page.
///
/// Panics if `bytes` is shorter than a page: callers slice at page
/// boundaries they have checked.
pub fn as_page(bytes: &[u8]) -> &Page {
    bytes[..PAGE_BYTES]
        .try_into()
        .expect("slice of exactly PAGE_BYTES bytes")
}

/// Views the first page of `bytes` as a page, to change.
pub fn as_page_mut(bytes: &mut [u8]) -> &mut Page {
    (&mut bytes[..PAGE_BYTES])
        .try_into()
        .expect("slice of exactly PAGE_BYTES bytes")
}

/// Whether every byte of `page` is zero.
pub fn is_zero_page(page: &Page) -> bool {
    page.chunks_exact(64).all(|block| {
        block.chunks_exact(8).fold(0u64, |acc, word| {
            acc | u64::from_le_bytes(word.try_into().expect("8 bytes"))
        }) == 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_and_read_back() {
        let mut batch = PageBatch::new();
        let mut page = [0u8; PAGE_BYTES];
        page[7] = 9;

        batch.push(42, &page);
        batch.push_zeroed(43)[0] = 1;

        assert_eq!(batch.len(), 2);
        assert_eq!(batch.page_number(1), 43);
        assert_eq!(batch.page(0)[7], 9);
        assert_eq!(batch.page(1)[0], 1);
        assert_eq!(batch.content_bytes(), 2 * PAGE_BYTES);
    }

    #[test]
    fn a_run_of_pages_is_one_slice() {
        let mut batch = PageBatch::new();

        batch.push_run_zeroed(10, 3)[PAGE_BYTES] = 7;

        assert_eq!(batch.page_numbers(), &[10, 11, 12]);
        assert_eq!(batch.page(1)[0], 7);
    }

    #[test]
    fn checksum_covers_page_numbers_and_contents() {
        let page = [5u8; PAGE_BYTES];
        let mut a = PageBatch::new();
        a.push(1, &page);
        let mut renumbered = PageBatch::new();
        renumbered.push(2, &page);
        let mut changed = a.clone();
        changed.page_mut(0)[PAGE_BYTES - 1] = 0;

        assert_ne!(a.checksum(), renumbered.checksum());
        assert_ne!(a.checksum(), changed.checksum());
    }

    #[test]
    fn zero_page_detection_sees_the_last_byte() {
        let mut page = [0u8; PAGE_BYTES];
        assert!(is_zero_page(&page));

        page[PAGE_BYTES - 1] = 1;

        assert!(!is_zero_page(&page));
    }

    #[test]
    fn from_parts_refuses_mismatched_lengths() {
        assert!(PageBatch::from_parts(vec![1, 2], vec![0; PAGE_BYTES]).is_none());
        assert!(PageBatch::from_parts(vec![1], vec![0; PAGE_BYTES]).is_some());
    }
}
