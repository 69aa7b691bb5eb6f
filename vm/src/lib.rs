//! The Understudy VM core: a KVM virtual machine that runs the built-in
//! ring-3 guest, with complete state capture/restore and dirty-page tracking.
//!
//! - [`memory`]: guest memory (vm-memory, VMM writes tracked per page);
//! - [`dirty`]: the dirty set, KVM's log OR the VMM's bitmap;
//! - [`boot`]: page tables, the embedded guest image, first registers;
//! - [`vcpu`] and [`state`]: vCPU state capture/restore and its encoding;
//! - [`vm`]: the VM, its vCPU threads (`vcpu_thread`), pause/resume;
//! - [`progress`]: guest progress read from its status slots, waiting for
//!   and watching a running guest;
//! - [`bus`]: port-I/O and MMIO dispatch;
//! - [`tap`]: tap devices, the host side of guest network interfaces;
//! - [`virtio_net`]: the guest's network interface (virtio-net over virtio-mmio);
//! - [`workload`]: the guest workload as the user names it;
//! - [`testing`]: whether KVM tests run on this machine.

pub mod boot;
pub mod bus;
pub mod dirty;
pub mod free_report;
pub mod memory;
pub mod postcopy;
pub mod progress;
pub mod ratelimit;
pub mod state;
pub mod tap;
pub mod testing;
pub mod vcpu;
mod vcpu_thread;
pub mod virtio_net;
pub mod vm;
pub mod workload;

/// The guest's source paths, as the build script watches them.
#[cfg(test)]
#[path = "../guest_sources.rs"]
mod guest_sources;

pub use understudy_guest_abi as guest_abi;
pub use understudy_guest_abi::{PAGE_BYTES, PAGE_SIZE, usize_from};
pub use vm::{Vm, VmConfig, VmError, VmEvent};
