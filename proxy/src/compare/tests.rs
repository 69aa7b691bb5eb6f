//! Tests of the packet compare: TCP by byte stream (segmentation, offsets,
//! retransmissions, FIN, RST), datagrams, uncomparable frames, timeouts,
//! bounds, and properties over generated segmentations.

use proptest::prelude::*;

use super::*;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

/// An Ethernet/IPv4 frame from the guest (10.0.0.10) to 10.0.0.1 carrying
/// `transport` as protocol `protocol`.
fn ipv4_frame(protocol: u8, transport: &[u8]) -> Vec<u8> {
    let mut frame = vec![0u8; 14 + 20];
    frame[12..14].copy_from_slice(&[0x08, 0x00]);
    let total = u16::try_from(20 + transport.len()).expect("a small frame");
    let ip = &mut frame[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = protocol;
    ip[12..16].copy_from_slice(&[10, 0, 0, 10]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 1]);
    frame.extend_from_slice(transport);
    frame
}

/// A TCP segment from the guest's port 6379 to the peer's port `peer_port`.
fn tcp_to(peer_port: u16, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&6379u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&peer_port.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = flags;
    tcp.extend_from_slice(payload);
    ipv4_frame(6, &tcp)
}

fn tcp(seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    tcp_to(40_000, seq, flags, payload)
}

/// A TCP segment with the ACK flag and acknowledgement number `ack`.
fn tcp_acking(seq: u32, ack: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = tcp(seq, ACK, payload);
    frame[14 + 20 + 8..14 + 20 + 12].copy_from_slice(&ack.to_be_bytes());
    frame
}

fn udp(payload: &[u8]) -> Vec<u8> {
    let mut udp = vec![0u8; 8];
    udp[0..2].copy_from_slice(&53u16.to_be_bytes());
    udp[2..4].copy_from_slice(&5353u16.to_be_bytes());
    udp.extend_from_slice(payload);
    ipv4_frame(17, &udp)
}

/// An ARP reply from the guest (10.0.0.10) to 10.0.0.1, padded to 60 bytes.
fn arp_reply(sender_mac_last: u8) -> Vec<u8> {
    let mut frame = vec![0u8; 60];
    frame[12..14].copy_from_slice(&[0x08, 0x06]);
    // Ethernet/IPv4, a reply; sender MAC and address; target's.
    let arp = [
        &[0, 1, 8, 0, 6, 4, 0, 2][..],
        &[2, 0, 0, 0, 0, sender_mac_last],
        &[10, 0, 0, 10],
        &[2, 0, 0, 0, 0, 1],
        &[10, 0, 0, 1],
    ]
    .concat();
    frame[14..42].copy_from_slice(&arp);
    frame
}

/// An IPv6 frame (not compared).
fn ipv6() -> Vec<u8> {
    let mut frame = vec![0u8; 62];
    frame[12..14].copy_from_slice(&[0x86, 0xdd]);
    frame
}

const PRIMARY_ISN: u32 = 1000;
const SECONDARY_ISN: u32 = 900_000;

fn comparer() -> Comparer {
    Comparer::new(CompareConfig::default())
}

/// A comparer that saw both copies answer a connection (SYN-ACK), with
/// different initial sequence numbers.
fn connected() -> (Comparer, Instant) {
    let mut comparer = comparer();
    let now = Instant::now();
    comparer.primary(tcp(PRIMARY_ISN, SYN | ACK, b""), now);
    comparer.secondary(&tcp(SECONDARY_ISN, SYN | ACK, b""), now);
    (comparer, now)
}

fn released(actions: &[Action]) -> usize {
    actions
        .iter()
        .filter(|action| matches!(action, Action::Release(_)))
        .count()
}

fn checkpoints(actions: &[Action]) -> Vec<CheckpointCause> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Checkpoint(cause) => Some(*cause),
            Action::Release(_) => None,
        })
        .collect()
}

#[test]
fn a_syn_ack_is_released_once_the_secondary_sent_its_own() {
    let mut comparer = comparer();
    let now = Instant::now();

    let first = comparer.primary(tcp(PRIMARY_ISN, SYN | ACK, b""), now);
    let second = comparer.secondary(&tcp(SECONDARY_ISN, SYN | ACK, b""), now);

    assert_eq!(released(&first), 0);
    assert_eq!(released(&second), 1);
}

