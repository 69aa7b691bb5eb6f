//! Section decompression (stored, gzip, zstd with in-band dictionaries) on
//! hostile input, with the announced length taken from the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use understudy_compress::compressor::{CompressorId, Decompressor};

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let Some(id) = CompressorId::from_byte(data[0] % 3) else {
        return;
    };
    let expected = usize::from(u16::from_le_bytes([data[1], data[2]]));
    let mut decompressor = Decompressor::new();
    let mut out = Vec::new();
    if let Ok(Some(staged)) = decompressor.decompress(id, &data[3..], expected, &mut out) {
        assert_eq!(out.len(), expected);
        let _ = decompressor.commit(staged);
    }
});
