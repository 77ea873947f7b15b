//! The crate's one error enum.

use libp2p::PeerId;

use crate::message::Refusal;

/// Everything that can go wrong encoding, decoding, sending or receiving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A frame's length prefix exceeds the configured maximum.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The claimed (or encoded) length.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The stream ended before a whole frame arrived.
    #[error("truncated frame: expected {expected} bytes, got {got}")]
    Truncated {
        /// Bytes the frame claimed.
        expected: usize,
        /// Bytes that arrived.
        got: usize,
    },
    /// A frame's bytes after the length prefix do not match it.
    #[error("frame length mismatch: prefix says {expected} bytes, body has {got}")]
    LengthMismatch {
        /// Bytes the prefix claimed.
        expected: usize,
        /// Bytes present.
        got: usize,
    },
    /// Bytes follow the message inside its frame.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    /// The frame body is not a valid postcard `Message`.
    #[error("malformed message: {0}")]
    Decode(#[from] postcard::Error),
    /// The message decoded but breaks a size limit (DESIGN §3).
    #[error("message breaks a limit: {what} is {got}")]
    Limit {
        /// Which quantity is out of range.
        what: &'static str,
        /// Its value.
        got: usize,
    },
    /// A state inside the message breaks a channel limit.
    #[error("state breaks a limit: {0}")]
    State(#[from] perun_channel::Error),
    /// The peer stopped sending in the middle of a frame.
    #[error("read timed out after {0:?}")]
    ReadTimeout(std::time::Duration),
    /// A cap on remote input is reached (DESIGN §6): the request is refused
    /// with [`RefusalCode::Busy`](crate::RefusalCode::Busy) and nothing else happens.
    #[error("{what} at its limit of {limit}")]
    Busy {
        /// Which cap.
        what: &'static str,
        /// Its value.
        limit: usize,
    },
    /// The remote refused our request (bad frame, busy, no handler reply, ...).
    #[error("refused by peer: {0}")]
    Refused(Refusal),
    /// No reply arrived within the request timeout.
    #[error("request timed out")]
    Timeout,
    /// The connection closed before the reply arrived.
    #[error("connection closed before the reply arrived")]
    ConnectionClosed,
    /// No connection to the peer could be established.
    #[error("could not dial {0}")]
    DialFailure(PeerId),
    /// The peer does not speak `/perun/wire/1`.
    #[error("peer does not support the perun wire protocol")]
    UnsupportedProtocol,
    /// A peer is not the one at the index it claims.
    #[error("peer {got} is not participant {index}")]
    Unauthorized {
        /// The claimed participant index.
        index: usize,
        /// The authenticated sender.
        got: PeerId,
    },
    /// The message is not a valid request (e.g. an `Ack` sent as a request).
    #[error("{0} is not a request")]
    NotARequest(&'static str),
    /// The endpoint's task has stopped.
    #[error("the wire endpoint has shut down")]
    Shutdown,
    /// Reading or writing a key file or a stream failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A key file does not hold a valid libp2p keypair.
    #[error("bad network key: {0}")]
    Key(#[from] libp2p::identity::DecodingError),
    /// Building the transport or listening failed.
    #[error("transport: {0}")]
    Transport(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Whether the same request may get through later: the peer was out of
    /// reach (no connection, closed, no reply in time) or busy. A request
    /// that failed so may or may not have reached the peer; the perun
    /// protocols tolerate both.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Timeout
            | Error::ConnectionClosed
            | Error::DialFailure(_)
            | Error::Busy { .. } => true,
            Error::Refused(r) => matches!(
                r.code,
                crate::RefusalCode::Busy | crate::RefusalCode::Stalled
            ),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Refusal, RefusalCode};

    #[test]
    fn only_an_unreachable_or_busy_peer_is_transient() {
        let refused = |code| Error::Refused(Refusal::new(code, "x"));
        let peer = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        for e in [
            Error::Timeout,
            Error::ConnectionClosed,
            Error::DialFailure(peer),
            Error::Busy {
                what: "requests",
                limit: 1,
            },
            refused(RefusalCode::Busy),
            refused(RefusalCode::Stalled),
        ] {
            assert!(e.is_transient(), "{e}");
        }
        for e in [
            refused(RefusalCode::Malformed),
            refused(RefusalCode::Unauthorized),
            refused(RefusalCode::NoReply),
            Error::UnsupportedProtocol,
            Error::Shutdown,
            Error::NotARequest("Ack"),
        ] {
            assert!(!e.is_transient(), "{e}");
        }
    }
}
