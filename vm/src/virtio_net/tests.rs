//! Tests of the device: transmit, receive, dirty tracking, state.

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
fn bring_up(net: &VirtioNet, rx: &MockSplitQueue<GuestMemory>, tx: &MockSplitQueue<GuestMemory>) {
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
fn an_injected_frame_wakes_a_vcpu_waiting_for_input() {
    let rig = rig();
    let (rx, _tx) = running(&rig);
    offer_receive_buffer(&rx, 0);
    std::thread::scope(|scope| {
        let waiter = scope.spawn(|| {
            // Far longer than the test may take: only the injection ends it.
            rig.net.wait_for_input(Duration::from_secs(600));
        });
        std::thread::sleep(Duration::from_millis(20));

        rig.net.inject([ethernet_frame(3)]);
        waiter.join().expect("the waiting thread");
    });

    assert_eq!(rx.used().idx().load(), 1);
    assert_eq!(rig.net.injected_pending(), 0);
}

#[test]
fn cleared_injections_are_never_delivered() {
    let rig = rig();
    let (rx, _tx) = running(&rig);
    rig.net.inject([ethernet_frame(4), ethernet_frame(5)]);

    let cleared = rig.net.clear_injected();
    offer_receive_buffer(&rx, 0);
    set(&rig.net, reg::QUEUE_NOTIFY, queue_index(RX_QUEUE));

    assert_eq!(cleared, 2);
    assert_eq!(rx.used().idx().load(), 0);
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
