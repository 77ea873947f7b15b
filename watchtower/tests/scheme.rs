//! The privacy scheme: round trips, and every way a blob must fail to open.

use perun_channel::{Address, Allocation, Asset, Domain, Params, SignedState, State, U256};
use perun_wallet::{Account, LocalAccount, keccak256};
use perun_watchtower::Error;
use perun_watchtower::scheme::{ChannelSecret, KEY_TAG, LOCATOR_TAG, MAX_BLOB_LEN, open, seal};

fn channel(nonce: u64) -> (Params, SignedState) {
    let (alice, bob) = (LocalAccount::random(), LocalAccount::random());
    let domain = Domain {
        chain_id: U256::from(31337),
        adjudicator: Address::repeat_byte(0xad),
    };
    let balances = vec![vec![U256::from(10), U256::from(10)]];
    let params = Params::payment(
        domain,
        60,
        U256::from(nonce),
        vec![alice.address(), bob.address()],
        balances.clone(),
    );
    let asset = Asset {
        chainId: U256::from(31337),
        holder: Address::repeat_byte(0xaa),
    };
    let mut state = State::initial(&params, Allocation::new(vec![asset], balances)).next();
    state.outcome.balances[0] = vec![U256::from(7), U256::from(13)];
    let mut signed = SignedState::new(state);
    signed.sign(&params, 0, &alice).expect("alice signs");
    signed.sign(&params, 1, &bob).expect("bob signs");
    (params, signed)
}

#[test]
fn round_trip() {
    let (params, signed) = channel(1);
    let (locator, blob) = seal(&params, &signed).expect("seal");
    let secret = ChannelSecret::of(&params);
    assert_eq!(locator, secret.locator());
    assert!(blob.len() <= MAX_BLOB_LEN);
    let (p, s) = open(&secret, &blob).expect("open");
    assert_eq!(p, params);
    assert_eq!(s, signed);
}

#[test]
fn two_seals_differ() {
    // A fresh AEAD nonce each time: the tower cannot tell a resent state.
    let (params, signed) = channel(1);
    let (_, a) = seal(&params, &signed).expect("seal");
    let (_, b) = seal(&params, &signed).expect("seal");
    assert_ne!(a, b);
}

#[test]
fn wrong_key_fails() {
    let (params, signed) = channel(1);
    let (_, blob) = seal(&params, &signed).expect("seal");
    let mut secret = ChannelSecret::of(&params);
    secret.nonce += U256::from(1);
    assert!(matches!(open(&secret, &blob), Err(Error::Decrypt)));
}

#[test]
fn tampered_blob_fails() {
    let (params, signed) = channel(1);
    let (_, blob) = seal(&params, &signed).expect("seal");
    let secret = ChannelSecret::of(&params);
    for i in [0, 12, blob.len() / 2, blob.len() - 1] {
        let mut bad = blob.clone();
        bad[i] ^= 1;
        assert!(
            matches!(open(&secret, &bad), Err(Error::Decrypt)),
            "byte {i}"
        );
    }
    assert!(matches!(
        open(&secret, &blob[..20]),
        Err(Error::TooShort(20))
    ));
    let huge = vec![0u8; MAX_BLOB_LEN + 1];
    assert!(matches!(open(&secret, &huge), Err(Error::TooLarge { .. })));
}

#[test]
fn another_channels_key_cannot_open() {
    let (p1, s1) = channel(1);
    let (p2, _) = channel(2);
    let (_, blob) = seal(&p1, &s1).expect("seal");
    assert!(matches!(
        open(&ChannelSecret::of(&p2), &blob),
        Err(Error::Decrypt)
    ));
}

#[test]
fn blob_with_bad_signature_is_refused() {
    let (params, mut signed) = channel(1);
    // Bob's slot holds Alice's signature: valid bytes, wrong signer.
    signed.sigs[1] = signed.sigs[0];
    let (_, blob) = seal(&params, &signed).expect("seal");
    assert!(matches!(
        open(&ChannelSecret::of(&params), &blob),
        Err(Error::BadState(_))
    ));
}

#[test]
fn locator_is_not_computable_from_the_channel_id() {
    // What the chain shows before a dispute is the channel id (deposits); the
    // locator and the key also need the nonce. Hashing the id alone, with or
    // without a tag, or with a zero nonce, never gives the locator.
    let (params, _) = channel(0xdead_beef);
    let secret = ChannelSecret::of(&params);
    let id = secret.channel_id;
    let locator = secret.locator();
    let mut tagged = LOCATOR_TAG.to_vec();
    tagged.extend_from_slice(id.as_slice());
    let zero = ChannelSecret {
        channel_id: id,
        nonce: U256::ZERO,
    };
    for guess in [keccak256(id), keccak256(&tagged), id, zero.locator()] {
        assert_ne!(guess, locator);
    }
    // Domain separation: the locator (public to the tower) is not the key.
    assert_ne!(locator.0, secret.key());
    assert_ne!(LOCATOR_TAG, KEY_TAG);
}
