//! Hands each incoming request to its protocol.

use std::sync::Weak;

use perun_wire::{Incoming, Message, Refusal, RefusalCode};
use tracing::warn;

use crate::core::Shared;

/// Serves peers' requests until the endpoint stops or the client is gone.
pub(crate) async fn dispatch(shared: Weak<Shared>, mut incoming: Incoming) {
    while let Some(req) = incoming.next().await {
        let Some(shared) = shared.upgrade() else {
            break;
        };
        let (peer, msg, responder) = req.into_parts();
        match msg {
            Message::Proposal(p) => {
                tokio::spawn(crate::open::handle_proposal(shared, peer, p, responder));
            }
            Message::ProposalReject(r) => crate::open::handle_abort(&shared, peer, r, responder),
            Message::Signing0(s) => {
                tokio::spawn(crate::open::handle_signing0(shared, peer, s, responder));
            }
            Message::Update(u) => {
                tokio::spawn(crate::update::handle_update(shared, peer, u, responder));
            }
            Message::UpdateCommit(c) => {
                tokio::spawn(crate::update::handle_commit(shared, peer, c, responder));
            }
            Message::UpdateReject(r) => {
                tokio::spawn(crate::update::handle_abort(shared, peer, r, responder));
            }
            Message::Sync(s) => {
                tokio::spawn(crate::sync::handle_sync(shared, peer, s, responder));
            }
            other => {
                warn!(%peer, ?other, "not a request");
                let _ = responder.refuse(Refusal::new(RefusalCode::NotARequest, "not a request"));
            }
        }
    }
}
