//! A real secondary against a scripted primary: corrupted, replayed and
//! out-of-order messages are refused without applying anything, and an
//! epoch torn by a cut connection is discarded when the secondary takes over.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::process::Child;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use common::{free_address, require_kvm, scripted_hello, spawn_json};
use understudy_checkpoint::protocol::{EpochEnd, HEADER_LEN, Message, Sender, read_message};
use understudy_compress::{CodecSpec, Encoder, PageBatch};
use understudy_vm::memory;
use understudy_vm::workload::WorkloadSpec;
use understudy_vm::{PAGE_BYTES, PAGE_SIZE, Vm, VmConfig};

const MEMORY: u64 = 64 << 20;

fn spawn_secondary(address: &str) -> (Child, Receiver<serde_json::Value>) {
    spawn_json(&[
        "secondary",
        "--plaintext",
        "--listen",
        address,
        "--duration",
        "300ms",
        "--json",
        "--verify",
        // The scripted primary sends no heartbeats: a generous timeout
        // keeps a slow machine from declaring it lost between messages.
        "--heartbeat-misses",
        "300",
    ])
}

fn next_event(lines: &Receiver<serde_json::Value>, event: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no '{event}' line from the secondary"));
        if line["event"] == event {
            return line;
        }
    }
}

/// A scripted primary: the epochs of a real (booted, never run) VM.
struct ScriptedPrimary {
    stream: TcpStream,
    sender: Sender,
    encoder: Encoder,
}

impl ScriptedPrimary {
    fn connect(address: &str, vm_id: u64) -> Self {
        Self::connect_with(address, scripted_hello(vm_id, MEMORY))
    }

    fn connect_with(address: &str, hello: understudy_checkpoint::protocol::Hello) -> Self {
        let mut primary = Self {
            stream: TcpStream::connect(address).expect("connect to the secondary"),
            sender: Sender::new(),
            encoder: Encoder::new(&"raw".parse::<CodecSpec>().expect("spec")),
        };
        primary.send(0, &Message::Hello(hello));
        assert_eq!(primary.receive(), Message::Welcome);
        primary
    }

    fn bytes(&mut self, epoch: u64, message: &Message) -> Vec<u8> {
        self.sender.encode(epoch, message).expect("encodes")
    }

    fn send(&mut self, epoch: u64, message: &Message) {
        let bytes = self.bytes(epoch, message);
        self.stream.write_all(&bytes).expect("send");
    }

    /// The next message that is not a heartbeat.
    fn receive(&mut self) -> Message {
        loop {
            let envelope = read_message(&mut self.stream).expect("a message from the secondary");
            if !matches!(envelope.message, Message::Heartbeat(_)) {
                return envelope.message;
            }
        }
    }

    fn pages(&mut self, pages: &PageBatch) -> Message {
        let mut frame = Vec::new();
        self.encoder.encode(pages, &mut frame).expect("encode");
        Message::Pages(frame)
    }

    /// Sends a whole, valid epoch and waits for its acknowledgement.
    fn epoch(&mut self, epoch: u64, pages: &PageBatch, state: &[u8], memory_hash: Option<u64>) {
        self.send(epoch, &Message::EpochBegin(0));
        let message = self.pages(pages);
        self.send(epoch, &message);
        self.send(epoch, &Message::State(state.to_vec()));
        self.send(
            epoch,
            &Message::EpochEnd(EpochEnd {
                pages: pages.len() as u64,
                memory_hash,
            }),
        );
        assert_eq!(self.receive(), Message::Ack);
    }
}

fn non_zero_pages(vm: &Vm) -> PageBatch {
    let mut batch = PageBatch::new();
    let mut page = [0u8; PAGE_BYTES];
    for address in (0..MEMORY).step_by(PAGE_BYTES) {
        memory::read(vm.memory(), address, &mut page).expect("read");
        if page.iter().any(|b| *b != 0) {
            batch.push(address / PAGE_SIZE, &page);
        }
    }
    batch
}

/// A page different from anything in epoch 0.
fn poison() -> PageBatch {
    let mut batch = PageBatch::new();
    batch.push(4000, &[0xab; PAGE_BYTES]);
    batch
}

