//! Fuzz-style properties: random bytes and random JSON into every request
//! decoder and into `scheme::open` never panic, and a refusal is always
//! `malformed_request` (decoders) or a typed scheme error (blobs).

use alloy_primitives::{B256, U256};
use perun_watchtower::api::{
    AddAppointmentRequest, ApiError, GetAppointmentRequest, GetSubscriptionRequest,
    RegisterRequest, decode_hex, decode_request,
};
use perun_watchtower::scheme::ChannelSecret;
use proptest::prelude::*;
use serde_json::{Value, json};

fn all_decoders(body: &[u8]) {
    fn check<T: serde::de::DeserializeOwned>(body: &[u8]) {
        if let Err(ApiError { status, code, .. }) = decode_request::<T>(body) {
            assert_eq!(status.as_u16(), 400);
            assert_eq!(code, "malformed_request");
        }
    }
    check::<RegisterRequest>(body);
    check::<AddAppointmentRequest>(body);
    check::<GetAppointmentRequest>(body);
    check::<GetSubscriptionRequest>(body);
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,80}".prop_map(Value::from),
        "(0x)?[0-9a-fA-F]{0,140}".prop_map(Value::from),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("user".to_string()),
                    Just("signature".to_string()),
                    Just("locator".to_string()),
                    Just("blob".to_string()),
                    "[a-z_]{1,10}",
                ],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        all_decoders(&body);
        let _ = decode_hex("x", &String::from_utf8_lossy(&body));
    }

    #[test]
    fn random_json_never_panics(v in json_value()) {
        all_decoders(v.to_string().as_bytes());
    }

    #[test]
    fn request_shaped_json_never_panics(
        user in leaf(), signature in leaf(), locator in leaf(), blob in leaf(), seq in leaf()
    ) {
        for v in [
            json!({ "user": user, "signature": signature }),
            json!({ "locator": locator, "seq": seq, "blob": blob, "signature": signature }),
            json!({ "locator": locator, "signature": signature }),
        ] {
            all_decoders(v.to_string().as_bytes());
            if let Ok(req) = decode_request::<AddAppointmentRequest>(v.to_string().as_bytes()) {
                let _ = decode_hex("blob", &req.blob);
            }
        }
    }

    #[test]
    fn random_blobs_never_open(
        blob in prop::collection::vec(any::<u8>(), 0..2048),
        id in any::<[u8; 32]>(),
        nonce in any::<[u8; 32]>(),
    ) {
        let secret = ChannelSecret { channel_id: B256::from(id), nonce: U256::from_be_bytes(nonce) };
        prop_assert!(perun_watchtower::open(&secret, &blob).is_err());
    }
}
