//! Synthetic page batches for unit tests (experiments use captured traces).
//!
//! Epoch 0 holds every page: a quarter zero, a quarter text-like, a quarter
//! random, a quarter near-copies of other pages. Each later epoch changes
//! about a fifth of the pages: small edits (the common case in real
//! memory), full rewrites, copies of another page, and pages zeroed.

use crate::batch::{PAGE_BYTES, Page, PageBatch};
use understudy_guest_abi::usize_from;

/// Parameters of a synthetic trace.
#[derive(Clone, Copy, Debug)]
pub struct SyntheticTrace {
    /// Pages of memory.
    pub pages: u64,
    /// Epochs, the first included.
    pub epochs: usize,
    /// Seed of the generator.
    pub seed: u64,
}

/// SplitMix64: small, fast, deterministic.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }

    /// An index below `bound`.
    fn index_below(&mut self, bound: usize) -> usize {
        usize_from(self.below(bound as u64))
    }

    fn fill(&mut self, bytes: &mut [u8]) {
        for chunk in bytes.chunks_mut(8) {
            let value = self.next().to_le_bytes();
            chunk.copy_from_slice(&value[..chunk.len()]);
        }
    }
}

fn text_page(random: &mut Random, page: &mut Page) {
    const WORDS: [&[u8]; 8] = [
        b"checkpoint ",
        b"replica ",
        b"epoch ",
        b"dirty ",
        b"page ",
        b"guest ",
        b"memory ",
        b"\n",
    ];
    let mut at = 0;
    while at < PAGE_BYTES {
        let word = WORDS[random.index_below(WORDS.len())];
        let take = word.len().min(PAGE_BYTES - at);
        page[at..at + take].copy_from_slice(&word[..take]);
        at += take;
    }
}

/// Generates the batches of a synthetic trace (page numbers increasing).
pub fn generate(parameters: &SyntheticTrace) -> Vec<PageBatch> {
    let mut random = Random(parameters.seed);
    let pages = parameters.pages.max(1);
    let mut memory: Vec<Page> = vec![[0u8; PAGE_BYTES]; usize_from(pages)];
    for number in 0..memory.len() {
        match number % 4 {
            0 => {}
            1 => text_page(&mut random, &mut memory[number]),
            2 => random.fill(&mut memory[number]),
            _ => {
                let source = random.index_below(number);
                memory[number] = memory[source];
                let at = random.index_below(PAGE_BYTES - 8);
                random.fill(&mut memory[number][at..at + 8]);
            }
        }
    }
    let mut batches = Vec::with_capacity(parameters.epochs);
    let mut first = PageBatch::with_capacity(memory.len());
    for (number, page) in memory.iter().enumerate() {
        first.push(number as u64, page);
    }
    batches.push(first);
    for _ in 1..parameters.epochs {
        let mut changed: Vec<u64> = (0..pages).filter(|_| random.below(5) == 0).collect();
        changed.dedup();
        let mut batch = PageBatch::with_capacity(changed.len());
        for number in changed {
            let index = usize_from(number);
            match random.below(10) {
                0..=5 => {
                    for _ in 0..1 + random.below(4) {
                        let at = random.index_below(PAGE_BYTES - 8);
                        let counter = u64::from_le_bytes(
                            memory[index][at..at + 8].try_into().expect("8 bytes"),
                        )
                        .wrapping_add(1);
                        memory[index][at..at + 8].copy_from_slice(&counter.to_le_bytes());
                    }
                }
                6 => random.fill(&mut memory[index]),
                7 => text_page(&mut random, &mut memory[index]),
                8 => {
                    let source = random.index_below(memory.len());
                    memory[index] = memory[source];
                }
                _ => memory[index] = [0u8; PAGE_BYTES],
            }
            batch.push(number, &memory[index]);
        }
        batches.push(batch);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_trace() {
        let parameters = SyntheticTrace {
            pages: 32,
            epochs: 3,
            seed: 5,
        };
        assert_eq!(generate(&parameters), generate(&parameters));
    }

    #[test]
    fn first_epoch_holds_every_page_and_later_ones_some() {
        let batches = generate(&SyntheticTrace {
            pages: 100,
            epochs: 2,
            seed: 5,
        });
        assert_eq!(batches[0].len(), 100);
        assert!(batches[1].len() > 5 && batches[1].len() < 50);
    }
}
