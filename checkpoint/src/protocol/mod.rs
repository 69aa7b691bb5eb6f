//! The replication protocol between a primary and a secondary (and between
//! a migration source and its target).
//!
//! # Message sequence
//!
//! ```text
//! primary                                   secondary
//!   Hello {version, purpose, guest identity, owner, generation} ->
//!                                           <- Welcome | Refuse {reason}
//!   epoch 0: the initial copy (pre-copy rounds, while the guest runs)
//!   EpochBegin {generation}    (epoch 0)    ->
//!   Pages {codec frame}        (epoch 0)    ->   repeated
//!   State {vCPU and VM state}  (epoch 0)    ->   once
//!   Output {frame}             (epoch 0)    ->   each frame the guest sent
//!                                              in the epoch, in order
//!   EpochEnd {pages, memory hash}           ->
//!                                           <- Ack (epoch 0), once applied
//!   epoch n = 1, 2, ...: one checkpoint each
//!   EpochBegin (n), Pages* (n), State (n), Output* (n), EpochEnd (n) ->
//!                                           <- Ack (n)
//!   Heartbeat, either way, between any two messages
//!   Sync {token}                            ->   any time after Hello
//!                                           <- Synced {token}, once everything
//!                                              sent before it was processed
//!   Input {frame}  (epoch n)                ->   any time after Hello: a
//!                                              network frame the guest
//!                                              received while running epoch
//!                                              n; kept until n commits, and
//!                                              replayed into the guest on
//!                                              takeover if it never did
//!   Goodbye {reason}, either way, then close
//!
//!   COLO (Hello's purpose `Colo`): the same epochs, taken on demand; the
//!   secondary's guest runs from epoch 0's commit on, is fed every `Input`
//!   as it arrives (those of epoch n once it runs epoch n), and each epoch
//!   replaces its state
//!                                           <- SecondaryOutput {frame} (epoch n:
//!                                              the secondary runs epoch n + 1)
//!
//!   Post-copy (purpose `MigratePostcopy`): epoch 0 holds the state and,
//!   after pre-copy rounds (hybrid), the pages sent so far; the target runs
//!   the guest from its commit, and epoch 1 brings every page it lacks
//!   Discard {page numbers}     (epoch 0)    ->   before State: pages that
//!                                              changed since they were
//!                                              sent; the target drops them
//!                                           <- PageRequest {page} (a fault)
//!   PageHashes {xxh3 per page} (epoch 1)    ->   before State, with --verify
//!   A broken post-copy resumes on a new connection (purpose
//!   `PostcopyResume`, the same VM): after Welcome
//!                                           <- PagesHeld {bitmap}
//!   EpochBegin (1), Pages*, State, EpochEnd (1) ->  the pages it lacks
//!
//!   Pre-copy migration (purpose `Migrate`): epoch 0, then a commit; the
//!   target resumes the guest only on `Handover`, so a migration that
//!   fails before it leaves the guest running on the source
//!   Handover {kept image tag or 0, ""}      ->   after Ack (0)
//!                                           <- TookOver
//!   Planned switchover (purpose `Replicate`): the primary's guest paused
//!   at its last checkpoint n, acknowledged; the secondary resumes it and
//!   protects it by the old primary, now waiting at the address given
//!   Handover {kept image tag, address}      ->   after Ack (n)
//!                                           <- TookOver
//!
//!   A Hello naming a base image (the tag of an image the receiver kept
//!   of this VM: a return trip, a switchover's reverse protection): after
//!   Welcome
//!                                           <- BaseImage {tag, or 0: not held}
//!   and epoch 0 then carries only the pages changed since that image
//! ```
//!
//! # Framing
//!
//! Every message is a 48-byte header and a length-prefixed payload:
//!
//! ```text
//!  0  magic "URPL"
//!  4  kind u8, 3 reserved zero bytes
//!  8  sequence u64      per direction: 0, 1, 2, ... (replays and reordering
//!                       are refused)
//! 16  epoch u64         the epoch the message belongs to (0 when none)
//! 24  payload length u32
//! 28  reserved u32 (0)
//! 32  payload xxh3 u64
//! 40  header xxh3 u64   of bytes 0..40
//! 48  payload
//! ```
//!
//! [`Receiver`] is the secondary's explicit state machine: it accepts only
//! the next sequence number and, per state, only the messages listed above,
//! and it tells its caller what to do (stage pages, stage state, commit an
//! epoch). An epoch is committed only on its `EpochEnd`, after every
//! message of it arrived intact; an epoch cut short is never committed.

