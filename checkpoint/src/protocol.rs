//! The replication protocol between a primary and a secondary (and between
//! a migration source and its target).
//!
//! # Message sequence
//!
//! ```text
//! primary                                   secondary
//!   Hello {version, purpose, guest identity} ->
//!                                           <- Welcome | Refuse {reason}
//!   epoch 0: the initial copy (pre-copy rounds, while the guest runs)
//!   EpochBegin                 (epoch 0)    ->
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

use std::io::{Read, Write};

use xxhash_rust::xxh3::xxh3_64;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Protocol version of this build.
pub const PROTOCOL_VERSION: u32 = 2;
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
const MAX_TEXT: usize = 4096;

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
}

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
    /// Starts an epoch.
    EpochBegin,
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
}

/// The 48-byte message header (see the module docs), little-endian.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct Header {
    /// [`MAGIC`].
    pub magic: [u8; 4],
    /// A [`MessageKind`].
    pub kind: u8,
    /// Zero.
    pub reserved: [u8; 3],
    /// Per direction: 0, 1, 2, ...
    pub sequence: U64,
    /// The epoch the message belongs to.
    pub epoch: U64,
    /// Bytes of payload after the header.
    pub payload_len: U32,
    /// Zero.
    pub reserved2: U32,
    /// xxh3 of the payload.
    pub payload_checksum: U64,
    /// xxh3 of the header's bytes before this field.
    pub header_checksum: U64,
}

const _: () = assert!(std::mem::size_of::<Header>() == HEADER_LEN);

impl Header {
    /// The bytes the header checksum covers.
    fn checksummed(&self) -> &[u8] {
        &self.as_bytes()[..HEADER_LEN - 8]
    }
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
    reserved: U32,
    guest_image_hash: U64,
    vm_id: U64,
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
        }
    }

    fn from_wire(value: u32) -> Option<Self> {
        match value {
            0 => Some(Purpose::Replicate),
            1 => Some(Purpose::Migrate),
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
            Self::EpochBegin => MessageKind::EpochBegin,
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
                reserved: 0.into(),
                guest_image_hash: hello.guest_image_hash.into(),
                vm_id: hello.vm_id.into(),
            }
            .as_bytes()
            .to_vec(),
            Self::Welcome | Self::EpochBegin | Self::Ack => Vec::new(),
            Self::Refuse(text) | Self::Goodbye(text) => truncated_text(text).as_bytes().to_vec(),
            Self::Pages(bytes) | Self::State(bytes) | Self::Input(bytes) | Self::Output(bytes) => {
                return Cow::Borrowed(bytes);
            }
            Self::EpochEnd(end) => EpochEndPayload {
                pages: end.pages.into(),
                has_memory_hash: u8::from(end.memory_hash.is_some()),
                memory_hash: end.memory_hash.unwrap_or(0).into(),
            }
            .as_bytes()
            .to_vec(),
            Self::Heartbeat(clock) | Self::Sync(clock) | Self::Synced(clock) => {
                U64::new(*clock).as_bytes().to_vec()
            }
        })
    }

    fn parse(kind: MessageKind, payload: Vec<u8>) -> Result<Self, ProtocolError> {
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
                })
            }
            MessageKind::Welcome => empty(Self::Welcome)?,
            MessageKind::Refuse => Self::Refuse(text(payload)?),
            MessageKind::EpochBegin => empty(Self::EpochBegin)?,
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
        })
    }
}

