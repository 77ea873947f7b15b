//! The protocol messages (DESIGN §6) and their size limits.
//!
//! Every request gets exactly one reply on the same stream:
//!
//! | request | reply |
//! |---|---|
//! | [`Proposal`] | [`ProposalAccept`] or [`ProposalReject`] |
//! | [`Signing0`] | [`UpdateAccept`] (version 0) or [`UpdateReject`] |
//! | [`Update`] | [`UpdateAccept`] or [`UpdateReject`] |
//! | [`UpdateCommit`] | [`Message::Ack`] |
//! | [`UpdateWithCommit`] | as for its [`Update`] |
//! | [`Sync`] | the peer's own [`Sync`] |
//!
//! Opening an `n`-party channel: the proposer sends the `Proposal` to every
//! peer and collects a `ProposalAccept` (with a nonce share) from each. Only
//! then is the nonce, hence the channel id, known, so the proposer sends
//! `Signing0` with every nonce share and its own signature on version 0;
//! each peer derives the same params, checks its share, verifies, signs and
//! replies `UpdateAccept { version: 0 }`. For `n > 2` the proposer then
//! broadcasts `UpdateCommit` with the full set.
//!
//! Updating: the actor sends the unsigned `Update` to every peer, each peer
//! replies `UpdateAccept` with its signature, and the actor signs last and
//! broadcasts `UpdateCommit` with the full set. Signing last means an actor
//! whose proposal loses a same-version conflict has signed nothing for that
//! version and can sign the winner's. An actor that updates again at once
//! may instead send its previous commit inside the next update
//! ([`UpdateWithCommit`]): one request per update instead of two.
//!
//! A refusal ([`Refusal`]) is not a message: it is the transport's answer to
//! a request that could not be processed at all (bad frame, busy, no reply).

use alloy_primitives::{Address, B256, Bytes, Signature};
use libp2p::PeerId;
use perun_channel::limits::{
    MAX_APP_DATA, MAX_ASSETS, MAX_PARTICIPANTS, MIN_ASSETS, MIN_CHALLENGE_DURATION,
    MIN_PARTICIPANTS,
};
use perun_channel::{Allocation, ChannelId, Domain, Phase, SignedState, State, serial};
use serde::{Deserialize, Serialize};

use crate::bounded;
use crate::{Error, Result};

/// A proposal's id: random, chosen by the proposer, unique per proposal.
pub type ProposalId = B256;

/// Longest `reason` string a peer may send, in bytes.
pub const MAX_REASON: usize = 1024;

/// One participant of a proposed channel: who signs and who to talk to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Participant {
    /// The on-chain address that signs states.
    pub address: Address,
    /// The libp2p peer that speaks for it.
    #[serde(with = "peer_id_bytes")]
    pub peer: PeerId,
}

/// A proposal to open a channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// Names this proposal in every reply.
    pub proposal_id: ProposalId,
    /// Seconds a registered state can be refuted.
    pub challenge_duration: u64,
    /// The deployment (chain, adjudicator) that settles the channel: part of its params, so
    /// a responder whose adjudicator is another one must reject.
    pub domain: Domain,
    /// Everyone in the channel, in index order (the proposer included).
    #[serde(deserialize_with = "bounded::participants")]
    pub participants: Vec<Participant>,
    /// The proposer's index in `participants`.
    pub proposer: usize,
    /// The initial balances (`balances[asset][participant]`).
    #[serde(
        serialize_with = "serial::allocation",
        deserialize_with = "bounded::allocation"
    )]
    pub allocation: Allocation,
    /// The app contract; zero for a payment channel.
    pub app: Address,
    /// The initial app data (empty for payment channels).
    pub app_data: Bytes,
    /// The proposer's random nonce share.
    pub nonce_share: B256,
}

/// A participant accepts a proposal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProposalAccept {
    /// The accepted proposal.
    pub proposal_id: ProposalId,
    /// The accepter's index in the proposal.
    pub index: usize,
    /// The accepter's random nonce share.
    pub nonce_share: B256,
    /// The accepter's on-chain address (must match the proposal).
    pub address: Address,
}

