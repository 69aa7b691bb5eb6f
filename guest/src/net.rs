//! The guest's network interface: the `virtio-drivers` virtio-net driver on
//! the VMM's virtio-mmio device, wrapped as a `smoltcp` device.
//!
//! Memory is identity-mapped, so a buffer's virtual address is its
//! guest-physical address and DMA memory is ordinary heap memory. There are
//! no interrupts: the driver polls its used rings, and the only exits are
//! register accesses (set-up, one `QueueNotify` per frame sent or buffer
//! recycled).

use core::alloc::Layout;
use core::cell::RefCell;
use core::ptr::NonNull;

use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;
use understudy_guest_abi::{PAGE_BYTES, VIRTIO_NET_MMIO_GPA, VIRTIO_NET_MMIO_SIZE};
use virtio_drivers::device::net::{RxBuffer, VirtIONet};
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::{BufferDirection, Hal, PhysAddr};

/// Entries per virtqueue.
const QUEUE_SIZE: usize = 16;
/// Bytes per receive buffer: an Ethernet frame plus the virtio header.
const RX_BUFFER_LEN: usize = 2048;
/// Largest frame handed to smoltcp (no VLAN tags, no jumbo frames).
const MTU: usize = 1514;

/// DMA for the driver: identity-mapped heap memory.
pub struct IdentityHal;

// SAFETY: dma_alloc returns zeroed, page-aligned memory owned by the caller
// until dma_dealloc; physical and virtual addresses are equal (identity map).
unsafe impl Hal for IdentityHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let layout =
            Layout::from_size_align(pages * PAGE_BYTES, PAGE_BYTES).expect("a valid DMA layout");
        // SAFETY: the layout has a non-zero size (pages >= 1 for every caller).
        let pointer = unsafe { alloc::alloc::alloc_zeroed(layout) };
        let pointer = NonNull::new(pointer).expect("the guest heap has room for DMA buffers");
        (pointer.as_ptr() as PhysAddr, pointer)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let layout =
            Layout::from_size_align(pages * PAGE_BYTES, PAGE_BYTES).expect("a valid DMA layout");
        // SAFETY: the driver gives back what dma_alloc returned, with its size.
        unsafe { alloc::alloc::dealloc(vaddr.as_ptr(), layout) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("device registers are not at address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

type Driver = VirtIONet<IdentityHal, MmioTransport<'static>, QUEUE_SIZE>;

/// Frames handed to smoltcp per poll: one, so that the service runs every
/// request a frame completes before the next frame is taken. Requests are
/// then executed in the order their frames arrived, whatever the timing:
/// two copies of the guest fed the same frames in the same order (COLO)
/// answer alike, even when clients on different connections update the
/// same key. Between polls the service can also make listening sockets for
/// a burst of new connections.
const RX_PER_POLL: usize = 1;

/// The virtio-net driver as a smoltcp device.
pub struct NetDevice {
    driver: RefCell<Driver>,
    received_this_poll: usize,
}

impl NetDevice {
    /// Finds and initialises the virtio-net device; `None` when there is none.
    pub fn probe() -> Option<Self> {
        let header = NonNull::new(VIRTIO_NET_MMIO_GPA as *mut VirtIOHeader)?;
        // SAFETY: the VMM maps VIRTIO_NET_MMIO_SIZE bytes of virtio-mmio
        // registers there (identity-mapped in the boot page tables), used by
        // nothing else in the guest.
        let transport =
            unsafe { MmioTransport::new(header, VIRTIO_NET_MMIO_SIZE as usize) }.ok()?;
        let driver = VirtIONet::new(transport, RX_BUFFER_LEN).ok()?;
        Some(Self {
            driver: RefCell::new(driver),
            received_this_poll: 0,
        })
    }

    /// Call before each `Interface::poll`: allows the next batch of frames.
    pub fn begin_poll(&mut self) {
        self.received_this_poll = 0;
    }

    /// Whether the last poll took a frame (more may be waiting: poll again
    /// before yielding).
    pub fn received(&self) -> bool {
        self.received_this_poll > 0
    }

    /// The MAC address the device reports.
    pub fn mac(&self) -> [u8; 6] {
        self.driver.borrow().mac_address()
    }
}

/// A received frame, recycled into the receive queue once consumed.
pub struct Rx<'a> {
    buffer: RxBuffer,
    driver: &'a RefCell<Driver>,
}

/// Permission to send one frame.
pub struct Tx<'a> {
    driver: &'a RefCell<Driver>,
}

impl RxToken for Rx<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let result = f(self.buffer.packet());
        // A buffer that cannot be recycled shrinks the queue; the device goes on.
        let _ = self.driver.borrow_mut().recycle_rx_buffer(self.buffer);
        result
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut buffer = self.driver.borrow().new_tx_buffer(len);
        let result = f(buffer.packet_mut());
        // A frame the device refuses is lost, as on a wire; TCP retransmits.
        let _ = self.driver.borrow_mut().send(buffer);
        result
    }
}

impl Device for NetDevice {
    type RxToken<'a> = Rx<'a>;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        if self.received_this_poll == RX_PER_POLL {
            return None;
        }
        let buffer = self.driver.borrow_mut().receive().ok()?;
        self.received_this_poll += 1;
        Some((
            Rx {
                buffer,
                driver: &self.driver,
            },
            Tx {
                driver: &self.driver,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        self.driver.borrow().can_send().then_some(Tx {
            driver: &self.driver,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut capabilities = DeviceCapabilities::default();
        capabilities.medium = Medium::Ethernet;
        capabilities.max_transmission_unit = MTU;
        capabilities
    }
}
