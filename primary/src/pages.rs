//! Reading guest pages into batches: runs of dirty pages (one copy per run
//! of consecutive pages) and the non-zero pages of a range (a first copy).

use understudy_compress::PageBatch;
use understudy_compress::batch::is_zero_page;
use understudy_vm::free_report::FreePages;
use understudy_vm::memory::{self, MemoryError};
use understudy_vm::{PAGE_SIZE, Vm};

/// Copies the pages at `addresses` (sorted) out of guest memory into
/// `batch` (empty), one copy per run of consecutive pages.
pub fn read_pages(
    vm: &Vm,
    addresses: &[u64],
    mut batch: PageBatch,
) -> Result<PageBatch, MemoryError> {
    let mut index = 0;
    while index < addresses.len() {
        let first = addresses[index];
        let mut count = 1;
        let mut next = first + PAGE_SIZE;
        while index + count < addresses.len() && addresses[index + count] == next {
            count += 1;
            next += PAGE_SIZE;
        }
        let run = batch.push_run_zeroed(first / PAGE_SIZE, count);
        memory::read(vm.memory(), first, run)?;
        index += count;
    }
    Ok(batch)
}

/// Appends to `batch` every page of guest memory in `range` (page-aligned)
/// that is not all zero, nor reported free by the guest (`free`): what a
/// first full copy has to send.
pub fn read_nonzero_pages(
    vm: &Vm,
    range: std::ops::Range<u64>,
    free: Option<&FreePages>,
    batch: &mut PageBatch,
) -> Result<(), MemoryError> {
    let mut page = [0u8; understudy_vm::PAGE_BYTES];
    for address in range.step_by(understudy_vm::PAGE_BYTES) {
        if free.is_some_and(|free| free.contains(address)) {
            continue;
        }
        memory::read(vm.memory(), address, &mut page)?;
        if !is_zero_page(&page) {
            batch.push(address / PAGE_SIZE, &page);
        }
    }
    Ok(())
}
