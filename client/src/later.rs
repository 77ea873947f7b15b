//! Chores an update leaves for a moment later, on one queue and one timer
//! per client: our held commit handed out on its own when no next update
//! took it along ([`crate::core::COMMIT_RIDE_WAIT`]), a peer's commit stored
//! on its own when no write of ours carried it
//! ([`crate::core::COMMIT_FLUSH_DELAY`]). In a burst the next update does
//! both, so each chore finds nothing to do. A task and a timer per update
//! for that cost up to 11 µs of CPU per update at 100 channels (skipping
//! both); this queue saves about 4 µs of it (BENCHMARKS.md, issue 17). The
//! runner is in `update`; this module only holds the queue. Chores run for
//! as long as the client exists; `Client::shutdown` stores any commit still
//! unsaved itself.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::core::{COMMIT_FLUSH_DELAY, COMMIT_RIDE_WAIT, ChannelCore};

// The queue is kept in order by equal delays (see `Later::after`).
const _: () = assert!(COMMIT_FLUSH_DELAY.as_nanos() == COMMIT_RIDE_WAIT.as_nanos());

/// What to look at once its moment comes.
#[derive(Debug)]
pub(crate) enum Chore {
    /// Hand out our commit of `version` if it still waits to ride.
    Deliver {
        core: Weak<ChannelCore>,
        version: u64,
    },
    /// Store the channel's unsaved commit if it is still unsaved.
    Flush { core: Weak<ChannelCore> },
}

/// The client's chores, in the order they fall due.
#[derive(Debug, Default)]
pub(crate) struct Later {
    queue: Mutex<VecDeque<(Instant, Chore)>>,
    wake: Notify,
    /// Tests hold chores back, as a busy runtime may, to see what does
    /// not wait for them (feature `failpoints`).
    #[cfg(feature = "failpoints")]
    held: tokio::sync::watch::Sender<bool>,
}

impl Later {
    /// Queues `chore` for `delay` from now. Every delay in use is the same
    /// (1 ms), so the queue stays in order; a longer one queued before a
    /// shorter would only make the shorter late, never early.
    pub(crate) fn after(&self, delay: Duration, chore: Chore) {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let was_empty = q.is_empty();
        q.push_back((Instant::now() + delay, chore));
        drop(q);
        if was_empty {
            self.wake.notify_one();
        }
    }

    /// Holds every chore back (`true`) until released (feature
    /// `failpoints`).
    #[cfg(feature = "failpoints")]
    pub(crate) fn hold(&self, held: bool) {
        self.held.send_replace(held);
    }

    /// Waits until the first chore is due and returns every due one. An
    /// empty queue waits for the next `after`.
    pub(crate) async fn due(&self) -> Vec<Chore> {
        loop {
            #[cfg(feature = "failpoints")]
            if *self.held.borrow() {
                let _ = self.held.subscribe().wait_for(|held| !held).await;
            }
            let first = self
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .front()
                .map(|(at, _)| *at);
            match first {
                None => self.wake.notified().await,
                Some(at) if at > Instant::now() => tokio::time::sleep_until(at).await,
                Some(_) => {
                    let now = Instant::now();
                    let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                    let n = q.iter().take_while(|(at, _)| *at <= now).count();
                    return q.drain(..n).map(|(_, c)| c).collect();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn chores_come_due_in_order_and_not_before_their_time() {
        let later = Later::default();
        later.after(Duration::from_millis(1), Chore::Flush { core: Weak::new() });
        later.after(
            Duration::from_millis(1),
            Chore::Deliver {
                core: Weak::new(),
                version: 7,
            },
        );
        let t = Instant::now();
        let due = later.due().await;
        assert!(t.elapsed() >= Duration::from_millis(1));
        assert_eq!(due.len(), 2);
        assert!(matches!(due[0], Chore::Flush { .. }));
        assert!(matches!(due[1], Chore::Deliver { version: 7, .. }));
        assert!(later.queue.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_empty_queue_waits_for_the_next_chore() {
        let later = Later::default();
        // `due` is cancel-safe: a wait given up takes nothing off.
        let empty = tokio::time::timeout(Duration::from_millis(50), later.due()).await;
        assert!(empty.is_err());
        later.after(Duration::from_millis(1), Chore::Flush { core: Weak::new() });
        assert_eq!(later.due().await.len(), 1);
    }
}
