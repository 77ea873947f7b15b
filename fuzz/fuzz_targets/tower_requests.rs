//! Fuzzes the watchtower's request decoders: any body a client can POST
//! must decode to a request or to a typed API error (a stable code and an
//! HTTP status), never panic; and any plaintext inside a blob that passed
//! the AEAD (the first byte picks which) must be opened to a checked state
//! or refused with a typed error.
#![no_main]

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use libfuzzer_sys::fuzz_target;
use perun_channel::B256;
use perun_watchtower::api::{
    AddAppointmentRequest, GetAppointmentRequest, GetSubscriptionRequest, RegisterRequest,
    decode_hex, decode_request,
};
use perun_watchtower::scheme::{AEAD_NONCE_LEN, ChannelSecret, open};

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 6 {
        0 => drop(decode_request::<RegisterRequest>(body)),
        1 => {
            if let Ok(req) = decode_request::<AddAppointmentRequest>(body) {
                let _ = decode_hex("blob", &req.blob);
                let _ = decode_hex("signature", &req.signature);
            }
        }
        2 => drop(decode_request::<GetAppointmentRequest>(body)),
        3 => drop(decode_request::<GetSubscriptionRequest>(body)),
        4 => {
            // The raw blob, as the tower gets it from the store.
            let secret = ChannelSecret {
                channel_id: B256::repeat_byte(1),
                nonce: Default::default(),
            };
            let _ = open(&secret, body);
        }
        _ => {
            // A plaintext sealed under the right key: past the AEAD, into
            // the decoder and the state checks.
            let secret = ChannelSecret {
                channel_id: B256::repeat_byte(2),
                nonce: Default::default(),
            };
            let cipher = ChaCha20Poly1305::new(Key::from_slice(&secret.key()));
            let nonce = [7u8; AEAD_NONCE_LEN];
            let Ok(ct) = cipher.encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: body,
                    aad: secret.locator().as_slice(),
                },
            ) else {
                return;
            };
            let mut blob = nonce.to_vec();
            blob.extend_from_slice(&ct);
            if let Ok((params, signed)) = open(&secret, &blob) {
                // Whatever opens is the channel the secret names and fully signed.
                assert_eq!(params.channel_id(), secret.channel_id);
                assert!(signed.verify_all(&params).is_ok());
            }
        }
    }
});
