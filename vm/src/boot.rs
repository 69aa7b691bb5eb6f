//! Booting the built-in guest: page tables, the guest image, the boot page,
//! and each vCPU's first registers (64-bit ring 3, no kernel at all).
//!
//! On our machines ring 0 is emulated and ring 3 runs natively, so the vCPUs
//! start directly in ring 3: long mode with paging, user code and data
//! segments, and IOPL 3 so the guest's few port writes need no TSS.

use std::io::Cursor;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::KernelLoader;
use linux_loader::loader::elf::Elf;
use understudy_guest_abi::{
    ABI_VERSION, BOOT_INFO_GPA, BOOT_MAGIC, BootInfo, IMAGE_GPA, IMAGE_MAX_SIZE, MAX_VCPUS,
    PAGE_SIZE, STATUS_GPA, STATUS_SLOT_SIZE, VIRTIO_NET_MMIO_GPA, WORK_AREA_GPA, WRITE_LOG_SIZE,
    guest_mac, stack_top,
};
use zerocopy::IntoBytes;

use crate::memory::{self, GuestMemory, MemoryError};
use crate::usize_from;
use crate::workload::WorkloadSpec;

/// The built-in guest, built by `build.rs` from `guest/`.
pub static GUEST_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/understudy-guest"));

/// xxh3 of [`GUEST_IMAGE`]: identifies the guest a VM runs, so that a
/// replication peer or migration target can refuse a different one.
pub fn guest_image_hash() -> u64 {
    xxhash_rust::xxh3::xxh3_64(GUEST_IMAGE)
}

/// Guest-physical address of the PML4; the PDPT and page directories follow.
pub const PML4_GPA: u64 = 0x1000;
const PDPT_GPA: u64 = 0x2000;
const PD_GPA: u64 = 0x3000;
/// Page directories fit between [`PD_GPA`] and [`BOOT_INFO_GPA`], one per GiB.
pub const MAX_IDENTITY_MAPPED: u64 = ((BOOT_INFO_GPA - PD_GPA) / PAGE_SIZE) << 30;

const PTE_PRESENT: u64 = 1;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_HUGE: u64 = 1 << 7;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_AM: u64 = 1 << 18;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_SCE: u64 = 1;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
/// Interrupts enabled, IOPL 3 (ring-3 port I/O without a TSS bitmap), bit 1 set.
const RFLAGS_BOOT: u64 = 0x3202;
const USER_CODE_SELECTOR: u16 = 0x33;
const USER_DATA_SELECTOR: u16 = 0x2b;

