//! One conformance suite, run against `MemoryPersister` and `RedbPersister`.
//!
//! Every test is a generic function over a [`Store`] that can open the
//! persister and "restart" it. For redb a restart drops the only handle
//! (which stops the writer thread and closes the file) and opens the file
//! again, so everything checked after a reopen was read back from disk.

mod common;

use std::sync::Arc;

use async_trait::async_trait;
use common::TestChannel;
use perun_channel::{Bytes, ChannelId, Phase, U256, limits};
use perun_persistence::{
    Change, ChannelRecord, Error, MAX_METADATA_LEN, MAX_PEER_ID_LEN, MemoryPersister, Persister,
    RedbPersister,
};

#[async_trait]
trait Store: Send {
    async fn open(&mut self) -> Arc<dyn Persister>;
    /// Drops `p`, which must be the only handle, and opens the store again.
    async fn reopen(&mut self, p: Arc<dyn Persister>) -> Arc<dyn Persister>;
}

#[derive(Default)]
struct Mem(Option<Arc<dyn Persister>>);

#[async_trait]
impl Store for Mem {
    async fn open(&mut self) -> Arc<dyn Persister> {
        self.0
            .get_or_insert_with(|| Arc::new(MemoryPersister::new()))
            .clone()
    }
    async fn reopen(&mut self, p: Arc<dyn Persister>) -> Arc<dyn Persister> {
        p
    }
}

struct Redb(tempfile::TempDir);

impl Redb {
    fn new() -> Self {
        Redb(tempfile::tempdir().expect("tempdir"))
    }
}

#[async_trait]
impl Store for Redb {
    async fn open(&mut self) -> Arc<dyn Persister> {
        Arc::new(
            RedbPersister::open(self.0.path().join("store.redb"))
                .await
                .expect("open"),
        )
    }
    async fn reopen(&mut self, p: Arc<dyn Persister>) -> Arc<dyn Persister> {
        assert_eq!(Arc::strong_count(&p), 1, "reopen needs the only handle");
        drop(p);
        self.open().await
    }
}

async fn loaded(p: &Arc<dyn Persister>, id: ChannelId) -> ChannelRecord {
    p.load(id).await.expect("load").expect("channel present")
}

/// The whole life of a channel, checked after each step and after a restart.
async fn lifecycle(mut s: impl Store) {
    let p = s.open().await;
    let ch = TestChannel::two_party(1);
    let id = ch.id();
    let rec = ch.record();
    p.channel_created(&rec).await.expect("create");
    assert_eq!(loaded(&p, id).await, rec);

    // Version 0 fully signed, moving to Funding in the same write.
    let v0 = ch.signed(0);
    p.update(
        id,
        vec![Change::Committed(v0.clone()), Change::Phase(Phase::Funding)],
    )
    .await
    .expect("commit v0");
    let r = loaded(&p, id).await;
    assert_eq!(r.current.as_ref(), Some(&v0));
    assert_eq!(r.staged, None, "commit clears the staged v0");
    assert_eq!(r.phase, Phase::Funding);

    p.phase_changed(id, Phase::Active).await.expect("active");
    let v1_partial = ch.signed_by(1, &[0]);
    p.update(
        id,
        vec![
            Change::Staged(v1_partial.clone()),
            Change::Phase(Phase::Updating),
        ],
    )
    .await
    .expect("stage v1");
    let r = loaded(&p, id).await;
    assert_eq!(r.staged.as_ref(), Some(&v1_partial));
    assert_eq!(r.current.as_ref(), Some(&v0));

    // Survives a restart mid-update, and rebuilds the machine.
    let p = s.reopen(p).await;
    let r = loaded(&p, id).await;
    assert_eq!(r.phase, Phase::Updating);
    assert_eq!(r.staged.as_ref(), Some(&v1_partial));
    let m = r.to_machine().expect("machine");
    assert_eq!(m.last_signed().map(|(v, _)| v), Some(1));

    let v1 = ch.signed(1);
    p.state_committed(id, &v1).await.expect("commit v1");
    p.phase_changed(id, Phase::Active).await.expect("active");
    p.update(id, vec![Change::Metadata(b"new meta".to_vec())])
        .await
        .expect("metadata");

    let p = s.reopen(p).await;
    let all = p.load_all().await.expect("load_all");
    assert_eq!(all.len(), 1);
    let r = &all[0];
    assert_eq!(r.current.as_ref(), Some(&v1));
    assert_eq!(r.staged, None);
    assert_eq!(r.phase, Phase::Active);
    assert_eq!(r.metadata, b"new meta");
    assert_eq!(r.peers, rec.peers);
    assert_eq!(p.channel_ids().await.expect("ids"), vec![id]);

    // Removal is durable too.
    p.channel_removed(id).await.expect("remove");
    assert!(p.load(id).await.expect("load").is_none());
    let p = s.reopen(p).await;
    assert!(p.load_all().await.expect("load_all").is_empty());
    assert!(p.channel_ids().await.expect("ids").is_empty());
}

