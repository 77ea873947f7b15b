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
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use futures::FutureExt;
use perun_channel::{Address, ChannelId};
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

/// Per identity at a tower: a failure (attempts in a row, and when to try
/// again, unix s), or a pause after a lost appointment (attempts 0).
type Failing = HashMap<(usize, Address), (u32, u64)>;
/// When each identity's appointment was last found lost at a tower (unix s).
type LostAt = HashMap<(usize, Address), u64>;

/// A tower found to have lost an appointment again within this is
/// believed only after it.
const LOST_GAP_SECS: u64 = 10 * 60;

async fn run(shared: &Arc<Shared>, towers: &Arc<Towers>) {
    let state = PassState::default();
    let mut last: Option<Instant> = None;
    loop {
        if let Some(last) = last {
            tokio::select! {
                () = tokio::time::sleep_until(last + MIN_PASS) => {}
                () = shared.stopping() => return,
            }
        }
        last = Some(Instant::now());
        let next = pass(shared, towers, &state).await;
        let wait = Duration::from_secs(next.saturating_sub(unix_now())).min(RECHECK);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = towers.renewals.notified() => {}
            () = shared.stopping() => return,
        }
    }
}

/// What the task keeps between passes.
#[derive(Default)]
struct PassState {
    failing: std::sync::Mutex<Failing>,
    lost_at: std::sync::Mutex<LostAt>,
}

/// One channel identity with a receipt at one tower.
#[derive(Clone)]
struct Covered {
    channel: ChannelId,
    user: Arc<LocalAccount>,
    /// The version the tower's receipt covers.
    version: u64,
    /// What the client knows of its subscription there.
    held: Option<Held>,
}

/// What a check found.
enum Found {
    /// The tower holds the appointment; the subscription runs.
    Fine,
    /// The tower holds no appointment of the identity any more.
    Lost,
}

/// Looks at (and renews) every subscription that is due; returns when the
/// next one is (unix seconds).
async fn pass(shared: &Shared, towers: &Towers, state: &PassState) -> u64 {
    let now = unix_now();
    let next = std::sync::atomic::AtomicU64::new(now.saturating_add(RECHECK.as_secs()));
    let mut due: Vec<Vec<Covered>> = vec![Vec::new(); towers.links.len()];
    let mut live = HashSet::new();
    for (i, mut c) in covered(towers) {
        let addr = c.user.address();
        live.insert((i, addr));
        c.held = towers.links[i].subs.lock().await.get(&addr).copied();
        let at = match lock(&state.failing).get(&(i, addr)) {
            Some((_, retry_at)) => *retry_at,
            // Not known (right after a start): look now.
            None => c.held.map_or(now, |h| h.due_at()),
        };
        if at <= now {
            due[i].push(c);
        } else {
            next.fetch_min(at, std::sync::atomic::Ordering::Relaxed);
        }
    }
    // Channels gone (withdrawn) take their state with them.
    lock(&state.failing).retain(|k, _| live.contains(k));
    lock(&state.lost_at).retain(|k, _| live.contains(k));
    // Each tower on its own, results handled as they come: a slow tower
    // holds up only its own channels.
    futures::future::join_all(
        due.into_iter()
            .enumerate()
            .map(|(i, due)| at_tower(shared, towers, state, &next, i, due)),
    )
    .await;
    next.into_inner()
}

