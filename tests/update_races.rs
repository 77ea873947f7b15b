//! Races in the update protocol that a peer (hostile or merely unlucky)
//! can set up: a newer state adopted under a staged update, and an invalid
//! update meeting another peer's staged one. Each once left a channel
//! stuck or changed by bad input (review of d750171).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Ledger, Options, open, parties};
use perun::channel::{Phase, SignedState, U256};
use perun::client::Channel;
use perun::wallet::{Account, LocalAccount};
use perun::wire::{Handle, Incoming, Message, PeerId, RejectKind, Update};

struct Setup {
    _ledger: Ledger,
    alice: Channel,
    bob_key: LocalAccount,
    alice_peer: PeerId,
    evil: Handle,
    evil_in: Option<Incoming>,
    _parties: Vec<common::Party>,
}

/// Opens Alice–Bob, then replaces Bob by an endpoint with his network key.
async fn setup(ledger: Ledger, opts: Options) -> Setup {
    let mut ps = parties(&ledger, 2, U256::from(1_000_000u64), &opts).await;
    let chans = open(&ledger, &mut ps, U256::from(100u64)).await;
    chans[0].pay(1, 0, U256::from(10u64)).await.unwrap();
    let (evil, evil_in, bob_key) = common::evil_twin(&ps, 1, 0).await;
    let alice_peer = ps[0].client.peer_id();
    Setup {
        _ledger: ledger,
        alice: chans[0].clone(),
        bob_key,
        alice_peer,
        evil,
        evil_in: Some(evil_in),
        _parties: ps,
    }
}

async fn send(s: &Setup, msg: &Message) -> Message {
    // The first request may meet Alice's closing connection to the real Bob.
    for _ in 0..50 {
        match s.evil.send(s.alice_peer, msg).await {
            Ok(r) => return r,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("the twin cannot reach Alice");
}

async fn send_update(s: &Setup, state: perun::channel::State) -> Message {
    send(
        s,
        &Message::Update(Update {
            channel_id: s.alice.id(),
            state,
            actor: 1,
        }),
    )
    .await
}

/// Bob's twin proposes `state`, a payment to Alice; returns her signature.
async fn alice_signs(s: &Setup, state: perun::channel::State) -> perun::wallet::Signature {
    match send_update(s, state).await {
        Message::UpdateAccept(a) => a.signature,
        other => panic!("Alice signs a payment to her, got {other:?}"),
    }
}

async fn twin_aborts(s: &Setup, version: u64) {
    let abort = Message::UpdateReject(perun::wire::UpdateReject {
        channel_id: s.alice.id(),
        version,
        index: 1,
        reason: "aborted".into(),
        kind: RejectKind::Refused,
    });
    assert_eq!(send(s, &abort).await, Message::Ack);
}

/// The twin signs every update Alice proposes, as Bob would, and acks
/// her commits.
fn sign_updates(incoming: Incoming, bob_key: LocalAccount) -> tokio::task::JoinHandle<()> {
    sign_updates_after(incoming, bob_key, async {})
}

/// [`sign_updates`], the first update answered only once `first` is done.
fn sign_updates_after(
    mut incoming: Incoming,
    bob_key: LocalAccount,
    first: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut first = Some(first);
        while let Some(req) = incoming.next().await {
            let (_, msg, r) = req.into_parts();
            match msg {
                Message::Update(u) => {
                    if let Some(first) = first.take() {
                        first.await;
                    }
                    let _ = r.reply(common::accept(&bob_key, &u, 1));
                }
                Message::UpdateWithCommit(m) => {
                    let _ = r.reply(common::accept(&bob_key, &m.update, 1));
                }
                Message::Sync(_) => {}
                _ => {
                    let _ = r.reply(Message::Ack);
                }
            }
        }
    })
}

/// Bob's update that moves `x` from Bob to Alice.
fn bob_pays(st: &perun::channel::State, x: u64) -> perun::channel::State {
    let mut next = st.next();
    next.outcome.balances[0][1] -= U256::from(x);
    next.outcome.balances[0][0] += U256::from(x);
    next
}

