//! Restore and sync (issue 7, §4): a restarted client rebuilds its channels
//! from its store, and a `Sync` with the peer completes a half-done update
//! on both sides. Against `SimLedger` (shared in-memory store) and against
//! anvil (redb file closed and reopened).

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

mod common;

use std::sync::Arc;

use std::time::Duration;

use async_trait::async_trait;
use common::{Ledger, Options, introduce, open, parties, restart};
use perun::adjudicator::{Funder, FundingRequest};
use perun::channel::{ChannelId, Phase, U256};
use perun::persistence::{Change, ChannelRecord, Persister};

on_both_ledgers!(
    restart_restores_channels,
    a_failed_commit_burns_its_version,
    a_responder_whose_store_fails_a_final_state_goes_on,
    a_burnt_version_survives_the_proposers_restart,
    a_responder_restarted_after_its_deposit_goes_on_funding,
    one_bad_record_does_not_keep_the_others_from_loading,
    withdrawn_channels_leave_the_store,
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
    // Both directions work with the restarted client. Alice's first
    // request may still meet Bob's old connection, if she has not seen it
    // close yet: that fails `ConnectionClosed`, and the retry reaches the
    // new Bob.
    let failed = pay_once_reconnected(&chans[0], 1, u(10)).await;
    assert!(failed <= 1, "{failed} payments failed after the restart");
    restored.pay(0, 0, u(5)).await.unwrap();
    let st = common::caught_up(&[restored.clone(), chans[0].clone()]).await;
    // A failed attempt burns its version (Bob may have signed it).
    assert_eq!(st.state.version, 5 + failed);
    let bal = &st.state.outcome.balances[0];
    let was = &before.state.outcome.balances[0];
    assert_eq!((bal[0], bal[1]), (was[0] - u(5), was[1] + u(5)));
    restored.settle().await.unwrap();
    chans[0].settle().await.unwrap();
}

