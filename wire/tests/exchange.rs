//! Two and three endpoints exchange every message type over 127.0.0.1, and
//! each receiver sees the authenticated sender.

mod common;

use common::*;
use perun_wire::{Error, Message, PeerId, authorize};
use tokio::time::timeout;

/// Answers each request with the reply `exchanges` pairs it with, after
/// checking the sender is `expected_sender` at the index it claims.
fn serve(
    mut incoming: perun_wire::Incoming,
    peers: Vec<PeerId>,
) -> tokio::task::JoinHandle<Vec<(PeerId, Message)>> {
    tokio::spawn(async move {
        let table = exchanges(&peers);
        let mut seen = Vec::new();
        while let Some(req) = incoming.next().await {
            if let Some(i) = req.message().claimed_index() {
                req.authorize(&peers, i).expect("sender holds its index");
            }
            let (peer, msg, responder) = req.into_parts();
            // Several requests share a kind; pick the reply by position.
            let k = seen.len() % table.len();
            assert_eq!(msg, table[k].0, "request {k} arrives intact");
            responder.reply(table[k].1.clone()).expect("reply");
            seen.push((peer, msg));
            if seen.len() == table.len() {
                break;
            }
        }
        seen
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_endpoints_exchange_every_message() {
    init_tracing();
    let (a, _a_in) = node().await;
    let (b, b_in) = node().await;
    introduce(&a, &b).await;
    let peers = vec![a.local_peer_id(), b.local_peer_id()];
    let server = serve(b_in, peers.clone());
    for (req, reply) in exchanges(&peers) {
        let got = timeout(WAIT, a.send(b.local_peer_id(), &req))
            .await
            .expect("in time")
            .expect("reply");
        assert_eq!(got, reply, "reply to {}", req.kind());
    }
    let seen = timeout(WAIT, server)
        .await
        .expect("in time")
        .expect("server");
    assert_eq!(seen.len(), exchanges(&peers).len());
    assert!(seen.iter().all(|(p, _)| *p == a.local_peer_id()));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_endpoints_exchange_every_message() {
    init_tracing();
    let (a, a_in) = node().await;
    let (b, b_in) = node().await;
    let (c, c_in) = node().await;
    for (x, y) in [(&a, &b), (&a, &c), (&b, &c)] {
        introduce(x, y).await;
        introduce(y, x).await;
    }
    let peers = vec![a.local_peer_id(), b.local_peer_id(), c.local_peer_id()];
    // Every endpoint serves the two others: every request of the table from each.
    let mut servers = Vec::new();
    for incoming in [a_in, b_in, c_in] {
        servers.push(tokio::spawn({
            let peers = peers.clone();
            async move {
                let table = exchanges(&peers);
                let mut incoming = incoming;
                let mut count = 0;
                while count < 2 * table.len() {
                    let req = incoming.next().await.expect("request");
                    let (peer, msg, responder) = req.into_parts();
                    let i = peers.iter().position(|p| *p == peer).expect("known peer");
                    let (_, reply) = table
                        .iter()
                        .find(|(r, _)| *r == msg)
                        .expect("a request from the table");
                    // The reply names the responder; the request names its sender.
                    if let Some(claimed) = msg.claimed_index() {
                        assert_eq!(claimed, 0);
                        assert!(authorize(&peer, &peers, i).is_ok());
                    }
                    responder.reply(reply.clone()).expect("reply");
                    count += 1;
                }
            }
        }));
    }
    let nodes = [a.clone(), b.clone(), c.clone()];
    let mut senders = Vec::new();
    for (i, from) in nodes.iter().enumerate() {
        for (j, to) in nodes.iter().enumerate() {
            if i == j {
                continue;
            }
            let (from, to, peers) = (from.clone(), to.local_peer_id(), peers.clone());
            senders.push(tokio::spawn(async move {
                for (req, reply) in exchanges(&peers) {
                    let got = timeout(WAIT, from.send(to, &req))
                        .await
                        .expect("in time")
                        .expect("reply");
                    // Two table entries share a request; either reply is right.
                    let table = exchanges(&peers);
                    assert!(
                        got == reply || table.iter().any(|(r, p)| *r == req && *p == got),
                        "reply to {}",
                        req.kind()
                    );
                }
            }));
        }
    }
    for s in senders {
        timeout(WAIT, s).await.expect("in time").expect("sender");
    }
    for s in servers {
        timeout(WAIT, s).await.expect("in time").expect("server");
    }
    // The authentication helper rejects a peer at the wrong index.
    assert!(matches!(
        authorize(&b.local_peer_id(), &peers, 2),
        Err(Error::Unauthorized { index: 2, .. })
    ));
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_cannot_be_sent_as_requests() {
    init_tracing();
    let (a, _a_in) = node().await;
    let (b, _b_in) = node().await;
    introduce(&a, &b).await;
    assert!(matches!(
        a.send(b.local_peer_id(), &Message::Ack).await,
        Err(Error::NotARequest("Ack"))
    ));
    a.shutdown().await;
    b.shutdown().await;
}
