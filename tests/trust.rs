//! A real secondary, on an authenticated channel, against peers that should
//! not be trusted: strangers without the key, a plain-text peer, a squatter
//! that connects first and says nothing, and a peer holding the key that
//! sends hostile frames (the attacks measured in issue 12). Each is refused
//! with a clear reason, the secondary stays small and keeps serving, and
//! the real primary then protects its guest normally.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Child;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use common::{
    channel_arguments, free_address, require_kvm, scripted_hello, spawn_json, until_event,
};
use understudy_checkpoint::channel::{Channel, KeyPair, Keyring, Security};
use understudy_checkpoint::protocol::{MAX_PAYLOAD, Message, Sender, read_message};
use understudy_compress::{CodecSpec, Encoder, PageBatch};
use understudy_vm::PAGE_BYTES;

const MEMORY: u64 = 64 << 20;

/// The secondary, with the test keys.
fn spawn_secondary_with(address: &str, extra: &[&str]) -> (Child, Receiver<serde_json::Value>) {
    let mut arguments = vec!["secondary", "--listen", address, "--json"];
    arguments.extend_from_slice(extra);
    let keys = channel_arguments("secondary");
    arguments.extend(keys.iter().map(String::as_str));
    spawn_json(&arguments)
}

/// The real primary (a `memtouch` guest), with the test keys.
fn spawn_primary_with(address: &str, extra: &[&str]) -> (Child, Receiver<serde_json::Value>) {
    let mut arguments = vec![
        "primary",
        "--secondary",
        address,
        "--memory",
        "64M",
        "--workload",
        "memtouch:rate=50MB/s,wss=16M,pattern=random",
        "--duration",
        "20s",
        "--json",
    ];
    arguments.extend_from_slice(extra);
    let keys = channel_arguments("primary");
    arguments.extend(keys.iter().map(String::as_str));
    spawn_json(&arguments)
}

/// A secondary that is listening, and the lines it printed so far.
fn listening_secondary(
    address: &str,
    extra: &[&str],
) -> (Child, Receiver<serde_json::Value>, Vec<serde_json::Value>) {
    let (secondary, lines) = spawn_secondary_with(address, extra);
    let mut seen = Vec::new();
    until_event(&lines, "listening", Duration::from_secs(10), &mut seen);
    (secondary, lines, seen)
}

/// A real primary protected by the secondary at `address`, once its
/// initial synchronisation was acknowledged; with the `synchronised` line.
fn synchronised_primary(address: &str, extra: &[&str]) -> (Child, serde_json::Value) {
    let (primary, lines) = spawn_primary_with(address, extra);
    let synchronised = until_event(
        &lines,
        "synchronised",
        Duration::from_secs(30),
        &mut Vec::new(),
    );
    (primary, synchronised)
}

/// The primary's keyring, from the test key files.
fn primary_security() -> Security {
    let arguments = channel_arguments("primary");
    let keyring = Keyring::load(
        &PathBuf::from(&arguments[1]),
        &[PathBuf::from(&arguments[3])],
    )
    .expect("the test keys");
    Security::Noise(Arc::new(keyring))
}

/// A scripted peer on an established channel.
struct Peer {
    channel: Channel,
    sender: Sender,
}

impl Peer {
    fn connect(address: &str, security: &Security) -> Self {
        let stream = TcpStream::connect(address).expect("connect");
        Self {
            channel: Channel::connect(stream, security, Duration::from_secs(5)).expect("a channel"),
            sender: Sender::new(),
        }
    }

    fn send(&mut self, epoch: u64, message: &Message) {
        let bytes = self.sender.encode(epoch, message).expect("encodes");
        self.send_raw(&bytes);
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        // The secondary may already have closed: what it said matters.
        let _ = self.channel.writer.write_all(bytes);
        let _ = self.channel.writer.flush();
    }

