//! The page-level stage of a codec: each page of a batch becomes one record,
//! chosen per page.
//!
//! ```text
//! record:  tag u8 | varint zigzag(page_number - (previous page_number + 1)) | body
//!
//! tag 0  whole page      body empty; the page is the next 4 KiB of the
//!                        literal section
//! tag 1  zero page       body empty
//! tag 2  delta           varint n | n bytes of XOR-RLE against this page's
//!                        version in the store (n = 0: unchanged)
//! tag 3  similar         varint zigzag(base - page_number) | varint n | n bytes
//!                        of XOR-RLE against page `base` in the store
//! tag 4  duplicate       varint zigzag(base - page_number): equal to page
//!                        `base` in the store
//! tag 5  batch duplicate varint i: equal to the i-th page of this batch
//! ```
//!
//! `raw` writes only whole pages; `delta` tries the page's own last version;
//! `similarity` also looks for duplicates (full-page xxh3) and similar pages
//! (xxh3 fingerprints of sampled 64-byte blocks, after Difference Engine)
//! anywhere in the store. References resolve against the store as it was
//! before the batch; both sides update it with the batch's pages once the
//! batch is committed, in batch order.

use std::collections::HashMap;

use understudy_guest_abi::usize_from;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::batch::{PAGE_BYTES, Page, PageBatch, as_page, is_zero_page};
use crate::spec::TransformKind;
use crate::store::PageStore;
use crate::varint::{self, VarintError};
use crate::xor_rle::{self, XorRleError};

const TAG_WHOLE: u8 = 0;
const TAG_ZERO: u8 = 1;
const TAG_DELTA: u8 = 2;
const TAG_SIMILAR: u8 = 3;
const TAG_DUPLICATE: u8 = 4;
const TAG_BATCH_DUPLICATE: u8 = 5;

/// A delta or similar-page encoding longer than this is not worth it: the
/// page goes whole.
const DELTA_LIMIT: usize = PAGE_BYTES - PAGE_BYTES / 8;
/// A same-address delta this short is taken without searching further.
const GOOD_ENOUGH: usize = 64;
/// Offsets (in 64-byte blocks) of the blocks `similarity` samples.
const SAMPLE_BLOCKS: [usize; 8] = [5, 45, 21, 59, 13, 37, 29, 52];
const BLOCK: usize = 64;

/// Records that cannot be decoded.
#[derive(Debug, thiserror::Error)]
pub enum TransformError {
    /// A number in a record is malformed.
    #[error("page record {index} is malformed")]
    Varint {
        /// Which record.
        index: usize,
        /// What was wrong.
        #[source]
        source: VarintError,
    },
    /// The records end before the announced number of pages.
    #[error("the records end after {decoded} of {expected} pages")]
    Truncated {
        /// Pages decoded.
        decoded: usize,
        /// Pages announced.
        expected: usize,
    },
    /// Unknown record tag.
    #[error("page record {index} has unknown tag {tag}")]
    UnknownTag {
        /// Which record.
        index: usize,
        /// The tag.
        tag: u8,
    },
    /// A page number outside 64 bits.
    #[error("page record {index} names a page number out of range")]
    PageNumberOutOfRange {
        /// Which record.
        index: usize,
    },
    /// A reference to a page the decoder does not hold: the two sides are
    /// out of sync, or the frame is corrupted.
    #[error("page record {index} refers to page {base:#x}, which the decoder does not hold")]
    MissingReference {
        /// Which record.
        index: usize,
        /// The page referred to.
        base: u64,
    },
    /// A batch duplicate refers forward.
    #[error("page record {index} duplicates record {earlier}, which does not precede it")]
    BadBatchReference {
        /// Which record.
        index: usize,
        /// The record referred to.
        earlier: u64,
    },
    /// A delta body does not apply.
    #[error("page record {index} holds a bad delta")]
    Delta {
        /// Which record.
        index: usize,
        /// What was wrong.
        #[source]
        source: XorRleError,
    },
    /// Whole pages left over, or missing.
    #[error("the frame carries {carried} bytes of whole pages where its records use {used}")]
    LiteralMismatch {
        /// Bytes in the literal section.
        carried: usize,
        /// Bytes the records consumed.
        used: usize,
    },
    /// Bytes after the last record.
    #[error("{0} bytes follow the last page record")]
    TrailingBytes(usize),
}

/// How the pages of one batch were encoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransformStats {
    /// Pages sent whole.
    pub whole: usize,
    /// Zero pages.
    pub zero: usize,
    /// Pages unchanged since the version the receiver holds.
    pub unchanged: usize,
    /// Pages sent as a delta against their own last version.
    pub delta: usize,
    /// Pages sent as a delta against another page.
    pub similar: usize,
    /// Pages equal to another page (in the store or earlier in the batch).
    pub duplicate: usize,
}

