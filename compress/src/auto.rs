//! The `auto` policy: per batch, pick the compressor that ships the batch
//! soonest over a link of a given speed, from ratios and costs observed on
//! earlier batches; and per page, let `similarity` pick the cheapest record
//! (zero, duplicate, delta, similar, whole).
//!
//! The cost of a candidate is `CPU seconds + compressed bytes / link speed`
//! per input byte, an upper bound on the time a checkpoint spends between the
//! pause and the last byte on the wire. Observations are moving averages;
//! every fourth batch another candidate is tried on a 256 KiB sample, so the
//! choice follows the workload at a small cost. When similarity search finds almost nothing (under
//! 1 % of changed pages over a window), it is switched off for a while: the
//! same-address delta still runs.

use std::time::Instant;

use crate::compressor::{Compressor, CompressorError, CompressorSpec};
use crate::transform::TransformStats;

const PROBE_EVERY: u64 = 4;
const SAMPLE_BYTES: usize = 256 << 10;
/// Weight an observation keeps after each newer one.
const DECAY: f64 = 0.7;
/// Batches smaller than this do not update the estimates (once there are
/// some): their cost is overhead, not compression.
const MIN_OBSERVED_BYTES: f64 = 16384.0;
const SEARCH_WINDOW_PAGES: usize = 2048;
const SEARCH_OFF_BATCHES: u64 = 32;

struct Candidate {
    spec: CompressorSpec,
    records: Compressor,
    literals: Compressor,
    records_out: Vec<u8>,
    literals_out: Vec<u8>,
    /// Decaying sums of what it was measured on: seconds spent, bytes in,
    /// bytes out. Ratios of sums weigh each batch by its size, so a batch of
    /// a few bytes (all frame overhead) cannot swing the estimate.
    seconds: f64,
    input: f64,
    output: f64,
}

impl Candidate {
    fn new(spec: CompressorSpec) -> Self {
        Self {
            spec,
            records: Compressor::new(spec),
            literals: Compressor::new(spec),
            records_out: Vec::new(),
            literals_out: Vec::new(),
            seconds: 0.0,
            input: 0.0,
            output: 0.0,
        }
    }

    fn measured(&self) -> bool {
        self.input > 0.0
    }

    fn expected_cost(&self, link_bytes_per_second: f64) -> Option<f64> {
        self.measured()
            .then(|| (self.seconds + self.output / link_bytes_per_second) / self.input)
    }

    /// Compresses both sections into this candidate's buffers and updates
    /// its estimates.
    fn measure(&mut self, records: &[u8], literals: &[u8]) -> Result<(), CompressorError> {
        self.records_out.clear();
        self.literals_out.clear();
        let started = Instant::now();
        self.records.compress(records, &mut self.records_out)?;
        self.literals.compress(literals, &mut self.literals_out)?;
        let seconds = started.elapsed().as_secs_f64();
        let input = (records.len() + literals.len()) as f64;
        let output = (self.records_out.len() + self.literals_out.len()) as f64;
        if input >= MIN_OBSERVED_BYTES || !self.measured() {
            self.seconds = self.seconds * DECAY + seconds;
            self.input = self.input * DECAY + input.max(1.0);
            self.output = self.output * DECAY + output;
        }
        Ok(())
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

    /// Compresses the two sections of a batch with the chosen compressor
    /// and appends them, records first, to `out`; returns the compressor
    /// used and the length of the compressed records. Candidates never measured, and one other
    /// candidate every fourth batch, are first tried on a sample (the first
    /// 256 KiB of each section), which updates their estimates at a small
    /// fraction of the batch's cost; then the candidate with the lowest
    /// expected cost compresses the batch.
    pub fn compress(
        &mut self,
        records: &[u8],
        literals: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(CompressorSpec, usize), CompressorError> {
        let mut probes: Vec<usize> = (0..self.candidates.len())
            .filter(|&index| !self.candidates[index].measured())
            .collect();
        if probes.is_empty() && self.batches.is_multiple_of(PROBE_EVERY) {
            self.next_probe = (self.next_probe + 1) % self.candidates.len();
            if self.next_probe != self.current {
                probes.push(self.next_probe);
            }
        }
        let records_sample = &records[..records.len().min(SAMPLE_BYTES)];
        let literals_sample = &literals[..literals.len().min(SAMPLE_BYTES)];
        for index in probes {
            self.candidates[index].measure(records_sample, literals_sample)?;
        }
        self.current = self.cheapest();
        let candidate = &mut self.candidates[self.current];
        candidate.measure(records, literals)?;
        out.extend_from_slice(&candidate.records_out);
        out.extend_from_slice(&candidate.literals_out);
        self.batches += 1;
        Ok((candidate.spec, candidate.records_out.len()))
    }

    /// The candidate with the lowest expected cost per input byte.
    fn cheapest(&self) -> usize {
        let link = self.link_bytes_per_second;
        let cost = |index: usize| {
            self.candidates[index]
                .expected_cost(link)
                .unwrap_or(f64::INFINITY)
        };
        (0..self.candidates.len())
            .min_by(|&a, &b| cost(a).total_cmp(&cost(b)))
            .unwrap_or(self.current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compressible() -> Vec<u8> {
        (0..256 * 1024usize)
            .map(|i| (i / 512).to_le_bytes()[0])
            .collect()
    }

    fn chosen_after(link_mbit: u64, batches: usize) -> CompressorSpec {
        let mut policy = AutoPolicy::new(link_mbit);
        let input = compressible();
        let mut spec = CompressorSpec::None;
        for _ in 0..batches {
            let mut out = Vec::new();
            (spec, _) = policy.compress(&[], &input, &mut out).expect("compress");
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
