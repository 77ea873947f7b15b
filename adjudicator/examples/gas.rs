//! Measures the gas of every contract operation on anvil and writes
//! `target/bench/gas.json` (run by `cargo xtask gas`).
//!
//! Participants send their own transactions, as a client would. Payouts are
//! pushed when a channel concludes, so both closes end with both parties'
//! ether in their accounts without a withdrawal transaction;
//! `withdraw_eth` measures the pull path that a refused push falls back to.

use std::collections::BTreeMap;
use std::path::PathBuf;

use alloy::network::TransactionBuilder;
use alloy::providers::{DynProvider, Provider};
use alloy::rpc::types::TransactionReceipt;
use alloy_primitives::{Address, Bytes, U256};
use perun_adjudicator::bindings::{
    Adjudicator, AssetHolderERC20, AssetHolderETH, TestToken, TicTacToeApp,
};
use perun_adjudicator::testing::{Anvil, CHAIN_ID};
use perun_adjudicator::types::{WithdrawalAuth, withdrawal_hash};
use perun_adjudicator::{Error, Result};
use perun_channel::{Allocation, Asset, Params, SignedState, State};
use perun_wallet::{Account, LocalAccount};

type Gas = BTreeMap<String, u64>;

fn chain(e: impl std::fmt::Display) -> Error {
    Error::Anvil(e.to_string())
}

async fn mined(
    pending: std::result::Result<
        alloy::providers::PendingTransactionBuilder<alloy::network::Ethereum>,
        alloy::contract::Error,
    >,
) -> Result<TransactionReceipt> {
    let receipt = pending.map_err(chain)?.get_receipt().await.map_err(chain)?;
    if !receipt.status() {
        return Err(Error::Anvil(format!(
            "{} reverted",
            receipt.transaction_hash
        )));
    }
    Ok(receipt)
}

fn sigs(s: &SignedState) -> Result<Vec<Bytes>> {
    Ok(s.signatures()
        .map_err(perun_adjudicator::Error::Channel)?
        .iter()
        .map(|s| Bytes::from(s.as_bytes().to_vec()))
        .collect())
}

fn sign_all(params: &Params, state: &State, parties: &[&LocalAccount]) -> Result<SignedState> {
    let mut s = SignedState::new(state.clone());
    for (i, p) in parties.iter().enumerate() {
        s.sign(params, i, *p)?;
    }
    Ok(s)
}

struct Bench {
    anvil: Anvil,
    alice: LocalAccount,
    bob: LocalAccount,
    pa: DynProvider,
    pb: DynProvider,
    adjudicator: Address,
    eth: Address,
    erc20: Address,
    token: Address,
    gas: Gas,
}

impl Bench {
    fn record(&mut self, key: &str, r: &TransactionReceipt) {
        println!("{key:<34} {:>9}", r.gas_used);
        self.gas.insert(key.to_string(), r.gas_used);
    }

    fn channel(&self, amounts: [u64; 2], holder: Address) -> (Params, State) {
        let domain = perun_channel::Domain {
            chain_id: U256::from(CHAIN_ID),
            adjudicator: self.adjudicator,
        };
        let params = Params::payment(
            domain,
            60,
            U256::from(rand::random::<u64>()),
            vec![self.alice.address(), self.bob.address()],
            vec![amounts.iter().map(|a| U256::from(*a)).collect()],
        );
        let asset = Asset {
            chainId: U256::from(CHAIN_ID),
            holder,
        };
        let alloc = Allocation::new(
            vec![asset],
            vec![amounts.iter().map(|a| U256::from(*a)).collect()],
        );
        let state = State::initial(&params, alloc);
        (params, state)
    }