/// Fingerprint tables of `similarity`: direct-mapped, one page number per
/// slot (plus one, zero meaning empty). A slot may be stale; every candidate
/// is checked against the store's real contents before use.
#[derive(Debug)]
struct SimilarityIndex {
    samples: usize,
    blocks: Vec<u64>,
    blocks_mask: u64,
    pages: Vec<u64>,
    pages_mask: u64,
}

impl SimilarityIndex {
    fn new(cache_pages: usize, samples: usize) -> Self {
        let blocks_len = (cache_pages * samples * 2).next_power_of_two().max(1024);
        let pages_len = (cache_pages * 2).next_power_of_two().max(1024);
        Self {
            samples,
            blocks: vec![0; blocks_len],
            blocks_mask: blocks_len as u64 - 1,
            pages: vec![0; pages_len],
            pages_mask: pages_len as u64 - 1,
        }
    }

    fn memory_bytes(&self) -> usize {
        (self.blocks.len() + self.pages.len()) * 8
    }

    /// Fingerprints of the sampled blocks; `None` for blocks that are all
    /// zero (they are everywhere and would only find poor candidates).
    fn fingerprints(&self, page: &Page) -> [Option<u64>; 8] {
        let mut fingerprints = [None; 8];
        for (seed, block) in SAMPLE_BLOCKS[..self.samples].iter().enumerate() {
            let bytes = &page[block * BLOCK..(block + 1) * BLOCK];
            if bytes.iter().any(|b| *b != 0) {
                fingerprints[seed] = Some(xxh3_64_with_seed(bytes, seed as u64));
            }
        }
        fingerprints
    }

    fn insert(&mut self, page_number: u64, page: &Page, page_hash: u64) {
        self.pages[usize_from(page_hash & self.pages_mask)] = page_number.wrapping_add(1);
        for fingerprint in self.fingerprints(page).into_iter().flatten() {
            self.blocks[usize_from(fingerprint & self.blocks_mask)] = page_number.wrapping_add(1);
        }
    }

    fn duplicate_candidate(&self, page_hash: u64) -> Option<u64> {
        let slot = self.pages[usize_from(page_hash & self.pages_mask)];
        (slot != 0).then(|| slot.wrapping_sub(1))
    }

    fn similar_candidate(&self, fingerprint: u64) -> Option<u64> {
        let slot = self.blocks[usize_from(fingerprint & self.blocks_mask)];
        (slot != 0).then(|| slot.wrapping_sub(1))
    }
}

/// The encoder's side of the page stage.
#[derive(Debug)]
pub struct TransformEncoder {
    kind: TransformKind,
    store: PageStore,
    index: Option<SimilarityIndex>,
    /// Whether `similarity` searches beyond the page's own version (the
    /// `auto` policy turns the search off when it does not pay).
    pub search: bool,
    scratch: Vec<u8>,
    best: Vec<u8>,
    batch_hashes: HashMap<u64, u32>,
    /// Whether the batch being encoded is committed page by page.
    immediate: bool,
}

impl TransformEncoder {
    /// A page stage of `kind`, keeping up to `cache_pages` page versions and
    /// sampling `samples` blocks per page (similarity).
    pub fn new(kind: TransformKind, cache_pages: usize, samples: usize) -> Self {
        let cache_pages = if kind == TransformKind::Raw {
            0
        } else {
            cache_pages
        };
        Self {
            kind,
            store: PageStore::new(cache_pages),
            index: (kind == TransformKind::Similarity)
                .then(|| SimilarityIndex::new(cache_pages, samples.clamp(1, 8))),
            search: true,
            scratch: Vec::with_capacity(PAGE_BYTES),
            best: Vec::with_capacity(PAGE_BYTES),
            batch_hashes: HashMap::new(),
            immediate: false,
        }
    }

    /// The kind of page stage.
    pub fn kind(&self) -> TransformKind {
        self.kind
    }

    /// Pages of version store (what the decoder must keep too).
    pub fn store_capacity(&self) -> usize {
        self.store.capacity()
    }

    /// Bytes held: page versions and fingerprint tables.
    pub fn memory_bytes(&self) -> usize {
        self.store.memory_bytes() + self.index.as_ref().map_or(0, SimilarityIndex::memory_bytes)
    }

