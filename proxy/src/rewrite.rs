//! COLO sequence rewriting for the secondary (QEMU's `filter-rewriter`):
//! the secondary's guest picks its own TCP initial sequence numbers, so
//! until a checkpoint makes the copies equal, its sequence space is offset
//! from the primary's, the one the clients know.
//!
//! ```text
//! secondary guest SYN(-ACK), seq = S        learn_output: S
//! client's ACK of the primary's SYN(-ACK),  learn_input: P = ack - 1
//!   ack = P + 1 (or the client's SYN-ACK)   offset = S - P
//! input into the secondary guest            rewrite_input: ack += offset
//! secondary output (after a failover)       rewrite_output: seq -= offset
//! checkpoint                                checkpointed: offsets forgotten
//!                                           (the copies share P's space)
//! ```
//!
//! Rewritten segments get their TCP checksum recomputed. Connections the
//! rewriter never saw open (older than the last checkpoint) have offset 0.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet, TcpPacket, TcpSeqNumber,
};

/// A connection, from the guest's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Connection {
    guest: (Ipv4Addr, u16),
    peer: (Ipv4Addr, u16),
}

#[derive(Default)]
struct Offsets {
    /// The secondary guest's initial sequence number.
    secondary_isn: Option<u32>,
    /// The primary guest's, as the client acknowledged it.
    primary_isn: Option<u32>,
}

impl Offsets {
    /// What to add to a primary-space number to get the secondary's.
    fn offset(&self) -> u32 {
        match (self.secondary_isn, self.primary_isn) {
            (Some(secondary), Some(primary)) => secondary.wrapping_sub(primary),
            _ => 0,
        }
    }
}

/// The rewriter; see the module docs.
#[derive(Default)]
pub struct SequenceRewriter {
    connections: HashMap<Connection, Offsets>,
}

/// A TCP segment in an Ethernet/IPv4 frame: where its TCP header starts
/// and its addresses.
fn tcp_segment(frame: &[u8]) -> Option<(usize, usize, Ipv4Addr, Ipv4Addr)> {
    let ethernet = EthernetFrame::new_checked(frame).ok()?;
    if ethernet.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip_offset = EthernetFrame::<&[u8]>::header_len();
    let ip = Ipv4Packet::new_checked(&frame[ip_offset..]).ok()?;
    if ip.next_header() != IpProtocol::Tcp || ip.more_frags() || ip.frag_offset() != 0 {
        return None;
    }
    let start = ip_offset + usize::from(ip.header_len());
    let end = ip_offset + usize::from(ip.total_len());
    TcpPacket::new_checked(&frame[start..end]).ok()?;
    Some((start, end, ip.src_addr(), ip.dst_addr()))
}

impl SequenceRewriter {
    /// An empty rewriter (the copies are equal).
    pub fn new() -> Self {
        Self::default()
    }

    /// Learns from a frame the secondary guest sent (its SYN's sequence
    /// number).
    pub fn learn_output(&mut self, frame: &[u8]) {
        let Some((start, end, source, destination)) = tcp_segment(frame) else {
            return;
        };
        let tcp = TcpPacket::new_unchecked(&frame[start..end]);
        if tcp.syn() {
            let connection = Connection {
                guest: (source, tcp.src_port()),
                peer: (destination, tcp.dst_port()),
            };
            self.connections
                .entry(connection)
                .or_default()
                .secondary_isn = Some(tcp.seq_number().0.cast_unsigned());
        }
    }

    /// Learns from a frame both guests receive: the client's first
    /// acknowledgement of the guest's SYN names the primary's initial
    /// sequence number.
    pub fn learn_input(&mut self, frame: &[u8]) {
        let Some((start, end, source, destination)) = tcp_segment(frame) else {
            return;
        };
        let tcp = TcpPacket::new_unchecked(&frame[start..end]);
        let connection = Connection {
            guest: (destination, tcp.dst_port()),
            peer: (source, tcp.src_port()),
        };
        if let Some(offsets) = self.connections.get_mut(&connection)
            && offsets.primary_isn.is_none()
            && tcp.ack()
        {
            offsets.primary_isn = Some(tcp.ack_number().0.cast_unsigned().wrapping_sub(1));
        }
    }

    /// Rewrites a frame going into the secondary guest: its acknowledgement
    /// number into the secondary's space.
    pub fn rewrite_input(&self, frame: &mut [u8]) {
        let Some((start, end, source, destination)) = tcp_segment(frame) else {
            return;
        };
        let mut tcp = TcpPacket::new_unchecked(&mut frame[start..end]);
        let connection = Connection {
            guest: (destination, tcp.dst_port()),
            peer: (source, tcp.src_port()),
        };
        let offset = self.connections.get(&connection).map_or(0, Offsets::offset);
        if offset == 0 || !tcp.ack() {
            return;
        }
        let ack = tcp.ack_number().0.cast_unsigned().wrapping_add(offset);
        tcp.set_ack_number(TcpSeqNumber(ack.cast_signed()));
        tcp.fill_checksum(&IpAddress::Ipv4(source), &IpAddress::Ipv4(destination));
    }

