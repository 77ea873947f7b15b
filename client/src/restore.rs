//! Restore on start: every persisted channel rebuilt in its phase, its
//! watcher started at once, a `Sync` with its peers, and an interrupted
//! funding finished.

use std::sync::Arc;

use perun_channel::Phase;
use perun_wire::PeerId;
use tracing::{debug, info, warn};

use crate::core::{ChannelCore, Shared};
use crate::{DamagedRecord, Result};

/// What a restore found: the channels rebuilt, and the records it could
/// not use.
pub(crate) struct Restored {
    pub(crate) channels: Vec<Arc<ChannelCore>>,
    pub(crate) damaged: Vec<DamagedRecord>,
}

/// Rebuilds every persisted channel. A record that fails its checks (a
/// damaged file, a tampered state) is left alone, never half-loaded, and
/// reported in [`Restored::damaged`] (the application must hear of it: a
/// channel with money at stake is unwatched); the others are restored. A
/// withdrawn channel left in the store by an older build is pruned.
pub(crate) async fn restore(shared: &Arc<Shared>) -> Result<Restored> {
    let mut damaged = Vec::new();
    // Fast path: every record in one read, checked on every core.
    let records = match shared.persister.load_all().await {
        Ok(records) => records,
        // One bad record fails the whole read: load one by one instead, so
        // it does not keep the others from loading.
        Err(e) => {
            warn!(error = %e, "loading all channels failed; loading them one by one");
            let (records, bad) = load_one_by_one(shared).await?;
            damaged = bad;
            // A damage the one-by-one loads cannot see (a state stored
            // without its channel) is still reported.
            if let Some(id) = e.channel()
                && !damaged.iter().any(|d: &DamagedRecord| d.id == id)
                && !records.iter().any(|r| r.id() == id)
            {
                damaged.push(DamagedRecord {
                    id,
                    error: Arc::new(e.into()),
                });
            }
            records
        }
    };
    let mut channels = Vec::with_capacity(records.len());
    for rec in records {
        let id = rec.id();
        // Nothing at stake: withdrawn, or version 0 never complete here (no
        // deposit of ours comes before it is, and nothing would go on with
        // an opening after a restart).
        if matches!(
            rec.phase,
            Phase::Withdrawn | Phase::Proposing | Phase::Signing0
        ) {
            prune(shared, id, rec.phase).await;
            continue;
        }
        if let Some(towers) = &shared.towers {
            towers.restore(id, &rec.metadata);
        }
        match build_core(rec) {
            Ok(core) => {
                debug!(channel = %core.id, phase = ?core.phase(), "restored channel");
                shared.insert_channel(core.clone());
                channels.push(core);
            }
            Err(e) => {
                warn!(channel = %id, error = %e, "stored channel failed its checks; not loaded");
                damaged.push(DamagedRecord {
                    id,
                    error: Arc::new(e),
                });
            }
        }
    }
    info!(
        channels = channels.len(),
        damaged = damaged.len(),
        "restored channels"
    );
    Ok(Restored { channels, damaged })
}

/// Removes the record of a channel with nothing at stake: a withdrawn one
/// (written by a build that kept them) or one whose opening never got to
/// funding. A store that keeps them grows, and slows every restore, forever.
async fn prune(shared: &Shared, id: perun_channel::ChannelId, phase: Phase) {
    match shared.persister.channel_removed(id).await {
        Ok(()) | Err(perun_persistence::Error::UnknownChannel(_)) => {
            debug!(channel = %id, ?phase, "pruned a channel with nothing at stake");
        }
        Err(e) => {
            warn!(channel = %id, ?phase, error = %e, "could not prune a channel with nothing at stake")
        }
    }
}

/// Every stored record that passes its checks, loaded one by one (many at
/// once, so the checks spread over the cores), and the ones that do not.
async fn load_one_by_one(
    shared: &Arc<Shared>,
) -> Result<(Vec<perun_persistence::ChannelRecord>, Vec<DamagedRecord>)> {
    use futures::StreamExt;
    let ids = shared.persister.channel_ids().await?;
    let loads = futures::stream::iter(ids)
        .map(|id| async move { (id, shared.persister.load(id).await) })
        .buffer_unordered(64);
    let mut records = Vec::new();
    let mut damaged = Vec::new();
    let mut loads = std::pin::pin!(loads);
    while let Some((id, res)) = loads.next().await {
        match res {
            Ok(Some(rec)) => records.push(rec),
            // Removed meanwhile.
            Ok(None) => {}
            Err(e) => {
                warn!(channel = %id, error = %e, "stored channel failed its checks; not loaded");
                damaged.push(DamagedRecord {
                    id,
                    error: Arc::new(e.into()),
                });
            }
        }
    }
    damaged.sort_by_key(|d| d.id);
    Ok((records, damaged))
}

/// A stored record as a `ChannelCore` (its signatures are checked again;
/// the wallet's memo makes that cheap right after a load).
fn build_core(
    rec: perun_persistence::ChannelRecord,
) -> std::result::Result<Arc<ChannelCore>, crate::Error> {
    let peers = rec
        .peers
        .iter()
        .enumerate()
        .map(|(index, b)| PeerId::from_bytes(b).map_err(|_| crate::Error::StoredPeerId { index }))
        .collect::<std::result::Result<Vec<PeerId>, _>>()?;
    let machine = rec.to_machine()?;
    let core = ChannelCore::new(machine, peers, rec.burnt)?;
    core.resume_forced_move();
    Ok(core)
}

/// Picks a restored channel up where it was: its watcher for every funded
/// phase (at once: it has its own concurrency limit), a `Sync` with the
/// peers for an open channel, and the rest of the opening protocol for one
/// that was funding.
pub(crate) fn resume(shared: &Arc<Shared>, core: Arc<ChannelCore>) {
    use perun_channel::Phase::*;
    let phase = core.phase();
    if phase.is_funded() && phase != Withdrawn {
        crate::watcher::spawn(shared, &core);
        crate::tower::spawn(shared, &core);
    }
    if matches!(phase, Active | Updating) {
        core.synced.send_replace(false);
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        let res = match phase {
            Active | Updating => {
                let _permit = shared.resume_permits.clone().acquire_owned().await;
                let res = crate::sync::sync_with_peers(&shared, &core).await;
                core.synced.send_replace(true);
                res
            }
            Funding => crate::open::resume_funding(&shared, core.clone())
                .await
                .map(|_| ()),
            // Closing phases: the watcher drives them to the end.
            _ => Ok(()),
        };
        if let Err(e) = res {
            warn!(channel = %core.id, error = %e, "resuming the channel failed");
        }
    });
}
