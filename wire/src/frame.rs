//! Frames: a `u32` big-endian length, then the postcard encoding.
//!
//! Requests carry a [`Message`]; replies carry `Result<Message, Refusal>`.
//! Decoding is strict: the length must not exceed the limit, the body must
//! be consumed exactly, and every decoded message passes
//! [`Message::check_limits`]. Nothing here panics on any input, which the
//! fuzz target in `fuzz/` checks.

use futures::{AsyncRead, AsyncReadExt};
use serde::Serialize;

use crate::message::{MAX_REASON, Message, Refusal};
use crate::{Error, Result};

/// The libp2p protocol id of the perun wire protocol: one stream per
/// request (libp2p request-response).
pub const PROTOCOL: &str = "/perun/wire/1";

/// The same messages on long-lived lanes: one stream per peer and
/// direction, each frame tagged with its request's id (see `lane.rs`).
pub const LANE_PROTOCOL: &str = "/perun/wire/2";

/// Default largest frame body, in bytes (1 MiB).
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// Bytes of the length prefix.
pub const PREFIX_LEN: usize = 4;

/// A reply as it travels: the peer's message, or the transport's refusal.
pub type Reply = std::result::Result<Message, Refusal>;

/// Encodes `value` as one frame (prefix + body) in a single allocation.
pub fn encode_frame<T: Serialize>(value: &T, max_frame: usize) -> Result<Vec<u8>> {
    encode_after(&[], value, max_frame)
}

/// Bytes of a lane frame's id, before its frame.
pub const TAG_LEN: usize = 8;

/// Encodes `value` as one lane frame on `/perun/wire/2`: its id (`u64`
/// big-endian), then the frame as [`encode_frame`] writes it.
pub fn encode_tagged<T: Serialize>(id: u64, value: &T, max_frame: usize) -> Result<Vec<u8>> {
    encode_after(&id.to_be_bytes(), value, max_frame)
}

/// `header`, then `value` as a frame, in one allocation.
fn encode_after<T: Serialize>(header: &[u8], value: &T, max_frame: usize) -> Result<Vec<u8>> {
    let start = header.len() + PREFIX_LEN;
    let mut buf = Vec::with_capacity(512);
    buf.extend_from_slice(header);
    buf.extend_from_slice(&[0; PREFIX_LEN]);
    let mut buf = postcard::to_extend(value, buf)?;
    let len = buf.len() - start;
    let too_large = Error::FrameTooLarge {
        len,
        max: max_frame,
    };
    if len > max_frame {
        return Err(too_large);
    }
    let prefix = u32::try_from(len).map_err(|_| too_large)?.to_be_bytes();
    buf[header.len()..start].copy_from_slice(&prefix);
    Ok(buf)
}

/// Decodes a request body (the bytes after the prefix) and checks its limits.
pub fn decode_message(body: &[u8]) -> Result<Message> {
    let msg: Message = decode_exact(body)?;
    msg.check_limits()?;
    Ok(msg)
}

/// Decodes a reply body and checks its limits.
pub fn decode_reply(body: &[u8]) -> Result<Reply> {
    let reply: Reply = decode_exact(body)?;
    match &reply {
        Ok(msg) => msg.check_limits()?,
        Err(r) if r.detail.len() > MAX_REASON => {
            return Err(Error::Limit {
                what: "refusal detail",
                got: r.detail.len(),
            });
        }
        Err(_) => {}
    }
    Ok(reply)
}

/// Decodes one whole request frame (prefix + body), as it arrives on a stream.
pub fn decode_frame(frame: &[u8], max_frame: usize) -> Result<Message> {
    let (prefix, body) = frame.split_at_checked(PREFIX_LEN).ok_or(Error::Truncated {
        expected: PREFIX_LEN,
        got: frame.len(),
    })?;
    let len = frame_len(prefix, max_frame)?;
    if body.len() != len {
        return Err(Error::LengthMismatch {
            expected: len,
            got: body.len(),
        });
    }
    decode_message(body)
}

fn decode_exact<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T> {
    let (value, rest) = postcard::take_from_bytes(body)?;
    if !rest.is_empty() {
        return Err(Error::TrailingBytes(rest.len()));
    }
    Ok(value)
}

