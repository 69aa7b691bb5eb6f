//! The `acks` thread: reads what the secondary sends back (acknowledgements,
//! sync answers, heartbeats, a goodbye, and in COLO mode the secondary's
//! guest output for the compare proxy) until the connection ends. An
//! acknowledgement releases the epoch's held output. When the secondary is
//! lost, the socket is shut down so that a sender blocked in a write wakes
//! up, and the checkpoint loop learns of the loss at its next submission or
//! wait.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::time::Instant;

use understudy_checkpoint::link::{LinkSender, LivenessReader};
use understudy_checkpoint::protocol::{Message, ProtocolError};

use crate::PrimaryEvent;
use crate::shared::Shared;

/// Reads what the secondary sends until the connection ends. With
/// `distrust_gaps` (replication: a takeover is possible), a message that
/// comes after a silence of the heartbeat timeout ends the connection; a
/// migration source (no takeover, its guest's output not held) reads on.
pub(crate) fn ack_loop(
    reader: &mut LivenessReader,
    link: &LinkSender,
    shared: &Shared,
    events: &Sender<PrimaryEvent>,
    stop: &AtomicBool,
    distrust_gaps: bool,
) {
    let lose = |reason: String| shared.lose_link(link, reason);
    let mut last_message = Instant::now();
    loop {
        let envelope = match reader.receive() {
            Ok(envelope) => envelope,
            Err(error) => {
                if !stop.load(Ordering::Relaxed) {
                    lose(format!("{error}: {}", error_source(&error)));
                }
                return;
            }
        };
        // The secondary speaks at least every heartbeat interval, and a
        // silence of the timeout ends the read above with an error. A
        // message that still comes after such a gap was waiting while this
        // process was stopped (or starved): the secondary may have taken
        // over meanwhile. Nothing read now may release output.
        let read_at = Instant::now();
        let gap = read_at - last_message;
        last_message = read_at;
        if distrust_gaps && gap >= reader.timeout() {
            lose(format!(
                "this primary heard nothing for {gap:?} (it was stopped or starved): the secondary may have taken over"
            ));
            return;
        }
        if let Some(gate) = shared.output.get() {
            // COLO's lease: half the timeout, so that it ends before the
            // secondary could give this primary up.
            // From when the message was read, not from now: a primary
            // stopped between the two must not find a fresh lease.
            gate.secondary_heard(read_at, reader.timeout() / 2);
        }
        match envelope.message {
            Message::Ack => {
                let epoch = envelope.epoch;
                let checkpointed = match shared.acknowledge(epoch) {
                    Ok(checkpointed) => checkpointed,
                    Err(reason) => {
                        lose(reason);
                        return;
                    }
                };
                if let Some(gate) = shared.output.get() {
                    gate.acknowledge(epoch);
                }
                let latency = checkpointed.elapsed();
                let _ = events.send(PrimaryEvent::Acknowledged { epoch, latency });
            }
            Message::SecondaryOutput(frame) => {
                let compared = shared
                    .output
                    .get()
                    .is_some_and(|gate| gate.secondary_output(envelope.epoch, &frame));
                if !compared {
                    lose(
                        "the secondary sent its guest's output, but this primary does not compare output (it is not in COLO mode)"
                            .to_owned(),
                    );
                    return;
                }
            }
            Message::PageRequest(page_number) => shared.request_page(page_number),
            Message::Heartbeat(_) => {}
            Message::Synced(token) => shared.synced(token),
            Message::TookOver => shared.took_over(),
            Message::Goodbye(reason) => {
                lose(format!("the secondary left: {reason}"));
                return;
            }
            other => {
                lose(format!("the secondary sent an unexpected {}", other.name()));
                return;
            }
        }
    }
}

fn error_source(error: &ProtocolError) -> String {
    std::error::Error::source(error).map_or_else(String::new, ToString::to_string)
}
