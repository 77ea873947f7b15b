//! Checks `tests/vectors.json`, the file other implementations test against:
//! it must equal a fresh regeneration, and every entry must re-verify from its
//! own fields alone (ids, hashes, signatures, signer).

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

#[allow(dead_code, unreachable_pub, missing_docs)]
mod support {
    pub mod vectors;
}

use perun_channel::{Address, Allocation, Asset, Bytes, Params, State, U256};
use perun_wallet::{Account, LocalAccount, parse_signature, recover};
use support::vectors::{Vector, render};

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s.strip_prefix("0x").expect("0x prefix")).expect("hex")
}

fn num(s: &str) -> U256 {
    s.parse().expect("0x number")
}

fn load() -> (String, Vec<Vector>) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors.json");
    let text = std::fs::read_to_string(path).expect("tests/vectors.json exists");
    let parsed = serde_json::from_str(&text).expect("vectors.json parses");
    (text, parsed)
}

#[test]
fn committed_file_equals_regeneration() {
    let (text, _) = load();
    assert!(
        text == render(),
        "channel/tests/vectors.json is stale: run `cargo xtask vectors`"
    );
}

#[test]
fn every_entry_verifies_from_its_fields() {
    let (_, vectors) = load();
    assert!(vectors.len() >= 20);
    for (i, v) in vectors.iter().enumerate() {
        let params = Params {
            challengeDuration: v.params.challenge_duration,
            nonce: num(&v.params.nonce),
            participants: v
                .params
                .participants
                .iter()
                .map(|p| p.parse::<Address>().expect("address"))
                .collect(),
            app: v.params.app.parse().expect("app address"),
            chainId: num(&v.params.chain_id),
            adjudicator: v.params.adjudicator.parse().expect("adjudicator address"),
            funding: v
                .params
                .funding
                .iter()
                .map(|row| row.iter().map(|x| num(x)).collect())
                .collect(),
        };
        assert_eq!(
            format!("{}", params.channel_id()),
            v.channel_id,
            "entry {i}"
        );
        let state = State {
            channelId: params.channel_id(),
            version: v.state.version,
            outcome: Allocation::new(
                v.state
                    .assets
                    .iter()
                    .map(|a| Asset {
                        chainId: num(&a.chain_id),
                        holder: a.holder.parse().expect("holder"),
                    })
                    .collect(),
                v.state
                    .balances
                    .iter()
                    .map(|row| row.iter().map(|b| num(b)).collect())
                    .collect(),
            ),
            appData: Bytes::from(unhex(&v.state.app_data)),
            isFinal: v.state.is_final,
        };
        state.validate(&params).expect("valid state");
        assert_eq!(format!("{}", state.hash()), v.state_hash, "entry {i}");
        let signer = LocalAccount::from_slice(&unhex(&v.private_key)).expect("key");
        assert!(
            params.index_of(signer.address()).is_some(),
            "signer is a participant"
        );
        let sig = parse_signature(&unhex(&v.signature)).expect("canonical signature");
        assert_eq!(
            recover(state.hash(), &sig).expect("recovers"),
            signer.address()
        );
        // k256 signs deterministically (RFC 6979): re-signing gives the same bytes.
        assert_eq!(signer.sign_hash(state.hash()).expect("sign"), sig);
    }
}

#[test]
fn vectors_cover_the_required_shapes() {
    let (_, vectors) = load();
    let has = |f: &dyn Fn(&Vector) -> bool| vectors.iter().any(f);
    for n in [2, 3, 16] {
        assert!(
            has(&|v| v.params.participants.len() == n),
            "{n} participants"
        );
    }
    for a in [1, 3] {
        assert!(has(&|v| v.state.assets.len() == a), "{a} assets");
    }
    assert!(has(&|v| v.state.app_data == "0x"));
    assert!(has(&|v| v.state.app_data.len() > 2));
    assert!(has(&|v| v.state.is_final) && has(&|v| !v.state.is_final));
}