    /// Rewrites a frame the secondary guest sends out (after a failover):
    /// its sequence number into the primary's space, the one the client
    /// knows.
    pub fn rewrite_output(&self, frame: &mut [u8]) {
        let Some((start, end, source, destination)) = tcp_segment(frame) else {
            return;
        };
        let mut tcp = TcpPacket::new_unchecked(&mut frame[start..end]);
        let connection = Connection {
            guest: (source, tcp.src_port()),
            peer: (destination, tcp.dst_port()),
        };
        let offset = self.connections.get(&connection).map_or(0, Offsets::offset);
        if offset == 0 {
            return;
        }
        let seq = tcp.seq_number().0.cast_unsigned().wrapping_sub(offset);
        tcp.set_seq_number(TcpSeqNumber(seq.cast_signed()));
        tcp.fill_checksum(&IpAddress::Ipv4(source), &IpAddress::Ipv4(destination));
    }

    /// A checkpoint made the copies equal: no offsets any more.
    pub fn checkpointed(&mut self) {
        self.connections.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

    /// A TCP segment from `source` to `destination` with a valid checksum.
    fn segment(
        source: (Ipv4Addr, u16),
        destination: (Ipv4Addr, u16),
        seq: u32,
        ack: u32,
        flags: u8,
    ) -> Vec<u8> {
        let mut frame = vec![0u8; 14 + 20 + 20];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = &mut frame[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&40u16.to_be_bytes());
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&source.0.octets());
        ip[16..20].copy_from_slice(&destination.0.octets());
        let tcp = &mut frame[34..54];
        tcp[0..2].copy_from_slice(&source.1.to_be_bytes());
        tcp[2..4].copy_from_slice(&destination.1.to_be_bytes());
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&ack.to_be_bytes());
        tcp[12] = 0x50;
        tcp[13] = flags;
        let mut packet = TcpPacket::new_unchecked(&mut frame[34..54]);
        packet.fill_checksum(&IpAddress::Ipv4(source.0), &IpAddress::Ipv4(destination.0));
        frame
    }

    fn fields(frame: &[u8]) -> (u32, u32, bool) {
        let tcp = TcpPacket::new_unchecked(&frame[34..54]);
        let (source, destination) = (
            Ipv4Addr::from(<[u8; 4]>::try_from(&frame[26..30]).expect("4 bytes")),
            Ipv4Addr::from(<[u8; 4]>::try_from(&frame[30..34]).expect("4 bytes")),
        );
        (
            tcp.seq_number().0.cast_unsigned(),
            tcp.ack_number().0.cast_unsigned(),
            tcp.verify_checksum(&IpAddress::Ipv4(source), &IpAddress::Ipv4(destination)),
        )
    }

    const SYN_ACK: u8 = 0x12;
    const ACK: u8 = 0x10;
    const PRIMARY_ISN: u32 = 5_000;
    const SECONDARY_ISN: u32 = 90_000;

    /// A rewriter that saw the secondary's SYN-ACK and the client's ACK of
    /// the primary's.
    fn learned() -> SequenceRewriter {
        let mut rewriter = SequenceRewriter::new();
        rewriter.learn_output(&segment(
            (GUEST, 6379),
            (CLIENT, 40_000),
            SECONDARY_ISN,
            777,
            SYN_ACK,
        ));
        rewriter.learn_input(&segment(
            (CLIENT, 40_000),
            (GUEST, 6379),
            778,
            PRIMARY_ISN + 1,
            ACK,
        ));
        rewriter
    }

    #[test]
    fn input_acknowledges_the_secondarys_own_sequence_numbers() {
        let rewriter = learned();
        let mut input = segment((CLIENT, 40_000), (GUEST, 6379), 778, PRIMARY_ISN + 11, ACK);

        rewriter.rewrite_input(&mut input);

        assert_eq!(fields(&input), (778, SECONDARY_ISN + 11, true));
    }

    #[test]
    fn output_after_a_failover_uses_the_primarys_sequence_numbers() {
        let rewriter = learned();
        let mut output = segment(
            (GUEST, 6379),
            (CLIENT, 40_000),
            SECONDARY_ISN + 21,
            790,
            ACK,
        );

        rewriter.rewrite_output(&mut output);

        assert_eq!(fields(&output), (PRIMARY_ISN + 21, 790, true));
    }

    #[test]
    fn other_connections_and_checkpointed_ones_are_left_alone() {
        let mut rewriter = learned();
        let other = segment((CLIENT, 40_001), (GUEST, 6379), 1, PRIMARY_ISN + 11, ACK);
        let mut unchanged = other.clone();
        rewriter.rewrite_input(&mut unchanged);
        rewriter.checkpointed();
        let original = segment((CLIENT, 40_000), (GUEST, 6379), 778, PRIMARY_ISN + 11, ACK);
        let mut after = original.clone();

        rewriter.rewrite_input(&mut after);

        assert_eq!(unchanged, other);
        assert_eq!(after, original);
    }
}
