//! Deterministic, really signed channels for the persistence tests.
#![allow(dead_code, unreachable_pub)]

use perun_channel::{Address, Allocation, Asset, Bytes, Params, Phase, SignedState, State, U256};
use perun_persistence::{Change, ChannelRecord};
use perun_wallet::{LocalAccount, keccak256};

/// A channel whose participants' keys derive from `seed`, so another
/// process can rebuild the same channel and check its signatures.
pub struct TestChannel {
    pub params: Params,
    pub accounts: Vec<LocalAccount>,
    pub assets: usize,
    pub app_data: usize,
}

impl TestChannel {
    /// A 2-party, 1-asset payment channel.
    pub fn two_party(seed: u64) -> Self {
        Self::new(seed, 2, 1, 0)
    }

    /// `participants` parties, `assets` assets; `app_data > 0` makes it an
    /// app channel whose states carry that many bytes of app data.
    pub fn new(seed: u64, participants: usize, assets: usize, app_data: usize) -> Self {
        let accounts: Vec<LocalAccount> = (0..participants)
            .map(|i| {
                let key = keccak256(format!("perun-persistence-test/{seed}/{i}"));
                LocalAccount::from_bytes(&key.0).expect("key")
            })
            .collect();
        let addrs = accounts
            .iter()
            .map(perun_wallet::Account::address)
            .collect();
        let domain = perun_channel::Domain {
            chain_id: U256::from(31337),
            adjudicator: Address::repeat_byte(0xad),
        };
        let funding = vec![vec![U256::from(1_000_000); participants]; assets];
        let mut params = Params::payment(domain, 60, U256::from(seed), addrs, funding);
        if app_data > 0 {
            params.app = Address::repeat_byte(0x42);
        }
        Self {
            params,
            accounts,
            assets,
            app_data,
        }
    }

    pub fn id(&self) -> perun_channel::ChannelId {
        self.params.channel_id()
    }

    /// The state of `version`: participant 0 has paid `version` to
    /// participant 1 in every asset; content depends only on the version.
    pub fn state(&self, version: u64) -> State {
        let n = self.accounts.len();
        let assets = (0..self.assets)
            .map(|a| Asset {
                chainId: U256::from(31337 + a),
                holder: Address::repeat_byte(0x10 + a as u8),
            })
            .collect();
        let balances = (0..self.assets)
            .map(|_| {
                (0..n)
                    .map(|i| match i {
                        0 => U256::from(1_000_000 - version),
                        1 => U256::from(1_000_000 + version),
                        _ => U256::from(1_000_000),
                    })
                    .collect()
            })
            .collect();
        let mut st = State::initial(&self.params, Allocation::new(assets, balances));
        st.version = version;
        if self.app_data > 0 {
            let mut data = vec![0u8; self.app_data];
            data[..8].copy_from_slice(&version.to_be_bytes());
            st.appData = Bytes::from(data);
        }
        st
    }

    /// `state(version)` signed by `signers`.
    pub fn signed_by(&self, version: u64, signers: &[usize]) -> SignedState {
        let mut st = SignedState::new(self.state(version));
        for &i in signers {
            st.sign(&self.params, i, &self.accounts[i]).expect("sign");
        }
        st
    }

    /// `state(version)` signed by everyone.
    pub fn signed(&self, version: u64) -> SignedState {
        let all: Vec<usize> = (0..self.accounts.len()).collect();
        self.signed_by(version, &all)
    }

    /// The write that stages `version`, signed by participant 0 only.
    pub fn stage(&self, version: u64) -> Vec<Change> {
        vec![
            Change::Staged(self.signed_by(version, &[0])),
            Change::Phase(Phase::Updating),
        ]
    }

    /// The write that commits `version`, fully signed.
    pub fn commit(&self, version: u64) -> Vec<Change> {
        vec![
            Change::Committed(self.signed(version)),
            Change::Phase(Phase::Active),
        ]
    }

    /// A fresh record as participant 0 would create it after proposing:
    /// version 0 staged with its own signature.
    pub fn record(&self) -> ChannelRecord {
        ChannelRecord {
            params: self.params.clone(),
            index: 0,
            phase: Phase::Signing0,
            current: None,
            staged: Some(self.signed_by(0, &[0])),
            peers: (0..self.accounts.len())
                .map(|i| format!("peer-{i}").into_bytes())
                .collect(),
            metadata: b"test".to_vec(),
            burnt: 0,
        }
    }
}

/// Panics unless `err` refuses a stale version: `got` against `stored`.
pub fn assert_stale(err: &perun_persistence::Error, stored: u64, got: u64) {
    assert!(
        matches!(
            err,
            perun_persistence::Error::StaleVersion { stored: s, got: g, .. }
                if *s == stored && *g == got
        ),
        "{err}"
    );
}