/// Repeating any successful write is `Ok` and changes nothing.
async fn idempotent_writes(mut s: impl Store) {
    let p = s.open().await;
    let ch = TestChannel::two_party(2);
    let id = ch.id();
    let rec = ch.record();
    p.channel_created(&rec).await.expect("create");
    p.channel_created(&rec).await.expect("create again");
    let v0 = ch.signed(0);
    let v1p = ch.signed_by(1, &[0]);
    for _ in 0..2 {
        p.state_committed(id, &v0).await.expect("commit");
        p.phase_changed(id, Phase::Active).await.expect("phase");
        p.state_staged(id, &v1p).await.expect("stage");
    }
    let before = loaded(&p, id).await;
    p.state_committed(id, &v0)
        .await
        .expect("commit v0 a third time");
    assert_eq!(
        loaded(&p, id).await,
        before,
        "repeat keeps the newer staged state"
    );
    p.staged_discarded(id).await.expect("discard");
    p.staged_discarded(id).await.expect("discard again");
    let p = s.reopen(p).await;
    let r = loaded(&p, id).await;
    assert_eq!(r.staged, None);
    assert_eq!(r.current, Some(v0));

    // A different record under the same id is refused, and changes nothing.
    let mut other = rec.clone();
    other.metadata = b"other".to_vec();
    assert!(matches!(
        p.channel_created(&other).await,
        Err(Error::AlreadyExists(x)) if x == id
    ));
    assert_eq!(loaded(&p, id).await, r);
}

