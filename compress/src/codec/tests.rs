//! Tests of the codecs: round trips of every codec, refused frames, property tests.

use super::*;
use crate::trace::synthetic::{SyntheticTrace, generate};

fn specs() -> Vec<CodecSpec> {
    [
        "raw",
        "gzip:level=1",
        "zstd:level=1",
        "zstd:level=3,dict=16K",
        "delta:cache=1M",
        "delta:cache=64K,miss=zstd-1",
        "similarity:cache=1M+zstd:level=1",
        "similarity:cache=64K,samples=2",
        "auto:cache=1M,mbit=100",
    ]
    .iter()
    .map(|text| text.parse().expect("valid spec"))
    .collect()
}

fn batches() -> Vec<PageBatch> {
    generate(&SyntheticTrace {
        pages: 200,
        epochs: 6,
        seed: 7,
    })
}

fn frames(spec: &CodecSpec, batches: &[PageBatch]) -> Vec<Vec<u8>> {
    let mut encoder = Encoder::new(spec);
    batches
        .iter()
        .map(|batch| {
            let mut frame = Vec::new();
            encoder.encode(batch, &mut frame).expect("encode");
            frame
        })
        .collect()
}

#[test]
fn raw_round_trips() {
    assert!(round_trip(&specs()[0], &batches()).is_ok());
}

#[test]
fn gzip_round_trips() {
    assert!(round_trip(&specs()[1], &batches()).is_ok());
}

#[test]
fn zstd_round_trips() {
    assert!(round_trip(&specs()[2], &batches()).is_ok());
}

#[test]
fn zstd_with_dictionary_round_trips() {
    assert!(round_trip(&specs()[3], &batches()).is_ok());
}

#[test]
fn delta_round_trips() {
    assert!(round_trip(&specs()[4], &batches()).is_ok());
}

#[test]
fn delta_with_small_cache_and_miss_compressor_round_trips() {
    assert!(round_trip(&specs()[5], &batches()).is_ok());
}

#[test]
fn similarity_composed_with_zstd_round_trips() {
    assert!(round_trip(&specs()[6], &batches()).is_ok());
}

#[test]
fn similarity_with_small_cache_round_trips() {
    assert!(round_trip(&specs()[7], &batches()).is_ok());
}

#[test]
fn auto_round_trips() {
    assert!(round_trip(&specs()[8], &batches()).is_ok());
}

#[test]
fn delta_is_smaller_than_raw_on_later_epochs() {
    let batches = batches();
    let raw = round_trip(&specs()[0], &batches).expect("raw");
    let delta = round_trip(&specs()[4], &batches).expect("delta");

    assert!(delta[3] * 3 < raw[3], "delta {} raw {}", delta[3], raw[3]);
}

#[test]
fn reordered_frame_is_refused_and_changes_nothing() {
    let batches = batches();
    let frames = frames(&specs()[4], &batches);
    let mut decoder = Decoder::new();
    let mut out = PageBatch::new();
    decoder.decode(&frames[0], &mut out).expect("first frame");

    let skipped = decoder.decode(&frames[2], &mut out);
    let in_order = decoder.decode(&frames[1], &mut out);

    assert!(matches!(
        skipped,
        Err(CodecError::OutOfOrder {
            expected: 1,
            actual: 2
        })
    ));
    assert!(in_order.is_ok());
    assert_eq!(out, batches[1]);
}

#[test]
fn truncated_frame_is_refused() {
    let frames = frames(&specs()[2], &batches());
    let frame = &frames[0][..frames[0].len() - 1];

    let result = Decoder::new().decode(frame, &mut PageBatch::new());

    assert!(matches!(result, Err(CodecError::Truncated { .. })));
}

#[test]
fn corrupted_header_is_refused() {
    let mut frames = frames(&specs()[2], &batches());
    frames[0][17] ^= 1;

    let result = Decoder::new().decode(&frames[0], &mut PageBatch::new());

    assert!(matches!(result, Err(CodecError::HeaderChecksum)));
}

