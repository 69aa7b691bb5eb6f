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
//! saw: those of epochs that were not committed; a COLO secondary's guest
//! gets all its input that way). An injection wakes a vCPU waiting for
//! input at once. The tap can be plugged in later ([`VirtioNet::plug_input`]:
//! a COLO secondary that takes over), with a [`FrameFilter`] that edits
//! each frame read from it before the guest sees it.
//!
//! Everything the device writes into guest memory (frames, used rings) goes
//! through vm-memory with the VM's dirty bitmap, so it is in the next
//! checkpoint. The device state ([`NetState`]: feature negotiation, status,
//! both queues' addresses and indices) is part of [`crate::state::VmState`];
//! queue processing happens on the vCPU thread, so a paused VM has a device
//! at rest.
//!
//! Files: `sinks` (where transmitted frames go), `state` (the device state in
//! a checkpoint and its encoding), the device here.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{BusAction, BusDevice};
use crate::log_limited;
use crate::memory::GuestMemory;
use crate::tap::{MAX_FRAME, Tap};
use crate::usize_from;

mod sinks;
mod state;
#[cfg(test)]
mod tests;

pub use sinks::{DiscardFrames, FrameFilter, FrameRecorder, FrameSink};
pub use state::{NET_STATE_LEN, NetState};

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
/// Injected frames waiting for the guest at most.
pub const MAX_INJECTED: usize = 16_384;
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

/// The low 32 bits of `value` (registers expose 64-bit values in halves).
fn low_half(value: u64) -> u32 {
    u32::try_from(value & u64::from(u32::MAX)).expect("masked to 32 bits")
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
    /// Injected frames dropped because too many were waiting.
    pub rx_dropped: u64,
}

struct Registers {
    /// Frames to deliver before any from the tap (a takeover's replay).
    injected: VecDeque<Vec<u8>>,
    /// Where received frames come from (none: only injected ones arrive).
    input: Option<Arc<Tap>>,
    /// Edits each frame read from `input` before the guest sees it.
    input_filter: Option<Arc<dyn FrameFilter>>,
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
    fn new(input: Option<Arc<Tap>>) -> Self {
        Self {
            injected: VecDeque::new(),
            input,
            input_filter: None,
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
    /// Signalled by every injection: wakes a vCPU waiting for input.
    injected: EventFd,
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
            registers: Mutex::new(Registers::new(input)),
            memory,
            mac,
            injected: EventFd::new(libc::EFD_NONBLOCK)
                .expect("an eventfd can be created (a process without file descriptors left cannot run a VM)"),
            output,
            delivered: None,
        }
    }

    /// Plugs `input` in as the source of received frames (replacing the
    /// previous one), each edited by `filter` first if given: a COLO
    /// secondary's guest, fed only injected frames until then, takes over
    /// the tap.
    pub fn plug_input(&self, input: Option<Arc<Tap>>, filter: Option<Arc<dyn FrameFilter>>) {
        let mut registers = self.lock();
        registers.input = input;
        registers.input_filter = filter;
        drop(registers);
        // A vCPU waiting on the old source looks again.
        self.wake();
    }

    fn wake(&self) {
        if let Err(error) = self.injected.write(1) {
            log_limited!(warn, %error, "waking the network device's vCPU failed");
        }
    }

    /// Reports every frame delivered to the guest to `observer` as well.
    pub fn with_delivery_observer(mut self, observer: Arc<dyn FrameSink>) -> Self {
        self.delivered = Some(observer);
        self
    }

    /// Queues frames to deliver before any from the tap, and wakes a vCPU
    /// waiting for input. At most [`MAX_INJECTED`] wait: beyond, a frame is
    /// dropped (as a full receive ring would), and counted.
    pub fn inject(&self, frames: impl IntoIterator<Item = Vec<u8>>) {
        let mut registers = self.lock();
        let before = registers.injected.len();
        for frame in frames {
            if registers.injected.len() >= MAX_INJECTED {
                registers.counters.rx_dropped += 1;
                log_limited!(
                    warn,
                    "the guest does not take its frames: an injected frame was dropped"
                );
                continue;
            }
            registers.injected.push_back(frame);
        }
        let added = registers.injected.len() > before;
        drop(registers);
        if added {
            self.wake();
        }
    }

    /// Frames injected and not delivered yet.
    pub fn injected_pending(&self) -> usize {
        self.lock().injected.len()
    }

    /// Forgets the frames injected and not delivered yet (a COLO copy that
    /// loads a checkpoint: the checkpoint's state already has them).
    pub fn clear_injected(&self) -> usize {
        let mut registers = self.lock();
        let dropped = registers.injected.len();
        registers.injected.clear();
        dropped
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
    /// or a frame to be injected, and delivers what the guest has buffers
    /// for. A signal (the VM's pause kick) ends the wait early.
    pub fn wait_for_input(&self, timeout: Duration) {
        // Consumed before looking, so an injection after the look wakes the poll.
        let _ = self.injected.read();
        if self.deliver_received() > 0 {
            return;
        }
        let input = self.lock().input.clone();
        let mut polls = [
            libc::pollfd {
                fd: self.injected.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: input.as_ref().map_or(-1, |tap| tap.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `polls` is an array of two valid pollfds (a negative fd is
        // ignored by poll) for the duration of the call.
        let ready = unsafe { libc::poll(polls.as_mut_ptr(), 2, millis) };
        if ready > 0 {
            self.deliver_received();
        }
    }

    /// Moves frames (injected ones first, then the tap's) into the guest's
    /// receive buffers; returns how many.
    fn deliver_received(&self) -> usize {
        let mut registers = self.lock();
        if !registers.driver_ok() || (registers.input.is_none() && registers.injected.is_empty()) {
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
                match registers
                    .input
                    .as_ref()
                    .map(|tap| tap.read_frame(&mut frame[NET_HEADER_LEN..]))
                {
                    Some(Ok(Some(length))) => {
                        if let Some(filter) = &registers.input_filter {
                            filter.filter(&mut frame[NET_HEADER_LEN..NET_HEADER_LEN + length]);
                        }
                        length
                    }
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

    /// Takes up to `limit` frames waiting on the tap, without delivering
    /// them (the guest is paused for good: a planned switchover forwards
    /// them to the copy that goes on). Frames injected but not delivered
    /// come first.
    pub fn take_waiting_input(&self, limit: usize) -> Vec<Vec<u8>> {
        let mut registers = self.lock();
        let mut frames: Vec<Vec<u8>> = registers.injected.drain(..).take(limit).collect();
        let mut frame = [0u8; MAX_FRAME];
        while frames.len() < limit {
            let Some(Ok(Some(length))) = registers
                .input
                .as_ref()
                .map(|tap| tap.read_frame(&mut frame))
            else {
                break;
            };
            if let Some(filter) = &registers.input_filter {
                filter.filter(&mut frame[..length]);
            }
            frames.push(frame[..length].to_vec());
        }
        frames
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
                    let filter = registers.input_filter.take();
                    *registers = Registers::new(registers.input.take());
                    registers.counters = counters;
                    registers.injected = injected;
                    registers.input_filter = filter;
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
