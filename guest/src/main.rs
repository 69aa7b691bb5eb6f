//! The Understudy built-in guest: a freestanding program that runs in ring 3.
//!
//! The VMM loads this ELF at `IMAGE_GPA`, identity-maps guest memory with user
//! pages, and starts every vCPU at [`_start`] in 64-bit ring 3 with its index
//! in `RDI` and its own stack. Ring 3 runs natively even where ring 0 is
//! emulated, so all of the guest's code is ring-3 code: there is no kernel.
//!
//! The guest reads its [`BootInfo`] page, runs the workload it names, and
//! reports progress in its [`VcpuStatus`] slot. See `understudy-guest-abi` for
//! the interface.
#![no_std]
#![no_main]

extern crate alloc;

mod heap;
mod kv;
mod net;
mod workloads;

use core::arch::asm;
use core::fmt::Write;
use understudy_guest_abi::{
    ABI_VERSION, BOOT_INFO_GPA, BOOT_MAGIC, BootInfo, MESSAGE_LEN, PORT_EXIT, PORT_PANIC,
    PORT_YIELD, STATE_BAD_BOOT_INFO, STATE_PANICKED, VcpuStatus, Workload, status_gpa,
};

/// Entry point of every vCPU; the VMM sets `RDI` to the vCPU index.
///
/// # Safety
/// Only the VMM calls this, with the memory map of `understudy-guest-abi` in place.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text._start")]
pub unsafe extern "C" fn _start(vcpu_index: u64) -> ! {
    let index = vcpu_index as u32;
    // SAFETY: the VMM wrote a BootInfo at BOOT_INFO_GPA, identity-mapped and aligned.
    let boot = unsafe { core::ptr::read_volatile(BOOT_INFO_GPA as *const BootInfo) };
    let status = Status::for_vcpu(index);
    if boot.magic != BOOT_MAGIC || boot.abi_version != ABI_VERSION || index >= boot.vcpu_count {
        status.set_state(STATE_BAD_BOOT_INFO);
        port_out(PORT_EXIT, 2);
        idle(&status);
    }
    match Workload::from_u32(boot.workload) {
        Some(Workload::Idle) => idle(&status),
        Some(Workload::MemTouch) => workloads::memtouch(&boot, index, &status),
        Some(Workload::Counter) => workloads::counter(&boot, index, &status),
        Some(Workload::Kv) if index == 0 => kv::serve(&boot, &status),
        Some(Workload::Kv) => idle(&status),
        None => {
            status.set_state(STATE_BAD_BOOT_INFO);
            port_out(PORT_EXIT, 3);
            idle(&status)
        }
    }
}

/// Yields to the VMM forever (ring 3 has no `HLT`).
pub(crate) fn idle(status: &Status) -> ! {
    status.set_state(understudy_guest_abi::STATE_RUNNING);
    loop {
        status.beat();
        port_out(PORT_YIELD, 0);
    }
}

/// Writes `value` to I/O port `port`: one exit to the VMM.
#[inline(always)]
pub(crate) fn port_out(port: u16, value: u32) {
    // SAFETY: `out` has no memory effects; the VMM allows these ports to ring 3.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack)) };
}

