//! Adversarial review of the chain index and `recover_funds` (issue 15,
//! point 4). Each test fails on the code it was written against if the bug
//! it names is there.

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use perun::adjudicator::{
    Adjudicator, ChainFact, ChainHistory, ChainLog, Dispute, EventStream, Funder, FundingRequest,
    LogPage, RpcFailure, SignedChannel, SimLedger, WithdrawRequest,
};
use perun::channel::{
    Address, Allocation, Asset, B256, ChannelId, Domain, Params, SignedState, State, U256,
};
use perun::client::{ChainIndex, IndexConfig};
use perun::persistence::{MemoryPersister, Persister};
use perun::wallet::{Account, LocalAccount};

const HOLDER: Address = Address::repeat_byte(0xee);

fn u(x: u64) -> U256 {
    U256::from(x)
}

// ---------------------------------------------------------------- SimLedger

/// A two-party channel (alice, bob) needing 10 from each; only bob funds;
/// then both sign a final state and it is concluded. The funding is not
/// covered, so every participant gets back what it holds: bob 10 (`Paid`),
/// alice nothing (no log names her).
async fn concluded_before_alice_funded(
    ledger: &SimLedger,
    alice: &LocalAccount,
    bob: &LocalAccount,
) -> Params {
    let funding = vec![vec![u(10); 2]];
    let params = Params::payment(
        ledger.domain(),
        60,
        U256::from(rand::random::<u64>()),
        vec![alice.address(), bob.address()],
        funding.clone(),
    );
    let asset = Asset {
        chainId: ledger.chain_id(),
        holder: HOLDER,
    };
    let state = State::initial(&params, Allocation::new(vec![asset], funding));
    let req = FundingRequest {
        params: params.clone(),
        state: state.clone(),
        index: 1,
        timeout: Duration::ZERO,
    };
    let _ = ledger.fund(req).await; // bob funds; alice's half never comes (funding times out)
    let mut fin = state.next();
    fin.isFinal = true;
    let mut signed = SignedState::new(fin);
    signed.sign(&params, 0, alice).unwrap();
    signed.sign(&params, 1, bob).unwrap();
    ledger
        .conclude(&SignedChannel {
            params: params.clone(),
            state: signed,
        })
        .await
        .unwrap();
    params
}

/// `n` deposits of strangers into their own channels: other people's blocks.
fn traffic(ledger: &SimLedger, n: u64) {
    let stranger = Address::repeat_byte(0x5e);
    ledger.mint(HOLDER, stranger, u(n));
    for _ in 0..n {
        let ch = B256::from(rand::random::<[u8; 32]>());
        ledger
            .deposit_to(HOLDER, stranger, ch, stranger, U256::ZERO, u(1))
            .unwrap();
    }
}

