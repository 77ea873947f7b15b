//! The transaction queue on anvil, with mining mostly off so the pool can be
//! watched: many transactions of one account at once, a stuck transaction
//! replaced with higher fees, a dropped one sent again, a nonce taken by
//! another transaction of the account, the fee cap against a cheater's tips,
//! a retry joining the transaction in flight, a dead queue task, an
//! identical registration that wins the race, and a receipt that lags its
//! block.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use alloy::network::TransactionBuilder;
use alloy::providers::Provider;
use alloy::rpc::types::TransactionRequest;
use alloy_primitives::{Address, B256, U256};
use perun_adjudicator::testing::{Anvil, CHAIN_ID, abort_tx_queue};
use perun_adjudicator::{Adjudicator, Error, EthAdjudicator, EthConfig, SignedChannel, deploy};
use perun_channel::{Params, SignedState, State};
use perun_wallet::{Account, LocalAccount};

const GWEI: u128 = 1_000_000_000;
const WAIT: Duration = Duration::from_secs(30);

struct Setup {
    anvil: Anvil,
    cfg: EthConfig,
    holder: Address,
    parties: [LocalAccount; 2],
}

async fn setup() -> Setup {
    let anvil = Anvil::spawn().await.expect("anvil (run cargo xtask setup)");
    let deployer = anvil.funded_account().await.unwrap();
    let d = deploy(&anvil.provider(&deployer).await.unwrap())
        .await
        .unwrap();
    let mut cfg = EthConfig::from_deployment(&d);
    cfg.receipt_timeout = WAIT;
    cfg.rpc_timeout = Duration::from_secs(5);
    Setup {
        anvil,
        cfg,
        holder: d.eth_holder,
        parties: [LocalAccount::random(), LocalAccount::random()],
    }
}

/// A channel of the two parties (nothing funded: registering needs no money).
struct Channel {
    params: Params,
    state: State,
}

impl Setup {
    fn channel(&self) -> Channel {
        let (params, state) = perun_adjudicator::testing::empty_channel(
            self.cfg.adjudicator,
            self.parties.iter().map(|p| p.address()).collect(),
            self.holder,
        );
        Channel { params, state }
    }

    /// A backend of a new funded account with `cfg`.
    async fn backend(&self, cfg: EthConfig) -> (LocalAccount, EthAdjudicator) {
        self.backend_at(&self.anvil.ws_url(), cfg).await
    }

    /// The same, talking to the node through `url` (a fault proxy).
    async fn backend_at(&self, url: &str, cfg: EthConfig) -> (LocalAccount, EthAdjudicator) {
        let account = self.anvil.funded_account().await.unwrap();
        let adj = EthAdjudicator::connect(url, &account, cfg).await.unwrap();
        (account, adj)
    }

