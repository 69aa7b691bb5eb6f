//! COLO packet compare: the primary's output frames are held until the
//! secondary — a running copy fed the same input — produced the same
//! output; then they are released at once, without waiting for a
//! checkpoint. What differs, what cannot be compared, and what waits too
//! long asks for a checkpoint instead.
//!
//! ```text
//! primary frame   -> Comparer::primary    held, or released at once (pure ACK,
//!                                         retransmission of bytes released)
//! secondary frame -> Comparer::secondary  its bytes recorded (never sent out)
//!                 -> Action::Release(frame)            both agree
//!                 -> Action::Checkpoint(cause)         mismatch, uncomparable
//!                                                      frame, queue full
//! Comparer::expire(now)                   -> Checkpoint(Timeout) when a held
//!                                            frame waited longer than the timeout
//! checkpoint acknowledged -> Comparer::checkpointed    every held frame released,
//!                                                      the secondary's output
//!                                                      forgotten, both copies equal
//! ```
//!
//! How frames compare (QEMU's `colo-compare` rules, see
//! `../shared/notes/designs.md`):
//!
//! - **TCP** by payload bytes at matching sequence offsets, per connection
//!   (the guest's address and port and the peer's): each side's sequence
//!   numbers are taken relative to its own initial sequence number (the
//!   secondary's differs until a checkpoint makes the copies equal), so
//!   segments cut differently on the two sides still compare. Headers,
//!   windows, options and ACK timing are not compared. No primary segment
//!   goes out acknowledging more of the peer's bytes than the secondary
//!   acknowledged (its highest ACK number): the peer never learns that
//!   bytes arrived which the secondary may not have (it would not send
//!   them again, and a takeover would lose them). A primary pure ACK (or a
//!   retransmission of bytes already released) needs nothing else; the
//!   latest one per connection waits, newer ones replace it. SYN, FIN and
//!   RST must be matched by the secondary's (FIN at the same sequence
//!   number).
//! - **UDP and ICMP** byte for byte from the transport header on, in order
//!   per flow.
//! - **ARP** (IPv4 over Ethernet) byte for byte, in order per pair of
//!   addresses: both copies answer the same requests the same way, so a
//!   neighbour's cache refresh costs no checkpoint.
//! - **Anything else** (IPv6, IPv4 fragments, other protocols): not
//!   compared, and never released before a checkpoint. The frame is held
//!   and a checkpoint requested, as Remus-style output commit would: such
//!   frames are rare for the guests we run, and releasing them uncompared
//!   (QEMU's choice) would let un-checkpointed state escape.
//!
//! Bounds: held primary frames are limited in count and bytes; a frame
//! beyond them is dropped (the guest's TCP sends it again) and a checkpoint
//! requested, which releases the queue. The secondary's unmatched bytes per
//! connection are limited too: beyond them the copies have diverged, and a
//! checkpoint is requested.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use smoltcp::wire::{
    ArpPacket, EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, TcpPacket,
};

/// Why a checkpoint is needed now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CheckpointCause {
    /// The copies produced different output.
    Mismatch(Mismatch),
    /// A held frame waited longer than the compare timeout.
    Timeout,
    /// A frame that cannot be compared waits for a checkpoint.
    Uncomparable,
    /// The held queue is full.
    QueueFull,
    /// The secondary produced far more than the primary on a connection.
    SecondaryAhead,
}

impl CheckpointCause {
    /// A short name, for metrics and reports.
    pub fn name(self) -> &'static str {
        match self {
            CheckpointCause::Mismatch(Mismatch::TcpPayload) => "mismatch-tcp-payload",
            CheckpointCause::Mismatch(Mismatch::TcpFin) => "mismatch-tcp-fin",
            CheckpointCause::Mismatch(Mismatch::Udp) => "mismatch-udp",
            CheckpointCause::Mismatch(Mismatch::Icmp) => "mismatch-icmp",
            CheckpointCause::Mismatch(Mismatch::Arp) => "mismatch-arp",
            CheckpointCause::Timeout => "timeout",
            CheckpointCause::Uncomparable => "uncomparable",
            CheckpointCause::QueueFull => "queue-full",
            CheckpointCause::SecondaryAhead => "secondary-ahead",
        }
    }
}

