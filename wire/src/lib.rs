//! Protocol messages and the libp2p transport between perun clients.
//!
//! Not built yet. This crate will own the one `Message` enum of the
//! protocol (proposal, accept, reject, update, commit, sync), its
//! length-prefixed postcard codec with size limits, and the libp2p swarm
//! (TCP + noise + yamux, request-response on `/perun/wire/1`) behind a
//! cloneable handle that tells each message's authenticated `PeerId`.
