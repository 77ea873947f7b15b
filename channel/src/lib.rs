//! The channel model: what a state is, how it is hashed and signed, and
//! which changes to it are allowed.
//!
//! Nothing here does I/O. The same rules run in the client before it signs
//! and in tests against the Solidity contracts, so a state the client
//! accepts is one the adjudicator accepts.
//!
//! # Layout
//! - [`types`]: `Params`, `Asset`, `Allocation`, `State` declared once with
//!   alloy's `sol!`, so their ABI encoding is Solidity's by construction.
//! - [`hash`]: channel ids, state hashes, nonce derivation.
//! - [`limits`]: the size limits every decoder and validator enforces.
//! - [`rules`]: validity of params and states, and the generic transition rule.
//! - [`app`]: the `App` trait an app channel's rules implement, off-chain and on-chain.
//! - [`tictactoe`]: one real app, the same rules as `TicTacToeApp.sol`.
//! - [`serial`]: serializers of those types that allocate nothing, for the codecs.
//! - [`signed`]: `SignedState` and signing / verification helpers.
//! - [`machine`]: the channel's phases and the `Machine` that moves between them.
//! - [`error`]: the crate's one error enum.
//!
//! # Example
//! ```
//! use perun_channel::{Params, State, Allocation, Asset, Domain, SignedState, Address, U256};
//! use perun_wallet::{Account, LocalAccount};
//!
//! let (alice, bob) = (LocalAccount::random(), LocalAccount::random());
//! let domain = Domain { chain_id: U256::from(31337), adjudicator: Address::repeat_byte(0xad) };
//! let balances = vec![vec![U256::from(10), U256::from(10)]];
//! let params = Params::payment(domain, 60, U256::from(1), vec![alice.address(), bob.address()], balances.clone());
//! let asset = Asset { chainId: U256::from(31337), holder: Address::repeat_byte(0xaa) };
//! let alloc = Allocation::new(vec![asset], balances);
//! let state = State::initial(&params, alloc);
//! state.validate(&params)?;
//!
//! let mut signed = SignedState::new(state);
//! signed.sign(&params, 0, &alice)?;
//! signed.sign(&params, 1, &bob)?;
//! signed.verify_all(&params)?;
//! # Ok::<(), perun_channel::Error>(())
//! ```

pub mod app;
pub mod error;
pub mod hash;
pub mod limits;
pub mod machine;
pub mod rules;
pub mod serial;
pub mod signed;
pub mod throttle;
pub mod tictactoe;
pub mod types;

pub use alloy_primitives::{Address, B256, Bytes, Signature, U256};
pub use app::{App, AppRejection, PaymentApp};
pub use error::{Error, Result};
pub use hash::{ChannelId, derive_nonce};
pub use machine::{Machine, Phase, Presigned};
pub use signed::SignedState;
pub use types::{Allocation, Asset, Domain, Params, State};
