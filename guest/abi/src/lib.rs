//! The paravirtual interface between the Understudy VMM and its built-in guest.
//!
//! Both sides compile this crate: the VMM (with `std`) and the freestanding
//! guest (`#![no_std]`). Everything the two share is here: where things sit
//! in guest-physical memory, the layout of the boot and status pages, the
//! I/O ports the guest uses to get the VMM's attention, and the counter
//! workload's hash chain (so the VMM can verify that a restored guest
//! continued exactly where it stopped).
//!
//! # Guest-physical memory map
//!
//! | address range              | contents                                          |
//! |----------------------------|---------------------------------------------------|
//! | `0x1000..0x4000`+          | page tables (PML4, PDPT, PDs; 2 MiB pages, U/S=1) |
//! | [`BOOT_INFO_GPA`]          | [`BootInfo`], written by the VMM before boot      |
//! | [`STATUS_GPA`]             | one [`VcpuStatus`] per vCPU, written by the guest |
//! | [`STACKS_GPA`]             | one [`STACK_SIZE`] ring-3 stack per vCPU          |
//! | [`IMAGE_GPA`]              | the guest image (ELF `PT_LOAD` segments)          |
//! | [`WRITE_LOG_GPA`]          | optional bitmap of work-area pages the guest wrote|
//! | [`FREE_REPORT_GPA`]        | bitmap of work-area pages the guest freed         |
//! | [`WORK_AREA_GPA`]`..end`   | the work area the workloads dirty (`kv`: its heap)|
//! | [`VIRTIO_NET_MMIO_GPA`]    | the virtio-net device's virtio-mmio registers     |
//!
//! # Talking to the VMM
//!
//! The guest runs in ring 3 and never exits on the hot path: progress goes into
//! its [`VcpuStatus`] slot, which the VMM reads from shared memory. Port writes
//! (an `out` instruction, one VM exit of ~30 µs on our machines) are kept for
//! rare events: [`PORT_YIELD`] (idle, the equivalent of `HLT`), [`PORT_PANIC`]
//! and [`PORT_EXIT`].
#![no_std]

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Magic value at the start of [`BootInfo`]: "USTUDYG1".
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"USTUDYG1");
/// Version of this interface; the guest refuses a boot page of another version.
pub const ABI_VERSION: u32 = 3;

/// Size of a guest page, the unit of dirty tracking, checkpoints, codecs and
/// formats: defined here once for the whole project.
pub const PAGE_SIZE: u64 = 4096;
/// [`PAGE_SIZE`] as a length in bytes (for buffers and slices).
pub const PAGE_BYTES: usize = usize_from(PAGE_SIZE);

// Guest and VMM are 64-bit (x86_64): a usize holds any u64.
const _: () = assert!(usize::BITS == u64::BITS);

/// `value` as a `usize`: lossless, since both are 64 bits wide here (checked
/// at compile time above). For guest addresses, sizes and counts that
/// arrive as `u64` and index memory.
#[allow(clippy::cast_possible_truncation)] // usize is 64 bits: asserted above.
pub const fn usize_from(value: u64) -> usize {
    value as usize
}