    /// Waits until the pool holds exactly `n` transactions; their hashes.
    async fn pool_holds(&self, n: usize) -> Vec<B256> {
        tokio::time::timeout(WAIT, async {
            loop {
                let hashes = self.anvil.pool_hashes().await.unwrap();
                if hashes.len() == n {
                    return hashes;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the pool does not reach {n} transactions"))
    }

    /// Waits until the pool holds one transaction other than `old`.
    async fn pool_replaces(&self, old: B256) -> B256 {
        tokio::time::timeout(WAIT, async {
            loop {
                let hashes = self.anvil.pool_hashes().await.unwrap();
                if let [h] = hashes[..]
                    && h != old
                {
                    return h;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("a replacement reaches the pool")
    }

    /// A transaction as the node shows it.
    async fn tx(&self, tx: B256) -> serde_json::Value {
        let t: serde_json::Value = self
            .anvil
            .admin()
            .raw_request("eth_getTransactionByHash".into(), (tx,))
            .await
            .unwrap();
        assert!(!t.is_null(), "transaction {tx} known");
        t
    }

    /// The fees (max fee, tip) of a transaction.
    async fn fees(&self, tx: B256) -> (u128, u128) {
        fees(&self.tx(tx).await)
    }

    async fn version(&self, adj: &EthAdjudicator, ch: &Channel) -> Option<u64> {
        adj.dispute(ch.state.channelId)
            .await
            .unwrap()
            .map(|d| d.version)
    }
}

/// A number field of a JSON transaction.
fn field(tx: &serde_json::Value, name: &str) -> u128 {
    let hex = tx[name]
        .as_str()
        .unwrap_or_else(|| panic!("{name} in {tx}"));
    u128::from_str_radix(hex.trim_start_matches("0x"), 16).unwrap()
}

/// (max fee, tip) of a JSON transaction.
fn fees(tx: &serde_json::Value) -> (u128, u128) {
    (field(tx, "maxFeePerGas"), field(tx, "maxPriorityFeePerGas"))
}

impl Channel {
    fn signed(&self, parties: &[LocalAccount; 2], version: u64) -> SignedChannel {
        let mut st = self.state.clone();
        st.version = version;
        let mut s = SignedState::new(st);
        for (i, p) in parties.iter().enumerate() {
            s.sign(&self.params, i, p).unwrap();
        }
        SignedChannel {
            params: self.params.clone(),
            state: s,
        }
    }
}

/// The scenario: a cheater registers stale version 1 of eight
/// channels in one block; one honest account refutes all eight at once with
/// version 2. Before the queue, five of the eight refutations failed on
/// nonces; now all eight land in the next block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_refutations_from_one_account_all_land() {
    let s = setup().await;
    let (_, cheater) = s.backend(s.cfg.clone()).await;
    let (_, honest) = s.backend(s.cfg.clone()).await;
    let channels: Vec<Channel> = (0..8).map(|_| s.channel()).collect();
    s.anvil.set_automine(false).await.unwrap();

    let register_all = |adj: &EthAdjudicator, version: u64| {
        channels
            .iter()
            .map(|ch| {
                let (adj, req) = (adj.clone(), ch.signed(&s.parties, version));
                tokio::spawn(async move { adj.register(&req).await })
            })
            .collect::<Vec<_>>()
    };
    let stale = register_all(&cheater, 1);
    s.pool_holds(8).await;
    s.anvil.mine(1).await.unwrap();
    for r in stale {
        r.await.unwrap().unwrap();
    }
    let block = s.anvil.block_number().await.unwrap();
    for ch in &channels {
        assert_eq!(s.version(&honest, ch).await, Some(1));
    }

    let refutes = register_all(&honest, 2);
    s.pool_holds(8).await;
    s.anvil.mine(1).await.unwrap();
    for r in refutes {
        r.await.unwrap().unwrap();
    }
    for ch in &channels {
        assert_eq!(s.version(&honest, ch).await, Some(2));
    }
    assert_eq!(
        s.anvil.block_number().await.unwrap(),
        block + 1,
        "all eight in one block"
    );
}

/// A transaction that waits in the pool longer than `replace_after` is
/// replaced at its nonce with both fees up by an eighth; one the node drops
/// because the base fee rose above its max fee is sent again with fees that
/// fit. Both land, and the caller sees one success each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_transaction_is_replaced_with_higher_fees() {
    let s = setup().await;
    let cfg = EthConfig {
        replace_after: Duration::from_secs(1),
        ..s.cfg.clone()
    };
    let (_, adj) = s.backend(cfg).await;
    s.anvil.set_automine(false).await.unwrap();

    // Not mined in time: replaced.
    let ch = s.channel();
    let req = ch.signed(&s.parties, 1);
    let a = adj.clone();
    let registering = tokio::spawn(async move { a.register(&req).await });
    let first = s.pool_holds(1).await[0];
    let (fee1, tip1) = s.fees(first).await;
    let second = s.pool_replaces(first).await;
    let (fee2, tip2) = s.fees(second).await;
    assert!(fee2 * 8 >= fee1 * 9, "max fee {fee1} -> {fee2}");
    assert!(tip2 * 8 >= tip1 * 9, "tip {tip1} -> {tip2}");
    s.anvil.mine(1).await.unwrap();
    registering.await.unwrap().unwrap();
    assert_eq!(s.version(&adj, &ch).await, Some(1));
    let admin = s.anvil.admin();
    assert!(
        admin
            .get_transaction_receipt(first)
            .await
            .unwrap()
            .is_none()
    );
    let landed = admin.get_transaction_receipt(second).await.unwrap();
    assert!(landed.is_some_and(|r| r.status()));

    // Priced out by a base fee jump: anvil drops it when mining; sent again, higher.
    let ch = s.channel();
    let req = ch.signed(&s.parties, 1);
    let a = adj.clone();
    let registering = tokio::spawn(async move { a.register(&req).await });
    let first = s.pool_holds(1).await[0];
    let (fee1, _) = s.fees(first).await;
    let high = fee1 + 5 * GWEI;
    s.anvil.set_next_base_fee(high).await.unwrap();
    s.anvil.mine(1).await.unwrap();
    assert!(
        admin
            .get_transaction_receipt(first)
            .await
            .unwrap()
            .is_none(),
        "underpriced: not mined"
    );
    let second = s.pool_replaces(first).await;
    let (fee2, _) = s.fees(second).await;
    assert!(
        fee2 >= 2 * high,
        "max fee {fee2} follows the base fee {high}"
    );
    s.anvil.mine(1).await.unwrap();
    registering.await.unwrap().unwrap();
    assert_eq!(s.version(&adj, &ch).await, Some(1));
}

/// A transaction evicted from the pool (`anvil_dropTransaction`) while its
/// nonce is unused is sent again as it was, and lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_transaction_is_sent_again() {
    let s = setup().await;
    let (_, adj) = s.backend(s.cfg.clone()).await;
    s.anvil.set_automine(false).await.unwrap();
    let ch = s.channel();
    let req = ch.signed(&s.parties, 1);
    let a = adj.clone();
    let registering = tokio::spawn(async move { a.register(&req).await });
    let sent = s.pool_holds(1).await[0];
    // The pool is not read for the drop: the queue's next tick (each second
    // without blocks) may already have sent it again.
    assert!(s.anvil.drop_transaction(sent).await.unwrap(), "dropped");
    tokio::time::timeout(WAIT, async {
        while s.anvil.pool_hashes().await.unwrap() != vec![sent] {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the same transaction is back in the pool");
    s.anvil.mine(1).await.unwrap();
    registering.await.unwrap().unwrap();
    assert_eq!(s.version(&adj, &ch).await, Some(1));
}

/// Another transaction of the same account (a wallet outside this process)
/// takes the nonce of a pending one, and later the nonce the queue meant to
/// use next: the queue sends its transactions again with fresh nonces and
/// every caller still gets its result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nonce_taken_by_another_transaction_is_recovered() {
    let s = setup().await;
    let (account, adj) = s.backend(s.cfg.clone()).await;
    let other_wallet = s.anvil.provider(&account).await.unwrap();
    let foreign = |nonce: u64| {
        TransactionRequest::default()
            .with_to(account.address())
            .with_value(U256::from(1))
            .with_nonce(nonce)
            .with_gas_limit(21_000)
            .with_max_fee_per_gas(100 * GWEI)
            .with_max_priority_fee_per_gas(50 * GWEI)
    };
    s.anvil.set_automine(false).await.unwrap();

    // The foreign transaction replaces ours in the pool and is mined instead.
    let ch = s.channel();
    let req = ch.signed(&s.parties, 1);
    let a = adj.clone();
    let registering = tokio::spawn(async move { a.register(&req).await });
    let ours = s.pool_holds(1).await[0];
    let nonce = field(&s.tx(ours).await, "nonce") as u64;
    let theirs = *other_wallet
        .send_transaction(foreign(nonce))
        .await
        .unwrap()
        .tx_hash();
    assert_eq!(s.anvil.pool_hashes().await.unwrap(), vec![theirs]);
    s.anvil.mine(1).await.unwrap();
    let resent = s.pool_replaces(theirs).await;
    assert_ne!(resent, ours, "sent again, at a new nonce");
    s.anvil.mine(1).await.unwrap();
    registering.await.unwrap().unwrap();
    assert_eq!(s.version(&adj, &ch).await, Some(1));

    // The foreign transaction takes the nonce the queue would use next.
    let (c1, c2) = (s.channel(), s.channel());
    let (r1, r2) = (c1.signed(&s.parties, 1), c2.signed(&s.parties, 1));
    let a = adj.clone();
    let first = tokio::spawn(async move { a.register(&r1).await });
    let ours = s.pool_holds(1).await[0];
    let next = field(&s.tx(ours).await, "nonce") as u64 + 1;
    let _theirs = other_wallet.send_transaction(foreign(next)).await.unwrap();
    let a = adj.clone();
    let second = tokio::spawn(async move { a.register(&r2).await });
    s.pool_holds(3).await;
    s.anvil.mine(1).await.unwrap();
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    assert_eq!(s.version(&adj, &c1).await, Some(1));
    assert_eq!(s.version(&adj, &c2).await, Some(1));
}

/// A cheater's huge tips raise the node's suggested tip far above our cap:
/// our transaction still offers at most the caps. A base fee above the fee
/// cap sends nothing and tells the caller; the request stays queued and
/// lands once the base fee is below the cap again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fee_cap_holds_against_a_cheaters_tips() {
    let s = setup().await;
    let cfg = EthConfig {
        max_fee_per_gas: 50 * GWEI,
        max_priority_fee_per_gas: 2 * GWEI,
        ..s.cfg.clone()
    };
    let (_, honest) = s.backend(cfg).await;
    let cheater = s.anvil.funded_account().await.unwrap();
    let cheater_wallet = s.anvil.provider(&cheater).await.unwrap();
    for _ in 0..3 {
        let tx = TransactionRequest::default()
            .with_to(cheater.address())
            .with_value(U256::from(1))
            .with_gas_limit(21_000)
            .with_max_fee_per_gas(2_000 * GWEI)
            .with_max_priority_fee_per_gas(1_000 * GWEI);
        cheater_wallet
            .send_transaction(tx)
            .await
            .unwrap()
            .get_receipt()
            .await
            .unwrap();
    }
    let suggested = s
        .anvil
        .admin()
        .get_max_priority_fee_per_gas()
        .await
        .unwrap();
    assert!(
        suggested > 2 * GWEI,
        "the tips raised the suggestion: {suggested}"
    );

    let ch = s.channel();
    honest.register(&ch.signed(&s.parties, 1)).await.unwrap();
    let block: serde_json::Value = s
        .anvil
        .admin()
        .raw_request("eth_getBlockByNumber".into(), ("latest", true))
        .await
        .unwrap();
    let (max_fee, tip) = fees(&block["transactions"][0]);
    assert!(tip <= 2 * GWEI, "tip {tip}");
    assert!(max_fee <= 50 * GWEI, "max fee {max_fee}");

    // Base fee above the cap: nothing is sent, the caller hears why.
    s.anvil.set_next_base_fee(60 * GWEI).await.unwrap();
    s.anvil.mine(1).await.unwrap();
    let ch = s.channel();
    let req = ch.signed(&s.parties, 1);
    match honest.register(&req).await {
        Err(Error::FeeCapExceeded { needed, cap, .. }) => {
            assert!(needed >= 60 * GWEI, "{needed}");
            assert_eq!(cap, 50 * GWEI);
        }
        other => panic!("expected FeeCapExceeded, got {other:?}"),
    }
    assert!(s.anvil.pool_hashes().await.unwrap().is_empty());
    assert_eq!(s.version(&honest, &ch).await, None);
    // Empty blocks lower the base fee by an eighth each: 60 -> 52.5 -> 45.9 gwei.
    s.anvil.mine(2).await.unwrap();
    tokio::time::timeout(WAIT, async {
        while s.version(&honest, &ch).await.is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the queued registration lands without the caller");
    honest.register(&req).await.unwrap();
}

/// A caller that gave up (`ReceiptTimeout`) and tries again joins the
/// transaction in flight instead of sending a second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_joins_the_transaction_in_flight() {
    let s = setup().await;
    // Nothing is mined, so the wait always runs out; 5 s leaves a loaded
    // machine time to simulate and send first (else `NotSent`).
    let receipt_timeout = Duration::from_secs(5);
    let cfg = EthConfig {
        receipt_timeout,
        ..s.cfg.clone()
    };
    let (_, adj) = s.backend(cfg).await;
    s.anvil.set_automine(false).await.unwrap();
    let ch = s.channel();
    let req = ch.signed(&s.parties, 1);
    let first = match adj.register(&req).await {
        Err(Error::ReceiptTimeout { op, tx, waited }) => {
            assert_eq!(op, "register");
            assert_eq!(waited, receipt_timeout);
            tx
        }
        other => panic!("expected ReceiptTimeout, got {other:?}"),
    };
    match adj.register(&req).await {
        Err(Error::ReceiptTimeout { tx, .. }) => assert_eq!(tx, first, "the same transaction"),
        other => panic!("expected ReceiptTimeout, got {other:?}"),
    }
    assert_eq!(s.anvil.pool_hashes().await.unwrap(), vec![first]);
    s.anvil.mine(1).await.unwrap();
    adj.register(&req).await.unwrap();
    assert_eq!(s.version(&adj, &ch).await, Some(1));
}

/// The queue's task dies with a transaction in flight: its caller gets
/// `Stopped` at once, the transaction still lands, and the next request
/// starts a new task that finds the right nonce.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_queue_task_stops_its_callers_and_is_restarted() {
    let s = setup().await;
    let (account, adj) = s.backend(s.cfg.clone()).await;
    s.anvil.set_automine(false).await.unwrap();
    let ch = s.channel();
    let req = ch.signed(&s.parties, 1);
    let a = adj.clone();
    let registering = tokio::spawn(async move { a.register(&req).await });
    s.pool_holds(1).await;
    assert!(abort_tx_queue(CHAIN_ID, account.address()));
    let r = tokio::time::timeout(Duration::from_secs(5), registering)
        .await
        .expect("the caller does not hang")
        .unwrap();
    assert!(matches!(r, Err(Error::Stopped)), "{r:?}");
    s.anvil.mine(1).await.unwrap();
    assert_eq!(s.version(&adj, &ch).await, Some(1));

    s.anvil.set_automine(true).await.unwrap();
    let ch = s.channel();
    adj.register(&ch.signed(&s.parties, 1)).await.unwrap();
    assert_eq!(s.version(&adj, &ch).await, Some(1));
}

/// Two accounts register the same state in the same block: the second
/// transaction is a no-op on-chain (registering the registered state does not
/// revert), and both callers get `Ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_race_to_an_identical_registration_is_ok() {
    let s = setup().await;
    let (_, a) = s.backend(s.cfg.clone()).await;
    let (_, b) = s.backend(s.cfg.clone()).await;
    let ch = s.channel();
    let req = ch.signed(&s.parties, 1);
    s.anvil.set_automine(false).await.unwrap();
    let (ra, rb) = (req.clone(), req.clone());
    let ta = tokio::spawn(async move { a.register(&ra).await });
    let tb = tokio::spawn(async move { b.register(&rb).await });
    let sent = s.pool_holds(2).await;
    s.anvil.mine(1).await.unwrap();
    ta.await.unwrap().unwrap();
    tb.await.unwrap().unwrap();
    let reverted = futures_util::future::join_all(
        sent.iter()
            .map(|h| s.anvil.admin().get_transaction_receipt(*h)),
    )
    .await
    .into_iter()
    .filter(|r| r.as_ref().unwrap().as_ref().is_some_and(|r| !r.status()))
    .count();
    assert_eq!(
        reverted, 0,
        "the second registration is a no-op, not a revert"
    );
    let (_, reader) = s.backend(s.cfg.clone()).await;
    assert_eq!(s.version(&reader, &ch).await, Some(1));
}

/// With `confirmations = 2`, a registration mined and then dropped by a
/// reorg before it is two blocks deep is not reported as done: the queue
/// finds its nonce unused again, sends it again, and answers once the new
/// inclusion is deep enough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_a_reorg_removed_is_sent_again() {
    let s = setup().await;
    let cfg = EthConfig {
        confirmations: Some(2),
        ..s.cfg.clone()
    };
    let (_, adj) = s.backend(cfg).await;
    s.anvil.mine(3).await.unwrap();
    let ch = s.channel();
    let req = ch.signed(&s.parties, 1);
    let a = adj.clone();
    let before = s.anvil.block_number().await.unwrap();
    let mut registering = tokio::spawn(async move { a.register(&req).await });
    // Automine puts it in the next block at once.
    tokio::time::timeout(WAIT, async {
        while s.anvil.block_number().await.unwrap() == before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("mined");
    let admin = s.anvil.admin().clone();
    let first: serde_json::Value = admin
        .raw_request("eth_getBlockByNumber".into(), ("latest", false))
        .await
        .unwrap();
    let tx: B256 = first["transactions"][0].as_str().unwrap().parse().unwrap();
    let first_block = field(&first, "number") as u64;

    s.anvil.reorg(1).await.unwrap();
    assert!(
        admin.get_transaction_receipt(tx).await.unwrap().is_none(),
        "dropped by the reorg"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut registering)
            .await
            .is_err(),
        "not answered while not deep enough"
    );
    // Sent again (automine mines it), then deep enough.
    let again = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(r) = admin.get_transaction_receipt(tx).await.unwrap() {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the same transaction is mined again");
    assert!(again.block_number.unwrap() > first_block);
    s.anvil.mine(2).await.unwrap();
    registering.await.unwrap().unwrap();
    assert_eq!(s.version(&adj, &ch).await, Some(1));
}

/// A node that mined our transaction but has no receipt for it yet (the
/// proxy answers `null` for receipts, for longer than the ticks after which
/// a used nonce counts as another transaction's): the queue keeps waiting
/// for that receipt and sends nothing again. Before, it took the nonce for
/// another transaction's and sent the call a second time, which for a
/// conclusion reverted and answered `AlreadyConcluded` to the caller whose
/// own transaction had concluded the channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_receipt_is_waited_for_not_sent_again() {
    let s = setup().await;
    let proxy = perun_adjudicator::testing::RpcProxy::start(&s.anvil.ws_url())
        .await
        .unwrap();
    let (account, adj) = s.backend_at(&proxy.ws_url(), s.cfg.clone()).await;
    s.anvil.set_automine(false).await.unwrap();
    let ch = s.channel();
    let req = ch.signed(&s.parties, 1);
    let a = adj.clone();
    let registering = tokio::spawn(async move { a.register(&req).await });
    s.pool_holds(1).await;
    proxy.answer_null("eth_getTransactionReceipt", true);
    // The block with our transaction; then the queue's ticks (one a
    // second without blocks) until it asked for the hidden receipt four
    // times, or sent the call again (into the pool, where it stays).
    s.anvil.mine(1).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while proxy.stats().nulled < 4 && s.anvil.pool_hashes().await.unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the queue keeps asking"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(proxy.stats().nulled >= 3, "the queue asked for the receipt");
    assert!(
        s.anvil.pool_hashes().await.unwrap().is_empty(),
        "nothing sent again"
    );
    assert!(!registering.is_finished());
    proxy.answer_null("eth_getTransactionReceipt", false);
    s.anvil.mine(1).await.unwrap();
    tokio::time::timeout(WAIT, registering)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let sent = s
        .anvil
        .admin()
        .get_transaction_count(account.address())
        .await
        .unwrap();
    assert_eq!(sent, 1, "one transaction of the account");
    assert_eq!(s.version(&adj, &ch).await, Some(1));
}
