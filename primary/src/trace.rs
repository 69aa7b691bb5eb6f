//! Memory traces of the built-in guest: what a checkpointing primary would
//! send, epoch by epoch, written to a trace file instead of a socket (for the
//! codec experiments: `understudy trace capture --guest`). Epoch 0 holds
//! every non-zero page; each later epoch the pages the dirty log reports,
//! copied while the guest is paused.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use understudy_compress::PageBatch;
use understudy_compress::trace::process::{CaptureLimits, EpochReport};
use understudy_compress::trace::{TraceError, TraceWriter, duration_nanos};
use understudy_vm::memory::{self, MemoryError};
use understudy_vm::progress::{self, ProgressError};
use understudy_vm::{PAGE_SIZE, Vm, VmError, usize_from};

use crate::pages::{read_nonzero_pages, read_pages};

/// A guest trace that could not be captured.
#[derive(Debug, thiserror::Error)]
pub enum GuestTraceError {
    /// The VM failed.
    #[error("the VM failed")]
    Vm(#[from] VmError),
    /// The guest stopped.
    #[error("the guest stopped")]
    Guest(#[from] ProgressError),
    /// Guest memory could not be read.
    #[error("guest memory could not be read")]
    Memory(#[from] MemoryError),
    /// The trace could not be written.
    #[error("the trace could not be written")]
    Trace(#[from] TraceError),
}

/// Captures epochs of the running `vm` into `writer` every `interval` until
/// `limits` or `stop`; `report` hears of each epoch. Returns the epochs
/// written. The guest keeps running between epochs.
pub fn capture_guest_trace(
    vm: &mut Vm,
    interval: Duration,
    limits: CaptureLimits,
    writer: &mut TraceWriter,
    stop: &AtomicBool,
    mut report: impl FnMut(&EpochReport),
) -> Result<u64, GuestTraceError> {
    let resident_pages = usize_from(memory::size(vm.memory()) / PAGE_SIZE);
    let mut batch = PageBatch::new();
    let started = Instant::now();
    let mut next = started;
    while !stop.load(Ordering::Relaxed) && !limits.reached(started, writer.epochs()) {
        progress::check_running(vm)?;
        let at = started.elapsed();
        let paused = Instant::now();
        vm.pause()?;
        batch.clear();
        let taken = (|| -> Result<PageBatch, GuestTraceError> {
            let dirty = vm.harvest_dirty()?;
            let mut batch = std::mem::take(&mut batch);
            if writer.epochs() == 0 {
                read_nonzero_pages(vm, 0..memory::size(vm.memory()), None, &mut batch)?;
                Ok(batch)
            } else {
                let mut addresses: Vec<u64> = dirty.page_addresses().collect();
                addresses.sort_unstable();
                Ok(read_pages(vm, &addresses, batch)?)
            }
        })();
        vm.resume()?;
        batch = taken?;
        let pause = paused.elapsed();
        writer.write_epoch(duration_nanos(at), duration_nanos(pause), &batch)?;
        report(&EpochReport {
            index: writer.epochs() - 1,
            pages: batch.len(),
            pause,
            resident_pages,
        });
        next += interval;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    Ok(writer.epochs())
}