/// A real guest (booted, never run) and its encoded state: what a
/// scripted primary's epoch 0 carries.
fn guest() -> (Vm, Vec<u8>) {
    let vm = Vm::boot(
        VmConfig::new(MEMORY, 1),
        &"counter".parse::<WorkloadSpec>().expect("workload"),
    )
    .expect("boot a VM");
    let state = vm.capture_state().expect("capture").encode();
    (vm, state)
}

#[test]
fn bad_messages_are_refused_and_a_torn_epoch_is_never_applied() {
    if !require_kvm() {
        return;
    }
    // Arrange: a secondary, and the epoch 0 of a real guest.
    let address = free_address();
    let (mut secondary, lines) = spawn_secondary(&address);
    next_event(&lines, "listening");
    let (vm, state) = guest();
    let memory_hash = memory::hash(vm.memory()).expect("hash");
    let epoch0 = non_zero_pages(&vm);

    // Act and assert, one connection per abuse.
    // 1. A corrupted payload in epoch 1.
    let mut primary = ScriptedPrimary::connect(&address, 1);
    primary.epoch(0, &epoch0, &state, Some(memory_hash));
    primary.send(1, &Message::EpochBegin(0));
    let message = primary.pages(&poison());
    let mut corrupted = primary.bytes(1, &message);
    corrupted[HEADER_LEN + 60] ^= 0x01;
    primary.stream.write_all(&corrupted).expect("send");
    let Message::Goodbye(reason) = primary.receive() else {
        panic!("the secondary did not say goodbye to a corrupted message");
    };
    assert!(reason.contains("corrupted"), "reason: {reason}");

    // 2. A replayed message.
    let mut primary = ScriptedPrimary::connect(&address, 2);
    primary.epoch(0, &epoch0, &state, Some(memory_hash));
    let begin = primary.bytes(1, &Message::EpochBegin(0));
    primary.stream.write_all(&begin).expect("send");
    primary.stream.write_all(&begin).expect("send the replay");
    let Message::Goodbye(reason) = primary.receive() else {
        panic!("the secondary did not say goodbye to a replayed message");
    };
    assert!(reason.contains("replayed or reordered"), "reason: {reason}");

    // 3. An epoch ended before its state arrived.
    let mut primary = ScriptedPrimary::connect(&address, 3);
    primary.epoch(0, &epoch0, &state, Some(memory_hash));
    primary.send(1, &Message::EpochBegin(0));
    let message = primary.pages(&poison());
    primary.send(1, &message);
    primary.send(
        1,
        &Message::EpochEnd(EpochEnd {
            pages: 1,
            memory_hash: None,
        }),
    );
    let Message::Goodbye(reason) = primary.receive() else {
        panic!("the secondary did not say goodbye to an epoch without state");
    };
    assert!(reason.contains("not allowed"), "reason: {reason}");

    // 4. A connection cut in the middle of epoch 1's pages.
    let mut primary = ScriptedPrimary::connect(&address, 4);
    primary.epoch(0, &epoch0, &state, Some(memory_hash));
    primary.send(1, &Message::EpochBegin(0));
    let message = primary.pages(&poison());
    let pages = primary.bytes(1, &message);
    primary
        .stream
        .write_all(&pages[..pages.len() / 2])
        .expect("send half");
    drop(primary);

    // The secondary takes over from epoch 0, with epoch 0's memory exactly:
    // nothing of the refused or torn epochs was applied.
    let resumed = next_event(&lines, "resumed");
    assert_eq!(resumed["epoch"], 0);
    assert_eq!(resumed["memory_hash"], memory_hash);
    let status = secondary.wait().expect("the secondary exits");
    assert!(status.success(), "secondary failed: {status}");
}

/// Reads the secondary's events until `count` `disconnected` ones came,
/// failing on a `resumed`; then waits `quiet` more for a late `resumed`.
fn disconnects_without_takeover(
    lines: &Receiver<serde_json::Value>,
    count: usize,
    quiet: Duration,
) -> Vec<String> {
    let mut reasons = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while reasons.len() < count {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("only {reasons:?} disconnects from the secondary"));
        assert_ne!(line["event"], "resumed", "the secondary resumed: {line}");
        if line["event"] == "disconnected" {
            reasons.push(line["reason"].as_str().unwrap_or_default().to_owned());
        }
    }
    if let Ok(line) = lines.recv_timeout(quiet) {
        assert_ne!(line["event"], "resumed", "the secondary resumed: {line}");
    }
    reasons
}