mod receiver;
#[cfg(test)]
mod tests;
mod wire;

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub use receiver::{Action, Receiver, ReceiverState};
pub use wire::{Envelope, Header, Sender, read_message, read_message_within};

/// Protocol version of this build.
pub const PROTOCOL_VERSION: u32 = 7;
/// Most epochs a primary has sent without their acknowledgement before it
/// waits: a slow secondary lengthens the epochs instead of letting held
/// output and queued checkpoints grow without bound. A secondary keeps the
/// output of this many committed epochs and one more for a takeover.
pub const MAX_UNACKNOWLEDGED_EPOCHS: u64 = 3;
/// Largest `Input` payload: one Ethernet frame with VLAN tags, generously.
pub const MAX_INPUT_FRAME: usize = 9216;
/// Header magic.
pub const MAGIC: [u8; 4] = *b"URPL";
/// Header length.
pub const HEADER_LEN: usize = 48;
/// Largest payload: a full page frame (1 GiB of pages) plus its records.
pub const MAX_PAYLOAD: usize = (1 << 30) + (16 << 20);
/// Longest reason text (`Refuse`, `Goodbye`).
const MAX_TEXT: usize = 4096;
/// Largest encoded VM state: vCPU registers and devices are a few KiB per
/// vCPU; this leaves room for hundreds.
pub const MAX_STATE: usize = 16 << 20;
/// Most page numbers in one `Discard`.
pub const MAX_DISCARD_PAGES: usize = 1 << 20;
/// Largest `PagesHeld` bitmap: one bit per page of a 2 TiB guest.
pub const MAX_HELD_BITMAP: usize = 64 << 20;
/// Largest payload a peer may send before its `Hello` was accepted.
pub const MAX_PAYLOAD_BEFORE_WELCOME: usize = MAX_TEXT;

/// A protocol failure.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The connection failed or closed.
    #[error("the connection failed")]
    Io(#[from] std::io::Error),
    /// Not our protocol.
    #[error("the peer does not speak the replication protocol (bad magic)")]
    BadMagic,
    /// The header was damaged.
    #[error("a message header is corrupted (checksum mismatch)")]
    HeaderChecksum,
    /// The payload was damaged.
    #[error("the payload of a {kind} message is corrupted (checksum mismatch)")]
    PayloadChecksum {
        /// Which message.
        kind: &'static str,
    },
    /// Unknown kind byte.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// Payload longer than any message may be.
    #[error("a message announces a {0}-byte payload, more than the protocol allows")]
    PayloadTooLarge(u64),
    /// A payload that does not parse.
    #[error("a {kind} message is malformed: {why}")]
    Malformed {
        /// Which message.
        kind: &'static str,
        /// What is wrong.
        why: &'static str,
    },
    /// Replayed or reordered.
    #[error(
        "message {actual} arrived where message {expected} was expected: replayed or reordered"
    )]
    OutOfSequence {
        /// Next sequence number expected.
        expected: u64,
        /// The message's.
        actual: u64,
    },
    /// Not allowed in the current state.
    #[error("a {kind} message (epoch {epoch}) is not allowed while {state}")]
    Unexpected {
        /// Which message.
        kind: &'static str,
        /// Its epoch.
        epoch: u64,
        /// The receiver's state.
        state: String,
    },
    /// An epoch of another fencing generation than the connection's.
    #[error("an epoch of fencing generation {epoch} on a connection of generation {hello}")]
    StaleGeneration {
        /// The generation `Hello` carried.
        hello: u64,
        /// The epoch's.
        epoch: u64,
    },
    /// The peers cannot work together.
    #[error("the peer refused: {0}")]
    Refused(String),
}

