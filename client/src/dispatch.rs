//! Hands each incoming request to its protocol, under the caps of
//! [`Limits`](crate::Limits): one task per request, at most
//! `tasks_per_peer` of them per peer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use perun_wire::{Incoming, Message, PeerId, Refusal, RefusalCode};
use tracing::warn;

use crate::Error;
use crate::core::{Shared, lock};

/// Serves peers' requests until the endpoint stops or the client is gone.
pub(crate) async fn dispatch(shared: Weak<Shared>, mut incoming: Incoming) {
    while let Some(req) = incoming.next().await {
        let Some(shared) = shared.upgrade() else {
            break;
        };
        let (peer, msg, responder) = req.into_parts();
        if let Message::ProposalReject(r) = msg {
            // Answered at once, no task.
            crate::open::handle_abort(&shared, peer, r, responder);
            continue;
        }
        let pass = match shared.tasks.enter(peer) {
            Ok(pass) => pass,
            Err(e) => {
                let _ = responder.refuse(Refusal::new(RefusalCode::Busy, e.to_string()));
                continue;
            }
        };
        match msg {
            Message::Proposal(p) => {
                spawn(
                    pass,
                    crate::open::handle_proposal(shared, peer, p, responder),
                );
            }
            Message::Signing0(s) => {
                spawn(
                    pass,
                    crate::open::handle_signing0(shared, peer, s, responder),
                );
            }
            Message::Update(u) => {
                spawn(
                    pass,
                    crate::update::handle_update(shared, peer, u, responder),
                );
            }
            Message::UpdateWithCommit(m) => {
                spawn(
                    pass,
                    crate::update::handle_update_with_commit(shared, peer, m, responder),
                );
            }
            Message::UpdateCommit(c) => {
                spawn(
                    pass,
                    crate::update::handle_commit(shared, peer, c, responder),
                );
            }
            Message::UpdateReject(r) => {
                spawn(
                    pass,
                    crate::update::handle_abort(shared, peer, r, responder),
                );
            }
            Message::Sync(s) => {
                spawn(pass, crate::sync::handle_sync(shared, peer, s, responder));
            }
            other => {
                warn_limited!(%peer, kind = other.kind(), "not a request");
                let _ = responder.refuse(Refusal::new(RefusalCode::NotARequest, "not a request"));
            }
        }
    }
}

/// Whether a rate-limited log line may go out now: at most one a second
/// per call site (`last`: milliseconds since the first call, + 1).
pub(crate) fn log_now(last: &AtomicU64) -> bool {
    static START: OnceLock<Instant> = OnceLock::new();
    let now = u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    let prev = last.load(Ordering::Relaxed);
    (prev == 0 || now.saturating_sub(prev) >= 1000)
        && last
            .compare_exchange(prev, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// `warn!` for bad remote input: at most one line a second per call site,
/// so a flood of it cannot flood the log.
macro_rules! warn_limited {
    ($($arg:tt)*) => {{
        static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        if $crate::dispatch::log_now(&LAST) {
            tracing::warn!($($arg)*);
        }
    }};
}
pub(crate) use warn_limited;

/// Runs `fut` on its own task, which holds `pass` until it ends.
fn spawn(pass: Pass, fut: impl Future<Output = ()> + Send + 'static) {
    // The handlers' futures are 1-4 KB: boxed once here, the task moves a
    // pointer instead of copying the future on each hand-over (the
    // 100-channel run completed about 2 % more updates, BENCHMARKS.md).
    let fut = Box::pin(fut);
    tokio::spawn(async move {
        let _pass = pass;
        fut.await;
    });
}

/// Counts what peers hold (tasks, pending proposals), per peer and in all,
/// and refuses more than its caps.
#[derive(Debug)]
pub(crate) struct Gate {
    what: &'static str,
    per_peer: usize,
    total: usize,
    state: Mutex<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    total: usize,
    per_peer: HashMap<PeerId, usize>,
    /// When a refusal was last logged, and how many were not logged since.
    logged: Option<Instant>,
    skipped: u64,
}

impl Gate {
    /// A gate for `what`, with at most `per_peer` held per peer and `total`
    /// in all.
    pub(crate) fn new(what: &'static str, per_peer: usize, total: usize) -> Arc<Self> {
        Arc::new(Self {
            what,
            per_peer,
            total,
            state: Mutex::new(GateState::default()),
        })
    }

    /// One more for `peer`, or [`Error::Busy`] (logged at most once a
    /// second) if a cap is full.
    pub(crate) fn enter(self: &Arc<Self>, peer: PeerId) -> Result<Pass, Error> {
        let mut st = lock(&self.state);
        let held = st.per_peer.get(&peer).copied().unwrap_or(0);
        let full = if held >= self.per_peer {
            Some(self.per_peer)
        } else if st.total >= self.total {
            Some(self.total)
        } else {
            None
        };
        if let Some(limit) = full {
            let err = Error::Busy {
                what: self.what,
                limit,
            };
            let now = Instant::now();
            if st
                .logged
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
            {
                let skipped = std::mem::take(&mut st.skipped);
                st.logged = Some(now);
                warn!(%peer, error = %err, skipped, "refusing peer input");
            } else {
                st.skipped += 1;
            }
            return Err(err);
        }
        *st.per_peer.entry(peer).or_default() += 1;
        st.total += 1;
        Ok(Pass {
            gate: self.clone(),
            peer,
        })
    }

    /// How many `peer` holds now.
    #[cfg(test)]
    pub(crate) fn held(&self, peer: &PeerId) -> usize {
        lock(&self.state).per_peer.get(peer).copied().unwrap_or(0)
    }
}

/// One place in a [`Gate`], given back on drop.
#[derive(Debug)]
pub(crate) struct Pass {
    gate: Arc<Gate>,
    peer: PeerId,
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut st = lock(&self.gate.state);
        st.total = st.total.saturating_sub(1);
        if let Some(n) = st.per_peer.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.per_peer.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_caps_per_peer_and_in_all() {
        let gate = Gate::new("things", 2, 3);
        let (a, b) = (PeerId::random(), PeerId::random());
        let a1 = gate.enter(a).unwrap();
        let _a2 = gate.enter(a).unwrap();
        assert!(matches!(
            gate.enter(a),
            Err(Error::Busy {
                what: "things",
                limit: 2
            })
        ));
        let _b1 = gate.enter(b).unwrap();
        assert!(matches!(gate.enter(b), Err(Error::Busy { limit: 3, .. })));
        drop(a1);
        assert_eq!(gate.held(&a), 1);
        let _b2 = gate.enter(b).unwrap();
    }
}
