//! Writes seed inputs for the `decode_frame` fuzz target: the second frame
//! of a synthetic stream for each codec the target primes with, prefixed
//! with the mode byte that selects that codec.
//!
//! ```sh
//! cargo run -p understudy-compress --example fuzz_seeds -- compress/fuzz/corpus/decode_frame
//! ```

use std::path::PathBuf;

use understudy_compress::trace::synthetic::{SyntheticTrace, generate};
use understudy_compress::{CodecSpec, Encoder};

/// The codecs of `fuzz_targets/decode_frame.rs`, in its order.
const SPECS: [&str; 3] = [
    "similarity:cache=64K+zstd:level=1,dict=4K",
    "delta:cache=64K,miss=gzip-1",
    "raw",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let directory = PathBuf::from(
        std::env::args()
            .nth(1)
            .ok_or("usage: fuzz_seeds DIRECTORY")?,
    );
    std::fs::create_dir_all(&directory)?;
    // The same first batch as the fuzz target's primer, then a second one.
    let first = generate(&SyntheticTrace {
        pages: 16,
        epochs: 1,
        seed: 3,
    });
    let later = generate(&SyntheticTrace {
        pages: 16,
        epochs: 3,
        seed: 3,
    });
    for (mode, text) in SPECS.iter().enumerate() {
        let spec: CodecSpec = text.parse()?;
        let mut encoder = Encoder::new(&spec);
        let mut frame = Vec::new();
        encoder.encode(&first[0], &mut frame)?;
        for (index, batch) in later[1..].iter().enumerate() {
            frame.clear();
            encoder.encode(batch, &mut frame)?;
            let mut seed = vec![u8::try_from(mode)?];
            seed.extend_from_slice(&frame);
            std::fs::write(directory.join(format!("seed-{mode}-{index}")), &seed)?;
        }
    }
    Ok(())
}
