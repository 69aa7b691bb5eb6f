//! The complete state of a paused VM (everything but memory) and its
//! byte encoding.
//!
//! The KVM structures are stored as their exact bytes (zerocopy), so a state
//! restored in another process is bit-for-bit the state that was captured.
//! The encoding is little-endian and length-prefixed throughout:
//!
//! ```text
//! magic "USVMSTAT" | version u32 | memory_bytes u64 | clock (blob)
//! | vcpu_count u32 | vcpu_count × vCPU | devices u32 | devices × device
//! device := kind u32 (1: virtio-net) | state (blob)
//! vCPU := tsc_khz u32 | regs | sregs | xsave | xcrs | debugregs | events
//!         | mp_state | msrs (count u32 + entries) | cpuid (count u32 + entries)
//! blob := len u32 | bytes
//! ```
//!
//! Decoding checks every length; integrity of the bytes themselves is the
//! container's job (snapshot files and replication frames carry checksums).

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::virtio_net::{NET_STATE_LEN, NetState};

/// First bytes of an encoded [`VmState`].
pub const STATE_MAGIC: [u8; 8] = *b"USVMSTAT";
/// Version of the encoding; decoding refuses any other.
pub const STATE_VERSION: u32 = 2;
/// Device kind of a virtio-net state in the encoding.
const DEVICE_VIRTIO_NET: u32 = 1;
/// Upper bound on list lengths accepted by the decoder (MSRs, CPUID entries, vCPUs).
const MAX_LIST_LEN: u32 = 4096;
/// Bytes of the XSAVE area `KVM_GET_XSAVE` returns (`struct kvm_xsave`).
const XSAVE_BYTES: usize = std::mem::size_of::<kvm_bindings::kvm_xsave>();

/// Errors of decoding a VM state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// The input does not start with [`STATE_MAGIC`].
    #[error("not a VM state: bad magic bytes")]
    BadMagic,
    /// The input is of an encoding version this build cannot read.
    #[error("VM state version {found} is not supported (this build reads version {STATE_VERSION})")]
    UnsupportedVersion {
        /// The version found.
        found: u32,
    },
    /// The input ended early.
    #[error("VM state is truncated: needed {needed} more bytes at offset {offset}")]
    Truncated {
        /// Where reading stopped.
        offset: usize,
        /// How many bytes were missing.
        needed: usize,
    },
    /// A structure had the wrong size.
    #[error("VM state field {field} has {found} bytes, expected {expected}")]
    BadFieldSize {
        /// The field.
        field: &'static str,
        /// Its size in the input.
        found: usize,
        /// The size this build expects.
        expected: usize,
    },
    /// A list was implausibly long.
    #[error("VM state list {field} has {found} entries, more than the limit of {MAX_LIST_LEN}")]
    ListTooLong {
        /// The list.
        field: &'static str,
        /// Its length in the input.
        found: u32,
    },
    /// Bytes were left over after the last field.
    #[error("VM state has {0} unexpected trailing bytes")]
    TrailingBytes(usize),
    /// A device state this build does not know, or that does not decode.
    #[error("VM state holds an invalid device state: {0}")]
    BadDevice(String),
}

/// The state of one vCPU, as KVM reports it.
#[derive(Clone, PartialEq)]
pub struct VcpuState {
    /// TSC frequency (kHz) the vCPU runs at.
    pub tsc_khz: u32,
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// The XSAVE area (x87, SSE, AVX, ... state), as 32-bit words.
    pub xsave: Vec<u32>,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// Pending exceptions, interrupts, NMIs, SMM state.
    pub events: kvm_vcpu_events,
    /// Multiprocessing state (runnable, halted, ...).
    pub mp_state: kvm_mp_state,
    /// Every MSR KVM lets us save (includes the TSC).
    pub msrs: Vec<kvm_msr_entry>,
    /// The CPUID table the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("rsp", &format_args!("{:#x}", self.regs.rsp))
            .field("cr3", &format_args!("{:#x}", self.sregs.cr3))
            .field("msrs", &self.msrs.len())
            .field("cpuid_entries", &self.cpuid.len())
            .finish_non_exhaustive()
    }
}

/// Everything about a paused VM except its memory.
#[derive(Clone, Debug, PartialEq)]
pub struct VmState {
    /// Guest memory size in bytes (the layout must match on restore).
    pub memory_bytes: u64,
    /// The KVM clock.
    pub clock: kvm_clock_data,
    /// Per-vCPU state, in vCPU index order.
    pub vcpus: Vec<VcpuState>,
    /// The network device, when the VM has one.
    pub net: Option<NetState>,
}

