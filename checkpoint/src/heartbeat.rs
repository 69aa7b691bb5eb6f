//! Heartbeats over UDP, beside the replication connection, so that they
//! never queue behind the page frames of a large epoch.
//!
//! ```text
//! datagram (64 bytes, little-endian)
//!    0  magic "URHB"
//!    4  reserved u32 (0)
//!    8  vm id u64          the VM of the connection (from its Hello)
//!   16  clock u64          sender's nanoseconds since it started beating
//!   24  counter u64        1, 2, 3, ... per sender and session
//!   32  tag [u8; 32]       keyed BLAKE2s-256 of bytes 0..32, with the
//!                          sender's heartbeat key of this session
//!                          (plain text: xxh3 of bytes 0..32, then zeros)
//! ```
//!
//! On an authenticated channel ([`crate::channel`]) each side keys its
//! datagrams with a random key it sent inside the Noise handshake, so only
//! the peer of this session can make a valid one, and a receiver accepts a
//! counter only if it is higher than every one it accepted before: a
//! datagram sniffed and replayed (by anyone, in this session or another)
//! is ignored. In plain text a datagram is only checksummed: anyone who
//! can send from the peer's address can forge one.
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

use blake2::Blake2sMac256;
use blake2::digest::{KeyInit, Mac};
use xxhash_rust::xxh3::xxh3_64;
use zerocopy::little_endian::{U32, U64};

use crate::channel::{HeartbeatKeys, KEY_LEN};
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

/// Heartbeat settings that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeartbeatError {
    /// A zero interval.
    #[error("the heartbeat interval must be longer than 0 ms")]
    ZeroInterval,
    /// Zero misses: the peer would be lost at once.
    #[error(
        "the peer must be allowed at least one missed heartbeat (--heartbeat-misses 1 or more)"
    )]
    NoMisses,
    /// A progress deadline shorter than the heartbeat timeout.
    #[error(
        "the progress timeout {progress:?} is shorter than the heartbeat timeout {timeout:?}: a live peer would be declared lost"
    )]
    ProgressTooShort {
        /// The progress deadline.
        progress: Duration,
        /// Interval times misses.
        timeout: Duration,
    },
}

impl HeartbeatPolicy {
    /// Checks that the settings can work (checked at start; the two sides'
    /// settings are checked against each other at `Hello`).
    pub fn check(&self) -> Result<(), HeartbeatError> {
        if self.interval.is_zero() {
            return Err(HeartbeatError::ZeroInterval);
        }
        if self.misses == 0 {
            return Err(HeartbeatError::NoMisses);
        }
        if self.progress < self.timeout() {
            return Err(HeartbeatError::ProgressTooShort {
                progress: self.progress,
                timeout: self.timeout(),
            });
        }
        Ok(())
    }

    /// Silence after which the peer is lost.
    pub fn timeout(&self) -> Duration {
        self.interval * self.misses
    }
}

const MAGIC: [u8; 4] = *b"URHB";
const DATAGRAM_LEN: usize = 64;
const TAG_LEN: usize = 32;

/// A heartbeat datagram, little-endian.
#[repr(C)]
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
struct Datagram {
    magic: [u8; 4],
    reserved: U32,
    vm_id: U64,
    /// The sender's clock, nanoseconds.
    clock: U64,
    /// Strictly increasing per sender and session.
    counter: U64,
    /// MAC (or, in plain text, checksum) of the bytes before it.
    tag: [u8; TAG_LEN],
}

const _: () = assert!(std::mem::size_of::<Datagram>() == DATAGRAM_LEN);

impl Datagram {
    fn tagged(&self) -> &[u8] {
        &self.as_bytes()[..DATAGRAM_LEN - TAG_LEN]
    }
}

/// Keyed BLAKE2s of `bytes`, ready to finalise or verify.
fn mac_of(key: &[u8; KEY_LEN], bytes: &[u8]) -> Blake2sMac256 {
    let mut mac =
        <Blake2sMac256 as KeyInit>::new_from_slice(key).expect("BLAKE2s takes a 32-byte key");
    mac.update(bytes);
    mac
}

/// The tag of `bytes`: keyed BLAKE2s with `key`, or xxh3 without one.
fn tag_of(key: Option<&[u8; KEY_LEN]>, bytes: &[u8]) -> [u8; TAG_LEN] {
    let mut tag = [0u8; TAG_LEN];
    match key {
        Some(key) => tag.copy_from_slice(&mac_of(key, bytes).finalize().into_bytes()),
        None => tag[..8].copy_from_slice(&xxh3_64(bytes).to_le_bytes()),
    }
    tag
}

/// Checks datagrams from the peer: its VM id, its tag, and (keyed) a
/// counter higher than any accepted before.
struct Verifier {
    vm_id: u64,
    key: Option<[u8; KEY_LEN]>,
    last_counter: u64,
}

