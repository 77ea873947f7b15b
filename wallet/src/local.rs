//! A secp256k1 key held in process memory.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use alloy_primitives::{Address, B256, Signature, U256};
use k256::ecdsa::{SigningKey, VerifyingKey};

use crate::signature::{check_scalars, eip191_digest};
use crate::{Account, Error, Result, Wallet};

/// A local account: a secp256k1 key and its address.
///
/// The key is held twice: as a k256 key (for its public key, keystores and
/// the API) and as a libsecp256k1 key, which signs about three times faster
/// (an update needs a signature from every participant).
///
/// The `Debug` output shows only the address, never the key.
#[derive(Clone)]
pub struct LocalAccount {
    key: SigningKey,
    secp: secp256k1::SecretKey,
    address: Address,
}

impl LocalAccount {
    /// Builds an account from a 32-byte big-endian secret key.
    pub fn from_bytes(secret: &[u8; 32]) -> Result<Self> {
        let key = SigningKey::from_bytes(secret.into()).map_err(|_| Error::InvalidKey)?;
        Self::from_signing_key(key)
    }

    /// Builds an account from a 32-byte secret key given as a slice (any length
    /// other than 32 is an [`Error::InvalidKey`]).
    pub fn from_slice(secret: &[u8]) -> Result<Self> {
        let secret: &[u8; 32] = secret.try_into().map_err(|_| Error::InvalidKey)?;
        Self::from_bytes(secret)
    }

    /// A fresh account from the operating system's random number generator.
    pub fn random() -> Self {
        loop {
            // A k256 key is always a valid libsecp256k1 key; the loop only
            // satisfies the type system.
            if let Ok(a) = Self::from_signing_key(SigningKey::random(&mut rand::rngs::OsRng)) {
                return a;
            }
        }
    }

    fn from_signing_key(key: SigningKey) -> Result<Self> {
        let secp = secp256k1::SecretKey::from_byte_array(key.to_bytes().into())
            .map_err(|_| Error::InvalidKey)?;
        let address = Address::from_public_key(key.verifying_key());
        Ok(Self { key, secp, address })
    }

    /// The 32-byte secret key. Handle with care.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.key.to_bytes().into()
    }

    /// The account's public key.
    pub fn verifying_key(&self) -> &VerifyingKey {
        self.key.verifying_key()
    }
}

impl fmt::Debug for LocalAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalAccount")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl Account for LocalAccount {
    fn address(&self) -> Address {
        self.address
    }

    fn signs_in_process(&self) -> bool {
        true
    }

    fn sign_hash(&self, hash: B256) -> Result<Signature> {
        let digest = eip191_digest(hash);
        let sig = secp256k1::SECP256K1
            .sign_ecdsa_recoverable(secp256k1::Message::from_digest(digest.0), &self.secp);
        let (recid, rs) = sig.serialize_compact();
        let parity = match i32::from(recid) {
            0 => false,
            1 => true,
            // 2 and 3 (x ≥ n) cannot occur for a valid key in practice, and
            // the contract's `ecrecover` would not take them.
            other => return Err(Error::Signing(format!("recovery id {other}"))),
        };
        let r = U256::from_be_slice(&rs[..32]);
        let s = U256::from_be_slice(&rs[32..]);
        let sig = Signature::new(r, s, parity);
        // libsecp256k1 signs low-s; check anyway, as every verifier will.
        check_scalars(&sig)?;
        // Our own signature gets checked too (the store checks every record
        // it writes): it is ours by construction, so that is a lookup.
        crate::signature::memo::put(hash, &sig, self.address);
        Ok(sig)
    }
}

/// An in-memory [`Wallet`] of [`LocalAccount`]s.
#[derive(Debug, Default, Clone)]
pub struct LocalWallet {
    accounts: Arc<RwLock<BTreeMap<Address, Arc<LocalAccount>>>>,
}