/// A participant rejects a proposal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProposalReject {
    /// The rejected proposal.
    pub proposal_id: ProposalId,
    /// The rejecter's index in the proposal.
    pub index: usize,
    /// Why, for humans (at most [`MAX_REASON`] bytes).
    pub reason: String,
}

/// All accepted: the nonce shares and the proposer's signature on version 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signing0 {
    /// The proposal this channel comes from.
    pub proposal_id: ProposalId,
    /// Every participant's nonce share, in index order.
    #[serde(deserialize_with = "bounded::shares")]
    pub nonce_shares: Vec<B256>,
    /// The proposer's signature on version 0.
    #[serde(serialize_with = "serial::signature")]
    pub signature: Signature,
}

/// A participant proposes the next state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    /// The channel.
    pub channel_id: ChannelId,
    /// The proposed state (version = current + 1).
    #[serde(serialize_with = "serial::state", deserialize_with = "bounded::state")]
    pub state: State,
    /// The proposer's participant index. The proposer signs last (after
    /// every peer has signed), so the request carries no signature.
    pub actor: usize,
}

/// A participant signs a proposed state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateAccept {
    /// The channel.
    pub channel_id: ChannelId,
    /// The version signed.
    pub version: u64,
    /// The signer's participant index.
    pub index: usize,
    /// The signature.
    #[serde(serialize_with = "serial::signature")]
    pub signature: Signature,
}

/// A participant refuses a proposed state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateReject {
    /// The channel.
    pub channel_id: ChannelId,
    /// The version refused.
    pub version: u64,
    /// The refuser's participant index.
    pub index: usize,
    /// Why, for humans (at most [`MAX_REASON`] bytes).
    pub reason: String,
    /// Whether the proposer may retry.
    pub kind: RejectKind,
}

/// Why an update was rejected, for the proposer's retry decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectKind {
    /// The update is not acceptable (invalid transition, app or handler said no).
    Refused,
    /// Both sides proposed this version at once and the receiver's own
    /// proposal wins (lower index); the loser may retry on the new state.
    Conflict,
}

/// The update's initiator hands out the full signature set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateCommit {
    /// The channel.
    pub channel_id: ChannelId,
    /// The version now fully signed.
    pub version: u64,
    /// The sender's participant index.
    pub index: usize,
    /// Every participant's signature, in index order.
    #[serde(
        serialize_with = "serial::signatures",
        deserialize_with = "bounded::signatures"
    )]
    pub signatures: Vec<Signature>,
}

/// An [`Update`] that first hands out the full signature set of the
/// sender's previous update of the same channel: a proposer updating again
/// at once saves the commit's own request. The receiver takes the commit
/// exactly as an [`UpdateCommit`], then answers the update; a commit it
/// cannot take is refused with the whole request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateWithCommit {
    /// The commit of the sender's previous update.
    pub commit: UpdateCommit,
    /// The next update, on top of that state.
    pub update: Update,
}

/// On reconnect: where the sender stands on a channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sync {
    /// The channel.
    pub channel_id: ChannelId,
    /// The sender's participant index.
    pub index: usize,
    /// The sender's phase.
    pub phase: Phase,
    /// The latest fully signed state.
    #[serde(
        serialize_with = "serial::signed",
        deserialize_with = "bounded::signed"
    )]
    pub latest: SignedState,
    /// A partially signed state, if an update was in flight.
    #[serde(
        serialize_with = "serial::opt_signed",
        deserialize_with = "bounded::opt_signed"
    )]
    pub staged: Option<SignedState>,
}