/// The version rules: never roll back, never two states of one version.
async fn version_rules(mut s: impl Store) {
    let p = s.open().await;
    let ch = TestChannel::two_party(3);
    let id = ch.id();
    p.channel_created(&ch.record()).await.expect("create");
    p.state_committed(id, &ch.signed(0)).await.expect("v0");
    p.state_committed(id, &ch.signed(2))
        .await
        .expect("v2 (adopted)");
    let snapshot = loaded(&p, id).await;

    let err = p
        .state_committed(id, &ch.signed(1))
        .await
        .expect_err("stale");
    common::assert_stale(&err, 2, 1);
    assert!(err.is_rejection());

    let mut conflicting = ch.state(2);
    conflicting.outcome.balances[0][0] = U256::from(1_000_000 - 3);
    conflicting.outcome.balances[0][1] = U256::from(1_000_000 + 3);
    let mut conflicting = perun_channel::SignedState::new(conflicting);
    conflicting
        .sign(&ch.params, 0, &ch.accounts[0])
        .expect("sign");
    conflicting
        .sign(&ch.params, 1, &ch.accounts[1])
        .expect("sign");
    assert!(matches!(
        p.state_committed(id, &conflicting).await,
        Err(Error::VersionConflict { version: 2, .. })
    ));

    assert!(matches!(
        p.state_staged(id, &ch.signed_by(2, &[0])).await,
        Err(Error::StaleVersion {
            stored: 2,
            got: 2,
            ..
        })
    ));
    assert!(matches!(
        p.state_committed(id, &ch.signed_by(3, &[0])).await,
        Err(Error::InvalidInput {
            source: perun_channel::Error::MissingSignature(1),
            ..
        })
    ));
    let mut wrong_slots = ch.signed(3);
    wrong_slots.sigs.push(None);
    assert!(matches!(
        p.state_committed(id, &wrong_slots).await,
        Err(Error::InvalidInput {
            source: perun_channel::Error::SignatureCount { .. },
            ..
        })
    ));
    let other = TestChannel::two_party(33);
    assert!(matches!(
        p.state_committed(id, &other.signed(3)).await,
        Err(Error::InvalidInput {
            source: perun_channel::Error::ChannelIdMismatch { .. },
            ..
        })
    ));

    // All or nothing: a good change followed by a bad one leaves nothing.
    assert!(matches!(
        p.update(
            id,
            vec![
                Change::Committed(ch.signed(3)),
                Change::Phase(Phase::Final),
                Change::Staged(ch.signed_by(3, &[0])),
            ],
        )
        .await,
        Err(Error::StaleVersion { .. })
    ));
    let p = s.reopen(p).await;
    assert_eq!(loaded(&p, id).await, snapshot, "rejections changed nothing");

    // The same single-change refusals on a warm store (the redb store plans
    // a write on its cached record, without a copy to roll back to): the
    // next good write still builds on the record as it was.
    p.state_staged(id, &ch.signed_by(3, &[0]))
        .await
        .expect("v3 staged");
    for refused in [
        Change::Staged(ch.signed_by(2, &[0])),
        Change::Committed(ch.signed(1)),
        Change::Committed(conflicting.clone()),
        Change::Committed(wrong_slots.clone()),
        Change::Committed(other.signed(3)),
        Change::Burnt(u64::MAX),
        Change::Metadata(vec![0; perun_persistence::MAX_METADATA_LEN + 1]),
    ] {
        assert!(p.update(id, vec![refused]).await.is_err());
    }
    // Several changes, the last refused: the ones before it are undone.
    assert!(
        p.update(
            id,
            vec![
                Change::Committed(ch.signed(3)),
                Change::Phase(Phase::Final),
                Change::Burnt(5),
                Change::Metadata(vec![1]),
                Change::DiscardStaged,
                Change::Staged(ch.signed_by(2, &[0])),
            ],
        )
        .await
        .is_err()
    );
    let mut refused = snapshot.clone();
    refused.staged = Some(ch.signed_by(3, &[0]));
    assert_eq!(loaded(&p, id).await, refused, "refusals changed nothing");
    // Good writes that depend on the staged state being there (a commit
    // clears it): a cached record the refusals changed would show.
    p.update(id, vec![Change::Burnt(4)]).await.expect("burnt");
    p.state_committed(id, &ch.signed(3)).await.expect("v3");
    let mut expected = snapshot;
    expected.burnt = 4;
    expected.current = Some(ch.signed(3));
    assert_eq!(
        loaded(&p, id).await,
        expected,
        "warm refusals changed nothing"
    );
    let p = s.reopen(p).await;
    assert_eq!(loaded(&p, id).await, expected);
}

/// A commit clears a staged state of the same or lower version only.
async fn commit_clears_only_older_staged(mut s: impl Store) {
    let p = s.open().await;
    let ch = TestChannel::two_party(4);
    let id = ch.id();
    p.channel_created(&ch.record()).await.expect("create");
    p.state_committed(id, &ch.signed(0)).await.expect("v0");
    let v3p = ch.signed_by(3, &[1]);
    p.state_staged(id, &v3p).await.expect("stage v3");
    p.state_committed(id, &ch.signed(2)).await.expect("v2");
    let p = s.reopen(p).await;
    assert_eq!(loaded(&p, id).await.staged, Some(v3p), "v3 > v2 stays");
    p.state_committed(id, &ch.signed(3)).await.expect("v3");
    let p = s.reopen(p).await;
    let r = loaded(&p, id).await;
    assert_eq!(r.staged, None);
    assert_eq!(r.current, Some(ch.signed(3)));
}

/// Every call for a channel that is not stored is a typed error.
async fn unknown_channel(mut s: impl Store) {
    let p = s.open().await;
    let ch = TestChannel::two_party(5);
    let id = ch.id();
    let unknown = |r: Result<(), Error>| matches!(r, Err(Error::UnknownChannel(x)) if x == id);
    assert!(unknown(p.state_committed(id, &ch.signed(0)).await));
    assert!(unknown(p.state_staged(id, &ch.signed_by(0, &[0])).await));
    assert!(unknown(p.phase_changed(id, Phase::Active).await));
    assert!(unknown(p.staged_discarded(id).await));
    assert!(unknown(p.update(id, vec![]).await));
    assert!(unknown(p.channel_removed(id).await));
    assert!(p.load(id).await.expect("load").is_none());
    // Removed channels are unknown again.
    p.channel_created(&ch.record()).await.expect("create");
    p.channel_removed(id).await.expect("remove");
    assert!(unknown(p.channel_removed(id).await));
    assert!(unknown(p.state_committed(id, &ch.signed(0)).await));
    let p = s.reopen(p).await;
    assert!(p.load_all().await.expect("load_all").is_empty());
}