/// `text` cut to at most [`MAX_TEXT`] bytes, at a character boundary.
fn truncated_text(text: &str) -> &str {
    let mut end = text.len().min(MAX_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A received message with its header fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// Sender's sequence number.
    pub sequence: u64,
    /// Epoch.
    pub epoch: u64,
    /// The message.
    pub message: Message,
}

/// Writes messages, numbering them.
#[derive(Debug, Default)]
pub struct Sender {
    next_sequence: u64,
}

impl Sender {
    /// A sender at the start of a connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// The header of the next message: `message` for `epoch`, whose payload
    /// is `payload_len` bytes with xxh3 `payload_checksum`. Numbers it. A
    /// payload longer than [`MAX_PAYLOAD`] is refused before anything is sent.
    pub fn header(
        &mut self,
        epoch: u64,
        message: &Message,
        payload_len: usize,
        payload_checksum: u64,
    ) -> Result<Header, ProtocolError> {
        let too_large =
            || ProtocolError::PayloadTooLarge(u64::try_from(payload_len).unwrap_or(u64::MAX));
        if payload_len > MAX_PAYLOAD {
            return Err(too_large());
        }
        let mut header = Header {
            magic: MAGIC,
            kind: message.kind() as u8,
            reserved: [0; 3],
            sequence: self.next_sequence.into(),
            epoch: epoch.into(),
            payload_len: u32::try_from(payload_len).map_err(|_| too_large())?.into(),
            reserved2: 0.into(),
            payload_checksum: payload_checksum.into(),
            header_checksum: 0.into(),
        };
        header.header_checksum = xxh3_64(header.checksummed()).into();
        self.next_sequence += 1;
        Ok(header)
    }

    /// Encodes `message` for `epoch` as the next message (header and
    /// payload in one buffer).
    pub fn encode(&mut self, epoch: u64, message: &Message) -> Result<Vec<u8>, ProtocolError> {
        let payload = message.payload();
        let header = self.header(epoch, message, payload.len(), xxh3_64(&payload))?;
        let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&payload);
        Ok(bytes)
    }

    /// Writes `message` for `epoch` to `writer`.
    pub fn send(
        &mut self,
        writer: &mut impl Write,
        epoch: u64,
        message: &Message,
    ) -> Result<(), ProtocolError> {
        writer.write_all(&self.encode(epoch, message)?)?;
        Ok(())
    }
}

/// Reads one message (no sequence or state checks: see [`Receiver`]).
pub fn read_message(reader: &mut impl Read) -> Result<Envelope, ProtocolError> {
    let mut header = Header::new_zeroed();
    reader.read_exact(header.as_mut_bytes())?;
    if header.magic != MAGIC {
        return Err(ProtocolError::BadMagic);
    }
    if xxh3_64(header.checksummed()) != header.header_checksum.get() {
        return Err(ProtocolError::HeaderChecksum);
    }
    let kind =
        MessageKind::from_byte(header.kind).ok_or(ProtocolError::UnknownKind(header.kind))?;
    let length = header.payload_len.get();
    let length = usize::try_from(length)
        .ok()
        .filter(|length| *length <= MAX_PAYLOAD)
        .ok_or(ProtocolError::PayloadTooLarge(u64::from(length)))?;
    let mut payload = vec![0u8; length];
    reader.read_exact(&mut payload)?;
    if xxh3_64(&payload) != header.payload_checksum.get() {
        return Err(ProtocolError::PayloadChecksum { kind: kind.name() });
    }
    Ok(Envelope {
        sequence: header.sequence.get(),
        epoch: header.epoch.get(),
        message: Message::parse(kind, payload)?,
    })
}

/// Where the receiver is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReceiverState {
    /// Waiting for `Hello`.
    AwaitingHello,
    /// Between epochs; `committed` is the last committed epoch.
    BetweenEpochs {
        /// The last committed epoch, if any.
        committed: Option<u64>,
    },
    /// Inside an epoch.
    InEpoch {
        /// The epoch.
        epoch: u64,
        /// Whether its state arrived.
        state_received: bool,
        /// Page frames received.
        frames: u64,
    },
    /// After `Goodbye`.
    Closed,
}

impl std::fmt::Display for ReceiverState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::AwaitingHello => write!(f, "waiting for Hello"),
            Self::BetweenEpochs { committed: None } => write!(f, "waiting for epoch 0"),
            Self::BetweenEpochs {
                committed: Some(epoch),
            } => write!(f, "between epochs (epoch {epoch} committed)"),
            Self::InEpoch { epoch, .. } => write!(f, "in epoch {epoch}"),
            Self::Closed => write!(f, "closed"),
        }
    }
}

