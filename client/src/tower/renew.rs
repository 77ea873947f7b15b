//! Keeps the tower subscriptions of every covered channel alive, whether
//! the channel sends appointments or not (DESIGN §12, client side).
//!
//! A tower drops a user, and its appointments, once its subscription has
//! been expired for a while (`reclaim_after_secs`: registration is free, so
//! nothing else gives the room back). A channel's worker renews only when
//! it sends, so an idle channel's only appointment would go, while its
//! status still said covered. One task per client renews each channel
//! identity that holds a receipt at a tower, when a quarter of the
//! subscription or 30 days are left, and once at start (the subscriptions
//! are not stored; a registration renews and tells the expiry).
//!
//! A failed renewal is retried with the client's backoff; the task runs
//! under a supervisor that restarts it after a panic, until shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use perun_channel::Address;
use perun_wallet::{Account, LocalAccount};
use tokio::time::Instant;
use tracing::{Instrument, debug, error, info_span, warn};

use super::{Held, Towers, unix_now};
use crate::core::{Shared, lock};

/// The longest the task sleeps between two passes.
const RECHECK: Duration = Duration::from_secs(60 * 60);
/// The shortest time between two passes (each registration wakes the task).
const MIN_PASS: Duration = Duration::from_secs(1);
/// Renewals in flight at once.
const AT_ONCE: usize = 8;

/// Starts the client's renewal task, if it has towers.
pub(crate) fn spawn(shared: &Arc<Shared>) {
    let Some(towers) = shared.towers.clone() else {
        return;
    };
    let span = info_span!(parent: None, "tower_renewals");
    tokio::spawn(supervise(shared.clone(), towers).instrument(span));
}

async fn supervise(shared: Arc<Shared>, towers: Arc<Towers>) {
    let mut restarts = 0u32;
    loop {
        let run = std::panic::AssertUnwindSafe(run(&shared, &towers)).catch_unwind();
        tokio::select! {
            res = run => match res {
                Ok(()) => break,
                Err(_) => {
                    restarts += 1;
                    let pause = shared.timeouts.backoff(restarts);
                    error!(restarts, ?pause, "tower renewal task panicked; restarting it");
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = shared.stopping() => break,
                    }
                }
            },
            () = shared.stopping() => break,
        }
    }
    debug!("tower renewal task ended");
}

/// A renewal that failed: attempts in a row, and when to try again (unix s).
type Failing = HashMap<(usize, Address), (u32, u64)>;

async fn run(shared: &Arc<Shared>, towers: &Arc<Towers>) {
    let mut failing = Failing::new();
    let mut last: Option<Instant> = None;
    loop {
        if let Some(last) = last {
            tokio::select! {
                () = tokio::time::sleep_until(last + MIN_PASS) => {}
                () = shared.stopping() => return,
            }
        }
        last = Some(Instant::now());
        let next = pass(shared, towers, &mut failing).await;
        let wait = Duration::from_secs(next.saturating_sub(unix_now())).min(RECHECK);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = towers.renewals.notified() => {}
            () = shared.stopping() => return,
        }
    }
}

/// Renews every subscription that is due; returns when the next one is
/// (unix seconds).
async fn pass(shared: &Shared, towers: &Towers, failing: &mut Failing) -> u64 {
    let now = unix_now();
    let mut next = now.saturating_add(RECHECK.as_secs());
    let mut due = Vec::new();
    for (i, user) in covered(towers) {
        let held = towers.links[i]
            .subs
            .lock()
            .await
            .get(&user.address())
            .map(Held::renew_at);
        // Not known (a restart): renew now, which also tells the expiry.
        let mut at = held.unwrap_or(now);
        if let Some((_, retry_at)) = failing.get(&(i, user.address())) {
            at = *retry_at;
        }
        if at <= now {
            due.push((i, user));
        } else {
            next = next.min(at);
        }
    }
    let results: Vec<_> = futures::stream::iter(due)
        .map(|(i, user)| async move {
            let r = towers.links[i]
                .ensure_registered(user.as_ref(), false)
                .await;
            (i, user.address(), r)
        })
        .buffer_unordered(AT_ONCE)
        .collect()
        .await;
    for (i, user, r) in results {
        let tower = towers.links[i].client.tower();
        match r {
            Ok(()) => {
                failing.remove(&(i, user));
                debug!(%tower, %user, "tower subscription renewed");
                if let Some(h) = towers.links[i].subs.lock().await.get(&user) {
                    next = next.min(h.renew_at());
                }
            }
            Err(e) => {
                let n = failing.get(&(i, user)).map_or(0, |f| f.0) + 1;
                let pause = shared.timeouts.backoff(n);
                let at = unix_now().saturating_add(pause.as_secs().max(1));
                warn!(%tower, %user, attempt = n, ?pause, error = %e, "renewing a tower subscription failed; retrying");
                failing.insert((i, user), (n, at));
                next = next.min(at);
            }
        }
    }
    // Channels gone (withdrawn) take their failures with them.
    if !failing.is_empty() {
        let live: std::collections::HashSet<(usize, Address)> = covered(towers)
            .into_iter()
            .map(|(i, u)| (i, u.address()))
            .collect();
        failing.retain(|k, _| live.contains(k));
    }
    next
}

/// Each channel identity with a receipt at a configured tower, with that
/// tower's index.
fn covered(towers: &Towers) -> Vec<(usize, Arc<LocalAccount>)> {
    let entries: Vec<_> = lock(&towers.channels).values().cloned().collect();
    let mut out = Vec::new();
    for e in entries {
        let (identity, at): (Option<[u8; 32]>, Vec<usize>) = {
            let r = lock(&e.record);
            let at = towers
                .links
                .iter()
                .enumerate()
                .filter(|(_, l)| r.receipt(l.client.tower()).is_some())
                .map(|(i, _)| i)
                .collect();
            (r.identity, at)
        };
        let Some(key) = identity.filter(|_| !at.is_empty()) else {
            continue;
        };
        let Ok(user) = LocalAccount::from_bytes(&key) else {
            continue;
        };
        let user = Arc::new(user);
        out.extend(at.into_iter().map(|i| (i, user.clone())));
    }
    out
}