#[test]
fn matching_payload_is_released_when_the_secondary_produced_it() {
    let (mut comparer, now) = connected();

    let held = comparer.primary(tcp(PRIMARY_ISN + 1, PSH | ACK, b"+OK\r\n"), now);
    let matched = comparer.secondary(&tcp(SECONDARY_ISN + 1, PSH | ACK, b"+OK\r\n"), now);

    assert!(held.is_empty());
    assert_eq!(
        matched,
        vec![Action::Release(tcp(PRIMARY_ISN + 1, PSH | ACK, b"+OK\r\n"))]
    );
    assert_eq!(comparer.held_frames(), 0);
}

#[test]
fn the_secondary_may_be_first() {
    let (mut comparer, now) = connected();

    comparer.secondary(&tcp(SECONDARY_ISN + 1, PSH | ACK, b":1\r\n"), now);
    let actions = comparer.primary(tcp(PRIMARY_ISN + 1, PSH | ACK, b":1\r\n"), now);

    assert_eq!(released(&actions), 1);
}

#[test]
fn segments_cut_differently_on_each_side_still_match() {
    let (mut comparer, now) = connected();
    comparer.secondary(&tcp(SECONDARY_ISN + 1, ACK, b"hel"), now);
    comparer.secondary(&tcp(SECONDARY_ISN + 4, ACK, b"lo wor"), now);

    let first = comparer.primary(tcp(PRIMARY_ISN + 1, ACK, b"hello"), now);
    let second = comparer.primary(tcp(PRIMARY_ISN + 6, ACK, b" world"), now);
    let third = comparer.secondary(&tcp(SECONDARY_ISN + 10, ACK, b"ld"), now);

    assert_eq!(released(&first), 1);
    assert_eq!(released(&second), 0);
    assert_eq!(released(&third), 1);
}

#[test]
fn different_payload_asks_for_a_checkpoint_and_releases_nothing() {
    let (mut comparer, now) = connected();
    comparer.primary(tcp(PRIMARY_ISN + 1, PSH | ACK, b":42\r\n"), now);

    let actions = comparer.secondary(&tcp(SECONDARY_ISN + 1, PSH | ACK, b":43\r\n"), now);

    assert_eq!(
        actions,
        vec![Action::Checkpoint(CheckpointCause::Mismatch(
            Mismatch::TcpPayload
        ))]
    );
    assert_eq!(comparer.held_frames(), 1);
}

#[test]
fn a_pure_ack_of_the_primary_passes_at_once() {
    let (mut comparer, now) = connected();

    let actions = comparer.primary(tcp(PRIMARY_ISN + 1, ACK, b""), now);

    assert_eq!(released(&actions), 1);
    assert_eq!(comparer.metrics().passed, 1);
}

#[test]
fn a_pure_ack_beyond_the_secondarys_waits_until_the_secondary_acknowledges_as_far() {
    let (mut comparer, now) = connected();

    let early = comparer.primary(tcp_acking(PRIMARY_ISN + 1, 500, b""), now);
    let behind = comparer.secondary(&tcp_acking(SECONDARY_ISN + 1, 400, b""), now);
    let caught_up = comparer.secondary(&tcp_acking(SECONDARY_ISN + 1, 500, b""), now);

    assert_eq!(released(&early), 0);
    assert_eq!(released(&behind), 0);
    assert_eq!(
        caught_up,
        vec![Action::Release(tcp_acking(PRIMARY_ISN + 1, 500, b""))]
    );
}

#[test]
fn matching_bytes_wait_while_they_acknowledge_more_than_the_secondary_did() {
    let (mut comparer, now) = connected();
    comparer.primary(tcp_acking(PRIMARY_ISN + 1, 700, b"reply"), now);

    let same_bytes = comparer.secondary(&tcp_acking(SECONDARY_ISN + 1, 650, b"reply"), now);
    let acknowledged = comparer.secondary(&tcp_acking(SECONDARY_ISN + 6, 700, b""), now);

    assert_eq!(released(&same_bytes), 0);
    assert_eq!(released(&acknowledged), 1);
}

#[test]
fn a_newer_pure_ack_replaces_a_waiting_one() {
    let (mut comparer, now) = connected();
    comparer.primary(tcp_acking(PRIMARY_ISN + 1, 500, b""), now);
    comparer.primary(tcp_acking(PRIMARY_ISN + 1, 600, b""), now);

    let actions = comparer.secondary(&tcp_acking(SECONDARY_ISN + 1, 600, b""), now);

    assert_eq!(
        actions,
        vec![Action::Release(tcp_acking(PRIMARY_ISN + 1, 600, b""))]
    );
    assert_eq!(comparer.metrics().superseded, 1);
    assert_eq!(comparer.held_frames(), 0);
}

