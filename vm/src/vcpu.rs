//! One vCPU: its first registers, and capture and restore of its complete state.

use kvm_bindings::{CpuId, Msrs, kvm_msr_entry};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::boot::{self, BootImage};
use crate::state::VcpuState;

/// Errors of a vCPU operation; each names the KVM call that failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {index}: {operation} failed")]
    Kvm {
        /// The vCPU index.
        index: u32,
        /// The operation (e.g. "KVM_GET_SREGS").
        operation: &'static str,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than given.
    #[error("vCPU {index}: KVM would not {operation} MSR {msr:#x} ({done} of {total} done)")]
    Msr {
        /// The vCPU index.
        index: u32,
        /// "read" or "write".
        operation: &'static str,
        /// The first MSR KVM refused.
        msr: u32,
        /// MSRs processed before it.
        done: usize,
        /// MSRs asked for.
        total: usize,
    },
    /// Building an MSR or CPUID list failed.
    #[error("vCPU {index}: could not build a {what} list")]
    List {
        /// The vCPU index.
        index: u32,
        /// "MSR" or "CPUID".
        what: &'static str,
    },
}

/// Most CPUID entries we ask KVM for.
const MAX_CPUID_ENTRIES: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;

/// A vCPU and the MSRs it saves.
pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
    msr_indices: Vec<u32>,
}

impl Vcpu {
    /// Creates vCPU `index` with KVM's supported CPUID table.
    pub fn new(
        vm: &VmFd,
        index: u32,
        cpuid: &CpuId,
        msr_indices: Vec<u32>,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Kvm {
                index,
                operation: "KVM_CREATE_VCPU",
                source,
            })?;
        let mut cpuid = cpuid.clone();
        for entry in cpuid.as_mut_slice() {
            if entry.function == 1 {
                // Initial APIC ID in EBX[31:24], so each vCPU can tell itself apart.
                entry.ebx = (entry.ebx & 0x00ff_ffff) | (index << 24);
            }
        }
        let vcpu = Self {
            index,
            fd,
            msr_indices,
        };
        vcpu.fd
            .set_cpuid2(&cpuid)
            .map_err(|source| vcpu.kvm("KVM_SET_CPUID2", source))?;
        Ok(vcpu)
    }

    /// Sets which MSRs [`Vcpu::capture`] saves.
    pub fn set_msr_indices(&mut self, msr_indices: Vec<u32>) {
        self.msr_indices = msr_indices;
    }

    /// The vCPU index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The KVM vCPU, for the run loop.
    pub fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    fn kvm(&self, operation: &'static str, source: kvm_ioctls::Error) -> VcpuError {
        VcpuError::Kvm {
            index: self.index,
            operation,
            source,
        }
    }

    /// The TSC frequency the vCPU runs at.
    pub fn tsc_khz(&self) -> Result<u32, VcpuError> {
        self.fd
            .get_tsc_khz()
            .map_err(|source| self.kvm("KVM_GET_TSC_KHZ", source))
    }

    /// Sets the registers for the guest's first instruction.
    pub fn configure_boot(&self, image: &BootImage) -> Result<(), VcpuError> {
        let sregs = self
            .fd
            .get_sregs()
            .map_err(|source| self.kvm("KVM_GET_SREGS", source))?;
        self.fd
            .set_sregs(&boot::initial_sregs(sregs))
            .map_err(|source| self.kvm("KVM_SET_SREGS", source))?;
        self.fd
            .set_regs(&boot::initial_regs(image, self.index))
            .map_err(|source| self.kvm("KVM_SET_REGS", source))
    }

    /// Captures the vCPU's complete state. The vCPU must not be running.
    pub fn capture(&self) -> Result<VcpuState, VcpuError> {
        let regs = self
            .fd
            .get_regs()
            .map_err(|source| self.kvm("KVM_GET_REGS", source))?;
        let sregs = self
            .fd
            .get_sregs()
            .map_err(|source| self.kvm("KVM_GET_SREGS", source))?;
        let xsave = self
            .fd
            .get_xsave()
            .map_err(|source| self.kvm("KVM_GET_XSAVE", source))?;
        let xcrs = self
            .fd
            .get_xcrs()
            .map_err(|source| self.kvm("KVM_GET_XCRS", source))?;
        let debug_regs = self
            .fd
            .get_debug_regs()
            .map_err(|source| self.kvm("KVM_GET_DEBUGREGS", source))?;
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(|source| self.kvm("KVM_GET_VCPU_EVENTS", source))?;
        let mp_state = self
            .fd
            .get_mp_state()
            .map_err(|source| self.kvm("KVM_GET_MP_STATE", source))?;
        let cpuid = self
            .fd
            .get_cpuid2(MAX_CPUID_ENTRIES)
            .map_err(|source| self.kvm("KVM_GET_CPUID2", source))?;
        Ok(VcpuState {
            tsc_khz: self.tsc_khz()?,
            regs,
            sregs,
            xsave: xsave.region.to_vec(),
            xcrs,
            debug_regs,
            events,
            mp_state,
            msrs: self.read_msrs()?,
            cpuid: cpuid.as_slice().to_vec(),
        })
    }

    fn read_msrs(&self) -> Result<Vec<kvm_msr_entry>, VcpuError> {
        let mut msrs = msr_list(&self.msr_indices, self.index)?;
        let read = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(|source| self.kvm("KVM_GET_MSRS", source))?;
        if read != self.msr_indices.len() {
            return Err(VcpuError::Msr {
                index: self.index,
                operation: "read",
                msr: self.msr_indices[read],
                done: read,
                total: self.msr_indices.len(),
            });
        }
        Ok(msrs.as_slice().to_vec())
    }

    /// Restores a state captured by [`Vcpu::capture`], in the order KVM needs
    /// (CPUID first; MSRs before the registers that depend on them; events last).
    pub fn restore(&self, state: &VcpuState) -> Result<(), VcpuError> {
        let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuError::List {
            index: self.index,
            what: "CPUID",
        })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|source| self.kvm("KVM_SET_CPUID2", source))?;
        if self.tsc_khz()? != state.tsc_khz {
            self.fd
                .set_tsc_khz(state.tsc_khz)
                .map_err(|source| self.kvm("KVM_SET_TSC_KHZ", source))?;
        }
        let msrs = Msrs::from_entries(&state.msrs).map_err(|_| VcpuError::List {
            index: self.index,
            what: "MSR",
        })?;
        let written = self
            .fd
            .set_msrs(&msrs)
            .map_err(|source| self.kvm("KVM_SET_MSRS", source))?;
        if written != state.msrs.len() {
            return Err(VcpuError::Msr {
                index: self.index,
                operation: "write",
                msr: state.msrs[written].index,
                done: written,
                total: state.msrs.len(),
            });
        }
        self.fd
            .set_regs(&state.regs)
            .map_err(|source| self.kvm("KVM_SET_REGS", source))?;
        self.fd
            .set_sregs(&state.sregs)
            .map_err(|source| self.kvm("KVM_SET_SREGS", source))?;
        let mut xsave = kvm_bindings::kvm_xsave::default();
        let words = state.xsave.len().min(xsave.region.len());
        xsave.region[..words].copy_from_slice(&state.xsave[..words]);
        // SAFETY: `xsave` is a complete 4 KiB kvm_xsave, the size KVM_SET_XSAVE reads.
        unsafe { self.fd.set_xsave(&xsave) }.map_err(|source| self.kvm("KVM_SET_XSAVE", source))?;
        self.fd
            .set_xcrs(&state.xcrs)
            .map_err(|source| self.kvm("KVM_SET_XCRS", source))?;
        self.fd
            .set_debug_regs(&state.debug_regs)
            .map_err(|source| self.kvm("KVM_SET_DEBUGREGS", source))?;
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(|source| self.kvm("KVM_SET_MP_STATE", source))?;
        self.fd
            .set_vcpu_events(&state.events)
            .map_err(|source| self.kvm("KVM_SET_VCPU_EVENTS", source))
    }
}

