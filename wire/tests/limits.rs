//! Remote input is capped (DESIGN §6): unanswered requests per peer and in
//! all, bytes of large frames, connections, the address book; and a slow
//! peer cannot hold every send slot.

mod common;

use std::time::{Duration, Instant};

use common::*;
use perun_channel::Bytes;
use perun_wire::{Error, Handle, Incoming, Message, RefusalCode, Update, UpdateCommit};
use tokio::time::timeout;

fn commit() -> Message {
    Message::UpdateCommit(UpdateCommit {
        channel_id: Default::default(),
        version: 1,
        index: 0,
        signatures: vec![sig(0), sig(1)],
    })
}

fn is_busy(r: &perun_wire::Result<Message>) -> bool {
    matches!(r, Err(Error::Refused(r)) if r.code == RefusalCode::Busy)
}

/// Keeps every request unanswered (the responders stay alive) while the
/// node runs; the receiver counts them.
fn hold(mut incoming: Incoming) -> tokio::sync::watch::Receiver<usize> {
    let (count, counted) = tokio::sync::watch::channel(0);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(req) = incoming.next().await {
            held.push(req);
            count.send_replace(held.len());
        }
    });
    counted
}

/// Acknowledges every request.
fn ack(mut incoming: Incoming) {
    tokio::spawn(async move {
        while let Some(req) = incoming.next().await {
            let (_, _, responder) = req.into_parts();
            let _ = responder.reply(Message::Ack);
        }
    });
}