impl Verifier {
    fn accept(&mut self, bytes: &[u8]) -> bool {
        let Ok(datagram) = Datagram::read_from_bytes(bytes) else {
            return false;
        };
        if datagram.magic != MAGIC || datagram.vm_id.get() != self.vm_id {
            return false;
        }
        let authentic = match &self.key {
            // Constant-time comparison.
            Some(key) => mac_of(key, datagram.tagged())
                .verify_slice(&datagram.tag)
                .is_ok(),
            None => datagram.tag == tag_of(None, datagram.tagged()),
        };
        if !authentic {
            return false;
        }
        if self.key.is_some() {
            // Replays and reordered stragglers are stale.
            if datagram.counter.get() <= self.last_counter {
                return false;
            }
            self.last_counter = datagram.counter.get();
        }
        true
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

fn datagram(vm_id: u64, clock: u64, counter: u64, key: Option<&[u8; KEY_LEN]>) -> Datagram {
    let mut datagram = Datagram {
        magic: MAGIC,
        reserved: 0.into(),
        vm_id: vm_id.into(),
        clock: clock.into(),
        counter: counter.into(),
        tag: [0; TAG_LEN],
    };
    datagram.tag = tag_of(key, datagram.tagged());
    datagram
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
    /// `local_ip`, keyed with the session's keys when the channel has them.
    pub fn to_secondary(
        local_ip: IpAddr,
        secondary: SocketAddr,
        vm_id: u64,
        policy: HeartbeatPolicy,
        keys: Option<HeartbeatKeys>,
    ) -> std::io::Result<Self> {
        let socket = UdpSocket::bind(SocketAddr::new(local_ip, 0))?;
        Self::start(socket, secondary.ip(), Some(secondary), vm_id, policy, keys)
    }

    /// The secondary's side: on its listening socket, answering the primary
    /// at `primary_ip` once it beats.
    pub fn to_primary(
        socket: &UdpSocket,
        primary_ip: IpAddr,
        vm_id: u64,
        policy: HeartbeatPolicy,
        keys: Option<HeartbeatKeys>,
    ) -> std::io::Result<Self> {
        Self::start(socket.try_clone()?, primary_ip, None, vm_id, policy, keys)
    }

    fn start(
        socket: UdpSocket,
        peer_ip: IpAddr,
        peer: Option<SocketAddr>,
        vm_id: u64,
        policy: HeartbeatPolicy,
        keys: Option<HeartbeatKeys>,
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
                    let mut verifier = Verifier {
                        vm_id,
                        key: keys.map(|keys| keys.receive),
                        last_counter: 0,
                    };
                    let mut buffer = [0u8; 2 * DATAGRAM_LEN];
                    while !stop.load(Ordering::Relaxed) {
                        let Ok((length, from)) = receiving.recv_from(&mut buffer) else {
                            continue; // Timeout: check the stop flag.
                        };
                        if from.ip() == peer_ip && verifier.accept(&buffer[..length]) {
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
                    let key = keys.map(|keys| keys.send);
                    let mut counter = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let target = *peer.lock().expect("no panics under this lock");
                        if let Some(target) = target {
                            let clock = nanos_since(started);
                            counter += 1;
                            let beat = datagram(vm_id, clock, counter, key.as_ref());
                            // A lost datagram is what heartbeats are for.
                            let _ = socket.send_to(beat.as_bytes(), target);
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
        let secondary =
            Heartbeats::to_primary(&listening, localhost, 7, policy(), None).expect("start");
        let primary =
            Heartbeats::to_secondary(localhost, address, 7, policy(), None).expect("start");

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
        let secondary =
            Heartbeats::to_primary(&listening, localhost, 7, policy(), None).expect("start");
        let stranger =
            Heartbeats::to_secondary(localhost, address, 8, policy(), None).expect("start");

        std::thread::sleep(Duration::from_millis(50));
        let heard = secondary.heard().last();

        stranger.stop();
        secondary.stop();
        assert!(heard.is_none());
    }

    fn plain(vm_id: u64) -> Verifier {
        Verifier {
            vm_id,
            key: None,
            last_counter: 0,
        }
    }

    fn keyed(key: [u8; KEY_LEN]) -> Verifier {
        Verifier {
            vm_id: 7,
            key: Some(key),
            last_counter: 0,
        }
    }

    #[test]
    fn corrupted_datagram_is_invalid() {
        let mut bytes = datagram(7, 123, 1, None).as_bytes().to_vec();
        bytes[17] ^= 1;

        assert!(!plain(7).accept(&bytes));
    }

    #[test]
    fn an_intact_datagram_is_valid_for_its_vm_only() {
        let bytes = datagram(7, 123, 1, None);

        assert!(plain(7).accept(bytes.as_bytes()));
        assert!(!plain(8).accept(bytes.as_bytes()));
    }

    #[test]
    fn a_keyed_datagram_is_valid_once() {
        let key = [5u8; KEY_LEN];
        let mut verifier = keyed(key);
        let first = datagram(7, 100, 1, Some(&key));

        let accepted = verifier.accept(first.as_bytes());
        let replayed = verifier.accept(first.as_bytes());

        assert!(accepted);
        assert!(!replayed, "a replayed datagram was accepted");
    }

    #[test]
    fn a_stale_counter_is_ignored_even_with_a_new_clock() {
        let key = [5u8; KEY_LEN];
        let mut verifier = keyed(key);
        assert!(verifier.accept(datagram(7, 100, 5, Some(&key)).as_bytes()));

        let older = verifier.accept(datagram(7, 200, 4, Some(&key)).as_bytes());

        assert!(!older);
    }

    #[test]
    fn a_datagram_keyed_with_another_sessions_key_is_ignored() {
        let mut verifier = keyed([5u8; KEY_LEN]);

        let foreign = verifier.accept(datagram(7, 100, 1, Some(&[6u8; KEY_LEN])).as_bytes());

        assert!(!foreign);
    }

    #[test]
    fn an_unkeyed_datagram_is_ignored_by_a_keyed_receiver() {
        let mut verifier = keyed([5u8; KEY_LEN]);

        let unkeyed = verifier.accept(datagram(7, 100, 1, None).as_bytes());

        assert!(!unkeyed);
    }
}