/// Guest-physical address of the boot information page.
pub const BOOT_INFO_GPA: u64 = 0x8000;
/// Guest-physical address of the first [`VcpuStatus`] slot.
pub const STATUS_GPA: u64 = 0x9000;
/// Bytes reserved for each [`VcpuStatus`] slot.
pub const STATUS_SLOT_SIZE: u64 = 256;
/// Most vCPUs the memory map has room for.
pub const MAX_VCPUS: u32 = 16;
/// Guest-physical address of the first vCPU stack (the lowest address).
pub const STACKS_GPA: u64 = 0x10000;
/// Size of each vCPU's stack.
pub const STACK_SIZE: u64 = 0x8000;
/// Guest-physical address where the guest image is linked and loaded.
pub const IMAGE_GPA: u64 = 0x10_0000;
/// Most bytes the guest image may occupy.
pub const IMAGE_MAX_SIZE: u64 = 0x10_0000;
/// Guest-physical address of the guest's write log (one bit per work-area page).
pub const WRITE_LOG_GPA: u64 = 0x20_0000;
/// Bytes reserved for the write log: enough for a 64 GiB work area.
pub const WRITE_LOG_SIZE: u64 = 0x20_0000;
/// Guest-physical address of the free-page report: one bit per work-area
/// page (bit `p % 64` of little-endian word `p / 64`), set while the guest
/// does not care what the page holds (freed heap, a freed working set).
/// The last quarter of the write log's room: the write log never reaches it
/// (guest memory is at most 4 GiB), and it covers 16 GiB of work area.
///
/// The rule the guest keeps: it clears a page's bit *before* it writes the
/// page again, and sets it only once it will not read the page before
/// writing it. The VMM reads the report only while the guest is paused, so
/// at any checkpoint a page whose bit is set may be skipped: whatever the
/// other side holds for it (zero, or older contents) is as good.
pub const FREE_REPORT_GPA: u64 = WRITE_LOG_GPA + 0x18_0000;
/// Bytes reserved for the free-page report.
pub const FREE_REPORT_SIZE: u64 = 0x8_0000;

/// Guest-physical address where the work area starts.
pub const WORK_AREA_GPA: u64 = 0x40_0000;

/// Guest-physical address of the virtio-net device's virtio-mmio registers:
/// above the largest guest memory (4 GiB), in the 2 MiB page the boot page
/// tables map for devices. No memory slot covers it, so every access exits.
pub const VIRTIO_NET_MMIO_GPA: u64 = 0x1_0000_0000;
/// Size of the virtio-mmio register window (registers and config space).
pub const VIRTIO_NET_MMIO_SIZE: u64 = 0x1000;

/// Port the guest writes to when it has nothing to do (its `HLT`).
pub const PORT_YIELD: u16 = 0x510;
/// Port the guest writes to after it panicked; the message is in its status slot.
pub const PORT_PANIC: u16 = 0x511;
/// Port the guest writes an exit code to when its workload is finished.
pub const PORT_EXIT: u16 = 0x512;

/// Initial RSP for vCPU `index`: as if `_start` had just been called
/// (`RSP + 8` is 16-byte aligned, as the System V ABI expects at entry).
pub const fn stack_top(index: u32) -> u64 {
    STACKS_GPA + (index as u64 + 1) * STACK_SIZE - 8
}

/// Guest-physical address of vCPU `index`'s status slot.
pub const fn status_gpa(index: u32) -> u64 {
    STATUS_GPA + index as u64 * STATUS_SLOT_SIZE
}

/// The workload the guest runs, chosen at boot.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Do nothing: yield to the VMM in a loop.
    Idle = 0,
    /// Dirty the work area at a target rate with a [`Pattern`].
    MemTouch = 1,
    /// Advance a hash-chained counter ([`counter_step`]).
    Counter = 2,
    /// Serve a key-value store over TCP in the Redis protocol (RESP), on the
    /// virtio-net device, at [`BootInfo::net_ipv4`] and [`BootInfo::kv_port`].
    Kv = 3,
}

impl Workload {
    /// Decodes a workload number from the boot page.
    pub const fn from_u32(value: u32) -> Option<Self> {
        match value {
            0 => Some(Self::Idle),
            1 => Some(Self::MemTouch),
            2 => Some(Self::Counter),
            3 => Some(Self::Kv),
            _ => None,
        }
    }
}

/// How `memtouch` chooses and fills pages.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Pages in address order, each filled with a structured (compressible) pattern.
    Seq = 0,
    /// Uniformly random pages, each filled with pseudo-random (incompressible) data.
    Random = 1,
    /// 90 % of writes go to the first 10 % of the pages, filled with pseudo-random data.
    Hotspot = 2,
    /// Random pages with only [`SPARSE_WORDS`] words changed: the case delta encoding wins.
    Sparse = 3,
    /// Pages in address order rewritten with zeros.
    Zero = 4,
}

