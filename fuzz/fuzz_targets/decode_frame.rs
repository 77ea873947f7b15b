//! Fuzzes the wire frame decoder: any bytes a peer can send as a request or a
//! reply must decode to a typed error or to a message within the limits,
//! never panic, and a decoded message must survive a re-encode round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use perun_wire::{DEFAULT_MAX_FRAME, decode_frame, encode_frame, frame::decode_reply};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = decode_frame(data, DEFAULT_MAX_FRAME) {
        msg.check_limits()
            .expect("decoded messages are within limits");
        let again = encode_frame(&msg, usize::MAX).expect("a decoded message re-encodes");
        assert_eq!(
            decode_frame(&again, usize::MAX).expect("and decodes again"),
            msg
        );
    }
    // Reply bodies go through the same decoder behind the prefix.
    if let Some(body) = data.get(4..) {
        let _ = decode_reply(body);
    }
});
