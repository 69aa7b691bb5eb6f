//! virtio-net over virtio-mmio (virtio 1.x, "modern" registers only): the
//! guest's network interface. Queues are rust-vmm's `virtio-queue`.
//!
//! - **Transmit** (queue 1): when the guest writes `QueueNotify`, every chain
//!   it made available is read (the 12-byte `virtio_net_hdr_v1` is dropped)
//!   and handed to a [`FrameSink`]: the tap directly, or the primary's
//!   output-commit gate, which holds it until its epoch is acknowledged.
//! - **Receive** (queue 0): frames are read from the tap only while the
//!   guest has a buffer for them (none are queued in the VMM, so a
//!   checkpoint never misses one): whenever the guest exits anyway (it
//!   transmits, or yields: its `HLT`, where the vCPU thread waits for the tap
//!   to become readable, [`VirtioNet::wait_for_input`]). The device asks the
//!   driver not to notify it of recycled receive buffers
//!   (`VRING_USED_F_NO_NOTIFY`): that would be an exit per frame for nothing.
//! - There is no interrupt controller: the guest polls its used rings, which
//!   costs no exit.
//!
//! For replication, the device can report every frame it delivers (the
//! primary logs them to the secondary), and frames can be injected ahead
//! of the tap (the secondary replays the frames a takeover's guest never
//! saw: those of epochs that were not committed).
//!
//! Everything the device writes into guest memory (frames, used rings) goes
//! through vm-memory with the VM's dirty bitmap, so it is in the next
//! checkpoint. The device state ([`NetState`]: feature negotiation, status,
//! both queues' addresses and indices) is part of [`crate::state::VmState`];
//! queue processing happens on the vCPU thread, so a paused VM has a device
//! at rest.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::bus::{BusAction, BusDevice};
use crate::log_limited;
use crate::memory::GuestMemory;
use crate::tap::{MAX_FRAME, Tap};
use crate::usize_from;

/// "virt", little-endian.
const MAGIC: u32 = 0x7472_6976;
/// virtio-mmio version 2 (virtio 1.x).
const MMIO_VERSION: u32 = 2;
/// Device ID of a network card.
const DEVICE_ID_NET: u32 = 1;
/// Vendor ID reported ("USTD").
const VENDOR_ID: u32 = 0x4454_5355;
/// `VIRTIO_NET_F_MAC`: the config space holds the MAC address.
const FEATURE_MAC: u64 = 1 << 5;
/// `VIRTIO_F_VERSION_1`.
const FEATURE_VERSION_1: u64 = 1 << 32;
/// What the device offers.
const DEVICE_FEATURES: u64 = FEATURE_MAC | FEATURE_VERSION_1;
/// Bytes of `virtio_net_hdr_v1` in front of every frame.
const NET_HEADER_LEN: usize = 12;
/// Largest queue the device accepts.
pub const QUEUE_MAX_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
/// `DRIVER_OK` in the status register.
const STATUS_DRIVER_OK: u32 = 4;
/// `FEATURES_OK` in the status register.
const STATUS_FEATURES_OK: u32 = 8;

/// Register offsets (virtio 1.2, 4.2.2).
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Errors of the network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A saved device state is malformed or describes an impossible queue.
    #[error("the saved virtio-net state is invalid: {0}")]
    BadState(String),
}

/// Where the frames the guest transmits go.
pub trait FrameSink: Send + Sync {
    /// Takes one Ethernet frame (without the virtio header).
    fn send(&self, frame: &[u8]);
}

impl FrameSink for Tap {
    fn send(&self, frame: &[u8]) {
        if let Err(error) = self.write_frame(frame) {
            // The guest decides how often it sends: rate-limit the complaint.
            log_limited!(warn, %error, "a frame from the guest was not delivered to the tap");
        }
    }
}

/// A sink that drops every frame (a VM without a network behind it).
pub struct DiscardFrames;

impl FrameSink for DiscardFrames {
    fn send(&self, _frame: &[u8]) {}
}

/// A sink that keeps every frame in memory, in order (tests, diagnostics).
#[derive(Default)]
pub struct FrameRecorder(Mutex<Vec<Vec<u8>>>);

impl FrameSink for FrameRecorder {
    fn send(&self, frame: &[u8]) {
        self.0
            .lock()
            .expect("no panics while the recorder is held")
            .push(frame.to_vec());
    }
}

