//! The frame decoder on hostile frames, fresh or after one valid frame
//! primed its version store and dictionaries. The first input byte chooses the codec
//! of the priming frame, and whether the header's checksum, sequence and
//! length are fixed up first, so that the fuzzer also reaches the sections
//! behind a valid header.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use understudy_compress::codec::HEADER_LEN;
use understudy_compress::trace::synthetic::{SyntheticTrace, generate};
use understudy_compress::{CodecSpec, Decoder, Encoder, PageBatch};

const SPECS: [&str; 3] = [
    "similarity:cache=64K+zstd:level=1,dict=4K",
    "delta:cache=64K,miss=gzip-1",
    "raw",
];

/// One priming frame per codec, made once.
fn primers() -> &'static Vec<Vec<u8>> {
    static PRIMERS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    PRIMERS.get_or_init(|| {
        let batches = generate(&SyntheticTrace {
            pages: 16,
            epochs: 1,
            seed: 3,
        });
        SPECS
            .iter()
            .map(|text| {
                let spec: CodecSpec = text.parse().expect("valid spec");
                let mut frame = Vec::new();
                Encoder::new(&spec)
                    .encode(&batches[0], &mut frame)
                    .expect("encode");
                frame
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, frame)) = data.split_first() else {
        return;
    };
    let mut decoder = Decoder::new();
    let mut out = PageBatch::new();
    // Bit 6 leaves the decoder fresh: the first frame's header then decides
    // the version store (the allocation a hostile header once blew up).
    let primed = mode & 0x40 == 0;
    if primed {
        decoder
            .decode(&primers()[usize::from(mode & 3) % SPECS.len()], &mut out)
            .expect("primer decodes");
    }
    let expected_sequence = u64::from(primed);

    let mut frame = frame.to_vec();
    if mode & 0x80 != 0 && frame.len() >= HEADER_LEN {
        frame[8..16].copy_from_slice(&expected_sequence.to_le_bytes());
        let payload = (frame.len() - HEADER_LEN) as u32;
        frame[36..40].copy_from_slice(&payload.to_le_bytes());
        let checksum = xxhash_rust::xxh3::xxh3_64(&frame[..48]);
        frame[48..56].copy_from_slice(&checksum.to_le_bytes());
    }
    if decoder.decode(&frame, &mut out).is_err() {
        assert_eq!(
            decoder.next_sequence(),
            expected_sequence,
            "a refused frame changed the decoder"
        );
    }
});
