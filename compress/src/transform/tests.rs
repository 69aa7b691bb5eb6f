//! Tests of the page stage.

use super::*;

fn page_with(seed: u8) -> Page {
    std::array::from_fn(|i| i.to_le_bytes()[0].wrapping_mul(31).wrapping_add(seed))
}

fn encode_decode(
    encoder: &mut TransformEncoder,
    decoder: &mut TransformDecoder,
    batch: &PageBatch,
) -> (PageBatch, TransformStats) {
    let mut records = Vec::new();
    let mut literals = Vec::new();
    let stats = encoder.encode(batch, &mut records, &mut literals);
    let literals = if encoder.kind() == TransformKind::Raw {
        batch.contents().to_vec()
    } else {
        literals
    };
    let mut out = PageBatch::new();
    decoder
        .decode(&records, &literals, batch.len(), &mut out)
        .expect("decode");
    decoder.commit(&out);
    (out, stats)
}

#[test]
fn delta_sends_a_changed_page_as_a_delta() {
    let mut encoder = TransformEncoder::new(TransformKind::Delta, 16, 4);
    let mut decoder = TransformDecoder::new(16);
    let mut first = PageBatch::new();
    first.push(7, &page_with(1));
    encode_decode(&mut encoder, &mut decoder, &first);
    let mut second = first.clone();
    second.page_mut(0)[100] ^= 0xff;

    let (out, stats) = encode_decode(&mut encoder, &mut decoder, &second);

    assert_eq!(out, second);
    assert_eq!(stats.delta, 1);
}

#[test]
fn similarity_finds_a_copy_at_another_address() {
    let mut encoder = TransformEncoder::new(TransformKind::Similarity, 16, 4);
    let mut decoder = TransformDecoder::new(16);
    let mut first = PageBatch::new();
    first.push(1, &page_with(3));
    encode_decode(&mut encoder, &mut decoder, &first);
    let mut moved = page_with(3);
    moved[2000] ^= 1;
    let mut second = PageBatch::new();
    second.push(900, &moved);
    second.push(901, &page_with(3));

    let (out, stats) = encode_decode(&mut encoder, &mut decoder, &second);

    assert_eq!(out, second);
    assert_eq!(stats.similar, 1);
    assert_eq!(stats.duplicate, 1);
}

#[test]
fn similarity_finds_duplicates_within_a_batch() {
    let mut encoder = TransformEncoder::new(TransformKind::Similarity, 16, 4);
    let mut decoder = TransformDecoder::new(16);
    let mut batch = PageBatch::new();
    batch.push(5, &page_with(9));
    batch.push(6, &page_with(9));

    let (out, stats) = encode_decode(&mut encoder, &mut decoder, &batch);

    assert_eq!(out, batch);
    assert_eq!(stats.duplicate, 1);
}

#[test]
fn unsorted_batch_round_trips_with_references_to_its_own_pages() {
    let mut encoder = TransformEncoder::new(TransformKind::Similarity, 16, 4);
    let mut decoder = TransformDecoder::new(16);
    let mut first = PageBatch::new();
    first.push(1, &page_with(1));
    first.push(2, &page_with(2));
    encode_decode(&mut encoder, &mut decoder, &first);
    // Page 2 takes page 1's old contents, page 1 changes: in this order,
    // a reference to page 1 must resolve to its old version.
    let mut second = PageBatch::new();
    second.push(2, &page_with(1));
    second.push(1, &page_with(3));
    second.push(0, &page_with(1));

    let (out, _) = encode_decode(&mut encoder, &mut decoder, &second);

    assert_eq!(out, second);
}

#[test]
fn sorted_batch_does_not_refer_to_pages_it_already_changed() {
    let mut encoder = TransformEncoder::new(TransformKind::Similarity, 16, 4);
    let mut decoder = TransformDecoder::new(16);
    let mut first = PageBatch::new();
    first.push(1, &page_with(1));
    encode_decode(&mut encoder, &mut decoder, &first);
    // Page 1 changes, then page 2 becomes a near copy of page 1's new
    // contents, whose fingerprints now point at page 1.
    let mut changed = page_with(1);
    changed[10] ^= 0xff;
    let mut near_copy = changed;
    near_copy[3000] ^= 1;
    let mut second = PageBatch::new();
    second.push(1, &changed);
    second.push(2, &near_copy);

    let (out, _) = encode_decode(&mut encoder, &mut decoder, &second);

    assert_eq!(out, second);
}

#[test]
fn reference_to_a_page_the_decoder_lacks_is_an_error() {
    let mut encoder = TransformEncoder::new(TransformKind::Delta, 16, 4);
    let decoder = TransformDecoder::new(16);
    let mut batch = PageBatch::new();
    batch.push(1, &page_with(1));
    let (mut records, mut literals) = (Vec::new(), Vec::new());
    encoder.encode(&batch, &mut records, &mut literals);
    let mut changed = batch.clone();
    changed.page_mut(0)[0] ^= 1;
    let (mut records, mut literals) = (Vec::new(), Vec::new());
    encoder.encode(&changed, &mut records, &mut literals);

    let result = decoder.decode(&records, &literals, 1, &mut PageBatch::new());

    assert!(matches!(
        result,
        Err(TransformError::MissingReference { index: 0, base: 1 })
    ));
}

#[test]
fn forward_batch_reference_is_an_error() {
    let decoder = TransformDecoder::new(16);
    let records = [TAG_BATCH_DUPLICATE, 0, 0];

    let result = decoder.decode(&records, &[], 1, &mut PageBatch::new());

    assert!(matches!(
        result,
        Err(TransformError::BadBatchReference {
            index: 0,
            earlier: 0
        })
    ));
}

#[test]
fn leftover_whole_pages_are_an_error() {
    let decoder = TransformDecoder::new(16);
    let records = [TAG_ZERO, 0];

    let result = decoder.decode(&records, &[0; PAGE_BYTES], 1, &mut PageBatch::new());

    assert!(matches!(
        result,
        Err(TransformError::LiteralMismatch { .. })
    ));
}