impl FrameRecorder {
    /// The frames so far.
    pub fn frames(&self) -> Vec<Vec<u8>> {
        self.0
            .lock()
            .expect("no panics while the recorder is held")
            .clone()
    }
}

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

/// The low 32 bits of `value` (registers expose 64-bit values in halves).
fn low_half(value: u64) -> u32 {
    u32::try_from(value & u64::from(u32::MAX)).expect("masked to 32 bits")
}

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

/// Counters of the device, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames the guest transmitted.
    pub tx_frames: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Malformed transmit chains skipped.
    pub tx_errors: u64,
}

struct Registers {
    /// Frames to deliver before any from the tap (a takeover's replay).
    injected: VecDeque<Vec<u8>>,
    driver_features: u64,
    status: u32,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    interrupt_status: u32,
    queues: [Queue; 2],
    counters: NetCounters,
}

impl Registers {
    fn new() -> Self {
        Self {
            injected: VecDeque::new(),
            driver_features: 0,
            status: 0,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            interrupt_status: 0,
            queues: [new_queue(), new_queue()],
            counters: NetCounters::default(),
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn driver_ok(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0
    }
}

fn new_queue() -> Queue {
    Queue::new(QUEUE_MAX_SIZE).expect("QUEUE_MAX_SIZE is a power of two within limits")
}

/// A virtio-net device on the MMIO bus.
pub struct VirtioNet {
    registers: Mutex<Registers>,
    memory: Arc<GuestMemory>,
    mac: [u8; 6],
    /// Where received frames come from (none: the guest hears nothing).
    input: Option<Arc<Tap>>,
    output: Arc<dyn FrameSink>,
    /// Told of every frame delivered to the guest.
    delivered: Option<Arc<dyn FrameSink>>,
}

impl VirtioNet {
    /// A device with MAC `mac` that reads frames from `input` and sends the
    /// guest's frames to `output`.
    pub fn new(
        memory: Arc<GuestMemory>,
        mac: [u8; 6],
        input: Option<Arc<Tap>>,
        output: Arc<dyn FrameSink>,
    ) -> Self {
        Self {
            registers: Mutex::new(Registers::new()),
            memory,
            mac,
            input,
            output,
            delivered: None,
        }
    }

    /// Reports every frame delivered to the guest to `observer` as well.
    pub fn with_delivery_observer(mut self, observer: Arc<dyn FrameSink>) -> Self {
        self.delivered = Some(observer);
        self
    }

    /// Queues frames to deliver before any from the tap.
    pub fn inject(&self, frames: impl IntoIterator<Item = Vec<u8>>) {
        self.lock().injected.extend(frames);
    }

    fn lock(&self) -> MutexGuard<'_, Registers> {
        self.registers
            .lock()
            .expect("no panics while the virtio-net registers are held")
    }

    /// The MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Announces the guest at `ipv4` with gratuitous ARPs through the
    /// device's output, as after it moved: switches learn its port,
    /// neighbours refresh (even entries they had given up on).
    pub fn announce(&self, ipv4: [u8; 4]) {
        let frame = gratuitous_arp(self.mac, ipv4);
        for _ in 0..3 {
            self.output.send(&frame);
        }
    }

    /// Frame counters.
    pub fn counters(&self) -> NetCounters {
        self.lock().counters
    }

    /// The device state (call with the vCPUs paused).
    pub fn save(&self) -> NetState {
        let registers = self.lock();
        NetState {
            driver_features: registers.driver_features,
            status: registers.status,
            queue_sel: registers.queue_sel,
            device_features_sel: registers.device_features_sel,
            driver_features_sel: registers.driver_features_sel,
            interrupt_status: registers.interrupt_status,
            queues: [registers.queues[0].state(), registers.queues[1].state()],
        }
    }

    /// Puts the device in a saved state (before the vCPUs run).
    pub fn restore(&self, state: &NetState) -> Result<(), NetError> {
        let queue = |saved: QueueState| {
            if saved.max_size != QUEUE_MAX_SIZE {
                return Err(NetError::BadState(format!(
                    "queue of at most {} entries, this device has {QUEUE_MAX_SIZE}",
                    saved.max_size
                )));
            }
            Queue::try_from(saved).map_err(|error| NetError::BadState(format!("{error:?}")))
        };
        let queues = [queue(state.queues[0])?, queue(state.queues[1])?];
        let mut registers = self.lock();
        registers.driver_features = state.driver_features;
        registers.status = state.status;
        registers.queue_sel = state.queue_sel;
        registers.device_features_sel = state.device_features_sel;
        registers.driver_features_sel = state.driver_features_sel;
        registers.interrupt_status = state.interrupt_status;
        registers.queues = queues;
        Ok(())
    }

    /// The guest is idle: waits up to `timeout` for the tap to have a frame
    /// and delivers what the guest has buffers for. A signal (the VM's pause
    /// kick) ends the wait early.
    pub fn wait_for_input(&self, timeout: Duration) {
        if self.deliver_received() > 0 {
            return;
        }
        let Some(input) = &self.input else {
            std::thread::sleep(timeout);
            return;
        };
        let mut poll = libc::pollfd {
            fd: input.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `poll` is one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut poll, 1, millis) };
        if ready > 0 {
            self.deliver_received();
        }
    }