    /// The next message that is not a heartbeat, or None once the
    /// connection ends.
    fn receive(&mut self) -> Option<Message> {
        loop {
            match read_message(&mut self.channel.reader) {
                Ok(envelope) if matches!(envelope.message, Message::Heartbeat(_)) => {}
                Ok(envelope) => return Some(envelope.message),
                Err(_) => return None,
            }
        }
    }

    fn hello(&mut self, vm_id: u64) -> Option<Message> {
        self.send(0, &Message::Hello(scripted_hello(vm_id, MEMORY)));
        self.receive()
    }

    /// The reason of the `Goodbye` that ends the connection.
    fn goodbye(&mut self) -> String {
        loop {
            match self.receive() {
                Some(Message::Goodbye(reason)) => return reason,
                Some(_) => {}
                None => panic!("the connection ended without a Goodbye"),
            }
        }
    }
}

/// A raw frame of one page (numbered `page_number`), with its header's
/// store size rewritten to `store_pages` (and the header checksum fixed).
fn frame(page_number: u64, store_pages: Option<u32>) -> Vec<u8> {
    let mut batch = PageBatch::new();
    batch.push(page_number, &[0x5a; PAGE_BYTES]);
    let mut frame = Vec::new();
    Encoder::new(&"raw".parse::<CodecSpec>().expect("spec"))
        .encode(&batch, &mut frame)
        .expect("encode");
    if let Some(store_pages) = store_pages {
        frame[32..36].copy_from_slice(&store_pages.to_le_bytes());
        let checksum = xxhash_rust::xxh3::xxh3_64(&frame[..48]);
        frame[48..56].copy_from_slice(&checksum.to_le_bytes());
    }
    frame
}

/// Resident memory of process `pid`, in bytes.
fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