/// Why a connection is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Continuous replication: the secondary stands by.
    Replicate,
    /// Live migration: the target runs the guest after the last epoch.
    Migrate,
    /// Post-copy migration: epoch 0 carries the state only; the target
    /// resumes the guest at once and its memory arrives in epoch 1, pages
    /// it faults on first (`PageRequest`), the rest pushed behind them.
    MigratePostcopy,
    /// COLO replication: the secondary runs its copy of the guest from
    /// epoch 0 on, fed the primary's input; its output goes back to the
    /// primary's compare proxy (`SecondaryOutput`), and epochs are taken on
    /// demand (a mismatch, a compare timeout, the periodic interval).
    Colo,
    /// Resumes a post-copy whose connection broke: the target (still
    /// running the guest of the same `vm_id`) answers `Welcome` with the
    /// pages it holds (`PagesHeld`) and epoch 1 starts again with the rest.
    PostcopyResume,
}

/// What the two sides must agree on before any memory moves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version of the sender.
    pub version: u32,
    /// Replication or migration.
    pub purpose: Purpose,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// vCPU count.
    pub vcpus: u32,
    /// xxh3 of the guest image the VM was booted with.
    pub guest_image_hash: u64,
    /// Identifies this VM across reconnections.
    pub vm_id: u64,
    /// The instance (process) that runs the guest: the witness record's
    /// owner.
    pub owner: u64,
    /// The fencing token: the witness generation this pair will be in sync
    /// at (0 without a witness).
    pub generation: u64,
    /// Capacity of the codec's version store (pages) both ends keep: the
    /// receiver refuses more than the guest has, and every frame must
    /// agree.
    pub store_pages: u32,
    /// How often the primary sends heartbeats.
    pub heartbeat_interval: std::time::Duration,
    /// Silence after which the primary declares the secondary lost.
    pub heartbeat_timeout: std::time::Duration,
    /// The longest time the primary lets pass between two checkpoints
    /// when all is well (the epoch in Remus mode, the periodic interval in
    /// COLO mode): the secondary allows that much more than its progress
    /// deadline before it calls a primary that commits nothing lost.
    pub checkpoint_interval: std::time::Duration,
    /// The kept image of this VM the sender believes the receiver holds
    /// (a tag from an earlier `Handover`), whose pages it need not send
    /// again: only those changed since. 0: none, a full copy.
    pub base_image: u64,
}

/// What a `Handover` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handover {
    /// The tag of the image the sender keeps of the guest (its memory as
    /// handed over; 0: none): a later copy back names it and sends only
    /// what changed.
    pub kept_image: u64,
    /// A planned switchover: where the sender now waits, as a secondary,
    /// for the receiver to protect the guest (empty: a migration, no
    /// reverse protection).
    pub protect_to: String,
}

/// Longest `Handover` address.
pub const MAX_HANDOVER_ADDRESS: usize = 128;

/// The end of an epoch: what the receiver should now hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochEnd {
    /// Pages sent in the epoch.
    pub pages: u64,
    /// Memory hash after the epoch, when the sender computed one (tests and
    /// `--verify`).
    pub memory_hash: Option<u64>,
}

