//! EIP-191 signing digests and strict signature checks.
//!
//! The adjudicator contract accepts a signature only if `v ∈ {27, 28}` and
//! `s ≤ n/2`; rejecting the same signatures off-chain means a state that the
//! client accepted is always one the contract accepts too.

use alloy_primitives::{Address, B256, Signature, U256, keccak256};

use crate::{Error, Result};

/// The secp256k1 group order `n`.
const ORDER: U256 = U256::from_be_bytes([
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe,
    0xba, 0xae, 0xdc, 0xe6, 0xaf, 0x48, 0xa0, 0x3b, 0xbf, 0xd2, 0x5e, 0x8c, 0xd0, 0x36, 0x41, 0x41,
]);

/// `n / 2`: the largest `s` a non-malleable signature may carry.
const HALF_ORDER: U256 = ORDER.wrapping_shr(1);

/// The digest that is actually signed for a 32-byte message hash:
/// `keccak256("\x19Ethereum Signed Message:\n32" ‖ hash)`.
pub fn eip191_digest(hash: B256) -> B256 {
    let mut buf = [0u8; 60];
    buf[..28].copy_from_slice(b"\x19Ethereum Signed Message:\n32");
    buf[28..].copy_from_slice(hash.as_slice());
    keccak256(buf)
}

/// The 65-byte `r ‖ s ‖ v` encoding with `v ∈ {27, 28}`, as the contracts expect.
pub fn signature_bytes(sig: &Signature) -> [u8; 65] {
    sig.as_bytes()
}

/// Checks that a signature is canonical: `r, s ∈ [1, n)` and `s ≤ n/2`.
pub(crate) fn check_scalars(sig: &Signature) -> Result<()> {
    let (r, s) = (sig.r(), sig.s());
    if r.is_zero() || s.is_zero() || r >= ORDER || s >= ORDER {
        return Err(Error::ScalarOutOfRange);
    }
    if s > HALF_ORDER {
        return Err(Error::HighS);
    }
    Ok(())
}

/// Parses a 65-byte `r ‖ s ‖ v` signature, rejecting a wrong length, `v ∉ {27, 28}`,
/// out-of-range scalars and high `s`.
pub fn parse_signature(bytes: &[u8]) -> Result<Signature> {
    let bytes: &[u8; 65] = bytes
        .try_into()
        .map_err(|_| Error::SignatureLength(bytes.len()))?;
    let parity = match bytes[64] {
        27 => false,
        28 => true,
        v => return Err(Error::BadRecoveryId(v)),
    };
    let r = U256::from_be_slice(&bytes[..32]);
    let s = U256::from_be_slice(&bytes[32..64]);
    let sig = Signature::new(r, s, parity);
    check_scalars(&sig)?;
    Ok(sig)
}

/// Recovers the signer of `hash` (signed the EIP-191 way) from a canonical signature.
pub fn recover(hash: B256, sig: &Signature) -> Result<Address> {
    check_scalars(sig)?;
    sig.recover_address_from_prehash(&eip191_digest(hash))
        .map_err(|_| Error::Recovery)
}

/// Checks that `sig` is a canonical EIP-191 signature of `hash` by `signer`.
///
/// Each signature of a channel state is checked when it arrives, again when
/// the store writes the record and again when it is loaded. Recovery is a
/// pure function of `(hash, sig)`, so `verify` remembers the signers it
/// recovered (a bounded memo, see [`memo`]) and a repeated check is a
/// lookup. The scalar checks run every time.
pub fn verify(hash: B256, sig: &Signature, signer: Address) -> Result<()> {
    check_scalars(sig)?;
    let recovered = match memo::get(hash, sig) {
        Some(a) => a,
        None => {
            memo::MISSES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let a = recover(hash, sig)?;
            memo::put(hash, sig, a);
            a
        }
    };
    if recovered == signer {
        Ok(())
    } else {
        Err(Error::WrongSigner {
            expected: signer,
            recovered,
        })
    }
}

/// The memo of recovered signers behind [`verify`].
pub mod memo {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{LazyLock, Mutex, PoisonError};

    use alloy_primitives::{Address, B256, Signature};

    /// Most remembered checks (about 8 MB at most: enough for the two
    /// signatures of 30,000 restored channels to be checked on load and
    /// again when the client builds them); the memo starts over when full,
    /// which costs only recoveries.
    pub const CAPACITY: usize = 65_536;

    type Key = ([u8; 32], [u8; 65]);

    static MEMO: LazyLock<Mutex<HashMap<Key, Address>>> =
        LazyLock::new(|| Mutex::new(HashMap::new()));

    /// Checks that found nothing here and recovered (see [`misses`]).
    pub(crate) static MISSES: AtomicU64 = AtomicU64::new(0);

    fn key(hash: B256, sig: &Signature) -> Key {
        (hash.0, sig.as_bytes())
    }