/// What differed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mismatch {
    /// TCP payload bytes at the same offset.
    TcpPayload,
    /// A FIN at another sequence number.
    TcpFin,
    /// A UDP datagram.
    Udp,
    /// An ICMP message.
    Icmp,
    /// An ARP packet.
    Arp,
}

/// What the caller must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send this primary frame out: the secondary agrees.
    Release(Vec<u8>),
    /// Take a checkpoint now, then call [`Comparer::checkpointed`].
    Checkpoint(CheckpointCause),
}

/// Limits of the comparer.
#[derive(Clone, Copy, Debug)]
pub struct CompareConfig {
    /// A held frame older than this forces a checkpoint.
    pub timeout: Duration,
    /// Most primary frames held.
    pub max_frames: usize,
    /// Most primary bytes held.
    pub max_bytes: usize,
    /// Most unmatched secondary bytes per connection.
    pub max_secondary_bytes: usize,
}

impl Default for CompareConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_millis(10),
            max_frames: 4096,
            max_bytes: 16 << 20,
            max_secondary_bytes: 4 << 20,
        }
    }
}

/// What the comparer did, for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompareMetrics {
    /// Primary frames that were compared (held until matched).
    pub compared: u64,
    /// Primary frames released because the secondary agreed.
    pub matched: u64,
    /// Primary frames released at once (pure ACKs, retransmissions).
    pub passed: u64,
    /// Checkpoints asked for, by cause (each cause counted once between
    /// two checkpoints).
    pub checkpoints: HashMap<CheckpointCause, u64>,
    /// Primary frames dropped because the queue was full.
    pub dropped: u64,
    /// Primary pure ACKs (or retransmissions) replaced by a newer one
    /// before the secondary acknowledged as far (never sent).
    pub superseded: u64,
    /// Time from a compared frame's arrival to its release: bucket `i`
    /// counts latencies below `2^i` microseconds (the last: the rest).
    pub latency_micros_log2: [u64; 16],
}

/// The guest's side of a flow and the peer's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FlowKey {
    protocol: u8,
    guest: (Ipv4Addr, u16),
    peer: (Ipv4Addr, u16),
}

/// A parsed output frame.
enum Parsed {
    Tcp {
        key: FlowKey,
        seq: u32,
        /// The acknowledgement number, with the ACK flag.
        ack: Option<u32>,
        syn: bool,
        fin: bool,
        rst: bool,
        payload: std::ops::Range<usize>,
    },
    Datagram {
        key: FlowKey,
        transport: std::ops::Range<usize>,
    },
    Uncomparable,
}