    /// Moves frames (injected ones first, then the tap's) into the guest's
    /// receive buffers; returns how many.
    fn deliver_received(&self) -> usize {
        let mut registers = self.lock();
        if !registers.driver_ok() || (self.input.is_none() && registers.injected.is_empty()) {
            return 0;
        }
        let memory: &GuestMemory = &self.memory;
        let mut frame = [0u8; NET_HEADER_LEN + MAX_FRAME];
        let mut delivered = 0;
        loop {
            let registers = &mut *registers;
            let queue = &mut registers.queues[RX_QUEUE];
            let Some(chain) = queue.pop_descriptor_chain(memory) else {
                break;
            };
            let head = chain.head_index();
            let length = if let Some(injected) = registers.injected.pop_front() {
                let length = injected.len().min(MAX_FRAME);
                frame[NET_HEADER_LEN..NET_HEADER_LEN + length].copy_from_slice(&injected[..length]);
                length
            } else {
                match self
                    .input
                    .as_ref()
                    .map(|tap| tap.read_frame(&mut frame[NET_HEADER_LEN..]))
                {
                    Some(Ok(Some(length))) => length,
                    Some(Ok(None)) | None => {
                        queue.go_to_previous_position();
                        break;
                    }
                    Some(Err(error)) => {
                        log_limited!(warn, %error, "reading the tap failed");
                        queue.go_to_previous_position();
                        break;
                    }
                }
            };
            // virtio_net_hdr_v1: no offloads, num_buffers = 1.
            frame[..NET_HEADER_LEN].fill(0);
            frame[10] = 1;
            let total = NET_HEADER_LEN + length;
            let written = chain
                .writer(memory)
                .map_err(|error| format!("{error:?}"))
                .and_then(|mut writer| {
                    writer
                        .write_all(&frame[..total])
                        .map_err(|error| error.to_string())
                });
            let used = match written {
                Ok(()) => {
                    if let Some(observer) = &self.delivered {
                        observer.send(&frame[NET_HEADER_LEN..total]);
                    }
                    u32::try_from(total).expect("a frame is at most a few KiB")
                }
                Err(error) => {
                    log_limited!(warn, %error, "a receive buffer from the guest is unusable; frame dropped");
                    0
                }
            };
            if let Err(error) = queue.add_used(memory, head, used) {
                log_limited!(
                    warn,
                    ?error,
                    "could not return a receive buffer to the guest"
                );
                break;
            }
            registers.interrupt_status |= 1;
            registers.counters.rx_frames += 1;
            delivered += 1;
        }
        delivered
    }

