//! Post-copy on the target (`Hello` with purpose `MigratePostcopy`).
//!
//! ```text
//! source                                  target
//! EpochBegin(0), State, EpochEnd(0) ──▶   committed: memory registered with
//!                                         userfaultfd, the guest resumed
//!       ◀──────────────────────────────── Ack(0)
//!       ◀──────────────────────────────── PageRequest(p)  (a fault on p)
//! EpochBegin(1), Pages… ─────────────────▶ each page installed (faulted ones
//!   (asked-for pages first, the rest        woken), zero pages as such
//!    from just after the last request)
//! State, EpochEnd(1) ────────────────────▶ every page is here: memory
//!                                         unregistered (untouched pages
//!                                         are zero), Ack(1)
//! ```
//!
//! Two threads while pages move: this connection's (reads pages and
//! installs them) and the caller's (restores the state and resumes the
//! guest, which may fault at once; so may the VMM reading the guest's boot
//! page); the fault handler thread asks for pages and waits for them.
//!
//! Failure model: from the switchover until `EpochEnd(1)` the guest lives on
//! two hosts. A connection that breaks or a source that leaves here ends the
//! guest on this side (its missing pages can never come) with an error that
//! says so; the source keeps its paused copy until it has this side's
//! `Ack(1)`. Resuming a broken post-copy is not built yet.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use understudy_checkpoint::link::{LinkSender, LivenessReader};
use understudy_checkpoint::protocol::{Action, Message, Receiver};
use understudy_compress::{Decoder, PageBatch};
use understudy_vm::dirty::DirtyBitmap;
use understudy_vm::postcopy::{Fetched, Installer, PageSource};
use understudy_vm::{PAGE_BYTES, usize_from};

use crate::ConnectionError;

/// Where the pages stand.
enum Progress {
    /// Pages are coming.
    Moving,
    /// Every page that will come has come.
    Done,
    /// They stopped coming, for this reason.
    Broken(String),
}

/// Which pages arrived, shared by the page reader and the fault handler.
pub(crate) struct Arrivals {
    state: Mutex<(DirtyBitmap, Progress)>,
    changed: Condvar,
}

impl Arrivals {
    pub fn new(pages: u64) -> Self {
        Self {
            state: Mutex::new((DirtyBitmap::new(usize_from(pages)), Progress::Moving)),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (DirtyBitmap, Progress)> {
        self.state
            .lock()
            .expect("no panics while arrivals are held")
    }

    fn arrived(&self, page_number: u64) {
        self.lock().0.set(usize_from(page_number));
        self.changed.notify_all();
    }

    /// No more pages will come: `why` if they stopped early.
    pub fn end(&self, why: Option<String>) {
        self.lock().1 = why.map_or(Progress::Done, Progress::Broken);
        self.changed.notify_all();
    }

    /// Waits until `page_number` arrived or no more pages will come.
    fn wait(&self, page_number: u64) -> Result<Fetched, String> {
        let mut state = self.lock();
        loop {
            if state.0.is_set(usize_from(page_number)) {
                return Ok(Fetched::Installed);
            }
            match &state.1 {
                // Every non-zero page came before the end: this one is zero.
                Progress::Done => return Ok(Fetched::Zero),
                Progress::Broken(why) => return Err(why.clone()),
                Progress::Moving => {}
            }
            state = self
                .changed
                .wait_timeout(state, Duration::from_millis(100))
                .expect("no panics while arrivals are held")
                .0;
        }
    }
}

/// The fault handler's page source: asks the source for the page and waits
/// until the page reader installed it.
pub(crate) struct Requester {
    pub link: LinkSender,
    pub arrivals: Arc<Arrivals>,
}

impl PageSource for Requester {
    fn fetch(&mut self, page_number: u64, _page: &mut [u8; PAGE_BYTES]) -> Result<Fetched, String> {
        self.link
            .send(1, &Message::PageRequest(page_number))
            .map_err(|error| format!("cannot ask the source for page {page_number}: {error}"))?;
        self.arrivals.wait(page_number)
    }
}

/// Reads the page epoch (1) and installs its pages until its end; returns
/// how many arrived.
pub(crate) fn receive_pages(
    reader: &mut LivenessReader,
    receiver: &mut Receiver,
    decoder: &mut Decoder,
    installer: &Installer,
    arrivals: &Arrivals,
    sender: &LinkSender,
    stop: &AtomicBool,
) -> Result<u64, ConnectionError> {
    let mut decoded = PageBatch::new();
    let mut count = 0u64;
    loop {
        let envelope = reader.receive()?;
        if stop.load(Ordering::Relaxed) {
            return Err(ConnectionError::Postcopy(
                "stopped on request during post-copy".to_owned(),
            ));
        }
        let epoch = envelope.epoch;
        match receiver.accept(envelope)? {
            Action::StagePages(frame) => {
                decoder
                    .decode(&frame, &mut decoded)
                    .map_err(|source| ConnectionError::Pages { epoch, source })?;
                for (page_number, page) in decoded.iter() {
                    let zero = page.iter().all(|byte| *byte == 0);
                    installer.install(page_number, (!zero).then_some(page))?;
                    arrivals.arrived(page_number);
                    count += 1;
                }
            }
            Action::Commit { epoch, .. } => {
                if let Err(error) = sender.send(epoch, &Message::Ack) {
                    tracing::debug!(%error, "the acknowledgement of the last pages did not go out");
                }
                return Ok(count);
            }
            Action::Sync(token) => {
                let _ = sender.send(epoch, &Message::Synced(token));
            }
            Action::Close(reason) => {
                return Err(ConnectionError::Postcopy(format!(
                    "the source left during post-copy ({reason})"
                )));
            }
            Action::Greet(_) => return Err(ConnectionError::BeforeHello("a second Hello")),
            Action::BeginEpoch(_)
            | Action::StageState(_)
            | Action::StageOutput(_)
            | Action::Heartbeat(_)
            | Action::LogInput { .. } => {}
        }
    }
}
