//! States together with their participants' signatures.

use alloy_primitives::Signature;
use perun_wallet::Account;
use serde::{Deserialize, Serialize};

use crate::{Allocation, Error, Params, Result, State};

/// A state and one signature slot per participant.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedState {
    /// The state.
    pub state: State,
    /// `sigs[i]` is participant `i`'s signature, once it has one.
    pub sigs: Vec<Option<Signature>>,
}

impl Clone for SignedState {
    fn clone(&self) -> Self {
        Self {
            state: self.state.clone(),
            sigs: self.sigs.clone(),
        }
    }

    /// Copies into `self`'s vectors instead of allocating new ones (a
    /// state's `clone` allocates four times): a state published to
    /// readers on every update replaces the previous one this way.
    fn clone_from(&mut self, src: &Self) {
        // Destructured, so a new field anywhere fails to compile here.
        let SignedState { state, sigs } = src;
        let State {
            channelId,
            version,
            outcome,
            appData,
            isFinal,
        } = state;
        let Allocation { assets, balances } = outcome;
        let to = &mut self.state;
        to.channelId = *channelId;
        to.version = *version;
        to.outcome.assets.clone_from(assets);
        to.outcome.balances.clone_from(balances);
        to.appData.clone_from(appData);
        to.isFinal = *isFinal;
        self.sigs.clone_from(sigs);
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Address, Asset, B256, Bytes, U256};

    fn shaped(assets: usize, parts: usize, app: usize, sigs: usize, seed: u64) -> SignedState {
        let w = |i: usize| U256::from(seed * 1000 + i as u64);
        SignedState {
            state: State {
                channelId: B256::repeat_byte(seed as u8),
                version: seed,
                outcome: Allocation {
                    assets: (0..assets)
                        .map(|i| Asset {
                            chainId: w(i),
                            holder: Address::repeat_byte(i as u8),
                        })
                        .collect(),
                    balances: (0..assets)
                        .map(|a| (0..parts).map(|p| w(a * 10 + p)).collect())
                        .collect(),
                },
                appData: Bytes::from(vec![seed as u8; app]),
                isFinal: seed.is_multiple_of(2),
            },
            sigs: (0..sigs)
                .map(|i| {
                    i.is_multiple_of(2)
                        .then(|| Signature::new(w(i), w(i + 1), i.is_multiple_of(3)))
                })
                .collect(),
        }
    }

    /// `clone_from` leaves an equal copy whatever shape the target had.
    #[test]
    fn clone_from_copies_every_shape() {
        let shapes = [(0, 0, 0, 0), (1, 2, 0, 2), (2, 3, 40, 3), (3, 1, 7, 1)];
        for (i, a) in shapes.iter().enumerate() {
            for (j, b) in shapes.iter().enumerate() {
                let src = shaped(a.0, a.1, a.2, a.3, i as u64 + 1);
                let mut dst = shaped(b.0, b.1, b.2, b.3, j as u64 + 7);
                dst.clone_from(&src);
                assert_eq!(dst, src);
                assert_eq!(src.clone(), src);
            }
        }
    }
}
