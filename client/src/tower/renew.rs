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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use perun_channel::{Address, ChannelId};
use perun_persistence::Change;
use perun_wallet::{Account, LocalAccount};
use tokio::time::Instant;
use tracing::{Instrument, debug, error, info_span, warn};

use super::{Held, Towers, unix_now};
use crate::Error;
use crate::core::{Shared, lock};
use crate::event::ChannelEvent;

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

/// One channel identity with a receipt at one tower.
#[derive(Clone)]
struct Covered {
    channel: ChannelId,
    user: Arc<LocalAccount>,
    /// The version the tower's receipt covers.
    version: u64,
    /// Its subscription is known (not right after a start).
    known: bool,
}

/// What a check found.
enum Found {
    /// The subscription runs until after its next renewal time.
    Fine,
    /// The tower holds no appointment of the identity any more.
    Lost,
}

/// Renews every subscription that is due; returns when the next one is
/// (unix seconds).
async fn pass(shared: &Shared, towers: &Towers, failing: &mut Failing) -> u64 {
    let now = unix_now();
    let mut next = now.saturating_add(RECHECK.as_secs());
    let mut due: Vec<Vec<Covered>> = vec![Vec::new(); towers.links.len()];
    let mut live = HashSet::new();
    for (i, mut c) in covered(towers) {
        let addr = c.user.address();
        live.insert((i, addr));
        let held = towers.links[i].subs.lock().await.get(&addr).copied();
        c.known = held.is_some();
        let at = match failing.get(&(i, addr)) {
            Some((_, retry_at)) => *retry_at,
            // Not known (right after a start): look now.
            None => held.map_or(now, |h| h.renew_at()),
        };
        if at <= now {
            due[i].push(c);
        } else {
            next = next.min(at);
        }
    }
    // Channels gone (withdrawn) take their failures with them.
    failing.retain(|k, _| live.contains(k));
    // Each tower on its own: a hung one holds up only its own renewals.
    let results = futures::future::join_all(
        due.into_iter()
            .enumerate()
            .map(|(i, due)| at_tower(towers, i, due)),
    )
    .await;
    for (i, results) in results.into_iter().enumerate() {
        let tower = towers.links[i].client.tower();
        for (c, r) in results {
            let addr = c.user.address();
            match r {
                Ok(Found::Fine) => {
                    failing.remove(&(i, addr));
                    if let Some(h) = towers.links[i].subs.lock().await.get(&addr) {
                        next = next.min(h.renew_at());
                    }
                }
                Ok(Found::Lost) => {
                    failing.remove(&(i, addr));
                    lost(shared, towers, i, &c).await;
                }
                Err(error) => {
                    let n = failing.get(&(i, addr)).map_or(0, |f| f.0) + 1;
                    // Clocks that disagree by more than a subscription do
                    // not agree sooner for asking often.
                    let delay = if matches!(*error, Error::TowerExpiryPast { .. }) {
                        RECHECK
                    } else {
                        shared.timeouts.backoff(n)
                    };
                    let at = unix_now().saturating_add(delay.as_secs().max(1));
                    failing.insert((i, addr), (n, at));
                    next = next.min(at);
                    warn!(%tower, user = %addr, attempt = n, ?delay, %error, "renewing a tower subscription failed; retrying");
                    if let Some(core) = shared.channel_core(&c.channel) {
                        core.emit(ChannelEvent::TowerFailed {
                            tower,
                            version: c.version,
                            attempt: n,
                            delay,
                            error,
                        });
                    }
                }
            }
        }
    }
    next
}

/// Checks (and renews) the due identities at tower `i`, [`AT_ONCE`] at a
/// time; once a whole group fails, the rest wait for the next try with
/// the same error (a tower down or hung is not asked 10,000 times).
async fn at_tower(
    towers: &Towers,
    i: usize,
    due: Vec<Covered>,
) -> Vec<(Covered, Result<Found, Arc<Error>>)> {
    let link = &towers.links[i];
    let tower = link.client.tower();
    let mut out = Vec::with_capacity(due.len());
    let mut down: Option<Arc<Error>> = None;
    for group in due.chunks(AT_ONCE) {
        if let Some(e) = &down {
            out.extend(group.iter().map(|c| (c.clone(), Err(e.clone()))));
            continue;
        }
        let results = futures::future::join_all(group.iter().map(|c| async move {
            let r = check(link, c).await.map_err(|e| match e {
                Checked::Tower(source) => Arc::new(Error::Tower {
                    tower,
                    source: Arc::new(source),
                }),
                Checked::Past { expiry } => Arc::new(Error::TowerExpiryPast {
                    tower,
                    expiry,
                    now: unix_now(),
                }),
            });
            (c.clone(), r)
        }))
        .await;
        if results.iter().all(|(_, r)| r.is_err()) {
            down = results.last().and_then(|(_, r)| r.as_ref().err().cloned());
        }
        out.extend(results);
    }
    out
}