/// A secondary that runs until killed (it must not resume anything).
fn spawn_listening_secondary(address: &str) -> (Child, Receiver<serde_json::Value>) {
    spawn_json(&[
        "secondary",
        "--plaintext",
        "--listen",
        address,
        "--json",
        "--heartbeat-misses",
        "300",
    ])
}

/// A scripted migration source whose epoch 0 was acknowledged.
fn migration_acknowledged(address: &str) -> ScriptedPrimary {
    let (vm, state) = guest();
    let mut hello = scripted_hello(9, MEMORY);
    hello.purpose = understudy_checkpoint::protocol::Purpose::Migrate;
    let mut source = ScriptedPrimary::connect_with(address, hello);
    source.epoch(0, &non_zero_pages(&vm), &state, None);
    source
}

#[test]
fn a_migration_whose_source_vanishes_before_the_handover_is_not_resumed() {
    if !require_kvm() {
        return;
    }
    // Arrange: a migration's epoch 0, applied and acknowledged.
    let address = free_address();
    let (mut target, lines) = spawn_listening_secondary(&address);
    next_event(&lines, "listening");
    let source = migration_acknowledged(&address);

    // Act: the source vanishes without handing the guest over (it runs on
    // there: the target must not start a second copy).
    drop(source);

    // Assert: the connection ends, nothing is resumed.
    let reasons = disconnects_without_takeover(&lines, 1, Duration::from_secs(1));
    let _ = target.kill();
    assert!(
        reasons[0].contains("before its source handed the guest over"),
        "{reasons:?}"
    );
}

#[test]
fn a_migration_handed_over_is_confirmed_and_resumed() {
    if !require_kvm() {
        return;
    }
    // Arrange: a migration's epoch 0, applied and acknowledged.
    let address = free_address();
    let (mut target, lines) = spawn_listening_secondary(&address);
    next_event(&lines, "listening");
    let mut source = migration_acknowledged(&address);

    // Act: the handover.
    source.send(
        0,
        &Message::Handover(understudy_checkpoint::protocol::Handover {
            kept_image: 0,
            protect_to: String::new(),
        }),
    );

    // Assert: confirmed, and the guest resumed as a migration.
    assert_eq!(source.receive(), Message::TookOver);
    let resumed = next_event(&lines, "resumed");
    let _ = target.kill();
    assert_eq!(resumed["migrated"], true);
}

#[test]
fn a_bare_connection_after_a_clean_stop_resumes_nothing() {
    if !require_kvm() {
        return;
    }
    // Arrange: a primary that committed epoch 0, then left cleanly.
    let address = free_address();
    let (mut secondary, lines) = spawn_listening_secondary(&address);
    next_event(&lines, "listening");
    let (vm, state) = guest();
    let mut primary = ScriptedPrimary::connect(&address, 7);
    primary.epoch(0, &non_zero_pages(&vm), &state, None);
    primary.send(0, &Message::Goodbye("stopping".to_owned()));
    drop(primary);

    // Act: anybody connects and closes without a word.
    drop(TcpStream::connect(&address).expect("a bare connection"));

    // Assert: two ends, no takeover of the stale backup.
    let reasons = disconnects_without_takeover(&lines, 2, Duration::from_secs(1));
    let _ = secondary.kill();
    assert!(reasons[0].contains("stopping"), "{reasons:?}");
    assert!(
        reasons[1].contains("closed the connection before Hello"),
        "{reasons:?}"
    );
}

#[test]
fn a_primary_that_dies_while_resynchronising_is_not_rolled_back() {
    if !require_kvm() {
        return;
    }
    // Arrange: the primary committed epoch 0, left (it lost its secondary
    // and ran on unprotected), and came back as the same VM.
    let address = free_address();
    let (mut secondary, lines) = spawn_listening_secondary(&address);
    next_event(&lines, "listening");
    let (vm, state) = guest();
    let epoch0 = non_zero_pages(&vm);
    let mut first = ScriptedPrimary::connect(&address, 7);
    first.epoch(0, &epoch0, &state, None);
    first.send(0, &Message::Goodbye("secondary lost".to_owned()));
    drop(first);
    let mut again = ScriptedPrimary::connect(&address, 7);
    again.send(0, &Message::EpochBegin(0));
    let message = again.pages(&epoch0);
    again.send(0, &message);

    // Act: it dies in the middle of the new synchronisation.
    drop(again);

    // Assert: the old connection's epoch 0 is not resumed.
    let reasons = disconnects_without_takeover(&lines, 2, Duration::from_secs(1));
    let _ = secondary.kill();
    assert!(reasons[1].contains("before it committed"), "{reasons:?}");
}

