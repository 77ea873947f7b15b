//! The conformance suite's backends: one environment type over SimLedger or anvil.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use alloy::providers::{DynProvider, Provider};
use alloy_primitives::{Address, Bytes, U256};
use async_trait::async_trait;
use perun_adjudicator::bindings::{AssetHolderETH, TestToken};
use perun_adjudicator::testing::{Anvil, CHAIN_ID};
use perun_adjudicator::types::WithdrawalAuth;
use perun_adjudicator::{
    Adjudicator, Deployment, EthAdjudicator, EthConfig, EthFunder, Funder, SimLedger, deploy,
    deploy_tictactoe,
};
use perun_channel::{Allocation, Asset, Domain, Params, SignedState, State};
use perun_wallet::{Account, LocalAccount};

/// Which asset a test runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Eth,
    Erc20,
}

/// What a test needs besides the two traits: the clock, balances, and the
/// raw signed withdrawal.
#[async_trait]
pub trait Control: Send + Sync {
    async fn advance(&self, secs: u64);
    async fn balance(&self, holder: Address, who: Address) -> U256;
    async fn holdings(
        &self,
        holder: Address,
        channel: perun_channel::B256,
        who: Address,
    ) -> (U256, bool);
    async fn set_rejecting(&self, who: Address);
    /// The holders' `deposit(fid, expectedHeld, amount)` for `who`'s slot in
    /// `channel`, paid by the env (not through a funder).
    async fn deposit(
        &self,
        holder: Address,
        channel: perun_channel::B256,
        who: Address,
        expected: U256,
        amount: U256,
    ) -> perun_adjudicator::Result<()>;
    async fn withdraw_signed(
        &self,
        holder: Address,
        auth: &WithdrawalAuth,
        sig: Bytes,
    ) -> perun_adjudicator::Result<()>;
}

pub struct Env {
    pub name: &'static str,
    pub parties: Vec<Arc<LocalAccount>>,
    pub adj: Vec<Arc<dyn Adjudicator>>,
    pub funders: Vec<Arc<dyn Funder>>,
    pub asset: Asset,
    /// The deployment channels must name.
    pub domain: Domain,
    /// The other asset (ERC20 in an ether env and vice versa), for multi-asset channels.
    pub other_asset: Asset,
    /// The tic-tac-toe app: deployed on anvil, the Rust app on the sim.
    pub app: Address,
    pub ctl: Box<dyn Control>,
    _anvil: Option<Anvil>,
}

/// Each party's starting balance of the test asset (in the sim: the participant's wallet; on
/// anvil: the party's gas payer).
pub fn start_funds() -> U256 {
    U256::from(10).pow(U256::from(21))
}

impl Env {
    pub async fn sim(kind: Kind, n: usize) -> Env {
        let sim = SimLedger::new(CHAIN_ID);
        let (eth, erc20) = (Address::repeat_byte(0xee), Address::repeat_byte(0xcc));
        let holder = match kind {
            Kind::Eth => eth,
            Kind::Erc20 => erc20,
        };
        sim.add_asset(eth);
        sim.add_asset(erc20);
        let app = Address::repeat_byte(0x77);
        sim.add_app(app, Arc::new(perun_channel::tictactoe::TicTacToe));
        let parties: Vec<_> = (0..n).map(|_| Arc::new(LocalAccount::random())).collect();
        for p in &parties {
            sim.mint(eth, p.address(), start_funds());
            sim.mint(erc20, p.address(), start_funds());
        }
        let adj = (0..n)
            .map(|_| Arc::new(sim.clone()) as Arc<dyn Adjudicator>)
            .collect();
        let funders = (0..n)
            .map(|_| Arc::new(sim.clone()) as Arc<dyn Funder>)
            .collect();
        Env {
            name: "sim",
            domain: sim.domain(),
            parties,
            adj,
            funders,
            asset: Asset {
                chainId: U256::from(CHAIN_ID),
                holder,
            },
            other_asset: Asset {
                chainId: U256::from(CHAIN_ID),
                holder: if holder == eth { erc20 } else { eth },
            },
            app,
            ctl: Box::new(SimCtl(sim)),
            _anvil: None,
        }
    }