/// Errors of preparing the guest for its first run.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The VM has more vCPUs than the memory map has stacks for.
    #[error("the built-in guest supports 1 to {MAX_VCPUS} vCPUs, {0} were requested")]
    TooManyVcpus(u32),
    /// The working set does not fit in guest memory.
    #[error(
        "a working set of {wss} bytes does not fit: guest memory of {memory} bytes leaves {available} bytes for the work area"
    )]
    WorkingSetTooLarge {
        /// The requested working-set size.
        wss: u64,
        /// Guest memory size.
        memory: u64,
        /// Bytes available for the work area.
        available: u64,
    },
    /// The working set is too small to split among the vCPUs.
    #[error("a working set of {wss} bytes gives {vcpus} vCPUs less than a page each")]
    WorkingSetTooSmall {
        /// The requested working-set size.
        wss: u64,
        /// Number of vCPUs.
        vcpus: u32,
    },
    /// More memory than the boot page tables map.
    #[error("the boot page tables map at most {MAX_IDENTITY_MAPPED} bytes, guest has {0}")]
    TooMuchMemory(u64),
    /// Loading the guest ELF failed.
    #[error("failed to load the guest image")]
    LoadImage(#[source] linux_loader::loader::Error),
    /// The guest image is not where the memory map expects it.
    #[error("the guest image entry point {0:#x} is outside the image area")]
    BadEntry(u64),
    /// Writing boot structures into guest memory failed.
    #[error("failed to write boot structures into guest memory")]
    Memory(#[from] MemoryError),
}

/// What the vCPUs need to start: the guest's entry point.
#[derive(Clone, Copy, Debug)]
pub struct BootImage {
    /// Guest-physical (= virtual) address of `_start`.
    pub entry: u64,
}

/// Writes page tables, the guest image and the boot page into fresh memory.
pub fn prepare(
    memory: &GuestMemory,
    vcpus: u32,
    tsc_khz: u32,
    workload: &WorkloadSpec,
) -> Result<BootImage, BootError> {
    let memory_bytes = memory::size(memory);
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(BootError::TooManyVcpus(vcpus));
    }
    let available = memory_bytes.saturating_sub(WORK_AREA_GPA);
    let wss = workload.wss_bytes(available);
    if wss > available || wss > (WRITE_LOG_SIZE * 8) * PAGE_SIZE {
        return Err(BootError::WorkingSetTooLarge {
            wss,
            memory: memory_bytes,
            available,
        });
    }
    if wss / PAGE_SIZE < u64::from(vcpus) {
        return Err(BootError::WorkingSetTooSmall { wss, vcpus });
    }
    write_page_tables(memory, memory_bytes)?;

    let loaded = Elf::load(memory, None, &mut Cursor::new(GUEST_IMAGE), None)
        .map_err(BootError::LoadImage)?;
    let entry = loaded.kernel_load.0;
    if !(IMAGE_GPA..IMAGE_GPA + IMAGE_MAX_SIZE).contains(&entry)
        || loaded.kernel_end > IMAGE_GPA + IMAGE_MAX_SIZE
    {
        return Err(BootError::BadEntry(entry));
    }

    let boot = BootInfo {
        magic: BOOT_MAGIC,
        abi_version: ABI_VERSION,
        vcpu_count: vcpus,
        tsc_khz: u64::from(tsc_khz),
        memory_bytes,
        workload: workload.workload as u32,
        pattern: workload.pattern as u32,
        rate_bytes_per_sec: workload.rate_bytes_per_sec,
        wss_bytes: wss,
        seed: workload.seed,
        flags: workload.flags,
        counter_spin: workload.counter_spin,
        net_mac: net_mac_field(workload),
        net_ipv4: workload.ipv4.octets(),
        net_prefix_len: u32::from(workload.prefix_len),
        kv_port: u32::from(workload.port),
        free_percent: workload.free_percent,
    };
    memory::write(memory, BOOT_INFO_GPA, boot.as_bytes())?;
    memory::write(
        memory,
        STATUS_GPA,
        &vec![0; usize_from(STATUS_SLOT_SIZE * u64::from(vcpus))],
    )?;
    Ok(BootImage { entry })
}

/// The boot page's MAC field: the guest's MAC in bytes 0..6.
fn net_mac_field(workload: &WorkloadSpec) -> [u8; 8] {
    let mut field = [0; 8];
    field[..6].copy_from_slice(&guest_mac(workload.ipv4.octets()));
    field
}

/// Identity-maps all guest memory with 2 MiB user pages, and the 2 MiB page
/// of device registers at [`VIRTIO_NET_MMIO_GPA`] (no memory behind it: every
/// access exits to the VMM).
fn write_page_tables(memory: &GuestMemory, memory_bytes: u64) -> Result<(), BootError> {
    if memory_bytes > MAX_IDENTITY_MAPPED {
        return Err(BootError::TooMuchMemory(memory_bytes));
    }
    let flags = PTE_PRESENT | PTE_WRITABLE | PTE_USER;
    memory::write(memory, PML4_GPA, (PDPT_GPA | flags).as_bytes())?;
    let gibs = memory_bytes.div_ceil(1 << 30);
    for gib in 0..gibs {
        let pd = PD_GPA + gib * PAGE_SIZE;
        memory::write(memory, PDPT_GPA + gib * 8, (pd | flags).as_bytes())?;
        let entries: Vec<u64> = (0..512u64)
            .map(|i| (gib << 30) + (i << 21))
            .map(|base| {
                if base < memory_bytes {
                    base | flags | PTE_HUGE
                } else {
                    0
                }
            })
            .collect();
        memory::write(memory, pd, entries.as_bytes())?;
    }
    let device_gib = VIRTIO_NET_MMIO_GPA >> 30;
    let device_pd = PD_GPA + device_gib * PAGE_SIZE;
    memory::write(
        memory,
        PDPT_GPA + device_gib * 8,
        (device_pd | flags).as_bytes(),
    )?;
    let device_entry = (VIRTIO_NET_MMIO_GPA & !((2 << 20) - 1)) | flags | PTE_HUGE;
    let index = (VIRTIO_NET_MMIO_GPA >> 21) & 511;
    memory::write(memory, device_pd + index * 8, device_entry.as_bytes())?;
    Ok(())
}

