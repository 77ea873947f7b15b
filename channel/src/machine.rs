//! The channel's phases and the state machine that moves between them.
//!
//! [`Machine`] holds one participant's view of a channel: the latest fully
//! signed state, at most one staged state under signature, and the phase.
//! Every method either succeeds and changes the machine, or fails with an
//! [`Error`] and leaves it exactly as it was.

use alloy_primitives::{Address, B256, Signature};
use perun_wallet::Account;
use serde::{Deserialize, Serialize};

use crate::signed::verify_sig;
use crate::{App, Error, Params, Result, SignedState, State};

/// Where a channel is in its life.
///
/// `Proposing → Signing0 → Funding → Active ⇄ Updating → Final`; from any
/// funded phase (and from `Funding`, to recover deposits) `→ Registered →
/// Concluded → Withdrawn`. Every funded phase may also go straight to
/// `Concluded`: the chain decides, and a channel a peer concluded while we
/// were offline (a final state, or a dispute we never saw) must still reach
/// `Withdrawn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Phase {
    /// Proposal sent or received; no state signed yet.
    Proposing,
    /// All accepted; collecting version-0 signatures.
    Signing0,
    /// Version 0 fully signed; deposits in progress.
    Funding,
    /// Funded; no update in flight.
    Active,
    /// Funded; one update is staged and collecting signatures.
    Updating,
    /// A final state is fully signed; ready for `concludeFinal`.
    Final,
    /// The channel closes on-chain: a state is registered and the dispute
    /// runs, or we are registering one (a peer stopped answering, funding
    /// failed). No more updates.
    Registered,
    /// The outcome is pushed to the asset holders.
    Concluded,
    /// This participant's funds are withdrawn.
    Withdrawn,
}

impl Phase {
    /// The transition table: whether `self → to` is legal.
    pub fn can_transition_to(self, to: Phase) -> bool {
        use Phase::*;
        matches!(
            (self, to),
            (Proposing, Signing0)
                | (Signing0, Funding)
                | (Funding, Active)
                | (Active, Updating)
                | (Updating, Active)
                | (Updating | Active, Final)
                | (Funding | Active | Updating | Final, Registered)
                | (Registered, Registered)
                | (Funding | Active | Updating | Final | Registered, Concluded)
                | (Concluded, Withdrawn)
        )
    }

    /// Whether deposits may be on-chain (so a dispute can be opened).
    pub fn is_funded(self) -> bool {
        !matches!(self, Phase::Proposing | Phase::Signing0)
    }
}

/// A cached hash: left out of equality and of serde, so a machine equals
/// itself after a round trip through serde (which leaves it empty).
#[derive(Debug, Clone, Copy, Default)]
struct HashCache(Option<B256>);

impl PartialEq for HashCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for HashCache {}

/// One participant's state machine for one channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    params: Params,
    index: usize,
    phase: Phase,
    current: Option<SignedState>,
    staged: Option<SignedState>,
    /// The staged state's hash, computed once when it is staged (signing,
    /// checking signatures and the protocol's comparisons all need it).
    /// Not serialized: a deserialized machine computes it on use.
    #[serde(skip)]
    staged_hash: HashCache,
    /// Version and hash of the last state this participant signed, so that a
    /// second, different state of the same version is never signed.
    last_signed: Option<(u64, B256)>,
    /// Whether that last signed state is final: then nothing else is ever
    /// signed (a final state concludes at once on-chain, so a newer state
    /// signed after it could be overtaken by it).
    signed_final: bool,
}

impl Machine {
    /// A machine in `Proposing` for participant `index`, with `initial`
    /// (version 0) staged.
    pub fn new(params: Params, index: usize, initial: State) -> Result<Self> {
        initial.validate(&params)?;
        if index >= params.participants.len() {
            return Err(Error::Index(index));
        }
        if initial.version != 0 {
            return Err(Error::Version {
                expected: 0,
                got: initial.version,
            });
        }
        Ok(Self {
            params,
            index,
            phase: Phase::Proposing,
            current: None,
            staged_hash: HashCache(Some(initial.hash())),
            staged: Some(SignedState::new(initial)),
            last_signed: None,
            signed_final: false,
        })
    }

