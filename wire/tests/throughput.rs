//! 10,000 request/replies between two endpoints, many in flight at once.

mod common;

use std::sync::Arc;

use common::*;
use perun_channel::B256;
use perun_wire::{Message, Update, UpdateAccept};
use tokio::time::timeout;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_request_replies() {
    init_tracing();
    const TOTAL: u64 = 10_000;
    const TASKS: u64 = 50;
    let (a, _a_in) = node().await;
    let (b, mut b_in) = node().await;
    introduce(&a, &b).await;

    // b signs every update: the reply names the version it was asked for.
    let server = tokio::spawn(async move {
        let mut served = 0u64;
        while served < TOTAL {
            let req = b_in.next().await.expect("request");
            let (_, msg, responder) = req.into_parts();
            let Message::Update(u) = msg else {
                panic!("unexpected {}", msg.kind());
            };
            responder
                .reply(Message::UpdateAccept(UpdateAccept {
                    channel_id: u.channel_id,
                    version: u.state.version,
                    index: 1,
                    signature: sig(1),
                }))
                .expect("reply");
            served += 1;
        }
        served
    });

    let b_id = b.local_peer_id();
    let a = Arc::new(a);
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            for k in 0..TOTAL / TASKS {
                let version = t * (TOTAL / TASKS) + k;
                let req = Message::Update(Update {
                    channel_id: B256::repeat_byte(t as u8),
                    state: state(2, version),
                    actor: 0,
                });
                match a.send(b_id, &req).await.expect("reply") {
                    Message::UpdateAccept(acc) => {
                        assert_eq!(acc.version, version);
                        assert_eq!(acc.channel_id, B256::repeat_byte(t as u8));
                    }
                    other => panic!("unexpected {}", other.kind()),
                }
            }
        }));
    }
    for t in tasks {
        timeout(WAIT * 3, t).await.expect("in time").expect("task");
    }
    assert_eq!(
        timeout(WAIT, server)
            .await
            .expect("in time")
            .expect("server"),
        TOTAL
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_requests_in_flight_than_streams_allowed() {
    init_tracing();
    const TOTAL: usize = 2_000;
    // 32 streams per connection: 16 outstanding requests per side at most.
    let (a, a_in) = node_with(|c| c.max_concurrent_streams = 32).await;
    let (b, b_in) = node_with(|c| c.max_concurrent_streams = 32).await;
    introduce(&a, &b).await;
    introduce(&b, &a).await;
    let a_id = a.local_peer_id();
    let b_id = b.local_peer_id();
    // Both sides answer every request, and both send at once.
    for mut incoming in [a_in, b_in] {
        tokio::spawn(async move {
            while let Some(req) = incoming.next().await {
                let (_, _, r) = req.into_parts();
                let _ = r.reply(Message::Ack);
            }
        });
    }
    let mut tasks = Vec::new();
    for k in 0..TOTAL {
        let (from, to) = if k % 2 == 0 {
            (a.clone(), b_id)
        } else {
            (b.clone(), a_id)
        };
        tasks.push(tokio::spawn(async move {
            let commit = Message::UpdateCommit(perun_wire::UpdateCommit {
                channel_id: Default::default(),
                version: k as u64,
                index: 0,
                signatures: vec![sig(0), sig(1)],
            });
            from.send(to, &commit).await
        }));
    }
    for t in tasks {
        let reply = timeout(WAIT, t).await.expect("in time").expect("task");
        assert_eq!(reply.expect("every request gets its reply"), Message::Ack);
    }
    a.shutdown().await;
    b.shutdown().await;
}