/// Every message of the protocol, as requests and as replies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Open a channel.
    Proposal(Proposal),
    /// Reply to a proposal: yes.
    ProposalAccept(ProposalAccept),
    /// Reply to a proposal: no.
    ProposalReject(ProposalReject),
    /// Every share and the proposer's version-0 signature.
    Signing0(Signing0),
    /// Propose the next state.
    Update(Update),
    /// Reply to an update or `Signing0`: the signature.
    UpdateAccept(UpdateAccept),
    /// Reply to an update or `Signing0`: no.
    UpdateReject(UpdateReject),
    /// The full signature set of a version.
    UpdateCommit(UpdateCommit),
    /// Where the sender stands on a channel; the reply is the peer's `Sync`.
    Sync(Sync),
    /// The empty reply to a one-way message.
    Ack,
    /// A commit and the next update in one request (last, so the other
    /// variants keep their encoding).
    UpdateWithCommit(UpdateWithCommit),
}

/// Why the transport refused a request, sent back instead of a reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {detail}")]
pub struct Refusal {
    /// What kind of failure.
    pub code: RefusalCode,
    /// Details for humans.
    pub detail: String,
}

/// The kinds of [`Refusal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RefusalCode {
    /// The frame did not decode or broke a size limit.
    Malformed,
    /// The frame exceeded the maximum frame size.
    TooLarge,
    /// The frame did not arrive within the read timeout.
    Stalled,
    /// The receiver's queue of incoming requests is full.
    Busy,
    /// The receiver dropped the request without replying.
    NoReply,
    /// The sender is not the participant it claims to be.
    Unauthorized,
    /// The message is not a request.
    NotARequest,
}

impl Refusal {
    /// A refusal with a code and detail text.
    pub fn new(code: RefusalCode, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
        }
    }
}

impl Message {
    /// The variant's name, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Proposal(_) => "Proposal",
            Message::ProposalAccept(_) => "ProposalAccept",
            Message::ProposalReject(_) => "ProposalReject",
            Message::Signing0(_) => "Signing0",
            Message::Update(_) => "Update",
            Message::UpdateAccept(_) => "UpdateAccept",
            Message::UpdateReject(_) => "UpdateReject",
            Message::UpdateCommit(_) => "UpdateCommit",
            Message::Sync(_) => "Sync",
            Message::Ack => "Ack",
            Message::UpdateWithCommit(_) => "UpdateWithCommit",
        }
    }

    /// Whether this message starts an exchange (as opposed to being a reply).
    ///
    /// `UpdateReject` is both: the reply of a peer that refuses an update,
    /// and the request by which a proposer aborts an update that failed
    /// after some peers signed it. `ProposalReject` likewise aborts an
    /// opening.
    pub fn is_request(&self) -> bool {
        matches!(
            self,
            Message::Proposal(_)
                | Message::ProposalReject(_)
                | Message::Signing0(_)
                | Message::Update(_)
                | Message::UpdateReject(_)
                | Message::UpdateCommit(_)
                | Message::UpdateWithCommit(_)
                | Message::Sync(_)
        )
    }

    /// The participant index the sender claims, if the message names one.
    ///
    /// Check it with [`crate::authorize`] against the channel's peer list.
    pub fn claimed_index(&self) -> Option<usize> {
        match self {
            Message::Proposal(p) => Some(p.proposer),
            Message::ProposalAccept(m) => Some(m.index),
            Message::ProposalReject(m) => Some(m.index),
            Message::Signing0(_) | Message::Ack => None,
            Message::Update(m) => Some(m.actor),
            Message::UpdateAccept(m) => Some(m.index),
            Message::UpdateReject(m) => Some(m.index),
            Message::UpdateCommit(m) => Some(m.index),
            Message::Sync(m) => Some(m.index),
            Message::UpdateWithCommit(m) => Some(m.update.actor),
        }
    }

    /// Checks the size limits of DESIGN §3 and of this module. Run on every
    /// decoded message before anything else looks at it.
    pub fn check_limits(&self) -> Result<()> {
        match self {
            Message::Proposal(p) => {
                let n = p.participants.len();
                range("participants", n, MIN_PARTICIPANTS, MAX_PARTICIPANTS)?;
                index("proposer", p.proposer, n)?;
                if p.challenge_duration < MIN_CHALLENGE_DURATION {
                    return Err(Error::Limit {
                        what: "challenge duration",
                        got: usize::try_from(p.challenge_duration).unwrap_or(usize::MAX),
                    });
                }
                check_allocation(&p.allocation, Some(n))?;
                at_most("app data", p.app_data.len(), MAX_APP_DATA)
            }
            Message::ProposalAccept(m) => index("index", m.index, MAX_PARTICIPANTS),
            Message::ProposalReject(m) => {
                index("index", m.index, MAX_PARTICIPANTS)?;
                at_most("reason", m.reason.len(), MAX_REASON)
            }
            Message::Signing0(m) => range(
                "nonce shares",
                m.nonce_shares.len(),
                MIN_PARTICIPANTS,
                MAX_PARTICIPANTS,
            ),
            Message::Update(m) => {
                index("actor", m.actor, MAX_PARTICIPANTS)?;
                check_state(&m.state)
            }
            Message::UpdateAccept(m) => index("index", m.index, MAX_PARTICIPANTS),
            Message::UpdateReject(m) => {
                index("index", m.index, MAX_PARTICIPANTS)?;
                at_most("reason", m.reason.len(), MAX_REASON)
            }
            Message::UpdateCommit(m) => check_commit(m),
            Message::UpdateWithCommit(m) => {
                check_commit(&m.commit)?;
                index("actor", m.update.actor, MAX_PARTICIPANTS)?;
                check_state(&m.update.state)
            }
            Message::Sync(m) => {
                index("index", m.index, MAX_PARTICIPANTS)?;
                check_signed(&m.latest)?;
                m.staged.as_ref().map_or(Ok(()), check_signed)
            }
            Message::Ack => Ok(()),
        }
    }
}