    /// Rebuilds a machine from persisted parts, re-checking everything that
    /// was stored: bytes from disk are not trusted.
    pub fn restore(
        params: Params,
        index: usize,
        phase: Phase,
        current: Option<SignedState>,
        staged: Option<SignedState>,
    ) -> Result<Self> {
        params.validate()?;
        if index >= params.participants.len() {
            return Err(Error::Index(index));
        }
        if let Some(c) = &current {
            c.verify_all(&params)?;
        }
        let mut last_signed = current.as_ref().map(|c| (c.state.version, c.state.hash()));
        let mut signed_final = current.as_ref().is_some_and(|c| c.state.isFinal);
        if let Some(s) = &staged {
            s.state.validate(&params)?;
            for (i, sig) in s.sigs.iter().enumerate() {
                if let Some(sig) = sig {
                    verify_sig(&params, &s.state, i, sig)?;
                    if i == index {
                        last_signed = Some((s.state.version, s.state.hash()));
                        signed_final = s.state.isFinal;
                    }
                }
            }
        }
        // A store keeps `Active` while an update is staged (`Updating` is a
        // moment, not a place); with a staged update the machine is updating.
        let phase = if phase == Phase::Active && current.is_some() && staged.is_some() {
            Phase::Updating
        } else {
            phase
        };
        Ok(Self {
            params,
            index,
            phase,
            current,
            staged_hash: HashCache(staged.as_ref().map(|s| s.state.hash())),
            staged,
            last_signed,
            signed_final,
        })
    }

