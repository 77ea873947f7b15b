//! Lanes (`/perun/wire/2`): requests move onto one long-lived stream per
//! peer once identify lists the protocol, replies find their callers in any
//! order, an idle lane closes and a new one opens on demand; and a raw peer
//! writing bad frames on a lane gets the same refusals as on a request
//! stream, under each frame's id, while the lane goes on serving.

mod common;

use std::time::Duration;

use common::*;
use futures::{AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream};
use perun_wire::frame::{Reply, decode_reply, encode_tagged};
use perun_wire::{Handle, Message, Refusal, RefusalCode};

/// Sends commits from `a` to `b` until they travel on a lane.
async fn until_on_lane(a: &Handle, b: &Handle) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !a.on_lane(&b.local_peer_id()) {
        assert!(tokio::time::Instant::now() < deadline, "no lane opened");
        let _ = a.send(b.local_peer_id(), &commit(0)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `b` refuses every commit with its version as the detail, so each caller
/// can tell that the reply it got is its own.
fn echo_versions(mut incoming: perun_wire::Incoming) {
    tokio::spawn(async move {
        while let Some(req) = incoming.next().await {
            let (_, msg, r) = req.into_parts();
            let detail = match &msg {
                Message::UpdateCommit(c) => c.version.to_string(),
                other => other.kind().to_string(),
            };
            let _ = r.refuse(Refusal::new(RefusalCode::Unauthorized, detail));
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_find_their_callers_and_an_idle_lane_reopens() {
    init_tracing();
    let idle = Duration::from_millis(400);
    let (a, _a_in) = node_with(|c| c.idle_timeout = idle).await;
    let (b, b_in) = node_with(|c| c.idle_timeout = Duration::from_secs(30)).await;
    introduce(&a, &b).await;
    echo_versions(b_in);
    until_on_lane(&a, &b).await;

    let b_id = b.local_peer_id();
    let mut calls = futures::stream::FuturesUnordered::new();
    for version in 1..=2_000u64 {
        let a = a.clone();
        calls.push(async move { (version, a.send(b_id, &commit(version)).await) });
    }
    while let Some((version, reply)) = calls.next().await {
        match reply {
            Err(perun_wire::Error::Refused(r)) => assert_eq!(r.detail, version.to_string()),
            other => panic!("request {version}: {other:?}"),
        }
    }
    assert!(
        a.on_lane(&b_id),
        "2,000 requests should have stayed on the lane"
    );

    // Idle for longer than `idle_timeout`: the lane closes, and the next
    // request opens another one (or goes on /perun/wire/1 meanwhile).
    let deadline = tokio::time::Instant::now() + WAIT;
    while a.on_lane(&b_id) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "idle lane stayed open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match a.send(b_id, &commit(7)).await {
        Err(perun_wire::Error::Refused(r)) => assert_eq!(r.detail, "7"),
        other => panic!("after the idle close: {other:?}"),
    }
    until_on_lane(&a, &b).await;
    a.shutdown().await;
    b.shutdown().await;
}

async fn open(control: &libp2p_stream::Control, peer: PeerId) -> Stream {
    try_open_lane(control, peer)
        .await
        .expect("the endpoint takes the lane")
}

/// Reads one `[id][frame]` reply; `None` if the lane ended.
async fn read_reply(stream: &mut Stream) -> Option<(u64, Reply)> {
    let read = async {
        let (id, body) = read_tagged_frame(stream).await?;
        Some((id, decode_reply(&body).expect("reply")))
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("reply in time")
}

async fn write(stream: &mut Stream, bytes: &[u8]) {
    stream.write_all(bytes).await.expect("write");
    stream.flush().await.expect("flush");
}

fn refused(reply: &Reply) -> Option<RefusalCode> {
    reply.as_ref().err().map(|r| r.code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_on_a_lane_are_refused_under_their_id_and_the_lane_goes_on() {
    init_tracing();
    let read_timeout = Duration::from_millis(300);
    // A small frame limit, so that skipping an oversized frame is quick
    // within `read_timeout` on a loaded machine too (2 MiB through noise
    // and yamux was not).
    let max_frame = 16 * 1024;
    let (b, mut b_in) = node_with(|c| {
        c.read_timeout = read_timeout;
        c.max_frame = max_frame;
    })
    .await;
    tokio::spawn(async move {
        while let Some(req) = b_in.next().await {
            let (_, _, r) = req.into_parts();
            let _ = r.reply(Message::Ack);
        }
    });
    let b_id = b.local_peer_id();
    let control = raw_lane_peer(b.listen_addrs().await.expect("addrs")[0].clone()).await;
    let mut lane = open(&control, b_id).await;

    let valid = |id| encode_tagged(id, &commit(id), max_frame).expect("encode");
    write(&mut lane, &valid(1)).await;
    assert_eq!(read_reply(&mut lane).await, Some((1, Ok(Message::Ack))));

    // A well-formed length with a garbage body.
    let mut garbage = 2u64.to_be_bytes().to_vec();
    garbage.extend_from_slice(&296u32.to_be_bytes());
    garbage.extend_from_slice(&[0xff; 296]);
    // Over the frame limit: skipped whole, so the lane stays framed.
    let mut oversized = 3u64.to_be_bytes().to_vec();
    oversized.extend_from_slice(&(2 * max_frame as u32).to_be_bytes());
    oversized.extend_from_slice(&vec![0u8; 2 * max_frame]);
    let reply_as_request = encode_tagged(4, &Message::Ack, max_frame).expect("encode");
    for bytes in [&garbage, &oversized, &reply_as_request, &valid(5)] {
        write(&mut lane, bytes).await;
    }
    let mut got = Vec::new();
    for _ in 0..4 {
        let (id, reply) = read_reply(&mut lane).await.expect("a reply");
        got.push((id, refused(&reply)));
    }
    got.sort_by_key(|(id, _)| *id);
    assert_eq!(
        got,
        vec![
            (2, Some(RefusalCode::Malformed)),
            (3, Some(RefusalCode::TooLarge)),
            (4, Some(RefusalCode::NotARequest)),
            (5, None),
        ]
    );

    // A frame that stalls half-way is refused and ends the lane.
    let mut stalled = 6u64.to_be_bytes().to_vec();
    stalled.extend_from_slice(&100u32.to_be_bytes());
    stalled.extend_from_slice(&[1u8; 10]);
    write(&mut lane, &stalled).await;
    let (id, reply) = read_reply(&mut lane).await.expect("a refusal");
    assert_eq!((id, refused(&reply)), (6, Some(RefusalCode::Stalled)));
    assert_eq!(read_reply(&mut lane).await, None, "the lane should end");

    // The endpoint serves a new lane of the same peer.
    let mut again = open(&control, b_id).await;
    write(&mut again, &valid(7)).await;
    assert_eq!(read_reply(&mut again).await, Some((7, Ok(Message::Ack))));
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_gets_a_bounded_number_of_lanes_and_requests() {
    init_tracing();
    let (b, mut b_in) = node_with(|c| c.limits.requests_per_peer = 2).await;
    // b holds every request unanswered.
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(req) = b_in.next().await {
            held.push(req);
        }
    });
    let b_id = b.local_peer_id();
    let control = raw_lane_peer(b.listen_addrs().await.expect("addrs")[0].clone()).await;
    let mut lane = open(&control, b_id).await;
    for id in 1..=3 {
        write(
            &mut lane,
            &encode_tagged(id, &commit(id), 1 << 20).expect("encode"),
        )
        .await;
    }
    let (id, reply) = read_reply(&mut lane).await.expect("a refusal");
    assert_eq!((id, refused(&reply)), (3, Some(RefusalCode::Busy)));

    // Eight lanes are served; a ninth is dropped at once.
    let mut lanes = Vec::new();
    for n in 2..=8 {
        let lane = try_open_lane(&control, b_id).await;
        lanes.push(lane.unwrap_or_else(|| panic!("lane {n} not taken")));
    }
    assert!(
        try_open_lane(&control, b_id).await.is_none(),
        "the ninth lane is dropped before its preface"
    );
    held.abort();
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_request_is_refused_and_the_incoming_queue_ends_with_the_endpoint() {
    init_tracing();
    let (a, _a_in) = node().await;
    let (b, b_in) = node().await;
    introduce(&a, &b).await;
    // b answers version 0 (to bring the lane up), drops version 1 unanswered,
    // and holds version 2 without answering until its endpoint is gone.
    let (is_held, server) = serve_holding(b_in, 2, Some(1));
    until_on_lane(&a, &b).await;
    let b_id = b.local_peer_id();
    match a.send(b_id, &commit(1)).await {
        Err(perun_wire::Error::Refused(r)) => assert_eq!(r.code, RefusalCode::NoReply),
        other => panic!("a dropped request: {other:?}"),
    }
    let held = {
        let a = a.clone();
        tokio::spawn(async move { a.send(b_id, &commit(2)).await })
    };
    tokio::time::timeout(WAIT, is_held)
        .await
        .expect("b holds the request")
        .expect("server task");
    b.shutdown().await;
    // The held request's lane may still owe a reply, yet b's incoming
    // queue ends with b.
    let held_count = tokio::time::timeout(WAIT, server)
        .await
        .expect("b's incoming queue ended")
        .expect("server task");
    assert_eq!(held_count, 1);
    let outcome = tokio::time::timeout(WAIT, held)
        .await
        .expect("the held request ends");
    assert!(outcome.expect("task").is_err());
    a.shutdown().await;
}