#[test]
fn corrupted_payload_is_refused_and_a_good_copy_then_applies() {
    let batches = batches();
    let mut frames = frames(&specs()[4], &batches);
    let good = frames[0].clone();
    let last = frames[0].len() - 1;
    frames[0][last] ^= 0x40;
    let mut decoder = Decoder::new();
    let mut out = PageBatch::new();

    let corrupted = decoder.decode(&frames[0], &mut out);
    let retried = decoder.decode(&good, &mut out);

    assert!(matches!(
        corrupted,
        Err(CodecError::ContentChecksum { sequence: 0 })
    ));
    assert!(retried.is_ok());
    assert_eq!(out, batches[0]);
}

#[test]
fn decoder_out_of_sync_is_detected_by_the_checksum() {
    let batches = batches();
    let frames = frames(&specs()[4], &batches);
    let mut decoder = Decoder::new();
    let mut out = PageBatch::new();
    decoder.decode(&frames[0], &mut out).expect("frame 0");
    // Give the decoder a different history for frame 1: a batch with the
    // same page numbers but other contents, encoded by another encoder.
    let mut other = batches[1].clone();
    for index in 0..other.len() {
        other.page_mut(index)[0] ^= 0x5a;
    }
    let mut foreign = Encoder::new(&specs()[4]);
    let mut scratch = Vec::new();
    foreign.encode(&batches[0], &mut scratch).expect("encode 0");
    scratch.clear();
    foreign.encode(&other, &mut scratch).expect("encode 1");
    decoder
        .decode(&scratch, &mut out)
        .expect("foreign frame 1 is valid on its own");

    let result = decoder.decode(&frames[2], &mut out);

    assert!(matches!(
        result,
        Err(CodecError::ContentChecksum { sequence: 2 }) | Err(CodecError::Records(_))
    ));
}

/// The frame header with `store_pages` rewritten (and its checksum fixed).
fn with_store_pages(frame: &[u8], store_pages: u32) -> Vec<u8> {
    let mut frame = frame.to_vec();
    frame[32..36].copy_from_slice(&store_pages.to_le_bytes());
    let checksum = xxh3_64(&frame[..48]);
    frame[48..56].copy_from_slice(&checksum.to_le_bytes());
    frame
}

#[test]
fn a_fresh_decoder_refuses_a_huge_version_store_before_allocating_it() {
    let spec: CodecSpec = "raw".parse().expect("spec");
    let frame = frames(&spec, &batches()[..1]).remove(0);
    let hostile = with_store_pages(&frame, u32::MAX);

    let result = Decoder::new().decode(&hostile, &mut PageBatch::new());

    assert!(matches!(
        result,
        Err(CodecError::StoreTooLarge {
            frame: 0xFFFF_FFFF,
            ..
        })
    ));
}

#[test]
fn a_bounded_decoder_refuses_a_store_other_than_agreed() {
    let spec: CodecSpec = "delta:cache=1M".parse().expect("spec");
    let frame = frames(&spec, &batches()[..1]).remove(0);

    let result = Decoder::bounded(16, 1 << 20).decode(&frame, &mut PageBatch::new());

    assert!(matches!(
        result,
        Err(CodecError::StoreMismatch {
            frame: 256,
            stream: 16
        })
    ));
}

#[test]
fn a_bounded_decoder_refuses_pages_beyond_its_memory_and_changes_nothing() {
    let spec: CodecSpec = "raw".parse().expect("spec");
    let frame = frames(&spec, &batches()[..1]).remove(0);
    let mut decoder = Decoder::bounded(0, 10);

    let result = decoder.decode(&frame, &mut PageBatch::new());

    assert!(matches!(
        result,
        Err(CodecError::PageOutOfRange { limit: 10, .. })
    ));
    assert_eq!(decoder.next_sequence(), 0);
}

#[test]
fn frame_from_a_stream_with_another_store_size_is_refused() {
    let batches = batches();
    let small = frames(&specs()[5], &batches);
    let large = frames(&specs()[4], &batches);
    let mut decoder = Decoder::new();
    decoder
        .decode(&large[0], &mut PageBatch::new())
        .expect("frame 0");

    let result = decoder.decode(&small[1], &mut PageBatch::new());

    assert!(matches!(result, Err(CodecError::StoreMismatch { .. })));
}

