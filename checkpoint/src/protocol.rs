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

impl Message {
    fn kind(&self) -> u8 {
        match self {
            Self::Hello(_) => 1,
            Self::Welcome => 2,
            Self::Refuse(_) => 3,
            Self::EpochBegin => 4,
            Self::Pages(_) => 5,
            Self::State(_) => 6,
            Self::EpochEnd(_) => 7,
            Self::Ack => 8,
            Self::Heartbeat(_) => 9,
            Self::Goodbye(_) => 10,
            Self::Sync(_) => 11,
            Self::Synced(_) => 12,
            Self::Input(_) => 13,
            Self::Output(_) => 14,
        }
    }

    /// The message's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        kind_name(self.kind())
    }

    /// The payload bytes; borrowed for the large messages (pages and state)
    /// so that sending them copies nothing.
    pub fn payload(&self) -> std::borrow::Cow<'_, [u8]> {
        use std::borrow::Cow;
        Cow::Owned(match self {
            Self::Hello(hello) => {
                let mut bytes = Vec::with_capacity(32);
                bytes.extend_from_slice(&hello.version.to_le_bytes());
                bytes.extend_from_slice(&(hello.purpose as u32).to_le_bytes());
                bytes.extend_from_slice(&hello.memory_bytes.to_le_bytes());
                bytes.extend_from_slice(&hello.vcpus.to_le_bytes());
                bytes.extend_from_slice(&0u32.to_le_bytes());
                bytes.extend_from_slice(&hello.guest_image_hash.to_le_bytes());
                bytes.extend_from_slice(&hello.vm_id.to_le_bytes());
                bytes
            }
            Self::Welcome | Self::EpochBegin | Self::Ack => Vec::new(),
            Self::Refuse(text) | Self::Goodbye(text) => {
                text.as_bytes()[..text.len().min(MAX_TEXT)].to_vec()
            }
            Self::Pages(bytes) | Self::State(bytes) | Self::Input(bytes) | Self::Output(bytes) => {
                return Cow::Borrowed(bytes);
            }
            Self::EpochEnd(end) => {
                let mut bytes = Vec::with_capacity(17);
                bytes.extend_from_slice(&end.pages.to_le_bytes());
                bytes.push(u8::from(end.memory_hash.is_some()));
                bytes.extend_from_slice(&end.memory_hash.unwrap_or(0).to_le_bytes());
                bytes
            }
            Self::Heartbeat(clock) | Self::Sync(clock) | Self::Synced(clock) => {
                clock.to_le_bytes().to_vec()
            }
        })
    }

    fn parse(kind: u8, payload: Vec<u8>) -> Result<Self, ProtocolError> {
        let name = kind_name(kind);
        let malformed = |why| ProtocolError::Malformed { kind: name, why };
        let exact = |length: usize| {
            if payload.len() == length {
                Ok(())
            } else {
                Err(malformed("wrong payload length"))
            }
        };
        let u32_at =
            |at: usize| u32::from_le_bytes(payload[at..at + 4].try_into().expect("4 bytes"));
        let u64_at =
            |at: usize| u64::from_le_bytes(payload[at..at + 8].try_into().expect("8 bytes"));
        let text = |payload: Vec<u8>| {
            if payload.len() > MAX_TEXT {
                return Err(malformed("text too long"));
            }
            String::from_utf8(payload).map_err(|_| malformed("text is not UTF-8"))
        };
        Ok(match kind {
            1 => {
                exact(40)?;
                Self::Hello(Hello {
                    version: u32_at(0),
                    purpose: match u32_at(4) {
                        0 => Purpose::Replicate,
                        1 => Purpose::Migrate,
                        _ => return Err(malformed("unknown purpose")),
                    },
                    memory_bytes: u64_at(8),
                    vcpus: u32_at(16),
                    guest_image_hash: u64_at(24),
                    vm_id: u64_at(32),
                })
            }
            2 => {
                exact(0)?;
                Self::Welcome
            }
            3 => Self::Refuse(text(payload)?),
            4 => {
                exact(0)?;
                Self::EpochBegin
            }
            5 => Self::Pages(payload),
            6 => Self::State(payload),
            7 => {
                exact(17)?;
                let memory_hash = match payload[8] {
                    0 => None,
                    1 => Some(u64::from_le_bytes(
                        payload[9..17].try_into().expect("8 bytes"),
                    )),
                    _ => return Err(malformed("bad memory-hash flag")),
                };
                Self::EpochEnd(EpochEnd {
                    pages: u64_at(0),
                    memory_hash,
                })
            }
            8 => {
                exact(0)?;
                Self::Ack
            }
            9 => {
                exact(8)?;
                Self::Heartbeat(u64_at(0))
            }
            10 => Self::Goodbye(text(payload)?),
            11 => {
                exact(8)?;
                Self::Sync(u64_at(0))
            }
            12 => {
                exact(8)?;
                Self::Synced(u64_at(0))
            }
            13 => {
                if payload.is_empty() || payload.len() > MAX_INPUT_FRAME {
                    return Err(malformed("an input frame must hold 1 to 9216 bytes"));
                }
                Self::Input(payload)
            }
            14 => {
                if payload.is_empty() || payload.len() > MAX_INPUT_FRAME {
                    return Err(malformed("an output frame must hold 1 to 9216 bytes"));
                }
                Self::Output(payload)
            }
            other => return Err(ProtocolError::UnknownKind(other)),
        })
    }
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        1 => "Hello",
        2 => "Welcome",
        3 => "Refuse",
        4 => "EpochBegin",
        5 => "Pages",
        6 => "State",
        7 => "EpochEnd",
        8 => "Ack",
        9 => "Heartbeat",
        10 => "Goodbye",
        11 => "Sync",
        12 => "Synced",
        13 => "Input",
        14 => "Output",
        _ => "unknown",
    }
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
    /// is `payload_len` bytes with xxh3 `payload_checksum`. Numbers it.
    pub fn header(
        &mut self,
        epoch: u64,
        message: &Message,
        payload_len: usize,
        payload_checksum: u64,
    ) -> [u8; HEADER_LEN] {
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&MAGIC);
        header[4] = message.kind();
        header[8..16].copy_from_slice(&self.next_sequence.to_le_bytes());
        header[16..24].copy_from_slice(&epoch.to_le_bytes());
        header[24..28].copy_from_slice(&(payload_len as u32).to_le_bytes());
        header[32..40].copy_from_slice(&payload_checksum.to_le_bytes());
        let header_checksum = xxh3_64(&header[..40]);
        header[40..48].copy_from_slice(&header_checksum.to_le_bytes());
        self.next_sequence += 1;
        header
    }

    /// Encodes `message` for `epoch` as the next message (header and
    /// payload in one buffer).
    pub fn encode(&mut self, epoch: u64, message: &Message) -> Vec<u8> {
        let payload = message.payload();
        let header = self.header(epoch, message, payload.len(), xxh3_64(&payload));
        let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(&payload);
        bytes
    }

    /// Writes `message` for `epoch` to `writer`.
    pub fn send(
        &mut self,
        writer: &mut impl Write,
        epoch: u64,
        message: &Message,
    ) -> Result<(), ProtocolError> {
        writer.write_all(&self.encode(epoch, message))?;
        Ok(())
    }
}

