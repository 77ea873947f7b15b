//! Restore on start: every persisted channel rebuilt in its phase, its
//! watcher started at once, a `Sync` with its peers, and an interrupted
//! funding finished.

use std::sync::Arc;

use perun_wire::PeerId;
use tracing::{debug, info, warn};

use crate::Result;
use crate::core::{ChannelCore, Shared};

/// Rebuilds every persisted channel. A record that fails its checks (a
/// damaged file, a tampered state) is reported and left alone, never
/// half-loaded; the others are restored.
pub(crate) async fn restore(shared: &Arc<Shared>) -> Result<Vec<Arc<ChannelCore>>> {
    // Fast path: every record in one read, checked on every core.
    let records = match shared.persister.load_all().await {
        Ok(records) => records,
        // One bad record fails the whole read: load one by one instead, so
        // it does not keep the others from loading.
        Err(e) => {
            warn!(error = %e, "loading all channels failed; loading them one by one");
            load_one_by_one(shared).await?
        }
    };
    let mut restored = Vec::with_capacity(records.len());
    for rec in records {
        let id = rec.id();
        match build_core(rec) {
            Ok(core) => {
                debug!(channel = %core.id, phase = ?core.phase(), "restored channel");
                shared.insert_channel(core.clone());
                restored.push(core);
            }
            Err(e) => {
                warn!(channel = %id, error = %e, "stored channel failed its checks; not loaded")
            }
        }
    }
    info!(channels = restored.len(), "restored channels");
    Ok(restored)
}

/// Every stored record that passes its checks, loaded one by one (many at
/// once, so the checks spread over the cores); the others are logged.
async fn load_one_by_one(shared: &Arc<Shared>) -> Result<Vec<perun_persistence::ChannelRecord>> {
    use futures::StreamExt;
    let ids = shared.persister.channel_ids().await?;
    let loads = futures::stream::iter(ids)
        .map(|id| async move {
            match shared.persister.load(id).await {
                Ok(rec) => rec,
                Err(e) => {
                    warn!(channel = %id, error = %e, "stored channel failed its checks; not loaded");
                    None
                }
            }
        })
        .buffer_unordered(64);
    Ok(loads.filter_map(std::future::ready).collect().await)
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
    ChannelCore::new(machine, peers)
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
