//! Heartbeats over UDP, beside the replication connection, so that they
//! never queue behind the page frames of a large epoch.
//!
//! ```text
//! datagram (32 bytes, little-endian)
//!    0  magic "URHB"
//!    4  reserved u32 (0)
//!    8  vm id u64          the VM of the connection (from its Hello)
//!   16  clock u64          sender's nanoseconds since it started beating
//!   24  xxh3 of bytes 0..24
//! ```
//!
//! The primary sends to the secondary's address (its TCP listening address,
//! as UDP) from a port of its own; the secondary answers to wherever the
//! primary's datagrams come from, once it has heard one from the primary's
//! IP address for the right VM. Each side records when it last heard the
//! other ([`Heard`]); the connection's reader counts the peer as alive if
//! either the connection or the heartbeats brought something recently.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use xxhash_rust::xxh3::xxh3_64;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// How a peer proves it is there, and that it works: heartbeats (how often
/// they go out, how many may be missed) prove a process alive; progress
/// (acknowledgements on the primary's side, committed epochs on the
/// secondary's) proves it works. A peer that is heard but makes no progress
/// for `progress` is lost too, and so is a write that makes no progress for
/// that long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeartbeatPolicy {
    /// Send a heartbeat after this long without sending anything.
    pub interval: Duration,
    /// Declare the peer lost after this many intervals of silence.
    pub misses: u32,
    /// Declare the peer lost when it made no progress for this long.
    pub progress: Duration,
}

/// The default progress deadline: far beyond any epoch, well within what a
/// client notices.
pub const DEFAULT_PROGRESS_TIMEOUT: Duration = Duration::from_secs(3);

impl Default for HeartbeatPolicy {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(10),
            misses: 5,
            progress: DEFAULT_PROGRESS_TIMEOUT,
        }
    }
}

impl HeartbeatPolicy {
    /// Silence after which the peer is lost.
    pub fn timeout(&self) -> Duration {
        self.interval * self.misses
    }
}

const MAGIC: [u8; 4] = *b"URHB";
const DATAGRAM_LEN: usize = 32;

/// A heartbeat datagram, little-endian.
#[repr(C)]
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
struct Datagram {
    magic: [u8; 4],
    reserved: U32,
    vm_id: U64,
    /// The sender's clock, nanoseconds.
    clock: U64,
    /// xxh3 of the bytes before it.
    checksum: U64,
}

const _: () = assert!(std::mem::size_of::<Datagram>() == DATAGRAM_LEN);

impl Datagram {
    fn checksummed(&self) -> &[u8] {
        &self.as_bytes()[..DATAGRAM_LEN - 8]
    }
}

