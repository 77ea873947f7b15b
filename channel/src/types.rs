//! The channel structs, declared once in Solidity syntax.
//!
//! `sol!` generates Rust types whose `abi_encode` is byte-for-byte
//! Solidity's `abi.encode`, so hashes computed here equal the contract's.

#![allow(missing_docs)] // Generated field docs; the Solidity names are the documentation.

use alloy_primitives::{Address, Bytes, U256};

alloy_sol_types::sol! {
    /// The fixed parameters of a channel; their hash is the channel id.
    #[derive(Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
    struct Params {
        /// Seconds a registered state can be refuted before it is final.
        uint64 challengeDuration;
        /// Derived from every participant's nonce share, so no party picks it alone.
        uint256 nonce;
        /// The participants' on-chain addresses, in index order.
        address[] participants;
        /// The app contract; zero for a payment channel.
        address app;
        /// The chain of the adjudicator that settles the channel.
        uint256 chainId;
        /// The adjudicator contract that settles the channel.
        address adjudicator;
        /// What each participant deposits: `funding[asset][participant]`, assets in the
        /// order of the states' outcome (version 0's balances).
        uint256[][] funding;
    }

    /// A token on some chain, held by an asset holder contract.
    #[derive(Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
    struct Asset {
        uint256 chainId;
        /// The asset holder contract.
        address holder;
    }

    /// Who gets what: `balances[asset][participant]`.
    #[derive(Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
    struct Allocation {
        Asset[] assets;
        uint256[][] balances;
    }

    /// One version of a channel's off-chain state.
    #[derive(Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
    struct State {
        bytes32 channelId;
        uint64 version;
        Allocation outcome;
        bytes appData;
        bool isFinal;
    }
}

/// The deployment a channel is settled by: the adjudicator contract and its chain. The channel
/// id binds it, so a state signed for one deployment is worthless on any other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Domain {
    /// The adjudicator's chain id.
    pub chain_id: U256,
    /// The adjudicator contract.
    pub adjudicator: Address,
}

impl Params {
    /// Parameters of a payment channel (no app) settled by `domain`, where participant `i`
    /// deposits `funding[asset][i]` (version 0's balances).
    pub fn payment(
        domain: Domain,
        challenge_duration: u64,
        nonce: U256,
        participants: Vec<Address>,
        funding: Vec<Vec<U256>>,
    ) -> Self {
        Self {
            challengeDuration: challenge_duration,
            nonce,
            participants,
            app: Address::ZERO,
            chainId: domain.chain_id,
            adjudicator: domain.adjudicator,
            funding,
        }
    }

    /// The deployment that settles this channel.
    pub fn domain(&self) -> Domain {
        Domain {
            chain_id: self.chainId,
            adjudicator: self.adjudicator,
        }
    }

    /// What participant `who` deposits of asset `asset` (zero if either index is out of range).
    pub fn funding_of(&self, asset: usize, who: usize) -> U256 {
        self.funding
            .get(asset)
            .and_then(|r| r.get(who))
            .copied()
            .unwrap_or_default()
    }

    /// Whether this is a payment channel (`app == address(0)`).
    pub fn is_payment(&self) -> bool {
        self.app == Address::ZERO
    }

    /// The index of `address` among the participants.
    pub fn index_of(&self, address: Address) -> Option<usize> {
        self.participants.iter().position(|p| *p == address)
    }
}

impl Allocation {
    /// An allocation of `balances[asset][participant]` over `assets`.
    pub fn new(assets: Vec<Asset>, balances: Vec<Vec<U256>>) -> Self {
        Self { assets, balances }
    }
}

impl State {
    /// Version 0 of the channel described by `params`.
    pub fn initial(params: &Params, outcome: Allocation) -> Self {
        Self {
            channelId: params.channel_id(),
            version: 0,
            outcome,
            appData: Bytes::new(),
            isFinal: false,
        }
    }

    /// The state that follows this one: same contents, version + 1.
    pub fn next(&self) -> Self {
        let mut next = self.clone();
        next.version = self.version.saturating_add(1);
        next
    }

    /// Balance of participant `who` in asset `asset`, if both indices exist.
    pub fn balance(&self, asset: usize, who: usize) -> Option<U256> {
        self.outcome.balances.get(asset)?.get(who).copied()
    }
}