    /// Sends every frame the guest made available on the transmit queue.
    fn transmit(&self) {
        let mut registers = self.lock();
        if !registers.driver_ok() {
            return;
        }
        let memory: &GuestMemory = &self.memory;
        let mut frame = Vec::with_capacity(NET_HEADER_LEN + MAX_FRAME);
        while let Some(chain) = registers.queues[TX_QUEUE].pop_descriptor_chain(memory) {
            let head = chain.head_index();
            frame.clear();
            let read = chain
                .reader(memory)
                .map_err(|error| format!("{error:?}"))
                .and_then(|mut reader| {
                    let available = reader.available_bytes();
                    if available > NET_HEADER_LEN + MAX_FRAME {
                        return Err(format!("a {available}-byte frame is too long"));
                    }
                    reader
                        .read_to_end(&mut frame)
                        .map_err(|error| error.to_string())
                });
            match read {
                Ok(_) if frame.len() > NET_HEADER_LEN => {
                    self.output.send(&frame[NET_HEADER_LEN..]);
                    registers.counters.tx_frames += 1;
                }
                Ok(_) => registers.counters.tx_errors += 1,
                Err(error) => {
                    log_limited!(warn, %error, "the guest's transmit chain is malformed; skipped");
                    registers.counters.tx_errors += 1;
                }
            }
            if let Err(error) = registers.queues[TX_QUEUE].add_used(memory, head, 0) {
                log_limited!(
                    warn,
                    ?error,
                    "could not return a transmit buffer to the guest"
                );
                break;
            }
            registers.interrupt_status |= 1;
        }
    }

    fn config_byte(&self, offset: u64) -> u8 {
        match offset {
            0..6 => self.mac[usize_from(offset)],
            // status: VIRTIO_NET_S_LINK_UP (only meaningful with F_STATUS).
            6 => 1,
            _ => 0,
        }
    }
}

impl BusDevice for VirtioNet {
    fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = self.config_byte(offset - reg::CONFIG + i as u64);
            }
            return;
        }
        let mut registers = self.lock();
        let value: u32 = match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => DEVICE_ID_NET,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match registers.device_features_sel {
                0 => low_half(DEVICE_FEATURES),
                1 => low_half(DEVICE_FEATURES >> 32),
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => {
                if registers.selected_queue().is_some() {
                    u32::from(QUEUE_MAX_SIZE)
                } else {
                    0
                }
            }
            reg::QUEUE_READY => registers
                .selected_queue()
                .map_or(0, |queue| u32::from(queue.ready())),
            reg::INTERRUPT_STATUS => registers.interrupt_status,
            reg::STATUS => registers.status,
            reg::CONFIG_GENERATION => 0,
            _ => {
                log_limited!(debug, offset, "guest read an unknown virtio-mmio register");
                0
            }
        };
        let bytes = value.to_le_bytes();
        let len = data.len().min(4);
        data[..len].copy_from_slice(&bytes[..len]);
    }

    fn write(&self, offset: u64, data: &[u8]) -> BusAction {
        let mut bytes = [0u8; 4];
        let len = data.len().min(4);
        bytes[..len].copy_from_slice(&data[..len]);
        let value = u32::from_le_bytes(bytes);
        if offset == reg::QUEUE_NOTIFY {
            match value as usize {
                TX_QUEUE => {
                    self.transmit();
                    // The guest is here anyway: hand it what has arrived.
                    self.deliver_received();
                }
                RX_QUEUE => {
                    self.deliver_received();
                }
                _ => {}
            }
            return BusAction::Continue;
        }
        let mut registers = self.lock();
        match offset {
            reg::DEVICE_FEATURES_SEL => registers.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => registers.driver_features_sel = value,
            reg::DRIVER_FEATURES => {
                let shift = match registers.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return BusAction::Continue,
                };
                let mask = !(0xffff_ffffu64 << shift);
                registers.driver_features = (registers.driver_features & mask)
                    | ((u64::from(value) << shift) & DEVICE_FEATURES);
            }
            reg::QUEUE_SEL => registers.queue_sel = value,
            reg::QUEUE_NUM => {
                if let Some(queue) = registers.selected_queue() {
                    queue.set_size(u16::try_from(value).unwrap_or(u16::MAX));
                }
            }
            reg::QUEUE_READY => {
                if let Some(queue) = registers.selected_queue() {
                    queue.set_ready(value == 1);
                }
            }
            reg::QUEUE_DESC_LOW => queue_address(&mut registers, |q| {
                q.set_desc_table_address(Some(value), None)
            }),
            reg::QUEUE_DESC_HIGH => queue_address(&mut registers, |q| {
                q.set_desc_table_address(None, Some(value))
            }),
            reg::QUEUE_DRIVER_LOW => queue_address(&mut registers, |q| {
                q.set_avail_ring_address(Some(value), None)
            }),
            reg::QUEUE_DRIVER_HIGH => queue_address(&mut registers, |q| {
                q.set_avail_ring_address(None, Some(value))
            }),
            reg::QUEUE_DEVICE_LOW => queue_address(&mut registers, |q| {
                q.set_used_ring_address(Some(value), None)
            }),
            reg::QUEUE_DEVICE_HIGH => queue_address(&mut registers, |q| {
                q.set_used_ring_address(None, Some(value))
            }),
            reg::INTERRUPT_ACK => registers.interrupt_status &= !value,
            reg::STATUS => {
                if value == 0 {
                    // Device reset.
                    let counters = registers.counters;
                    let injected = std::mem::take(&mut registers.injected);
                    *registers = Registers::new();
                    registers.counters = counters;
                    registers.injected = injected;
                } else if value & STATUS_FEATURES_OK != 0
                    && registers.driver_features & FEATURE_VERSION_1 == 0
                {
                    // A modern device needs VERSION_1: refuse FEATURES_OK.
                    registers.status = value & !STATUS_FEATURES_OK;
                } else {
                    let starting = value & STATUS_DRIVER_OK != 0 && !registers.driver_ok();
                    registers.status = value;
                    if starting {
                        // The device fills receive buffers whenever the guest
                        // exits (yield, transmit): a notification for each
                        // buffer given back would only cost an exit.
                        let memory: &GuestMemory = &self.memory;
                        if let Err(error) = registers.queues[RX_QUEUE].disable_notification(memory)
                        {
                            log_limited!(
                                warn,
                                ?error,
                                "could not suppress receive-queue notifications"
                            );
                        }
                    }
                }
            }
            _ => log_limited!(debug, offset, "guest wrote an unknown virtio-mmio register"),
        }
        BusAction::Continue
    }
}

