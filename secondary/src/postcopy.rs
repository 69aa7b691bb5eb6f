//! Post-copy on the target (`Hello` with purpose `MigratePostcopy`).
//!
//! ```text
//! source                                  target
//! EpochBegin(0), [Pages…, Discard…] ────▶  hybrid: pre-copied pages written
//!                                         in place, stale ones dropped
//! State, EpochEnd(0) ───────────────────▶ committed: memory registered with
//!                                         userfaultfd, the guest resumed
//!       ◀──────────────────────────────── Ack(0)
//!       ◀──────────────────────────────── PageRequest(p)  (a fault on p)
//! EpochBegin(1), Pages… ─────────────────▶ each page installed (faulted ones
//!   (asked-for pages first, the rest        woken), zero pages as such
//!    from just after the last request)
//! [PageHashes], State, EpochEnd(1) ──────▶ every page is here: memory
//!                                         unregistered (untouched pages
//!                                         are zero), each page checked
//!                                         against its hash (--verify),
//!       ◀──────────────────────────────── Ack(1)
//! ```
//!
//! Two threads while pages move: the page reader (reads pages and installs
//! them) and the caller's (restores the state and resumes the guest, which
//! may fault at once; so may the VMM reading the guest's boot page); the
//! fault handler thread asks for pages and waits for them.
//!
//! Failure model: from the switchover until `EpochEnd(1)` the guest lives
//! on two hosts. A connection that breaks (or a source that stalls or says
//! goodbye) does not end it: the guest runs on here, a vCPU touching a
//! missing page waits, and the page reader waits for the source to come
//! back (`PostcopyResume` with the same VM id) for the recovery window. A
//! resumed source learns which pages are here (`PagesHeld`) and sends the
//! rest; faults still waiting are asked again on the new connection.
//! When the window passes, the guest is stopped here with an error that
//! says so; the source keeps its paused copy until it has `Ack(1)`. Bad
//! input (a page outside guest memory) ends the post-copy the same way; a
//! page that arrives twice is installed once.

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

/// Which pages arrived, shared by the page reader and the fault handler,
/// and the connection requests go out on.
pub(crate) struct Arrivals {
    state: Mutex<(DirtyBitmap, Progress)>,
    changed: Condvar,
    /// The source's connection, numbered: a resumed post-copy replaces it,
    /// and a fault still waiting asks again on the new one.
    link: Mutex<(u64, LinkSender)>,
}

impl Arrivals {
    pub fn new(pages: u64, link: LinkSender) -> Self {
        Self {
            state: Mutex::new((DirtyBitmap::new(usize_from(pages)), Progress::Moving)),
            changed: Condvar::new(),
            link: Mutex::new((0, link)),
        }
    }

    /// A resumed post-copy: requests go out on `link` from now on.
    pub fn replace_link(&self, link: LinkSender) {
        let mut current = self.link.lock().expect("no panics while the link is held");
        current.0 += 1;
        current.1 = link;
    }

    fn link(&self) -> (u64, LinkSender) {
        let current = self.link.lock().expect("no panics while the link is held");
        (current.0, current.1.clone())
    }

    /// The pages here, as `PagesHeld` carries them.
    pub fn held(&self) -> Vec<u8> {
        self.lock().0.to_le_bytes()
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

    /// Waits up to `timeout` until `page_number` arrived or no more pages
    /// will come (`None`: neither yet).
    fn wait(&self, page_number: u64, timeout: Duration) -> Option<Result<Fetched, String>> {
        let state = self.lock();
        let (state, _) = self
            .changed
            .wait_timeout_while(state, timeout, |state| {
                !state.0.is_set(usize_from(page_number)) && matches!(state.1, Progress::Moving)
            })
            .expect("no panics while arrivals are held");
        if state.0.is_set(usize_from(page_number)) {
            return Some(Ok(Fetched::Installed));
        }
        match &state.1 {
            // Every non-zero page came before the end: this one is zero.
            Progress::Done => Some(Ok(Fetched::Zero)),
            Progress::Broken(why) => Some(Err(why.clone())),
            Progress::Moving => None,
        }
    }
}

/// How often a fault waiting for its page looks whether the connection was
/// replaced (then it asks again).
const ASK_AGAIN_POLL: Duration = Duration::from_millis(50);

/// The fault handler's page source: asks the source for the page and waits
/// until the page reader installed it (asking again on a resumed
/// connection).
pub(crate) struct Requester {
    pub arrivals: Arc<Arrivals>,
}

impl PageSource for Requester {
    fn fetch(&mut self, page_number: u64, _page: &mut [u8; PAGE_BYTES]) -> Result<Fetched, String> {
        let mut asked_on = None;
        loop {
            let (number, link) = self.arrivals.link();
            if asked_on != Some(number) {
                asked_on = Some(number);
                if let Err(error) = link.send(1, &Message::PageRequest(page_number)) {
                    // The connection broke: the page comes once the source
                    // is back (or never, and the post-copy ends).
                    tracing::debug!(%error, page_number, "a page request did not go out");
                }
            }
            if let Some(fetched) = self.arrivals.wait(page_number, ASK_AGAIN_POLL) {
                return fetched;
            }
        }
    }
}

/// What the page epoch brought.
pub(crate) struct Received {
    /// Pages installed.
    pub pages: u64,
    /// The source's hash of every page (`--verify`).
    pub hashes: Option<Vec<u64>>,
}

/// Reads the page epoch (1) and installs its pages until its end (not
/// acknowledged yet: the caller checks the pages first).
pub(crate) fn receive_pages(
    reader: &mut LivenessReader,
    receiver: &mut Receiver,
    decoder: &mut Decoder,
    installer: &Installer,
    arrivals: &Arrivals,
    sender: &LinkSender,
    stop: &AtomicBool,
) -> Result<Received, ConnectionError> {
    let mut decoded = PageBatch::new();
    let mut count = 0u64;
    let mut hashes = None;
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
            Action::Commit { .. } => {
                return Ok(Received {
                    pages: count,
                    hashes,
                });
            }
            Action::VerifyPages(all) => hashes = Some(all),
            Action::Discard(_) => {
                return Err(ConnectionError::Postcopy(
                    "the source dropped pages after the switchover (Discard belongs to epoch 0)"
                        .to_owned(),
                ));
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
            Action::Handover(_) => {
                return Err(ConnectionError::Postcopy(
                    "the source sent a pre-copy migration's Handover during post-copy".to_owned(),
                ));
            }
            Action::BeginEpoch(_)
            | Action::StageState(_)
            | Action::StageOutput(_)
            | Action::Heartbeat(_)
            | Action::LogInput { .. } => {}
        }
    }
}