#[test]
fn a_waiting_pure_ack_goes_out_at_the_checkpoint() {
    let (mut comparer, now) = connected();
    comparer.primary(tcp_acking(PRIMARY_ISN + 1, 500, b""), now);

    let released_at_checkpoint = comparer.checkpointed();

    assert_eq!(
        released_at_checkpoint,
        vec![tcp_acking(PRIMARY_ISN + 1, 500, b"")]
    );
}

#[test]
fn a_retransmission_of_released_bytes_passes_at_once() {
    let (mut comparer, now) = connected();
    comparer.primary(tcp(PRIMARY_ISN + 1, ACK, b"abc"), now);
    comparer.secondary(&tcp(SECONDARY_ISN + 1, ACK, b"abc"), now);

    let again = comparer.primary(tcp(PRIMARY_ISN + 1, ACK, b"abc"), now);

    assert_eq!(released(&again), 1);
}

#[test]
fn a_fin_is_released_when_the_secondary_ends_at_the_same_byte() {
    let (mut comparer, now) = connected();
    comparer.primary(tcp(PRIMARY_ISN + 1, FIN | ACK, b"bye"), now);

    let without_fin = comparer.secondary(&tcp(SECONDARY_ISN + 1, ACK, b"bye"), now);
    let with_fin = comparer.secondary(&tcp(SECONDARY_ISN + 4, FIN | ACK, b""), now);

    assert_eq!(released(&without_fin), 0);
    assert_eq!(released(&with_fin), 1);
}

#[test]
fn a_fin_at_another_byte_is_a_mismatch() {
    let (mut comparer, now) = connected();
    comparer.primary(tcp(PRIMARY_ISN + 1, FIN | ACK, b"by"), now);

    let actions = comparer.secondary(&tcp(SECONDARY_ISN + 1, FIN | ACK, b"bye"), now);

    assert_eq!(
        checkpoints(&actions),
        vec![CheckpointCause::Mismatch(Mismatch::TcpFin)]
    );
}

#[test]
fn a_reset_waits_for_the_secondarys_reset() {
    let (mut comparer, now) = connected();
    let held = comparer.primary(tcp(PRIMARY_ISN + 1, RST | ACK, b""), now);

    let matched = comparer.secondary(&tcp(SECONDARY_ISN + 1, RST | ACK, b""), now);

    assert_eq!(released(&held), 0);
    assert_eq!(released(&matched), 1);
}

#[test]
fn connections_are_compared_separately() {
    let (mut comparer, now) = connected();
    comparer.primary(tcp_to(40_001, 77, ACK, b"other"), now);

    let actions = comparer.secondary(&tcp(SECONDARY_ISN + 1, ACK, b"other"), now);

    assert_eq!(released(&actions), 0);
    assert_eq!(comparer.held_frames(), 1);
}

#[test]
fn a_connection_first_seen_mid_stream_compares_with_shared_sequence_numbers() {
    let mut comparer = comparer();
    let now = Instant::now();

    comparer.primary(tcp_to(41_000, 5_000, ACK, b"x"), now);
    let actions = comparer.secondary(&tcp_to(41_000, 5_000, ACK, b"x"), now);

    assert_eq!(released(&actions), 1);
}

#[test]
fn primary_bytes_before_the_secondarys_first_mid_stream_byte_are_a_mismatch() {
    let mut comparer = comparer();
    let now = Instant::now();
    comparer.secondary(&tcp_to(41_000, 5_010, ACK, b"later"), now);

    let actions = comparer.primary(tcp_to(41_000, 5_000, ACK, b"0123456789"), now);

    assert_eq!(
        checkpoints(&actions),
        vec![CheckpointCause::Mismatch(Mismatch::TcpPayload)]
    );
    assert_eq!(released(&actions), 0);
}

#[test]
fn udp_compares_byte_for_byte_in_order() {
    let mut comparer = comparer();
    let now = Instant::now();
    comparer.primary(udp(b"one"), now);
    comparer.primary(udp(b"two"), now);

    let first = comparer.secondary(&udp(b"one"), now);
    let second = comparer.secondary(&udp(b"TWO"), now);

    assert_eq!(released(&first), 1);
    assert_eq!(
        checkpoints(&second),
        vec![CheckpointCause::Mismatch(Mismatch::Udp)]
    );
}