async fn send_many(from: &Handle, to: &Handle, n: usize) -> Vec<perun_wire::Result<Message>> {
    let id = to.local_peer_id();
    let msg = commit();
    let sends = (0..n).map(|_| from.send(id, &msg));
    timeout(WAIT, futures::future::join_all(sends))
        .await
        .expect("in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_requests_are_capped_per_peer_and_in_all() {
    init_tracing();
    let (b, b_in) = node_with(|c| {
        c.limits.requests_per_peer = 2;
        c.limits.requests = 3;
    })
    .await;
    let _held = hold(b_in);
    // Held requests time out however long this is; 3 s leaves the refusals
    // room to arrive first on a loaded machine.
    let quick = |c: &mut perun_wire::Config| c.request_timeout = Duration::from_secs(3);
    let (a, _a_in) = node_with(quick).await;
    let (c, _c_in) = node_with(quick).await;
    connect(&a, &b).await;
    connect(&c, &b).await;
    // a: two are held (and time out), the other two are refused at once.
    let results = send_many(&a, &b, 4).await;
    assert_eq!(
        results.iter().filter(|r| is_busy(r)).count(),
        2,
        "{results:?}"
    );
    assert_eq!(
        results
            .iter()
            .filter(|r| matches!(r, Err(Error::Timeout)))
            .count(),
        2
    );
    // Timed out at a's end, the two are still unanswered at b: a's cap is
    // full, c gets the one place left in all, and then b is full.
    let results = send_many(&c, &b, 2).await;
    assert_eq!(
        results.iter().filter(|r| is_busy(r)).count(),
        1,
        "{results:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_requests_give_their_place_back() {
    init_tracing();
    let (b, b_in) = node_with(|c| c.limits.requests_per_peer = 2).await;
    ack(b_in);
    let (a, _a_in) = node().await;
    introduce(&a, &b).await;
    for _ in 0..20 {
        let results = send_many(&a, &b, 2).await;
        assert!(
            results.iter().all(|r| matches!(r, Ok(Message::Ack))),
            "{results:?}"
        );
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_frames_share_a_byte_budget() {
    init_tracing();
    let (b, b_in) = node_with(|c| c.limits.large_frame_bytes = 40 * 1024).await;
    let mut held = hold(b_in);
    let (a, _a_in) = node_with(|c| c.request_timeout = Duration::from_secs(3)).await;
    connect(&a, &b).await;
    let mut st = state(2, 1);
    st.appData = Bytes::from(vec![7u8; 30 * 1024]);
    let big = Message::Update(Update {
        channel_id: Default::default(),
        state: st,
        actor: 0,
    });
    let id = b.local_peer_id();
    // The first holds 30 KiB of the 40 until answered; the second, sent
    // once b holds the first, does not fit.
    let first = a.send(id, &big);
    let second = async {
        held.wait_for(|n| *n == 1).await.expect("b holds the first");
        a.send(id, &big).await
    };
    let (first, second) = timeout(WAIT, futures::future::join(first, second))
        .await
        .expect("in time");
    assert!(matches!(first, Err(Error::Timeout)), "{first:?}");
    assert!(is_busy(&second), "{second:?}");
    // Small frames do not need the budget.
    let results = send_many(&a, &b, 1).await;
    assert!(matches!(results[0], Err(Error::Timeout)), "{results:?}");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_peer_does_not_take_every_send_slot() {
    init_tracing();
    // Two slots per peer.
    let (a, _a_in) = node_with(|c| {
        c.max_concurrent_streams = 4;
        c.request_timeout = Duration::from_secs(10);
    })
    .await;
    let (slow, slow_in) = node().await;
    let _held = hold(slow_in);
    let (fast, fast_in) = node().await;
    ack(fast_in);
    introduce(&a, &slow).await;
    introduce(&a, &fast).await;
    let stuck: Vec<_> = (0..4)
        .map(|_| {
            let (a, id) = (a.clone(), slow.local_peer_id());
            tokio::spawn(async move { a.send(id, &commit()).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let reply = timeout(WAIT, a.send(fast.local_peer_id(), &commit()))
        .await
        .expect("in time");
    assert_eq!(reply.expect("fast peer"), Message::Ack);
    // Not a clock bound: a send that waited for a slot of the slow peer's
    // would have had one only once those requests timed out.
    assert!(
        stuck.iter().all(|s| !s.is_finished()),
        "the fast peer's reply came after {:?}, once a request to the slow peer ended",
        t.elapsed()
    );
    for s in stuck {
        s.abort();
    }
    a.shutdown().await;
    slow.shutdown().await;
    fast.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incoming_connections_are_capped() {
    init_tracing();
    let (b, b_in) = node_with(|c| c.limits.incoming_connections = 1).await;
    ack(b_in);
    let (a, _a_in) = node().await;
    let (c, _c_in) = node().await;
    introduce(&a, &b).await;
    introduce(&c, &b).await;
    let results = send_many(&a, &b, 1).await;
    assert!(matches!(results[0], Ok(Message::Ack)), "{results:?}");
    let denied = timeout(WAIT, c.send(b.local_peer_id(), &commit()))
        .await
        .expect("in time");
    assert!(
        matches!(denied, Err(Error::DialFailure(_) | Error::ConnectionClosed)),
        "{denied:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_address_book_is_capped_and_keeps_pinned_peers() {
    init_tracing();
    let (b, b_in) = node_with(|c| c.limits.known_peers = 2).await;
    ack(b_in);
    // A peer the application named: pinned.
    let (pinned, pinned_in) = node().await;
    ack(pinned_in);
    introduce(&b, &pinned).await;
    // Peers that connect and announce their addresses (identify).
    let mut others = Vec::new();
    for _ in 0..4 {
        let (o, _o_in) = node().await;
        introduce(&o, &b).await;
        assert!(matches!(send_many(&o, &b, 1).await[0], Ok(Message::Ack)));
        others.push(o);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(b.known_peers().await.expect("count") <= 2);
    // The pinned peer is still reachable by its address.
    let reply = timeout(WAIT, b.send(pinned.local_peer_id(), &commit()))
        .await
        .expect("in time");
    assert_eq!(reply.expect("pinned"), Message::Ack);
    for o in others {
        o.shutdown().await;
    }
    b.shutdown().await;
    pinned.shutdown().await;
}