    async fn deposit_eth(
        &self,
        p: &DynProvider,
        state: &State,
        who: Address,
        amount: u64,
    ) -> Result<TransactionReceipt> {
        let h = AssetHolderETH::new(self.eth, p.clone());
        // Every deposit here is its slot's first (or the first after a payout): nothing held.
        mined(
            h.depositEth(state.channelId, who, U256::ZERO)
                .value(U256::from(amount))
                .send()
                .await,
        )
        .await
    }
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("gas: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<()> {
    let anvil = Anvil::spawn().await?;
    let alice = anvil.funded_account().await?;
    let bob = anvil.funded_account().await?;
    let relayer = anvil.funded_account().await?;
    let pa = anvil.provider(&alice).await?;
    let pb = anvil.provider(&bob).await?;
    let pr = anvil.provider(&relayer).await?;
    let mut gas = Gas::new();

    let r = mined(Adjudicator::deploy_builder(pa.clone()).send().await).await?;
    let adjudicator = r.contract_address.ok_or_else(|| chain("no address"))?;
    gas.insert("deploy_adjudicator".into(), r.gas_used);
    let r = mined(
        AssetHolderETH::deploy_builder(pa.clone(), adjudicator)
            .send()
            .await,
    )
    .await?;
    let eth = r.contract_address.ok_or_else(|| chain("no address"))?;
    gas.insert("deploy_holder_eth".into(), r.gas_used);
    let r = mined(TestToken::deploy_builder(pa.clone()).send().await).await?;
    let token = r.contract_address.ok_or_else(|| chain("no address"))?;
    let r = mined(
        AssetHolderERC20::deploy_builder(pa.clone(), adjudicator, token)
            .send()
            .await,
    )
    .await?;
    let erc20 = r.contract_address.ok_or_else(|| chain("no address"))?;
    gas.insert("deploy_holder_erc20".into(), r.gas_used);
    let mut b = Bench {
        anvil,
        alice,
        bob,
        pa,
        pb,
        adjudicator,
        eth,
        erc20,
        token,
        gas,
    };
    for k in [
        "deploy_adjudicator",
        "deploy_holder_eth",
        "deploy_holder_erc20",
    ] {
        println!("{k:<34} {:>9}", b.gas[k]);
    }
    let (alice, bob) = (b.alice.clone(), b.bob.clone());
    let parties = [&alice, &bob];

    // Cooperative close: fund, then concludeFinal pays both.
    let (params, s0) = b.channel([1_000, 1_000], b.eth);
    let r = b.deposit_eth(&b.pa, &s0, alice.address(), 1_000).await?;
    b.record("deposit_eth_first", &r);
    let r = b.deposit_eth(&b.pb, &s0, bob.address(), 1_000).await?;
    b.record("deposit_eth_second", &r);
    let mut fin = s0.next();
    fin.outcome.balances[0] = vec![U256::from(700), U256::from(1_300)];
    fin.isFinal = true;
    let signed = sign_all(&params, &fin, &parties)?;
    let adj_a = Adjudicator::new(b.adjudicator, b.pa.clone());
    let bob_before = b.pb.get_balance(bob.address()).await.map_err(chain)?;
    let r = mined(
        adj_a
            .concludeFinal((&params).into(), (&fin).into(), sigs(&signed)?)
            .send()
            .await,
    )
    .await?;
    let bob_after = b.pb.get_balance(bob.address()).await.map_err(chain)?;
    if bob_after - bob_before != U256::from(1_300) {
        return Err(chain("concludeFinal did not pay bob"));
    }
    b.record("conclude_final", &r);
    b.gas
        .insert("cooperative_close_2p_eth_total".into(), r.gas_used);

    // ERC20 deposit (approve measured separately).
    let (_, t0) = b.channel([1_000, 1_000], b.erc20);
    let tok = TestToken::new(b.token, b.pa.clone());
    mined(tok.mint(alice.address(), U256::from(10_000)).send().await).await?;
    let r = mined(tok.approve(b.erc20, U256::from(1_000)).send().await).await?;
    b.record("approve_erc20", &r);
    let h20 = AssetHolderETH::new(b.erc20, b.pa.clone());
    let r = mined(
        h20.deposit(t0.channelId, alice.address(), U256::ZERO, U256::from(1_000))
            .send()
            .await,
    )
    .await?;
    b.record("deposit_erc20_first", &r);

    // Dispute: register, refute, conclude after the timeout (pays both).
    let (params, s0) = b.channel([1_000, 1_000], b.eth);
    b.deposit_eth(&b.pa, &s0, alice.address(), 1_000).await?;
    b.deposit_eth(&b.pb, &s0, bob.address(), 1_000).await?;
    let mut s1 = s0.next();
    s1.outcome.balances[0] = vec![U256::from(900), U256::from(1_100)];
    let s2 = {
        let mut s = s1.next();
        s.outcome.balances[0] = vec![U256::from(800), U256::from(1_200)];
        s
    };
    let adj_b = Adjudicator::new(b.adjudicator, b.pb.clone());
    let r = mined(
        adj_a
            .register(
                (&params).into(),
                (&s1).into(),
                sigs(&sign_all(&params, &s1, &parties)?)?,
            )
            .send()
            .await,
    )
    .await?;
    b.record("register", &r);
    let register_gas = r.gas_used;
    let r = mined(
        adj_b
            .register(
                (&params).into(),
                (&s2).into(),
                sigs(&sign_all(&params, &s2, &parties)?)?,
            )
            .send()
            .await,
    )
    .await?;
    b.record("refute", &r);
    b.anvil.increase_time(61).await?;
    let r = mined(adj_a.conclude((&params).into(), (&s2).into()).send().await).await?;
    b.record("conclude", &r);
    let conclude_gas = r.gas_used;

    // The dispute total without a refutation: register, wait, conclude (which pays both).
    let (params, s0) = b.channel([1_000, 1_000], b.eth);
    b.deposit_eth(&b.pa, &s0, alice.address(), 1_000).await?;
    b.deposit_eth(&b.pb, &s0, bob.address(), 1_000).await?;
    let s1 = {
        let mut s = s0.next();
        s.outcome.balances[0] = vec![U256::from(900), U256::from(1_100)];
        s
    };
    let r1 = mined(
        adj_a
            .register(
                (&params).into(),
                (&s1).into(),
                sigs(&sign_all(&params, &s1, &parties)?)?,
            )
            .send()
            .await,
    )
    .await?;
    b.anvil.increase_time(61).await?;
    let bob_before = b.pb.get_balance(bob.address()).await.map_err(chain)?;
    let r2 = mined(adj_a.conclude((&params).into(), (&s1).into()).send().await).await?;
    let bob_after = b.pb.get_balance(bob.address()).await.map_err(chain)?;
    if bob_after - bob_before != U256::from(1_100) {
        return Err(chain("conclude did not pay bob"));
    }
    b.gas.insert(
        "dispute_close_2p_eth_total".into(),
        r1.gas_used + r2.gas_used,
    );
    let _ = (register_gas, conclude_gas);

    // An app channel (tic-tac-toe): register, then after the refutation period the first
    // progression (Bob's move, signed by Bob alone), a second one (Alice's), and the conclusion.
    let r = mined(TicTacToeApp::deploy_builder(b.pa.clone()).send().await).await?;
    let app = r.contract_address.ok_or_else(|| chain("no address"))?;
    b.gas.insert("deploy_tictactoe_app".into(), r.gas_used);
    let (mut params, mut t0) = b.channel([1_000, 1_000], b.eth);
    params.app = app;
    t0.channelId = params.channel_id();
    t0.appData = board(0, [0; 9]);
    b.deposit_eth(&b.pa, &t0, alice.address(), 1_000).await?;
    b.deposit_eth(&b.pb, &t0, bob.address(), 1_000).await?;
    // Each move hands the pot to the mover until the other answers.
    let mv = |prev: &State, next: u8, cells: [u8; 9], pot_to: usize| {
        let mut s = prev.next();
        s.appData = board(next, cells);
        s.outcome.balances[0] = vec![U256::ZERO; 2];
        s.outcome.balances[0][pot_to] = U256::from(2_000);
        s
    };
    let t1 = mv(&t0, 1, [0, 0, 0, 0, 1, 0, 0, 0, 0], 0);
    let t2 = mv(&t1, 0, [2, 0, 0, 0, 1, 0, 0, 0, 0], 1);
    let t3 = mv(&t2, 1, [2, 0, 0, 0, 1, 0, 0, 0, 1], 0);
    mined(
        adj_a
            .register(
                (&params).into(),
                (&t1).into(),
                sigs(&sign_all(&params, &t1, &parties)?)?,
            )
            .send()
            .await,
    )
    .await?;
    b.anvil.increase_time(61).await?;
    let sig2 = bob.sign_hash(t2.hash())?;
    let r = mined(
        adj_b
            .progress(
                (&params).into(),
                (&t1).into(),
                (&t2).into(),
                U256::from(1),
                Bytes::from(sig2.as_bytes().to_vec()),
            )
            .send()
            .await,
    )
    .await?;
    b.record("progress_first", &r);
    let sig3 = alice.sign_hash(t3.hash())?;
    let r = mined(
        adj_a
            .progress(
                (&params).into(),
                (&t2).into(),
                (&t3).into(),
                U256::ZERO,
                Bytes::from(sig3.as_bytes().to_vec()),
            )
            .send()
            .await,
    )
    .await?;
    b.record("progress", &r);
    b.anvil.increase_time(61).await?;
    let r = mined(adj_a.conclude((&params).into(), (&t3).into()).send().await).await?;
    b.record("conclude_app", &r);

    // Pull withdrawals: a deposit after conclusion is credited to its participant.
    b.deposit_eth(&b.pa, &s0, alice.address(), 500).await?;
    let auth = WithdrawalAuth {
        channelId: s0.channelId,
        participant: alice.address(),
        receiver: alice.address(),
        amount: U256::from(500),
        nonce: U256::ZERO,
    };
    let ha = AssetHolderETH::new(b.eth, b.pa.clone());
    let r = mined(
        ha.withdraw(to_holder_auth(&auth), Bytes::new())
            .send()
            .await,
    )
    .await?;
    b.record("withdraw_eth", &r);
    b.deposit_eth(&b.pa, &s0, alice.address(), 500).await?;
    let sig = alice.sign_hash(withdrawal_hash(b.eth, U256::from(CHAIN_ID), &auth))?;
    let hr = AssetHolderETH::new(b.eth, pr.clone());
    let r = mined(
        hr.withdraw(to_holder_auth(&auth), Bytes::from(sig.as_bytes().to_vec()))
            .send()
            .await,
    )
    .await?;
    b.record("withdraw_eth_signed", &r);
    // A plain ether transfer, for scale.
    let tx = alloy::rpc::types::TransactionRequest::default()
        .with_to(bob.address())
        .with_value(U256::from(1));
    let r =
        b.pa.send_transaction(tx)
            .await
            .map_err(chain)?
            .get_receipt()
            .await
            .map_err(chain)?;
    b.record("eth_transfer_reference", &r);

    for k in [
        "cooperative_close_2p_eth_total",
        "dispute_close_2p_eth_total",
    ] {
        println!("{k:<34} {:>9}", b.gas[k]);
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
        .join("target/bench");
    std::fs::create_dir_all(&dir).map_err(chain)?;
    let json = serde_json::to_string_pretty(&b.gas).map_err(chain)?;
    let path = dir.join("gas.json");
    std::fs::write(&path, json + "\n").map_err(chain)?;
    println!("wrote {}", path.display());
    Ok(())
}

/// Tic-tac-toe appData: the next actor, then the nine cells.
fn board(next: u8, cells: [u8; 9]) -> Bytes {
    let mut d = vec![next];
    d.extend_from_slice(&cells);
    Bytes::from(d)
}

fn to_holder_auth(
    a: &WithdrawalAuth,
) -> perun_adjudicator::bindings::eth_holder::AssetHolder::WithdrawalAuth {
    perun_adjudicator::bindings::eth_holder::AssetHolder::WithdrawalAuth {
        channelId: a.channelId,
        participant: a.participant,
        receiver: a.receiver,
        amount: a.amount,
        nonce: a.nonce,
    }
}