/// A protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Opens a connection.
    Hello(Hello),
    /// Accepts it.
    Welcome,
    /// Refuses it.
    Refuse(String),
    /// Starts an epoch, with the connection's fencing generation (the one
    /// its `Hello` carried): a receiver refuses an epoch of another.
    EpochBegin(u64),
    /// A codec frame of the epoch's pages.
    Pages(Vec<u8>),
    /// The encoded VM state at the epoch's checkpoint.
    State(Vec<u8>),
    /// Ends an epoch.
    EpochEnd(EpochEnd),
    /// The epoch was received, verified and applied.
    Ack,
    /// Liveness, with the sender's clock in nanoseconds.
    Heartbeat(u64),
    /// Closing, with a reason.
    Goodbye(String),
    /// Asks the receiver to answer `Synced` with this token once it has
    /// processed everything sent before (a migration measures its rounds
    /// end to end with it).
    Sync(u64),
    /// Everything before the `Sync` with this token was processed.
    Synced(u64),
    /// A network frame the guest received during the envelope's epoch.
    Input(Vec<u8>),
    /// A network frame the guest sent during the epoch (after its State):
    /// a takeover sends it again, in case the primary died before
    /// releasing it.
    Output(Vec<u8>),
    /// Post-copy, target to source: the guest needs this page now.
    PageRequest(u64),
    /// COLO, secondary to primary: a network frame the secondary's guest
    /// sent while running the epoch after the envelope's (the last one it
    /// loaded), for the primary's compare proxy; never sent out.
    SecondaryOutput(Vec<u8>),
    /// Hybrid migration, in epoch 0 before its State: pages that changed
    /// since they were sent; the target drops its stale copies, and they
    /// fault in again.
    Discard(Vec<u64>),
    /// A resumed post-copy, target to source: one bit per guest page (bit
    /// `p % 64` of little-endian word `p / 64`), set for the pages the
    /// target holds.
    PagesHeld(Vec<u8>),
    /// Post-copy with verification, in epoch 1 before its State: the xxh3
    /// of every guest page, in page order, as the source holds them.
    PageHashes(Vec<u64>),
    /// The guest is the receiver's now (it resumes it): a pre-copy
    /// migration's commit after `Ack` of epoch 0, or a planned switchover
    /// after `Ack` of the last epoch (the sender's guest paused at it).
    Handover(Handover),
    /// The target took the guest over (answers `Handover`).
    TookOver,
    /// Answers a `Hello` that names a base image, right after `Welcome`:
    /// the tag if the receiver holds that image unchanged (only pages
    /// changed since are sent), 0 if not (a full copy).
    BaseImage(u64),
}

/// Declares [`MessageKind`] from one table: each kind's wire value, and its
/// name (the variant's).
macro_rules! message_kinds {
    ($($kind:ident = $value:literal,)*) => {
        /// The kind byte of a message header.
        #[repr(u8)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum MessageKind {
            $(
                #[doc = concat!("`", stringify!($kind), "`")]
                $kind = $value,
            )*
        }

        impl MessageKind {
            /// The kind with wire value `byte`, if there is one.
            pub fn from_byte(byte: u8) -> Option<Self> {
                match byte {
                    $($value => Some(Self::$kind),)*
                    _ => None,
                }
            }

            /// The kind's name, for errors and logs.
            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$kind => stringify!($kind),)*
                }
            }

            /// The longest payload a message of this kind may have: a
            /// reader refuses a longer one from its header alone.
            pub fn max_payload(self) -> usize {
                match self {
                    Self::Hello => std::mem::size_of::<HelloPayload>(),
                    Self::Welcome | Self::Ack | Self::TookOver => 0,
                    Self::Refuse | Self::Goodbye => MAX_TEXT,
                    Self::EpochBegin
                    | Self::Heartbeat
                    | Self::Sync
                    | Self::Synced
                    | Self::PageRequest
                    | Self::BaseImage => 8,
                    Self::Handover => 8 + MAX_HANDOVER_ADDRESS,
                    Self::EpochEnd => std::mem::size_of::<EpochEndPayload>(),
                    Self::Pages => MAX_PAYLOAD,
                    Self::State => MAX_STATE,
                    Self::Input | Self::Output | Self::SecondaryOutput => MAX_INPUT_FRAME,
                    Self::Discard => MAX_DISCARD_PAGES * 8,
                    Self::PagesHeld => MAX_HELD_BITMAP,
                    Self::PageHashes => MAX_PAYLOAD,
                }
            }
        }
    };
}

