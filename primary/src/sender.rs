//! The `sender` thread: encodes and sends queued work in order (epoch
//! boundaries, page batches split into frames, the state and output of each
//! epoch), limits the rate when asked, and reports each epoch it sent.

use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use understudy_checkpoint::link::LinkSender;
use understudy_checkpoint::protocol::{EpochEnd, Message};
use understudy_compress::codec::MAX_PAGES_PER_FRAME;

/// Most pages in one frame on the wire (16 MiB): what the receiver holds
/// at once for a frame (its bytes, the decoded pages, the decoder's
/// scratch) stays bounded whatever the batch, so a storage-backed
/// secondary's memory does not grow with an initial copy's chunks.
const FRAME_PAGES: usize = 4096;
const _: () = assert!(FRAME_PAGES <= MAX_PAGES_PER_FRAME);
use understudy_compress::{CodecSpec, Encoder, PageBatch};

use crate::shared::Shared;
use crate::{EpochMetrics, PrimaryError, PrimaryEvent};

/// Work for the sender thread, in order.
pub(crate) enum Work {
    /// Ask the secondary to confirm it processed everything before.
    Sync(u64),
    /// An epoch starts.
    Begin(u64),
    /// Pages of an epoch.
    Pages(u64, PageBatch),
    /// Any other message of an epoch, in its place (a hybrid migration's
    /// `Discard`, a post-copy's `PageHashes`).
    Message(u64, Message),
    /// An epoch ends with its state and output.
    End {
        epoch: u64,
        state: Vec<u8>,
        /// The frames the guest sent during the epoch (sent after the state).
        output: Vec<Vec<u8>>,
        metrics: Box<EpochMetrics>,
        checkpointed: Instant,
    },
}

/// Keeps the average rate of page frames under a limit.
struct RateLimit {
    bytes_per_second: f64,
    started: Instant,
    bytes: f64,
}

impl RateLimit {
    fn sent(&mut self, bytes: usize) {
        self.bytes += bytes as f64;
        let due = Duration::from_secs_f64(self.bytes / self.bytes_per_second);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}

/// What the epoch being sent has cost so far.
#[derive(Default)]
struct EpochCost {
    pages: u64,
    wire: u64,
    encode: Duration,
    send: Duration,
}

/// The sender thread's loop: runs until the work queue closes or sending
/// fails (then the secondary is lost and the link shut down, so the
/// acknowledgement reader wakes too).
pub(crate) fn send_loop(
    link: &LinkSender,
    generation: u64,
    codec: &CodecSpec,
    limit: Option<f64>,
    work: &Receiver<Work>,
    shared: &Shared,
    events: &Sender<PrimaryEvent>,
) {
    let mut sender = EpochSender {
        link,
        shared,
        encoder: Encoder::new(codec),
        frame: Vec::new(),
        limit: limit.map(|bytes_per_second| RateLimit {
            bytes_per_second,
            started: Instant::now(),
            bytes: 0.0,
        }),
        cost: EpochCost::default(),
    };
    let result = work.iter().try_for_each(|item| match item {
        Work::Sync(token) => Ok::<(), PrimaryError>(link.send(0, &Message::Sync(token))?),
        Work::Begin(epoch) => {
            sender.cost = EpochCost::default();
            Ok(link.send(epoch, &Message::EpochBegin(generation))?)
        }
        Work::Message(epoch, message) => Ok(link.send(epoch, &message)?),
        Work::Pages(epoch, batch) => {
            sender.pages(epoch, batch)?;
            if epoch == 0 {
                // No acknowledgement comes until the initial copy ends:
                // until then, a secondary taking its pages is progress.
                shared.progressed();
            }
            Ok(())
        }
        Work::End {
            epoch,
            state,
            output,
            metrics,
            checkpointed,
        } => {
            let metrics = sender.end(epoch, state, output, *metrics, checkpointed)?;
            let _ = events.send(PrimaryEvent::Sent(metrics));
            Ok(())
        }
    });
    if let Err(error) = result {
        shared.lose_link(link, format!("sending failed: {error}"));
    }
}

struct EpochSender<'a> {
    link: &'a LinkSender,
    shared: &'a Shared,
    encoder: Encoder,
    /// The frame buffer, reused.
    frame: Vec<u8>,
    limit: Option<RateLimit>,
    cost: EpochCost,
}

impl EpochSender<'_> {
    fn pages(&mut self, epoch: u64, batch: PageBatch) -> Result<(), PrimaryError> {
        self.cost.pages += batch.len() as u64;
        if batch.len() > FRAME_PAGES {
            for part in split(&batch, FRAME_PAGES) {
                self.frame(epoch, &part)?;
            }
        } else {
            self.frame(epoch, &batch)?;
        }
        self.shared.recycle(batch);
        Ok(())
    }

    /// Encodes and sends one frame.
    fn frame(&mut self, epoch: u64, part: &PageBatch) -> Result<(), PrimaryError> {
        self.frame.clear();
        let started = Instant::now();
        self.encoder.encode(part, &mut self.frame)?;
        self.cost.encode += started.elapsed();
        let started = Instant::now();
        let message = Message::Pages(std::mem::take(&mut self.frame));
        let sent = self.link.send(epoch, &message);
        self.cost.send += started.elapsed();
        if let Message::Pages(bytes) = message {
            self.frame = bytes;
        }
        sent?;
        self.cost.wire += self.frame.len() as u64;
        self.shared.add_wire_bytes(self.frame.len());
        if let Some(limit) = &mut self.limit {
            limit.sent(self.frame.len());
        }
        Ok(())
    }

    fn end(
        &mut self,
        epoch: u64,
        state: Vec<u8>,
        output: Vec<Vec<u8>>,
        mut metrics: EpochMetrics,
        checkpointed: Instant,
    ) -> Result<EpochMetrics, PrimaryError> {
        let started = Instant::now();
        self.cost.wire += state.len() as u64;
        self.shared.add_wire_bytes(state.len());
        self.link.send(epoch, &Message::State(state))?;
        for frame in output {
            self.cost.wire += frame.len() as u64;
            self.link.send(epoch, &Message::Output(frame))?;
        }
        self.shared.checkpointed(epoch, checkpointed);
        self.link.send(
            epoch,
            &Message::EpochEnd(EpochEnd {
                pages: self.cost.pages,
                memory_hash: metrics.memory_hash,
            }),
        )?;
        self.cost.send += started.elapsed();
        metrics.wire_bytes = self.cost.wire;
        metrics.encode = self.cost.encode;
        metrics.send = self.cost.send;
        Ok(metrics)
    }
}

/// Splits a batch into frames of at most `max` pages.
fn split(batch: &PageBatch, max: usize) -> Vec<PageBatch> {
    let mut parts = Vec::new();
    let mut part = PageBatch::with_capacity(max);
    for (page_number, page) in batch.iter() {
        part.push(page_number, page);
        if part.len() == max {
            parts.push(std::mem::take(&mut part));
        }
    }
    if !part.is_empty() {
        parts.push(part);
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_batches_are_split_into_frames() {
        let mut batch = PageBatch::new();
        for page_number in 0..7 {
            batch.push_zeroed(page_number);
        }

        let parts = split(&batch, 3);

        assert_eq!(
            parts.iter().map(PageBatch::len).collect::<Vec<_>>(),
            vec![3, 3, 1]
        );
    }
}