    /// Writes one record per page of `batch` to `records`, and the pages sent
    /// whole to `literals` (for `raw` the literal section is the batch's own
    /// contents, and nothing is copied), and commits the batch to the store.
    ///
    /// When the page numbers are strictly increasing (dirty sets and traces
    /// are), each page is committed right after it is encoded, while it is
    /// still in cache, and references to pages already committed in this
    /// batch are not used: every reference the decoder sees is still to the
    /// version it held before the batch. Otherwise the batch is committed at
    /// the end.
    pub fn encode(
        &mut self,
        batch: &PageBatch,
        records: &mut Vec<u8>,
        literals: &mut Vec<u8>,
    ) -> TransformStats {
        let mut stats = TransformStats::default();
        let mut previous: Option<u64> = None;
        self.batch_hashes.clear();
        self.immediate = batch
            .page_numbers()
            .windows(2)
            .all(|pair| pair[0] < pair[1]);
        for (index, (page_number, page)) in batch.iter().enumerate() {
            let tag_at = records.len();
            records.push(TAG_WHOLE);
            let expected = previous.map_or(0, |p| p.wrapping_add(1));
            varint::write(records, varint::zigzag_step(expected, page_number));
            previous = Some(page_number);
            if self.kind == TransformKind::Raw {
                stats.whole += 1;
                continue;
            }
            let tag = self.encode_page(batch, index, page_number, page, records, &mut stats);
            records[tag_at] = tag;
            if tag == TAG_WHOLE {
                literals.extend_from_slice(page);
                stats.whole += 1;
            }
            if self.immediate {
                self.commit_page(page_number, page, tag == TAG_ZERO);
            }
        }
        if !self.immediate {
            for (page_number, page) in batch.iter() {
                self.commit_page(page_number, page, is_zero_page(page));
            }
        }
        stats
    }

    /// Chooses and writes the body of one page's record; returns its tag.
    fn encode_page(
        &mut self,
        batch: &PageBatch,
        index: usize,
        page_number: u64,
        page: &Page,
        records: &mut Vec<u8>,
        stats: &mut TransformStats,
    ) -> u8 {
        if is_zero_page(page) {
            stats.zero += 1;
            return TAG_ZERO;
        }
        // Same address: the page's own last version.
        self.best.clear();
        let mut best_tag = TAG_WHOLE;
        let mut best_base = page_number;
        if let Some(old) = self.store.get(page_number)
            && xor_rle::encode(page, old, &mut self.best, DELTA_LIMIT)
        {
            best_tag = TAG_DELTA;
            if self.best.len() <= GOOD_ENOUGH {
                return self.write_delta(page_number, best_tag, best_base, records, stats);
            }
        }
        if let (Some(index_tables), true) = (&self.index, self.search) {
            let page_hash = xxh3_64(page);
            // Duplicates: earlier in this batch, then anywhere in the store.
            if let Some(&earlier) = self.batch_hashes.get(&page_hash)
                && batch.page(earlier as usize) == page
            {
                varint::write(records, u64::from(earlier));
                stats.duplicate += 1;
                return TAG_BATCH_DUPLICATE;
            }
            self.batch_hashes.insert(
                page_hash,
                u32::try_from(index).expect("a frame holds at most 2^18 pages"),
            );
            if let Some(base) = index_tables.duplicate_candidate(page_hash)
                && self.store.get(base) == Some(page)
                && !self.committed_in_batch(batch, index, base)
            {
                varint::write(records, varint::zigzag_step(page_number, base));
                stats.duplicate += 1;
                return TAG_DUPLICATE;
            }
            // Similar pages: candidates named by sampled-block fingerprints.
            let mut tried = [u64::MAX; 8];
            for (slot, fingerprint) in index_tables.fingerprints(page).into_iter().enumerate() {
                let Some(candidate) = fingerprint.and_then(|f| index_tables.similar_candidate(f))
                else {
                    continue;
                };
                if candidate == page_number
                    || tried[..slot].contains(&candidate)
                    || self.committed_in_batch(batch, index, candidate)
                {
                    continue;
                }
                tried[slot] = candidate;
                let Some(reference) = self.store.get(candidate) else {
                    continue;
                };
                let limit = if best_tag == TAG_WHOLE {
                    DELTA_LIMIT
                } else {
                    self.best.len().saturating_sub(1)
                };
                self.scratch.clear();
                if xor_rle::encode(page, reference, &mut self.scratch, limit) {
                    std::mem::swap(&mut self.scratch, &mut self.best);
                    best_tag = TAG_SIMILAR;
                    best_base = candidate;
                }
            }
        }
        if best_tag == TAG_WHOLE {
            return TAG_WHOLE;
        }
        self.write_delta(page_number, best_tag, best_base, records, stats)
    }

    fn write_delta(
        &self,
        page_number: u64,
        tag: u8,
        base: u64,
        records: &mut Vec<u8>,
        stats: &mut TransformStats,
    ) -> u8 {
        if tag == TAG_SIMILAR {
            varint::write(records, varint::zigzag_step(page_number, base));
            stats.similar += 1;
        } else if self.best.is_empty() {
            stats.unchanged += 1;
        } else {
            stats.delta += 1;
        }
        varint::write(records, self.best.len() as u64);
        records.extend_from_slice(&self.best);
        tag
    }