    pub async fn anvil(kind: Kind, n: usize) -> Env {
        let anvil = Anvil::spawn().await.expect("anvil (run cargo xtask setup)");
        let deployer = anvil.funded_account().await.unwrap();
        let d = deploy(&anvil.provider(&deployer).await.unwrap())
            .await
            .unwrap();
        let app = deploy_tictactoe(&anvil.provider(&deployer).await.unwrap())
            .await
            .unwrap();
        let cfg = EthConfig::from_deployment(&d);
        let holder = match kind {
            Kind::Eth => d.eth_holder,
            Kind::Erc20 => d.erc20_holder,
        };
        let mut parties = Vec::new();
        let mut adj: Vec<Arc<dyn Adjudicator>> = Vec::new();
        let mut funders: Vec<Arc<dyn Funder>> = Vec::new();
        for _ in 0..n {
            // Participants only sign; a separate payer sends their transactions, so the
            // participants' balances change by payouts alone.
            let participant = Arc::new(LocalAccount::random());
            let payer = anvil.funded_account().await.unwrap();
            let provider = anvil.provider(&payer).await.unwrap();
            {
                let token = TestToken::new(d.token, provider.clone());
                token
                    .mint(payer.address(), start_funds())
                    .send()
                    .await
                    .unwrap()
                    .get_receipt()
                    .await
                    .unwrap();
            }
            let a = EthAdjudicator::new(provider.clone(), payer.address(), cfg.clone())
                .await
                .unwrap();
            let f = EthFunder::new(provider, payer.address(), cfg.clone())
                .await
                .unwrap();
            parties.push(participant);
            adj.push(Arc::new(a));
            funders.push(Arc::new(f));
        }
        let ctl_provider = anvil.provider(&deployer).await.unwrap();
        let ctl_adj = EthAdjudicator::new(ctl_provider.clone(), deployer.address(), cfg)
            .await
            .unwrap();
        let ctl = AnvilCtl {
            admin: anvil.admin().clone(),
            me: deployer.address(),
            provider: ctl_provider,
            adj: ctl_adj,
            d,
            anvil_url: anvil.ws_url(),
        };
        // The harness advances time through its own admin connection.
        let env = Env {
            name: "anvil",
            domain: Domain {
                chain_id: U256::from(CHAIN_ID),
                adjudicator: d.adjudicator,
            },
            parties,
            adj,
            funders,
            asset: Asset {
                chainId: U256::from(CHAIN_ID),
                holder,
            },
            other_asset: Asset {
                chainId: U256::from(CHAIN_ID),
                holder: if holder == d.eth_holder {
                    d.erc20_holder
                } else {
                    d.eth_holder
                },
            },
            app,
            ctl: Box::new(ctl),
            _anvil: None,
        };
        Env {
            _anvil: Some(anvil),
            ..env
        }
    }

    pub fn addresses(&self) -> Vec<Address> {
        self.parties.iter().map(|p| p.address()).collect()
    }

    /// A payment channel over the env's asset with the given version-0 balances (its funding).
    pub fn channel(&self, challenge: u64, balances: &[u64]) -> (Params, State) {
        self.channel_over(challenge, vec![self.asset.clone()], vec![balances.to_vec()])
    }

    /// A payment channel over `assets` with version-0 balances (its funding) `balances[asset]`.
    pub fn channel_over(
        &self,
        challenge: u64,
        assets: Vec<Asset>,
        balances: Vec<Vec<u64>>,
    ) -> (Params, State) {
        let rows: Vec<Vec<U256>> = balances
            .iter()
            .map(|r| r.iter().map(|b| U256::from(*b)).collect())
            .collect();
        let params = Params::payment(
            self.domain,
            challenge,
            U256::from(rand::random::<u64>()),
            self.addresses(),
            rows.clone(),
        );
        let state = State::initial(&params, Allocation::new(assets, rows));
        (params, state)
    }

    /// A tic-tac-toe channel over the env's asset with the given version-0 balances (its
    /// funding): an empty board, participant 0 to move.
    pub fn app_channel(&self, challenge: u64, balances: &[u64]) -> (Params, State) {
        let (mut params, mut state) = self.channel(challenge, balances);
        params.app = self.app;
        state.channelId = params.channel_id();
        state.appData = board(0, [0; 9]);
        (params, state)
    }

    /// The state signed by every party.
    pub fn sign_all(&self, params: &Params, state: &State) -> SignedState {
        let mut s = SignedState::new(state.clone());
        for (i, p) in self.parties.iter().enumerate() {
            s.sign(params, i, p.as_ref()).unwrap();
        }
        s
    }

    pub async fn balance(&self, who: Address) -> U256 {
        self.ctl.balance(self.asset.holder, who).await
    }

    pub async fn holdings(&self, state: &State, who: Address) -> (U256, bool) {
        self.ctl
            .holdings(self.asset.holder, state.channelId, who)
            .await
    }
}

struct SimCtl(SimLedger);

#[async_trait]
impl Control for SimCtl {
    async fn advance(&self, secs: u64) {
        self.0.advance(secs);
    }
    async fn balance(&self, holder: Address, who: Address) -> U256 {
        self.0.balance(holder, who)
    }
    async fn holdings(
        &self,
        holder: Address,
        channel: perun_channel::B256,
        who: Address,
    ) -> (U256, bool) {
        self.0
            .holdings(holder, perun_adjudicator::funding_id(channel, who))
    }
    async fn set_rejecting(&self, who: Address) {
        self.0.set_rejecting(who, true);
    }
    async fn deposit(
        &self,
        holder: Address,
        channel: perun_channel::B256,
        who: Address,
        expected: U256,
        amount: U256,
    ) -> perun_adjudicator::Result<()> {
        let fid = perun_adjudicator::funding_id(channel, who);
        self.0.deposit(holder, who, fid, expected, amount)
    }
    async fn withdraw_signed(
        &self,
        holder: Address,
        auth: &WithdrawalAuth,
        sig: Bytes,
    ) -> perun_adjudicator::Result<()> {
        match perun_wallet::parse_signature(&sig) {
            Ok(sig) => self.0.withdraw_signed(holder, auth, &sig),
            Err(_) => Err(perun_adjudicator::Error::BadAuthorization),
        }
    }
}