fn disconnected(lines: &Receiver<serde_json::Value>, seen: &mut Vec<serde_json::Value>) -> String {
    let line = until_event(lines, "disconnected", Duration::from_secs(10), seen);
    line["reason"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn strangers_and_plain_text_are_refused_before_any_vm_and_the_real_primary_then_protects() {
    if !require_kvm() {
        return;
    }
    // Arrange
    let address = free_address();
    let (mut secondary, lines, mut seen) = listening_secondary(&address, &[]);
    let stranger = KeyPair::generate().expect("a key");
    let secondary_public = {
        let arguments = channel_arguments("primary");
        Keyring::load(
            &PathBuf::from(&arguments[1]),
            &[PathBuf::from(&arguments[3])],
        )
        .expect("keys")
        .peers[0]
    };
    let stranger_security = Security::Noise(Arc::new(Keyring {
        local: stranger,
        peers: vec![secondary_public],
    }));

    // Act: a stranger completes its side of the handshake and says Hello;
    // a plain-text peer says Hello.
    let mut intruder = Peer::connect(&address, &stranger_security);
    let intruder_answer = intruder.hello(7);
    let stranger_reason = disconnected(&lines, &mut seen);
    let mut plain = TcpStream::connect(&address).expect("connect");
    let hello = Sender::new()
        .encode(0, &Message::Goodbye("plain".to_owned()))
        .expect("encodes");
    plain.write_all(&hello).expect("send");
    let plain_reason = disconnected(&lines, &mut seen);
    let (mut primary, synchronised) = synchronised_primary(&address, &[]);

    // Assert
    let _ = primary.kill();
    let _ = secondary.kill();
    assert_eq!(intruder_answer, None, "a stranger got an answer");
    assert!(
        stranger_reason.contains("is not authorised"),
        "{stranger_reason}"
    );
    assert!(plain_reason.contains("plain text"), "{plain_reason}");
    assert!(
        !seen.iter().any(|line| line["event"] == "connected"),
        "a VM was created for an untrusted peer: {seen:?}"
    );
    assert_eq!(synchronised["event"], "synchronised");
}

#[test]
fn hostile_frames_from_a_peer_with_the_key_are_refused_and_the_secondary_stays_small() {
    if !require_kvm() {
        return;
    }
    // Arrange
    let address = free_address();
    let (mut secondary, lines, mut seen) = listening_secondary(&address, &[]);
    let security = primary_security();

    // Act 1: a frame whose header asks for a 16 TiB version store.
    let mut peer = Peer::connect(&address, &security);
    assert_eq!(peer.hello(7), Some(Message::Welcome));
    peer.send(0, &Message::EpochBegin(0));
    peer.send(0, &Message::Pages(frame(1, Some(u32::MAX))));
    let huge_store = peer.goodbye();
    disconnected(&lines, &mut seen);

    // Act 2: a page beyond guest memory.
    let mut peer = Peer::connect(&address, &security);
    assert_eq!(peer.hello(8), Some(Message::Welcome));
    peer.send(0, &Message::EpochBegin(0));
    peer.send(0, &Message::Pages(frame(MEMORY / 4096 + 10, None)));
    let beyond = peer.goodbye();
    disconnected(&lines, &mut seen);

    // Act 3: a message announcing a 1 GiB payload before Hello.
    let mut peer = Peer::connect(&address, &security);
    let mut header = peer
        .sender
        .encode(0, &Message::Pages(vec![0; 16]))
        .expect("encodes");
    header.truncate(48);
    let announced = u32::try_from(MAX_PAYLOAD).expect("fits");
    header[24..28].copy_from_slice(&announced.to_le_bytes());
    let checksum = xxhash_rust::xxh3::xxh3_64(&header[..40]);
    header[40..48].copy_from_slice(&checksum.to_le_bytes());
    peer.send_raw(&header);
    let before_hello = disconnected(&lines, &mut seen);
    let resident = resident_bytes(secondary.id());

    // Act 4: the real primary.
    let (mut primary, synchronised) = synchronised_primary(&address, &[]);

    // Assert
    let _ = primary.kill();
    let _ = secondary.kill();
    assert!(huge_store.contains("version store"), "{huge_store}");
    assert!(beyond.contains("beyond"), "{beyond}");
    assert!(
        before_hello.contains("more than the protocol allows"),
        "{before_hello}"
    );
    assert!(
        resident < 512 << 20,
        "the secondary holds {} MiB after the attacks",
        resident >> 20
    );
    assert_eq!(synchronised["event"], "synchronised");
}

#[test]
fn a_squatter_that_connects_first_does_not_keep_the_real_primary_out() {
    if !require_kvm() {
        return;
    }
    // Arrange: a squatter connects, starts a handshake and stops talking.
    let address = free_address();
    let (mut secondary, _lines, _) = listening_secondary(&address, &[]);
    let mut squatter = TcpStream::connect(&address).expect("connect");
    squatter.write_all(b"URN1").expect("a preamble");

    // Act: the real primary connects while the squatter holds its
    // connection open.
    let (mut primary, synchronised) = synchronised_primary(&address, &[]);
    squatter
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("a timeout");
    let squatter_end = std::io::Read::read(&mut squatter, &mut [0u8; 16]);

    // Assert: the primary got in; the squatter was dropped at the deadline.
    let _ = primary.kill();
    let _ = secondary.kill();
    assert_eq!(synchronised["event"], "synchronised");
    assert!(
        matches!(squatter_end, Ok(0))
            || squatter_end.is_err_and(|error| error.kind() == std::io::ErrorKind::ConnectionReset),
        "the squatter's connection was not closed"
    );
}

/// A relay in front of the secondary, on one port for TCP and UDP: it
/// forwards the connection both ways and the heartbeats both ways, and
/// keeps the last datagram the primary sent. Returns its address and that
/// datagram's slot, and the socket to replay it from.
fn heartbeat_sniffing_relay(
    secondary: &str,
) -> (
    String,
    Arc<std::sync::Mutex<Option<Vec<u8>>>>,
    std::net::UdpSocket,
) {
    use std::net::{SocketAddr, TcpListener, UdpSocket};
    let secondary: SocketAddr = secondary.parse().expect("an address");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
    let address = listener.local_addr().expect("address");
    let udp = UdpSocket::bind(address).expect("bind the relay's UDP");
    std::thread::spawn(move || {
        let (from_primary, _) = listener.accept().expect("the primary connects");
        let to_secondary = TcpStream::connect(secondary).expect("reach the secondary");
        let (mut upstream_in, mut upstream_out) = (
            from_primary.try_clone().expect("clone"),
            to_secondary.try_clone().expect("clone"),
        );
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut upstream_in, &mut upstream_out);
        });
        let (mut downstream_in, mut downstream_out) = (to_secondary, from_primary);
        let _ = std::io::copy(&mut downstream_in, &mut downstream_out);
    });
    let last = Arc::new(std::sync::Mutex::new(None));
    {
        let udp = udp.try_clone().expect("clone");
        let last = last.clone();
        std::thread::spawn(move || {
            let mut primary: Option<SocketAddr> = None;
            let mut buffer = [0u8; 256];
            while let Ok((length, from)) = udp.recv_from(&mut buffer) {
                if from == secondary {
                    if let Some(primary) = primary {
                        let _ = udp.send_to(&buffer[..length], primary);
                    }
                } else if from.port() != address.port() {
                    primary = Some(from);
                    *last.lock().expect("no panics here") = Some(buffer[..length].to_vec());
                    let _ = udp.send_to(&buffer[..length], secondary);
                }
            }
        });
    }
    (address.to_string(), last, udp)
}

