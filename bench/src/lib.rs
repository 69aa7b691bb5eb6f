//! Benchmarks of the VM core.
use std::fmt;

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The VM failed.
    #[error(transparent)]
    Vm(#[from] understudy_vm::VmError),
}

/// The VM-core report.
pub struct Report;

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "todo")
    }
}

/// Measures the VM core.
pub fn vm_core(_seconds: f64) -> Result<Report, BenchError> {
    Ok(Report)
}
