//! XOR-RLE application on hostile encodings: never out of the page.
#![no_main]

use libfuzzer_sys::fuzz_target;
use understudy_compress::xor_rle;

fuzz_target!(|data: &[u8]| {
    let mut page = [0x5au8; understudy_compress::PAGE_BYTES];
    let _ = xor_rle::apply(data, &mut page);
});
