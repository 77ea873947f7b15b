//! Follows every two-party channel's fully signed states and turns each
//! growth of our balance into an incoming payment: booked against the
//! expected payments, then broadcast.
//!
//! Every fully signed state the channel stores is published on its
//! updates stream, a peer's commit that rode along with our next write
//! included; each is compared with the one before it, so a payment to us
//! followed at once by one of ours back is seen as two payments, not
//! netted. A follower that falls more than the stream's buffer behind
//! compares the latest state with the last one it saw (logged): the sum
//! is still right, only such a netted pair is lost.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use perun_channel::{Address, ChannelId, Phase, SignedState};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{Instrument, debug, info_span, warn};

use super::{IncomingPayment, Inner, gains};
use crate::core::{ChannelCore, ChannelNews, lock};

/// Which channels carry payments: two-party ones without an app.
pub(super) fn carries_payments(core: &ChannelCore) -> bool {
    core.peers.len() == 2 && core.params.app == Address::ZERO
}

/// Runs until the `Payments` (every clone) is dropped or the client stops.
/// `news` tells of each channel to follow with its baseline, taken when
/// the channel was inserted (or when `Payments` was made), not when this
/// task gets to run: a payment that lands before is still booked.
pub(super) async fn track(
    inner: Weak<Inner>,
    mut news: mpsc::UnboundedReceiver<ChannelNews>,
    stopped: watch::Receiver<()>,
) {
    let Some(shared) = inner.upgrade().map(|i| i.shared.clone()) else {
        return;
    };
    // Dropping a channel's sender (it left the client: a proposal that
    // failed) ends its follower.
    let mut followed: HashMap<ChannelId, oneshot::Sender<()>> = HashMap::new();
    loop {
        let mut stop = stopped.clone();
        let item = tokio::select! {
            n = news.recv() => match n {
                Some(n) => n,
                None => return,
            },
            _ = stop.changed() => return,
            _ = shared.stopping() => return,
        };
        match item {
            ChannelNews::Added {
                core,
                states,
                baseline,
            } => {
                let (gone_tx, gone) = oneshot::channel();
                // Removed and inserted again: a new follower (the old one ended).
                followed.insert(core.id, gone_tx);
                let span = info_span!("payments_follow", channel = %core.id);
                let follower = Follower {
                    inner: inner.clone(),
                    core,
                    states,
                    last: baseline,
                };
                tokio::spawn(follower.run(stopped.clone(), gone).instrument(span));
            }
            ChannelNews::Removed(id) => {
                followed.remove(&id);
            }
        }
    }
}

/// One channel's follower: books each fully signed state over `last`.
struct Follower {
    inner: Weak<Inner>,
    core: Arc<ChannelCore>,
    states: broadcast::Receiver<SignedState>,
    last: SignedState,
}

impl Follower {
    /// Runs until the channel is withdrawn or leaves the client, or the
    /// `Payments` is dropped.
    async fn run(mut self, mut stopped: watch::Receiver<()>, mut gone: oneshot::Receiver<()>) {
        let core = self.core.clone();
        let mut phases = core.phase_changes();
        let mut dropped = core.dropped.subscribe();
        loop {
            let now = tokio::select! {
                // States waiting are booked before a withdrawal ends us.
                biased;
                r = self.states.recv() => match r {
                    Ok(st) => st,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        warn!(channel = %core.id, skipped = n, "payments follower lags; comparing with the latest state");
                        core.state.borrow().clone()
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                Ok(()) = dropped.changed() => {
                    // An update was dropped: what it brought is not
                    // coming (a commit that comes after all is booked when
                    // it does).
                    let Some(inner) = self.inner.upgrade() else {
                        return;
                    };
                    let version = *dropped.borrow_and_update();
                    lock(&inner.books).dead(core.id, version);
                    continue;
                }
                _ = phases.wait_for(|p| *p == Phase::Withdrawn) => return,
                _ = stopped.changed() => return,
                _ = &mut gone => return,
            };
            let Some(inner) = self.inner.upgrade() else {
                return;
            };
            if now.state.version <= self.last.state.version || !now.is_fully_signed() {
                continue;
            }
            book(&inner, &core, &self.last, &now);
            self.last = now;
        }
    }
}

impl Drop for Follower {
    /// A channel no longer followed books nothing more: what the handler
    /// let in on it claims no expectation.
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            lock(&inner.books).booked(self.core.id, u64::MAX);
        }
    }
}

/// Books what `now` pays us over `last`, and settles what the handler
/// let in up to its version, in one hold of the books' lock: the handler
/// never sees a payment both booked and still claimed, or neither.
fn book(inner: &Inner, core: &ChannelCore, last: &SignedState, now: &SignedState) {
    let me = core.index;
    let peer = core.peers[1 - me];
    // States of one channel keep their shape (the transition rule).
    let arrived: Vec<_> = gains(&last.state.outcome, &now.state.outcome, me).collect();
    {
        let mut books = lock(&inner.books);
        for (asset, amount) in &arrived {
            books.arrived(peer, asset, *amount, (core.id, now.state.version));
        }
        books.booked(core.id, now.state.version);
    }
    for (asset, amount) in arrived {
        debug!(%peer, %amount, version = now.state.version, "payment arrived");
        let _ = inner.incoming.send(IncomingPayment {
            peer,
            channel: core.id,
            asset: asset.clone(),
            amount,
            version: now.state.version,
        });
    }
}