    pub(crate) fn get(hash: B256, sig: &Signature) -> Option<Address> {
        let map = MEMO.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&key(hash, sig)).copied()
    }

    /// Records that `signer` made `sig` over `hash` (only for signatures
    /// recovered, or made by the caller itself).
    pub(crate) fn put(hash: B256, sig: &Signature, signer: Address) {
        let mut map = MEMO.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= CAPACITY {
            map.clear();
        }
        map.insert(key(hash, sig), signer);
    }

    /// How many checks are remembered (for tests and diagnostics).
    pub fn len() -> usize {
        MEMO.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// How many checks in this process so far found nothing here and
    /// recovered the signer. A benchmark reads it to prove it measured the
    /// checks a deployment makes: two clients in one process find each
    /// other's signatures here (each signer remembers its own) and never
    /// recover one.
    ///
    /// ```
    /// use perun_wallet::{Account, LocalAccount, memo, verify};
    /// use alloy_primitives::B256;
    ///
    /// let alice = LocalAccount::random();
    /// let hash = B256::repeat_byte(7);
    /// let sig = alice.sign_hash(hash)?;
    /// let before = memo::misses();
    /// memo::clear(); // as if the signature had come from another process
    /// verify(hash, &sig, alice.address())?;
    /// assert!(memo::misses() > before);
    /// # Ok::<(), perun_wallet::Error>(())
    /// ```
    pub fn misses() -> u64 {
        MISSES.load(Ordering::Relaxed)
    }

    /// Forgets every remembered check (benchmarks measure cold checks).
    pub fn clear() {
        MEMO.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Account, LocalAccount};

    #[test]
    fn half_order_is_n_div_2() {
        assert_eq!(HALF_ORDER * U256::from(2) + U256::from(1), ORDER);
    }

    #[test]
    fn sign_then_verify_and_parse_round_trip() {
        let a = LocalAccount::random();
        let h = B256::repeat_byte(1);
        let sig = a.sign_hash(h).unwrap();
        let bytes = signature_bytes(&sig);
        assert!(bytes[64] == 27 || bytes[64] == 28);
        let parsed = parse_signature(&bytes).unwrap();
        assert_eq!(parsed, sig);
        verify(h, &parsed, a.address()).unwrap();
    }

    #[test]
    fn wrong_signer_and_wrong_hash_are_rejected() {
        let a = LocalAccount::random();
        let b = LocalAccount::random();
        let h = B256::repeat_byte(2);
        let sig = a.sign_hash(h).unwrap();
        assert!(matches!(
            verify(h, &sig, b.address()),
            Err(Error::WrongSigner { .. })
        ));
        assert!(verify(B256::repeat_byte(3), &sig, a.address()).is_err());
    }

    #[test]
    fn high_s_twin_is_rejected() {
        let a = LocalAccount::random();
        let h = B256::repeat_byte(4);
        let sig = a.sign_hash(h).unwrap();
        // (r, n - s, !v) is the malleable twin: valid for plain ecrecover, rejected here.
        let twin = Signature::new(sig.r(), ORDER - sig.s(), !sig.v());
        assert!(matches!(check_scalars(&twin), Err(Error::HighS)));
        assert!(matches!(recover(h, &twin), Err(Error::HighS)));
        assert!(matches!(
            parse_signature(&twin.as_bytes()),
            Err(Error::HighS)
        ));
    }

    #[test]
    fn bad_v_length_and_scalars_are_rejected() {
        let a = LocalAccount::random();
        let sig = a.sign_hash(B256::ZERO).unwrap();
        let mut bytes = sig.as_bytes();
        for v in [0u8, 1, 26, 29, 35, 255] {
            bytes[64] = v;
            assert!(matches!(
                parse_signature(&bytes),
                Err(Error::BadRecoveryId(x)) if x == v
            ));
        }
        assert!(matches!(
            parse_signature(&bytes[..64]),
            Err(Error::SignatureLength(64))
        ));
        let zero_r = [
            &[0u8; 32][..],
            &sig.s().to_be_bytes::<32>()[..],
            &[27u8][..],
        ]
        .concat();
        assert!(matches!(
            parse_signature(&zero_r),
            Err(Error::ScalarOutOfRange)
        ));
    }

    #[test]
    fn remembered_checks_decide_exactly_as_fresh_ones() {
        let (a, b) = (LocalAccount::random(), LocalAccount::random());
        let h = B256::repeat_byte(9);
        let sig = a.sign_hash(h).unwrap();
        for _ in 0..3 {
            verify(h, &sig, a.address()).unwrap();
            assert!(matches!(
                verify(h, &sig, b.address()),
                Err(Error::WrongSigner { .. })
            ));
            // The memo is keyed by the whole signature, `v` included.
            let flipped = Signature::new(sig.r(), sig.s(), !sig.v());
            assert!(verify(h, &flipped, a.address()).is_err());
            // And by the hash.
            assert!(verify(B256::repeat_byte(8), &sig, a.address()).is_err());
            // Scalar checks run on every call, remembered or not.
            let high = Signature::new(sig.r(), ORDER - sig.s(), !sig.v());
            assert!(matches!(verify(h, &high, a.address()), Err(Error::HighS)));
        }
        assert!(memo::len() >= 1);
    }

    #[test]
    fn digest_matches_alloy_eip191() {
        let h = B256::repeat_byte(9);
        assert_eq!(
            eip191_digest(h),
            alloy_primitives::eip191_hash_message(h.as_slice())
        );
    }
}