fn parse(frame: &[u8]) -> Parsed {
    let Ok(ethernet) = EthernetFrame::new_checked(frame) else {
        return Parsed::Uncomparable;
    };
    let ip_offset = EthernetFrame::<&[u8]>::header_len();
    if ethernet.ethertype() == EthernetProtocol::Arp {
        return parse_arp(frame, ip_offset);
    }
    if ethernet.ethertype() != EthernetProtocol::Ipv4 {
        return Parsed::Uncomparable;
    }
    let Ok(ip) = Ipv4Packet::new_checked(&frame[ip_offset..]) else {
        return Parsed::Uncomparable;
    };
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Parsed::Uncomparable;
    }
    let transport_offset = ip_offset + usize::from(ip.header_len());
    let transport_end = ip_offset + usize::from(ip.total_len());
    let (source, destination) = (ip.src_addr(), ip.dst_addr());
    let transport = &frame[transport_offset..transport_end];
    match ip.next_header() {
        IpProtocol::Tcp => {
            let Ok(tcp) = TcpPacket::new_checked(transport) else {
                return Parsed::Uncomparable;
            };
            let payload_offset = transport_offset + usize::from(tcp.header_len());
            Parsed::Tcp {
                key: FlowKey {
                    protocol: 6,
                    guest: (source, tcp.src_port()),
                    peer: (destination, tcp.dst_port()),
                },
                seq: u32::from_be_bytes(transport[4..8].try_into().expect("4 bytes")),
                ack: tcp
                    .ack()
                    .then(|| u32::from_be_bytes(transport[8..12].try_into().expect("4 bytes"))),
                syn: tcp.syn(),
                fin: tcp.fin(),
                rst: tcp.rst(),
                payload: payload_offset..transport_end,
            }
        }
        IpProtocol::Udp if transport.len() >= 8 => Parsed::Datagram {
            key: FlowKey {
                protocol: 17,
                guest: (source, u16::from_be_bytes([transport[0], transport[1]])),
                peer: (
                    destination,
                    u16::from_be_bytes([transport[2], transport[3]]),
                ),
            },
            transport: transport_offset..transport_end,
        },
        IpProtocol::Icmp => Parsed::Datagram {
            key: FlowKey {
                protocol: 1,
                guest: (source, 0),
                peer: (destination, 0),
            },
            transport: transport_offset..transport_end,
        },
        _ => Parsed::Uncomparable,
    }
}

/// An IPv4-over-Ethernet ARP packet at `offset`: a flow per pair of
/// protocol addresses, compared over the packet (not the frame's padding).
fn parse_arp(frame: &[u8], offset: usize) -> Parsed {
    let Ok(arp) = ArpPacket::new_checked(&frame[offset..]) else {
        return Parsed::Uncomparable;
    };
    let (Ok(sender), Ok(target)) = (
        <[u8; 4]>::try_from(arp.source_protocol_addr()),
        <[u8; 4]>::try_from(arp.target_protocol_addr()),
    ) else {
        return Parsed::Uncomparable;
    };
    let length = 8 + 2 * (usize::from(arp.hardware_len()) + usize::from(arp.protocol_len()));
    Parsed::Datagram {
        key: FlowKey {
            protocol: ARP_FLOW,
            guest: (Ipv4Addr::from(sender), 0),
            peer: (Ipv4Addr::from(target), 0),
        },
        transport: offset..offset + length,
    }
}

/// The flow key's protocol for ARP (not an IP protocol number in use here).
const ARP_FLOW: u8 = 0;

/// A primary frame waiting.
struct Held {
    frame: Vec<u8>,
    arrived: Instant,
    /// Arrival order across flows, for release at a checkpoint.
    order: u64,
}

/// A held TCP segment, in its side's relative sequence space.
struct Segment {
    held: Held,
    start: u32,
    end: u32,
    /// Its acknowledgement number (with the ACK flag).
    ack: Option<u32>,
    payload: std::ops::Range<usize>,
    syn: bool,
    fin: bool,
    rst: bool,
}

/// One TCP connection's compare state.
#[derive(Default)]
struct TcpFlow {
    primary_isn: Option<u32>,
    secondary_isn: Option<u32>,
    queue: VecDeque<Segment>,
    /// The secondary's bytes from `secondary_base` on, contiguous.
    secondary_base: u32,
    secondary_bytes: Vec<u8>,
    /// The secondary's segments beyond a gap.
    secondary_ahead: BTreeMap<u32, Vec<u8>>,
    secondary_syn: bool,
    secondary_fin: Option<u32>,
    secondary_rst: bool,
    /// End of everything the primary sent (relative).
    primary_next: u32,
    /// The compare base came from the secondary's first segment of a
    /// connection first seen mid-stream: primary bytes before it were
    /// never compared.
    base_unverified: bool,
    /// The highest acknowledgement number the secondary sent: the peer's
    /// bytes it has for sure (both copies see the peer's numbers).
    secondary_ack: Option<u32>,
    /// The highest acknowledgement number the primary sent.
    primary_ack: Option<u32>,
    /// The primary's latest pure ACK (or retransmission) whose
    /// acknowledgement number the secondary has not reached yet; a newer
    /// one replaces it (acknowledgements are cumulative).
    pending_ack: Option<(Held, u32)>,
}