mod properties {
    use proptest::prelude::*;

    use super::super::*;

    /// How a page of the next epoch is made from the memory so far.
    #[derive(Clone, Debug)]
    enum Change {
        Random(u64),
        Zero,
        Fill(u8),
        /// XOR bytes at these offsets: sparse edits, first and last byte.
        Flip(Vec<u16>),
        /// Change every other byte: the worst case for run lengths.
        Alternate,
        /// Copy another page of memory, then flip one byte.
        CopyOf(usize, u16),
    }

    /// The offset of a page's last byte.
    const LAST_BYTE: u16 = {
        assert!(PAGE_BYTES - 1 <= u16::MAX as usize);
        #[allow(clippy::cast_possible_truncation)] // Checked just above.
        let last = (PAGE_BYTES - 1) as u16;
        last
    };

    fn change() -> impl Strategy<Value = Change> {
        prop_oneof![
            any::<u64>().prop_map(Change::Random),
            Just(Change::Zero),
            any::<u8>().prop_map(Change::Fill),
            prop::collection::vec(
                prop_oneof![Just(0u16), Just(LAST_BYTE), 0u16..=LAST_BYTE],
                1..12
            )
            .prop_map(Change::Flip),
            Just(Change::Alternate),
            (0usize..24, 0u16..=LAST_BYTE).prop_map(|(source, at)| Change::CopyOf(source, at)),
        ]
    }

    /// Page numbers: a dense low range and a few at the top of the
    /// address space (large jumps between neighbours).
    fn page_number(slot: usize) -> u64 {
        if slot < 20 {
            slot as u64
        } else {
            u64::MAX - (24 - slot) as u64
        }
    }

    fn epochs() -> impl Strategy<Value = Vec<Vec<(usize, Change)>>> {
        prop::collection::vec(prop::collection::vec((0usize..24, change()), 0..24), 1..5)
    }

    fn build(epochs: &[Vec<(usize, Change)>]) -> Vec<PageBatch> {
        let mut memory = vec![[0u8; PAGE_BYTES]; 24];
        epochs
            .iter()
            .map(|changes| {
                let mut touched = std::collections::BTreeMap::new();
                for (slot, change) in changes {
                    let page = &mut memory[*slot];
                    match change {
                        Change::Random(seed) => {
                            let mut state = *seed;
                            for byte in page.iter_mut() {
                                state = state
                                    .wrapping_mul(6364136223846793005)
                                    .wrapping_add(1442695040888963407);
                                *byte = (state >> 56) as u8;
                            }
                        }
                        Change::Zero => page.fill(0),
                        Change::Fill(value) => page.fill(*value),
                        Change::Flip(offsets) => {
                            for offset in offsets {
                                page[*offset as usize] ^= 0xa5;
                            }
                        }
                        Change::Alternate => {
                            for byte in page.iter_mut().step_by(2) {
                                *byte = byte.wrapping_add(1);
                            }
                        }
                        Change::CopyOf(source, at) => {
                            let copy = memory[*source];
                            memory[*slot] = copy;
                            memory[*slot][*at as usize] ^= 1;
                        }
                    }
                    touched.insert(page_number(*slot), memory[*slot]);
                }
                let mut batch = PageBatch::new();
                for (number, page) in touched {
                    batch.push(number, &page);
                }
                batch
            })
            .collect()
    }