#[test]
fn an_uncomparable_frame_waits_for_a_checkpoint_and_is_then_released() {
    let mut comparer = comparer();
    let now = Instant::now();

    let actions = comparer.primary(ipv6(), now);
    let after = comparer.checkpointed();

    assert_eq!(
        actions,
        vec![Action::Checkpoint(CheckpointCause::Uncomparable)]
    );
    assert_eq!(after, vec![ipv6()]);
}

#[test]
fn the_same_arp_reply_from_both_copies_is_released() {
    let mut comparer = comparer();
    let now = Instant::now();
    let mut secondary = arp_reply(7);
    // Padding is not compared.
    secondary[59] = 0xff;

    let held = comparer.primary(arp_reply(7), now);
    let actions = comparer.secondary(&secondary, now);

    assert!(held.is_empty());
    assert_eq!(actions, vec![Action::Release(arp_reply(7))]);
}

#[test]
fn different_arp_replies_ask_for_a_checkpoint() {
    let mut comparer = comparer();
    let now = Instant::now();

    comparer.primary(arp_reply(7), now);
    let actions = comparer.secondary(&arp_reply(8), now);

    assert_eq!(
        actions,
        vec![Action::Checkpoint(CheckpointCause::Mismatch(Mismatch::Arp))]
    );
}

#[test]
fn a_frame_held_too_long_asks_for_a_checkpoint() {
    let (mut comparer, now) = connected();
    comparer.primary(tcp(PRIMARY_ISN + 1, ACK, b"late"), now);

    let early = comparer.expire(now + Duration::from_millis(5));
    let late = comparer.expire(now + Duration::from_millis(11));

    assert_eq!(early, None);
    assert_eq!(late, Some(Action::Checkpoint(CheckpointCause::Timeout)));
}

#[test]
fn a_full_queue_drops_the_new_frame_and_asks_for_a_checkpoint() {
    let mut comparer = Comparer::new(CompareConfig {
        max_frames: 2,
        ..CompareConfig::default()
    });
    let now = Instant::now();
    comparer.primary(udp(b"1"), now);
    comparer.primary(udp(b"2"), now);

    let actions = comparer.primary(udp(b"3"), now);

    assert_eq!(
        actions,
        vec![Action::Checkpoint(CheckpointCause::QueueFull)]
    );
    assert_eq!(comparer.held_frames(), 2);
    assert_eq!(comparer.metrics().dropped, 1);
}

#[test]
fn after_a_checkpoint_held_frames_go_out_in_order_and_the_copies_share_sequence_numbers() {
    let (mut comparer, now) = connected();
    comparer.primary(tcp(PRIMARY_ISN + 1, ACK, b"ab"), now);
    comparer.primary(udp(b"u"), now);
    comparer.primary(tcp(PRIMARY_ISN + 3, ACK, b"cd"), now);
    // The secondary diverged before the checkpoint.
    comparer.secondary(&tcp(SECONDARY_ISN + 1, ACK, b"zz"), now);

    let out = comparer.checkpointed();
    comparer.primary(tcp(PRIMARY_ISN + 5, ACK, b"ef"), now);
    let next = comparer.secondary(&tcp(PRIMARY_ISN + 5, ACK, b"ef"), now);

    assert_eq!(
        out,
        vec![
            tcp(PRIMARY_ISN + 1, ACK, b"ab"),
            udp(b"u"),
            tcp(PRIMARY_ISN + 3, ACK, b"cd"),
        ]
    );
    assert_eq!(released(&next), 1);
}

#[test]
fn a_secondary_far_ahead_asks_for_a_checkpoint() {
    let mut comparer = Comparer::new(CompareConfig {
        max_secondary_bytes: 8,
        ..CompareConfig::default()
    });
    let now = Instant::now();
    comparer.primary(tcp(PRIMARY_ISN, SYN | ACK, b""), now);
    comparer.secondary(&tcp(SECONDARY_ISN, SYN | ACK, b""), now);

    let actions = comparer.secondary(&tcp(SECONDARY_ISN + 1, ACK, b"0123456789"), now);

    assert_eq!(checkpoints(&actions), vec![CheckpointCause::SecondaryAhead]);
}

/// Cuts `stream` into segments at `cuts` (positions, any order).
fn segments(stream: &[u8], cuts: &[usize]) -> Vec<(usize, Vec<u8>)> {
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|cut| cut % stream.len().max(1))
        .chain([0, stream.len()])
        .collect();
    points.sort_unstable();
    points.dedup();
    points
        .windows(2)
        .map(|pair| (pair[0], stream[pair[0]..pair[1]].to_vec()))
        .collect()
}