/// Whether acknowledgement number `ack` is at or below `bound`.
fn covered(ack: Option<u32>, bound: Option<u32>) -> bool {
    match (ack, bound) {
        (None, _) => true,
        (Some(ack), Some(bound)) => ahead(ack, bound) >= 0,
        (Some(_), None) => false,
    }
}

/// The higher of two acknowledgement numbers.
fn later(current: Option<u32>, ack: Option<u32>) -> Option<u32> {
    match (current, ack) {
        (Some(current), Some(ack)) if ahead(current, ack) > 0 => Some(ack),
        (Some(current), _) => Some(current),
        (None, ack) => ack,
    }
}

impl TcpFlow {
    /// Takes in the secondary's bytes at relative `start`: appended when
    /// they continue the contiguous bytes (overlap skipped), kept aside
    /// when they lie beyond a gap.
    fn record_secondary(&mut self, start: u32, bytes: &[u8]) {
        let end = self
            .secondary_base
            .wrapping_add(seq_len(self.secondary_bytes.len()));
        if ahead(end, start) > 0 {
            self.secondary_ahead.insert(start, bytes.to_vec());
            return;
        }
        self.append_secondary(start, bytes);
        while let Some((&start, _)) = self.secondary_ahead.iter().next() {
            let end = self
                .secondary_base
                .wrapping_add(seq_len(self.secondary_bytes.len()));
            if ahead(end, start) > 0 {
                break;
            }
            let bytes = self.secondary_ahead.remove(&start).expect("just seen");
            self.append_secondary(start, &bytes);
        }
    }

    /// Appends what of `bytes` (at `start`, not beyond the contiguous end)
    /// is new.
    fn append_secondary(&mut self, start: u32, bytes: &[u8]) {
        let end = self
            .secondary_base
            .wrapping_add(seq_len(self.secondary_bytes.len()));
        let known = usize::try_from(ahead(start, end)).unwrap_or(0);
        if known < bytes.len() {
            self.secondary_bytes.extend_from_slice(&bytes[known..]);
        }
    }

    /// A connection first seen mid-stream predates the last checkpoint (or
    /// the initial synchronisation): both copies use the same sequence
    /// numbers, and comparing starts at `seq`, the first byte either side
    /// sends after that.
    fn adopt(&mut self, seq: u32, by_secondary: bool) {
        let isn = seq.wrapping_sub(1);
        self.base_unverified = by_secondary && self.primary_isn.is_none();
        self.primary_isn.get_or_insert(isn);
        self.secondary_isn.get_or_insert(isn);
        self.secondary_syn = true;
        self.secondary_base = self
            .secondary_isn
            .map_or(1, |secondary| seq.wrapping_sub(secondary));
        if self.primary_next == 0 {
            self.primary_next = seq.wrapping_sub(isn);
        }
    }

    fn secondary_len(&self) -> usize {
        self.secondary_bytes.len() + self.secondary_ahead.values().map(Vec::len).sum::<usize>()
    }
}

/// Primary and secondary output for one flow of datagrams.
#[derive(Default)]
struct DatagramFlow {
    primary: VecDeque<(Held, std::ops::Range<usize>)>,
    secondary: VecDeque<Vec<u8>>,
}

/// The compare engine; see the module docs.
pub struct Comparer {
    config: CompareConfig,
    tcp: HashMap<FlowKey, TcpFlow>,
    datagrams: HashMap<FlowKey, DatagramFlow>,
    /// Frames that wait for a checkpoint (uncomparable).
    uncomparable: Vec<Held>,
    held_frames: usize,
    held_bytes: usize,
    next_order: u64,
    metrics: CompareMetrics,
    /// Causes asked for since the last checkpoint.
    asked: std::collections::HashSet<CheckpointCause>,
}