/// Words changed per page by [`Pattern::Sparse`].
pub const SPARSE_WORDS: u64 = 8;

impl Pattern {
    /// Decodes a pattern number from the boot page.
    pub const fn from_u32(value: u32) -> Option<Self> {
        match value {
            0 => Some(Self::Seq),
            1 => Some(Self::Random),
            2 => Some(Self::Hotspot),
            3 => Some(Self::Sparse),
            4 => Some(Self::Zero),
            _ => None,
        }
    }
}

/// Flag in [`BootInfo::flags`]: keep the write log at [`WRITE_LOG_GPA`].
pub const FLAG_WRITE_LOG: u32 = 1;
/// Flag in [`BootInfo::flags`]: the guest keeps the free-page report at
/// [`FREE_REPORT_GPA`] (the VMM may skip the pages it names).
pub const FLAG_FREE_REPORT: u32 = 2;
/// Flag in [`BootInfo::flags`], memtouch with [`FLAG_FREE_REPORT`]: free
/// and take back the freed share every other second (without it, the share
/// is freed once, after the first second, for good).
pub const FLAG_FREE_CHURN: u32 = 4;

/// The boot page, written by the VMM at [`BOOT_INFO_GPA`] before the first run.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct BootInfo {
    /// Must be [`BOOT_MAGIC`].
    pub magic: u64,
    /// Must be [`ABI_VERSION`].
    pub abi_version: u32,
    /// Number of vCPUs started; each runs the workload on its share of the work area.
    pub vcpu_count: u32,
    /// TSC frequency in kHz, for rate control.
    pub tsc_khz: u64,
    /// Total guest memory in bytes.
    pub memory_bytes: u64,
    /// A [`Workload`] number.
    pub workload: u32,
    /// A [`Pattern`] number (memtouch only).
    pub pattern: u32,
    /// Target dirtying rate in bytes per second over all vCPUs; 0 means as fast as possible.
    pub rate_bytes_per_sec: u64,
    /// Working-set size in bytes, starting at [`WORK_AREA_GPA`].
    pub wss_bytes: u64,
    /// Seed for the pseudo-random generators.
    pub seed: u64,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Counter workload: busy-loop iterations between two steps (sets its pace).
    pub counter_spin: u32,
    /// The network interface's MAC address (bytes 0..6; 6 and 7 are zero).
    pub net_mac: [u8; 8],
    /// The guest's IPv4 address, octets in order (`[10, 0, 0, 10]`).
    pub net_ipv4: [u8; 4],
    /// Length of the network prefix of [`BootInfo::net_ipv4`].
    pub net_prefix_len: u32,
    /// `kv`: the TCP port it listens on.
    pub kv_port: u32,
    /// memtouch with [`FLAG_FREE_REPORT`]: the share of each vCPU's working
    /// set (percent) it frees (reporting it free) after the first second,
    /// for good or, with [`FLAG_FREE_CHURN`], every other second, writing
    /// it again in between (clearing the report first).
    pub free_percent: u32,
}

impl BootInfo {
    /// The network interface's MAC address.
    pub const fn mac(&self) -> [u8; 6] {
        let m = self.net_mac;
        [m[0], m[1], m[2], m[3], m[4], m[5]]
    }
}

/// The MAC address of a guest with IPv4 address `ipv4`: `52:54` (locally
/// administered, as QEMU's) followed by the four octets, so the address
/// follows from the IP and a takeover announces the MAC the guest had.
pub const fn guest_mac(ipv4: [u8; 4]) -> [u8; 6] {
    [0x52, 0x54, ipv4[0], ipv4[1], ipv4[2], ipv4[3]]
}

