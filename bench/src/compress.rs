//! The codec tradeoff benchmark, run by `understudy bench compress`: every
//! codec on every trace, in one run.
//!
//! Each codec encodes the trace's epochs in order, one stream per codec and
//! trace, and a decoder decodes every frame; each decoded batch is compared
//! with the original, so a codec that is fast because it is wrong fails the
//! run. Epoch 0 (every resident page) primes both sides, as the first full
//! copy of a replication does, and is reported on its own; the steady-state
//! numbers cover epochs 1 and later, the ones a checkpointing epoch sends.
//! Times are single-threaded, so MB/s are per core; each codec runs several
//! times (fresh state each time) and the run with the median encode time is
//! reported, since a shared two-core machine varies by 20 % from run to run.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use understudy_vm::{PAGE_BYTES, PAGE_SIZE};

use serde_json::json;
use understudy_compress::trace::{self, Epoch, TraceError, TraceInfo};
use understudy_compress::{CodecError, CodecSpec, Decoder, Encoder, PageBatch};

/// Codecs compared when none are named.
pub const DEFAULT_CODECS: &[&str] = &[
    "raw",
    "gzip:level=6",
    "gzip:level=1",
    "zstd:level=1",
    "zstd:level=3",
    "zstd:level=3,dict=64K",
    "delta",
    "delta+zstd:level=1",
    "similarity",
    "similarity+zstd:level=1",
    "auto",
];

/// The reference that `vs gzip-6` compares with.
pub const GZIP6: &str = "gzip:level=6";