/// Reads the time-stamp counter.
#[inline(always)]
pub(crate) fn rdtsc() -> u64 {
    // SAFETY: RDTSC is allowed in ring 3 (CR4.TSD is clear) and has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// This vCPU's status slot, written with volatile stores so the VMM sees them.
pub(crate) struct Status {
    slot: *mut VcpuStatus,
}

impl Status {
    fn for_vcpu(index: u32) -> Self {
        let status = Self {
            slot: status_gpa(index) as *mut VcpuStatus,
        };
        // SAFETY: the slot is inside the identity-mapped status page, owned by this vCPU.
        unsafe { core::ptr::write_volatile(&raw mut (*status.slot).vcpu_index, index) };
        status
    }

    pub(crate) fn set_state(&self, state: u32) {
        // SAFETY: see `for_vcpu`.
        unsafe { core::ptr::write_volatile(&raw mut (*self.slot).state, state) };
    }

    pub(crate) fn state(&self) -> u32 {
        // SAFETY: see `for_vcpu`.
        unsafe { core::ptr::read_volatile(&raw const (*self.slot).state) }
    }

    pub(crate) fn beat(&self) {
        // SAFETY: see `for_vcpu`.
        unsafe {
            let heartbeat = &raw mut (*self.slot).heartbeat;
            core::ptr::write_volatile(heartbeat, core::ptr::read_volatile(heartbeat) + 1);
        }
    }

    pub(crate) fn set_memtouch_progress(&self, pages_written: u64, passes: u64) {
        // SAFETY: see `for_vcpu`.
        unsafe {
            core::ptr::write_volatile(&raw mut (*self.slot).pages_written, pages_written);
            core::ptr::write_volatile(&raw mut (*self.slot).passes, passes);
        }
        self.beat();
    }

    /// `kv`: commands executed and keys held (in the memtouch fields).
    pub(crate) fn set_kv_progress(&self, commands: u64, keys: u64) {
        self.set_memtouch_progress(commands, keys);
    }

    pub(crate) fn memtouch_progress(&self) -> (u64, u64) {
        // SAFETY: see `for_vcpu`.
        unsafe {
            (
                core::ptr::read_volatile(&raw const (*self.slot).pages_written),
                core::ptr::read_volatile(&raw const (*self.slot).passes),
            )
        }
    }

    /// Reads the counter pair.
    pub(crate) fn counter(&self) -> (u64, u64) {
        // SAFETY: see `for_vcpu`.
        unsafe {
            (
                core::ptr::read_volatile(&raw const (*self.slot).counter),
                core::ptr::read_volatile(&raw const (*self.slot).counter_hash),
            )
        }
    }

    /// Stores the counter pair with one 16-byte store, so that a VMM pausing the
    /// vCPU between two instructions never sees a counter without its hash.
    #[inline(always)]
    pub(crate) fn set_counter(&self, counter: u64, hash: u64) {
        use core::arch::x86_64::{_mm_set_epi64x, _mm_store_si128};
        // SAFETY: the slot is 16-byte aligned (VcpuStatus is align(16), counter at
        // offset 0) and owned by this vCPU; SSE2 is part of x86_64.
        unsafe {
            let pair = _mm_set_epi64x(hash as i64, counter as i64);
            _mm_store_si128(self.slot.cast(), pair);
        }
    }

    fn set_message(&self, message: &[u8]) {
        let len = message.len().min(MESSAGE_LEN);
        for (i, byte) in message[..len].iter().enumerate() {
            // SAFETY: i < MESSAGE_LEN, inside the slot.
            unsafe { core::ptr::write_volatile(&raw mut (*self.slot).message[i], *byte) };
        }
    }
}

/// A fixed buffer for formatting a panic message without an allocator.
struct MessageBuffer {
    bytes: [u8; MESSAGE_LEN],
    len: usize,
}

impl Write for MessageBuffer {
    fn write_str(&mut self, text: &str) -> core::fmt::Result {
        for byte in text.bytes() {
            if self.len == MESSAGE_LEN {
                break;
            }
            self.bytes[self.len] = byte;
            self.len += 1;
        }
        Ok(())
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let index = current_vcpu_index();
    let status = Status {
        slot: status_gpa(index) as *mut VcpuStatus,
    };
    let mut buffer = MessageBuffer {
        bytes: [0; MESSAGE_LEN],
        len: 0,
    };
    // The buffer never fails; a truncated message is still useful.
    let _ = write!(buffer, "{}", info.message());
    if let Some(location) = info.location() {
        let _ = write!(buffer, " at {}:{}", location.file(), location.line());
    }
    status.set_message(&buffer.bytes[..buffer.len]);
    status.set_state(STATE_PANICKED);
    loop {
        port_out(PORT_PANIC, index);
    }
}

/// The vCPU index, recovered from the stack pointer (each vCPU has its own stack).
fn current_vcpu_index() -> u32 {
    let rsp: u64;
    // SAFETY: reads RSP only.
    unsafe { asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack)) };
    (rsp.saturating_sub(understudy_guest_abi::STACKS_GPA) / understudy_guest_abi::STACK_SIZE) as u32
}

// The guest has no libc: the compiler's calls to these land here. They use the
// string instructions, which are fast in ring 3 and cannot be turned back into
// calls to themselves by the optimiser.

/// # Safety
/// As C's `memcpy`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the ranges are valid and do not overlap.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// As C's `memmove`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize) <= (src as usize) || (dest as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: a forward copy is correct when dest does not start inside src.
        return unsafe { memcpy(dest, src, n) };
    }
    // SAFETY: copy backwards (direction flag set, then cleared as the ABI requires).
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _, inout("rdi") dest.add(n - 1) => _,
             inout("rsi") src.add(n - 1) => _, options(nostack));
    }
    dest
}

/// # Safety
/// As C's `memset`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _, in("al") value as u8,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// As C's `memcmp`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller guarantees both ranges are valid for n bytes.
        let (x, y) = unsafe {
            (
                core::ptr::read_volatile(a.add(i)),
                core::ptr::read_volatile(b.add(i)),
            )
        };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// As C's `bcmp`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
