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
    /// While set, `Registered` and `Progressed` events are lost.
    pub lose_dispute_events: Arc<AtomicBool>,
    /// While set, new subscriptions deliver nothing and never end (a
    /// silent connection).
    pub stall_new_streams: AtomicBool,
    /// The stalled streams' sinks, kept so those streams never end.
    stalled: std::sync::Mutex<Vec<perun::adjudicator::EventSink>>,
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
            lose_dispute_events: Arc::new(AtomicBool::new(false)),
            stall_new_streams: AtomicBool::new(false),
            stalled: std::sync::Mutex::new(Vec::new()),
            cut: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// `opts` with the party's adjudicator wrapped in a `Flaky`, and a slot
    /// that holds the wrapper once the party is built.
    pub fn wrapping(
        opts: super::Options,
    ) -> (super::Options, Arc<std::sync::Mutex<Option<Arc<Flaky>>>>) {
        let slot = Arc::new(std::sync::Mutex::new(None));
        let keep = slot.clone();
        let opts = super::Options {
            wrap_adjudicator: Some(Box::new(move |inner| {
                let f = Flaky::new(inner);
                *keep.lock().unwrap() = Some(f.clone());
                f as Arc<dyn Adjudicator>
            })),
            ..opts
        };
        (opts, slot)
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
        self.subscriptions.fetch_add(1, Ordering::SeqCst);
        let (sink, stream) = EventStream::pair();
        if self.stall_new_streams.load(Ordering::SeqCst) {
            self.injected.fetch_add(1, Ordering::SeqCst);
            self.stalled.lock().unwrap().push(sink);
            return Ok(stream);
        }
        let mut events = self.inner.subscribe(id).await?;
        let end_after_history = self.take(&self.end_streams);
        let cut = self.cut.clone();
        let lose = self.lose_dispute_events.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    ev = events.next() => {
                        let Some(ev) = ev else { break };
                        let caught_up = matches!(ev, Ok(AdjudicatorEvent::CaughtUp { .. }));
                        let lost = lose.load(Ordering::SeqCst)
                            && matches!(
                                ev,
                                Ok(AdjudicatorEvent::Registered { .. }
                                    | AdjudicatorEvent::Progressed { .. })
                            );
                        if (!lost && !sink.send(ev)) || (caught_up && end_after_history) {
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