/// A byte count in sequence space: segments and the bounded buffers here
/// are far below 4 GiB.
fn seq_len(len: usize) -> u32 {
    u32::try_from(len).expect("TCP buffers here are far below 4 GiB")
}

/// A sequence-space distance as a buffer index (never negative where used).
fn index(distance: u32) -> usize {
    usize::try_from(distance).expect("a u32 fits a usize on the 64-bit hosts we run on")
}

/// Signed distance from `from` to `to` in sequence space.
fn ahead(from: u32, to: u32) -> i64 {
    i64::from(to.wrapping_sub(from).cast_signed())
}

impl Comparer {
    /// An empty comparer: both copies are equal now (just synchronised or
    /// checkpointed).
    pub fn new(config: CompareConfig) -> Self {
        Self {
            config,
            tcp: HashMap::new(),
            datagrams: HashMap::new(),
            uncomparable: Vec::new(),
            held_frames: 0,
            held_bytes: 0,
            next_order: 0,
            metrics: CompareMetrics::default(),
            asked: std::collections::HashSet::new(),
        }
    }

    /// What the comparer did so far.
    pub fn metrics(&self) -> &CompareMetrics {
        &self.metrics
    }

    /// Primary frames held now.
    pub fn held_frames(&self) -> usize {
        self.held_frames
    }

    /// Asks for a checkpoint; counts the first request of each cause
    /// until the checkpoint (a diverged flow asks again with every frame).
    fn checkpoint(&mut self, cause: CheckpointCause) -> Action {
        if self.asked.insert(cause) {
            *self.metrics.checkpoints.entry(cause).or_default() += 1;
        }
        Action::Checkpoint(cause)
    }

    fn hold(&mut self, frame: Vec<u8>, now: Instant) -> Held {
        self.held_frames += 1;
        self.held_bytes += frame.len();
        self.next_order += 1;
        Held {
            frame,
            arrived: now,
            order: self.next_order,
        }
    }

    fn release(&mut self, held: Held, now: Instant, actions: &mut Vec<Action>) {
        self.metrics.matched += 1;
        self.let_go(held, now, actions);
    }

    /// Releases a held frame that needed no match (a pure ACK, a
    /// retransmission): counted as passed.
    fn pass(&mut self, held: Held, now: Instant, actions: &mut Vec<Action>) {
        self.metrics.passed += 1;
        self.let_go(held, now, actions);
    }

    /// Forgets a held frame that a newer one replaced.
    fn supersede(&mut self, held: &Held) {
        self.held_frames -= 1;
        self.held_bytes -= held.frame.len();
        self.metrics.superseded += 1;
    }

    fn let_go(&mut self, held: Held, now: Instant, actions: &mut Vec<Action>) {
        self.held_frames -= 1;
        self.held_bytes -= held.frame.len();
        let micros = now.saturating_duration_since(held.arrived).as_micros();
        let latency = &mut self.metrics.latency_micros_log2;
        latency[crate::log2_bucket(micros, latency.len())] += 1;
        actions.push(Action::Release(held.frame));
    }

