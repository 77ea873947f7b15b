//! Restore and sync (issue 7, §4): a restarted client rebuilds its channels
//! from its store, and a `Sync` with the peer completes a half-done update
//! on both sides. Against `SimLedger` (shared in-memory store) and against
//! anvil (redb file closed and reopened).

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::{Ledger, Options, introduce, open, parties, restart};
use perun::channel::{ChannelId, Phase, U256};
use perun::persistence::{Change, ChannelRecord, Persister};

on_both_ledgers!(
    restart_restores_channels,
    a_failed_commit_burns_its_version,
    one_bad_record_does_not_keep_the_others_from_loading,
);

fn u(x: u64) -> U256 {
    U256::from(x)
}

async fn restart_restores_channels(ledger: Ledger) {
    let mut ps = parties(&ledger, 2, u(1_000_000), &Options::default()).await;
    let chans = open(&ledger, &mut ps, u(1000)).await;
    for _ in 0..3 {
        chans[0].pay(1, 0, u(10)).await.unwrap();
    }
    // Bob has stored the last commit too (it reaches him just after `pay`).
    let before = common::caught_up(&chans).await;
    let alice_ch = chans[0].clone();
    drop(chans); // Bob's old `Channel` would keep his old client (and store) alive.
    let chans = [alice_ch];
    let bob = ps.remove(1);
    ps.push(restart(&ledger, bob).await);
    introduce(&ps).await;
    let restored = ps[1]
        .client
        .channel(&chans[0].id())
        .expect("channel restored");
    assert_eq!(restored.state(), before);
    assert_eq!(restored.phase(), Phase::Active);
    // Both directions work with the restarted client.
    chans[0].pay(1, 0, u(10)).await.unwrap();
    restored.pay(0, 0, u(5)).await.unwrap();
    let st = common::caught_up(&[restored.clone(), chans[0].clone()]).await;
    assert_eq!(st.state.version, 5);
    restored.settle().await.unwrap();
    chans[0].settle().await.unwrap();
}

/// A store that fails the next write of a fully signed state once armed:
/// the update's proposer "crashes" after its peer signed, before it did.
struct FailNextCommit {
    inner: Arc<dyn Persister>,
    armed: Arc<AtomicBool>,
}

#[async_trait]
impl Persister for FailNextCommit {
    async fn channel_created(&self, ch: &ChannelRecord) -> perun::persistence::Result<()> {
        self.inner.channel_created(ch).await
    }
    async fn update(&self, id: ChannelId, changes: Vec<Change>) -> perun::persistence::Result<()> {
        let commits = changes.iter().any(|c| matches!(c, Change::Committed(_)));
        if commits && self.armed.swap(false, Ordering::SeqCst) {
            return Err(perun::persistence::Error::Storage(
                "injected failure".into(),
            ));
        }
        self.inner.update(id, changes).await
    }
    async fn channel_removed(&self, id: ChannelId) -> perun::persistence::Result<()> {
        self.inner.channel_removed(id).await
    }
    async fn channel_ids(&self) -> perun::persistence::Result<Vec<ChannelId>> {
        self.inner.channel_ids().await
    }
    async fn load(&self, id: ChannelId) -> perun::persistence::Result<Option<ChannelRecord>> {
        self.inner.load(id).await
    }
    async fn load_all(&self) -> perun::persistence::Result<Vec<ChannelRecord>> {
        self.inner.load_all().await
    }
}

