//! XOR run-length encoding of one page against a reference page: the core of
//! the `delta` and `similarity` codecs (the family of Remus and QEMU's
//! XBZRLE).
//!
//! The page is XORed with the reference; the result, mostly zero when the
//! page changed little, is written as a sequence of
//!
//! ```text
//! varint zero_run | varint literal_length | literal_length XORed bytes
//! ```
//!
//! pairs, and a zero tail is implicit. The encoder scans eight bytes at a
//! time and trims literals to byte precision at both ends; a run of zero
//! words ends a literal. Decoding XORs the literals into a copy of the
//! reference, checking every run against the page's end.

use crate::batch::{PAGE_BYTES, Page};
use crate::varint::{self, VarintError};
use understudy_guest_abi::usize_from;

const WORDS: usize = PAGE_BYTES / 8;

/// An encoded page that cannot be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum XorRleError {
    /// A run length could not be read.
    #[error("a run length in a delta-encoded page is malformed")]
    Varint(#[from] VarintError),
    /// A run goes past the end of the page.
    #[error("a delta-encoded run ends at byte {end}, past the end of the page")]
    RunPastPageEnd {
        /// Where the run would end.
        end: u64,
    },
    /// A literal of length zero (never written by the encoder).
    #[error("a delta-encoded page holds an empty literal")]
    EmptyLiteral,
    /// Literal bytes missing.
    #[error("a delta-encoded page ends inside a literal")]
    Truncated,
}

/// Whether the 64 bytes at `offset` differ: eight XORed words ORed
/// together, which compiles to a few vector instructions (a `memcmp` call
/// per block cost more than the comparison).
#[inline]
fn block_differs(page: &Page, reference: &Page, offset: usize) -> bool {
    let new = &page[offset..offset + 64];
    let old = &reference[offset..offset + 64];
    new.chunks_exact(8)
        .zip(old.chunks_exact(8))
        .fold(0u64, |acc, (a, b)| {
            acc | (u64::from_le_bytes(a.try_into().expect("8 bytes"))
                ^ u64::from_le_bytes(b.try_into().expect("8 bytes")))
        })
        != 0
}

#[inline]
fn word(page: &Page, index: usize) -> u64 {
    let start = index * 8;
    u64::from_le_bytes(page[start..start + 8].try_into().expect("8 bytes"))
}

/// Appends the XOR-RLE encoding of `page` against `reference` to `out`.
///
/// Gives up and returns `false` (with `out` restored) as soon as the encoding
/// would exceed `limit` bytes, so a caller can fall back to something else
/// without paying for a full encoding. Identical pages encode to zero bytes.
pub fn encode(page: &Page, reference: &Page, out: &mut Vec<u8>, limit: usize) -> bool {
    let start_len = out.len();
    let mut written_to = 0usize; // Bytes of the page already described.
    let mut index = 0usize;
    while index < WORDS {
        // Skip equal 64-byte blocks with one (vectorised) comparison: most of
        // a dirty page is usually unchanged.
        if index.is_multiple_of(8) && !block_differs(page, reference, index * 8) {
            index += 8;
            continue;
        }
        let difference = word(page, index) ^ word(reference, index);
        if difference == 0 {
            index += 1;
            continue;
        }
        let literal_start = index * 8 + (difference.trailing_zeros() / 8) as usize;
        let mut end_index = index + 1;
        let mut last = difference;
        while end_index < WORDS {
            let next = word(page, end_index) ^ word(reference, end_index);
            if next == 0 {
                break;
            }
            last = next;
            end_index += 1;
        }
        let literal_end = end_index * 8 - (last.leading_zeros() / 8) as usize;
        varint::write(out, (literal_start - written_to) as u64);
        varint::write(out, (literal_end - literal_start) as u64);
        if out.len() - start_len + (literal_end - literal_start) > limit {
            out.truncate(start_len);
            return false;
        }
        out.extend(
            page[literal_start..literal_end]
                .iter()
                .zip(&reference[literal_start..literal_end])
                .map(|(new, old)| new ^ old),
        );
        written_to = literal_end;
        index = end_index;
    }
    true
}

