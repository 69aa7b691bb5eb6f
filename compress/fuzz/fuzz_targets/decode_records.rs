//! The page-record decoder on hostile records, against a primed store.
#![no_main]

use libfuzzer_sys::fuzz_target;
use understudy_compress::PageBatch;
use understudy_compress::trace::synthetic::{SyntheticTrace, generate};
use understudy_compress::transform::TransformDecoder;

fuzz_target!(|data: &[u8]| {
    let Some((&pages, rest)) = data.split_first() else {
        return;
    };
    let literal_pages = usize::from(pages & 3);
    let (literals, records) = rest.split_at(
        rest.len()
            .min(literal_pages * understudy_compress::PAGE_BYTES),
    );
    let mut decoder = TransformDecoder::new(32);
    for batch in generate(&SyntheticTrace {
        pages: 24,
        epochs: 2,
        seed: 9,
    }) {
        decoder.commit(&batch);
    }
    let mut out = PageBatch::new();
    let _ = decoder.decode(records, literals, usize::from(pages >> 2), &mut out);
});