    /// The channel's parameters.
    pub fn params(&self) -> &Params {
        &self.params
    }
    /// This participant's index.
    pub fn index(&self) -> usize {
        self.index
    }
    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }
    /// The latest fully signed state, once version 0 is fully signed.
    pub fn current(&self) -> Option<&SignedState> {
        self.current.as_ref()
    }
    /// The state under signature, if any.
    pub fn staged(&self) -> Option<&SignedState> {
        self.staged.as_ref()
    }
    /// The staged state's hash (what each participant signs), if any.
    pub fn staged_hash(&self) -> Option<B256> {
        let staged = self.staged.as_ref()?;
        Some(self.staged_hash.0.unwrap_or_else(|| staged.state.hash()))
    }
    /// Version and hash of the last state this participant signed.
    pub fn last_signed(&self) -> Option<(u64, B256)> {
        self.last_signed
    }

    /// Moves to `to` if the transition table allows it.
    pub fn set_phase(&mut self, to: Phase) -> Result<()> {
        if !self.phase.can_transition_to(to) {
            return Err(Error::IllegalTransition {
                from: self.phase,
                to,
            });
        }
        self.phase = to;
        Ok(())
    }

    /// Stages `next`, proposed by participant `actor`, after checking the
    /// full transition rule against the current state. Only in `Active`.
    pub fn stage_update(&mut self, next: State, actor: usize, app: &dyn App) -> Result<()> {
        if self.phase != Phase::Active {
            return Err(if self.phase == Phase::Updating {
                Error::Busy
            } else {
                Error::WrongPhase {
                    op: "stage_update",
                    phase: self.phase,
                }
            });
        }
        let cur = self.current.as_ref().ok_or(Error::WrongPhase {
            op: "stage_update",
            phase: self.phase,
        })?;
        // The current state is valid for the params: its channel id is theirs.
        cur.state
            .validate_transition_for(&self.params, cur.state.channelId, &next, actor, app)?;
        let hash = next.hash();
        Self::check_sign(self.last_signed, self.signed_final, next.version, hash)?;
        self.staged = Some(SignedState::new(next));
        self.staged_hash = HashCache(Some(hash));
        self.phase = Phase::Updating;
        Ok(())
    }

    /// Whether this participant signed a final state: the channel is
    /// closing, and only that very state is ever signed again.
    pub fn signed_final(&self) -> bool {
        self.signed_final
    }

    /// Refuses a state that would be a second signature on a version with
    /// other contents, an older version, or anything after a final state.
    fn check_double_sign(&self, st: &State) -> Result<()> {
        Self::check_sign(self.last_signed, self.signed_final, st.version, st.hash())
    }

    fn check_sign(
        last: Option<(u64, B256)>,
        last_final: bool,
        version: u64,
        hash: B256,
    ) -> Result<()> {
        match last {
            Some((v, h)) if last_final && h != hash => Err(Error::SignedFinal {
                version: v,
                hash: h,
            }),
            Some((v, h)) if v == version && h != hash => Err(Error::DoubleSign(v)),
            Some((v, _)) if v > version => Err(Error::DoubleSign(version)),
            _ => Ok(()),
        }
    }

    /// Refuses `op` unless a state is under signature (`Signing0`,
    /// `Updating`).
    fn under_signature(&self, op: &'static str) -> Result<()> {
        if matches!(self.phase, Phase::Signing0 | Phase::Updating) {
            Ok(())
        } else {
            Err(Error::WrongPhase {
                op,
                phase: self.phase,
            })
        }
    }

    fn staged_mut(&mut self, op: &'static str) -> Result<&mut SignedState> {
        self.under_signature(op)?;
        self.staged.as_mut().ok_or(Error::NothingStaged)
    }

    /// What signing the staged state as `account` needs, checked against
    /// the double-sign rule: its hash, and `made` if that is `account`'s
    /// signature over it (else `None`: sign afresh).
    fn signing(
        &self,
        account: &dyn Account,
        made: Option<Presigned>,
    ) -> Result<(B256, Option<Signature>)> {
        self.under_signature("sign_staged")?;
        let staged = self.staged.as_ref().ok_or(Error::NothingStaged)?;
        let hash = self.staged_hash().ok_or(Error::NothingStaged)?;
        Self::check_sign(
            self.last_signed,
            self.signed_final,
            staged.state.version,
            hash,
        )?;
        let made = made
            .filter(|m| m.hash == hash && m.signer == account.address())
            .map(|m| m.sig);
        Ok((hash, made))
    }

    /// The params, the staged state and its hash, to sign it or to add a
    /// signature to it (only while a state is under signature).
    fn staged_parts(&mut self, op: &'static str) -> Result<(&Params, &mut SignedState, B256)> {
        self.staged_mut(op)?;
        let hash = self.staged_hash().ok_or(Error::NothingStaged)?;
        let staged = self.staged.as_mut().ok_or(Error::NothingStaged)?;
        Ok((&self.params, staged, hash))
    }

    /// Signs the staged state as this participant. Refuses to sign a state
    /// whose version was already signed with other contents.
    pub fn sign_staged(&mut self, account: &dyn Account) -> Result<Signature> {
        self.sign_staged_with(account, None)
    }

    /// [`sign_staged`](Self::sign_staged), taking `made`, a signature made
    /// earlier, if it is this account's over the staged state's hash (else
    /// it signs afresh). The same rules apply: a signature made ahead
    /// counts as signed only from here on.
    pub fn sign_staged_with(
        &mut self,
        account: &dyn Account,
        made: Option<Presigned>,
    ) -> Result<Signature> {
        let index = self.index;
        let (hash, made) = self.signing(account, made)?;
        let staged = self.staged.as_mut().ok_or(Error::NothingStaged)?;
        let (version, is_final) = (staged.state.version, staged.state.isFinal);
        // On error nothing is stored (`sign_hashed` sets the slot last).
        let sig = staged.sign_hashed(&self.params, index, account, hash, made)?;
        self.last_signed = Some((version, hash));
        self.signed_final = is_final;
        Ok(sig)
    }

    /// [`sign_staged_with`](Self::sign_staged_with) on a copy of the staged
    /// state, the machine unchanged: the copy is what a caller stores
    /// before the signature may count, or leave. Once it is stored, the
    /// returned [`Presigned`] goes to `sign_staged_with`, which then signs
    /// nothing anew.
    pub fn sign_staged_copy(
        &self,
        account: &dyn Account,
        made: Option<Presigned>,
    ) -> Result<(SignedState, Presigned)> {
        let (hash, made) = self.signing(account, made)?;
        let mut copy = self.staged.clone().ok_or(Error::NothingStaged)?;
        let sig = copy.sign_hashed(&self.params, self.index, account, hash, made)?;
        let signer = account.address();
        Ok((copy, Presigned { hash, signer, sig }))
    }

    /// Signs `state` alone, outside the update protocol: our move in an app
    /// channel's on-chain dispute. The same rule as [`sign_staged`](Self::sign_staged):
    /// never a second state of a version already signed, nothing older,
    /// nothing after a signed final state; the signature counts as signed
    /// from here on. Only once the channel closes on-chain (`Registered`).
    pub fn sign_forced(&mut self, state: &State, account: &dyn Account) -> Result<SignedState> {
        if self.phase != Phase::Registered {
            return Err(Error::WrongPhase {
                op: "sign_forced",
                phase: self.phase,
            });
        }
        let (version, hash) = (state.version, state.hash());
        Self::check_sign(self.last_signed, self.signed_final, version, hash)?;
        let mut signed = SignedState::new(state.clone());
        signed.sign(&self.params, self.index, account)?;
        self.last_signed = Some((version, hash));
        self.signed_final = state.isFinal;
        Ok(signed)
    }

    /// Verifies and adds participant `index`'s signature on the staged state.
    pub fn add_signature(&mut self, index: usize, sig: Signature) -> Result<()> {
        let (params, staged, hash) = self.staged_parts("add_signature")?;
        staged.add_signature_hashed(params, index, sig, hash)
    }

    /// Verifies and adds several participants' signatures on the staged
    /// state, all or none: one that fails leaves the staged state as it was.
    pub fn add_signatures(&mut self, sigs: &[(usize, Signature)]) -> Result<()> {
        let (params, staged, hash) = self.staged_parts("add_signatures")?;
        for (index, sig) in sigs {
            crate::signed::verify_hash_sig(params, hash, *index, sig)?;
        }
        for (index, sig) in sigs {
            staged.set_verified(params, *index, *sig)?;
        }
        Ok(())
    }

    /// The phase [`commit_staged`](Self::commit_staged) moves to, if the
    /// staged state is fully signed: `Signing0 → Funding`, `Updating →
    /// Active`, or `Updating → Final` for a final state.
    pub fn committed_phase(&self) -> Result<Phase> {
        self.under_signature("commit_staged")?;
        self.committed_phase_of(self.staged.as_ref().ok_or(Error::NothingStaged)?)
    }

    /// [`committed_phase`](Self::committed_phase) for `staged`, a copy of
    /// the staged state with more signatures (see
    /// [`sign_staged_copy`](Self::sign_staged_copy)).
    pub fn committed_phase_of(&self, staged: &SignedState) -> Result<Phase> {
        self.under_signature("commit_staged")?;
        if !staged.is_fully_signed() {
            let missing = staged.sigs.iter().position(Option::is_none).unwrap_or(0);
            return Err(Error::MissingSignature(missing));
        }
        Ok(match (self.phase, staged.state.isFinal) {
            (Phase::Signing0, _) => Phase::Funding,
            (_, true) => Phase::Final,
            (_, false) => Phase::Active,
        })
    }

    /// Makes the fully signed staged state current (see
    /// [`committed_phase`](Self::committed_phase)).
    pub fn commit_staged(&mut self) -> Result<&SignedState> {
        let next = self.committed_phase()?;
        self.set_phase(next)?;
        self.current = self.staged.take();
        self.staged_hash = HashCache(None);
        self.current.as_ref().ok_or(Error::NothingStaged)
    }

    /// Completes the staged state with a full signature set (a commit) and
    /// makes it current, all or nothing: every signature the staged state
    /// lacks is verified before anything changes. Signatures it holds
    /// already are kept, not replaced.
    pub fn complete_staged(&mut self, sigs: &[Signature]) -> Result<&SignedState> {
        let n = self.params.participants.len();
        if sigs.len() != n {
            return Err(Error::SignatureCount {
                expected: n,
                got: sigs.len(),
            });
        }
        let staged = self.staged.as_ref().ok_or(Error::NothingStaged)?;
        let missing: Vec<(usize, Signature)> = sigs
            .iter()
            .enumerate()
            .filter(|(i, _)| staged.sigs.get(*i).copied().flatten().is_none())
            .map(|(i, s)| (i, *s))
            .collect();
        // Checked before anything changes: the staged state, once full,
        // must be committable.
        self.under_signature("complete_staged")?;
        self.add_signatures(&missing)?;
        self.commit_staged()
    }

    /// Drops the staged update (`Updating → Active`).
    ///
    /// The record of what this participant signed survives, so the same
    /// version can afterwards only be signed with the same contents.
    pub fn discard_staged(&mut self) -> Result<()> {
        if self.phase != Phase::Updating {
            return Err(Error::WrongPhase {
                op: "discard_staged",
                phase: self.phase,
            });
        }
        self.phase = Phase::Active;
        self.staged = None;
        self.staged_hash = HashCache(None);
        Ok(())
    }

    /// Adopts a fully signed state newer than the current one (learned from
    /// a peer's `Sync` or from the chain) after verifying every signature.
    pub fn adopt(&mut self, st: SignedState) -> Result<()> {
        st.verify_all(&self.params)?;
        let cur_version = self.current.as_ref().map(|c| c.state.version);
        if cur_version.is_some_and(|v| st.state.version <= v) {
            return Err(Error::Version {
                expected: cur_version.map_or(0, |v| v + 1),
                got: st.state.version,
            });
        }
        self.check_double_sign(&st.state)?;
        if self
            .staged
            .as_ref()
            .is_some_and(|s| s.state.version <= st.state.version)
        {
            self.staged = None;
            self.staged_hash = HashCache(None);
            if self.phase == Phase::Updating {
                self.phase = Phase::Active;
            }
        }
        if st.state.isFinal && self.phase == Phase::Active {
            self.set_phase(Phase::Final)?;
        }
        // It carries our signature: it is the newest state we signed.
        if self.last_signed.is_none_or(|(v, _)| v < st.state.version) {
            self.last_signed = Some((st.state.version, st.state.hash()));
            self.signed_final = st.state.isFinal;
        }
        self.current = Some(st);
        Ok(())
    }
}

/// A signature made ahead of its use, by the account that made it: a
/// proposer with a key in memory signs while its peers' answers are on the
/// way ([`Account::signs_in_process`]) and hands this to
/// [`Machine::sign_staged_with`] once they all signed. Only
/// [`Presigned::new`] makes one, so it is always the named account's
/// signature over `hash`.
#[derive(Debug, Clone, Copy)]
pub struct Presigned {
    hash: B256,
    signer: Address,
    sig: Signature,
}

impl Presigned {
    /// Signs `hash` with `account` now.
    pub fn new(account: &dyn Account, hash: B256) -> Result<Self> {
        Ok(Self {
            hash,
            signer: account.address(),
            sig: account.sign_hash(hash)?,
        })
    }

    /// The signature.
    pub fn signature(&self) -> Signature {
        self.sig
    }

    /// The hash it signs.
    pub fn hash(&self) -> B256 {
        self.hash
    }
}