/// Records breaking a channel rule or a crate limit are refused on create.
async fn invalid_records_refused(mut s: impl Store) {
    let p = s.open().await;
    let ch = TestChannel::two_party(6);
    let base = ch.record();
    let mut cases: Vec<(&str, ChannelRecord)> = Vec::new();

    let mut r = base.clone();
    r.index = 2;
    cases.push(("index out of range", r));
    let mut r = base.clone();
    r.peers.pop();
    cases.push(("peer count", r));
    let mut r = base.clone();
    r.peers[1] = vec![0; MAX_PEER_ID_LEN + 1];
    cases.push(("peer id too long", r));
    let mut r = base.clone();
    r.metadata = vec![0; MAX_METADATA_LEN + 1];
    cases.push(("metadata too long", r));
    let mut r = base.clone();
    // Participant 1's slot holds participant 0's signature.
    let mut forged = ch.signed_by(0, &[0]);
    forged.sigs[1] = forged.sigs[0];
    r.staged = Some(forged);
    cases.push(("forged signature", r));
    let mut r = base.clone();
    r.current = Some(ch.signed_by(0, &[0]));
    r.staged = Some(ch.signed_by(1, &[0]));
    cases.push(("current not fully signed", r));
    let mut r = base.clone();
    r.current = Some(ch.signed(1));
    r.staged = Some(ch.signed_by(1, &[0]));
    cases.push(("staged not newer than current", r));
    let mut r = base.clone();
    r.params.participants.push(perun_channel::Address::ZERO);
    r.peers.push(b"peer-2".to_vec());
    cases.push(("bad params", r));

    for (what, rec) in cases {
        let err = p.channel_created(&rec).await.expect_err(what);
        assert!(err.is_rejection(), "{what}: {err}");
    }
    assert!(p.load_all().await.expect("load_all").is_empty());

    p.channel_created(&base).await.expect("create");
    let id = ch.id();
    assert!(matches!(
        p.update(id, vec![Change::Metadata(vec![0; MAX_METADATA_LEN + 1])])
            .await,
        Err(Error::LimitExceeded { .. })
    ));
    let mut payment_data = ch.state(1);
    payment_data.appData = Bytes::from(vec![1u8; 1]);
    let mut payment_data = perun_channel::SignedState::new(payment_data);
    payment_data
        .sign(&ch.params, 0, &ch.accounts[0])
        .expect("sign");
    assert!(matches!(
        p.state_staged(id, &payment_data).await,
        Err(Error::InvalidInput {
            source: perun_channel::Error::PaymentAppData,
            ..
        })
    ));
    let p = s.reopen(p).await;
    assert_eq!(loaded(&p, id).await, base);
}

/// Hundreds of channels written concurrently, then read back after a restart.
async fn many_channels(mut s: impl Store) {
    const CHANNELS: u64 = 300;
    const VERSIONS: u64 = 3;
    let p = s.open().await;
    let mut tasks = Vec::new();
    for seed in 0..CHANNELS {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let ch = TestChannel::two_party(1000 + seed);
            let id = ch.id();
            p.channel_created(&ch.record()).await.expect("create");
            for v in 0..VERSIONS {
                p.state_staged(id, &ch.signed_by(v, &[0]))
                    .await
                    .expect("stage");
                p.state_committed(id, &ch.signed(v)).await.expect("commit");
            }
            p.phase_changed(id, Phase::Active).await.expect("phase");
            (id, ch.signed(VERSIONS - 1))
        }));
    }
    let mut expected = Vec::new();
    for t in tasks {
        expected.push(t.await.expect("task"));
    }
    expected.sort_by_key(|(id, _)| *id);
    let p = s.reopen(p).await;
    let all = p.load_all().await.expect("load_all");
    assert_eq!(all.len(), CHANNELS as usize);
    for (rec, (id, last)) in all.iter().zip(&expected) {
        assert_eq!(rec.id(), *id, "load_all is in id order");
        assert_eq!(rec.current.as_ref(), Some(last));
        assert_eq!(rec.staged, None);
        assert_eq!(rec.phase, Phase::Active);
    }
    let ids = p.channel_ids().await.expect("ids");
    assert_eq!(ids, expected.iter().map(|(id, _)| *id).collect::<Vec<_>>());
}

