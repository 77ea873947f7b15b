//! Deterministic generation of `channel/tests/vectors.json`.
//!
//! Shared by the `gen_vectors` example (which writes the file) and the
//! `vectors` test (which checks the committed file against a regeneration and
//! re-verifies every entry independently).

use perun_channel::{Address, Allocation, Asset, Bytes, Params, State, U256};
use perun_wallet::{Account, LocalAccount, keccak256, signature_bytes};
use serde::{Deserialize, Serialize};

/// One entry of the vector file.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Vector {
    pub params: VParams,
    pub channel_id: String,
    pub state: VState,
    pub state_hash: String,
    pub private_key: String,
    pub signature: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VParams {
    pub challenge_duration: u64,
    pub nonce: String,
    pub participants: Vec<String>,
    pub app: String,
    pub chain_id: String,
    pub adjudicator: String,
    pub funding: Vec<Vec<String>>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VAsset {
    pub chain_id: String,
    pub holder: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VState {
    pub version: u64,
    pub assets: Vec<VAsset>,
    pub balances: Vec<Vec<String>>,
    pub app_data: String,
    pub is_final: bool,
}

fn hx(bytes: &[u8]) -> String {
    format!("0x{}", hex::encode(bytes))
}

fn u(x: U256) -> String {
    format!("{x:#x}")
}

/// A deterministic pseudo-random 32-byte word for `(case, label, i)`.
fn word(case: usize, label: &str, i: usize) -> [u8; 32] {
    keccak256(format!("perun-vectors/{case}/{label}/{i}")).0
}

/// A valid secret key derived from `(case, i)`.
fn key(case: usize, i: usize) -> LocalAccount {
    (0..)
        .find_map(|k| LocalAccount::from_bytes(&word(case, &format!("key{k}"), i)).ok())
        .expect("some candidate is a valid key")
}

/// Builds the params and state of case `case`.
pub fn case(
    case: usize,
    n: usize,
    assets: usize,
    app_data: usize,
) -> (Params, State, LocalAccount) {
    let signer_index = case % n;
    let accounts: Vec<LocalAccount> = (0..n).map(|i| key(case, i)).collect();
    let w = |label: &str, i: usize| U256::from_be_bytes(word(case, label, i));
    let app = if app_data > 0 || case % 4 == 3 {
        Address::from_slice(&word(case, "app", 0)[12..])
    } else {
        Address::ZERO
    };
    let asset_list: Vec<Asset> = (0..assets)
        .map(|i| Asset {
            chainId: if i == 0 {
                U256::from(1u64)
            } else {
                w("chain", i) >> 192
            },
            holder: Address::from_slice(&word(case, "holder", i)[12..]),
        })
        .collect();
    let balances: Vec<Vec<U256>> = (0..assets)
        .map(|a| {
            (0..n)
                .map(|p| {
                    // Mix small and large values, keep sums far from overflow.
                    let v = w("bal", a * 16 + p);
                    if (a + p + case).is_multiple_of(3) {
                        v >> 200
                    } else {
                        v >> 8
                    }
                })
                .collect()
        })
        .collect();
    // Funding is version 0's balances; later versions keep the per-asset sums.
    let params = Params {
        challengeDuration: 1 + (w("cd", 0) % U256::from(1_000_000u64)).to::<u64>(),
        nonce: w("nonce", 0),
        participants: accounts.iter().map(|a| a.address()).collect(),
        app,
        chainId: U256::from(1u64),
        adjudicator: Address::from_slice(&word(case, "adjudicator", 0)[12..]),
        funding: balances.clone(),
    };
    let app_data: Vec<u8> = (0..app_data)
        .map(|i| word(case, "data", i / 32)[i % 32])
        .collect();
    let state = State {
        channelId: params.channel_id(),
        version: (w("ver", 0) % U256::from(1u64 << 40)).to::<u64>() * (case as u64 % 3),
        outcome: Allocation::new(asset_list, balances),
        appData: Bytes::from(app_data),
        isFinal: case % 5 == 4,
    };
    (params, state, accounts[signer_index].clone())
}

/// The shapes covered: (participants, assets, appData length).
pub const SHAPES: &[(usize, usize, usize)] = &[
    (2, 1, 0),
    (2, 1, 1),
    (2, 3, 0),
    (2, 3, 64),
    (2, 1, 1000),
    (3, 1, 0),
    (3, 1, 33),
    (3, 3, 0),
    (3, 3, 5),
    (3, 3, 0),
    (16, 1, 0),
    (16, 1, 100),
    (16, 3, 0),
    (16, 3, 4096),
    (16, 3, 0),
    (4, 2, 0),
    (5, 1, 31),
    (7, 3, 0),
    (2, 16, 0),
    (16, 16, 65536),
    (2, 2, 32),
    (8, 1, 0),
    (3, 1, 0),
    (2, 3, 0),
];

/// Builds the whole vector list.
pub fn vectors() -> Vec<Vector> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, &(n, assets, data))| {
            let (params, state, signer) = case(i, n, assets, data);
            state.validate(&params).expect("generated state is valid");
            let sig = signer.sign_hash(state.hash()).expect("signing works");
            Vector {
                params: VParams {
                    challenge_duration: params.challengeDuration,
                    nonce: u(params.nonce),
                    participants: params
                        .participants
                        .iter()
                        .map(|p| p.to_checksum(None))
                        .collect(),
                    app: params.app.to_checksum(None),
                    chain_id: u(params.chainId),
                    adjudicator: params.adjudicator.to_checksum(None),
                    funding: params
                        .funding
                        .iter()
                        .map(|row| row.iter().map(|b| u(*b)).collect())
                        .collect(),
                },
                channel_id: hx(params.channel_id().as_slice()),
                state: VState {
                    version: state.version,
                    assets: state
                        .outcome
                        .assets
                        .iter()
                        .map(|a| VAsset {
                            chain_id: u(a.chainId),
                            holder: a.holder.to_checksum(None),
                        })
                        .collect(),
                    balances: state
                        .outcome
                        .balances
                        .iter()
                        .map(|row| row.iter().map(|b| u(*b)).collect())
                        .collect(),
                    app_data: hx(&state.appData),
                    is_final: state.isFinal,
                },
                state_hash: hx(state.hash().as_slice()),
                private_key: hx(&signer.secret_bytes()),
                signature: hx(&signature_bytes(&sig)),
            }
        })
        .collect()
}

/// The file's exact contents.
pub fn render() -> String {
    let mut s = serde_json::to_string_pretty(&vectors()).expect("vectors serialize");
    s.push('\n');
    s
}