/// Bob's update v2 (paying Alice) is signed by Alice and then
/// aborted: Bob holds her signature on it. Alice pays (v3). While her
/// update is out, Bob completes v2 with a `Sync` (a state Alice signed:
/// adopting it is right). `merge` adopts it through `commit_trial`, whose
/// `installed()` clears `staged_actor`, so Alice's `finish` no longer sees
/// the staged proposal as hers (`ours == false`) and `fail` does not drop
/// it: Alice's machine stays `Updating`, her dead proposal staged, for good.
/// Every later `pay` of hers waits for that "earlier update" and times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_state_adopted_while_our_update_is_out_does_not_wedge_the_channel() {
    let mut s = setup(Ledger::sim().await, Options::default()).await;
    let before = s.alice.state();
    let v2 = bob_pays(&before.state, 1);
    let alice_sig = alice_signs(&s, v2.clone()).await;
    twin_aborts(&s, v2.version).await;
    assert_eq!(s.alice.state(), before);
    let full_v2 = SignedState {
        state: v2.clone(),
        sigs: vec![
            Some(alice_sig),
            Some(s.bob_key.sign_hash(v2.hash()).unwrap()),
        ],
    };

    // The twin: the first update of Alice's is answered only after a
    // `Sync` that completes v2; later ones are signed at once.
    let (evil, alice_peer, id) = (s.evil.clone(), s.alice_peer, s.alice.id());
    let sync = Message::Sync(perun::wire::Sync {
        channel_id: id,
        index: 1,
        phase: Phase::Active,
        latest: full_v2,
        staged: None,
    });
    let twin = sign_updates_after(s.evil_in.take().unwrap(), s.bob_key.clone(), async move {
        let reply = evil.send(alice_peer, &sync).await;
        assert!(matches!(reply, Ok(Message::Sync(_))), "{reply:?}");
    });

    let first = s.alice.pay(1, 0, U256::from(1u64)).await;
    assert!(first.is_err(), "built on v1, overtaken by v2: {first:?}");
    s.alice
        .wait_for_version(v2.version, Duration::from_secs(5))
        .await
        .unwrap();
    let second = tokio::time::timeout(Duration::from_secs(30), s.alice.pay(1, 0, U256::from(1u64)))
        .await
        .expect("pay returns");
    assert!(
        second.is_ok(),
        "Alice pays again after her overtaken update (phase {:?}): {second:?}",
        s.alice.phase()
    );
    twin.abort();
}

/// An update handler that holds each decision until the test releases it.
struct Gated {
    entered: tokio::sync::Notify,
    release: tokio::sync::Semaphore,
    /// Decisions wait only while armed.
    armed: std::sync::atomic::AtomicBool,
}

/// A [`Gated`] handler (waiting only while `armed`), and options with it.
fn gated(armed: bool) -> (std::sync::Arc<Gated>, Options) {
    let gate = std::sync::Arc::new(Gated {
        entered: tokio::sync::Notify::new(),
        release: tokio::sync::Semaphore::new(0),
        armed: std::sync::atomic::AtomicBool::new(armed),
    });
    let opts = Options {
        update_handler: Some(gate.clone()),
        ..Options::default()
    };
    (gate, opts)
}

#[async_trait::async_trait]
impl perun::client::UpdateHandler for Gated {
    async fn handle_update(
        &self,
        _update: perun::client::IncomingUpdate,
        responder: perun::client::UpdateResponder,
    ) {
        if self.armed.load(std::sync::atomic::Ordering::SeqCst) {
            self.entered.notify_one();
            self.release.acquire().await.unwrap().forget();
        }
        responder.accept();
    }
}