/// Reads one message (no sequence or state checks: see [`Receiver`]).
pub fn read_message(reader: &mut impl Read) -> Result<Envelope, ProtocolError> {
    let mut header = [0u8; HEADER_LEN];
    reader.read_exact(&mut header)?;
    if header[0..4] != MAGIC {
        return Err(ProtocolError::BadMagic);
    }
    let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    if xxh3_64(&header[..40]) != u64_at(40) {
        return Err(ProtocolError::HeaderChecksum);
    }
    let kind = header[4];
    let length = u64::from(u32::from_le_bytes(
        header[24..28].try_into().expect("4 bytes"),
    ));
    if length as usize > MAX_PAYLOAD {
        return Err(ProtocolError::PayloadTooLarge(length));
    }
    let mut payload = vec![0u8; length as usize];
    reader.read_exact(&mut payload)?;
    if xxh3_64(&payload) != u64_at(32) {
        return Err(ProtocolError::PayloadChecksum {
            kind: kind_name(kind),
        });
    }
    Ok(Envelope {
        sequence: u64_at(8),
        epoch: u64_at(16),
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
        let mut bytes = Sender::new().encode(0, &Message::Pages(vec![7; 64]));
        bytes[HEADER_LEN + 10] ^= 1;

        let result = read_message(&mut bytes.as_slice());

        assert!(matches!(
            result,
            Err(ProtocolError::PayloadChecksum { kind: "Pages" })
        ));
    }

    #[test]
    fn corrupted_header_is_refused() {
        let mut bytes = Sender::new().encode(3, &Message::Ack);
        bytes[16] ^= 1; // The epoch.

        let result = read_message(&mut bytes.as_slice());

        assert!(matches!(result, Err(ProtocolError::HeaderChecksum)));
    }

    #[test]
    fn truncated_message_is_an_io_error() {
        let bytes = Sender::new().encode(0, &Message::Pages(vec![7; 64]));

        let result = read_message(&mut &bytes[..bytes.len() - 1]);

        assert!(matches!(result, Err(ProtocolError::Io(_))));
    }

    #[test]
    fn oversized_payload_is_refused_before_reading_it() {
        let mut bytes = Sender::new().encode(0, &Message::Ack);
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
