//! The faulty event stream: a task between the backend's stream and the
//! caller's that loses, repeats, reorders, delays events or ends the stream.
//!
//! [`CaughtUp`](AdjudicatorEvent::CaughtUp) is a barrier: it is never lost,
//! repeated or reordered (it may be delayed or replaced by a stream end),
//! and an event held back for reordering goes out before it, so "history,
//! then `CaughtUp`, then live" still holds for what is delivered.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tracing::debug;

use super::{EventPlan, Shared, bump, injected};
use crate::types::{EventSender, OpenStreams, event_channel};
use crate::{AdjudicatorEvent, EventStream};

/// Wraps `inner`, the stream opened by call `number`, in a task that applies
/// the schedule; the task ends with either side.
pub(super) fn faulty(shared: Arc<Shared>, number: u64, inner: EventStream) -> EventStream {
    let open = Arc::new(OpenStreams::default());
    let (tx, rx) = event_channel(Some(open.clone()));
    open.opened();
    tokio::spawn(async move {
        tokio::select! {
            () = pump(&shared, number, inner, &tx) => {}
            () = closed(&open) => debug!(stream = number, "faulty stream dropped by its reader"),
        }
    });
    rx
}

/// Resolves once the caller dropped its stream.
async fn closed(open: &OpenStreams) {
    loop {
        let changed = open.changed.notified();
        if open.open() == 0 {
            return;
        }
        changed.await;
    }
}

/// Moves events from `inner` to `tx` under the schedule until either ends.
async fn pump(shared: &Shared, number: u64, mut inner: EventStream, tx: &EventSender) {
    let stats = &shared.stats;
    let mut held: Option<AdjudicatorEvent> = None;
    let mut k = 0u64;
    while let Some(item) = inner.next().await {
        let event = match item {
            Ok(event) => event,
            Err(e) => {
                // The backend's own failure: pass it on; its stream ends after it.
                flush(&mut held, tx);
                if !tx.send(Err(e)) {
                    return;
                }
                continue;
            }
        };
        bump(&stats.events);
        let plan = if shared.enabled.load(Ordering::Acquire) {
            shared.config.event_plan(number, k)
        } else {
            EventPlan::Deliver
        };
        k += 1;
        let barrier = matches!(event, AdjudicatorEvent::CaughtUp { .. });
        let plan = match plan {
            EventPlan::Drop | EventPlan::Duplicate | EventPlan::Reorder if barrier => {
                EventPlan::Deliver
            }
            plan => plan,
        };
        let sent = match plan {
            EventPlan::End => {
                bump(&stats.streams_ended);
                debug!(stream = number, event = k - 1, "injected: stream end");
                flush(&mut held, tx);
                let _ = tx.send(Err(injected("subscribe", number)));
                return;
            }
            EventPlan::Drop => {
                bump(&stats.events_dropped);
                debug!(
                    stream = number,
                    event = k - 1,
                    ?event,
                    "injected: event lost"
                );
                true
            }
            EventPlan::Duplicate => {
                bump(&stats.events_duplicated);
                debug!(stream = number, event = k - 1, "injected: event repeated");
                tx.send(Ok(event.clone())) && deliver(event, &mut held, tx, stats)
            }
            EventPlan::Reorder if held.is_none() => {
                debug!(stream = number, event = k - 1, "injected: event held back");
                held = Some(event);
                true
            }
            EventPlan::Delay(wait) => {
                bump(&stats.events_delayed);
                debug!(
                    stream = number,
                    event = k - 1,
                    ?wait,
                    "injected: event delayed"
                );
                tokio::time::sleep(wait).await;
                deliver(event, &mut held, tx, stats)
            }
            EventPlan::Reorder | EventPlan::Deliver => deliver(event, &mut held, tx, stats),
        };
        if !sent {
            return;
        }
    }
    flush(&mut held, tx);
}

/// Sends `event`, then the one held back (a completed reorder), or the held
/// one first if `event` is the `CaughtUp` barrier. `false` if the reader is gone.
fn deliver(
    event: AdjudicatorEvent,
    held: &mut Option<AdjudicatorEvent>,
    tx: &EventSender,
    stats: &super::Counters,
) -> bool {
    if matches!(event, AdjudicatorEvent::CaughtUp { .. }) {
        flush(held, tx);
        return tx.send(Ok(event));
    }
    if !tx.send(Ok(event)) {
        return false;
    }
    match held.take() {
        Some(late) => {
            bump(&stats.events_reordered);
            tx.send(Ok(late))
        }
        None => true,
    }
}

/// Sends the event held back, if any, in its place.
fn flush(held: &mut Option<AdjudicatorEvent>, tx: &EventSender) {
    if let Some(event) = held.take() {
        let _ = tx.send(Ok(event));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::*;
    use crate::SimLedger;
    use crate::testing::{FaultConfig, FaultyChain};

    /// Dropping the faulty stream drops the backend's, so a backend that
    /// counts its streams (the Ethereum scanner) stops serving it.
    #[tokio::test]
    async fn dropping_the_stream_ends_the_inner_one() {
        let chain = FaultyChain::wrap(SimLedger::new(1), FaultConfig::none(0));
        let inner_open = Arc::new(OpenStreams::default());
        let (inner_tx, inner) = event_channel(Some(inner_open.clone()));
        inner_open.opened();
        let mut outer = faulty(chain.shared.clone(), 0, inner);
        let id = perun_channel::B256::repeat_byte(1);
        assert!(inner_tx.send(Ok(AdjudicatorEvent::CaughtUp { id, block: 7 })));
        let first = outer.next().await.unwrap().unwrap();
        assert_eq!(first, AdjudicatorEvent::CaughtUp { id, block: 7 });
        assert_eq!(inner_open.open(), 1);
        drop(outer);
        tokio::time::timeout(Duration::from_secs(10), closed(&inner_open))
            .await
            .unwrap();
        assert!(inner_tx.is_closed());
    }

    /// The backend ending its stream ends the faulty one, after what was held.
    #[tokio::test]
    async fn the_inner_end_ends_the_stream() {
        let config = FaultConfig {
            event_reorder: 1.0,
            ..FaultConfig::none(0)
        };
        let chain = FaultyChain::wrap(SimLedger::new(1), config);
        let (inner_tx, inner) = event_channel(None);
        let mut outer = faulty(chain.shared.clone(), 0, inner);
        let id = perun_channel::B256::repeat_byte(1);
        let concluded = AdjudicatorEvent::Concluded { id, version: 3 };
        assert!(inner_tx.send(Ok(concluded.clone())));
        drop(inner_tx);
        assert_eq!(outer.next().await.unwrap().unwrap(), concluded);
        assert!(outer.next().await.is_none());
    }
}