/// In a 3-party channel Carol proposes an update; Alice's
/// handler is still deciding. Bob sends Alice an *invalid* update (it
/// inflates his balance) with a higher version. `respond_update` drops
/// Carol's staged update as "superseded" (`moved_on`) before it checks
/// Bob's update at all, then refuses Bob's: Bob's bad input changed
/// Alice's channel (Carol's update is gone, its version burnt), and
/// Carol's honest update fails with `Conflict`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalid_update_does_not_drop_another_peers_staged_update() {
    let ledger = Ledger::sim().await;
    let deposit = U256::from(1_000_000u64);
    let (gate, alice_opts) = gated(true);
    let mut ps = vec![
        common::party(&ledger, deposit, &alice_opts).await,
        common::party(&ledger, deposit, &Options::default()).await,
        common::party(&ledger, deposit, &Options::default()).await,
    ];
    common::introduce(&ps).await;
    let chans = open(&ledger, &mut ps, U256::from(100u64)).await;
    let before = chans[0].state();

    let (evil, mut evil_in, bob_key) = common::evil_twin(&ps, 1, 0).await;
    let carol = &ps[2].client;
    for addr in carol.listen_addrs().await.unwrap() {
        evil.add_address(carol.peer_id(), addr).await.unwrap();
    }
    for addr in evil.listen_addrs().await.unwrap() {
        carol.add_peer(evil.local_peer_id(), addr).await.unwrap();
    }
    // The twin makes itself known to both (a harmless `Sync`), then signs
    // whatever Carol proposes, as Bob would.
    for (peer, ch) in [
        (ps[0].client.peer_id(), &chans[0]),
        (carol.peer_id(), &chans[2]),
    ] {
        let ping = Message::Sync(perun::wire::Sync {
            channel_id: ch.id(),
            index: 1,
            phase: Phase::Active,
            latest: before.clone(),
            staged: None,
        });
        let mut ok = false;
        for _ in 0..50 {
            if matches!(evil.send(peer, &ping).await, Ok(Message::Sync(_))) {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ok, "the twin reaches its peers");
    }
    let key = bob_key.clone();
    let twin = tokio::spawn(async move {
        while let Some(req) = evil_in.next().await {
            let (_, msg, r) = req.into_parts();
            match msg {
                Message::Update(u) => {
                    let _ = r.reply(common::accept(&key, &u, 1));
                }
                Message::Sync(_) => {}
                _ => {
                    let _ = r.reply(Message::Ack);
                }
            }
        }
    });

    // Carol pays Alice; Alice's handler holds its decision.
    let carols = chans[2].clone();
    let paying = tokio::spawn(async move { carols.pay(0, 0, U256::from(1u64)).await });
    tokio::time::timeout(Duration::from_secs(10), gate.entered.notified())
        .await
        .expect("Carol's update reaches Alice's handler");

    // Bob's invalid update, one version higher.
    let mut bad = before.state.next();
    bad.version += 1;
    bad.outcome.balances[0][1] += U256::from(50u64);
    let reply = evil
        .send(
            ps[0].client.peer_id(),
            &Message::Update(Update {
                channel_id: chans[0].id(),
                state: bad,
                actor: 1,
            }),
        )
        .await
        .unwrap();
    match &reply {
        Message::UpdateReject(r) => assert_eq!(r.kind, RejectKind::Refused, "{r:?}"),
        other => panic!("the inflating update is refused, got {other:?}"),
    }
    let phase_after_refusal = chans[0].phase();

    gate.release.add_permits(1);
    let paid = tokio::time::timeout(Duration::from_secs(30), paying)
        .await
        .expect("Carol's pay returns")
        .unwrap();
    assert!(
        paid.is_ok() && phase_after_refusal == Phase::Updating,
        "Carol's honest update goes through: {paid:?}; Alice's phase right after refusing Bob's update: {phase_after_refusal:?}"
    );
    twin.abort();
}

/// The same on the responder's side. Bob proposes
/// v3 (built on v1) while Alice's handler decides; meanwhile his `Sync`
/// completes v2, an update of his Alice had signed and he had aborted.
/// The adoption clears `staged_actor`, so `respond_update` answers
/// "superseded" but leaves v3 staged (update.rs: the `!still_staged`
/// branch drops nothing): Alice stays `Updating` with an update nobody will
/// complete or abort, and her own payments time out for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_state_adopted_while_we_decide_a_peers_update_does_not_wedge_the_channel() {
    let (gate, opts) = gated(false);
    let mut s = setup(Ledger::sim().await, opts).await;
    let before = s.alice.state();
    let v2 = bob_pays(&before.state, 1);
    let alice_sig = alice_signs(&s, v2.clone()).await;
    twin_aborts(&s, v2.version).await;
    let full_v2 = SignedState {
        state: v2.clone(),
        sigs: vec![
            Some(alice_sig),
            Some(s.bob_key.sign_hash(v2.hash()).unwrap()),
        ],
    };

    gate.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut v3 = bob_pays(&before.state, 2);
    v3.version = v2.version + 1;
    let msg = Message::Update(Update {
        channel_id: s.alice.id(),
        state: v3,
        actor: 1,
    });
    let (evil, alice_peer) = (s.evil.clone(), s.alice_peer);
    let answer = tokio::spawn(async move { evil.send(alice_peer, &msg).await });
    tokio::time::timeout(Duration::from_secs(10), gate.entered.notified())
        .await
        .expect("Bob's v3 reaches Alice's handler");
    let sync = Message::Sync(perun::wire::Sync {
        channel_id: s.alice.id(),
        index: 1,
        phase: Phase::Active,
        latest: full_v2,
        staged: None,
    });
    assert!(matches!(send(&s, &sync).await, Message::Sync(_)));
    gate.armed.store(false, std::sync::atomic::Ordering::SeqCst);
    gate.release.add_permits(1);
    let answer = answer.await.unwrap();
    assert!(
        matches!(&answer, Ok(Message::UpdateReject(r)) if r.kind == RejectKind::Conflict),
        "v3 no longer builds on Alice's state: {answer:?}"
    );
    assert_eq!(s.alice.state().state, v2);

    let _twin = sign_updates(s.evil_in.take().unwrap(), s.bob_key.clone());
    let paid = tokio::time::timeout(Duration::from_secs(30), s.alice.pay(1, 0, U256::from(1u64)))
        .await
        .expect("pay returns");
    assert!(
        paid.is_ok(),
        "Alice pays after refusing Bob's overtaken update (phase {:?}): {paid:?}",
        s.alice.phase()
    );
}
