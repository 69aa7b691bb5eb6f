//! The device's state in a checkpoint, and its fixed little-endian encoding.

use virtio_queue::QueueState;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::NetError;

/// The device's state in a checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetState {
    /// The features the driver accepted.
    pub driver_features: u64,
    /// The status register.
    pub status: u32,
    /// Selected queue.
    pub queue_sel: u32,
    /// Selected half of the device features.
    pub device_features_sel: u32,
    /// Selected half of the driver features.
    pub driver_features_sel: u32,
    /// Pending interrupt bits (the guest polls; kept for a faithful restore).
    pub interrupt_status: u32,
    /// Receive and transmit queues.
    pub queues: [QueueState; 2],
}

/// Bytes of an encoded [`NetState`].
pub const NET_STATE_LEN: usize = std::mem::size_of::<NetStateLayout>();

/// A queue's state as encoded, little-endian.
#[repr(C)]
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
struct QueueLayout {
    max_size: U16,
    next_avail: U16,
    next_used: U16,
    size: U16,
    reserved: [u8; 2],
    desc_table: U64,
    avail_ring: U64,
    used_ring: U64,
    event_idx_enabled: u8,
    ready: u8,
}

/// A [`NetState`] as encoded, little-endian.
#[repr(C)]
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
struct NetStateLayout {
    driver_features: U64,
    status: U32,
    queue_sel: U32,
    device_features_sel: U32,
    driver_features_sel: U32,
    interrupt_status: U32,
    queues: [QueueLayout; 2],
}

const _: () = assert!(NET_STATE_LEN == 100);

fn flag(byte: u8) -> Result<bool, NetError> {
    match byte {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(NetError::BadState(format!("flag byte {other}"))),
    }
}

impl QueueLayout {
    fn of(queue: &QueueState) -> Self {
        Self {
            max_size: queue.max_size.into(),
            next_avail: queue.next_avail.into(),
            next_used: queue.next_used.into(),
            size: queue.size.into(),
            reserved: [0; 2],
            desc_table: queue.desc_table.into(),
            avail_ring: queue.avail_ring.into(),
            used_ring: queue.used_ring.into(),
            event_idx_enabled: u8::from(queue.event_idx_enabled),
            ready: u8::from(queue.ready),
        }
    }

    fn state(&self) -> Result<QueueState, NetError> {
        Ok(QueueState {
            max_size: self.max_size.get(),
            next_avail: self.next_avail.get(),
            next_used: self.next_used.get(),
            size: self.size.get(),
            desc_table: self.desc_table.get(),
            avail_ring: self.avail_ring.get(),
            used_ring: self.used_ring.get(),
            event_idx_enabled: flag(self.event_idx_enabled)?,
            ready: flag(self.ready)?,
        })
    }
}

impl NetState {
    /// Appends the fixed little-endian encoding ([`NET_STATE_LEN`] bytes).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let layout = NetStateLayout {
            driver_features: self.driver_features.into(),
            status: self.status.into(),
            queue_sel: self.queue_sel.into(),
            device_features_sel: self.device_features_sel.into(),
            driver_features_sel: self.driver_features_sel.into(),
            interrupt_status: self.interrupt_status.into(),
            queues: [
                QueueLayout::of(&self.queues[0]),
                QueueLayout::of(&self.queues[1]),
            ],
        };
        out.extend_from_slice(layout.as_bytes());
    }

    /// Decodes [`NetState::encode`]'s output.
    pub fn decode(bytes: &[u8]) -> Result<Self, NetError> {
        let layout = NetStateLayout::read_from_bytes(bytes).map_err(|_| {
            NetError::BadState(format!("{} bytes, expected {NET_STATE_LEN}", bytes.len()))
        })?;
        Ok(Self {
            driver_features: layout.driver_features.get(),
            status: layout.status.get(),
            queue_sel: layout.queue_sel.get(),
            device_features_sel: layout.device_features_sel.get(),
            driver_features_sel: layout.driver_features_sel.get(),
            interrupt_status: layout.interrupt_status.get(),
            queues: [layout.queues[0].state()?, layout.queues[1].state()?],
        })
    }
}