/// XORs an encoding made by [`encode`] into `target`, which must hold the
/// reference page on entry and holds the encoded page on success.
///
/// On error `target` may be partly changed: callers decode into scratch
/// space.
pub fn apply(encoded: &[u8], target: &mut Page) -> Result<(), XorRleError> {
    let mut position = 0usize;
    let mut at = 0u64;
    while position < encoded.len() {
        let zero_run = varint::read(encoded, &mut position)?;
        let length = varint::read(encoded, &mut position)?;
        if length == 0 {
            return Err(XorRleError::EmptyLiteral);
        }
        let start = at.saturating_add(zero_run);
        let end = start.saturating_add(length);
        if end > PAGE_BYTES as u64 {
            return Err(XorRleError::RunPastPageEnd { end });
        }
        let (start, length) = (usize_from(start), usize_from(length));
        let literal = encoded
            .get(position..position + length)
            .ok_or(XorRleError::Truncated)?;
        for (byte, xor) in target[start..start + length].iter_mut().zip(literal) {
            *byte ^= xor;
        }
        position += length;
        at = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn decode(encoded: &[u8], reference: &Page) -> Page {
        let mut page = *reference;
        apply(encoded, &mut page).expect("valid encoding");
        page
    }

    #[test]
    fn identical_pages_encode_to_nothing() {
        let page = [7u8; PAGE_BYTES];
        let mut out = Vec::new();

        assert!(encode(&page, &page, &mut out, PAGE_BYTES));

        assert!(out.is_empty());
    }

    #[test]
    fn one_changed_byte_costs_three_bytes() {
        let reference = [7u8; PAGE_BYTES];
        let mut page = reference;
        page[1000] = 8;
        let mut out = Vec::new();

        assert!(encode(&page, &reference, &mut out, PAGE_BYTES));

        assert_eq!(out.len(), 2 + 1 + 1); // varint(1000) is two bytes.
        assert_eq!(decode(&out, &reference), page);
    }

    #[test]
    fn change_in_last_byte_round_trips() {
        let reference = [0u8; PAGE_BYTES];
        let mut page = reference;
        page[PAGE_BYTES - 1] = 0xff;
        let mut out = Vec::new();

        assert!(encode(&page, &reference, &mut out, PAGE_BYTES));

        assert_eq!(decode(&out, &reference), page);
    }

    #[test]
    fn encoding_over_the_limit_gives_up_and_leaves_out_unchanged() {
        let reference = [0u8; PAGE_BYTES];
        let page = [1u8; PAGE_BYTES];
        let mut out = vec![9];

        assert!(!encode(&page, &reference, &mut out, 100));

        assert_eq!(out, vec![9]);
    }

    #[test]
    fn run_past_the_page_end_is_an_error() {
        let mut encoded = Vec::new();
        varint::write(&mut encoded, crate::PAGE_SIZE - 1);
        varint::write(&mut encoded, 2);
        encoded.extend_from_slice(&[1, 1]);
        let mut page = [0u8; PAGE_BYTES];

        assert_eq!(
            apply(&encoded, &mut page),
            Err(XorRleError::RunPastPageEnd { end: 4097 })
        );
    }

    #[test]
    fn huge_zero_run_does_not_overflow() {
        let mut encoded = Vec::new();
        varint::write(&mut encoded, u64::MAX);
        varint::write(&mut encoded, u64::MAX);
        let mut page = [0u8; PAGE_BYTES];

        assert!(matches!(
            apply(&encoded, &mut page),
            Err(XorRleError::RunPastPageEnd { .. })
        ));
    }

    #[test]
    fn missing_literal_bytes_are_an_error() {
        let mut encoded = Vec::new();
        varint::write(&mut encoded, 0);
        varint::write(&mut encoded, 10);
        encoded.extend_from_slice(&[1, 2, 3]);
        let mut page = [0u8; PAGE_BYTES];

        assert_eq!(apply(&encoded, &mut page), Err(XorRleError::Truncated));
    }

    fn page_strategy() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u8>(), PAGE_BYTES)
    }

    /// A reference and a page that differs from it in a few random spans,
    /// the shape real dirty pages have.
    fn sparse_change() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
        (
            page_strategy(),
            prop::collection::vec((0..PAGE_BYTES, 1usize..64, any::<u8>()), 0..20),
        )
            .prop_map(|(reference, spans)| {
                let mut page = reference.clone();
                for (start, length, value) in spans {
                    let end = (start + length).min(PAGE_BYTES);
                    page[start..end].fill(value);
                }
                (reference, page)
            })
    }

    proptest! {
        #[test]
        fn random_pages_round_trip(reference in page_strategy(), page in page_strategy()) {
            let reference: Page = reference.try_into().expect("page");
            let page: Page = page.try_into().expect("page");
            let mut out = Vec::new();
            prop_assert!(encode(&page, &reference, &mut out, usize::MAX));
            prop_assert_eq!(decode(&out, &reference), page);
        }

        #[test]
        fn sparse_changes_round_trip((reference, page) in sparse_change()) {
            let reference: Page = reference.try_into().expect("page");
            let page: Page = page.try_into().expect("page");
            let mut out = Vec::new();
            prop_assert!(encode(&page, &reference, &mut out, usize::MAX));
            prop_assert_eq!(decode(&out, &reference), page);
        }

        #[test]
        fn arbitrary_input_never_panics(encoded in prop::collection::vec(any::<u8>(), 0..256)) {
            let mut page = [0u8; PAGE_BYTES];
            let _ = apply(&encoded, &mut page);
        }
    }
}