proptest! {
    #[test]
    fn one_stream_cut_and_ordered_any_way_is_released_whole_without_checkpoints(
        stream in proptest::collection::vec(any::<u8>(), 1..3000),
        primary_cuts in proptest::collection::vec(any::<usize>(), 0..12),
        secondary_cuts in proptest::collection::vec(any::<usize>(), 0..12),
        secondary_order in any::<u64>(),
        interleave in proptest::collection::vec(any::<bool>(), 0..40),
        isn in any::<u32>(),
    ) {
        let (mut comparer, now) = {
            let mut comparer = comparer();
            let now = Instant::now();
            comparer.primary(tcp(PRIMARY_ISN, SYN | ACK, b""), now);
            comparer.secondary(&tcp(isn, SYN | ACK, b""), now);
            (comparer, now)
        };
        let primary = segments(&stream, &primary_cuts);
        let mut secondary = segments(&stream, &secondary_cuts);
        // Reorder the secondary's segments (a rotation keeps it simple).
        let rotate = usize::try_from(secondary_order % secondary.len() as u64).expect("small");
        secondary.rotate_left(rotate);
        let mut actions = Vec::new();
        let (mut next_primary, mut next_secondary) = (0, 0);
        let mut choices = interleave.into_iter();
        while next_primary < primary.len() || next_secondary < secondary.len() {
            let take_primary = next_secondary == secondary.len()
                || (next_primary < primary.len() && choices.next().unwrap_or(true));
            if take_primary {
                let (at, bytes) = &primary[next_primary];
                let seq = PRIMARY_ISN + 1 + u32::try_from(*at).expect("small");
                actions.extend(comparer.primary(tcp(seq, ACK, bytes), now));
                next_primary += 1;
            } else {
                let (at, bytes) = &secondary[next_secondary];
                let seq = isn.wrapping_add(1).wrapping_add(u32::try_from(*at).expect("small"));
                actions.extend(comparer.secondary(&tcp(seq, ACK, bytes), now));
                next_secondary += 1;
            }
        }

        prop_assert_eq!(checkpoints(&actions), vec![]);
        prop_assert_eq!(released(&actions), primary.len());
        prop_assert_eq!(comparer.held_frames(), 0);
    }

    #[test]
    fn one_different_byte_is_always_a_mismatch(
        stream in proptest::collection::vec(any::<u8>(), 1..2000),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
        flip in any::<usize>(),
    ) {
        let (mut comparer, now) = connected();
        let mut diverged = stream.clone();
        let at = flip % stream.len();
        diverged[at] ^= 0x5a;
        let mut actions = Vec::new();
        for (at, bytes) in segments(&stream, &cuts) {
            let seq = PRIMARY_ISN + 1 + u32::try_from(at).expect("small");
            actions.extend(comparer.primary(tcp(seq, ACK, &bytes), now));
        }
        for (at, bytes) in segments(&diverged, &cuts) {
            let seq = SECONDARY_ISN + 1 + u32::try_from(at).expect("small");
            actions.extend(comparer.secondary(&tcp(seq, ACK, &bytes), now));
        }

        // Asked for (again at each later secondary segment, until the
        // checkpoint happens), and the segment with the byte never released.
        let asked = checkpoints(&actions);
        prop_assert!(!asked.is_empty());
        prop_assert!(asked
            .iter()
            .all(|cause| *cause == CheckpointCause::Mismatch(Mismatch::TcpPayload)));
        prop_assert!(comparer.held_frames() >= 1);
    }
}

#[test]
fn a_diverged_flow_asks_again_but_is_counted_once_per_checkpoint() {
    let mut comparer = comparer();
    let now = Instant::now();
    comparer.primary(udp(b"one"), now);
    comparer.secondary(&udp(b"ONE"), now);

    let again = comparer.secondary(&udp(b"two"), now);
    let counted_before = comparer.metrics().checkpoints.clone();
    comparer.checkpointed();
    comparer.primary(udp(b"three"), now);
    comparer.secondary(&udp(b"THREE"), now);

    let cause = CheckpointCause::Mismatch(Mismatch::Udp);
    assert_eq!(checkpoints(&again), vec![cause]);
    assert_eq!(counted_before.get(&cause), Some(&1));
    assert_eq!(comparer.metrics().checkpoints.get(&cause), Some(&2));
}