fn range(what: &'static str, got: usize, min: usize, max: usize) -> Result<()> {
    if (min..=max).contains(&got) {
        Ok(())
    } else {
        Err(Error::Limit { what, got })
    }
}

fn at_most(what: &'static str, got: usize, max: usize) -> Result<()> {
    range(what, got, 0, max)
}

fn index(what: &'static str, got: usize, n: usize) -> Result<()> {
    if got < n {
        Ok(())
    } else {
        Err(Error::Limit { what, got })
    }
}

fn check_allocation(a: &Allocation, participants: Option<usize>) -> Result<()> {
    range("assets", a.assets.len(), MIN_ASSETS, MAX_ASSETS)?;
    if a.balances.len() != a.assets.len() {
        return Err(Error::Limit {
            what: "balance rows",
            got: a.balances.len(),
        });
    }
    for row in &a.balances {
        match participants {
            Some(n) if row.len() != n => {
                return Err(Error::Limit {
                    what: "balances per asset",
                    got: row.len(),
                });
            }
            _ => at_most("balances per asset", row.len(), MAX_PARTICIPANTS)?,
        }
    }
    Ok(())
}

fn check_commit(m: &UpdateCommit) -> Result<()> {
    index("index", m.index, MAX_PARTICIPANTS)?;
    range(
        "signatures",
        m.signatures.len(),
        MIN_PARTICIPANTS,
        MAX_PARTICIPANTS,
    )
}

fn check_state(s: &State) -> Result<()> {
    Ok(s.check_limits()?)
}

fn check_signed(s: &SignedState) -> Result<()> {
    check_state(&s.state)?;
    at_most("signatures", s.sigs.len(), MAX_PARTICIPANTS)
}

/// `PeerId` as its multihash bytes (libp2p's own serde support is a feature
/// we do not need).
mod peer_id_bytes {
    use libp2p::PeerId;
    use serde::{Deserializer, Serializer, de};

    pub(super) fn serialize<S: Serializer>(peer: &PeerId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&peer.to_bytes())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PeerId, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = PeerId;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("peer id bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<PeerId, E> {
                PeerId::from_bytes(v).map_err(E::custom)
            }
        }
        d.deserialize_bytes(V)
    }
}