/// What the receiver's owner must do with a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Check the peer against this side, then reply Welcome or Refuse.
    Greet(Hello),
    /// Start staging a new epoch.
    BeginEpoch(u64),
    /// Decode and stage this page frame.
    StagePages(Vec<u8>),
    /// Stage this VM state.
    StageState(Vec<u8>),
    /// Stage this frame the guest sent during the epoch.
    StageOutput(Vec<u8>),
    /// Everything of the epoch arrived: verify and apply it atomically, then
    /// acknowledge.
    Commit {
        /// The epoch.
        epoch: u64,
        /// What the sender says it sent.
        end: EpochEnd,
    },
    /// The peer is alive.
    Heartbeat(u64),
    /// Answer `Synced` with this token: everything before was processed.
    Sync(u64),
    /// Keep this frame the guest received during `epoch`, for a takeover.
    LogInput {
        /// The epoch the guest was running.
        epoch: u64,
        /// The frame.
        frame: Vec<u8>,
    },
    /// The peer is leaving.
    Close(String),
}

impl Action {
    /// The action's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Greet(_) => "Hello",
            Action::BeginEpoch(_) => "EpochBegin",
            Action::StagePages(_) => "Pages",
            Action::StageState(_) => "State",
            Action::StageOutput(_) => "Output",
            Action::Commit { .. } => "EpochEnd",
            Action::Heartbeat(_) => "Heartbeat",
            Action::Sync(_) => "Sync",
            Action::LogInput { .. } => "Input",
            Action::Close(_) => "Goodbye",
        }
    }
}

/// The secondary's side of a connection: sequence and state checks.
#[derive(Debug)]
pub struct Receiver {
    state: ReceiverState,
    next_sequence: u64,
}

impl Default for Receiver {
    fn default() -> Self {
        Self::new()
    }
}

impl Receiver {
    /// A receiver at the start of a connection.
    pub fn new() -> Self {
        Self {
            state: ReceiverState::AwaitingHello,
            next_sequence: 0,
        }
    }

    /// Where the receiver is.
    pub fn state(&self) -> ReceiverState {
        self.state
    }

    /// The last committed epoch.
    pub fn committed(&self) -> Option<u64> {
        match self.state {
            ReceiverState::BetweenEpochs { committed } => committed,
            ReceiverState::InEpoch { epoch, .. } => epoch.checked_sub(1),
            _ => None,
        }
    }

    /// Checks `envelope` against the sequence and the state, moves the state
    /// on, and says what to do. A refused message changes nothing.
    pub fn accept(&mut self, envelope: Envelope) -> Result<Action, ProtocolError> {
        if envelope.sequence != self.next_sequence {
            return Err(ProtocolError::OutOfSequence {
                expected: self.next_sequence,
                actual: envelope.sequence,
            });
        }
        let epoch = envelope.epoch;
        let unexpected = |state: ReceiverState, message: &Message| ProtocolError::Unexpected {
            kind: message.name(),
            epoch,
            state: state.to_string(),
        };
        let (next, action) = match (self.state, envelope.message) {
            (_, Message::Heartbeat(clock)) if self.state != ReceiverState::Closed => {
                (self.state, Action::Heartbeat(clock))
            }
            (
                ReceiverState::BetweenEpochs { .. } | ReceiverState::InEpoch { .. },
                Message::Sync(token),
            ) => (self.state, Action::Sync(token)),
            (
                ReceiverState::BetweenEpochs { .. } | ReceiverState::InEpoch { .. },
                Message::Input(frame),
            ) => (self.state, Action::LogInput { epoch, frame }),
            (state, Message::Goodbye(reason)) if state != ReceiverState::Closed => {
                (ReceiverState::Closed, Action::Close(reason))
            }
            (ReceiverState::AwaitingHello, Message::Hello(hello)) => (
                ReceiverState::BetweenEpochs { committed: None },
                Action::Greet(hello),
            ),
            (ReceiverState::BetweenEpochs { committed }, Message::EpochBegin)
                if epoch == committed.map_or(0, |c| c + 1) =>
            {
                (
                    ReceiverState::InEpoch {
                        epoch,
                        state_received: false,
                        frames: 0,
                    },
                    Action::BeginEpoch(epoch),
                )
            }
            (
                ReceiverState::InEpoch {
                    epoch: current,
                    state_received,
                    frames,
                },
                Message::Pages(frame),
            ) if epoch == current => (
                ReceiverState::InEpoch {
                    epoch,
                    state_received,
                    frames: frames + 1,
                },
                Action::StagePages(frame),
            ),
            (
                ReceiverState::InEpoch {
                    epoch: current,
                    state_received: false,
                    frames,
                },
                Message::State(state),
            ) if epoch == current => (
                ReceiverState::InEpoch {
                    epoch,
                    state_received: true,
                    frames,
                },
                Action::StageState(state),
            ),
            (
                ReceiverState::InEpoch {
                    epoch: current,
                    state_received: true,
                    frames,
                },
                Message::Output(frame),
            ) if epoch == current => (
                ReceiverState::InEpoch {
                    epoch,
                    state_received: true,
                    frames,
                },
                Action::StageOutput(frame),
            ),
            (
                ReceiverState::InEpoch {
                    epoch: current,
                    state_received: true,
                    ..
                },
                Message::EpochEnd(end),
            ) if epoch == current => (
                ReceiverState::BetweenEpochs {
                    committed: Some(epoch),
                },
                Action::Commit { epoch, end },
            ),
            (state, message) => return Err(unexpected(state, &message)),
        };
        self.state = next;
        self.next_sequence += 1;
        Ok(action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            purpose: Purpose::Replicate,
            memory_bytes: 256 << 20,
            vcpus: 2,
            guest_image_hash: 7,
            vm_id: 9,
        }
    }

