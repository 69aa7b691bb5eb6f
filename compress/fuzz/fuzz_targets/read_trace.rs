//! The trace reader on hostile files.
#![no_main]

use libfuzzer_sys::fuzz_target;
use understudy_compress::trace;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("understudy-fuzz-{}.trace", std::process::id()));
    if std::fs::write(&path, data).is_ok() {
        let _ = trace::load(&path);
    }
});
