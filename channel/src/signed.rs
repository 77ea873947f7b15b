//! States together with their participants' signatures.

use alloy_primitives::Signature;
use perun_wallet::Account;
use serde::{Deserialize, Serialize};

use crate::{Error, Params, Result, State};

/// A state and one signature slot per participant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedState {
    /// The state.
    pub state: State,
    /// `sigs[i]` is participant `i`'s signature, once it has one.
    pub sigs: Vec<Option<Signature>>,
}

impl SignedState {
    /// A state with no signatures yet; the slots are sized on first use.
    pub fn new(state: State) -> Self {
        Self {
            state,
            sigs: Vec::new(),
        }
    }

    fn ensure_slots(&mut self, n: usize) -> Result<()> {
        if self.sigs.is_empty() {
            self.sigs = vec![None; n];
        }
        if self.sigs.len() != n {
            return Err(Error::SignatureCount {
                expected: n,
                got: self.sigs.len(),
            });
        }
        Ok(())
    }

    /// Signs the state as participant `index` and stores the signature.
    pub fn sign(
        &mut self,
        params: &Params,
        index: usize,
        account: &dyn Account,
    ) -> Result<Signature> {
        let hash = self.state.hash();
        self.sign_hashed(params, index, account, hash, None)
    }

    /// [`sign`](Self::sign) with the state's hash already computed.
    pub(crate) fn sign_hashed(
        &mut self,
        params: &Params,
        index: usize,
        account: &dyn Account,
        hash: alloy_primitives::B256,
        made: Option<Signature>,
    ) -> Result<Signature> {
        let addr = *params.participants.get(index).ok_or(Error::Index(index))?;
        if account.address() != addr {
            return Err(Error::BadSignature {
                index,
                reason: format!("account {} is not participant {addr}", account.address()),
            });
        }
        if !self.sigs.is_empty() && self.sigs.len() != params.participants.len() {
            return Err(Error::SignatureCount {
                expected: params.participants.len(),
                got: self.sigs.len(),
            });
        }
        // Signed before anything changes: on error the state is as it was.
        let sig = match made {
            Some(sig) => sig,
            None => account.sign_hash(hash)?,
        };
        self.ensure_slots(params.participants.len())?;
        self.sigs[index] = Some(sig);
        Ok(sig)
    }

    /// Verifies `sig` as participant `index`'s signature and stores it.
    pub fn add_signature(&mut self, params: &Params, index: usize, sig: Signature) -> Result<()> {
        let hash = self.state.hash();
        self.add_signature_hashed(params, index, sig, hash)
    }

    /// [`add_signature`](Self::add_signature) with the state's hash already
    /// computed.
    pub(crate) fn add_signature_hashed(
        &mut self,
        params: &Params,
        index: usize,
        sig: Signature,
        hash: alloy_primitives::B256,
    ) -> Result<()> {
        verify_hash_sig(params, hash, index, &sig)?;
        self.ensure_slots(params.participants.len())?;
        self.sigs[index] = Some(sig);
        Ok(())
    }

    /// Stores participant `index`'s signature, verified by the caller.
    pub(crate) fn set_verified(
        &mut self,
        params: &Params,
        index: usize,
        sig: Signature,
    ) -> Result<()> {
        self.ensure_slots(params.participants.len())?;
        let slot = self.sigs.get_mut(index).ok_or(Error::Index(index))?;
        *slot = Some(sig);
        Ok(())
    }

    /// Whether every participant's slot holds a signature (not re-verified).
    pub fn is_fully_signed(&self) -> bool {
        !self.sigs.is_empty() && self.sigs.iter().all(Option::is_some)
    }

    /// Verifies that the state is valid for `params` and every participant signed it.
    pub fn verify_all(&self, params: &Params) -> Result<()> {
        self.state.validate(params)?;
        let n = params.participants.len();
        if self.sigs.len() != n {
            return Err(Error::SignatureCount {
                expected: n,
                got: self.sigs.len(),
            });
        }
        // Hashing a large state costs more than a remembered check: once.
        let hash = self.state.hash();
        for (i, sig) in self.sigs.iter().enumerate() {
            let sig = sig.as_ref().ok_or(Error::MissingSignature(i))?;
            verify_hash_sig(params, hash, i, sig)?;
        }
        Ok(())
    }

    /// The signatures in participant order, if all are present.
    pub fn signatures(&self) -> Result<Vec<Signature>> {
        self.sigs
            .iter()
            .enumerate()
            .map(|(i, s)| s.ok_or(Error::MissingSignature(i)))
            .collect()
    }
}

/// Verifies `sig` as participant `index`'s EIP-191 signature on `state`.
pub fn verify_sig(params: &Params, state: &State, index: usize, sig: &Signature) -> Result<()> {
    verify_hash_sig(params, state.hash(), index, sig)
}

pub(crate) fn verify_hash_sig(
    params: &Params,
    hash: alloy_primitives::B256,
    index: usize,
    sig: &Signature,
) -> Result<()> {
    let addr = *params.participants.get(index).ok_or(Error::Index(index))?;
    perun_wallet::verify(hash, sig, addr).map_err(|e| Error::BadSignature {
        index,
        reason: e.to_string(),
    })
}