/// A failed compression benchmark.
#[derive(Debug, thiserror::Error)]
pub enum CompressBenchError {
    /// A trace could not be read.
    #[error("cannot read a trace")]
    Trace(#[from] TraceError),
    /// A codec failed.
    #[error("codec {codec} failed on {trace}")]
    Codec {
        /// The codec.
        codec: String,
        /// The trace.
        trace: String,
        /// Why.
        #[source]
        source: CodecError,
    },
    /// A codec returned different pages.
    #[error("codec {codec} decoded epoch {epoch} of {trace} to different pages")]
    Mismatch {
        /// The codec.
        codec: String,
        /// The trace.
        trace: String,
        /// The epoch.
        epoch: u64,
    },
    /// A trace with no epoch after the first.
    #[error("{0} has no epoch after the first: capture for longer")]
    TooShort(PathBuf),
    /// The plot could not be written.
    #[error("cannot write the plot to {path}")]
    Plot {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// One codec on one trace.
#[derive(Clone, Debug)]
pub struct CodecResult {
    /// Trace name (file stem).
    pub trace: String,
    /// Codec, as written.
    pub codec: String,
    /// Input bytes over epochs 1 and later.
    pub input_bytes: u64,
    /// Frame bytes over epochs 1 and later.
    pub output_bytes: u64,
    /// Encode time over epochs 1 and later.
    pub encode: Duration,
    /// Decode time over epochs 1 and later.
    pub decode: Duration,
    /// Epochs 1 and later.
    pub epochs: usize,
    /// Epoch 0: input bytes, output bytes.
    pub first_epoch: (u64, u64),
    /// Encoder state at the end, bytes.
    pub encoder_memory: usize,
    /// Decoder state at the end, bytes.
    pub decoder_memory: usize,
    /// Largest frame of epochs 1 and later.
    pub largest_frame: u64,
}

impl CodecResult {
    /// Input bytes per output byte.
    pub fn ratio(&self) -> f64 {
        self.input_bytes as f64 / self.output_bytes.max(1) as f64
    }

    /// Encode MB/s (10^6) of input, one core.
    pub fn encode_mb_per_s(&self) -> f64 {
        self.input_bytes as f64 / self.encode.as_secs_f64().max(1e-9) / 1e6
    }

    /// Decode MB/s (10^6) of input, one core.
    pub fn decode_mb_per_s(&self) -> f64 {
        self.input_bytes as f64 / self.decode.as_secs_f64().max(1e-9) / 1e6
    }

    /// Mean frame bytes per epoch.
    pub fn bytes_per_epoch(&self) -> f64 {
        self.output_bytes as f64 / self.epochs.max(1) as f64
    }

    /// Link bandwidth, Mbit/s, that carries the mean epoch within `epoch`.
    pub fn mbit_per_s_at(&self, epoch: Duration) -> f64 {
        self.bytes_per_epoch() * 8.0 / epoch.as_secs_f64() / 1e6
    }

    /// Share of one core spent encoding when epochs come every `epoch`.
    pub fn encode_core_share_at(&self, epoch: Duration) -> f64 {
        self.encode.as_secs_f64() / self.epochs.max(1) as f64 / epoch.as_secs_f64()
    }
}

/// What a trace holds, for the report.
#[derive(Clone, Debug)]
pub struct TraceSummary {
    /// Trace name (file stem).
    pub name: String,
    /// Its header.
    pub info: TraceInfo,
    /// Epochs, the first included.
    pub epochs: usize,
    /// Pages in epoch 0.
    pub first_epoch_pages: usize,
    /// Mean pages per later epoch.
    pub mean_pages: f64,
    /// Mean time between epochs, as captured.
    pub mean_interval: Duration,
}

/// The whole comparison.
#[derive(Clone, Debug)]
pub struct CompressReport {
    /// The traces.
    pub traces: Vec<TraceSummary>,
    /// Every codec on every trace.
    pub results: Vec<CodecResult>,
    /// The epoch length the bandwidth column assumes.
    pub epoch: Duration,
}

fn trace_name(path: &Path) -> String {
    path.file_stem().map_or_else(
        || path.display().to_string(),
        |stem| stem.to_string_lossy().into_owned(),
    )
}

fn run_codec(
    name: &str,
    spec: &CodecSpec,
    codec: &str,
    epochs: &[Epoch],
) -> Result<CodecResult, CompressBenchError> {
    let mut encoder = Encoder::new(spec);
    let mut decoder = Decoder::new();
    let mut frame = Vec::new();
    let mut decoded = PageBatch::new();
    let mut result = CodecResult {
        trace: name.to_owned(),
        codec: codec.to_owned(),
        input_bytes: 0,
        output_bytes: 0,
        encode: Duration::ZERO,
        decode: Duration::ZERO,
        epochs: epochs.len().saturating_sub(1),
        first_epoch: (0, 0),
        encoder_memory: 0,
        decoder_memory: 0,
        largest_frame: 0,
    };
    let fail = |source| CompressBenchError::Codec {
        codec: codec.to_owned(),
        trace: name.to_owned(),
        source,
    };
    for epoch in epochs {
        frame.clear();
        let started = Instant::now();
        encoder.encode(&epoch.pages, &mut frame).map_err(fail)?;
        let encoded = Instant::now();
        decoder.decode(&frame, &mut decoded).map_err(fail)?;
        let decode = encoded.elapsed();
        let encode = encoded - started;
        if decoded != epoch.pages {
            return Err(CompressBenchError::Mismatch {
                codec: codec.to_owned(),
                trace: name.to_owned(),
                epoch: epoch.index,
            });
        }
        let input = epoch.pages.content_bytes() as u64;
        if epoch.index == 0 {
            result.first_epoch = (input, frame.len() as u64);
            continue;
        }
        result.input_bytes += input;
        result.output_bytes += frame.len() as u64;
        result.largest_frame = result.largest_frame.max(frame.len() as u64);
        result.encode += encode;
        result.decode += decode;
    }
    result.encoder_memory = encoder.memory_bytes();
    result.decoder_memory = decoder.memory_bytes();
    Ok(result)
}

/// Runs `codec` on `epochs` `repeat` times (fresh encoder and decoder each
/// time) and keeps the run with the median encode time.
fn run_codec_repeated(
    name: &str,
    spec: &CodecSpec,
    codec: &str,
    epochs: &[Epoch],
    repeat: usize,
) -> Result<CodecResult, CompressBenchError> {
    let mut runs = (0..repeat.max(1))
        .map(|_| run_codec(name, spec, codec, epochs))
        .collect::<Result<Vec<_>, _>>()?;
    runs.sort_by_key(|run| run.encode);
    Ok(runs.swap_remove(runs.len() / 2))
}

/// Runs every codec on every trace, each `repeat` times (the median encode
/// time is reported). `progress` hears about each result as it is measured.
pub fn run(
    traces: &[PathBuf],
    codecs: &[String],
    epoch: Duration,
    repeat: usize,
    mut progress: impl FnMut(&CodecResult),
) -> Result<CompressReport, CompressBenchError> {
    let specs: Vec<(String, CodecSpec)> = codecs
        .iter()
        .map(|text| {
            let spec = text.parse().expect("codec specs are parsed by the caller");
            (text.clone(), spec)
        })
        .collect();
    let mut report = CompressReport {
        traces: Vec::new(),
        results: Vec::new(),
        epoch,
    };
    for path in traces {
        let name = trace_name(path);
        let (info, epochs) = trace::load(path)?;
        if epochs.len() < 2 {
            return Err(CompressBenchError::TooShort(path.clone()));
        }
        let later = &epochs[1..];
        let span = later.last().map_or(0, |last| last.time_ns) - epochs[0].time_ns;
        report.traces.push(TraceSummary {
            name: name.clone(),
            info,
            epochs: epochs.len(),
            first_epoch_pages: epochs[0].pages.len(),
            mean_pages: later.iter().map(|e| e.pages.len()).sum::<usize>() as f64
                / later.len() as f64,
            mean_interval: Duration::from_nanos(span / later.len() as u64),
        });
        for (codec, spec) in &specs {
            let result = run_codec_repeated(&name, spec, codec, &epochs, repeat)?;
            progress(&result);
            report.results.push(result);
        }
    }
    Ok(report)
}

impl CompressReport {
    /// The `gzip:level=6` result on `trace`, if it was run.
    pub fn gzip6(&self, trace: &str) -> Option<&CodecResult> {
        self.results
            .iter()
            .find(|result| result.trace == trace && result.codec == GZIP6)
    }

    /// Whether `result` has at least gzip -6's ratio at ten times its speed.
    pub fn beats_gzip6(&self, result: &CodecResult) -> Option<bool> {
        let gzip = self.gzip6(&result.trace)?;
        Some(
            result.ratio() >= gzip.ratio()
                && result.encode_mb_per_s() >= 10.0 * gzip.encode_mb_per_s(),
        )
    }

    /// The report as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "epoch_ms": self.epoch.as_secs_f64() * 1e3,
            "traces": self.traces.iter().map(|t| json!({
                "name": t.name,
                "source": t.info.source.name(),
                "description": t.info.description,
                "epochs": t.epochs,
                "first_epoch_pages": t.first_epoch_pages,
                "mean_pages_per_epoch": t.mean_pages,
                "mean_interval_ms": t.mean_interval.as_secs_f64() * 1e3,
            })).collect::<Vec<_>>(),
            "results": self.results.iter().map(|r| json!({
                "trace": r.trace,
                "codec": r.codec,
                "ratio": r.ratio(),
                "encode_mb_per_s": r.encode_mb_per_s(),
                "decode_mb_per_s": r.decode_mb_per_s(),
                "encoder_memory_bytes": r.encoder_memory,
                "decoder_memory_bytes": r.decoder_memory,
                "bytes_per_epoch": r.bytes_per_epoch(),
                "largest_frame_bytes": r.largest_frame,
                "mbit_per_s_at_epoch": r.mbit_per_s_at(self.epoch),
                "encode_core_share_at_epoch": r.encode_core_share_at(self.epoch),
                "first_epoch_ratio": r.first_epoch.0 as f64 / r.first_epoch.1.max(1) as f64,
                "beats_gzip6_ratio_at_10x_speed": self.beats_gzip6(r),
            })).collect::<Vec<_>>(),
        })
    }