fn frame_len(prefix: &[u8], max_frame: usize) -> Result<usize> {
    let mut p = [0u8; PREFIX_LEN];
    p.copy_from_slice(prefix);
    let len = usize::try_from(u32::from_be_bytes(p)).unwrap_or(usize::MAX);
    if len > max_frame {
        return Err(Error::FrameTooLarge {
            len,
            max: max_frame,
        });
    }
    Ok(len)
}

/// Reads one frame body from `io`. The buffer grows as bytes arrive, so a
/// peer that only *claims* a large frame does not make us allocate it.
pub(crate) async fn read_body<R: AsyncRead + Unpin>(
    io: &mut R,
    max_frame: usize,
) -> Result<Vec<u8>> {
    let len = read_len(io, max_frame).await?;
    read_exact_body(io, len).await
}

/// Reads a frame's length prefix and checks it against `max_frame`.
pub(crate) async fn read_len<R: AsyncRead + Unpin>(io: &mut R, max_frame: usize) -> Result<usize> {
    let mut prefix = [0u8; PREFIX_LEN];
    let mut got = 0;
    while got < PREFIX_LEN {
        let n = io.read(&mut prefix[got..]).await?;
        if n == 0 {
            return Err(Error::Truncated {
                expected: PREFIX_LEN,
                got,
            });
        }
        got += n;
    }
    frame_len(&prefix, max_frame)
}

