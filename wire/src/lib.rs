//! Protocol messages and the libp2p transport between perun clients.
//!
//! Clients find each other by `PeerId`, talk over TCP + noise + yamux, and
//! exchange request/reply pairs on the `/perun/wire/1` protocol, or on
//! lanes of `/perun/wire/2` with peers that speak it. Every byte
//! from a peer is untrusted: frames are size-capped, decoded strictly and
//! checked against the channel limits before anyone looks at them.
//!
//! # Layout
//! - [`message`]: the one [`Message`] enum and its payloads, with limits.
//! - [`frame`]: length-prefixed postcard frames; the decoder the fuzz target drives.
//! - [`node`]: the swarm task, its cloneable [`Handle`], and inbound
//!   [`Request`]s with their one-shot [`Responder`].
//! - [`auth`]: checks that a sender is the participant it claims to be.
//! - [`keys`]: the network key on disk.
//! - [`error`]: the crate's one error enum.
//!
//! A private `codec` module adapts frames to libp2p's request-response
//! behaviour, `lane` carries the same frames on one long-lived stream per
//! peer and direction (`/perun/wire/2`, used once a peer's identify info
//! lists it), and `bounded` caps sequence lengths while decoding.

pub mod auth;
mod bounded;
mod codec;
pub mod error;
pub mod frame;
pub mod keys;
mod lane;
pub mod message;
pub mod node;

pub use auth::authorize;
pub use error::{Error, Result};
pub use frame::{DEFAULT_MAX_FRAME, LANE_PROTOCOL, PROTOCOL, decode_frame, encode_frame};
pub use keys::{generate_key, load_key, load_or_generate_key, save_key};
pub use libp2p::identity::Keypair;
pub use libp2p::{Multiaddr, PeerId};
pub use message::{
    Message, Participant, Proposal, ProposalAccept, ProposalId, ProposalReject, Refusal,
    RefusalCode, RejectKind, Signing0, Sync, Update, UpdateAccept, UpdateCommit, UpdateReject,
    UpdateWithCommit,
};
pub use node::{Config, Handle, Incoming, Limits, Node, PeerEvent, Request, Responder};