message_kinds! {
    Hello = 1,
    Welcome = 2,
    Refuse = 3,
    EpochBegin = 4,
    Pages = 5,
    State = 6,
    EpochEnd = 7,
    Ack = 8,
    Heartbeat = 9,
    Goodbye = 10,
    Sync = 11,
    Synced = 12,
    Input = 13,
    Output = 14,
    SecondaryOutput = 15,
    PageRequest = 16,
    Discard = 17,
    PagesHeld = 18,
    PageHashes = 19,
    Handover = 20,
    TookOver = 21,
    BaseImage = 22,
}

/// `Hello`'s payload, little-endian.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
struct HelloPayload {
    version: U32,
    /// 0: replicate, 1: migrate.
    purpose: U32,
    memory_bytes: U64,
    vcpus: U32,
    store_pages: U32,
    guest_image_hash: U64,
    vm_id: U64,
    owner: U64,
    generation: U64,
    heartbeat_interval_micros: U32,
    heartbeat_timeout_micros: U32,
    checkpoint_interval_micros: U64,
    base_image: U64,
}

/// `EpochEnd`'s payload, little-endian.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
struct EpochEndPayload {
    pages: U64,
    /// 1 when `memory_hash` is set, else 0.
    has_memory_hash: u8,
    memory_hash: U64,
}

impl Purpose {
    fn to_wire(self) -> u32 {
        match self {
            Purpose::Replicate => 0,
            Purpose::Migrate => 1,
            Purpose::Colo => 2,
            Purpose::MigratePostcopy => 3,
            Purpose::PostcopyResume => 4,
        }
    }

    fn from_wire(value: u32) -> Option<Self> {
        match value {
            0 => Some(Purpose::Replicate),
            1 => Some(Purpose::Migrate),
            2 => Some(Purpose::Colo),
            3 => Some(Purpose::MigratePostcopy),
            4 => Some(Purpose::PostcopyResume),
            _ => None,
        }
    }
}

impl Message {
    /// The message's kind.
    pub fn kind(&self) -> MessageKind {
        match self {
            Self::Hello(_) => MessageKind::Hello,
            Self::Welcome => MessageKind::Welcome,
            Self::Refuse(_) => MessageKind::Refuse,
            Self::EpochBegin(_) => MessageKind::EpochBegin,
            Self::Pages(_) => MessageKind::Pages,
            Self::State(_) => MessageKind::State,
            Self::EpochEnd(_) => MessageKind::EpochEnd,
            Self::Ack => MessageKind::Ack,
            Self::Heartbeat(_) => MessageKind::Heartbeat,
            Self::Goodbye(_) => MessageKind::Goodbye,
            Self::Sync(_) => MessageKind::Sync,
            Self::Synced(_) => MessageKind::Synced,
            Self::Input(_) => MessageKind::Input,
            Self::Output(_) => MessageKind::Output,
            Self::SecondaryOutput(_) => MessageKind::SecondaryOutput,
            Self::PageRequest(_) => MessageKind::PageRequest,
            Self::Discard(_) => MessageKind::Discard,
            Self::PagesHeld(_) => MessageKind::PagesHeld,
            Self::PageHashes(_) => MessageKind::PageHashes,
            Self::Handover(_) => MessageKind::Handover,
            Self::TookOver => MessageKind::TookOver,
            Self::BaseImage(_) => MessageKind::BaseImage,
        }
    }

