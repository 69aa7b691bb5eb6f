//! The secondary's whole receive path on arbitrary bytes: messages read
//! with the pre-`Hello` bound and then the full one, the receiver's state
//! machine, a decoder bounded by a small guest (fresh, or primed by a valid
//! epoch 0 first), the secondary's own `Staging` (duplicate-page and output
//! bounds), and the apply of each committed epoch onto a fake 64-page
//! memory (the real backup VM needs KVM).
//!
//! The first input byte chooses whether a valid Hello and epoch 0 come
//! first (so the fuzzer reaches staged epochs and a primed decoder) and
//! whether headers get their checksums and sequence numbers fixed up (so
//! it reaches payloads). Nothing may panic, allocate beyond the bounds, or
//! change memory unless an epoch commits whole.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use understudy_checkpoint::protocol::{
    Action, EpochEnd, Hello, MAX_PAYLOAD_BEFORE_WELCOME, Message, PROTOCOL_VERSION, Purpose,
    Receiver, Sender, read_message_within,
};
use understudy_compress::{CodecSpec, Decoder, Encoder, PageBatch};
use understudy_secondary::Staging;

const GUEST_PAGES: u64 = 64;
const PAGE: usize = 4096;
const STORE_PAGES: u32 = 16;

/// A valid Hello and epoch 0 of two pages, encoded once.
fn preamble() -> &'static (Vec<u8>, Sender) {
    static PREAMBLE: OnceLock<(Vec<u8>, Sender)> = OnceLock::new();
    PREAMBLE.get_or_init(|| {
        let mut sender = Sender::new();
        let mut bytes = Vec::new();
        let hello = Hello {
            version: PROTOCOL_VERSION,
            purpose: Purpose::Replicate,
            memory_bytes: GUEST_PAGES * PAGE as u64,
            vcpus: 1,
            guest_image_hash: 1,
            vm_id: 1,
            owner: 1,
            generation: 0,
            store_pages: STORE_PAGES,
            heartbeat_interval: std::time::Duration::from_millis(10),
            heartbeat_timeout: std::time::Duration::from_millis(50),
            checkpoint_interval: std::time::Duration::from_millis(25),
            base_image: 0,
        };
        let mut batch = PageBatch::new();
        batch.push(3, &[7u8; PAGE]);
        batch.push(9, &[1u8; PAGE]);
        let mut frame = Vec::new();
        Encoder::new(&"delta:cache=64K".parse::<CodecSpec>().expect("spec"))
            .encode(&batch, &mut frame)
            .expect("encode");
        for message in [
            Message::Hello(hello),
            Message::EpochBegin(0),
            Message::Pages(frame),
            Message::State(vec![0; 8]),
            Message::EpochEnd(EpochEnd {
                pages: 2,
                memory_hash: None,
            }),
        ] {
            bytes.extend(sender.encode(0, &message).expect("encodes"));
        }
        (bytes, sender)
    })
}

/// Rewrites the 48-byte headers in `bytes` so their sequence numbers follow
/// on from `next` and their checksums match (payload checksums too).
fn fix_up(bytes: &mut [u8], mut next: u64) {
    let mut at = 0;
    while at + 48 <= bytes.len() {
        bytes[at..4 + at].copy_from_slice(b"URPL");
        bytes[8 + at..16 + at].copy_from_slice(&next.to_le_bytes());
        let length =
            u32::from_le_bytes(bytes[24 + at..28 + at].try_into().expect("4 bytes")) as usize;
        let length = length.min(bytes.len() - at - 48);
        bytes[24 + at..28 + at].copy_from_slice(&(length as u32).to_le_bytes());
        let payload = xxhash_rust::xxh3::xxh3_64(&bytes[at + 48..at + 48 + length]);
        bytes[32 + at..40 + at].copy_from_slice(&payload.to_le_bytes());
        let header = xxhash_rust::xxh3::xxh3_64(&bytes[at..at + 40]);
        bytes[40 + at..48 + at].copy_from_slice(&header.to_le_bytes());
        at += 48 + length;
        next += 1;
    }
}