/// First general-purpose registers of vCPU `index`.
pub fn initial_regs(image: &BootImage, index: u32) -> kvm_regs {
    kvm_regs {
        rip: image.entry,
        rsp: stack_top(index),
        rdi: u64::from(index),
        rflags: RFLAGS_BOOT,
        ..Default::default()
    }
}

/// First special registers: 64-bit ring 3 with paging on.
pub fn initial_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: USER_CODE_SELECTOR,
        type_: 0xb,
        present: 1,
        dpl: 3,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: USER_DATA_SELECTOR,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ss = data;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG;
    sregs.cr3 = PML4_GPA;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE;
    sregs
}

#[cfg(test)]
mod guest_build_tests {
    use crate::guest_sources;
    use std::path::{Path, PathBuf};

    fn guest_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../guest")
            .canonicalize()
            .expect("the guest directory")
    }

    fn covered(sources: &[PathBuf], path: &Path) -> bool {
        sources.iter().any(|source| {
            let source = source.canonicalize().unwrap_or_else(|_| source.clone());
            path.starts_with(&source)
        })
    }

    #[test]
    fn a_change_to_the_key_value_store_rebuilds_the_guest() {
        let guest = guest_dir();

        let sources = guest_sources::guest_sources(&guest);

        assert!(
            covered(&sources, &guest.join("kv/src/lib.rs")),
            "{sources:?}"
        );
        assert!(
            covered(&sources, &guest.join("kv/Cargo.toml")),
            "{sources:?}"
        );
    }

    #[test]
    fn every_local_crate_of_the_guest_is_watched() {
        // Arrange: what cargo itself says the guest is built from.
        let guest = guest_dir();
        let output = std::process::Command::new(env!("CARGO"))
            .args(["metadata", "--format-version", "1", "--offline", "--locked"])
            .current_dir(&guest)
            .output()
            .expect("run cargo metadata");
        assert!(
            output.status.success(),
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let metadata = String::from_utf8_lossy(&output.stdout);
        // Local packages have "source":null; their manifest path follows.
        let local_manifests: Vec<PathBuf> = metadata
            .split("\"source\":null")
            .skip(1)
            .filter_map(|rest| {
                let (_, after) = rest.split_once("\"manifest_path\":\"")?;
                let (path, _) = after.split_once('"')?;
                Some(PathBuf::from(path))
            })
            .collect();

        // Act
        let sources = guest_sources::guest_sources(&guest);

        // Assert: each local crate's manifest and sources are watched.
        assert!(local_manifests.len() >= 3, "{metadata}");
        for manifest in &local_manifests {
            let crate_dir = manifest.parent().expect("a crate directory");
            assert!(
                covered(&sources, manifest),
                "{} is not watched",
                manifest.display()
            );
            assert!(
                covered(&sources, &crate_dir.join("src")),
                "{} is not watched",
                crate_dir.join("src").display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory;

    #[test]
    fn page_tables_map_guest_memory_as_user_huge_pages() {
        let memory = memory::create(1536 << 20).expect("map");
        write_page_tables(&memory, 1536 << 20).expect("fits");
        let pdpt1: u64 = memory::read_value(&memory, PDPT_GPA + 8).expect("read");
        let last_pd = pdpt1 & !0xfff;
        let last_mapped: u64 = memory::read_value(&memory, last_pd + 255 * 8).expect("read");
        let first_unmapped: u64 = memory::read_value(&memory, last_pd + 256 * 8).expect("read");
        assert_eq!(
            last_mapped,
            ((1 << 30) + (255 << 21)) | PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_HUGE
        );
        assert_eq!(first_unmapped, 0);
    }

    #[test]
    fn the_embedded_guest_is_an_elf_linked_at_the_image_address() {
        assert_eq!(&GUEST_IMAGE[..4], b"\x7fELF");
        let memory = memory::create(memory::MIN_MEMORY).expect("map");
        let image = prepare(&memory, 1, 1_000_000, &WorkloadSpec::default()).expect("boots");
        assert_eq!(image.entry, IMAGE_GPA);
    }

    #[test]
    fn oversized_working_sets_are_refused() {
        let memory = memory::create(memory::MIN_MEMORY).expect("map");
        let workload: WorkloadSpec = "memtouch:wss=1G".parse().expect("valid spec");
        let result = prepare(&memory, 1, 1_000_000, &workload);
        assert!(matches!(result, Err(BootError::WorkingSetTooLarge { .. })));
    }
}
