//! `understudy bench`: the VM core's numbers (see `understudy-bench`).

/// Arguments of `understudy bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArguments {
    /// Seconds each dirtying-throughput measurement runs.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
}

/// Runs the VM-core benchmarks and prints a report.
pub fn bench(arguments: BenchArguments) -> anyhow::Result<()> {
    let report = understudy_bench::vm_core(arguments.seconds)?;
    print!("{report}");
    Ok(())
}