/// The secondary's staging and apply, over a fake memory.
struct Session {
    receiver: Receiver,
    decoder: Option<Decoder>,
    memory: Vec<u8>,
    committed: Option<u64>,
    staging: Staging,
    /// Whether the epoch's state arrived (a real `VmState` needs a VM).
    state: bool,
}

impl Session {
    fn accept(&mut self, action: Action) -> Result<(), ()> {
        match action {
            Action::Greet(hello) => {
                if hello.memory_bytes != GUEST_PAGES * PAGE as u64
                    || u64::from(hello.store_pages) > GUEST_PAGES
                {
                    return Err(());
                }
                self.decoder = Some(Decoder::bounded(hello.store_pages as usize, GUEST_PAGES));
            }
            Action::BeginEpoch(_) => {
                self.staging.begin(GUEST_PAGES);
                self.state = false;
            }
            Action::StagePages(frame) => {
                let decoder = self.decoder.as_mut().ok_or(())?;
                let mut pages = PageBatch::new();
                decoder.decode(&frame, &mut pages).map_err(|_| ())?;
                for (page_number, _) in pages.iter() {
                    assert!(
                        page_number < GUEST_PAGES,
                        "the decoder let page {page_number} through"
                    );
                }
                if self.committed.is_none() {
                    for (page_number, page) in pages.iter() {
                        let at = page_number as usize * PAGE;
                        self.memory[at..at + PAGE].copy_from_slice(page);
                    }
                    self.staging.received += pages.len() as u64;
                } else {
                    self.staging.stage_pages(0, &pages).map_err(|_| ())?;
                    assert!(self.staging.pages.len() as u64 <= GUEST_PAGES);
                }
            }
            Action::StageState(_) => {
                self.staging.state = None;
                self.state = true;
            }
            Action::StageOutput(frame) => {
                self.staging.stage_output(0, frame).map_err(|_| ())?;
            }
            Action::Commit { epoch, end } => {
                if !self.state || (self.committed.is_some() && end.pages != self.staging.received) {
                    return Err(());
                }
                for (page_number, page) in self.staging.pages.iter() {
                    let at = page_number as usize * PAGE;
                    self.memory[at..at + PAGE].copy_from_slice(page);
                }
                self.committed = Some(epoch);
            }
            Action::Heartbeat(_)
            | Action::Sync(_)
            | Action::LogInput { .. }
            | Action::Discard(_)
            | Action::VerifyPages(_)
            | Action::Handover(_) => {}
            Action::Close(_) => return Err(()),
        }
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (preamble, sender) = preamble();
    let mut bytes = Vec::new();
    if mode & 1 == 1 {
        bytes.extend_from_slice(preamble);
    }
    let start = bytes.len();
    bytes.extend_from_slice(rest);
    if mode & 2 == 2 {
        let next = if mode & 1 == 1 {
            sender.next_sequence()
        } else {
            0
        };
        fix_up(&mut bytes[start..], next);
    }
    let mut session = Session {
        receiver: Receiver::new(),
        decoder: None,
        memory: vec![0; GUEST_PAGES as usize * PAGE],
        committed: None,
        staging: Staging::default(),
        state: false,
    };
    let mut reader = bytes.as_slice();
    loop {
        let limit = if session.decoder.is_none() {
            MAX_PAYLOAD_BEFORE_WELCOME
        } else {
            usize::MAX
        };
        let Ok(envelope) = read_message_within(&mut reader, limit) else {
            return;
        };
        let Ok(action) = session.receiver.accept(envelope) else {
            return;
        };
        let before = session.committed;
        let memory_before = xxhash_rust::xxh3::xxh3_64(&session.memory);
        let failed = session.accept(action).is_err();
        if failed {
            if before.is_some() {
                // A refused message of a staged epoch changes nothing.
                assert_eq!(xxhash_rust::xxh3::xxh3_64(&session.memory), memory_before);
                assert_eq!(session.committed, before);
            }
            return;
        }
    }
});