impl VmState {
    /// Encodes the state (see the module docs for the layout).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024 * self.vcpus.len().max(1));
        out.extend_from_slice(&STATE_MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        out.extend_from_slice(&self.memory_bytes.to_le_bytes());
        put_blob(&mut out, self.clock.as_bytes());
        put_len(&mut out, self.vcpus.len());
        for vcpu in &self.vcpus {
            out.extend_from_slice(&vcpu.tsc_khz.to_le_bytes());
            put_blob(&mut out, vcpu.regs.as_bytes());
            put_blob(&mut out, vcpu.sregs.as_bytes());
            put_blob(&mut out, vcpu.xsave.as_bytes());
            put_blob(&mut out, vcpu.xcrs.as_bytes());
            put_blob(&mut out, vcpu.debug_regs.as_bytes());
            put_blob(&mut out, vcpu.events.as_bytes());
            put_blob(&mut out, vcpu.mp_state.as_bytes());
            put_list(&mut out, &vcpu.msrs);
            put_list(&mut out, &vcpu.cpuid);
        }
        match &self.net {
            Some(net) => {
                out.extend_from_slice(&1u32.to_le_bytes());
                out.extend_from_slice(&DEVICE_VIRTIO_NET.to_le_bytes());
                let mut bytes = Vec::with_capacity(NET_STATE_LEN);
                net.encode(&mut bytes);
                put_blob(&mut out, &bytes);
            }
            None => out.extend_from_slice(&0u32.to_le_bytes()),
        }
        out
    }

    /// Decodes a state, checking every length.
    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        let mut reader = Reader { bytes, offset: 0 };
        if reader.take(STATE_MAGIC.len())? != STATE_MAGIC {
            return Err(StateError::BadMagic);
        }
        let version = reader.u32()?;
        if version != STATE_VERSION {
            return Err(StateError::UnsupportedVersion { found: version });
        }
        let memory_bytes = reader.u64()?;
        let clock = reader.value("clock")?;
        let vcpu_count = reader.count("vcpus")?;
        let mut vcpus = Vec::with_capacity(vcpu_count);
        for _ in 0..vcpu_count {
            let tsc_khz = reader.u32()?;
            let regs = reader.value("regs")?;
            let sregs = reader.value("sregs")?;
            let xsave_bytes = reader.blob()?;
            if xsave_bytes.len() < XSAVE_BYTES || xsave_bytes.len() % 4 != 0 {
                return Err(StateError::BadFieldSize {
                    field: "xsave",
                    found: xsave_bytes.len(),
                    expected: XSAVE_BYTES,
                });
            }
            let xsave = xsave_bytes
                .chunks_exact(4)
                .map(|word| u32::from_le_bytes([word[0], word[1], word[2], word[3]]))
                .collect();
            vcpus.push(VcpuState {
                tsc_khz,
                regs,
                sregs,
                xsave,
                xcrs: reader.value("xcrs")?,
                debug_regs: reader.value("debug_regs")?,
                events: reader.value("events")?,
                mp_state: reader.value("mp_state")?,
                msrs: reader.list("msrs")?,
                cpuid: reader.list("cpuid")?,
            });
        }
        let mut net = None;
        for _ in 0..reader.count("devices")? {
            let kind = reader.u32()?;
            let blob = reader.blob()?;
            match kind {
                DEVICE_VIRTIO_NET if net.is_none() => {
                    net = Some(
                        NetState::decode(blob)
                            .map_err(|error| StateError::BadDevice(error.to_string()))?,
                    )
                }
                other => return Err(StateError::BadDevice(format!("device kind {other}"))),
            }
        }
        if reader.offset != bytes.len() {
            return Err(StateError::TrailingBytes(bytes.len() - reader.offset));
        }
        Ok(Self {
            memory_bytes,
            clock,
            vcpus,
            net,
        })
    }
}