async fn a_failed_commit_burns_its_version(ledger: Ledger) {
    let armed = Arc::new(AtomicBool::new(false));
    let alice_opts = Options {
        wrap_persister: Some(Box::new({
            let armed = armed.clone();
            move |inner| {
                Arc::new(FailNextCommit {
                    inner,
                    armed: armed.clone(),
                }) as Arc<dyn Persister>
            }
        })),
        ..Options::default()
    };
    let mut ps = vec![
        common::party(&ledger, u(1_000_000), &alice_opts).await,
        common::party(&ledger, u(1_000_000), &Options::default()).await,
    ];
    introduce(&ps).await;
    let chans = open(&ledger, &mut ps, u(1000)).await;
    chans[0].pay(1, 0, u(10)).await.unwrap();

    armed.store(true, Ordering::SeqCst);
    let err = chans[0].pay(1, 0, u(20)).await.unwrap_err();
    assert!(matches!(err, perun::client::Error::Persistence(_)), "{err}");
    // Alice stays on version 1. Bob had signed version 2; Alice's abort made
    // him drop it, and version 2 is burnt: nobody signs it again.
    assert_eq!(chans[0].state().state.version, 1);
    assert_eq!(chans[0].phase(), Phase::Active);
    assert_eq!(chans[1].state().state.version, 1);
    assert_eq!(chans[1].phase(), Phase::Active);
    let alice_ch = chans[0].clone();
    drop(chans); // Bob's old `Channel` would keep his old client (and store) alive.
    let chans = [alice_ch];

    // Bob restarts with his signed version 2 still on disk (his record of
    // what he signed); his Sync with Alice shows she does not hold it.
    let bob = ps.remove(1);
    ps.push(restart(&ledger, bob).await);
    introduce(&ps).await;
    let bob_ch = ps[1].client.channel(&chans[0].id()).unwrap();
    bob_ch
        .wait_for_phase(Phase::Active, Duration::from_secs(30))
        .await
        .expect("Bob drops the aborted update after his sync");
    // The channel goes on past the burnt version, in both directions.
    let v3 = chans[0].pay(1, 0, u(20)).await.unwrap();
    assert_eq!(v3.state.version, 3);
    bob_ch.pay(0, 0, u(1)).await.unwrap();
    let both = [chans[0].clone(), bob_ch.clone()];
    let st = common::caught_up(&both).await;
    assert_eq!(st.state.version, 4);
    assert_eq!(st.state.outcome.balances[0], vec![u(971), u(1029)]);
    st.verify_all(bob_ch.params()).unwrap();
}

/// A store in which one channel's record fails its checks on load (as a
/// damaged record does): `load_all` fails as a whole, `load` of that one
/// channel fails, everything else works.
struct OneBadRecord {
    inner: Arc<dyn Persister>,
    bad: std::sync::Mutex<Option<ChannelId>>,
}

impl OneBadRecord {
    fn bad(&self) -> Option<ChannelId> {
        *self.bad.lock().unwrap()
    }
}

#[async_trait]
impl Persister for OneBadRecord {
    async fn channel_created(&self, ch: &ChannelRecord) -> perun::persistence::Result<()> {
        self.inner.channel_created(ch).await
    }
    async fn update(&self, id: ChannelId, changes: Vec<Change>) -> perun::persistence::Result<()> {
        self.inner.update(id, changes).await
    }
    async fn channel_removed(&self, id: ChannelId) -> perun::persistence::Result<()> {
        self.inner.channel_removed(id).await
    }
    async fn channel_ids(&self) -> perun::persistence::Result<Vec<ChannelId>> {
        self.inner.channel_ids().await
    }
    async fn load(&self, id: ChannelId) -> perun::persistence::Result<Option<ChannelRecord>> {
        if self.bad() == Some(id) {
            return Err(perun::persistence::Error::InvalidRecord {
                id,
                reason: "damaged on disk".into(),
            });
        }
        self.inner.load(id).await
    }
    async fn load_all(&self) -> perun::persistence::Result<Vec<ChannelRecord>> {
        match self.bad() {
            Some(id) => Err(perun::persistence::Error::InvalidRecord {
                id,
                reason: "damaged on disk".into(),
            }),
            None => self.inner.load_all().await,
        }
    }
}

async fn one_bad_record_does_not_keep_the_others_from_loading(ledger: Ledger) {
    let mut ps = parties(&ledger, 2, u(1_000_000), &Options::default()).await;
    let first = open(&ledger, &mut ps, u(100)).await;
    let second = open(&ledger, &mut ps, u(100)).await;
    second[0].pay(1, 0, u(1)).await.unwrap();
    let good = common::caught_up(&second).await;
    let (first, second) = (first[0].clone(), second[0].clone());
    // Alice restarts on a store that cannot read her first channel.
    let alice = ps.remove(0);
    let wrapped = Arc::new(OneBadRecord {
        inner: alice.persister.clone(),
        bad: std::sync::Mutex::new(Some(first.id())),
    });
    let alice = common::restart_with(&ledger, alice, wrapped).await;
    assert!(alice.client.channel(&first.id()).is_none());
    let restored = alice
        .client
        .channel(&second.id())
        .expect("the good channel");
    assert_eq!(restored.state(), good);
}
