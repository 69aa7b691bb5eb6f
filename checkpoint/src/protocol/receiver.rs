//! The secondary's receiving state machine: which message may come when.

use super::{Envelope, EpochEnd, Hello, Message, ProtocolError};

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
    /// Hybrid migration: drop these pages (changed since they were sent).
    Discard(Vec<u64>),
    /// Post-copy with verification: the source's hash of every page.
    VerifyPages(Vec<u64>),
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
    /// The guest is handed over: resume it (a migration's commit, or a
    /// planned switchover).
    Handover(super::Handover),
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
            Action::Discard(_) => "Discard",
            Action::VerifyPages(_) => "PageHashes",
            Action::Commit { .. } => "EpochEnd",
            Action::Heartbeat(_) => "Heartbeat",
            Action::Sync(_) => "Sync",
            Action::LogInput { .. } => "Input",
            Action::Handover(_) => "Handover",
            Action::Close(_) => "Goodbye",
        }
    }
}

/// The secondary's side of a connection: sequence and state checks.
#[derive(Debug)]
pub struct Receiver {
    state: ReceiverState,
    next_sequence: u64,
    /// The fencing generation `Hello` carried.
    generation: u64,
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
            generation: 0,
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

    /// A resumed post-copy: epoch `committed` was committed on an earlier
    /// connection, so the next epoch this one accepts is the one after.
    /// Only right after `Hello`; refused (false) anywhere else.
    pub fn resume_after(&mut self, committed: u64) -> bool {
        if self.state != (ReceiverState::BetweenEpochs { committed: None }) {
            return false;
        }
        self.state = ReceiverState::BetweenEpochs {
            committed: Some(committed),
        };
        true
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
            (ReceiverState::BetweenEpochs { committed: Some(_) }, Message::Handover(handover)) => {
                (ReceiverState::Closed, Action::Handover(handover))
            }
            (ReceiverState::AwaitingHello, Message::Hello(hello)) => {
                self.generation = hello.generation;
                (
                    ReceiverState::BetweenEpochs { committed: None },
                    Action::Greet(hello),
                )
            }
            (ReceiverState::BetweenEpochs { .. }, Message::EpochBegin(generation))
                if generation != self.generation =>
            {
                return Err(ProtocolError::StaleGeneration {
                    hello: self.generation,
                    epoch: generation,
                });
            }
            (ReceiverState::BetweenEpochs { committed }, Message::EpochBegin(_))
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
                    state_received: false,
                    ..
                },
                Message::Discard(pages),
            ) if epoch == current => (self.state, Action::Discard(pages)),
            (
                ReceiverState::InEpoch {
                    epoch: current,
                    state_received: false,
                    ..
                },
                Message::PageHashes(hashes),
            ) if epoch == current => (self.state, Action::VerifyPages(hashes)),
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