/// Looks at the due identities at tower `i`, [`AT_ONCE`] at a time, and
/// acts on each group's answers; once a whole group fails, the rest wait
/// for the next try with the same error (a tower down or hung is not asked
/// 10,000 times).
async fn at_tower(
    shared: &Shared,
    towers: &Towers,
    state: &PassState,
    next: &std::sync::atomic::AtomicU64,
    i: usize,
    due: Vec<Covered>,
) {
    let link = &towers.links[i];
    let tower = link.client.tower();
    let mut down: Option<Arc<Error>> = None;
    for group in due.chunks(AT_ONCE) {
        let results: Vec<(&Covered, Result<Found, Arc<Error>>)> = match &down {
            Some(e) => group.iter().map(|c| (c, Err(e.clone()))).collect(),
            None => {
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
                    (c, r)
                }))
                .await;
                if results.iter().all(|(_, r)| r.is_err()) {
                    down = results.last().and_then(|(_, r)| r.as_ref().err().cloned());
                }
                results
            }
        };
        for (c, r) in results {
            let key = (i, c.user.address());
            let now = unix_now();
            match r {
                Ok(Found::Fine) => {
                    lock(&state.failing).remove(&key);
                    if let Some(h) = link.subs.lock().await.get(&key.1) {
                        next.fetch_min(h.due_at(), Relaxed);
                    }
                }
                Ok(Found::Lost) => {
                    let gap_over = lock(&state.lost_at)
                        .get(&key)
                        .map(|at| at.saturating_add(LOST_GAP_SECS));
                    if let Some(at) = gap_over.filter(|at| now < *at) {
                        // Believed once the gap is over, not at once.
                        lock(&state.failing).insert(key, (0, at));
                        next.fetch_min(at, Relaxed);
                        continue;
                    }
                    lock(&state.failing).remove(&key);
                    lock(&state.lost_at).insert(key, now);
                    lost(shared, towers, i, c).await;
                    // Look again when due: the resent state should be there.
                    if let Some(h) = link.subs.lock().await.get(&key.1) {
                        next.fetch_min(h.due_at(), Relaxed);
                    }
                }
                Err(error) => {
                    let n = lock(&state.failing).get(&key).map_or(0, |f| f.0) + 1;
                    // Clocks that disagree by more than a subscription do
                    // not agree sooner for asking often.
                    let delay = if matches!(*error, Error::TowerExpiryPast { .. }) {
                        RECHECK
                    } else {
                        shared.timeouts.backoff(n)
                    };
                    let at = now.saturating_add(delay.as_secs().max(1));
                    lock(&state.failing).insert(key, (n, at));
                    next.fetch_min(at, Relaxed);
                    warn!(%tower, user = %key.1, attempt = n, ?delay, %error, "renewing a tower subscription failed; retrying");
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
/// subscription if due. Unless a renewal is due by what the client knows,
/// it reads the subscription first (a read at the tower, not a write).
/// One identity holds one appointment, so `slots_used` 0 means the tower
/// holds none: it dropped the identity (reclaimed) or lost its store.
async fn check(link: &super::Link, c: &Covered) -> Result<Found, Checked> {
    let user = c.user.as_ref();
    let renew_due = c.held.is_some_and(|h| unix_now() >= h.renew_at());
    if !renew_due {
        match link.client.get_subscription_info(user).await {
            Ok(sub) if sub.slots_used == 0 => return Ok(Found::Lost),
            Ok(sub) => {
                let held = {
                    let mut subs = link.subs.lock().await;
                    let held = Held::read(sub, subs.get(&user.address()));
                    subs.insert(user.address(), held);
                    held
                };
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
/// status stops saying covered; the worker stores it so), the channel is
/// told, and its worker sends the latest state again.
async fn lost(shared: &Shared, towers: &Towers, i: usize, c: &Covered) {
    let tower = towers.links[i].client.tower();
    let Some(entry) = lock(&towers.channels).get(&c.channel).cloned() else {
        return;
    };
    warn!(%tower, channel = %c.channel, version = c.version, "the tower no longer holds the channel's appointment; sending it again");
    lock(&entry.record).receipts.retain(|x| x.tower != tower);
    // The worker stores the record (it alone writes it, so two copies
    // never race to the store) and sends the state again.
    entry
        .unsaved
        .store(true, std::sync::atomic::Ordering::SeqCst);
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
                    held: None,
                },
            )
        }));
    }
    out
}
