//! Oversized, truncated, random and stalled frames sent over a real libp2p
//! stream on `/perun/wire/1` are refused with typed errors, while valid
//! requests on the same connection, before, between and after, still succeed.
//!
//! The attacker is a second, raw request-response behaviour whose codec
//! writes whatever bytes it is told to, so the bytes really cross the
//! connection and hit the endpoint's decoder.

mod common;

use std::io;
use std::time::Duration;

use common::*;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::StreamProtocol;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use perun_wire::frame::{Reply, decode_reply};
use perun_wire::{Message, PROTOCOL, RefusalCode, UpdateCommit, encode_frame};
use rand::RngCore;

/// What the raw peer writes, and how long it then keeps the stream open.
#[derive(Debug)]
struct Raw {
    bytes: Vec<u8>,
    hold: Duration,
}

#[derive(Debug, Clone, Default)]
struct RawCodec;

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Raw;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, _: &mut T) -> io::Result<Raw>
    where
        T: AsyncRead + Unpin + Send,
    {
        Err(io::Error::other("the raw peer only sends"))
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut prefix = [0u8; 4];
        io.read_exact(&mut prefix).await?;
        let mut body = vec![0u8; u32::from_be_bytes(prefix) as usize];
        io.read_exact(&mut body).await?;
        Ok(body)
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Raw) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&req.bytes).await?;
        io.flush().await?;
        // A stalling peer keeps its write half open without sending more.
        tokio::time::sleep(req.hold).await;
        Ok(())
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
        _: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        Err(io::Error::other("the raw peer never answers"))
    }
}

fn valid() -> Vec<u8> {
    encode_frame(
        &Message::UpdateCommit(UpdateCommit {
            channel_id: Default::default(),
            version: 9,
            index: 0,
            signatures: vec![sig(0), sig(1)],
        }),
        1 << 20,
    )
    .expect("encode")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_are_refused_and_the_connection_keeps_serving() {
    init_tracing();
    let read_timeout = Duration::from_millis(300);
    let (b, mut b_in) = node_with(|c| c.read_timeout = read_timeout).await;
    let b_id = b.local_peer_id();
    let b_addr = b.listen_addrs().await.expect("addrs")[0].clone();
    // b acks every request that reaches the application and counts them.
    let server = tokio::spawn(async move {
        let mut seen = 0;
        while let Some(req) = b_in.next().await {
            let (_, msg, r) = req.into_parts();
            assert!(matches!(msg, Message::UpdateCommit(_)), "{}", msg.kind());
            r.reply(Message::Ack).expect("reply");
            seen += 1;
        }
        seen
    });

    let mut raw = raw_swarm(|_| {
        request_response::Behaviour::<RawCodec>::new(
            [(StreamProtocol::new(PROTOCOL), ProtocolSupport::Outbound)],
            request_response::Config::default().with_request_timeout(Duration::from_secs(10)),
        )
    });

    let mut random = vec![0u8; 300];
    rand::thread_rng().fill_bytes(&mut random);
    random[..4].copy_from_slice(&296u32.to_be_bytes()); // a well-formed length, garbage body
    let mut truncated = valid();
    truncated.truncate(truncated.len() - 5);
    let mut oversized = (2u32 << 20).to_be_bytes().to_vec();
    oversized.extend_from_slice(&[0u8; 64 * 1024]);
    let mut stalled = 100u32.to_be_bytes().to_vec();
    stalled.extend_from_slice(&[1u8; 10]);
    // A valid frame of a reply-only message.
    let wrong_kind = encode_frame(&Message::Ack, 1 << 20).expect("encode");

    let now = Duration::ZERO;
    let cases: Vec<(&str, Raw, Option<RefusalCode>)> = vec![
        (
            "valid-before",
            Raw {
                bytes: valid(),
                hold: now,
            },
            None,
        ),
        (
            "random",
            Raw {
                bytes: random.clone(),
                hold: now,
            },
            Some(RefusalCode::Malformed),
        ),
        (
            "random-no-prefix",
            Raw {
                bytes: random[4..].to_vec(),
                hold: now,
            },
            Some(RefusalCode::TooLarge),
        ),
        (
            "truncated",
            Raw {
                bytes: truncated,
                hold: now,
            },
            Some(RefusalCode::Malformed),
        ),
        (
            "oversized",
            Raw {
                bytes: oversized,
                hold: now,
            },
            Some(RefusalCode::TooLarge),
        ),
        (
            "stalled",
            Raw {
                bytes: stalled,
                hold: read_timeout * 3,
            },
            Some(RefusalCode::Stalled),
        ),
        (
            "reply-as-request",
            Raw {
                bytes: wrong_kind,
                hold: now,
            },
            Some(RefusalCode::NotARequest),
        ),
        (
            "valid-concurrent",
            Raw {
                bytes: valid(),
                hold: now,
            },
            None,
        ),
    ];
    // random-no-prefix: whatever the first 4 random bytes say, it is either
    // too large or garbage; make it deterministic by forcing a huge prefix.
    let mut cases = cases;
    cases[2].1.bytes[..4].copy_from_slice(&u32::MAX.to_be_bytes());

    let mut expected =
        std::collections::HashMap::<OutboundRequestId, (&str, Option<RefusalCode>)>::new();
    for (name, req, want) in cases {
        let id = raw
            .behaviour_mut()
            .send_request_with_addresses(&b_id, req, vec![b_addr.clone()]);
        expected.insert(id, (name, want));
    }

    let mut connections = 0;
    let mut valid_after_sent = false;
    let mut done = 0;
    let total = expected.len() + 1;
    let deadline = tokio::time::sleep(WAIT);
    tokio::pin!(deadline);
    while done < total {
        let event = tokio::select! {
            ev = raw.select_next_some() => ev,
            _ = &mut deadline => panic!("timed out with {done}/{total} answers"),
        };
        match event {
            SwarmEvent::ConnectionEstablished { .. } => connections += 1,
            SwarmEvent::ConnectionClosed { cause, .. } => {
                panic!("the connection must survive bad frames: {cause:?}")
            }
            SwarmEvent::Behaviour(request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            }) => {
                let reply: Reply = decode_reply(&response).expect("a well-formed reply");
                let (name, want) = expected
                    .remove(&request_id)
                    .unwrap_or(("valid-after", None));
                match want {
                    None => assert_eq!(reply, Ok(Message::Ack), "{name}"),
                    Some(code) => {
                        let refusal = reply.expect_err(name);
                        assert_eq!(refusal.code, code, "{name}: {}", refusal.detail);
                    }
                }
                done += 1;
                // Once every bad frame got its answer, the same connection
                // still serves a fresh valid request.
                if expected.is_empty() && !valid_after_sent {
                    valid_after_sent = true;
                    raw.behaviour_mut().send_request(
                        &b_id,
                        Raw {
                            bytes: valid(),
                            hold: now,
                        },
                    );
                }
            }
            SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                request_id,
                error,
                ..
            }) => {
                let name = expected.get(&request_id).map_or("valid-after", |e| e.0);
                panic!("{name}: no answer: {error}");
            }
            _ => {}
        }
    }
    assert_eq!(connections, 1, "everything went over one connection");
    b.shutdown().await;
    let seen = tokio::time::timeout(WAIT, server)
        .await
        .expect("in time")
        .expect("server");
    assert_eq!(seen, 3, "only the valid requests reach the application");
}