    /// The message's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// The payload bytes; borrowed for the large messages (pages and state)
    /// so that sending them copies nothing.
    pub fn payload(&self) -> std::borrow::Cow<'_, [u8]> {
        use std::borrow::Cow;
        Cow::Owned(match self {
            Self::Hello(hello) => HelloPayload {
                version: hello.version.into(),
                purpose: hello.purpose.to_wire().into(),
                memory_bytes: hello.memory_bytes.into(),
                vcpus: hello.vcpus.into(),
                store_pages: hello.store_pages.into(),
                guest_image_hash: hello.guest_image_hash.into(),
                vm_id: hello.vm_id.into(),
                owner: hello.owner.into(),
                generation: hello.generation.into(),
                heartbeat_interval_micros: micros(hello.heartbeat_interval).into(),
                heartbeat_timeout_micros: micros(hello.heartbeat_timeout).into(),
                checkpoint_interval_micros: u64::try_from(hello.checkpoint_interval.as_micros())
                    .unwrap_or(u64::MAX)
                    .into(),
                base_image: hello.base_image.into(),
            }
            .as_bytes()
            .to_vec(),
            Self::Welcome | Self::Ack | Self::TookOver => Vec::new(),
            Self::Refuse(text) | Self::Goodbye(text) => truncated_text(text).as_bytes().to_vec(),
            Self::Pages(bytes)
            | Self::State(bytes)
            | Self::Input(bytes)
            | Self::Output(bytes)
            | Self::SecondaryOutput(bytes)
            | Self::PagesHeld(bytes) => {
                return Cow::Borrowed(bytes);
            }
            Self::Discard(words) | Self::PageHashes(words) => {
                words.iter().flat_map(|word| word.to_le_bytes()).collect()
            }
            Self::EpochEnd(end) => EpochEndPayload {
                pages: end.pages.into(),
                has_memory_hash: u8::from(end.memory_hash.is_some()),
                memory_hash: end.memory_hash.unwrap_or(0).into(),
            }
            .as_bytes()
            .to_vec(),
            Self::Heartbeat(clock)
            | Self::Sync(clock)
            | Self::Synced(clock)
            | Self::EpochBegin(clock)
            | Self::PageRequest(clock)
            | Self::BaseImage(clock) => U64::new(*clock).as_bytes().to_vec(),
            Self::Handover(handover) => {
                let mut bytes = handover.kept_image.to_le_bytes().to_vec();
                bytes.extend_from_slice(handover.protect_to.as_bytes());
                bytes
            }
        })
    }

    pub(crate) fn parse(kind: MessageKind, payload: Vec<u8>) -> Result<Self, ProtocolError> {
        let malformed = |why| ProtocolError::Malformed {
            kind: kind.name(),
            why,
        };
        let empty = |message: Self| {
            if payload.is_empty() {
                Ok(message)
            } else {
                Err(malformed("wrong payload length"))
            }
        };
        let clock = || {
            U64::read_from_bytes(&payload)
                .map(U64::get)
                .map_err(|_| malformed("wrong payload length"))
        };
        let text = |payload: Vec<u8>| {
            if payload.len() > MAX_TEXT {
                return Err(malformed("text too long"));
            }
            String::from_utf8(payload).map_err(|_| malformed("text is not UTF-8"))
        };
        let words = |payload: Vec<u8>| {
            if payload.is_empty() || !payload.len().is_multiple_of(8) {
                return Err(malformed("a list of one or more 64-bit numbers"));
            }
            Ok(payload
                .chunks_exact(8)
                .map(|word| u64::from_le_bytes(word.try_into().expect("8 bytes")))
                .collect::<Vec<u64>>())
        };
        let frame = |payload: Vec<u8>| {
            if payload.is_empty() || payload.len() > MAX_INPUT_FRAME {
                return Err(malformed("a network frame must hold 1 to 9216 bytes"));
            }
            Ok(payload)
        };
        Ok(match kind {
            MessageKind::Hello => {
                let hello = HelloPayload::read_from_bytes(&payload)
                    .map_err(|_| malformed("wrong payload length"))?;
                Self::Hello(Hello {
                    version: hello.version.get(),
                    purpose: Purpose::from_wire(hello.purpose.get())
                        .ok_or_else(|| malformed("unknown purpose"))?,
                    memory_bytes: hello.memory_bytes.get(),
                    vcpus: hello.vcpus.get(),
                    guest_image_hash: hello.guest_image_hash.get(),
                    vm_id: hello.vm_id.get(),
                    owner: hello.owner.get(),
                    generation: hello.generation.get(),
                    store_pages: hello.store_pages.get(),
                    heartbeat_interval: std::time::Duration::from_micros(u64::from(
                        hello.heartbeat_interval_micros.get(),
                    )),
                    heartbeat_timeout: std::time::Duration::from_micros(u64::from(
                        hello.heartbeat_timeout_micros.get(),
                    )),
                    checkpoint_interval: std::time::Duration::from_micros(
                        hello.checkpoint_interval_micros.get(),
                    ),
                    base_image: hello.base_image.get(),
                })
            }
            MessageKind::Welcome => empty(Self::Welcome)?,
            MessageKind::Refuse => Self::Refuse(text(payload)?),
            MessageKind::EpochBegin => Self::EpochBegin(clock()?),
            MessageKind::Pages => Self::Pages(payload),
            MessageKind::State => Self::State(payload),
            MessageKind::EpochEnd => {
                let end = EpochEndPayload::read_from_bytes(&payload)
                    .map_err(|_| malformed("wrong payload length"))?;
                let memory_hash = match end.has_memory_hash {
                    0 => None,
                    1 => Some(end.memory_hash.get()),
                    _ => return Err(malformed("bad memory-hash flag")),
                };
                Self::EpochEnd(EpochEnd {
                    pages: end.pages.get(),
                    memory_hash,
                })
            }
            MessageKind::Ack => empty(Self::Ack)?,
            MessageKind::Heartbeat => Self::Heartbeat(clock()?),
            MessageKind::Goodbye => Self::Goodbye(text(payload)?),
            MessageKind::Sync => Self::Sync(clock()?),
            MessageKind::Synced => Self::Synced(clock()?),
            MessageKind::Input => Self::Input(frame(payload)?),
            MessageKind::Output => Self::Output(frame(payload)?),
            MessageKind::SecondaryOutput => Self::SecondaryOutput(frame(payload)?),
            MessageKind::PageRequest => Self::PageRequest(clock()?),
            MessageKind::Discard => Self::Discard(words(payload)?),
            MessageKind::PagesHeld => {
                if payload.is_empty() || !payload.len().is_multiple_of(8) {
                    return Err(malformed("a bitmap is whole 64-bit words"));
                }
                Self::PagesHeld(payload)
            }
            MessageKind::PageHashes => Self::PageHashes(words(payload)?),
            MessageKind::Handover => {
                if payload.len() < 8 || payload.len() > 8 + MAX_HANDOVER_ADDRESS {
                    return Err(malformed("a tag and an address of at most 128 bytes"));
                }
                let (tag, address) = payload.split_at(8);
                Self::Handover(Handover {
                    kept_image: u64::from_le_bytes(tag.try_into().expect("8 bytes")),
                    protect_to: String::from_utf8(address.to_vec())
                        .map_err(|_| malformed("the address is not UTF-8"))?,
                })
            }
            MessageKind::TookOver => empty(Self::TookOver)?,
            MessageKind::BaseImage => Self::BaseImage(clock()?),
        })
    }
}

/// `duration` in microseconds, saturating at `u32::MAX` (71 minutes).
fn micros(duration: std::time::Duration) -> u32 {
    u32::try_from(duration.as_micros()).unwrap_or(u32::MAX)
}

/// `text` cut to at most [`MAX_TEXT`] bytes, at a character boundary.
fn truncated_text(text: &str) -> &str {
    let mut end = text.len().min(MAX_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