    /// A frame the primary's guest sent.
    pub fn primary(&mut self, frame: Vec<u8>, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let parsed = parse(&frame);
        if let Parsed::Tcp {
            key,
            ack: Some(ack),
            syn: false,
            fin: false,
            rst: false,
            ref payload,
            ..
        } = parsed
            && payload.is_empty()
        {
            // A pure ACK reveals which of the peer's bytes the primary has:
            // it goes out once the secondary has them too.
            self.wait_for_secondary_ack(key, frame, ack, now, &mut actions);
            return actions;
        }
        if self.held_frames >= self.config.max_frames
            || self.held_bytes + frame.len() > self.config.max_bytes
        {
            self.metrics.dropped += 1;
            actions.push(self.checkpoint(CheckpointCause::QueueFull));
            return actions;
        }
        match parsed {
            Parsed::Uncomparable => {
                let held = self.hold(frame, now);
                self.uncomparable.push(held);
                actions.push(self.checkpoint(CheckpointCause::Uncomparable));
            }
            Parsed::Datagram { key, transport } => {
                self.metrics.compared += 1;
                let held = self.hold(frame, now);
                self.datagrams
                    .entry(key)
                    .or_default()
                    .primary
                    .push_back((held, transport));
                self.match_datagrams(key, now, &mut actions);
            }
            Parsed::Tcp {
                key,
                seq,
                ack,
                syn,
                fin,
                rst,
                payload,
            } => {
                let flow = self.tcp.entry(key).or_default();
                if syn {
                    flow.primary_isn = Some(seq);
                    flow.primary_next = 1;
                } else if flow.primary_isn.is_none() {
                    flow.adopt(seq, false);
                }
                let isn = flow.primary_isn.expect("set above");
                let start = seq.wrapping_sub(isn);
                let end = start.wrapping_add(seq_len(payload.len()));
                let released_upto = flow.secondary_base;
                if !syn
                    && !fin
                    && !rst
                    && !flow.base_unverified
                    && ahead(end, released_upto) >= 0
                    && flow.queue.is_empty()
                {
                    // A retransmission of bytes already compared and released
                    // (its acknowledgement number still has to be covered).
                    match ack {
                        Some(ack) => {
                            self.wait_for_secondary_ack(key, frame, ack, now, &mut actions)
                        }
                        None => {
                            self.metrics.passed += 1;
                            actions.push(Action::Release(frame));
                        }
                    }
                    return actions;
                }
                // A FIN takes one sequence number after the data.
                let next = end.wrapping_add(u32::from(fin));
                if ahead(flow.primary_next, next) > 0 {
                    flow.primary_next = next;
                }
                self.metrics.compared += 1;
                let held = self.hold(frame, now);
                let flow = self.tcp.get_mut(&key).expect("inserted above");
                flow.queue.push_back(Segment {
                    held,
                    start,
                    end,
                    ack,
                    payload,
                    syn,
                    fin,
                    rst,
                });
                self.match_tcp(key, now, &mut actions);
            }
        }
        actions
    }

    /// A frame the secondary's guest sent (it never goes out).
    pub fn secondary(&mut self, frame: &[u8], now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        match parse(frame) {
            Parsed::Uncomparable => {}
            Parsed::Datagram { key, transport } => {
                self.datagrams
                    .entry(key)
                    .or_default()
                    .secondary
                    .push_back(frame[transport].to_vec());
                self.match_datagrams(key, now, &mut actions);
            }
            Parsed::Tcp {
                key,
                seq,
                ack,
                syn,
                fin,
                rst,
                payload,
            } => {
                let flow = self.tcp.entry(key).or_default();
                flow.secondary_ack = later(flow.secondary_ack, ack);
                if syn {
                    flow.secondary_isn = Some(seq);
                    flow.secondary_syn = true;
                    flow.secondary_base = 1;
                    flow.secondary_bytes.clear();
                    flow.secondary_ahead.clear();
                } else if flow.secondary_isn.is_none() {
                    flow.adopt(seq, true);
                }
                let isn = flow.secondary_isn.expect("set above");
                let start = seq.wrapping_sub(isn).wrapping_add(u32::from(syn));
                if !payload.is_empty() {
                    flow.record_secondary(start, &frame[payload.clone()]);
                }
                if fin {
                    flow.secondary_fin = Some(start.wrapping_add(seq_len(payload.len())));
                }
                flow.secondary_rst |= rst;
                if flow.secondary_len() > self.config.max_secondary_bytes {
                    actions.push(self.checkpoint(CheckpointCause::SecondaryAhead));
                    return actions;
                }
                self.match_tcp(key, now, &mut actions);
            }
        }
        actions
    }