    /// An SVG scatter plot: compression ratio against encode throughput, one
    /// colour per trace, each point labelled with its codec.
    pub fn plot(&self, path: &Path) -> Result<(), CompressBenchError> {
        // Points are numbered by codec; the key says which number is which.
        let mut codecs: Vec<&str> = Vec::new();
        for result in &self.results {
            if !codecs.contains(&result.codec.as_str()) {
                codecs.push(&result.codec);
            }
        }
        let number = |codec: &str| codecs.iter().position(|c| *c == codec).map_or(0, |i| i + 1);
        let series: Vec<crate::svg::Series> = self
            .traces
            .iter()
            .map(|trace| crate::svg::Series {
                name: trace.name.clone(),
                points: self
                    .results
                    .iter()
                    .filter(|r| r.trace == trace.name)
                    .map(|r| (r.encode_mb_per_s(), r.ratio(), number(&r.codec).to_string()))
                    .collect(),
            })
            .collect();
        let key: Vec<String> = codecs
            .iter()
            .enumerate()
            .map(|(index, codec)| format!("{} {codec}", index + 1))
            .collect();
        let svg = crate::svg::scatter(
            "Checkpoint codecs: compression ratio against encode speed (epochs 1+)",
            "encode MB/s per core (log)",
            "compression ratio (log)",
            &series,
            &key,
        );
        std::fs::write(path, svg).map_err(|source| CompressBenchError::Plot {
            path: path.to_owned(),
            source,
        })
    }
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

impl fmt::Display for CompressReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let epoch_ms = self.epoch.as_secs_f64() * 1e3;
        for trace in &self.traces {
            writeln!(
                f,
                "\n{} ({}: {})\n  {} epochs every {:.1} ms; epoch 0 {} pages ({:.1} MiB), later epochs {:.0} pages ({:.2} MiB) on average",
                trace.name,
                trace.info.source.name(),
                trace.info.description,
                trace.epochs,
                trace.mean_interval.as_secs_f64() * 1e3,
                trace.first_epoch_pages,
                mib(trace.first_epoch_pages * PAGE_BYTES),
                trace.mean_pages,
                trace.mean_pages * PAGE_SIZE as f64 / f64::from(1 << 20),
            )?;
            writeln!(
                f,
                "  {:<30} {:>7} {:>10} {:>10} {:>9} {:>9} {:>10} {:>9} {:>6} {:>7} {:>8}",
                "codec",
                "ratio",
                "enc MB/s",
                "dec MB/s",
                "enc MiB",
                "dec MiB",
                "KB/epoch",
                format!("Mbit@{epoch_ms:.0}"),
                "core%",
                "ratio0",
                "vs gz-6"
            )?;
            for result in self.results.iter().filter(|r| r.trace == trace.name) {
                let verdict = match self.beats_gzip6(result) {
                    _ if result.codec == GZIP6 => "ref",
                    Some(true) => "BEATS",
                    Some(false) => "-",
                    None => "?",
                };
                writeln!(
                    f,
                    "  {:<30} {:>7.2} {:>10.0} {:>10.0} {:>9.1} {:>9.1} {:>10.1} {:>9.0} {:>6.0} {:>7.2} {:>8}",
                    result.codec,
                    result.ratio(),
                    result.encode_mb_per_s(),
                    result.decode_mb_per_s(),
                    mib(result.encoder_memory),
                    mib(result.decoder_memory),
                    result.bytes_per_epoch() / 1e3,
                    result.mbit_per_s_at(self.epoch),
                    result.encode_core_share_at(self.epoch) * 100.0,
                    result.first_epoch.0 as f64 / result.first_epoch.1.max(1) as f64,
                    verdict,
                )?;
            }
        }
        writeln!(
            f,
            "\nratio, MB/s, KB/epoch: epochs 1 and later. Mbit@{epoch_ms:.0}: link needed to ship the mean epoch within {epoch_ms:.0} ms; core%: one core's share spent encoding at that rate; ratio0: epoch 0 (full copy); vs gz-6: BEATS = at least gzip -6's ratio at 10x its encode speed."
        )
    }
}