/// Guest state in [`VcpuStatus::state`]: not started yet.
pub const STATE_BOOTING: u32 = 0;
/// Guest state: running its workload.
pub const STATE_RUNNING: u32 = 1;
/// Guest state: stopped after a panic; see [`VcpuStatus::message`].
pub const STATE_PANICKED: u32 = 2;
/// Guest state: the boot page was not valid.
pub const STATE_BAD_BOOT_INFO: u32 = 3;

/// Bytes of panic message kept in [`VcpuStatus::message`].
pub const MESSAGE_LEN: usize = 128;

/// Progress of one vCPU, written by the guest at [`status_gpa`] and read by the VMM.
///
/// `counter` and `counter_hash` are written together by one 16-byte store, so a
/// VMM that pauses the vCPU always sees a consistent pair.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct VcpuStatus {
    /// Counter workload: steps taken.
    pub counter: u64,
    /// Counter workload: hash chain value after `counter` steps.
    pub counter_hash: u64,
    /// One of the `STATE_*` values.
    pub state: u32,
    /// The vCPU index this slot belongs to.
    pub vcpu_index: u32,
    /// Increases while the guest makes progress (any workload).
    pub heartbeat: u64,
    /// Memtouch: pages written so far.
    pub pages_written: u64,
    /// Memtouch: complete passes over this vCPU's share of the working set.
    pub passes: u64,
    /// Panic message (UTF-8, NUL-padded).
    pub message: [u8; MESSAGE_LEN],
}

const _: () = assert!(core::mem::size_of::<VcpuStatus>() as u64 <= STATUS_SLOT_SIZE);
const _: () = assert!(core::mem::size_of::<BootInfo>() as u64 <= PAGE_SIZE);

/// Hash-chain seed for vCPU `index`: the state before the counter's first step.
pub const fn counter_seed(seed: u64, index: u32) -> u64 {
    mix64(seed ^ ((index as u64) << 32) ^ 0x5555_aaaa_0f0f_f0f0)
}

/// One step of the counter workload: step number `n` (the new counter value)
/// applied to the previous hash `hash`.
#[inline(always)]
pub const fn counter_step(hash: u64, n: u64) -> u64 {
    mix64(hash ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// A 64-bit finaliser with full avalanche (the splitmix64 / murmur3 mixer).
#[inline(always)]
pub const fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Replays the counter chain from `(from_counter, from_hash)` to `to_counter`.
///
/// Returns `None` when `to_counter < from_counter` (a counter never goes back).
pub fn counter_replay(from_counter: u64, from_hash: u64, to_counter: u64) -> Option<u64> {
    if to_counter < from_counter {
        return None;
    }
    let mut hash = from_hash;
    let mut n = from_counter;
    while n < to_counter {
        n += 1;
        hash = counter_step(hash, n);
    }
    Some(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_replay_of_zero_steps_is_identity() {
        assert_eq!(counter_replay(7, 42, 7), Some(42));
    }

    #[test]
    fn counter_replay_refuses_to_go_back() {
        assert_eq!(counter_replay(8, 42, 7), None);
    }

    #[test]
    fn counter_replay_composes() {
        let start = counter_seed(1, 0);
        let mid = counter_replay(0, start, 1000).expect("forward");
        let end_direct = counter_replay(0, start, 2000).expect("forward");
        let end_via_mid = counter_replay(1000, mid, 2000).expect("forward");
        assert_eq!(end_direct, end_via_mid);
    }

    #[test]
    fn counter_step_depends_on_step_number() {
        assert_ne!(counter_step(5, 1), counter_step(5, 2));
    }

    #[test]
    fn workload_and_pattern_numbers_round_trip() {
        assert_eq!(
            Workload::from_u32(Workload::Counter as u32),
            Some(Workload::Counter)
        );
        assert_eq!(Pattern::from_u32(Pattern::Zero as u32), Some(Pattern::Zero));
        assert_eq!(Pattern::from_u32(99), None);
    }
}
