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

use perun_channel::{Address, Phase, SignedState};
use tokio::sync::{broadcast, oneshot, watch};
use tracing::{Instrument, debug, info_span, warn};

use super::{IncomingPayment, Inner, held_by};
use crate::core::{ChannelCore, lock};

/// Runs until the `Payments` (every clone) is dropped or the client stops.
pub(super) async fn track(inner: Weak<Inner>, stopped: watch::Receiver<()>) {
    let Some(shared) = inner.upgrade().map(|i| i.shared.clone()) else {
        return;
    };
    let mut changed = shared.channels_changed.subscribe();
    // Dropping a channel's sender (it left the client: withdrawn, or a
    // proposal that failed) ends its follower.
    let mut followed: HashMap<_, oneshot::Sender<()>> = HashMap::new();
    loop {
        let cores = shared.channel_cores();
        followed.retain(|id, _| cores.iter().any(|c| c.id == *id));
        for core in cores {
            if core.peers.len() == 2
                && core.params.app == Address::ZERO
                && !followed.contains_key(&core.id)
            {
                let (gone_tx, gone) = oneshot::channel();
                followed.insert(core.id, gone_tx);
                let span = info_span!("payments_follow", channel = %core.id);
                tokio::spawn(follow(inner.clone(), core, stopped.clone(), gone).instrument(span));
            }
        }
        let mut stop = stopped.clone();
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            _ = stop.changed() => return,
            _ = shared.stopping() => return,
        }
    }
}

/// Follows one channel until it is withdrawn or leaves the client, or the
/// `Payments` is dropped.
async fn follow(
    inner: Weak<Inner>,
    core: Arc<ChannelCore>,
    mut stopped: watch::Receiver<()>,
    mut gone: oneshot::Receiver<()>,
) {
    // Subscribed before the first read: nothing published in between is lost.
    let mut states = core.subscribe_updates();
    let mut phases = core.phase_changes();
    let mut last = core.state.borrow().clone();
    loop {
        let now = tokio::select! {
            r = states.recv() => match r {
                Ok(st) => st,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    warn!(channel = %core.id, skipped = n, "payments follower lags; comparing with the latest state");
                    core.state.borrow().clone()
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = phases.wait_for(|p| *p == Phase::Withdrawn) => return,
            _ = stopped.changed() => return,
            _ = &mut gone => return,
        };
        let Some(inner) = inner.upgrade() else { return };
        if now.state.version <= last.state.version || !now.is_fully_signed() {
            continue;
        }
        book(&inner, &core, &last, &now);
        last = now;
    }
}

/// Books what `now` pays us over `last`.
fn book(inner: &Inner, core: &ChannelCore, last: &SignedState, now: &SignedState) {
    let me = core.index;
    let peer = core.peers[1 - me];
    for (i, asset) in now.state.outcome.assets.iter().enumerate() {
        // States of one channel keep their shape (the transition rule).
        let amount =
            held_by(&now.state.outcome, i, me).saturating_sub(held_by(&last.state.outcome, i, me));
        if amount.is_zero() {
            continue;
        }
        debug!(%peer, %amount, version = now.state.version, "payment arrived");
        lock(&inner.books).arrived(peer, asset, amount);
        let _ = inner.incoming.send(IncomingPayment {
            peer,
            channel: core.id,
            asset: asset.clone(),
            amount,
            version: now.state.version,
        });
    }
}