/// States at every size limit at once: 16 parties, 16 assets, 64 KiB app data.
async fn large_states(mut s: impl Store) {
    let p = s.open().await;
    let ch = TestChannel::new(
        7,
        limits::MAX_PARTICIPANTS,
        limits::MAX_ASSETS,
        limits::MAX_APP_DATA,
    );
    let id = ch.id();
    let mut rec = ch.record();
    rec.index = limits::MAX_PARTICIPANTS - 1;
    rec.staged = Some(ch.signed_by(0, &[limits::MAX_PARTICIPANTS - 1]));
    rec.peers = vec![vec![0xab; MAX_PEER_ID_LEN]; limits::MAX_PARTICIPANTS];
    rec.metadata = vec![0xcd; MAX_METADATA_LEN];
    p.channel_created(&rec).await.expect("create");
    let v0 = ch.signed(0);
    let v1 = ch.signed(1);
    p.state_committed(id, &v0).await.expect("v0");
    p.state_staged(id, &ch.signed_by(1, &[3, 15]))
        .await
        .expect("stage");
    p.state_committed(id, &v1).await.expect("v1");
    let p = s.reopen(p).await;
    let r = loaded(&p, id).await;
    assert_eq!(r.current.as_ref(), Some(&v1));
    assert_eq!(
        r.current.as_ref().map(|c| c.state.appData.len()),
        Some(limits::MAX_APP_DATA)
    );
    assert_eq!(r.peers, rec.peers);
    assert_eq!(r.metadata, rec.metadata);
    r.to_machine().expect("restores");

    // One byte over the app data limit is refused.
    let mut over = ch.state(2);
    over.appData = Bytes::from(vec![0u8; limits::MAX_APP_DATA + 1]);
    assert!(matches!(
        p.state_staged(id, &perun_channel::SignedState::new(over))
            .await,
        Err(Error::InvalidInput {
            source: perun_channel::Error::AppDataTooLarge(_),
            ..
        })
    ));
}

/// Random sequences of calls give the same answers and the same final
/// contents on both stores (a differential test of the shared rules).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_matches_memory_on_random_calls() {
    use rand::{Rng, SeedableRng};
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut redb = Redb::new();
    let stores: [Arc<dyn Persister>; 2] = [Arc::new(MemoryPersister::new()), redb.open().await];
    let channels: Vec<TestChannel> = (0..3).map(|c| TestChannel::two_party(500 + c)).collect();
    let phases = [
        Phase::Signing0,
        Phase::Funding,
        Phase::Active,
        Phase::Updating,
        Phase::Final,
    ];
    let signed: Vec<Vec<[perun_channel::SignedState; 3]>> = channels
        .iter()
        .map(|ch| {
            (0..6)
                .map(|v| [ch.signed_by(v, &[0]), ch.signed_by(v, &[1]), ch.signed(v)])
                .collect()
        })
        .collect();
    let change = |rng: &mut rand::rngs::StdRng, c: usize| match rng.gen_range(0..6) {
        4 => Change::Burnt(rng.gen_range(0..8)),
        0 => Change::Staged(signed[c][rng.gen_range(0..6)][rng.gen_range(0..3)].clone()),
        1 => Change::Committed(signed[c][rng.gen_range(0..6)][rng.gen_range(0..3)].clone()),
        2 => Change::DiscardStaged,
        3 => Change::Phase(phases[rng.gen_range(0..phases.len())]),
        _ => Change::Metadata(vec![rng.r#gen(); rng.gen_range(0..4)]),
    };
    let mut oks = 0;
    for step in 0..400 {
        let c = rng.gen_range(0..channels.len());
        let (ch, id) = (&channels[c], channels[c].id());
        let changes: Vec<Change> = (0..rng.gen_range(1..=3))
            .map(|_| change(&mut rng, c))
            .collect();
        let op = rng.gen_range(0..10);
        let mut answers = Vec::new();
        for p in &stores {
            let r = match op {
                0 => p.channel_created(&ch.record()).await,
                1 => p.channel_removed(id).await,
                _ => p.update(id, changes.clone()).await,
            };
            answers.push(r.map_err(|e| e.to_string()));
        }
        assert_eq!(answers[0], answers[1], "step {step}: op {op} {changes:?}");
        oks += usize::from(answers[0].is_ok());
    }
    println!("{oks} of 400 calls succeeded");
    assert!((40..=360).contains(&oks), "both paths exercised: {oks} ok");
    let memory = stores[0].load_all().await.expect("memory load_all");
    let [_, on_disk] = stores;
    let on_disk = redb.reopen(on_disk).await;
    assert_eq!(on_disk.load_all().await.expect("redb load_all"), memory);
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Mem::default()).await;
                }
            )*
        }
        mod redb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Redb::new()).await;
                }
            )*
        }
    };
}