    fn match_datagrams(&mut self, key: FlowKey, now: Instant, actions: &mut Vec<Action>) {
        let Some(flow) = self.datagrams.get_mut(&key) else {
            return;
        };
        let mut released = Vec::new();
        let mut mismatch = None;
        while !flow.primary.is_empty() && !flow.secondary.is_empty() {
            let (held, transport) = flow.primary.front().expect("not empty");
            let secondary = flow.secondary.front().expect("not empty");
            if held.frame[transport.clone()] != secondary[..] {
                mismatch = Some(match key.protocol {
                    1 => Mismatch::Icmp,
                    ARP_FLOW => Mismatch::Arp,
                    _ => Mismatch::Udp,
                });
                break;
            }
            flow.secondary.pop_front();
            let (held, _) = flow.primary.pop_front().expect("not empty");
            released.push(held);
        }
        for held in released {
            self.release(held, now, actions);
        }
        if let Some(mismatch) = mismatch {
            actions.push(self.checkpoint(CheckpointCause::Mismatch(mismatch)));
        }
    }

    fn match_tcp(&mut self, key: FlowKey, now: Instant, actions: &mut Vec<Action>) {
        let Some(flow) = self.tcp.get_mut(&key) else {
            return;
        };
        let mut released = Vec::new();
        let mut mismatch = None;
        while let Some(segment) = flow.queue.front() {
            if segment.syn {
                if !flow.secondary_syn {
                    break;
                }
                released.push(flow.queue.pop_front().expect("not empty").held);
                continue;
            }
            let base = flow.secondary_base;
            if flow.base_unverified {
                if ahead(base, segment.start) < 0 {
                    // Primary bytes the secondary's output never covered.
                    mismatch = Some(Mismatch::TcpPayload);
                    break;
                }
                flow.base_unverified = false;
            }
            let covered_end = base.wrapping_add(seq_len(flow.secondary_bytes.len()));
            let compare_from = if ahead(base, segment.start) > 0 {
                segment.start
            } else {
                base
            };
            if ahead(covered_end, segment.end) > 0 {
                break; // The secondary has not produced these bytes yet.
            }
            if ahead(compare_from, segment.end) > 0 {
                let primary = &segment.held.frame[segment.payload.clone()];
                let skip = index(compare_from.wrapping_sub(segment.start));
                let from = index(compare_from.wrapping_sub(base));
                let to = index(segment.end.wrapping_sub(base));
                if primary[skip..] != flow.secondary_bytes[from..to] {
                    mismatch = Some(Mismatch::TcpPayload);
                    break;
                }
            }
            if segment.fin {
                match flow.secondary_fin {
                    None => break,
                    Some(at) if at != segment.end => {
                        mismatch = Some(Mismatch::TcpFin);
                        break;
                    }
                    Some(_) => {}
                }
            }
            if segment.rst && !flow.secondary_rst {
                break;
            }
            if !covered(segment.ack, flow.secondary_ack) {
                // The secondary sent these bytes but does not have all the
                // peer's bytes this segment acknowledges yet.
                break;
            }
            let segment = flow.queue.pop_front().expect("not empty");
            flow.primary_ack = later(flow.primary_ack, segment.ack);
            if ahead(base, segment.start) <= 0 && ahead(base, segment.end) > 0 {
                // Contiguous: the bytes below are done with.
                let done = index(segment.end.wrapping_sub(base));
                flow.secondary_bytes.drain(..done);
                flow.secondary_base = segment.end;
            }
            released.push(segment.held);
        }
        let mut superseded = None;
        let mut passed = None;
        if let Some((_, pending)) = &flow.pending_ack {
            if covered(Some(*pending), flow.primary_ack) && !released.is_empty() {
                // A released segment acknowledged as much.
                superseded = flow.pending_ack.take();
            } else if covered(Some(*pending), flow.secondary_ack) {
                flow.primary_ack = later(flow.primary_ack, Some(*pending));
                passed = flow.pending_ack.take();
            }
        }
        for held in released {
            self.release(held, now, actions);
        }
        if let Some((held, _)) = superseded {
            self.supersede(&held);
        }
        if let Some((held, _)) = passed {
            self.pass(held, now, actions);
        }
        if let Some(mismatch) = mismatch {
            actions.push(self.checkpoint(CheckpointCause::Mismatch(mismatch)));
        }
    }