fn queue_address(registers: &mut Registers, set: impl FnOnce(&mut Queue)) {
    if let Some(queue) = registers.selected_queue() {
        set(queue);
    }
}

/// A gratuitous ARP request announcing that `ipv4` is at `mac`: switches
/// learn the port and neighbours update their caches. Sent on the guest's
/// behalf when it resumes on another host.
pub fn gratuitous_arp(mac: [u8; 6], ipv4: [u8; 4]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(60);
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&[0x08, 0x06]); // ARP
    frame.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]); // Ethernet/IPv4, request
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ipv4);
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&ipv4);
    frame.resize(60, 0);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue_index(queue: usize) -> u32 {
        u32::try_from(queue).expect("two queues")
    }
    use crate::memory::{self, MIN_MEMORY};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::{GuestAddress, GuestMemoryBackend};

    /// `VRING_DESC_F_WRITE`: the device writes this buffer.
    const DESC_WRITE: u16 = 2;
    const RX_RING: u64 = 0x10_0000;
    const TX_RING: u64 = 0x20_0000;
    const RX_BUFFER: u64 = 0x30_0000;
    const TX_BUFFER: u64 = 0x30_8000;

    fn set(net: &VirtioNet, offset: u64, value: u32) {
        net.write(offset, &value.to_le_bytes());
    }

    fn get(net: &VirtioNet, offset: u64) -> u32 {
        let mut bytes = [0u8; 4];
        net.read(offset, &mut bytes);
        u32::from_le_bytes(bytes)
    }

    /// Negotiates as a virtio 1.x driver and sets up both queues.
    fn bring_up(
        net: &VirtioNet,
        rx: &MockSplitQueue<GuestMemory>,
        tx: &MockSplitQueue<GuestMemory>,
    ) {
        set(net, reg::STATUS, 1 | 2);
        set(net, reg::DRIVER_FEATURES_SEL, 1);
        set(net, reg::DRIVER_FEATURES, 1);
        set(net, reg::DRIVER_FEATURES_SEL, 0);
        set(net, reg::DRIVER_FEATURES, 1 << 5);
        set(net, reg::STATUS, 1 | 2 | STATUS_FEATURES_OK);
        for (index, queue) in [(0u32, rx), (1, tx)] {
            set(net, reg::QUEUE_SEL, index);
            set(net, reg::QUEUE_NUM, 16);
            set(
                net,
                reg::QUEUE_DESC_LOW,
                low_half(queue.desc_table_addr().0),
            );
            set(net, reg::QUEUE_DRIVER_LOW, low_half(queue.avail_addr().0));
            set(net, reg::QUEUE_DEVICE_LOW, low_half(queue.used_addr().0));
            set(net, reg::QUEUE_READY, 1);
        }
        set(
            net,
            reg::STATUS,
            1 | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
    }

    fn is_dirty(memory: &GuestMemory, gpa: u64) -> bool {
        let region = memory.iter().next().expect("one region");
        let mapping: &vm_memory::MmapRegion<AtomicBitmap> = region;
        mapping.bitmap().is_addr_set(usize_from(gpa))
    }

    fn ethernet_frame(tag: u8) -> Vec<u8> {
        let mut frame = vec![0xff; 6];
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, tag, 0x88, 0xb5]);
        frame.resize(60, tag);
        frame
    }

    fn offer_receive_buffer(rx: &MockSplitQueue<GuestMemory>, index: u16) {
        let buffer = Descriptor::new(RX_BUFFER + u64::from(index) * 0x1000, 2048, DESC_WRITE, 0);
        rx.add_desc_chains(&[RawDescriptor::from(buffer)], index)
            .expect("room in the ring");
    }

    struct Rig {
        memory: Arc<GuestMemory>,
        sink: Arc<FrameRecorder>,
        observed: Arc<FrameRecorder>,
        net: VirtioNet,
    }

    fn rig() -> Rig {
        let memory = Arc::new(memory::create(MIN_MEMORY).expect("map guest memory"));
        let sink = Arc::new(FrameRecorder::default());
        let observed = Arc::new(FrameRecorder::default());
        let net = VirtioNet::new(
            memory.clone(),
            [0x52, 0x54, 10, 0, 0, 10],
            None,
            sink.clone(),
        )
        .with_delivery_observer(observed.clone());
        Rig {
            memory,
            sink,
            observed,
            net,
        }
    }

    /// The rig's device brought up by a driver with both queues in guest memory.
    fn running(
        rig: &Rig,
    ) -> (
        MockSplitQueue<'_, GuestMemory>,
        MockSplitQueue<'_, GuestMemory>,
    ) {
        let rx = MockSplitQueue::create(&*rig.memory, GuestAddress(RX_RING), 16);
        let tx = MockSplitQueue::create(&*rig.memory, GuestAddress(TX_RING), 16);
        bring_up(&rig.net, &rx, &tx);
        (rx, tx)
    }

    #[test]
    fn a_received_frame_lands_in_the_guests_buffer_and_is_dirty() {
        let rig = rig();
        let (rx, _tx) = running(&rig);
        offer_receive_buffer(&rx, 0);
        memory::clear_vmm_dirty_bits(&rig.memory);
        rig.net.inject([ethernet_frame(7)]);

        set(&rig.net, reg::QUEUE_NOTIFY, queue_index(RX_QUEUE));

        let mut landed = vec![0u8; NET_HEADER_LEN + 60];
        memory::read(&rig.memory, RX_BUFFER, &mut landed).expect("read the buffer");
        assert_eq!(&landed[NET_HEADER_LEN..], ethernet_frame(7).as_slice());
        assert_eq!(rx.used().idx().load(), 1);
        assert!(
            is_dirty(&rig.memory, RX_BUFFER),
            "the frame's page is not dirty"
        );
        assert!(
            is_dirty(&rig.memory, rx.used_addr().0),
            "the used ring's page is not dirty"
        );
        assert_eq!(rig.observed.frames(), vec![ethernet_frame(7)]);
    }

    #[test]
    fn a_transmitted_frame_reaches_the_sink_without_its_header() {
        let rig = rig();
        let (_rx, tx) = running(&rig);
        let mut bytes = vec![0u8; NET_HEADER_LEN];
        bytes.extend_from_slice(&ethernet_frame(9));
        memory::write(&rig.memory, TX_BUFFER, &bytes).expect("write the frame");
        let buffer = Descriptor::new(
            TX_BUFFER,
            u32::try_from(bytes.len()).expect("a frame"),
            0,
            0,
        );
        tx.add_desc_chains(&[RawDescriptor::from(buffer)], 0)
            .expect("room in the ring");

        set(&rig.net, reg::QUEUE_NOTIFY, queue_index(TX_QUEUE));

        assert_eq!(rig.sink.frames(), vec![ethernet_frame(9)]);
        assert_eq!(tx.used().idx().load(), 1);
    }

    #[test]
    fn a_restored_device_continues_at_the_saved_queue_positions() {
        let rig = rig();
        let (rx, _tx) = running(&rig);
        offer_receive_buffer(&rx, 0);
        rig.net.inject([ethernet_frame(1)]);
        set(&rig.net, reg::QUEUE_NOTIFY, queue_index(RX_QUEUE));
        let saved = rig.net.save();
        let restored = VirtioNet::new(rig.memory.clone(), rig.net.mac(), None, rig.sink.clone());
        restored.restore(&saved).expect("a valid state");
        offer_receive_buffer(&rx, 1);
        restored.inject([ethernet_frame(2)]);

        set(&restored, reg::QUEUE_NOTIFY, queue_index(RX_QUEUE));

        let mut landed = vec![0u8; NET_HEADER_LEN + 60];
        memory::read(&rig.memory, RX_BUFFER + 0x1000, &mut landed).expect("read");
        assert_eq!(&landed[NET_HEADER_LEN..], ethernet_frame(2).as_slice());
        assert_eq!(rx.used().idx().load(), 2);
        assert_eq!(restored.save().queues[RX_QUEUE].next_used, 2);
    }

    #[test]
    fn the_driver_is_asked_not_to_notify_recycled_receive_buffers() {
        let rig = rig();

        let (rx, tx) = running(&rig);

        let flags = |queue: &MockSplitQueue<GuestMemory>| {
            let mut bytes = [0u8; 2];
            memory::read(&rig.memory, queue.used_addr().0, &mut bytes).expect("read the used ring");
            u16::from_le_bytes(bytes)
        };
        assert_eq!(flags(&rx), 1, "VRING_USED_F_NO_NOTIFY on the receive queue");
        assert_eq!(flags(&tx), 0, "transmit notifications stay on");
    }

    #[test]
    fn a_driver_without_version_1_cannot_set_features_ok() {
        let rig = rig();
        set(&rig.net, reg::STATUS, 1 | 2);
        set(&rig.net, reg::DRIVER_FEATURES, 1 << 5);

        set(&rig.net, reg::STATUS, 1 | 2 | STATUS_FEATURES_OK);

        assert_eq!(get(&rig.net, reg::STATUS) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn the_config_space_holds_the_mac() {
        let rig = rig();
        let mut mac = [0u8; 6];

        rig.net.read(reg::CONFIG, &mut mac);

        assert_eq!(mac, [0x52, 0x54, 10, 0, 0, 10]);
    }

    fn sample_state() -> NetState {
        let mut queue = new_queue().state();
        queue.size = 16;
        queue.ready = true;
        queue.next_avail = 7;
        queue.next_used = 5;
        queue.desc_table = 0x40_0000;
        queue.avail_ring = 0x40_1000;
        queue.used_ring = 0x40_2000;
        NetState {
            driver_features: FEATURE_MAC | FEATURE_VERSION_1,
            status: 15,
            queue_sel: 1,
            device_features_sel: 1,
            driver_features_sel: 1,
            interrupt_status: 1,
            queues: [queue, new_queue().state()],
        }
    }

    #[test]
    fn state_round_trips_through_its_encoding() {
        let state = sample_state();
        let mut bytes = Vec::new();
        state.encode(&mut bytes);
        assert_eq!(bytes.len(), NET_STATE_LEN);
        assert_eq!(NetState::decode(&bytes).expect("valid"), state);
    }

    #[test]
    fn truncated_state_is_refused() {
        let mut bytes = Vec::new();
        sample_state().encode(&mut bytes);
        bytes.pop();
        assert!(matches!(
            NetState::decode(&bytes),
            Err(NetError::BadState(_))
        ));
    }

    #[test]
    fn a_bad_flag_byte_is_refused() {
        let mut bytes = Vec::new();
        sample_state().encode(&mut bytes);
        let last = bytes.len() - 1;
        bytes[last] = 7;
        assert!(NetState::decode(&bytes).is_err());
    }

    #[test]
    fn gratuitous_arp_names_the_guest_as_sender_and_target() {
        let frame = gratuitous_arp([0x52, 0x54, 10, 0, 0, 10], [10, 0, 0, 10]);
        assert_eq!(frame.len(), 60);
        assert_eq!(&frame[12..14], &[0x08, 0x06]);
        assert_eq!(&frame[28..32], &[10, 0, 0, 10]);
        assert_eq!(&frame[38..42], &[10, 0, 0, 10]);
    }
}