    fn check(spec: &str, epochs: &[Vec<(usize, Change)>]) -> Result<(), TestCaseError> {
        let spec: CodecSpec = spec.parse().expect("valid spec");
        let result = round_trip(&spec, &build(epochs));
        prop_assert!(result.is_ok(), "{spec}: {:?}", result.err());
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn raw_round_trips(epochs in epochs()) { check("raw", &epochs)?; }

        #[test]
        fn gzip_round_trips(epochs in epochs()) { check("gzip:level=1", &epochs)?; }

        #[test]
        fn zstd_round_trips(epochs in epochs()) { check("zstd:level=1", &epochs)?; }

        #[test]
        fn delta_round_trips(epochs in epochs()) { check("delta:cache=1M", &epochs)?; }

        #[test]
        fn delta_with_evictions_round_trips(epochs in epochs()) {
            check("delta:cache=16K,miss=gzip-1", &epochs)?;
        }

        #[test]
        fn similarity_round_trips(epochs in epochs()) { check("similarity:cache=1M", &epochs)?; }

        #[test]
        fn similarity_with_evictions_round_trips(epochs in epochs()) {
            check("similarity:cache=16K,samples=8+zstd:level=1", &epochs)?;
        }

        #[test]
        fn auto_round_trips(epochs in epochs()) { check("auto:cache=32K,mbit=10", &epochs)?; }

        #[test]
        fn mutated_frames_never_panic_or_apply(
            epochs in epochs(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
        ) {
            let spec: CodecSpec = "similarity:cache=1M+zstd:level=1".parse().expect("spec");
            let batches = build(&epochs);
            let mut encoder = Encoder::new(&spec);
            let mut decoder = Decoder::new();
            let mut out = PageBatch::new();
            for (index, batch) in batches.iter().enumerate() {
                let mut frame = Vec::new();
                encoder.encode(batch, &mut frame).expect("encode");
                if index + 1 == batches.len() {
                    let mut mutated = frame.clone();
                    for (at, xor) in &flips {
                        let at = at.index(mutated.len());
                        mutated[at] ^= xor;
                    }
                    let result = decoder.decode(&mutated, &mut out);
                    // A mutation that decodes must decode to the truth
                    // (it hit bytes the decoder never reads): the content
                    // checksum guarantees it.
                    if result.is_ok() {
                        prop_assert_eq!(&out, batch);
                    } else {
                        prop_assert_eq!(decoder.next_sequence(), index as u64);
                    }
                } else {
                    decoder.decode(&frame, &mut out).expect("decode");
                }
            }
        }
    }
}

/// `pages` pages of pseudo-random bytes (incompressible), numbered from `first`.
fn random_batch(first: u64, pages: u64, seed: u64) -> PageBatch {
    let mut state = seed | 1;
    let mut batch = PageBatch::new();
    for page_number in first..first + pages {
        let page = batch.push_zeroed(page_number);
        for chunk in page.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
    }
    batch
}

/// `pages` pages of one repeated byte (compressible), numbered from `first`.
fn plain_batch(first: u64, pages: u64) -> PageBatch {
    let mut batch = PageBatch::new();
    for page_number in first..first + pages {
        batch.push_zeroed(page_number).fill(0x5a);
    }
    batch
}

/// The literal section's compressor byte of each frame.
fn literal_compressors(frames: &[Vec<u8>]) -> Vec<u8> {
    frames.iter().map(|frame| frame[6]).collect()
}

#[test]
fn incompressible_literals_are_stored_after_the_first_batch_and_still_round_trip() {
    let spec: CodecSpec = "zstd:level=1".parse().expect("valid spec");
    let batches: Vec<PageBatch> = (0..4).map(|i| random_batch(i * 16, 16, i + 1)).collect();

    let frames = frames(&spec, &batches);
    let round_trip = round_trip(&spec, &batches);

    let zstd = CompressorId::Zstd as u8;
    let none = CompressorId::None as u8;
    assert_eq!(literal_compressors(&frames), vec![zstd, none, zstd, none]);
    assert!(round_trip.is_ok());
}

#[test]
fn a_section_that_compresses_again_is_compressed_again() {
    let spec: CodecSpec = "zstd:level=1".parse().expect("valid spec");
    let mut batches: Vec<PageBatch> = (0..8).map(|i| random_batch(i * 16, 16, i + 1)).collect();
    batches.extend((0..70).map(|i| plain_batch(i * 16, 16)));

    let frames = frames(&spec, &batches);

    let last = frames.last().expect("frames");
    assert_eq!(
        literal_compressors(std::slice::from_ref(last)),
        vec![CompressorId::Zstd as u8]
    );
    assert!(last.len() < PAGE_BYTES, "{} bytes", last.len());
}
