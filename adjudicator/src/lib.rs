//! The on-chain half of perun: funding, disputes and payouts, behind two
//! traits with an Ethereum backend and an in-memory one that follows the
//! same rules.
//!
//! # Layout
//! - `contracts/`: the Solidity adjudicator and asset holders, `build.js`
//!   (pinned solc-js) and the committed `artifacts/` that `cargo xtask
//!   contracts` rebuilds byte-for-byte.
//! - [`traits`]: [`Funder`] and [`Adjudicator`], used by the client as `Arc<dyn _>`.
//! - [`types`]: requests ([`FundingRequest`], [`SignedChannel`],
//!   [`WithdrawRequest`]), [`Dispute`], [`AdjudicatorEvent`] and [`EventStream`].
//! - [`bindings`]: `sol!` bindings generated from the artifacts, and [`deploy`].
//! - [`eth`]: [`EthAdjudicator`] (`eth/adjudicator.rs`) and [`EthFunder`]
//!   (`eth/funder.rs`) over an alloy websocket provider, and what they share:
//!   `eth/txqueue.rs`, the one transaction queue per account (nonces,
//!   simulation, fees under a cap, replacement, confirmation, dedupe);
//!   `eth/fees.rs`, the fee arithmetic; `eth/conn.rs`, the connection
//!   (timeouts, typed failures, rebuilding a dead provider, block headers);
//!   `eth/scan.rs`, the one event scanner an adjudicator's subscriptions
//!   share; `eth/feed.rs`, the [`RegistrationFeed`] of every dispute on the
//!   adjudicator (for a watchtower); `eth/revert.rs`, revert data decoded
//!   into [`Error`]s.
//! - [`feed`]: [`RegistrationFeed`] and [`FeedItem`], backend-neutral.
//! - [`history`]: [`ChainHistory`], a deployment's channel logs by block
//!   range and the holders' credits (reached through
//!   [`Adjudicator::history`]; `eth/history.rs` and [`SimLedger`]), for the
//!   client's chain index.
//! - [`sim`]: [`SimLedger`], the in-memory ledger with a controllable clock.
//! - `testing` (feature `testing`): the anvil harness for tests and benchmarks
//!   (clock, snapshot/revert and `anvil_reorg`, a background block miner,
//!   the transaction pool and base fee, or attached to a running node), the
//!   JSON-RPC fault proxy `RpcProxy` and the fault-injecting backend wrapper
//!   `FaultyChain`, both on a seeded schedule.
//! - [`error`]: the crate's one error enum.
//!
//! # Rules both backends follow
//! Funding deposits only what is missing of a participant's version-0 share,
//! naming the holdings it expects (a deposit that meets other holdings is
//! refused, so none lands twice), then waits for everybody (the funding timeout names who did not fund). A
//! fully signed state can be registered; a strictly newer one refutes it until
//! the timeout; afterwards the registered state concludes, and a fully signed
//! final state concludes at once unless a newer version is registered. The params
//! name the chain and adjudicator (`WrongDomain` otherwise). Concluding pushes the
//! payouts; a payout that cannot be delivered stays credited and is pulled with
//! `withdraw`, which is idempotent. A channel whose every slot holds its funding
//! pays the outcome plus each depositor's surplus; any other pays back exactly the
//! deposits.
//!
//! # Example
//! ```
//! use std::time::Duration;
//! use perun_adjudicator::{Adjudicator, Funder, FundingRequest, SignedChannel, SimLedger};
//! use perun_channel::{Address, Allocation, Asset, Params, SignedState, State, U256};
//! use perun_wallet::{Account, LocalAccount};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let ledger = SimLedger::new(1337);
//! let eth = Address::repeat_byte(0xee);
//! ledger.add_asset(eth);
//! let (alice, bob) = (LocalAccount::random(), LocalAccount::random());
//! for who in [alice.address(), bob.address()] {
//!     ledger.mint(eth, who, U256::from(100));
//! }
//! let funding = vec![vec![U256::from(10); 2]];
//! let params = Params::payment(ledger.domain(), 60, U256::from(1), vec![alice.address(), bob.address()], funding.clone());
//! let asset = Asset { chainId: U256::from(1337), holder: eth };
//! let state = State::initial(&params, Allocation::new(vec![asset], funding));
//! for index in 0..2 {
//!     let req = FundingRequest { params: params.clone(), state: state.clone(), index, timeout: Duration::ZERO };
//!     let _ = ledger.fund(req).await; // Alice alone times out; Bob completes it.
//! }
//! let mut fin = state.next();
//! fin.isFinal = true;
//! let mut signed = SignedState::new(fin);
//! signed.sign(&params, 0, &alice)?;
//! signed.sign(&params, 1, &bob)?;
//! ledger.conclude(&SignedChannel { params, state: signed }).await?;
//! assert_eq!(ledger.balance(eth, bob.address()), U256::from(100));
//! # Ok::<(), perun_adjudicator::Error>(())
//! # }).unwrap();
//! ```

pub mod bindings;
pub mod error;
pub mod eth;
pub mod feed;
pub mod history;
pub mod sim;
#[cfg(feature = "testing")]
pub mod testing;
pub mod traits;
pub mod types;

pub use bindings::{Deployment, deploy, deploy_tictactoe};
pub use error::{AppRevert, BadEventReason, Error, ProxyError, Result, RevertReason, RpcFailure};
pub use eth::{AssetKind, EthAdjudicator, EthConfig, EthFunder, ws_provider};
pub use feed::{FeedItem, RegistrationFeed};
pub use history::{ChainFact, ChainHistory, ChainLog, LogPage};
pub use perun_channel::Domain;
pub use sim::SimLedger;
pub use traits::{Adjudicator, Funder};
pub use types::{
    AdjudicatorEvent, Dispute, EventSink, EventStream, FundingRequest, ProgressRequest,
    SignedChannel, WithdrawRequest, funding_id,
};