    fn end() -> EpochEnd {
        EpochEnd {
            pages: 3,
            memory_hash: Some(11),
        }
    }

    /// Encodes messages as a sender would, and reads them back.
    fn wire(messages: &[(u64, Message)]) -> Vec<Envelope> {
        let mut sender = Sender::new();
        let mut bytes = Vec::new();
        for (epoch, message) in messages {
            sender
                .send(&mut bytes, *epoch, message)
                .expect("write to a Vec");
        }
        let mut reader = bytes.as_slice();
        messages
            .iter()
            .map(|_| read_message(&mut reader).expect("valid message"))
            .collect()
    }

    fn one_epoch(epoch: u64) -> Vec<(u64, Message)> {
        vec![
            (epoch, Message::EpochBegin),
            (epoch, Message::Pages(vec![1, 2, 3])),
            (epoch, Message::State(vec![4, 5])),
            (epoch, Message::EpochEnd(end())),
        ]
    }

    #[test]
    fn every_message_round_trips() {
        let messages = vec![
            (0, Message::Hello(hello())),
            (0, Message::Welcome),
            (0, Message::Refuse("memory size differs".to_owned())),
            (0, Message::EpochBegin),
            (0, Message::Pages(vec![9; 100])),
            (0, Message::State(vec![8; 10])),
            (0, Message::EpochEnd(end())),
            (
                0,
                Message::EpochEnd(EpochEnd {
                    pages: 0,
                    memory_hash: None,
                }),
            ),
            (0, Message::Ack),
            (0, Message::Heartbeat(123)),
            (0, Message::Goodbye("bye".to_owned())),
            (0, Message::Sync(7)),
            (0, Message::Synced(7)),
            (3, Message::Input(vec![0xff; 60])),
            (3, Message::Output(vec![0xee; 60])),
        ];

        let received: Vec<Message> = wire(&messages).into_iter().map(|e| e.message).collect();

        assert_eq!(
            received,
            messages.into_iter().map(|(_, m)| m).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_whole_session_is_accepted_and_commits_each_epoch() {
        let mut messages = vec![(0, Message::Hello(hello()))];
        messages.extend(one_epoch(0));
        messages.push((0, Message::Heartbeat(5)));
        messages.extend(one_epoch(1));
        let mut receiver = Receiver::new();

        let commits: Vec<u64> = wire(&messages)
            .into_iter()
            .map(|envelope| receiver.accept(envelope).expect("in order"))
            .filter_map(|action| match action {
                Action::Commit { epoch, .. } => Some(epoch),
                _ => None,
            })
            .collect();

        assert_eq!(commits, vec![0, 1]);
        assert_eq!(receiver.committed(), Some(1));
    }

    #[test]
    fn replayed_message_is_refused() {
        let mut messages = vec![(0, Message::Hello(hello()))];
        messages.extend(one_epoch(0));
        let envelopes = wire(&messages);
        let mut receiver = Receiver::new();
        receiver.accept(envelopes[0].clone()).expect("hello");
        receiver.accept(envelopes[1].clone()).expect("begin");

        let replay = receiver.accept(envelopes[1].clone());

        assert!(matches!(
            replay,
            Err(ProtocolError::OutOfSequence {
                expected: 2,
                actual: 1
            })
        ));
    }

    #[test]
    fn epoch_end_without_state_is_refused() {
        let messages = vec![
            (0, Message::Hello(hello())),
            (0, Message::EpochBegin),
            (0, Message::Pages(vec![1])),
            (0, Message::EpochEnd(end())),
        ];
        let mut receiver = Receiver::new();
        let envelopes = wire(&messages);
        for envelope in &envelopes[..3] {
            receiver.accept(envelope.clone()).expect("in order");
        }

        let result = receiver.accept(envelopes[3].clone());

        assert!(matches!(
            result,
            Err(ProtocolError::Unexpected {
                kind: "EpochEnd",
                ..
            })
        ));
        assert_eq!(receiver.committed(), None);
    }

    #[test]
    fn skipped_epoch_is_refused() {
        let mut messages = vec![(0, Message::Hello(hello()))];
        messages.extend(one_epoch(0));
        messages.push((2, Message::EpochBegin));
        let mut receiver = Receiver::new();
        let envelopes = wire(&messages);
        for envelope in &envelopes[..5] {
            receiver.accept(envelope.clone()).expect("in order");
        }

        let result = receiver.accept(envelopes[5].clone());

        assert!(matches!(
            result,
            Err(ProtocolError::Unexpected { epoch: 2, .. })
        ));
    }

    #[test]
    fn pages_from_another_epoch_are_refused() {
        let messages = vec![
            (0, Message::Hello(hello())),
            (0, Message::EpochBegin),
            (1, Message::Pages(vec![1])),
        ];
        let mut receiver = Receiver::new();
        let envelopes = wire(&messages);
        receiver.accept(envelopes[0].clone()).expect("hello");
        receiver.accept(envelopes[1].clone()).expect("begin");

        let result = receiver.accept(envelopes[2].clone());

        assert!(matches!(
            result,
            Err(ProtocolError::Unexpected { kind: "Pages", .. })
        ));
    }

    #[test]
    fn sync_is_answered_inside_an_epoch() {
        let messages = vec![
            (0, Message::Hello(hello())),
            (0, Message::EpochBegin),
            (0, Message::Sync(42)),
        ];
        let mut receiver = Receiver::new();
        let envelopes = wire(&messages);
        receiver.accept(envelopes[0].clone()).expect("hello");
        receiver.accept(envelopes[1].clone()).expect("begin");

        let action = receiver.accept(envelopes[2].clone()).expect("sync");

        assert_eq!(action, Action::Sync(42));
        assert!(matches!(
            receiver.state(),
            ReceiverState::InEpoch { epoch: 0, .. }
        ));
    }

    #[test]
    fn input_frames_are_logged_with_their_epoch_inside_an_epoch() {
        let messages = vec![
            (0, Message::Hello(hello())),
            (0, Message::EpochBegin),
            (1, Message::Input(vec![7; 60])),
        ];
        let mut receiver = Receiver::new();
        let envelopes = wire(&messages);
        receiver.accept(envelopes[0].clone()).expect("hello");
        receiver.accept(envelopes[1].clone()).expect("begin");

        let action = receiver.accept(envelopes[2].clone()).expect("input");

        assert_eq!(
            action,
            Action::LogInput {
                epoch: 1,
                frame: vec![7; 60]
            }
        );
    }

    #[test]
    fn output_before_the_state_is_refused() {
        let messages = vec![
            (0, Message::Hello(hello())),
            (0, Message::EpochBegin),
            (0, Message::Output(vec![1; 60])),
        ];
        let mut receiver = Receiver::new();
        let envelopes = wire(&messages);
        receiver.accept(envelopes[0].clone()).expect("hello");
        receiver.accept(envelopes[1].clone()).expect("begin");

        let result = receiver.accept(envelopes[2].clone());

        assert!(matches!(result, Err(ProtocolError::Unexpected { .. })));
    }

    #[test]
    fn output_after_the_state_is_staged() {
        let messages = vec![
            (0, Message::Hello(hello())),
            (0, Message::EpochBegin),
            (0, Message::State(vec![1])),
            (0, Message::Output(vec![2; 60])),
        ];
        let mut receiver = Receiver::new();
        let envelopes = wire(&messages);
        for envelope in &envelopes[..3] {
            receiver.accept(envelope.clone()).expect("in order");
        }

        let action = receiver.accept(envelopes[3].clone()).expect("output");

        assert_eq!(action, Action::StageOutput(vec![2; 60]));
    }

    #[test]
    fn an_empty_input_frame_is_malformed() {
        let mut sender = Sender::new();
        let mut bytes = Vec::new();
        sender
            .send(&mut bytes, 0, &Message::Input(Vec::new()))
            .expect("write to a Vec");

        let result = read_message(&mut bytes.as_slice());

        assert!(matches!(result, Err(ProtocolError::Malformed { .. })));
    }

    #[test]
    fn anything_before_hello_is_refused() {
        let envelopes = wire(&[(0, Message::EpochBegin)]);

        let result = Receiver::new().accept(envelopes[0].clone());

        assert!(matches!(result, Err(ProtocolError::Unexpected { .. })));
    }

    #[test]
    fn corrupted_payload_is_refused() {
        let mut bytes = Sender::new()
            .encode(0, &Message::Pages(vec![7; 64]))
            .expect("encodes");
        bytes[HEADER_LEN + 10] ^= 1;

        let result = read_message(&mut bytes.as_slice());

        assert!(matches!(
            result,
            Err(ProtocolError::PayloadChecksum { kind: "Pages" })
        ));
    }

    #[test]
    fn corrupted_header_is_refused() {
        let mut bytes = Sender::new().encode(3, &Message::Ack).expect("encodes");
        bytes[16] ^= 1; // The epoch.

        let result = read_message(&mut bytes.as_slice());

        assert!(matches!(result, Err(ProtocolError::HeaderChecksum)));
    }

    #[test]
    fn truncated_message_is_an_io_error() {
        let bytes = Sender::new()
            .encode(0, &Message::Pages(vec![7; 64]))
            .expect("encodes");

        let result = read_message(&mut &bytes[..bytes.len() - 1]);

        assert!(matches!(result, Err(ProtocolError::Io(_))));
    }

    #[test]
    fn an_oversized_payload_is_refused_before_sending() {
        let mut sender = Sender::new();

        let result = sender.header(0, &Message::Ack, MAX_PAYLOAD + 1, 0);

        assert!(matches!(result, Err(ProtocolError::PayloadTooLarge(_))));
    }

    #[test]
    fn an_unknown_kind_is_refused() {
        let mut bytes = Sender::new().encode(0, &Message::Ack).expect("encodes");
        bytes[4] = 200;
        let checksum = xxh3_64(&bytes[..40]);
        bytes[40..48].copy_from_slice(&checksum.to_le_bytes());

        let result = read_message(&mut bytes.as_slice());

        assert!(matches!(result, Err(ProtocolError::UnknownKind(200))));
    }

    #[test]
    fn every_kind_byte_names_its_kind() {
        let kind = MessageKind::from_byte(MessageKind::EpochEnd as u8);

        assert_eq!(kind, Some(MessageKind::EpochEnd));
        assert_eq!(MessageKind::EpochEnd.name(), "EpochEnd");
        assert_eq!(MessageKind::from_byte(0), None);
    }

    #[test]
    fn a_long_reason_is_cut_at_a_character_boundary() {
        let reason = "é".repeat(MAX_TEXT);

        let payload = Message::Goodbye(reason).payload().into_owned();

        assert!(payload.len() <= MAX_TEXT);
        assert!(String::from_utf8(payload).is_ok());
    }

    #[test]
    fn oversized_payload_is_refused_before_reading_it() {
        let mut bytes = Sender::new().encode(0, &Message::Ack).expect("encodes");
        bytes[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        let checksum = xxh3_64(&bytes[..40]);
        bytes[40..48].copy_from_slice(&checksum.to_le_bytes());

        let result = read_message(&mut bytes.as_slice());

        assert!(matches!(result, Err(ProtocolError::PayloadTooLarge(_))));
    }

    #[test]
    fn not_our_protocol_is_refused() {
        let result =
            read_message(&mut &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n_____________________"[..]);

        assert!(matches!(result, Err(ProtocolError::BadMagic)));
    }
}