/// Alice's funding deposit lands after bob concluded the channel (a slow
/// transaction racing the funding timeout): the contract makes it
/// withdrawable at once. The Concluded log is more than `reread` blocks
/// before her deposit and was read by an earlier scan, when no holder log
/// named her yet; so the index never learns the channel is concluded, does
/// not count the deposit as "late", and never reads her credit.
/// DESIGN.md claims the conclusion of such a channel is found.
#[tokio::test]
async fn a_late_deposit_into_a_channel_concluded_in_an_earlier_scan_is_recovered() {
    let ledger = SimLedger::new(1337);
    ledger.add_asset(HOLDER);
    let (alice, bob) = (Arc::new(LocalAccount::random()), LocalAccount::random());
    for who in [alice.address(), bob.address()] {
        ledger.mint(HOLDER, who, u(100));
    }
    let store: Arc<dyn Persister> = Arc::new(MemoryPersister::new());
    let adj: Arc<dyn Adjudicator> = Arc::new(ledger.clone());
    let index = ChainIndex::new(adj, store, alice.clone(), IndexConfig::default()).unwrap();

    let params = concluded_before_alice_funded(&ledger, &alice, &bob).await;
    let id = params.channel_id();
    traffic(&ledger, 100); // more than the 64 re-read blocks pass
    // Alice's client scans (a periodic scan, or the first after a restore): nothing of hers yet.
    assert!(index.scan().await.unwrap().channels.is_empty());
    ledger
        .deposit_to(
            HOLDER,
            alice.address(),
            id,
            alice.address(),
            U256::ZERO,
            u(10),
        )
        .unwrap();
    assert_eq!(
        ledger.credit(HOLDER, id, alice.address()).await.unwrap(),
        (u(10), true),
        "the chain owes alice 10, withdrawable now"
    );

    let view = index.scan().await.unwrap();
    assert!(
        view.channels.iter().any(|c| c.id == id),
        "the channel is found"
    );
    // (Its conclusion log was read before it was hers: `concluded` may be
    // None, a documented limit; the credit is read, not inferred.)
    assert!(
        view.credits.iter().any(|c| c.channel == id),
        "the credit is found"
    );
    let got = index.recover_funds().await.unwrap();
    assert_eq!(got.total(HOLDER), u(10), "alice's 10 are not recovered");
}

/// Same bug with a lost store and one fresh scan: the conclusion and the late
/// deposit fall in different log queries (ranges), e.g. eight minutes apart
/// on mainnet with the default range of 2,000 blocks.
#[tokio::test]
async fn a_late_deposit_in_a_later_range_than_the_conclusion_is_recovered() {
    let ledger = SimLedger::new(1337);
    ledger.add_asset(HOLDER);
    let (alice, bob) = (Arc::new(LocalAccount::random()), LocalAccount::random());
    for who in [alice.address(), bob.address()] {
        ledger.mint(HOLDER, who, u(100));
    }
    let params = concluded_before_alice_funded(&ledger, &alice, &bob).await;
    let id = params.channel_id();
    traffic(&ledger, 30);
    ledger
        .deposit_to(
            HOLDER,
            alice.address(),
            id,
            alice.address(),
            U256::ZERO,
            u(10),
        )
        .unwrap();

    // The user lost the store: a fresh one, a scan in ranges of 16 blocks.
    let store: Arc<dyn Persister> = Arc::new(MemoryPersister::new());
    let adj: Arc<dyn Adjudicator> = Arc::new(ledger.clone());
    let cfg = IndexConfig {
        reread: 64,
        range: 16,
    };
    let index = ChainIndex::new(adj, store, alice.clone(), cfg).unwrap();
    let got = index.recover_funds().await.unwrap();
    assert_eq!(got.total(HOLDER), u(10), "alice's 10 are not recovered");
}

/// The contract's `holdings` says a slot is settled when the *channel* is
/// concluded (`Adjudicator.settled(channelId)`), for any participant
/// address; `setOutcome` only empties the listed participants' slots. So a
/// deposit for an address that is not a participant (a wrong channel id)
/// becomes withdrawable when the channel concludes. The sim leaves such a
/// slot "not settled" forever: it differs from the contract.
#[tokio::test]
async fn sim_settles_a_non_participant_slot_like_the_contract() {
    let ledger = SimLedger::new(1337);
    ledger.add_asset(HOLDER);
    let (alice, bob) = (LocalAccount::random(), LocalAccount::random());
    let carol = Address::repeat_byte(0xca);
    for who in [alice.address(), bob.address(), carol] {
        ledger.mint(HOLDER, who, u(100));
    }
    let params = concluded_before_alice_funded(&ledger, &alice, &bob).await;
    // Carol, not a participant, deposits into the concluded channel.
    ledger
        .deposit_to(HOLDER, carol, params.channel_id(), carol, U256::ZERO, u(4))
        .unwrap();
    assert_eq!(
        ledger
            .credit(HOLDER, params.channel_id(), carol)
            .await
            .unwrap(),
        (u(4), true),
        "AssetHolder.holdings answers (4, settled) here"
    );
}

