//! An adjudicator that misbehaves on command, for targeted fault tests
//! (the seeded chaos runs use `perun::adjudicator::testing::FaultyChain`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use async_trait::async_trait;
use perun::adjudicator::{
    Adjudicator, AdjudicatorEvent, Dispute, Error, EventStream, Result, RpcFailure, SignedChannel,
    WithdrawRequest,
};
use perun::channel::ChannelId;

/// Wraps an adjudicator; each counter says how many of the next calls fail.
pub struct Flaky {
    inner: Arc<dyn Adjudicator>,
    /// `register` calls that fail (transiently) before reaching the chain.
    pub fail_registers: AtomicU32,
    /// Subscriptions whose stream ends right after `CaughtUp` (a dropped
    /// node connection that the backend could not hide).
    pub end_streams: AtomicU32,
    /// `dispute` reads that panic (a bug in a backend).
    pub panic_disputes: AtomicU32,
    /// While set, every `dispute` read takes a second (a slow node).
    pub slow_disputes: AtomicBool,
    /// How many faults were injected so far.
    pub injected: AtomicU32,
    /// How many subscriptions were made.
    pub subscriptions: AtomicU32,
    /// Ends every open stream when notified ([`Flaky::end_open_streams`]).
    cut: Arc<tokio::sync::Notify>,
}

impl Flaky {
    pub fn new(inner: Arc<dyn Adjudicator>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            fail_registers: AtomicU32::new(0),
            end_streams: AtomicU32::new(0),
            panic_disputes: AtomicU32::new(0),
            slow_disputes: AtomicBool::new(false),
            injected: AtomicU32::new(0),
            subscriptions: AtomicU32::new(0),
            cut: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// Ends every stream open now, as a lost node connection would.
    pub fn end_open_streams(&self) {
        self.injected.fetch_add(1, Ordering::SeqCst);
        self.cut.notify_waiters();
    }

    /// Takes one from `counter` if it is positive.
    fn take(&self, counter: &AtomicU32) -> bool {
        let took = counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if took {
            self.injected.fetch_add(1, Ordering::SeqCst);
        }
        took
    }
}

#[async_trait]
impl Adjudicator for Flaky {
    fn domain(&self) -> perun_channel::Domain {
        self.inner.domain()
    }

    async fn register(&self, req: &SignedChannel) -> Result<()> {
        if self.take(&self.fail_registers) {
            return Err(Error::rpc("register", RpcFailure::Injected(1)));
        }
        self.inner.register(req).await
    }
    async fn progress(&self, req: &perun::adjudicator::ProgressRequest) -> Result<()> {
        self.inner.progress(req).await
    }

    async fn conclude(&self, req: &SignedChannel) -> Result<()> {
        self.inner.conclude(req).await
    }

    async fn withdraw(&self, req: &WithdrawRequest) -> Result<()> {
        self.inner.withdraw(req).await
    }

    async fn subscribe(&self, id: ChannelId) -> Result<EventStream> {
        let mut events = self.inner.subscribe(id).await?;
        self.subscriptions.fetch_add(1, Ordering::SeqCst);
        let end_after_history = self.take(&self.end_streams);
        let (sink, stream) = EventStream::pair();
        let cut = self.cut.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    ev = events.next() => {
                        let Some(ev) = ev else { break };
                        let caught_up = matches!(ev, Ok(AdjudicatorEvent::CaughtUp { .. }));
                        if !sink.send(ev) || (caught_up && end_after_history) {
                            break;
                        }
                    }
                    () = cut.notified() => break,
                }
            }
            // Dropping the sink ends the stream.
        });
        Ok(stream)
    }

    async fn dispute(&self, id: ChannelId) -> Result<Option<Dispute>> {
        if self.take(&self.panic_disputes) {
            panic!("injected panic in dispute()");
        }
        if self.slow_disputes.load(Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        self.inner.dispute(id).await
    }
}
