//! [`ToEnd`]: a protocol run that its caller may drop but not cut short.
//!
//! A run that staged a proposal, sent it or is writing it must reach an end
//! (done or failed, with its clean-up): cut off at an `await` it would
//! leave the channel `Updating` and its peers waiting. Spawning every run
//! would cost each update a task and its wake-ups (measured: the
//! in-memory update's p50 rose by about 25 µs); instead the run is polled
//! in the caller's task, and only if the caller drops it does the rest
//! move to a task of its own.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use tracing::debug;

use crate::core::{InFlight, Shared};

/// Polls `F` in place; dropped before `F` ends, it spawns the rest.
pub(crate) struct ToEnd<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    /// `None` once it ended.
    run: Option<Pin<Box<F>>>,
    /// The client whose shutdown waits for the run once it is on its own.
    client: Option<Weak<Shared>>,
}

impl<F> ToEnd<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    /// A run no client's shutdown waits for (the tests' runs).
    #[cfg(test)]
    fn new(run: F) -> Self {
        Self {
            run: Some(Box::pin(run)),
            client: None,
        }
    }

    /// A run of the client's that, once its caller is gone, counts as in
    /// flight for `Client::shutdown` (which waits a grace period for it).
    pub(crate) fn of_client(shared: &Arc<Shared>, run: F) -> Self {
        Self {
            run: Some(Box::pin(run)),
            client: Some(Arc::downgrade(shared)),
        }
    }
}

impl<F> Future for ToEnd<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Polled again after it ended: a caller's bug; it never ends twice.
        let Some(run) = self.run.as_mut() else {
            return Poll::Pending;
        };
        // A run that panicked is over: not one to hand to a task on drop.
        let out = match catch_unwind(AssertUnwindSafe(|| run.as_mut().poll(cx))) {
            Ok(out) => out,
            Err(panic) => {
                self.run = None;
                resume_unwind(panic);
            }
        };
        if out.is_ready() {
            self.run = None;
        }
        out
    }
}

impl<F> Drop for ToEnd<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        let Some(run) = self.run.take() else {
            return;
        };
        // Without a runtime (it is shutting down) nothing could run it on.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            debug!("caller gone; the run goes on on its own task");
            let counted = self
                .client
                .as_ref()
                .and_then(Weak::upgrade)
                .map(|shared| InFlight::new(&shared));
            rt.spawn(async move {
                let _counted = counted;
                let _ = run.await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_dropped_run_still_ends_and_an_awaited_one_ends_in_place() {
        let ended = Arc::new(AtomicBool::new(false));
        let flag = ended.clone();
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let run = ToEnd::new(async move {
            let _ = wait.await;
            flag.store(true, Ordering::SeqCst);
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(20), run)
                .await
                .is_err()
        );
        assert!(!ended.load(Ordering::SeqCst));
        go.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while !ended.load(Ordering::SeqCst) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the dropped run ended on its own task");
        assert_eq!(ToEnd::new(async { 7 }).await, 7);
    }

    #[tokio::test]
    async fn a_run_that_panicked_is_not_run_again_on_drop() {
        static POLLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let run = ToEnd::new(async {
            POLLS.fetch_add(1, Ordering::SeqCst);
            panic!("a bug in the run");
        });
        let joined = tokio::spawn(run).await;
        assert!(joined.unwrap_err().is_panic());
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(POLLS.load(Ordering::SeqCst), 1);
    }
}
