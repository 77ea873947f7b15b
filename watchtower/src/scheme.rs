//! The privacy scheme: how a client hides a channel from the tower until a
//! dispute starts (DESIGN §12).
//!
//! Both the locator (the tower's lookup key) and the blob's key are derived
//! from the channel id *and* the channel's nonce. The nonce is a random
//! 256-bit value that appears on-chain only when a state is registered or
//! concluded (`Registered` carries it); deposits show only the channel id.
//! Until then the tower holds locators it cannot link to any channel and
//! ciphertexts it cannot open.
//!
//! - `locator = keccak256("perun/tower/locator/v1" ‖ channel_id ‖ nonce_be32)`, 32 bytes.
//! - `key     = keccak256("perun/tower/key/v1"     ‖ channel_id ‖ nonce_be32)`, a ChaCha20-Poly1305 key.
//! - `blob    = aead_nonce (12 random bytes) ‖ ChaCha20-Poly1305(key, aead_nonce, plaintext, aad = locator)`.
//! - `plaintext = BLOB_FORMAT ‖ postcard { params, state, sigs: [65-byte r‖s‖v] }`.
//!
//! [`open`] checks more than the AEAD tag: the params must hash to the
//! channel id and carry the nonce, and the state must be valid and signed by
//! every participant, so a blob that decrypts to garbage or to a badly
//! signed state is refused before the tower would spend gas on it.

use alloy_primitives::{B256, U256, keccak256};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use perun_channel::{ChannelId, Params, SignedState, State};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::Error;

/// Domain tag of the locator derivation.
pub const LOCATOR_TAG: &[u8] = b"perun/tower/locator/v1";
/// Domain tag of the blob key derivation.
pub const KEY_TAG: &[u8] = b"perun/tower/key/v1";
/// Largest blob the tower stores, in bytes (32 KiB). It holds every payment
/// channel up to the channel limits (16 participants × 16 assets is about
/// 18 KiB) and app channels with up to about 14 KiB of `appData`.
pub const MAX_BLOB_LEN: usize = 32 * 1024;
/// Length of the random AEAD nonce at the start of a blob.
pub const AEAD_NONCE_LEN: usize = 12;
/// Length of the Poly1305 tag at the end of a blob.
pub const TAG_LEN: usize = 16;
/// The plaintext format this build writes and reads.
pub const BLOB_FORMAT: u8 = 1;

/// A 32-byte appointment locator.
pub type Locator = B256;

/// What both derivations take: the channel id and its on-chain nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelSecret {
    /// The channel id (`keccak256(abi.encode(params))`).
    pub channel_id: ChannelId,
    /// `params.nonce`, public only once a state is registered.
    pub nonce: U256,
}

impl ChannelSecret {
    /// The secret of the channel `params` describe.
    pub fn of(params: &Params) -> Self {
        Self {
            channel_id: params.channel_id(),
            nonce: params.nonce,
        }
    }

    fn derive(&self, tag: &[u8]) -> B256 {
        let mut buf = Vec::with_capacity(tag.len() + 64);
        buf.extend_from_slice(tag);
        buf.extend_from_slice(self.channel_id.as_slice());
        buf.extend_from_slice(&self.nonce.to_be_bytes::<32>());
        keccak256(buf)
    }

    /// The appointment locator.
    pub fn locator(&self) -> Locator {
        self.derive(LOCATOR_TAG)
    }

    /// The blob's ChaCha20-Poly1305 key.
    pub fn key(&self) -> [u8; 32] {
        self.derive(KEY_TAG).0
    }
}

/// The plaintext body, with signatures in their fixed 65-byte form so the
/// encoding does not depend on another crate's serde representation.
#[derive(Serialize, Deserialize)]
struct BlobV1 {
    params: Params,
    state: State,
    sigs: Vec<Option<Vec<u8>>>,
}

fn encode(params: &Params, signed: &SignedState) -> Result<Vec<u8>, Error> {
    let body = BlobV1 {
        params: params.clone(),
        state: signed.state.clone(),
        sigs: signed
            .sigs
            .iter()
            .map(|s| {
                s.as_ref()
                    .map(|s| perun_wallet::signature_bytes(s).to_vec())
            })
            .collect(),
    };
    postcard::to_extend(&body, vec![BLOB_FORMAT]).map_err(Error::EncodeBlob)
}

fn decode(bytes: &[u8]) -> Result<(Params, SignedState), Error> {
    let (format, body) = bytes.split_first().ok_or(Error::EmptyPlaintext)?;
    if *format != BLOB_FORMAT {
        return Err(Error::PlaintextFormat(*format));
    }
    let (v, rest): (BlobV1, _) = postcard::take_from_bytes(body).map_err(Error::PlaintextBody)?;
    if !rest.is_empty() {
        return Err(Error::PlaintextTrailing(rest.len()));
    }
    let sigs = v
        .sigs
        .iter()
        .enumerate()
        .map(|(index, s)| {
            s.as_deref()
                .map(perun_wallet::parse_signature)
                .transpose()
                .map_err(|source| Error::PlaintextSignature { index, source })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((
        v.params,
        SignedState {
            state: v.state,
            sigs,
        },
    ))
}

/// Encrypts `(params, signed)` for the tower: returns the locator and the blob.
///
/// Refuses a blob over [`MAX_BLOB_LEN`], which the tower would refuse too.
pub fn seal(params: &Params, signed: &SignedState) -> Result<(Locator, Vec<u8>), Error> {
    let secret = ChannelSecret::of(params);
    let locator = secret.locator();
    let plaintext = encode(params, signed)?;
    let mut nonce = [0u8; AEAD_NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut nonce);
    let cipher = ChaCha20Poly1305::new(Key::from_slice(&secret.key()));
    let ct = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &plaintext,
                aad: locator.as_slice(),
            },
        )
        .map_err(|_| Error::Seal)?;
    let mut blob = Vec::with_capacity(AEAD_NONCE_LEN + ct.len());
    blob.extend_from_slice(&nonce);
    blob.extend_from_slice(&ct);
    if blob.len() > MAX_BLOB_LEN {
        return Err(Error::TooLarge {
            len: blob.len(),
            max: MAX_BLOB_LEN,
        });
    }
    Ok((locator, blob))
}

/// Decrypts a blob with the channel's secret and checks that it holds this
/// channel's params and a valid, fully signed state.
pub fn open(secret: &ChannelSecret, blob: &[u8]) -> Result<(Params, SignedState), Error> {
    if blob.len() > MAX_BLOB_LEN {
        return Err(Error::TooLarge {
            len: blob.len(),
            max: MAX_BLOB_LEN,
        });
    }
    if blob.len() < AEAD_NONCE_LEN + TAG_LEN {
        return Err(Error::TooShort(blob.len()));
    }
    let (nonce, ct) = blob.split_at(AEAD_NONCE_LEN);
    let locator = secret.locator();
    let cipher = ChaCha20Poly1305::new(Key::from_slice(&secret.key()));
    let plaintext = cipher
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ct,
                aad: locator.as_slice(),
            },
        )
        .map_err(|_| Error::Decrypt)?;
    let (params, signed) = decode(&plaintext)?;
    let found = params.channel_id();
    if found != secret.channel_id || params.nonce != secret.nonce {
        return Err(Error::WrongChannel {
            expected: secret.channel_id,
            found,
        });
    }
    signed.verify_all(&params).map_err(Error::BadState)?;
    Ok((params, signed))
}
