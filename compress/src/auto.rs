//! The `auto` policy: per batch, pick the compressor that ships the batch
//! soonest over a link of a given speed, from ratios and costs observed on
//! earlier batches; and per page, let `similarity` pick the cheapest record
//! (zero, duplicate, delta, similar, whole).
//!
//! The cost of a candidate is `CPU seconds + compressed bytes / link speed`
//! per input byte, an upper bound on the time a checkpoint spends between the
//! pause and the last byte on the wire. Observations are moving averages;
//! every fourth batch also tries the next candidate in turn, so the choice
//! follows the workload. When similarity search finds almost nothing (under
//! 1 % of changed pages over a window), it is switched off for a while: the
//! same-address delta still runs.

use std::time::Instant;

use crate::compressor::{Compressor, CompressorError, CompressorSpec};
use crate::transform::TransformStats;

const PROBE_EVERY: u64 = 4;
const SMOOTHING: f64 = 0.3;
const SEARCH_WINDOW_PAGES: usize = 2048;
const SEARCH_OFF_BATCHES: u64 = 32;

struct Candidate {
    spec: CompressorSpec,
    records: Compressor,
    literals: Compressor,
    records_out: Vec<u8>,
    literals_out: Vec<u8>,
    /// Moving averages per input byte.
    seconds_per_byte: Option<f64>,
    output_per_byte: Option<f64>,
}

impl Candidate {
    fn new(spec: CompressorSpec) -> Self {
        Self {
            spec,
            records: Compressor::new(spec),
            literals: Compressor::new(spec),
            records_out: Vec::new(),
            literals_out: Vec::new(),
            seconds_per_byte: None,
            output_per_byte: None,
        }
    }

    fn expected_cost(&self, link_bytes_per_second: f64) -> Option<f64> {
        Some(self.seconds_per_byte? + self.output_per_byte? / link_bytes_per_second)
    }

    fn observe(&mut self, seconds_per_byte: f64, output_per_byte: f64) {
        let blend =
            |old: Option<f64>, new: f64| Some(old.map_or(new, |old| old + SMOOTHING * (new - old)));
        self.seconds_per_byte = blend(self.seconds_per_byte, seconds_per_byte);
        self.output_per_byte = blend(self.output_per_byte, output_per_byte);
    }
}

/// State of the `auto` policy of one encoder.
pub struct AutoPolicy {
    link_bytes_per_second: f64,
    candidates: Vec<Candidate>,
    current: usize,
    batches: u64,
    next_probe: usize,
    search_enabled: bool,
    search_off_until: u64,
    window_pages: usize,
    window_hits: usize,
}

impl AutoPolicy {
    /// A policy for a link of `link_mbit` Mbit/s.
    pub fn new(link_mbit: u64) -> Self {
        let zstd = |level| CompressorSpec::Zstd {
            level,
            dictionary_bytes: 0,
        };
        Self {
            link_bytes_per_second: link_mbit as f64 * 1e6 / 8.0,
            candidates: [CompressorSpec::None, zstd(-1), zstd(1), zstd(3), zstd(9)]
                .into_iter()
                .map(Candidate::new)
                .collect(),
            current: 0,
            batches: 0,
            next_probe: 0,
            search_enabled: true,
            search_off_until: 0,
            window_pages: 0,
            window_hits: 0,
        }
    }

    /// Whether `similarity` should search beyond the same address for the
    /// next batch.
    pub fn search_enabled(&self) -> bool {
        self.search_enabled
    }

    /// Learns from how the page stage encoded the last batch.
    pub fn observe_transform(&mut self, stats: &TransformStats) {
        if !self.search_enabled {
            if self.batches >= self.search_off_until {
                self.search_enabled = true;
            }
            return;
        }
        self.window_pages += stats.whole + stats.delta + stats.similar + stats.duplicate;
        self.window_hits += stats.similar + stats.duplicate;
        if self.window_pages >= SEARCH_WINDOW_PAGES {
            if self.window_hits * 100 < self.window_pages {
                self.search_enabled = false;
                self.search_off_until = self.batches + SEARCH_OFF_BATCHES;
            }
            self.window_pages = 0;
            self.window_hits = 0;
        }
    }