#[test]
fn a_secondary_that_acknowledges_an_epoch_never_sent_is_dropped_with_a_goodbye() {
    if !require_kvm() {
        return;
    }
    // Arrange: a scripted secondary that welcomes a real primary and, once
    // epoch 0 ended, acknowledges epoch 3.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    let secondary = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("the primary connects");
        let mut sender = Sender::new();
        let mut answer = |stream: &mut TcpStream, epoch, message: &Message| {
            let bytes = sender.encode(epoch, message).expect("encodes");
            stream.write_all(&bytes).expect("answer the primary");
        };
        loop {
            let envelope = read_message(&mut stream).expect("a message from the primary");
            match envelope.message {
                Message::Hello(_) => answer(&mut stream, 0, &Message::Welcome),
                Message::EpochEnd(_) => answer(&mut stream, 3, &Message::Ack),
                Message::Goodbye(reason) => return reason,
                _ => {}
            }
        }
    });

    // Act
    let output = common::understudy(&[
        "primary",
        "--plaintext",
        "--secondary",
        &address,
        "--workload",
        "counter",
        "--memory",
        "64M",
        // The scripted secondary sends no heartbeats.
        "--heartbeat-misses",
        "300",
    ]);

    // Assert: the primary refused the acknowledgement and said why.
    let goodbye = secondary.join().expect("the scripted secondary");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("acknowledged epoch 3 where epoch 0 was due"),
        "{stderr}"
    );
    assert!(goodbye.contains("acknowledged epoch 3"), "{goodbye}");
}

#[test]
fn a_post_copy_target_asking_for_pages_outside_guest_memory_is_ignored() {
    if !require_kvm() {
        return;
    }
    // Arrange: a scripted target that, once the guest's state arrived, asks
    // for pages beyond guest memory (and one page twice), then acknowledges
    // the page epoch.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    let target = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("the source connects");
        let mut sender = Sender::new();
        let mut answer = |stream: &mut TcpStream, epoch, message: &Message| {
            let bytes = sender.encode(epoch, message).expect("encodes");
            stream.write_all(&bytes).expect("answer the source");
        };
        let mut pages_in_epoch_1 = 0usize;
        loop {
            let envelope = read_message(&mut stream).expect("a message from the source");
            match (envelope.epoch, envelope.message) {
                (_, Message::Hello(_)) => answer(&mut stream, 0, &Message::Welcome),
                (0, Message::EpochEnd(_)) => {
                    answer(&mut stream, 0, &Message::Ack);
                    for page in [u64::MAX, MEMORY / PAGE_SIZE + 5, 3, 3] {
                        answer(&mut stream, 1, &Message::PageRequest(page));
                    }
                }
                (1, Message::Pages(_)) => pages_in_epoch_1 += 1,
                (1, Message::EpochEnd(_)) => answer(&mut stream, 1, &Message::Ack),
                (_, Message::Goodbye(reason)) => return (reason, pages_in_epoch_1),
                _ => {}
            }
        }
    });

    // Act
    let output = common::understudy(&[
        "migrate",
        "--plaintext",
        "--to",
        &address,
        "--mode",
        "postcopy",
        "--workload",
        "counter",
        "--memory",
        "64M",
        "--after",
        "200ms",
        // The scripted target sends no heartbeats.
        "--heartbeat-misses",
        "300",
    ]);

    // Assert: the migration completed, the requests outside memory were
    // ignored with a warning, and pages did move.
    let (goodbye, frames) = target.join().expect("the scripted target");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("outside guest memory; ignored"), "{stderr}");
    assert_eq!(goodbye, "migration complete");
    assert!(frames > 0);
}