    fn commit_page(&mut self, page_number: u64, page: &Page, zero: bool) {
        self.store.put(page_number, page);
        if let (Some(index), false) = (&mut self.index, zero) {
            index.insert(page_number, page, xxh3_64(page));
        }
    }

    /// Whether page `candidate` was already committed earlier in this batch
    /// (so the decoder's version of it is older than the encoder's).
    fn committed_in_batch(&self, batch: &PageBatch, index: usize, candidate: u64) -> bool {
        self.immediate
            && batch.page_numbers()[..index]
                .binary_search(&candidate)
                .is_ok()
    }
}

/// The decoder's side of the page stage: the store of page versions.
#[derive(Debug, Default)]
pub struct TransformDecoder {
    store: PageStore,
}

impl TransformDecoder {
    /// A decoder keeping up to `cache_pages` page versions (must equal the
    /// encoder's).
    pub fn new(cache_pages: usize) -> Self {
        Self {
            store: PageStore::new(cache_pages),
        }
    }

    /// Pages of version store.
    pub fn store_capacity(&self) -> usize {
        self.store.capacity()
    }

    /// Bytes held.
    pub fn memory_bytes(&self) -> usize {
        self.store.memory_bytes()
    }

    /// Decodes `page_count` records into `out` (cleared first), taking whole
    /// pages from `literals`. Changes nothing in the decoder: call
    /// [`commit`](Self::commit) once the frame is verified.
    pub fn decode(
        &self,
        records: &[u8],
        literals: &[u8],
        page_count: usize,
        out: &mut PageBatch,
    ) -> Result<(), TransformError> {
        out.clear();
        let mut position = 0usize;
        let mut literal_at = 0usize;
        let mut previous: Option<u64> = None;
        for index in 0..page_count {
            let number = |position: &mut usize| {
                varint::read(records, position)
                    .map_err(|source| TransformError::Varint { index, source })
            };
            let &tag = records.get(position).ok_or(TransformError::Truncated {
                decoded: index,
                expected: page_count,
            })?;
            position += 1;
            let expected = previous.map_or(0, |p| p.wrapping_add(1));
            let page_number = varint::apply_step(expected, number(&mut position)?);
            previous = Some(page_number);
            let stored = |base: u64| {
                self.store
                    .get(base)
                    .ok_or(TransformError::MissingReference { index, base })
            };
            match tag {
                TAG_WHOLE => {
                    let page = literals.get(literal_at..literal_at + PAGE_BYTES).ok_or(
                        TransformError::LiteralMismatch {
                            carried: literals.len(),
                            used: literal_at + PAGE_BYTES,
                        },
                    )?;
                    out.push(page_number, as_page(page));
                    literal_at += PAGE_BYTES;
                }
                TAG_ZERO => {
                    out.push_zeroed(page_number);
                }
                TAG_DELTA | TAG_SIMILAR => {
                    let base = if tag == TAG_SIMILAR {
                        varint::apply_step(page_number, number(&mut position)?)
                    } else {
                        page_number
                    };
                    let reference = stored(base)?;
                    let length = number(&mut position)?;
                    let body = usize::try_from(length)
                        .ok()
                        .and_then(|length| records.get(position..position.checked_add(length)?))
                        .ok_or(TransformError::Truncated {
                            decoded: index,
                            expected: page_count,
                        })?;
                    position += body.len();
                    out.push(page_number, reference);
                    let last = out.len() - 1;
                    xor_rle::apply(body, out.page_mut(last))
                        .map_err(|source| TransformError::Delta { index, source })?;
                }
                TAG_DUPLICATE => {
                    let base = varint::apply_step(page_number, number(&mut position)?);
                    out.push(page_number, stored(base)?);
                }
                TAG_BATCH_DUPLICATE => {
                    let earlier = number(&mut position)?;
                    if earlier >= index as u64 {
                        return Err(TransformError::BadBatchReference { index, earlier });
                    }
                    let page = *out.page(usize_from(earlier));
                    out.push(page_number, &page);
                }
                tag => return Err(TransformError::UnknownTag { index, tag }),
            }
        }
        if position != records.len() {
            return Err(TransformError::TrailingBytes(records.len() - position));
        }
        if literal_at != literals.len() {
            return Err(TransformError::LiteralMismatch {
                carried: literals.len(),
                used: literal_at,
            });
        }
        Ok(())
    }

    /// Records a verified batch's pages as the versions the receiver holds.
    pub fn commit(&mut self, batch: &PageBatch) {
        for (page_number, page) in batch.iter() {
            self.store.put(page_number, page);
        }
    }
}

#[cfg(test)]
mod tests;