    /// Compresses the two sections of a batch with the chosen compressor (and
    /// sometimes a second one, to keep learning); returns the compressor used.
    pub fn compress(
        &mut self,
        records: &[u8],
        literals: &[u8],
        records_out: &mut Vec<u8>,
        literals_out: &mut Vec<u8>,
    ) -> Result<CompressorSpec, CompressorError> {
        let mut tries = vec![self.current];
        let unobserved: Vec<usize> = (0..self.candidates.len())
            .filter(|&index| self.candidates[index].seconds_per_byte.is_none())
            .collect();
        if !unobserved.is_empty() {
            tries.extend(unobserved);
        } else if self.batches.is_multiple_of(PROBE_EVERY) {
            self.next_probe = (self.next_probe + 1) % self.candidates.len();
            tries.push(self.next_probe);
        }
        tries.dedup();
        let input = (records.len() + literals.len()).max(1) as f64;
        let mut best: Option<(usize, f64)> = None;
        for index in tries {
            let candidate = &mut self.candidates[index];
            candidate.records_out.clear();
            candidate.literals_out.clear();
            let started = Instant::now();
            candidate
                .records
                .compress(records, &mut candidate.records_out)?;
            candidate
                .literals
                .compress(literals, &mut candidate.literals_out)?;
            let seconds = started.elapsed().as_secs_f64();
            let output = (candidate.records_out.len() + candidate.literals_out.len()) as f64;
            candidate.observe(seconds / input, output / input);
            let cost = seconds + output / self.link_bytes_per_second;
            if best.is_none_or(|(_, best_cost)| cost < best_cost) {
                best = Some((index, cost));
            }
        }
        let (chosen, _) = best.expect("at least the current candidate was tried");
        let candidate = &self.candidates[chosen];
        records_out.extend_from_slice(&candidate.records_out);
        literals_out.extend_from_slice(&candidate.literals_out);
        let link = self.link_bytes_per_second;
        self.current = (0..self.candidates.len())
            .min_by(|&a, &b| {
                let cost = |index: usize| {
                    self.candidates[index]
                        .expected_cost(link)
                        .unwrap_or(f64::INFINITY)
                };
                cost(a).total_cmp(&cost(b))
            })
            .unwrap_or(chosen);
        self.batches += 1;
        Ok(candidate.spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compressible() -> Vec<u8> {
        (0..256 * 1024).map(|i| (i / 512) as u8).collect()
    }

    fn chosen_after(link_mbit: u64, batches: usize) -> CompressorSpec {
        let mut policy = AutoPolicy::new(link_mbit);
        let input = compressible();
        let mut spec = CompressorSpec::None;
        for _ in 0..batches {
            let (mut records, mut literals) = (Vec::new(), Vec::new());
            spec = policy
                .compress(&[], &input, &mut records, &mut literals)
                .expect("compress");
        }
        spec
    }

    #[test]
    fn slow_link_gets_compression() {
        assert_ne!(chosen_after(10, 8), CompressorSpec::None);
    }

    #[test]
    fn search_is_switched_off_when_it_finds_nothing() {
        let mut policy = AutoPolicy::new(1000);
        let fruitless = TransformStats {
            whole: SEARCH_WINDOW_PAGES,
            ..TransformStats::default()
        };

        policy.observe_transform(&fruitless);

        assert!(!policy.search_enabled());
    }

    #[test]
    fn search_stays_on_when_it_finds_duplicates() {
        let mut policy = AutoPolicy::new(1000);
        let fruitful = TransformStats {
            whole: SEARCH_WINDOW_PAGES - 100,
            duplicate: 100,
            ..TransformStats::default()
        };

        policy.observe_transform(&fruitful);

        assert!(policy.search_enabled());
    }
}
