//! [`Throttle`]: logging a kind of bad remote input at a bounded rate.
//!
//! Every crate that faces untrusted parties (the wire's peers, the
//! watchtower's HTTP clients) warns about what they send; a flood of bad
//! input must not become a flood of log lines.

use std::time::{Duration, Instant};

/// Lets one log line of its kind through per second and counts the ones it
/// held back.
///
/// ```
/// use perun_channel::throttle::Throttle;
/// let mut t = Throttle::default();
/// assert_eq!(t.pass(), Some(0));
/// assert_eq!(t.pass(), None); // within the second: held back
/// ```
#[derive(Debug, Default)]
pub struct Throttle {
    last: Option<Instant>,
    skipped: u64,
}

impl Throttle {
    /// Whether to log now; `Some(held back since the last line)` if so.
    pub fn pass(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.skipped = self.skipped.saturating_add(1);
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.skipped))
    }
}