/// Nanoseconds since `origin` (a heartbeat's clock), saturating.
pub(crate) fn nanos_since(origin: Instant) -> u64 {
    u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// When the peer's heartbeats last arrived.
#[derive(Debug)]
pub struct Heard {
    origin: Instant,
    /// Nanoseconds after `origin`; 0 = never.
    last: AtomicU64,
}

impl Heard {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn mark(&self) {
        let nanos = nanos_since(self.origin).max(1);
        self.last.fetch_max(nanos, Ordering::Relaxed);
    }

    /// When a heartbeat last arrived, if one did.
    pub fn last(&self) -> Option<Instant> {
        match self.last.load(Ordering::Relaxed) {
            0 => None,
            nanos => Some(self.origin + Duration::from_nanos(nanos)),
        }
    }
}

fn datagram(vm_id: u64, clock: u64) -> Datagram {
    let mut datagram = Datagram {
        magic: MAGIC,
        reserved: 0.into(),
        vm_id: vm_id.into(),
        clock: clock.into(),
        checksum: 0.into(),
    };
    datagram.checksum = xxh3_64(datagram.checksummed()).into();
    datagram
}

fn valid(bytes: &[u8], vm_id: u64) -> bool {
    Datagram::read_from_bytes(bytes).is_ok_and(|datagram| {
        datagram.magic == MAGIC
            && datagram.vm_id.get() == vm_id
            && datagram.checksum.get() == xxh3_64(datagram.checksummed())
    })
}

/// The two heartbeat threads of one connection. Dropping them only tells
/// them to stop (they notice within an interval); [`Heartbeats::stop`] also
/// waits for them.
pub struct Heartbeats {
    stop: Arc<AtomicBool>,
    heard: Arc<Heard>,
    threads: Option<HeartbeatThreads>,
}

struct HeartbeatThreads {
    /// `heartbeat-in`: hears the peer.
    receiver: JoinHandle<()>,
    /// `heartbeat-out`: beats to the peer.
    sender: JoinHandle<()>,
}

impl Heartbeats {
    /// The primary's side: beats to `secondary` from a new socket on
    /// `local_ip`.
    pub fn to_secondary(
        local_ip: IpAddr,
        secondary: SocketAddr,
        vm_id: u64,
        policy: HeartbeatPolicy,
    ) -> std::io::Result<Self> {
        let socket = UdpSocket::bind(SocketAddr::new(local_ip, 0))?;
        Self::start(socket, secondary.ip(), Some(secondary), vm_id, policy)
    }

    /// The secondary's side: on its listening socket, answering the primary
    /// at `primary_ip` once it beats.
    pub fn to_primary(
        socket: &UdpSocket,
        primary_ip: IpAddr,
        vm_id: u64,
        policy: HeartbeatPolicy,
    ) -> std::io::Result<Self> {
        Self::start(socket.try_clone()?, primary_ip, None, vm_id, policy)
    }

    fn start(
        socket: UdpSocket,
        peer_ip: IpAddr,
        peer: Option<SocketAddr>,
        vm_id: u64,
        policy: HeartbeatPolicy,
    ) -> std::io::Result<Self> {
        socket.set_read_timeout(Some(policy.interval.max(Duration::from_millis(1))))?;
        let stop = Arc::new(AtomicBool::new(false));
        let heard = Arc::new(Heard::new());
        let peer = Arc::new(Mutex::new(peer));
        let receiving = socket.try_clone()?;
        let receiver = {
            let (stop, heard, peer) = (stop.clone(), heard.clone(), peer.clone());
            std::thread::Builder::new()
                .name("heartbeat-in".to_owned())
                .spawn(move || {
                    let mut buffer = [0u8; 64];
                    while !stop.load(Ordering::Relaxed) {
                        let Ok((length, from)) = receiving.recv_from(&mut buffer) else {
                            continue; // Timeout: check the stop flag.
                        };
                        if from.ip() == peer_ip && valid(&buffer[..length], vm_id) {
                            heard.mark();
                            let mut peer = peer.lock().expect("no panics under this lock");
                            peer.get_or_insert(from);
                        }
                    }
                })?
        };
        let sender = {
            let stop = stop.clone();
            let started = Instant::now();
            std::thread::Builder::new()
                .name("heartbeat-out".to_owned())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let target = *peer.lock().expect("no panics under this lock");
                        if let Some(target) = target {
                            let clock = nanos_since(started);
                            // A lost datagram is what heartbeats are for.
                            let _ = socket.send_to(datagram(vm_id, clock).as_bytes(), target);
                        }
                        std::thread::sleep(policy.interval);
                    }
                })?
        };
        Ok(Self {
            stop,
            heard,
            threads: Some(HeartbeatThreads { receiver, sender }),
        })
    }

    /// When the peer was last heard.
    pub fn heard(&self) -> Arc<Heard> {
        self.heard.clone()
    }

    /// Stops both threads.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(HeartbeatThreads { receiver, sender }) = self.threads.take() {
            let _ = receiver.join();
            let _ = sender.join();
        }
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> HeartbeatPolicy {
        HeartbeatPolicy {
            interval: Duration::from_millis(5),
            misses: 4,
            progress: DEFAULT_PROGRESS_TIMEOUT,
        }
    }

    fn wait_until_heard(heard: &Heard) -> bool {
        let deadline = Instant::now() + Duration::from_secs(2);
        while heard.last().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        heard.last().is_some()
    }

    #[test]
    fn both_sides_hear_each_other() {
        let listening = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let address = listening.local_addr().expect("address");
        let localhost: IpAddr = "127.0.0.1".parse().expect("ip");
        let secondary = Heartbeats::to_primary(&listening, localhost, 7, policy()).expect("start");
        let primary = Heartbeats::to_secondary(localhost, address, 7, policy()).expect("start");

        let secondary_heard = wait_until_heard(&secondary.heard());
        let primary_heard = wait_until_heard(&primary.heard());

        primary.stop();
        secondary.stop();
        assert!(secondary_heard, "the secondary never heard the primary");
        assert!(primary_heard, "the primary never heard the secondary");
    }

    #[test]
    fn heartbeats_of_another_vm_are_ignored() {
        let listening = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let address = listening.local_addr().expect("address");
        let localhost: IpAddr = "127.0.0.1".parse().expect("ip");
        let secondary = Heartbeats::to_primary(&listening, localhost, 7, policy()).expect("start");
        let stranger = Heartbeats::to_secondary(localhost, address, 8, policy()).expect("start");

        std::thread::sleep(Duration::from_millis(50));
        let heard = secondary.heard().last();

        stranger.stop();
        secondary.stop();
        assert!(heard.is_none());
    }

    #[test]
    fn corrupted_datagram_is_invalid() {
        let mut bytes = datagram(7, 123).as_bytes().to_vec();
        bytes[17] ^= 1;

        assert!(!valid(&bytes, 7));
    }

    #[test]
    fn an_intact_datagram_is_valid_for_its_vm_only() {
        let bytes = datagram(7, 123);

        assert!(valid(bytes.as_bytes(), 7));
        assert!(!valid(bytes.as_bytes(), 8));
    }
}
