//! The primary's side of fencing: owning the VM's witness record, marking
//! the pair in sync, and going alone only after winning the test-and-set
//! (see `understudy_checkpoint::witness` for the rule and why it leaves one
//! copy).
//!
//! Failure model: a witness that cannot be reached while the pair is healthy
//! changes nothing. When the secondary is lost and the witness cannot be
//! reached, the guest runs on but its output stays held (nothing leaves this
//! host that the secondary may not have), the wait is reported every
//! second, and the test-and-set is retried until it is decided or the
//! primary is stopped. A record that names another owner means the
//! secondary took over: this copy stops and releases nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use understudy_checkpoint::witness::{OwnerState, Record, Versioned, Witness, WitnessError};

use crate::PrimaryEvent;

/// How long between two tries of an undecided witness.
const RETRY: Duration = Duration::from_millis(500);

/// Why this copy must not run the guest.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// The witness names another owner.
    #[error(
        "the witness says instance {owner} runs VM {vm_id} (generation {generation}): this copy must not run it"
    )]
    NotOwner {
        /// The VM.
        vm_id: u64,
        /// Who runs it.
        owner: u64,
        /// The record's generation.
        generation: u64,
    },
    /// Stopped while the witness was undecided.
    #[error("stopped while waiting for the witness: {0}")]
    Undecided(#[source] WitnessError),
}

/// The witness record this primary owns.
pub(crate) struct Fence {
    witness: Witness,
    vm_id: u64,
    owner: u64,
    current: Versioned,
}

fn not_owner(record: &Record) -> FenceError {
    FenceError::NotOwner {
        vm_id: record.vm_id,
        owner: record.owner,
        generation: record.generation,
    }
}

impl Fence {
    /// Takes ownership of a new VM's record (created `solo`), or finds it
    /// already ours; waits while the witness cannot answer.
    pub fn claim(
        witness: Witness,
        vm_id: u64,
        owner: u64,
        stop: &AtomicBool,
        on_event: &mut impl FnMut(PrimaryEvent),
    ) -> Result<Self, FenceError> {
        let first = Record {
            vm_id,
            owner,
            state: OwnerState::Solo,
            generation: 1,
        };
        let current = until_decided(stop, on_event, || {
            if let Some(found) = witness.read(vm_id)? {
                return Ok(found);
            }
            witness.create(first)?;
            witness.read(vm_id)?.ok_or_else(|| WitnessError::BadRecord {
                vm_id,
                why: "the record vanished after it was created".to_owned(),
            })
        })?;
        if current.record.owner != owner {
            return Err(not_owner(&current.record));
        }
        Ok(Self {
            witness,
            vm_id,
            owner,
            current,
        })
    }

    /// The generation a new pair will be in sync at (goes in `Hello`).
    pub fn next_generation(&self) -> u64 {
        self.current.record.generation + 1
    }

    fn record(&self, state: OwnerState) -> Record {
        Record {
            vm_id: self.vm_id,
            owner: self.owner,
            state,
            generation: self.next_generation(),
        }
    }

    /// The pair is in sync (epoch 0 acknowledged): from now on the
    /// secondary may take over. A witness that cannot be reached leaves the
    /// record `solo`: the secondary then cannot take over (reported).
    pub fn in_sync(&mut self, on_event: &mut impl FnMut(PrimaryEvent)) -> Result<(), FenceError> {
        let wanted = self.record(OwnerState::InSync);
        match self.try_set(wanted) {
            Ok(true) => {
                on_event(PrimaryEvent::Witness {
                    state: "in_sync",
                    generation: wanted.generation,
                });
                Ok(())
            }
            Ok(false) => Err(not_owner(&self.current.record)),
            Err(error) => {
                on_event(PrimaryEvent::WitnessWaiting {
                    reason: format!(
                        "{error}; the pair runs on, but the secondary cannot take over until the witness records it"
                    ),
                });
                Ok(())
            }
        }
    }

    /// The secondary is lost: wins the right to run alone, or learns that
    /// the secondary won it. Blocks (reporting) while the witness cannot
    /// answer.
    pub fn go_solo(
        &mut self,
        stop: &AtomicBool,
        on_event: &mut impl FnMut(PrimaryEvent),
    ) -> Result<(), FenceError> {
        if self.current.record.state == OwnerState::Solo {
            return Ok(());
        }
        let wanted = self.record(OwnerState::Solo);
        let won = until_decided(stop, on_event, || self.try_set(wanted))?;
        if !won {
            return Err(not_owner(&self.current.record));
        }
        on_event(PrimaryEvent::Witness {
            state: "solo",
            generation: wanted.generation,
        });
        Ok(())
    }

    /// Test-and-set from the revision this primary knows; on a lost race,
    /// `current` becomes what the witness holds (the caller checks it).
    fn try_set(&mut self, wanted: Record) -> Result<bool, WitnessError> {
        let won = self.witness.replace(self.current.revision, wanted)?;
        let now = self
            .witness
            .read(self.vm_id)?
            .ok_or_else(|| WitnessError::BadRecord {
                vm_id: self.vm_id,
                why: "the record vanished".to_owned(),
            })?;
        self.current = now;
        // A lost answer to a write that did happen reads back as ours.
        Ok(won || now.record == wanted)
    }
}

/// Retries `attempt` until the witness decides, reporting each failure;
/// gives up only when `stop` is set.
fn until_decided<T>(
    stop: &AtomicBool,
    on_event: &mut impl FnMut(PrimaryEvent),
    mut attempt: impl FnMut() -> Result<T, WitnessError>,
) -> Result<T, FenceError> {
    loop {
        match attempt() {
            Ok(value) => return Ok(value),
            Err(error) => {
                on_event(PrimaryEvent::WitnessWaiting {
                    reason: error.to_string(),
                });
                if stop.load(Ordering::Relaxed) {
                    return Err(FenceError::Undecided(error));
                }
                std::thread::sleep(RETRY);
            }
        }
    }
}
