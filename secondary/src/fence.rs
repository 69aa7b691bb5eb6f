//! The secondary's side of fencing: it resumes the guest only after winning
//! the witness's test-and-set from the record its primary wrote when the
//! pair came in sync (see `understudy_checkpoint::witness` for the rule).
//!
//! Failure model: a record that says `solo` (the primary went on alone), or
//! names another owner or generation, means this backup is stale: no
//! takeover. A witness that cannot be reached, or holds a record that is
//! malformed or of another VM, is reported and retried; the guest stays
//! paused meanwhile: this side never guesses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use understudy_checkpoint::witness::{OwnerState, Record, Witness};

use crate::SecondaryEvent;

/// How long between two tries of an undecided witness.
const RETRY: Duration = Duration::from_millis(500);

/// What the witness decided.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// This side won: resume the guest.
    Resume,
    /// Another side runs the guest; why.
    Stale(String),
}

/// The primary a backup was in sync with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SyncedWith {
    /// The VM.
    pub vm_id: u64,
    /// The primary's instance.
    pub owner: u64,
    /// The generation the pair was in sync at.
    pub generation: u64,
}

/// Asks the witness whether this side (`me`) may run the VM alone.
pub(crate) fn may_take_over(
    witness: &Witness,
    synced: SyncedWith,
    me: u64,
    stop: &AtomicBool,
    report: &mut impl FnMut(&SecondaryEvent),
) -> Verdict {
    let in_sync = Record {
        vm_id: synced.vm_id,
        owner: synced.owner,
        state: OwnerState::InSync,
        generation: synced.generation,
    };
    let mine = Record {
        vm_id: synced.vm_id,
        owner: me,
        state: OwnerState::Solo,
        generation: synced.generation + 1,
    };
    loop {
        let attempt = witness.read(synced.vm_id).and_then(|found| match found {
            Some(found) if found.record == in_sync => witness
                .replace(found.revision, mine)
                .map(|won| won.then_some(Verdict::Resume)),
            // Our own write, whose answer was lost.
            Some(found) if found.record == mine => Ok(Some(Verdict::Resume)),
            Some(found) => Ok(Some(Verdict::Stale(format!(
                "the witness says instance {} runs VM {} {} at generation {} (this backup was in sync with instance {} at generation {}): it is stale, not resuming",
                found.record.owner,
                synced.vm_id,
                match found.record.state {
                    OwnerState::InSync => "with a secondary",
                    OwnerState::Solo => "alone",
                },
                found.record.generation,
                synced.owner,
                synced.generation
            )))),
            None => Ok(Some(Verdict::Stale(format!(
                "the witness has no record of VM {}: not resuming",
                synced.vm_id
            )))),
        });
        match attempt {
            Ok(Some(verdict)) => return verdict,
            // Lost the race to a change; read again.
            Ok(None) => {}
            Err(error) => {
                report(&SecondaryEvent::WitnessWaiting {
                    reason: error.to_string(),
                });
                if stop.load(Ordering::Relaxed) {
                    return Verdict::Stale(format!(
                        "stopped while waiting for the witness: {error}"
                    ));
                }
                std::thread::sleep(RETRY);
            }
        }
    }
}
