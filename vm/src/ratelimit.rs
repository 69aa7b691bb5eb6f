//! Rate-limited logging for events the guest can trigger at will (an
//! unclaimed port, a bad MMIO access): at most one line per call site per
//! second, with a count of what was suppressed.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The state behind one call site of [`log_limited!`](crate::log_limited).
pub struct LogLimit {
    /// Second (since the process's first limited log) of the last line written, plus one.
    last_second: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimit {
    /// A limit that allows the first line.
    pub const fn new() -> Self {
        Self {
            last_second: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether to log now; `Some(n)` with the number of lines suppressed since the last one.
    pub fn allow(&self) -> Option<u64> {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        let now = EPOCH.get_or_init(Instant::now).elapsed().as_secs() + 1;
        let last = self.last_second.load(Ordering::Relaxed);
        if last != now
            && self
                .last_second
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl Default for LogLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// Logs through `tracing` at most once per second from this call site:
/// `log_limited!(warn, port, "guest wrote to an unclaimed port")`.
#[macro_export]
macro_rules! log_limited {
    ($level:ident, $($rest:tt)+) => {{
        static LIMIT: $crate::ratelimit::LogLimit = $crate::ratelimit::LogLimit::new();
        if let Some(suppressed) = LIMIT.allow() {
            tracing::$level!(suppressed, $($rest)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_line_is_allowed_and_the_second_suppressed() {
        let limit = LogLimit::new();
        assert_eq!(limit.allow(), Some(0));
        assert_eq!(limit.allow(), None);
    }
}