    /// Holds a primary frame that needs no match but acknowledges `ack`
    /// (a pure ACK, a retransmission) until the secondary acknowledged as
    /// far; it replaces an older one waiting on the same connection.
    fn wait_for_secondary_ack(
        &mut self,
        key: FlowKey,
        frame: Vec<u8>,
        ack: u32,
        now: Instant,
        actions: &mut Vec<Action>,
    ) {
        let held = self.hold(frame, now);
        let flow = self.tcp.entry(key).or_default();
        let older = flow.pending_ack.replace((held, ack));
        if let Some((older, _)) = older {
            self.supersede(&older);
        }
        self.match_tcp(key, now, actions);
    }

    /// When the oldest compared frame still held arrived (its timeout
    /// runs from then), if one is held.
    pub fn oldest_held(&self) -> Option<Instant> {
        let tcp = self.tcp.values().filter_map(|flow| {
            let segment = flow.queue.front().map(|segment| segment.held.arrived);
            let pending = flow.pending_ack.as_ref().map(|(held, _)| held.arrived);
            segment.into_iter().chain(pending).min()
        });
        let datagrams = self
            .datagrams
            .values()
            .filter_map(|flow| flow.primary.front().map(|(held, _)| held.arrived));
        tcp.chain(datagrams).min()
    }

    /// The compare timeout.
    pub fn timeout(&self) -> Duration {
        self.config.timeout
    }

    /// Asks for a checkpoint if a held frame waited longer than the
    /// timeout (call it when [`oldest_held`](Self::oldest_held) plus the
    /// timeout has passed).
    pub fn expire(&mut self, now: Instant) -> Option<Action> {
        let timeout = self.config.timeout;
        let old = |held: &Held| now.saturating_duration_since(held.arrived) > timeout;
        let expired = self.tcp.values().any(|flow| {
            flow.queue.front().is_some_and(|segment| old(&segment.held))
                || flow.pending_ack.as_ref().is_some_and(|(held, _)| old(held))
        }) || self
            .datagrams
            .values()
            .any(|flow| flow.primary.front().is_some_and(|(held, _)| old(held)));
        if !expired {
            return None;
        }
        Some(self.checkpoint(CheckpointCause::Timeout))
    }

    /// A checkpoint was acknowledged: the secondary now runs the primary's
    /// state. Returns every held primary frame, in the order the guest sent
    /// them, to release; the secondary's unmatched output is forgotten.
    pub fn checkpointed(&mut self) -> Vec<Vec<u8>> {
        let mut held: Vec<Held> = std::mem::take(&mut self.uncomparable);
        for flow in self.datagrams.values_mut() {
            held.extend(flow.primary.drain(..).map(|(held, _)| held));
        }
        self.datagrams.clear();
        for flow in self.tcp.values_mut() {
            for segment in flow.queue.drain(..) {
                flow.primary_ack = later(flow.primary_ack, segment.ack);
                held.push(segment.held);
            }
            if let Some((pending, ack)) = flow.pending_ack.take() {
                flow.primary_ack = later(flow.primary_ack, Some(ack));
                held.push(pending);
            }
            // The secondary has every byte of the peer's the primary had.
            flow.secondary_ack = later(flow.secondary_ack, flow.primary_ack);
            // Equal copies: the secondary's sequence numbers are the
            // primary's from now on.
            flow.secondary_isn = flow.primary_isn;
            flow.secondary_syn = flow.primary_isn.is_some();
            flow.secondary_base = flow.primary_next;
            flow.secondary_bytes.clear();
            flow.secondary_ahead.clear();
            flow.secondary_fin = None;
            flow.secondary_rst = false;
            flow.base_unverified = false;
        }
        self.held_frames = 0;
        self.held_bytes = 0;
        self.asked.clear();
        held.sort_by_key(|held| held.order);
        held.into_iter().map(|held| held.frame).collect()
    }
}

#[cfg(test)]
mod tests;
