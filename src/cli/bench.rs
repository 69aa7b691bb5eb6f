//! `understudy bench`: the VM core's numbers (`bench vm`) and the codec
//! tradeoff comparison on memory traces (`bench compress`); see
//! `understudy-bench`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use understudy_bench::compress::{self, DEFAULT_CODECS};
use understudy_compress::CodecSpec;

use super::parse_duration;

/// `understudy bench` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Measure the VM core: dirtying throughput, harvest and capture costs, start-up.
    Vm {
        /// Seconds each dirtying-throughput measurement runs.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// Measure replication: checkpoint pauses by dirty-set size, guest slowdown.
    Replication {
        /// Seconds each measurement runs.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Measure the cost of the authenticated channel: channel throughput,
    /// migration of 1 GiB of incompressible memory, and checkpoint pause and
    /// acknowledgement at 25 ms epochs, plain text and Noise side by side.
    Encryption {
        /// Seconds each checkpoint measurement runs.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Migrate 1 GiB of incompressible memory (an idle guest and one
    /// dirtying 100 MB/s) in every mode, side by side; with --qemu, QEMU's
    /// pre-copy of the same bytes too (needs qemu-system-x86).
    Migration {
        /// Runs of each mode.
        #[arg(long, default_value_t = 2)]
        repeat: usize,
        /// Also migrate with QEMU.
        #[arg(long)]
        qemu: bool,
        /// Carry ours in plain text, as QEMU's stream is (default: Noise).
        #[arg(long)]
        plaintext: bool,
    },
    /// Back-and-forth migration (BFMig): a 1 GiB guest migrates away, runs
    /// there for a while, and comes back to the host that kept its image;
    /// the return trip's bytes and time against a full migration, at a few
    /// (time away, write rate) points.
    BackAndForth {
        /// Carry the trips in plain text (default: Noise).
        #[arg(long)]
        plaintext: bool,
        /// Also write the plot (SVG) here.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Only the first N points (of 5).
        #[arg(long)]
        points: Option<usize>,
    },
    /// An in-memory and a storage-backed secondary side by side (real
    /// processes, the store on this machine's disk): backup memory, ack
    /// latency, checkpoint throughput, failover and the guest's write rate
    /// while its pages come from the store.
    Store(super::storebench::StoreBenchArguments),
    /// Guest-assisted transfer: a 1 GiB guest that freed a share of its
    /// working set, migrated with and without its free-page report.
    FreePages {
        /// Runs of each share.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
    },
    /// Compare checkpoint codecs on memory traces (see `understudy trace capture`).
    Compress(CompressArguments),
    /// redis-benchmark against the kv guest, alone and protected (needs root, redis-tools).
    Kv(super::kvbench::KvBenchArguments),
}

/// Arguments of `understudy bench compress`.
#[derive(clap::Args, Debug)]
pub struct CompressArguments {
    /// Trace files.
    #[arg(required = true)]
    traces: Vec<PathBuf>,
    /// Codec to compare (repeat for several); default: a representative set.
    /// Syntax: raw, gzip:level=N, zstd:level=N[,dict=SIZE], delta[:cache=SIZE][,miss=C],
    /// similarity[:cache=SIZE][,samples=N], T+C (e.g. delta+zstd:level=1), auto[:mbit=N].
    #[arg(long = "codec", value_parser = parse_codec)]
    codecs: Vec<String>,
    /// Epoch length the bandwidth column assumes.
    #[arg(long, default_value = "25ms", value_parser = parse_duration)]
    epoch: Duration,
    /// Runs per codec and trace; the median encode time is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Write a plot of ratio against encode throughput (SVG).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_codec(text: &str) -> Result<String, String> {
    text.parse::<CodecSpec>()
        .map(|_| text.to_owned())
        .map_err(|error| error.to_string())
}

/// Runs an `understudy bench` subcommand.
pub fn bench(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Vm { seconds } => {
            let report = understudy_bench::vm_core(seconds)?;
            print!("{report}");
            Ok(())
        }
        BenchCommand::Replication { seconds } => {
            let report = understudy_bench::replication::replication(seconds)?;
            print!("{report}");
            Ok(())
        }
        BenchCommand::Encryption { seconds } => {
            let report = understudy_bench::encryption::encryption(seconds)?;
            print!("{report}");
            Ok(())
        }
        BenchCommand::Migration {
            repeat,
            qemu,
            plaintext,
        } => {
            let report = understudy_bench::migration::migration(repeat, qemu, plaintext)?;
            print!("{report}");
            Ok(())
        }
        BenchCommand::BackAndForth {
            plaintext,
            plot,
            points,
        } => {
            let points = &understudy_bench::bfmig::POINTS[..points
                .unwrap_or(understudy_bench::bfmig::POINTS.len())
                .min(understudy_bench::bfmig::POINTS.len())];
            let report = understudy_bench::bfmig::back_and_forth(points, plaintext)?;
            print!("{report}");
            if let Some(path) = plot {
                std::fs::write(&path, report.plot())
                    .with_context(|| format!("plot {}", path.display()))?;
                println!("plot written to {}", path.display());
            }
            Ok(())
        }
        BenchCommand::Store(arguments) => super::storebench::bench_store(&arguments),
        BenchCommand::FreePages { repeat } => {
            let report = understudy_bench::freepages::free_pages(&[0, 50, 75, 90], repeat)?;
            print!("{report}");
            Ok(())
        }
        BenchCommand::Compress(arguments) => bench_compress(arguments),
        BenchCommand::Kv(arguments) => super::kvbench::bench_kv(arguments),
    }
}

fn bench_compress(arguments: CompressArguments) -> anyhow::Result<()> {
    let codecs: Vec<String> = if arguments.codecs.is_empty() {
        DEFAULT_CODECS
            .iter()
            .map(|codec| (*codec).to_owned())
            .collect()
    } else {
        arguments.codecs
    };
    let json = arguments.json;
    let report = compress::run(
        &arguments.traces,
        &codecs,
        arguments.epoch,
        arguments.repeat,
        |result| {
            if !json {
                eprintln!(
                    "  {} on {}: ratio {:.2}, encode {:.0} MB/s",
                    result.codec,
                    result.trace,
                    result.ratio(),
                    result.encode_mb_per_s()
                );
            }
        },
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{report}");
    }
    if let Some(path) = arguments.plot {
        report
            .plot(&path)
            .with_context(|| format!("plot {}", path.display()))?;
        if !json {
            println!("plot written to {}", path.display());
        }
    }
    Ok(())
}