struct AnvilCtl {
    admin: DynProvider,
    /// The deployer, who sends `provider`'s transactions.
    me: Address,
    provider: DynProvider,
    adj: EthAdjudicator,
    d: Deployment,
    anvil_url: String,
}

#[async_trait]
impl Control for AnvilCtl {
    async fn advance(&self, secs: u64) {
        self.admin
            .raw_request::<_, serde_json::Value>("evm_increaseTime".into(), (secs,))
            .await
            .unwrap();
        self.admin
            .raw_request::<_, serde_json::Value>("evm_mine".into(), ())
            .await
            .unwrap();
    }
    async fn balance(&self, holder: Address, who: Address) -> U256 {
        if holder == self.d.eth_holder {
            self.admin.get_balance(who).await.unwrap()
        } else {
            TestToken::new(self.d.token, self.admin.clone())
                .balanceOf(who)
                .call()
                .await
                .unwrap()
        }
    }
    async fn holdings(
        &self,
        holder: Address,
        channel: perun_channel::B256,
        who: Address,
    ) -> (U256, bool) {
        let h = AssetHolderETH::new(holder, self.admin.clone());
        let r = h.holdings(channel, who).call().await.unwrap();
        (r.amount, r.settled)
    }
    async fn set_rejecting(&self, who: Address) {
        // The token refuses transfers to it, as a token with a block list would.
        TestToken::new(self.d.token, self.provider.clone())
            .setBlocked(who, true)
            .send()
            .await
            .unwrap()
            .get_receipt()
            .await
            .unwrap();
        // PUSH0 PUSH0 REVERT: any call, with or without value, reverts.
        self.admin
            .raw_request::<_, serde_json::Value>(
                "anvil_setCode".into(),
                (who, Bytes::from_static(&[0x5f, 0x5f, 0xfd])),
            )
            .await
            .unwrap();
    }
    async fn deposit(
        &self,
        holder: Address,
        channel: perun_channel::B256,
        who: Address,
        expected: U256,
        amount: U256,
    ) -> perun_adjudicator::Result<()> {
        use perun_adjudicator::bindings::eth_holder::AssetHolderETH::AssetHolderETHErrors as H;
        let mut value = amount;
        if holder == self.d.erc20_holder {
            let token = TestToken::new(self.d.token, self.provider.clone());
            let mint = token.mint(self.me, amount);
            mint.send().await.unwrap().get_receipt().await.unwrap();
            let approve = token.approve(holder, amount);
            approve.send().await.unwrap().get_receipt().await.unwrap();
            value = U256::ZERO;
        }
        let h = AssetHolderETH::new(holder, self.provider.clone());
        let call = h.deposit(channel, who, expected, amount).value(value);
        if let Err(e) = call.call().await {
            return match e.as_decoded_interface_error::<H>() {
                Some(H::HoldingsChanged(e)) => Err(perun_adjudicator::Error::HoldingsChanged {
                    funding_id: e.fundingId,
                    expected: e.expected,
                    found: Some(e.held),
                }),
                other => panic!("deposit reverted: {other:?}"),
            };
        }
        let receipt = call.send().await.unwrap().get_receipt().await.unwrap();
        assert!(receipt.status());
        Ok(())
    }
    async fn withdraw_signed(
        &self,
        holder: Address,
        auth: &WithdrawalAuth,
        sig: Bytes,
    ) -> perun_adjudicator::Result<()> {
        self.adj.withdraw_signed(holder, auth, &sig).await
    }
}

/// Waits for a condition with a deadline instead of sleeping blindly.
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// The stream's next event other than `CaughtUp` (which every subscription
/// sends once, after the channel's history).
pub async fn next_event(
    events: &mut perun_adjudicator::EventStream,
) -> Option<perun_adjudicator::Result<perun_adjudicator::AdjudicatorEvent>> {
    loop {
        match events.next().await {
            Some(Ok(perun_adjudicator::AdjudicatorEvent::CaughtUp { .. })) => continue,
            other => return other,
        }
    }
}

/// Tic-tac-toe appData: the next actor, then the nine cells.
pub fn board(next: u8, cells: [u8; 9]) -> Bytes {
    let mut d = vec![next];
    d.extend_from_slice(&cells);
    Bytes::from(d)
}