// ---------------------------------------------------------------- a mock chain

/// A chain of fixed logs whose holder behaves like `AssetHolder.sol`
/// (`holdings`: the slot's amount and whether the channel is concluded).
#[derive(Default)]
struct Chain {
    logs: Vec<ChainLog>,
    safe: u64,
    /// (channel, participant) => held.
    held: Mutex<HashMap<(ChannelId, Address), U256>>,
    concluded: Vec<ChannelId>,
    /// Credit reads of these channels fail (a flaky node).
    failing: Vec<ChannelId>,
}

fn refused() -> perun::adjudicator::Error {
    perun::adjudicator::Error::Stopped
}

#[async_trait]
impl Adjudicator for Chain {
    fn domain(&self) -> Domain {
        Domain {
            chain_id: U256::from(1),
            adjudicator: Address::repeat_byte(0xad),
        }
    }
    async fn register(&self, _: &SignedChannel) -> perun::adjudicator::Result<()> {
        Err(refused())
    }
    async fn progress(
        &self,
        _: &perun::adjudicator::ProgressRequest,
    ) -> perun::adjudicator::Result<()> {
        Err(refused())
    }
    async fn conclude(&self, _: &SignedChannel) -> perun::adjudicator::Result<()> {
        Err(refused())
    }
    async fn withdraw(&self, _: &WithdrawRequest) -> perun::adjudicator::Result<()> {
        Err(refused())
    }
    async fn subscribe(&self, _: ChannelId) -> perun::adjudicator::Result<EventStream> {
        Err(refused())
    }
    async fn dispute(&self, _: ChannelId) -> perun::adjudicator::Result<Option<Dispute>> {
        Err(refused())
    }
    fn history(&self) -> Option<&dyn ChainHistory> {
        Some(self)
    }
}

#[async_trait]
impl ChainHistory for Chain {
    fn first_block(&self) -> u64 {
        1
    }
    async fn confirmed_block(&self) -> perun::adjudicator::Result<u64> {
        Ok(self.safe)
    }
    async fn logs(&self, from: u64, to: u64) -> perun::adjudicator::Result<LogPage> {
        Ok(LogPage {
            logs: self
                .logs
                .iter()
                .filter(|l| (from..=to).contains(&l.block))
                .cloned()
                .collect(),
            rejected: Vec::new(),
        })
    }
    async fn credit(
        &self,
        _: Address,
        channel: ChannelId,
        participant: Address,
    ) -> perun::adjudicator::Result<(U256, bool)> {
        if self.failing.contains(&channel) {
            return Err(perun::adjudicator::Error::rpc(
                "eth_call",
                RpcFailure::Missing("a node that answers"),
            ));
        }
        let held = self.held.lock().unwrap();
        Ok((
            held.get(&(channel, participant))
                .copied()
                .unwrap_or_default(),
            self.concluded.contains(&channel),
        ))
    }
    async fn withdraw_credit(
        &self,
        _: Address,
        channel: ChannelId,
        account: Arc<dyn Account>,
    ) -> perun::adjudicator::Result<U256> {
        if !self.concluded.contains(&channel) {
            return Err(perun::adjudicator::Error::NotConcluded);
        }
        let mut held = self.held.lock().unwrap();
        Ok(held
            .remove(&(channel, account.address()))
            .unwrap_or_default())
    }
}

fn at(block: u64, channel: ChannelId, fact: ChainFact) -> ChainLog {
    ChainLog {
        block,
        log_index: 0,
        channel,
        fact,
    }
}

fn deposited(who: Address, amount: u64) -> ChainFact {
    ChainFact::Deposited {
        holder: HOLDER,
        participant: who,
        amount: u(amount),
    }
}

fn credited(who: Address, amount: u64) -> ChainFact {
    ChainFact::Credited {
        holder: HOLDER,
        participant: who,
        amount: u(amount),
    }
}

