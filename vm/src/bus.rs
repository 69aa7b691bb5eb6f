//! Port-I/O and MMIO buses: map guest accesses to the devices that own them.
//!
//! A vCPU exit for `in`/`out` or an access to unbacked guest-physical memory
//! is routed to the device whose range contains the address, with the offset
//! inside that range. Accesses nobody claims read as all-ones and are logged
//! (rate-limited: the guest controls how often they happen).

use std::collections::BTreeMap;
use std::sync::Arc;

/// What a device asks the vCPU loop to do after an access.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BusAction {
    /// Nothing: go back into the guest.
    Continue,
    /// The guest has nothing to do: wait a little before re-entering (its `HLT`).
    Yield,
    /// The guest finished with an exit code: stop this vCPU.
    Exit(u32),
    /// The guest panicked: stop this vCPU.
    Panic,
}

/// A device on a bus.
pub trait BusDevice: Send + Sync {
    /// Handles a read of `data.len()` bytes at `offset` inside the device's range.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// Handles a write at `offset` inside the device's range.
    fn write(&self, offset: u64, data: &[u8]) -> BusAction;
}

/// Errors of building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A new range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start of the new range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// A zero-length range.
    #[error("bus range at {0:#x} has zero length")]
    Empty(u64),
}

/// An address space of devices (one for ports, one for MMIO).
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<u64, (u64, Arc<dyn BusDevice>)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<dyn BusDevice>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        let before = self.devices.range(..end).next_back();
        if let Some((&other_base, &(other_len, _))) = before
            && other_base + other_len > base
        {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, address: u64) -> Option<(u64, &Arc<dyn BusDevice>)> {
        let (&base, (len, device)) = self.devices.range(..=address).next_back()?;
        (address - base < *len).then_some((address - base, device))
    }

    /// Routes a read; returns false (and fills `data` with 0xff) when nobody owns `address`.
    pub fn read(&self, address: u64, data: &mut [u8]) -> bool {
        match self.find(address) {
            Some((offset, device)) => {
                device.read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Routes a write; returns `None` when nobody owns `address`.
    pub fn write(&self, address: u64, data: &[u8]) -> Option<BusAction> {
        self.find(address)
            .map(|(offset, device)| device.write(offset, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder {
        writes: Mutex<Vec<(u64, Vec<u8>)>>,
    }

    impl BusDevice for Recorder {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset.to_le_bytes()[0]);
        }

        fn write(&self, offset: u64, data: &[u8]) -> BusAction {
            self.writes
                .lock()
                .expect("not poisoned")
                .push((offset, data.to_vec()));
            BusAction::Continue
        }
    }

    #[test]
    fn accesses_reach_the_owner_with_an_offset() {
        let device = Arc::new(Recorder::default());
        let mut bus = Bus::new();
        bus.insert(0x500, 0x10, device.clone()).expect("free range");
        assert_eq!(bus.write(0x503, &[7]), Some(BusAction::Continue));
        assert_eq!(
            device.writes.lock().expect("not poisoned").as_slice(),
            &[(3, vec![7])]
        );
    }

    #[test]
    fn reads_of_unclaimed_addresses_are_all_ones() {
        let bus = Bus::new();
        let mut data = [0u8; 2];
        assert!(!bus.read(0x80, &mut data));
        assert_eq!(data, [0xff, 0xff]);
    }

    #[test]
    fn the_end_of_a_range_is_exclusive() {
        let mut bus = Bus::new();
        bus.insert(0x500, 0x10, Arc::new(Recorder::default()))
            .expect("free range");
        assert_eq!(bus.write(0x510, &[1]), None);
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = Bus::new();
        bus.insert(0x500, 0x10, Arc::new(Recorder::default()))
            .expect("free range");
        let result = bus.insert(0x50f, 1, Arc::new(Recorder::default()));
        assert_eq!(
            result,
            Err(BusError::Overlap {
                base: 0x50f,
                len: 1
            })
        );
    }

    #[test]
    fn adjacent_ranges_are_accepted() {
        let mut bus = Bus::new();
        bus.insert(0x500, 0x10, Arc::new(Recorder::default()))
            .expect("free range");
        assert!(
            bus.insert(0x510, 0x10, Arc::new(Recorder::default()))
                .is_ok()
        );
    }
}
