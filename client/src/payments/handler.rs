//! The update handler a [`Payments`](super::Payments) installs.

use std::sync::Weak;

use async_trait::async_trait;

use super::books::EARMARK_LIFE;
use super::{IncomingPolicy, Inner, gains};
use crate::core::lock;
use crate::handler::{IncomingUpdate, UpdateHandler, UpdateResponder};

/// Signs an incoming update only if none of our balances decreases and its
/// app data stays as it is (a payment to us, or the final update of a
/// cooperative close); with [`IncomingPolicy::OnlyExpected`], each asset's
/// increase must also be at most what is still expected from the paying
/// peer. So nothing a peer proposes can take money that is reserved.
///
/// An update it lets in claims its part of the expectations until the
/// follower books its version, so a burst of payments on one channel or
/// several cannot use one expectation twice. On channels the layer does
/// not book (more than two participants, an app) only the balance rule
/// applies.
///
/// Built by [`Payments::new`](super::Payments::new), which installs it, or
/// [`Payments::handler`](super::Payments::handler), for an application
/// handler that passes payment updates on to it.
#[derive(Debug)]
pub struct PaymentsHandler {
    inner: Weak<Inner>,
    policy: IncomingPolicy,
}

impl PaymentsHandler {
    pub(super) fn new(inner: Weak<Inner>, policy: IncomingPolicy) -> Self {
        Self { inner, policy }
    }

    /// Why the update is refused, if it is.
    fn refusal(&self, u: &IncomingUpdate) -> Option<&'static str> {
        if !u.pays_me_or_keeps() {
            return Some("update decreases my balance");
        }
        if u.next.appData != u.current.appData {
            return Some("a payment does not change app data");
        }
        if self.policy == IncomingPolicy::AnyPaymentToMe {
            return None;
        }
        let Some(inner) = self.inner.upgrade() else {
            return Some("payments layer is gone");
        };
        let Some(core) = inner.shared.channel_core(&u.channel_id()) else {
            return Some("unknown channel");
        };
        // The layer books payments on two-party payment channels only;
        // on others an expectation would never be used up.
        if core.peers.len() != 2 || core.params.app != perun_channel::Address::ZERO {
            return None;
        }
        let Some(peer) = core.peers.get(u.actor).copied() else {
            return Some("unknown actor");
        };
        let mut books = lock(&inner.books);
        let gains: Vec<_> = gains(&u.current.outcome, &u.next.outcome, u.index).collect();
        let channel = u.channel_id();
        books.proposed_on(channel, u.current.version);
        super::end_dropped_claims(&inner, &mut books);
        // An update still unbooked after this long died without a word.
        let now = std::time::Instant::now();
        let since = now.checked_sub(EARMARK_LIFE).unwrap_or(now);
        if gains
            .iter()
            .any(|(asset, grows)| *grows > books.unclaimed(peer, asset, since))
        {
            return Some("payment not expected");
        }
        // Claimed until the follower books this version (or a later one).
        for (asset, grows) in gains {
            books.earmark(channel, u.next.version, peer, asset, grows);
        }
        None
    }
}

#[async_trait]
impl UpdateHandler for PaymentsHandler {
    async fn handle_update(&self, update: IncomingUpdate, responder: UpdateResponder) {
        match self.refusal(&update) {
            None => responder.accept(),
            Some(why) => {
                tracing::warn!(channel = %update.channel_id(), actor = update.actor, why, "update refused");
                responder.reject(why);
            }
        }
    }
}