/// The burnt version is stored with the channel, survives a restart, only
/// ever rises, and stays within `MAX_VERSION_STEP - 1` of the current
/// version (a peer naming a huge version cannot push it further, not even
/// through the store).
async fn burnt_version_is_kept(mut s: impl Store) {
    let p = s.open().await;
    let ch = TestChannel::two_party(77);
    let id = ch.id();
    p.channel_created(&ch.record()).await.expect("create");
    p.update(id, ch.commit(0)).await.expect("v0");
    assert_eq!(loaded(&p, id).await.burnt, 0);
    p.update(id, vec![Change::Burnt(2)]).await.expect("burn 2");
    p.update(id, vec![Change::Burnt(1)])
        .await
        .expect("a lower one is a no-op");
    assert_eq!(loaded(&p, id).await.burnt, 2);
    let cap = limits::MAX_VERSION_STEP - 1;
    let err = p
        .update(id, vec![Change::Burnt(cap + 1)])
        .await
        .expect_err("too far");
    assert!(
        matches!(err, Error::BurntTooFar { burnt, cap: c, .. } if burnt == cap + 1 && c == cap),
        "{err}"
    );
    assert!(err.is_rejection());
    assert_eq!(err.channel(), Some(id));
    // Together with a newer state, the cap moves with it.
    p.update(
        id,
        vec![Change::Committed(ch.signed(3)), Change::Burnt(cap + 3)],
    )
    .await
    .expect("burn relative to the new state");
    let p = s.reopen(p).await;
    let r = loaded(&p, id).await;
    assert_eq!(r.burnt, cap + 3);
    assert_eq!(p.load_all().await.expect("load_all"), vec![r]);
    // A created record is checked too.
    let other = TestChannel::two_party(78);
    let mut far = other.record();
    far.burnt = u64::MAX;
    assert!(matches!(
        p.channel_created(&far).await,
        Err(Error::BurntTooFar { .. })
    ));
}

/// The metadata slot: absent until written, replaced whole, kept across a
/// restart and next to channel writes, independent of channels, and limited.
async fn metadata_slot(mut s: impl Store) {
    let p = s.open().await;
    assert_eq!(p.meta_get("index").await.expect("get"), None);
    p.meta_put("index", b"one").await.expect("put");
    p.meta_put("other", b"").await.expect("put empty");
    p.meta_put("index", b"two").await.expect("replace");
    p.meta_put("index", b"two").await.expect("idempotent");
    let ch = TestChannel::two_party(3);
    p.channel_created(&ch.record()).await.expect("create");
    p.channel_removed(ch.id()).await.expect("remove");
    let too_long_key = "k".repeat(perun_persistence::MAX_META_KEY_LEN + 1);
    let e = p.meta_put(&too_long_key, b"x").await.expect_err("long key");
    assert!(
        matches!(e, Error::MetaTooLarge { .. }) && e.is_rejection(),
        "{e}"
    );
    let big = vec![0u8; perun_persistence::MAX_META_VALUE_LEN + 1];
    let e = p.meta_put("index", &big).await.expect_err("large value");
    assert!(matches!(e, Error::MetaTooLarge { .. }), "{e}");
    let p = s.reopen(p).await;
    assert_eq!(
        p.meta_get("index").await.expect("get").as_deref(),
        Some(&b"two"[..])
    );
    assert_eq!(
        p.meta_get("other").await.expect("get").as_deref(),
        Some(&b""[..])
    );
    assert_eq!(p.meta_get("missing").await.expect("get"), None);
    assert!(p.channel_ids().await.expect("ids").is_empty());
}

conformance!(
    metadata_slot,
    burnt_version_is_kept,
    lifecycle,
    idempotent_writes,
    version_rules,
    commit_clears_only_older_staged,
    unknown_channel,
    invalid_records_refused,
    many_channels,
    large_states,
);