#[test]
fn a_replayed_heartbeat_does_not_keep_a_frozen_primary_alive() {
    if !require_kvm() {
        return;
    }
    // Arrange: only heartbeats decide (a long progress deadline); a relay
    // sniffs the primary's heartbeats.
    let address = free_address();
    let patient = ["--progress-timeout", "60s"];
    let (mut secondary, lines, mut seen) = listening_secondary(&address, &patient);
    let (relay, sniffed, replay_socket) = heartbeat_sniffing_relay(&address);
    let (mut primary, _) = synchronised_primary(&relay, &patient);
    std::thread::sleep(Duration::from_millis(300));
    let datagram = sniffed
        .lock()
        .expect("no panics")
        .clone()
        .expect("a heartbeat went through the relay");

    // Act: freeze the primary and replay its heartbeat every 5 ms.
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(primary.id().cast_signed(), libc::SIGSTOP) };
    let replaying = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let replayer = {
        let replaying = replaying.clone();
        let target: std::net::SocketAddr = address.parse().expect("an address");
        std::thread::spawn(move || {
            while replaying.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = replay_socket.send_to(&datagram, target);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let resumed = until_event(&lines, "resumed", Duration::from_secs(10), &mut seen);

    // Assert
    replaying.store(false, std::sync::atomic::Ordering::Relaxed);
    let _ = replayer.join();
    // SAFETY: as above.
    unsafe { libc::kill(primary.id().cast_signed(), libc::SIGCONT) };
    let _ = primary.kill();
    let _ = secondary.kill();
    assert_eq!(resumed["event"], "resumed");
}

#[test]
fn sigterm_stops_a_secondary_that_is_serving_a_primary() {
    if !require_kvm() {
        return;
    }
    // Arrange: a connected peer that keeps beating.
    let address = free_address();
    let (mut secondary, _lines, _) = listening_secondary(&address, &[]);
    let mut peer = Peer::connect(&address, &primary_security());
    assert_eq!(peer.hello(9), Some(Message::Welcome));

    // Act
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(secondary.id().cast_signed(), libc::SIGTERM) };
    for clock in 0..40 {
        peer.send(0, &Message::Heartbeat(clock));
        std::thread::sleep(Duration::from_millis(5));
    }
    let reason = peer.goodbye();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = secondary.try_wait().expect("wait") {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = secondary.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };

    // Assert
    assert!(reason.contains("stopping"), "{reason}");
    assert!(
        status.is_some_and(|status| status.success()),
        "the secondary did not stop cleanly: {status:?}"
    );
}