/// Appends a length prefix. Every length in a state (vCPUs, MSRs, CPUID
/// entries, KVM structures, a device state) is far below 4 GiB.
fn put_len(out: &mut Vec<u8>, len: usize) {
    let len = u32::try_from(len).expect("a VM state part is far below 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
}

fn put_blob(out: &mut Vec<u8>, bytes: &[u8]) {
    put_len(out, bytes.len());
    out.extend_from_slice(bytes);
}

fn put_list<T: IntoBytes + Immutable>(out: &mut Vec<u8>, items: &[T]) {
    put_len(out, items.len());
    for item in items {
        out.extend_from_slice(item.as_bytes());
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], StateError> {
        let available = self.bytes.len() - self.offset;
        if len > available {
            return Err(StateError::Truncated {
                offset: self.offset,
                needed: len - available,
            });
        }
        let slice = &self.bytes[self.offset..self.offset + len];
        self.offset += len;
        Ok(slice)
    }

    fn u32(&mut self) -> Result<u32, StateError> {
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn u64(&mut self) -> Result<u64, StateError> {
        let low = u64::from(self.u32()?);
        let high = u64::from(self.u32()?);
        Ok(low | (high << 32))
    }

    fn blob(&mut self) -> Result<&'a [u8], StateError> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn value<T: FromBytes>(&mut self, field: &'static str) -> Result<T, StateError> {
        let bytes = self.blob()?;
        T::read_from_bytes(bytes).map_err(|_| StateError::BadFieldSize {
            field,
            found: bytes.len(),
            expected: std::mem::size_of::<T>(),
        })
    }

    fn count(&mut self, field: &'static str) -> Result<usize, StateError> {
        let count = self.u32()?;
        if count > MAX_LIST_LEN {
            return Err(StateError::ListTooLong {
                field,
                found: count,
            });
        }
        Ok(count as usize)
    }

    fn list<T: FromBytes>(&mut self, field: &'static str) -> Result<Vec<T>, StateError> {
        let count = self.count(field)?;
        let size = std::mem::size_of::<T>();
        let bytes = self.take(count * size)?;
        Ok(bytes
            .chunks_exact(size)
            .map(|chunk| T::read_from_bytes(chunk).expect("chunk has the size of T"))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_state() -> VmState {
        let mut regs = kvm_regs {
            rip: 0x10_0000,
            rsp: 0x17ff8,
            rdi: 1,
            ..Default::default()
        };
        regs.rflags = 0x202;
        let mut sregs = kvm_sregs {
            cr3: 0x1000,
            efer: 0xd01,
            ..Default::default()
        };
        sregs.cs.selector = 0x33;
        let vcpu = VcpuState {
            tsc_khz: 2_500_000,
            regs,
            sregs,
            xsave: (0..1024).collect(),
            xcrs: kvm_xcrs {
                nr_xcrs: 1,
                ..Default::default()
            },
            debug_regs: kvm_debugregs {
                dr7: 0x400,
                ..Default::default()
            },
            events: kvm_vcpu_events::default(),
            mp_state: kvm_mp_state { mp_state: 0 },
            msrs: vec![
                kvm_msr_entry {
                    index: 0x10,
                    data: 123_456,
                    ..Default::default()
                },
                kvm_msr_entry {
                    index: 0xc000_0080,
                    data: 0xd01,
                    ..Default::default()
                },
            ],
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                eax: 0x906ea,
                ..Default::default()
            }],
        };
        VmState {
            memory_bytes: 512 << 20,
            clock: kvm_clock_data {
                clock: 99,
                ..Default::default()
            },
            vcpus: vec![vcpu.clone(), vcpu],
            net: Some(NetState {
                driver_features: 1 << 32,
                status: 15,
                ..NetState::default()
            }),
        }
    }

    #[test]
    fn encode_then_decode_gives_the_same_state() {
        let state = sample_state();
        let decoded = VmState::decode(&state.encode()).expect("valid encoding");
        assert_eq!(decoded, state);
    }

    #[test]
    fn every_truncation_is_refused() {
        let encoded = sample_state().encode();
        let refused = (0..encoded.len())
            .filter(|&len| VmState::decode(&encoded[..len]).is_err())
            .count();
        assert_eq!(
            refused,
            encoded.len(),
            "some prefix of the encoding decoded"
        );
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut encoded = sample_state().encode();
        encoded.push(0);
        assert_eq!(VmState::decode(&encoded), Err(StateError::TrailingBytes(1)));
    }

    #[test]
    fn an_unknown_device_kind_is_refused() {
        let mut state = sample_state();
        state.net = None;
        let mut encoded = state.encode();
        let devices_at = encoded.len() - 4;
        encoded[devices_at..].copy_from_slice(&1u32.to_le_bytes());
        encoded.extend_from_slice(&9u32.to_le_bytes());
        encoded.extend_from_slice(&0u32.to_le_bytes());

        let result = VmState::decode(&encoded);

        assert_eq!(
            result,
            Err(StateError::BadDevice("device kind 9".to_owned()))
        );
    }

    #[test]
    fn bad_magic_is_refused() {
        let mut encoded = sample_state().encode();
        encoded[0] ^= 0xff;
        assert_eq!(VmState::decode(&encoded), Err(StateError::BadMagic));
    }

    #[test]
    fn other_versions_are_refused() {
        let mut encoded = sample_state().encode();
        encoded[8] = 1;
        assert_eq!(
            VmState::decode(&encoded),
            Err(StateError::UnsupportedVersion { found: 1 })
        );
    }

    #[test]
    fn a_resized_field_is_refused() {
        let mut encoded = sample_state().encode();
        // The clock blob's length prefix sits right after magic, version and memory size.
        let clock_len_at = 8 + 4 + 8;
        encoded[clock_len_at] -= 1;
        assert!(matches!(
            VmState::decode(&encoded),
            Err(StateError::BadFieldSize { field: "clock", .. })
        ));
    }

    #[test]
    fn absurd_list_lengths_are_refused_before_allocating() {
        let mut state = sample_state();
        state.vcpus.clear();
        state.net = None;
        let mut encoded = state.encode();
        // The vCPU count, then the device count (zero) end the encoding.
        let count_at = encoded.len() - 8;
        encoded[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            VmState::decode(&encoded),
            Err(StateError::ListTooLong { field: "vcpus", .. })
        ));
    }
}