impl LocalWallet {
    /// An empty wallet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an account and returns its address.
    pub fn insert(&self, account: LocalAccount) -> Address {
        let address = account.address();
        self.accounts
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(address, Arc::new(account));
        address
    }

    /// Creates, adds and returns a fresh random account.
    pub fn create(&self) -> Arc<LocalAccount> {
        let account = Arc::new(LocalAccount::random());
        self.accounts
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(account.address(), account.clone());
        account
    }
}

impl Wallet for LocalWallet {
    fn account(&self, address: Address) -> Result<Arc<dyn Account>> {
        self.accounts
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&address)
            .map(|a| a.clone() as Arc<dyn Account>)
            .ok_or(Error::UnknownAccount(address))
    }

    fn addresses(&self) -> Vec<Address> {
        self.accounts
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .keys()
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recover;
    use proptest::prelude::*;

    #[test]
    fn known_key_has_known_address() {
        // Anvil's first default account.
        let key = hex::decode("ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80")
            .unwrap();
        let a = LocalAccount::from_slice(&key).unwrap();
        assert_eq!(
            a.address(),
            "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
                .parse::<Address>()
                .unwrap()
        );
        assert_eq!(a.secret_bytes().as_slice(), key.as_slice());
    }

    #[test]
    fn invalid_keys_are_rejected() {
        assert!(matches!(
            LocalAccount::from_bytes(&[0u8; 32]),
            Err(Error::InvalidKey)
        ));
        assert!(matches!(
            LocalAccount::from_bytes(&[0xff; 32]),
            Err(Error::InvalidKey)
        ));
        assert!(matches!(
            LocalAccount::from_slice(&[1u8; 31]),
            Err(Error::InvalidKey)
        ));
    }

    #[test]
    fn debug_hides_the_key() {
        let a = LocalAccount::from_bytes(&[7u8; 32]).unwrap();
        let dbg = format!("{a:?}");
        assert!(!dbg.contains("0707"));
    }

    #[test]
    fn wallet_looks_up_accounts() {
        let w = LocalWallet::new();
        let a = w.create();
        let b = w.insert(LocalAccount::random());
        assert_eq!(w.account(a.address()).unwrap().address(), a.address());
        assert_eq!(w.addresses().len(), 2);
        assert!(w.addresses().contains(&b));
        let stranger = LocalAccount::random().address();
        assert!(matches!(w.account(stranger), Err(Error::UnknownAccount(x)) if x == stranger));
    }

    proptest! {
        #[test]
        fn signatures_are_low_s_and_recover(key in any::<[u8; 32]>(), hash in any::<[u8; 32]>()) {
            let Ok(a) = LocalAccount::from_bytes(&key) else { return Ok(()) };
            let h = B256::from(hash);
            let sig = a.sign_hash(h).unwrap();
            crate::signature::check_scalars(&sig).unwrap();
            prop_assert_eq!(recover(h, &sig).unwrap(), a.address());
        }

        /// libsecp256k1 signs exactly as k256 would (both RFC 6979, low-s):
        /// the test vectors and any peer see the same bytes.
        #[test]
        fn libsecp256k1_signs_as_k256(key in any::<[u8; 32]>(), hash in any::<[u8; 32]>()) {
            let Ok(a) = LocalAccount::from_bytes(&key) else { return Ok(()) };
            let h = B256::from(hash);
            let (k, recid) = a.key.sign_prehash_recoverable(eip191_digest(h).as_slice()).unwrap();
            let (k, parity) = match k.normalize_s() {
                Some(low) => (low, !recid.is_y_odd()),
                None => (k, recid.is_y_odd()),
            };
            let expected = Signature::new(
                U256::from_be_slice(&k.r().to_bytes()),
                U256::from_be_slice(&k.s().to_bytes()),
                parity,
            );
            prop_assert_eq!(a.sign_hash(h).unwrap(), expected);
        }
    }
}