/// Reads a frame body of `len` bytes (the prefix was read already).
pub(crate) async fn read_exact_body<R: AsyncRead + Unpin>(
    io: &mut R,
    len: usize,
) -> Result<Vec<u8>> {
    // Memory grows with the bytes that arrive (doubling), not with the
    // length a peer claims; a body within the first step is read in place,
    // in a buffer of its size (no probing read past its end, which would
    // grow the buffer for nothing).
    const FIRST: usize = 8 * 1024;
    let mut body = vec![0; len.min(FIRST)];
    let mut got = 0;
    while got < len {
        if got == body.len() {
            let more = len.min(got.saturating_mul(2));
            body.reserve_exact(more - got);
            body.resize(more, 0);
        }
        let n = io.read(&mut body[got..]).await?;
        if n == 0 {
            return Err(Error::Truncated { expected: len, got });
        }
        got += n;
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use alloy_primitives::{Address, B256, Bytes, Signature, U256};
    use libp2p::PeerId;
    use perun_channel::{Allocation, Asset, Phase, SignedState, State};
    use proptest::prelude::*;

    use super::*;
    use crate::message::*;

    fn sig(seed: u8) -> Signature {
        Signature::new(
            U256::from(seed) + U256::from(1),
            U256::from(seed) * U256::from(7),
            seed % 2 == 1,
        )
    }

    fn alloc(assets: usize, n: usize) -> Allocation {
        Allocation::new(
            (0..assets)
                .map(|i| Asset {
                    chainId: U256::from(31337),
                    holder: Address::repeat_byte(i as u8 + 1),
                })
                .collect(),
            (0..assets)
                .map(|a| (0..n).map(|p| U256::from(a * 100 + p)).collect())
                .collect(),
        )
    }

    fn state(n: usize, app: usize) -> State {
        State {
            channelId: B256::repeat_byte(9),
            version: 3,
            outcome: alloc(1, n),
            appData: Bytes::from(vec![7u8; app]),
            isFinal: false,
        }
    }

    fn sync(n: usize) -> Sync {
        Sync {
            channel_id: B256::repeat_byte(9),
            index: 1,
            phase: Phase::Updating,
            latest: SignedState {
                state: state(n, 0),
                sigs: (0..n).map(|i| Some(sig(i as u8))).collect(),
            },
            staged: Some(SignedState {
                state: state(n, 0).next(),
                sigs: vec![Some(sig(1)), None],
            }),
        }
    }

    fn proposal(n: usize) -> Proposal {
        Proposal {
            proposal_id: B256::repeat_byte(1),
            challenge_duration: 60,
            domain: perun_channel::Domain {
                chain_id: alloy_primitives::U256::from(31337),
                adjudicator: Address::repeat_byte(0xad),
            },
            participants: (0..n)
                .map(|i| Participant {
                    address: Address::repeat_byte(i as u8 + 1),
                    peer: PeerId::random(),
                })
                .collect(),
            proposer: 0,
            allocation: alloc(2, n),
            app: Address::ZERO,
            app_data: Bytes::new(),
            nonce_share: B256::repeat_byte(5),
        }
    }

    fn roundtrip(msg: &Message) -> Message {
        let frame = encode_frame(msg, DEFAULT_MAX_FRAME).expect("encode");
        decode_frame(&frame, DEFAULT_MAX_FRAME).expect("decode")
    }

    #[test]
    fn every_variant_roundtrips() {
        let msgs = [
            Message::Proposal(proposal(3)),
            Message::ProposalAccept(ProposalAccept {
                proposal_id: B256::repeat_byte(1),
                index: 2,
                nonce_share: B256::repeat_byte(3),
                address: Address::repeat_byte(3),
            }),
            Message::ProposalReject(ProposalReject {
                proposal_id: B256::repeat_byte(1),
                index: 1,
                reason: "no".into(),
            }),
            Message::Signing0(Signing0 {
                proposal_id: B256::repeat_byte(1),
                nonce_shares: vec![B256::repeat_byte(1), B256::repeat_byte(2)],
                signature: sig(4),
            }),
            Message::Update(Update {
                channel_id: B256::repeat_byte(9),
                state: state(2, 100),
                actor: 1,
            }),
            Message::UpdateAccept(UpdateAccept {
                channel_id: B256::repeat_byte(9),
                version: 4,
                index: 0,
                signature: sig(3),
            }),
            Message::UpdateReject(UpdateReject {
                channel_id: B256::repeat_byte(9),
                version: 4,
                index: 0,
                reason: "too greedy".into(),
                kind: RejectKind::Conflict,
            }),
            Message::UpdateCommit(UpdateCommit {
                channel_id: B256::repeat_byte(9),
                version: 4,
                index: 0,
                signatures: vec![sig(1), sig(2), sig(3)],
            }),
            Message::Sync(sync(2)),
            Message::Ack,
        ];
        for msg in &msgs {
            assert_eq!(&roundtrip(msg), msg, "{}", msg.kind());
        }
    }

    #[test]
    fn refusal_reply_roundtrips() {
        let reply: Reply = Err(Refusal::new(RefusalCode::Busy, "full"));
        let frame = encode_frame(&reply, DEFAULT_MAX_FRAME).expect("encode");
        assert_eq!(decode_reply(&frame[PREFIX_LEN..]).expect("decode"), reply);
    }

    #[test]
    fn limits_are_enforced_on_decode() {
        // 17 participants: refused while decoding, before any allocation.
        let mut p = proposal(2);
        p.participants = (0..17)
            .map(|_| Participant {
                address: Address::repeat_byte(1),
                peer: PeerId::random(),
            })
            .collect();
        let frame = encode_frame(&Message::Proposal(p), DEFAULT_MAX_FRAME).expect("encode");
        assert!(matches!(
            decode_frame(&frame, DEFAULT_MAX_FRAME),
            Err(Error::Decode(_))
        ));

        // One participant: decodes, then fails the limit check.
        let mut p = proposal(2);
        p.participants.truncate(1);
        let frame = encode_frame(&Message::Proposal(p), DEFAULT_MAX_FRAME).expect("encode");
        assert!(matches!(
            decode_frame(&frame, DEFAULT_MAX_FRAME),
            Err(Error::Limit {
                what: "participants",
                got: 1
            })
        ));

        // Balance rows that do not match the participants.
        let mut p = proposal(3);
        p.allocation.balances[1].pop();
        let frame = encode_frame(&Message::Proposal(p), DEFAULT_MAX_FRAME).expect("encode");
        assert!(matches!(
            decode_frame(&frame, DEFAULT_MAX_FRAME),
            Err(Error::Limit {
                what: "balances per asset",
                ..
            })
        ));

        // appData over 64 KiB.
        let msg = Message::Update(Update {
            channel_id: B256::ZERO,
            state: state(2, 64 * 1024 + 1),
            actor: 0,
        });
        let frame = encode_frame(&msg, DEFAULT_MAX_FRAME).expect("encode");
        assert!(matches!(
            decode_frame(&frame, DEFAULT_MAX_FRAME),
            Err(Error::State(perun_channel::Error::AppDataTooLarge(_)))
        ));

        // Zero assets.
        let mut s = state(2, 0);
        s.outcome = alloc(0, 2);
        let msg = Message::Update(Update {
            channel_id: B256::ZERO,
            state: s,
            actor: 0,
        });
        let frame = encode_frame(&msg, DEFAULT_MAX_FRAME).expect("encode");
        assert!(matches!(
            decode_frame(&frame, DEFAULT_MAX_FRAME),
            Err(Error::State(_))
        ));

        // A long reason.
        let msg = Message::ProposalReject(ProposalReject {
            proposal_id: B256::ZERO,
            index: 0,
            reason: "x".repeat(MAX_REASON + 1),
        });
        let frame = encode_frame(&msg, DEFAULT_MAX_FRAME).expect("encode");
        assert!(matches!(
            decode_frame(&frame, DEFAULT_MAX_FRAME),
            Err(Error::Limit { what: "reason", .. })
        ));
    }

    #[test]
    fn claimed_huge_sequences_fail_fast() {
        // A Sync whose signature vector claims u32::MAX entries.
        let frame = encode_frame(&Message::Sync(sync(2)), DEFAULT_MAX_FRAME).expect("encode");
        let body = &frame[PREFIX_LEN..];
        // Variant index 8 (Sync), then channel id (32), index, phase, ...: find
        // the latest.sigs length byte (2) by re-encoding with 3 sigs and diffing.
        let mut three = sync(2);
        three.latest.sigs.push(None);
        let frame3 = encode_frame(&Message::Sync(three), DEFAULT_MAX_FRAME).expect("encode");
        let body3 = &frame3[PREFIX_LEN..];
        let at = body
            .iter()
            .zip(body3)
            .position(|(a, b)| a != b)
            .expect("encodings differ");
        let mut evil = body[..at].to_vec();
        evil.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]); // varint u32::MAX
        evil.extend_from_slice(&body[at + 1..]);
        assert!(matches!(decode_message(&evil), Err(Error::Decode(_))));
    }

    #[test]
    fn bad_frames_are_typed_errors() {
        let frame = encode_frame(&Message::Sync(sync(2)), DEFAULT_MAX_FRAME).expect("encode");
        assert!(matches!(
            decode_frame(&frame[..2], DEFAULT_MAX_FRAME),
            Err(Error::Truncated { .. })
        ));
        assert!(matches!(
            decode_frame(&frame[..frame.len() - 1], DEFAULT_MAX_FRAME),
            Err(Error::LengthMismatch { .. })
        ));
        assert!(matches!(
            decode_frame(&frame, 10),
            Err(Error::FrameTooLarge { max: 10, .. })
        ));
        let mut trailing = frame[PREFIX_LEN..].to_vec();
        trailing.push(0);
        assert!(matches!(
            decode_message(&trailing),
            Err(Error::TrailingBytes(1))
        ));
        assert!(matches!(decode_message(&[200]), Err(Error::Decode(_))));
        assert!(matches!(
            encode_frame(&Message::Sync(sync(2)), 10),
            Err(Error::FrameTooLarge { max: 10, .. })
        ));
    }

    #[test]
    fn reads_frames_from_a_stream() {
        let frame = encode_frame(&Message::Ack, DEFAULT_MAX_FRAME).expect("encode");
        let body = futures::executor::block_on(read_body(&mut &frame[..], DEFAULT_MAX_FRAME))
            .expect("read");
        assert_eq!(decode_message(&body).expect("decode"), Message::Ack);
        let short = futures::executor::block_on(read_body(&mut &frame[..frame.len() - 1], 100));
        assert!(matches!(short, Err(Error::Truncated { .. })));
        let big = [0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        let big = futures::executor::block_on(read_body(&mut &big[..], DEFAULT_MAX_FRAME));
        assert!(matches!(big, Err(Error::FrameTooLarge { .. })));
    }

    /// A body is read whole, in a buffer of its own size, in one step or
    /// in several; a short one names how much arrived.
    #[test]
    fn bodies_are_read_exactly() {
        for len in [0, 1, 300, 8 * 1024, 8 * 1024 + 1, 200_000] {
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let body =
                futures::executor::block_on(read_exact_body(&mut &bytes[..], len)).expect("read");
            assert_eq!(body, bytes);
            assert_eq!(body.capacity(), len, "no growth past the body");
            if len > 0 {
                let short =
                    futures::executor::block_on(read_exact_body(&mut &bytes[..len - 1], len));
                assert!(
                    matches!(short, Err(Error::Truncated { expected, got }) if expected == len && got == len - 1)
                );
            }
        }
    }

    fn arb_u256() -> impl Strategy<Value = U256> {
        any::<[u8; 32]>().prop_map(U256::from_be_bytes)
    }

    fn arb_sig() -> impl Strategy<Value = Signature> {
        (arb_u256(), arb_u256(), any::<bool>()).prop_map(|(r, s, y)| Signature::new(r, s, y))
    }

    fn arb_state(n: usize) -> impl Strategy<Value = State> {
        (
            any::<[u8; 32]>(),
            any::<u64>(),
            prop::collection::vec((arb_u256(), any::<[u8; 20]>()), 1..=4),
            prop::collection::vec(any::<u8>(), 0..64),
            any::<bool>(),
            prop::collection::vec(arb_u256(), n * 4),
        )
            .prop_map(move |(id, version, assets, app, fin, bals)| {
                let balances = (0..assets.len())
                    .map(|a| bals[a * n..(a + 1) * n].to_vec())
                    .collect();
                State {
                    channelId: B256::from(id),
                    version,
                    outcome: Allocation::new(
                        assets
                            .into_iter()
                            .map(|(c, h)| Asset {
                                chainId: c,
                                holder: Address::from(h),
                            })
                            .collect(),
                        balances,
                    ),
                    appData: Bytes::from(app),
                    isFinal: fin,
                }
            })
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let n = 2usize..=5;
        n.prop_flat_map(|n| {
            prop_oneof![
                (arb_state(n), 0..n).prop_map(|(state, actor)| {
                    Message::Update(Update {
                        channel_id: state.channelId,
                        state,
                        actor,
                    })
                }),
                (
                    arb_state(n),
                    prop::collection::vec(prop::option::of(arb_sig()), n),
                    any::<bool>()
                )
                    .prop_map(move |(state, sigs, staged)| {
                        let latest = SignedState { state, sigs };
                        Message::Sync(Sync {
                            channel_id: latest.state.channelId,
                            index: n - 1,
                            phase: Phase::Active,
                            staged: staged.then(|| latest.clone()),
                            latest,
                        })
                    }),
                (prop::collection::vec(arb_sig(), n), any::<u64>()).prop_map(
                    |(signatures, version)| {
                        Message::UpdateCommit(UpdateCommit {
                            channel_id: B256::ZERO,
                            version,
                            index: 0,
                            signatures,
                        })
                    }
                ),
                (arb_state(n), 1u64.., any::<[u8; 32]>()).prop_map(move |(s, cd, share)| {
                    Message::Proposal(Proposal {
                        proposal_id: B256::from(share),
                        challenge_duration: cd,
                        domain: perun_channel::Domain {
                            chain_id: alloy_primitives::U256::from(cd),
                            adjudicator: Address::repeat_byte(0xad),
                        },
                        participants: (0..n)
                            .map(|i| Participant {
                                address: Address::repeat_byte(i as u8),
                                peer: PeerId::random(),
                            })
                            .collect(),
                        proposer: n - 1,
                        allocation: s.outcome,
                        app: Address::repeat_byte(3),
                        app_data: s.appData,
                        nonce_share: B256::from(share),
                    })
                }),
                ("[a-z ]{0,40}", any::<u64>()).prop_map(|(reason, version)| {
                    Message::UpdateReject(UpdateReject {
                        channel_id: B256::ZERO,
                        version,
                        index: 1,
                        reason,
                        kind: RejectKind::Refused,
                    })
                }),
            ]
        })
    }

    proptest! {
        #[test]
        fn codec_roundtrips(msg in arb_message()) {
            prop_assert_eq!(roundtrip(&msg), msg);
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame(&bytes, DEFAULT_MAX_FRAME);
            let _ = decode_message(&bytes);
            let _ = decode_reply(&bytes);
        }

        #[test]
        fn mutated_frames_never_panic(msg in arb_message(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut frame = encode_frame(&msg, DEFAULT_MAX_FRAME).expect("encode");
            let i = at.index(frame.len());
            frame[i] = byte;
            if let Ok(m) = decode_frame(&frame, DEFAULT_MAX_FRAME) {
                prop_assert!(m.check_limits().is_ok());
            }
        }
    }
}
