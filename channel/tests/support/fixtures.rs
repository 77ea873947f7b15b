//! Proptest strategies and fixtures for channel tests.

use perun_channel::{Address, Allocation, Asset, Bytes, Domain, Params, State, U256};
use perun_wallet::{Account, LocalAccount};
use proptest::prelude::*;

/// `n` deterministic accounts.
pub fn accounts(n: usize) -> Vec<LocalAccount> {
    (0..n)
        .map(|i| {
            let mut k = [0u8; 32];
            k[31] = i as u8 + 1;
            k[0] = 0x42;
            LocalAccount::from_bytes(&k).expect("valid key")
        })
        .collect()
}

/// The deployment every fixture names.
pub fn domain() -> Domain {
    Domain {
        chain_id: U256::from(31337),
        adjudicator: Address::repeat_byte(0xad),
    }
}

/// A payment channel between `n` deterministic accounts with `assets`
/// assets, every balance `bal`.
pub fn fixture(n: usize, assets: usize, bal: u64) -> (Params, State, Vec<LocalAccount>) {
    let accs = accounts(n);
    let params = Params::payment(
        domain(),
        60,
        U256::from(7),
        accs.iter().map(|a| a.address()).collect(),
        vec![vec![U256::from(bal); n]; assets],
    );
    let alloc = Allocation::new(
        (0..assets)
            .map(|i| Asset {
                chainId: U256::from(31337),
                holder: Address::repeat_byte(0x10 + i as u8),
            })
            .collect(),
        vec![vec![U256::from(bal); n]; assets],
    );
    let state = State::initial(&params, alloc);
    (params, state, accs)
}

fn addr() -> impl Strategy<Value = Address> {
    any::<[u8; 20]>().prop_map(Address::from)
}

fn u256() -> impl Strategy<Value = U256> {
    prop_oneof![
        any::<u64>().prop_map(U256::from),
        any::<[u8; 32]>().prop_map(|b| U256::from_be_bytes(b) >> 8),
    ]
}

prop_compose! {
    /// Arbitrary valid params with 2..=5 distinct non-zero participants.
    pub fn params()(
        cd in 1u64..=perun_channel::limits::MAX_CHALLENGE_DURATION,
        nonce in u256(),
        participants in proptest::collection::btree_set(addr(), 2..=5),
        app in prop_oneof![Just(Address::ZERO), addr()],
        assets in 1usize..=3,
    ) -> Params {
        let participants = participants.into_iter().filter(|a| *a != Address::ZERO).collect::<Vec<_>>();
        // `state_of` gives the state as many assets as there are funding rows.
        let funding = vec![vec![U256::ZERO; participants.len()]; assets];
        let d = domain();
        Params { challengeDuration: cd, nonce, participants, app, chainId: d.chain_id, adjudicator: d.adjudicator, funding }
    }
}

prop_compose! {
    /// An arbitrary valid state of `params` with 1..=3 assets.
    pub fn state_of(params: Params)(
        assets in proptest::collection::vec((u256(), addr()), params.funding.len()),
        seed in proptest::collection::vec(any::<u64>(), 48),
        version in 0u64..u64::MAX / 2,
        data in proptest::collection::vec(any::<u8>(), 0..64),
        is_final in any::<bool>(),
    ) -> State {
        let n = params.participants.len();
        let balances = (0..assets.len())
            .map(|a| (0..n).map(|p| U256::from(seed[(a * 16 + p) % 48])).collect())
            .collect();
        State {
            channelId: params.channel_id(),
            version,
            outcome: Allocation::new(
                assets.into_iter().map(|(c, h)| Asset { chainId: c, holder: h }).collect(),
                balances,
            ),
            appData: if params.is_payment() { Bytes::new() } else { Bytes::from(data) },
            isFinal: is_final,
        }
    }
}

/// Params and a valid state of them.
pub fn params_and_state() -> impl Strategy<Value = (Params, State)> {
    params().prop_flat_map(|p| (Just(p.clone()), state_of(p)))
}
