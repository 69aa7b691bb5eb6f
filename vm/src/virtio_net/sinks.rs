//! Where the frames a guest transmits go: a tap, nowhere, or a recording.

use std::sync::Mutex;

use crate::log_limited;
use crate::tap::Tap;

/// Where the frames the guest transmits go.
pub trait FrameSink: Send + Sync {
    /// Takes one Ethernet frame (without the virtio header).
    fn send(&self, frame: &[u8]);
}

impl FrameSink for Tap {
    fn send(&self, frame: &[u8]) {
        if let Err(error) = self.write_frame(frame) {
            // The guest decides how often it sends: rate-limit the complaint.
            log_limited!(warn, %error, "a frame from the guest was not delivered to the tap");
        }
    }
}

/// Edits a received frame in place before the guest sees it (a COLO
/// secondary that took over rewrites TCP acknowledgement numbers).
pub trait FrameFilter: Send + Sync {
    /// Edits one Ethernet frame.
    fn filter(&self, frame: &mut [u8]);
}

/// A sink that drops every frame (a VM without a network behind it).
pub struct DiscardFrames;

impl FrameSink for DiscardFrames {
    fn send(&self, _frame: &[u8]) {}
}

/// A sink that keeps every frame in memory, in order (tests, diagnostics).
#[derive(Default)]
pub struct FrameRecorder(Mutex<Vec<Vec<u8>>>);

impl FrameSink for FrameRecorder {
    fn send(&self, frame: &[u8]) {
        self.0
            .lock()
            .expect("no panics while the recorder is held")
            .push(frame.to_vec());
    }
}

impl FrameRecorder {
    /// The frames so far.
    pub fn frames(&self) -> Vec<Vec<u8>> {
        self.0
            .lock()
            .expect("no panics while the recorder is held")
            .clone()
    }
}
