//! Guest memory: anonymous mappings split into KVM memory slots, with
//! vm-memory's `AtomicBitmap` recording every write the VMM makes.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use xxhash_rust::xxh3::Xxh3;

use crate::usize_from;

/// Guest memory as the VMM holds it; VMM writes are tracked per page.
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One region of [`GuestMemory`]; region `i` is KVM memory slot `i`.
pub type GuestRegion = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// Largest region (and so KVM slot). Larger guests get several slots, which
/// keeps each dirty-log bitmap small and exercises multi-slot paths.
pub const MAX_REGION_SIZE: u64 = 1 << 30;
/// Guest memory must be a multiple of this (the page tables use 2 MiB pages).
pub const MEMORY_ALIGNMENT: u64 = 2 << 20;
/// Smallest guest: the fixed layout plus a 4 MiB work area.
pub const MIN_MEMORY: u64 = understudy_guest_abi::WORK_AREA_GPA + (4 << 20);
/// Largest guest: what the boot page tables identity-map (one directory per GiB).
pub const MAX_MEMORY: u64 = 4 << 30;

/// Errors of guest memory set-up and access.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is not usable.
    #[error(
        "guest memory of {bytes} bytes is not supported: it must be a multiple of 2 MiB between {} MiB and {} GiB",
        MIN_MEMORY >> 20,
        MAX_MEMORY >> 30
    )]
    BadSize {
        /// The requested size.
        bytes: u64,
    },
    /// Mapping the memory failed.
    #[error("failed to map {bytes} bytes of guest memory")]
    Map {
        /// The requested size.
        bytes: u64,
        /// vm-memory's error.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// A guest-physical access fell outside guest memory.
    #[error("guest memory access of {len} bytes at {gpa:#x} failed")]
    Access {
        /// The guest-physical address.
        gpa: u64,
        /// The access length.
        len: usize,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// The `(guest-physical start, size)` of each region for `bytes` of memory.
pub fn region_layout(bytes: u64) -> Result<Vec<(u64, u64)>, MemoryError> {
    if !bytes.is_multiple_of(MEMORY_ALIGNMENT) || !(MIN_MEMORY..=MAX_MEMORY).contains(&bytes) {
        return Err(MemoryError::BadSize { bytes });
    }
    let mut layout = Vec::new();
    let mut start = 0;
    while start < bytes {
        let size = (bytes - start).min(MAX_REGION_SIZE);
        layout.push((start, size));
        start += size;
    }
    Ok(layout)
}

/// Maps `bytes` of zeroed guest memory.
pub fn create(bytes: u64) -> Result<GuestMemory, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = region_layout(bytes)?
        .into_iter()
        .map(|(start, size)| (GuestAddress(start), usize_from(size)))
        .collect();
    GuestMemory::from_ranges(&ranges).map_err(|source| MemoryError::Map { bytes, source })
}

/// Total bytes of guest memory.
pub fn size(memory: &GuestMemory) -> u64 {
    memory.iter().map(|region| region.len()).sum()
}

/// Copies guest memory at `gpa` into `buffer`.
pub fn read(memory: &GuestMemory, gpa: u64, buffer: &mut [u8]) -> Result<(), MemoryError> {
    memory
        .read_slice(buffer, GuestAddress(gpa))
        .map_err(|source| MemoryError::Access {
            gpa,
            len: buffer.len(),
            source,
        })
}

/// Copies `data` into guest memory at `gpa`; the pages are marked dirty.
pub fn write(memory: &GuestMemory, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
    memory
        .write_slice(data, GuestAddress(gpa))
        .map_err(|source| MemoryError::Access {
            gpa,
            len: data.len(),
            source,
        })
}

/// Reads a plain-data value from guest memory.
pub fn read_value<T: zerocopy::FromBytes + zerocopy::IntoBytes>(
    memory: &GuestMemory,
    gpa: u64,
) -> Result<T, MemoryError> {
    let mut value = T::new_zeroed();
    read(memory, gpa, value.as_mut_bytes())?;
    Ok(value)
}

/// Chunk size for whole-memory passes (hashing, copying).
const CHUNK: usize = 1 << 20;

/// xxh3-64 of all guest memory, region by region in address order; pages
/// the guest reported free (see [`crate::free_report`]) count as zeroes,
/// so two copies that differ only in such pages hash the same.
pub fn hash(memory: &GuestMemory) -> Result<u64, MemoryError> {
    hash_overlaid(memory, |_, _| {})
}

/// The hash [`hash`] would give after `overlay` changed memory: `overlay`
/// is called with each chunk read (its guest address and bytes, in address
/// order) and may change the bytes before they are hashed. Memory itself
/// is not written.
pub fn hash_overlaid(
    memory: &GuestMemory,
    mut overlay: impl FnMut(u64, &mut [u8]),
) -> Result<u64, MemoryError> {
    let mut hasher = Xxh3::new();
    // Pages the guest reported free count as zero (see `free_report`).
    let mut free = crate::free_report::HashMask::default();
    let memory_bytes = size(memory);
    for_each_chunk(memory, |address, chunk| {
        overlay(address, chunk);
        free.apply(memory_bytes, address, chunk);
        hasher.update(chunk);
        Ok(())
    })?;
    Ok(hasher.digest())
}

/// xxh3-64 of each page of guest memory, region by region in address
/// order (a post-copy's target checks every page against them).
pub fn page_hashes(memory: &GuestMemory) -> Result<Vec<u64>, MemoryError> {
    let mut hashes = Vec::with_capacity(usize_from(size(memory) / crate::PAGE_SIZE));
    for_each_chunk(memory, |_, chunk| {
        hashes.extend(
            chunk
                .chunks(crate::PAGE_BYTES)
                .map(xxhash_rust::xxh3::xxh3_64),
        );
        Ok(())
    })?;
    Ok(hashes)
}

/// Reads all of `memory` chunk by chunk, in address order, and hands each
/// chunk (its guest address and bytes) to `visit`.
fn for_each_chunk(
    memory: &GuestMemory,
    mut visit: impl FnMut(u64, &mut [u8]) -> Result<(), MemoryError>,
) -> Result<(), MemoryError> {
    let mut buffer = vec![0u8; CHUNK];
    for region in memory.iter() {
        let start = region.start_addr().0;
        let mut offset = 0;
        while offset < region.len() {
            let len = usize_from((region.len() - offset).min(CHUNK as u64));
            read(memory, start + offset, &mut buffer[..len])?;
            visit(start + offset, &mut buffer[..len])?;
            offset += len as u64;
        }
    }
    Ok(())
}

/// Copies all of `source` into `destination` (two memories of the same
/// layout, from [`create`] with the same size).
pub fn copy_all(source: &GuestMemory, destination: &GuestMemory) -> Result<(), MemoryError> {
    for_each_chunk(source, |address, chunk| write(destination, address, chunk))
}

/// Whether page `page_number` (guest address `page_number * PAGE_SIZE`) is
/// inside guest memory.
pub fn holds_page(memory: &GuestMemory, page_number: u64) -> bool {
    page_number
        .checked_mul(crate::PAGE_SIZE)
        .is_some_and(|address| {
            memory.check_range(GuestAddress(address), usize_from(crate::PAGE_SIZE))
        })
}

/// Forgets the VMM's own writes so far (after loading an image or a snapshot,
/// whose pages are not "dirty" relative to the state they establish).
pub fn clear_vmm_dirty_bits(memory: &GuestMemory) {
    for region in memory.iter() {
        let mapping: &vm_memory::MmapRegion<AtomicBitmap> = region;
        mapping.bitmap().reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_of_small_memory_is_one_region() {
        let layout = region_layout(512 << 20).expect("valid size");
        assert_eq!(layout, vec![(0, 512 << 20)]);
    }

    #[test]
    fn layout_splits_at_one_gib() {
        let layout = region_layout(2560 << 20).expect("valid size");
        assert_eq!(
            layout,
            vec![(0, 1 << 30), (1 << 30, 1 << 30), (2 << 30, 512 << 20)]
        );
    }

    #[test]
    fn layout_rejects_unaligned_sizes() {
        assert!(matches!(
            region_layout((512 << 20) + crate::PAGE_SIZE),
            Err(MemoryError::BadSize { .. })
        ));
    }

    #[test]
    fn layout_rejects_tiny_memory() {
        assert!(matches!(
            region_layout(2 << 20),
            Err(MemoryError::BadSize { .. })
        ));
    }

    #[test]
    fn hash_changes_when_one_byte_changes() {
        let memory = create(MIN_MEMORY).expect("map");
        let before = hash(&memory).expect("hash");
        write(&memory, 0x12345, &[1]).expect("write");
        let after = hash(&memory).expect("hash");
        assert_ne!(before, after);
    }

    #[test]
    fn vmm_writes_are_marked_and_can_be_cleared() {
        let memory = create(MIN_MEMORY).expect("map");
        write(&memory, 0x3000, &[1, 2, 3]).expect("write");
        let region = memory.iter().next().expect("one region");
        let mapping: &vm_memory::MmapRegion<AtomicBitmap> = region;
        assert!(mapping.bitmap().is_addr_set(0x3000));
        clear_vmm_dirty_bits(&memory);
        assert!(!mapping.bitmap().is_addr_set(0x3000));
    }
}