/// Why a check failed.
enum Checked {
    Tower(perun_watchtower::Error),
    /// The tower renewed only until a time already past here.
    Past {
        expiry: u64,
    },
}

/// Whether the tower still holds the identity's appointment, renewing its
/// subscription if due. Right after a start it reads the subscription
/// first (a read at the tower, not a write) and renews only if that is due.
/// One identity holds one appointment, so `slots_used` 0 means the tower
/// holds none: it dropped the identity (reclaimed) or lost its store.
async fn check(link: &super::Link, c: &Covered) -> Result<Found, Checked> {
    let user = c.user.as_ref();
    if !c.known {
        match link.client.get_subscription_info(user).await {
            Ok(sub) if sub.slots_used == 0 => return Ok(Found::Lost),
            Ok(sub) => {
                let held = Held::new(sub);
                link.subs.lock().await.insert(user.address(), held);
                if unix_now() < held.renew_at() {
                    return Ok(Found::Fine);
                }
            }
            Err(e) if super::needs_registration(&e) => return Ok(Found::Lost),
            Err(e) => return Err(Checked::Tower(e)),
        }
    }
    let held = link.register(user).await.map_err(Checked::Tower)?;
    if held.sub.slots_used == 0 {
        return Ok(Found::Lost);
    }
    if unix_now() >= held.renew_at() {
        return Err(Checked::Past {
            expiry: held.sub.expiry,
        });
    }
    Ok(Found::Fine)
}

/// Tower `i` no longer holds `c`'s appointment: its receipt is dropped (the
/// status stops saying covered, and is stored so), the channel is told,
/// and its worker sends the latest state again.
async fn lost(shared: &Shared, towers: &Towers, i: usize, c: &Covered) {
    let tower = towers.links[i].client.tower();
    let Some(entry) = lock(&towers.channels).get(&c.channel).cloned() else {
        return;
    };
    warn!(%tower, channel = %c.channel, version = c.version, "the tower no longer holds the channel's appointment; sending it again");
    let bytes = {
        let mut r = lock(&entry.record);
        r.receipts.retain(|x| x.tower != tower);
        r.encode()
    };
    // Best effort: the worker stores the record again with the new receipt.
    let stored = match bytes {
        Ok(b) => shared
            .persister
            .update(c.channel, vec![Change::Metadata(b)])
            .await
            .map_err(Error::from),
        Err(e) => Err(Error::from(e)),
    };
    if let Err(e) = stored {
        warn!(%tower, channel = %c.channel, error = %e, "could not store the dropped receipt");
    }
    if let Some(core) = shared.channel_core(&c.channel) {
        core.emit(ChannelEvent::TowerFailed {
            tower,
            version: c.version,
            attempt: 1,
            delay: Duration::ZERO,
            error: Arc::new(Error::TowerLostAppointment { tower }),
        });
    }
    entry.wake.notify_one();
}

/// Each channel identity with a receipt at a configured tower, with that
/// tower's index.
fn covered(towers: &Towers) -> Vec<(usize, Covered)> {
    let entries: Vec<_> = lock(&towers.channels)
        .iter()
        .map(|(id, e)| (*id, e.clone()))
        .collect();
    let mut out = Vec::new();
    for (channel, e) in entries {
        let (identity, at): (Option<[u8; 32]>, Vec<(usize, u64)>) = {
            let r = lock(&e.record);
            let at = towers
                .links
                .iter()
                .enumerate()
                .filter_map(|(i, l)| r.receipt(l.client.tower()).map(|x| (i, x.version)))
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
        out.extend(at.into_iter().map(|(i, version)| {
            (
                i,
                Covered {
                    channel,
                    user: user.clone(),
                    version,
                    known: false,
                },
            )
        }));
    }
    out
}