/// The MSRs that survive a save and restore on this host: KVM's index list,
/// minus those a `KVM_GET_MSRS` on `probe` refuses, minus those KVM will not
/// take back with `KVM_SET_MSRS` (e.g. paravirtual MSRs that need an
/// in-kernel LAPIC). `probe` must be a fresh vCPU: it gets its own values
/// written back.
pub fn saveable_msrs(kvm: &Kvm, probe: &Vcpu) -> Result<Vec<u32>, VcpuError> {
    let kvm_error = |operation, source| VcpuError::Kvm {
        index: probe.index,
        operation,
        source,
    };
    let mut indices = kvm
        .get_msr_index_list()
        .map_err(|source| kvm_error("KVM_GET_MSR_INDEX_LIST", source))?
        .as_slice()
        .to_vec();
    loop {
        let mut msrs = msr_list(&indices, probe.index)?;
        let read = probe
            .fd
            .get_msrs(&mut msrs)
            .map_err(|source| kvm_error("KVM_GET_MSRS", source))?;
        if read < indices.len() {
            tracing::debug!(
                msr = format_args!("{:#x}", indices[read]),
                "MSR is not readable, not saved"
            );
            indices.remove(read);
            continue;
        }
        let written = probe
            .fd
            .set_msrs(&msrs)
            .map_err(|source| kvm_error("KVM_SET_MSRS", source))?;
        if written < indices.len() {
            tracing::debug!(
                msr = format_args!("{:#x}", indices[written]),
                "MSR is not writable, not saved"
            );
            indices.remove(written);
            continue;
        }
        return Ok(indices);
    }
}

/// An MSR list for `indices`, values zeroed, ready for `KVM_GET_MSRS`.
fn msr_list(indices: &[u32], vcpu: u32) -> Result<Msrs, VcpuError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|_| VcpuError::List {
        index: vcpu,
        what: "MSR",
    })
}