fn index(chain: Chain, me: &Arc<LocalAccount>) -> ChainIndex {
    ChainIndex::new(
        Arc::new(chain),
        Arc::new(MemoryPersister::new()),
        me.clone(),
        IndexConfig::default(),
    )
    .unwrap()
}

/// Alice deposited 5 into a channel she is not a participant of (a wrong
/// channel id). When the channel concludes, `setOutcome` leaves her slot
/// alone and `holdings` reads (5, settled): withdrawable. Her deposit came
/// before the conclusion, so the index's "late deposit" rule skips it and
/// `recover_funds` never reads it.
#[tokio::test]
async fn a_deposit_for_a_non_participant_is_recovered_after_the_conclusion() {
    let me = Arc::new(LocalAccount::random());
    let ch = B256::repeat_byte(1);
    let chain = Chain {
        logs: vec![
            at(10, ch, deposited(me.address(), 5)),
            at(20, ch, ChainFact::Concluded { version: 3 }),
            // The participants' payouts.
            at(
                20,
                ch,
                ChainFact::Paid {
                    holder: HOLDER,
                    participant: Address::repeat_byte(0xb0),
                    amount: u(10),
                },
            ),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, mut l)| {
            l.log_index = i as u64;
            l
        })
        .collect(),
        safe: 30,
        held: Mutex::new(HashMap::from([((ch, me.address()), u(5))])),
        concluded: vec![ch],
        ..Chain::default()
    };
    let got = index(chain, &me).recover_funds().await.unwrap();
    assert_eq!(got.total(HOLDER), u(5), "alice's 5 are not recovered");
}

/// One credit read that fails (a flaky node: "faults are normal") makes the
/// whole scan fail, so `recover_funds` withdraws none of the other credits.
/// With hundreds of credits and a node that fails 1% of calls it almost
/// never succeeds.
#[tokio::test]
async fn one_failing_credit_read_does_not_block_the_other_recoveries() {
    let me = Arc::new(LocalAccount::random());
    let (good, flaky) = (B256::repeat_byte(1), B256::repeat_byte(2));
    let chain = Chain {
        logs: vec![
            at(10, good, credited(me.address(), 7)),
            at(11, flaky, credited(me.address(), 9)),
        ],
        safe: 30,
        held: Mutex::new(HashMap::from([
            ((good, me.address()), u(7)),
            ((flaky, me.address()), u(9)),
        ])),
        concluded: vec![good, flaky],
        failing: vec![flaky],
    };
    let got = index(chain, &me).recover_funds().await;
    let got = got.expect("one failed credit read fails the whole recovery");
    assert_eq!(got.total(HOLDER), u(7));
    assert_eq!(got.unread.len(), 1, "the flaky slot is reported as unread");
    assert_eq!(got.unread[0].channel, flaky);
}

/// Anyone may deposit zero for any address into any channel id
/// (`depositEth(ch, victim, 0)` with no value: about 26k gas, less batched).
/// Each such log names the victim, so the index keeps a "channel" and a fact
/// for it forever, and rewrites the whole record on every save; at the
/// metadata slot's 32 MiB limit every scan fails with `MetaTooLarge` and the
/// index can never move on. A zero deposit moves no money: it should not be
/// kept.
#[tokio::test]
async fn zero_deposits_by_strangers_do_not_grow_the_index() {
    let me = Arc::new(LocalAccount::random());
    let logs = (1..=50)
        .map(|b| {
            at(
                b,
                B256::from(rand::random::<[u8; 32]>()),
                deposited(me.address(), 0),
            )
        })
        .collect();
    let chain = Chain {
        logs,
        safe: 60,
        ..Chain::default()
    };
    let view = index(chain, &me).scan().await.unwrap();
    assert!(
        view.channels.is_empty(),
        "{} channels made up by zero deposits",
        view.channels.len()
    );
}