/// Pays, retrying while the failure is transient (the connection closed
/// under the request; at most 5 times); returns how many attempts failed.
async fn pay_once_reconnected(ch: &perun::client::Channel, to: usize, amount: U256) -> u64 {
    for failed in 0..5 {
        match ch.pay(to, 0, amount).await {
            Ok(_) => return failed,
            Err(e) if e.is_transient() => {
                eprintln!("retrying a payment after the restart: {e}");
                // A pause as an application's retry would take: the client
                // has no event for "the old connection is gone" to wait on.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("payment after the restart failed: {e}"),
        }
    }
    panic!("no payment went through after the restart");
}

/// A write of a fully signed state: with it failing, the update's
/// proposer "crashes" after its peer signed, before it did.
fn commits(cs: &[Change]) -> bool {
    cs.iter().any(|c| matches!(c, Change::Committed(_)))
}

/// A write of a responder's signature on a final state.
fn signs_final(cs: &[Change]) -> bool {
    cs.iter()
        .any(|c| matches!(c, Change::Staged(s) if s.state.isFinal))
}

async fn a_failed_commit_burns_its_version(ledger: Ledger) {
    let (alice_opts, failures) = common::failing_writes(commits);
    let mut ps = vec![
        common::party(&ledger, u(1_000_000), &alice_opts).await,
        common::party(&ledger, u(1_000_000), &Options::default()).await,
    ];
    introduce(&ps).await;
    let chans = open(&ledger, &mut ps, u(1000)).await;
    chans[0].pay(1, 0, u(10)).await.unwrap();

    failures.arm(1);
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

/// Bob's store fails the write of his signature on a final state Alice
/// proposes: he refuses it, and nothing of it stays with him (his
/// signature was on a copy, and only a stored one counts). Both go on
/// updating, and the final state can be signed after all.
async fn a_responder_whose_store_fails_a_final_state_goes_on(ledger: Ledger) {
    let (bob_opts, failures) = common::failing_writes(signs_final);
    let mut ps = vec![
        common::party(&ledger, u(1_000_000), &Options::default()).await,
        common::party(&ledger, u(1_000_000), &bob_opts).await,
    ];
    introduce(&ps).await;
    let chans = open(&ledger, &mut ps, u(1000)).await;
    chans[0].pay(1, 0, u(10)).await.unwrap();

    failures.arm(1);
    let err = chans[0].update(|s| s.isFinal = true).await.unwrap_err();
    assert!(
        matches!(err, perun::client::Error::Rejected { index: 1, .. }),
        "{err}"
    );
    assert_eq!(failures.injected(), 1, "Bob's write was tried");
    assert_eq!(chans[1].phase(), Phase::Active);
    // Both directions still go through: Bob did not count the final state
    // as signed.
    chans[0].pay(1, 0, u(20)).await.unwrap();
    chans[1].pay(0, 0, u(5)).await.unwrap();
    let fin = chans[0].update(|s| s.isFinal = true).await.unwrap();
    assert!(fin.state.isFinal);
    let st = common::caught_up(&chans).await;
    assert_eq!(st.state.outcome.balances[0], vec![u(975), u(1025)]);
    chans[1]
        .wait_for_phase(Phase::Final, Duration::from_secs(30))
        .await
        .expect("Bob holds the final state");
}

/// Issue 13, client 3: Alice's update fails after Bob signed it (her store
/// fails the commit); she aborts, Bob drops it, and the version is burnt.
/// Alice restarts. Bob's `Sync` cannot tell her about the version (he
/// holds nothing staged any more), and he refuses to sign that version
/// again: before the burnt version was stored, every payment of Alice's
/// answered `Conflict` (5 of 5). Now all five go through, past it.
async fn a_burnt_version_survives_the_proposers_restart(ledger: Ledger) {
    let (alice_opts, failures) = common::failing_writes(commits);
    let mut ps = vec![
        common::party(&ledger, u(1_000_000), &alice_opts).await,
        common::party(&ledger, u(1_000_000), &Options::default()).await,
    ];
    introduce(&ps).await;
    let chans = open(&ledger, &mut ps, u(1000)).await;
    chans[0].pay(1, 0, u(10)).await.unwrap();
    failures.arm(1);
    let err = chans[0].pay(1, 0, u(20)).await.unwrap_err();
    assert!(matches!(err, perun::client::Error::Persistence(_)), "{err}");
    assert_eq!(chans[1].state().state.version, 1);
    assert_eq!(chans[1].phase(), Phase::Active, "Bob dropped version 2");
    let id = chans[0].id();
    let bob_ch = chans[1].clone();
    drop(chans); // Alice's old `Channel` would keep her old client (and store) alive.

    let alice = ps.remove(0);
    ps.insert(0, restart(&ledger, alice).await);
    introduce(&ps).await;
    let alice_ch = ps[0].client.channel(&id).expect("channel restored");
    let mut versions = Vec::new();
    for _ in 0..5 {
        let st = alice_ch
            .pay(1, 0, u(1))
            .await
            .expect("no payment of the restarted proposer conflicts");
        versions.push(st.state.version);
    }
    assert_eq!(versions, vec![3, 4, 5, 6, 7], "version 2 stays burnt");
    let st = common::caught_up(&[alice_ch.clone(), bob_ch.clone()]).await;
    assert_eq!(st.state.outcome.balances[0], vec![u(985), u(1015)]);
    st.verify_all(alice_ch.params()).unwrap();
}

/// Calls the party's own funder only once the test opens the gate.
struct GatedFunder {
    inner: Arc<dyn Funder>,
    open: tokio::sync::watch::Receiver<bool>,
}

#[async_trait]
impl Funder for GatedFunder {
    async fn fund(&self, req: FundingRequest) -> perun::adjudicator::Result<()> {
        let mut open = self.open.clone();
        let _ = open.wait_for(|o| *o).await;
        self.inner.fund(req).await
    }

    fn supports(&self, asset: &perun::channel::Asset) -> bool {
        self.inner.supports(asset)
    }
}

/// Issue 13, client 4: in a 3-party channel Bob (a responder) deposits and
/// is restarted before Alice and Carol deposit. The version-0 commit he got
/// from Alice is stored with the phase `Funding` (it used to be stored
/// without it, so Bob came back in `Signing0` and never funded, watched or
/// settled): restored, he goes on funding, the channel becomes active on
/// all three, updates, and settles with every balance exact.
async fn a_responder_restarted_after_its_deposit_goes_on_funding(ledger: Ledger) {
    const MINT: u64 = 1_000_000;
    const EACH: u64 = 100;
    let (gate, open) = tokio::sync::watch::channel(false);
    let mut ps = Vec::new();
    for gated in [true, false, true] {
        let account = ledger.account(u(MINT)).await;
        let mut opts = Options::default();
        if gated {
            let (inner, _) = ledger.backends(&account).await;
            opts.funder = Some(Arc::new(GatedFunder {
                inner,
                open: open.clone(),
            }));
        }
        ps.push(common::party_with_account(&ledger, account, &opts).await);
    }
    introduce(&ps).await;
    let prop = common::proposal(&ledger, &ps, u(EACH));
    let alice = ps[0].client.clone();
    let opening = tokio::spawn(async move { alice.propose_channel(prop).await });

    // Bob's deposit lands; Alice's and Carol's wait at the gate.
    let bob_addr = ps[1].client.address();
    tokio::time::timeout(common::WAIT, async {
        while ledger.balance(bob_addr).await != u(MINT - EACH) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("Bob deposits");
    let bob = ps.remove(1);
    ps.insert(1, restart(&ledger, bob).await);
    introduce(&ps).await;
    let bob_ch = {
        let chans = ps[1].client.channels();
        assert_eq!(chans.len(), 1, "Bob restored the channel");
        chans[0].clone()
    };
    assert_eq!(
        bob_ch.phase(),
        Phase::Funding,
        "restored in a phase that funds"
    );

    gate.send_replace(true);
    let alice_ch = opening.await.unwrap().expect("the channel opens");
    let carol_ch = ps[2].accepted().await;
    bob_ch
        .wait_for_phase(Phase::Active, common::WAIT)
        .await
        .expect("Bob's restored channel becomes active");
    let chans = [alice_ch, bob_ch, carol_ch];
    chans[0].pay(1, 0, u(10)).await.unwrap();
    chans[1].pay(2, 0, u(20)).await.unwrap();
    chans[2].pay(0, 0, u(5)).await.unwrap();
    let st = common::caught_up(&chans).await;
    assert_eq!(st.state.outcome.balances[0], vec![u(95), u(90), u(115)]);
    for c in &chans {
        c.settle().await.unwrap();
        assert_eq!(c.phase(), Phase::Withdrawn);
    }
    let fin = chans[0].state().state;
    assert!(fin.isFinal);
    for (i, p) in ps.iter().enumerate() {
        assert_eq!(
            ledger.balance(p.client.address()).await,
            u(MINT - EACH) + fin.outcome.balances[0][i],
            "participant {i} holds what the final state gives it"
        );
    }
}

/// Issue 13, client 7: a withdrawn channel's record leaves the store, so
/// neither the store nor the restore grows with every channel ever closed.
/// After three settled channels both stores are empty, and a restarted
/// client restores nothing.
async fn withdrawn_channels_leave_the_store(ledger: Ledger) {
    let mut ps = parties(&ledger, 2, u(1_000_000), &Options::default()).await;
    for round in 0..3u64 {
        let chans = open(&ledger, &mut ps, u(100)).await;
        chans[0].pay(1, 0, u(1 + round)).await.unwrap();
        common::caught_up(&chans).await;
        for c in &chans {
            c.settle().await.unwrap();
            assert_eq!(c.phase(), Phase::Withdrawn);
        }
        // The settled channel's handle still answers in this process.
        assert!(chans[0].state().state.isFinal);
    }
    for p in &ps {
        assert!(p.persister.channel_ids().await.unwrap().is_empty());
        assert!(p.persister.load_all().await.unwrap().is_empty());
    }
    let alice = ps.remove(0);
    let alice = restart(&ledger, alice).await;
    assert!(alice.client.channels().is_empty(), "nothing to restore");
    assert!(alice.client.damaged_records().is_empty());
    assert!(alice.persister.channel_ids().await.unwrap().is_empty());
}

/// As a record with a bad signature on disk fails its checks.
fn damaged() -> perun::persistence::RecordDefect {
    perun::persistence::RecordDefect::Check(Box::new(perun::persistence::Error::Corrupt {
        id: None,
        reason: "damaged on disk".into(),
    }))
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
                defect: damaged(),
            });
        }
        self.inner.load(id).await
    }
    async fn load_all(&self) -> perun::persistence::Result<Vec<ChannelRecord>> {
        match self.bad() {
            Some(id) => Err(perun::persistence::Error::InvalidRecord {
                id,
                defect: damaged(),
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

/// Issue 13, client 7: a record damaged on disk (one flipped byte in Alice's
/// real redb file) is reported to the application, typed and naming the
/// channel, not only logged: in `Client::damaged_records()`, or as the
/// error of `build()` if the application asks for that. The sound channel
/// is restored either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_record_is_reported_to_the_application() {
    use perun::client::{Client, DamagedRecord, Error};
    use redb::ReadableTable;
    const CURRENT: redb::TableDefinition<&[u8; 32], &[u8]> =
        redb::TableDefinition::new("perun_current");

    let ledger = Ledger::anvil().await;
    let mut ps = parties(&ledger, 2, u(1_000_000), &Options::default()).await;
    let damaged = open(&ledger, &mut ps, u(100)).await[0].id();
    let chans = open(&ledger, &mut ps, u(100)).await;
    chans[0].pay(1, 0, u(1)).await.unwrap();
    let good = common::caught_up(&chans).await;
    let sound = chans[0].id();
    drop(chans); // Alice's `Channel` would keep her client (and store) alive.

    let common::Party {
        client,
        account,
        key,
        persister,
        dir,
        ..
    } = ps.remove(0);
    client.shutdown().await;
    drop((client, persister));
    let path = dir.as_ref().unwrap().path().join("perun.redb");
    // The old client's tasks let go of the file as they see the shutdown.
    let db = tokio::time::timeout(common::WAIT, async {
        loop {
            match redb::Database::create(&path) {
                Ok(db) => return db,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("the store is released");
    let txn = db.begin_write().unwrap();
    {
        let mut table = txn.open_table(CURRENT).unwrap();
        let mut bytes = table.get(&damaged.0).unwrap().unwrap().value().to_vec();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        table.insert(&damaged.0, bytes.as_slice()).unwrap();
    }
    txn.commit().unwrap();
    drop(db);

    let build = |refuse: bool| {
        let (ledger, account, key, path) = (&ledger, account.clone(), key.clone(), path.clone());
        async move {
            let (funder, adjudicator) = ledger.backends(&account).await;
            // A refused client lets go of the file as its tasks end.
            let store = loop {
                match perun::persistence::RedbPersister::open(&path).await {
                    Ok(s) => break s,
                    Err(perun::persistence::Error::AlreadyOpen) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => panic!("reopen store: {e}"),
                }
            };
            let mut b = Client::builder()
                .account(account)
                .network_key(key)
                .funder(funder)
                .adjudicator(adjudicator)
                .persister(Arc::new(store))
                .timeouts(common::test_timeouts(Duration::from_secs(30)));
            if refuse {
                b = b.refuse_damaged_records();
            }
            b.build().await
        }
    };
    let is_damage = |d: &DamagedRecord| {
        d.id == damaged
            && matches!(
                &*d.error,
                Error::Persistence(perun::persistence::Error::Corrupt { id: Some(id), .. })
                    if *id == damaged
            )
    };

    // Asked to, `build()` refuses to start, naming the damaged channel.
    match build(true).await {
        Err(Error::DamagedRecords(list)) => {
            assert_eq!(list.len(), 1, "{list:?}");
            assert!(is_damage(&list[0]), "{list:?}");
        }
        other => panic!("expected DamagedRecords, got {other:?}"),
    }
    // By default it starts with the sound channel and lists the damaged one.
    let alice = tokio::time::timeout(common::WAIT, build(false))
        .await
        .expect("the client starts in time")
        .expect("the client starts");
    assert_eq!(alice.damaged_records().len(), 1);
    assert!(is_damage(&alice.damaged_records()[0]));
    assert!(alice.channel(&damaged).is_none(), "never half-loaded");
    let restored = alice
        .channel(&sound)
        .expect("the sound channel is restored");
    assert_eq!(restored.state(), good);
    alice.shutdown().await;
}
