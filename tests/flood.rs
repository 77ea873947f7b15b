//! A malicious peer floods a client for 30 s (DESIGN §6, §8 "Remote
//! input"): channel proposals, updates, commits and syncs for channels that
//! do not exist, over the real libp2p transport; and, from a raw libp2p
//! peer, malformed, oversized, large-garbage and stalled frames. Meanwhile
//! the victim and an honest peer keep paying each other in their channel.
//!
//! It shows that the process's resident memory stays under
//! [`RSS_BOUND_MIB`], that the victim answers bad frames with typed
//! refusals, and that the honest channel makes progress in every 5 s window.

mod common;

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol, noise, tcp, yamux};
use perun::channel::{Address, Allocation, B256, Bytes, Phase, SignedState, State, U256};
use perun::client::{IncomingProposal, ProposalHandler, ProposalResponder};
use perun::wire::{
    Message, Participant, Proposal, RejectKind, Sync, Update, UpdateCommit, UpdateReject,
};
use rand::{RngCore, SeedableRng};

/// How long the flood lasts.
const FLOOD: Duration = Duration::from_secs(30);
/// The bound on the test process's resident memory (victim, honest peer
/// and attacker together) during the flood. The process idles at about
/// 16 MiB and peaks near 120 MiB under the flood with the caps of
/// `Limits::default()` (DESIGN §6).
const RSS_BOUND_MIB: u64 = 256;

/// The process's resident memory in KiB (`VmRSS` of /proc/self/status).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// A handler that asks a human who never answers: every proposal it gets
/// stays pending until the handler timeout, so the flood fills the caps.
struct NeverDecides;

#[async_trait::async_trait]
impl ProposalHandler for NeverDecides {
    async fn handle_proposal(&self, _p: IncomingProposal, responder: ProposalResponder) {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(responder);
    }
}

/// What the raw peer writes, then how long it keeps the stream open.
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
        let len = u32::from_be_bytes(prefix) as usize;
        if len > 4096 {
            return Err(io::Error::other("reply too large"));
        }
        let mut body = vec![0u8; len];
        io.read_exact(&mut body).await?;
        Ok(body)
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Raw) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&req.bytes).await?;
        io.flush().await?;
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

/// One raw frame of the flood: `i` picks the kind.
fn raw_frame(i: u64, rng: &mut impl RngCore) -> Raw {
    let hold = Duration::ZERO;
    match i % 5 {
        // Claims 4 GiB.
        0 => Raw {
            bytes: u32::MAX.to_be_bytes().to_vec(),
            hold,
        },
        // A small frame of garbage.
        1 => {
            let mut body = vec![0u8; 200];
            rng.fill_bytes(&mut body);
            let mut bytes = 200u32.to_be_bytes().to_vec();
            bytes.extend(body);
            Raw { bytes, hold }
        }
        // A whole 1 MiB frame of garbage (the largest allowed).
        2 => {
            let len = 1 << 20;
            let mut bytes = (len as u32).to_be_bytes().to_vec();
            bytes.resize(4 + len, 0xab);
            Raw { bytes, hold }
        }
        // A 512 KiB frame of which only 64 KiB come, then nothing for 8 s.
        3 => {
            let mut bytes = (512u32 << 10).to_be_bytes().to_vec();
            bytes.resize(4 + (64 << 10), 0xcd);
            Raw {
                bytes,
                hold: Duration::from_secs(8),
            }
        }
        // A truncated prefix, then the stream closes.
        _ => Raw {
            bytes: vec![0, 0],
            hold,
        },
    }
}

/// Runs a raw libp2p peer against `victim` until `deadline`; returns the
/// frames it sent and the refusals it got back, by code.
async fn raw_flood(
    victim: PeerId,
    addr: Multiaddr,
    deadline: Instant,
) -> (u64, BTreeMap<String, u64>) {
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp")
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                RawCodec,
                [(
                    StreamProtocol::new(perun::wire::PROTOCOL),
                    ProtocolSupport::Outbound,
                )],
                request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(20))
                    .with_max_concurrent_streams(256),
            )
        })
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    swarm.add_peer_address(victim, addr);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (mut sent, mut in_flight) = (0u64, 0usize);
    let mut refusals = BTreeMap::new();
    while Instant::now() < deadline {
        while in_flight < 64 {
            swarm
                .behaviour_mut()
                .send_request(&victim, raw_frame(sent, &mut rng));
            sent += 1;
            in_flight += 1;
        }
        let ev = tokio::time::timeout(Duration::from_millis(200), swarm.select_next_some()).await;
        match ev {
            Ok(SwarmEvent::Behaviour(request_response::Event::Message {
                message: request_response::Message::Response { response, .. },
                ..
            })) => {
                in_flight -= 1;
                if let Ok(Err(refusal)) = perun::wire::frame::decode_reply(&response) {
                    *refusals.entry(format!("{:?}", refusal.code)).or_default() += 1;
                }
            }
            Ok(SwarmEvent::Behaviour(request_response::Event::OutboundFailure { .. })) => {
                in_flight -= 1;
            }
            _ => {}
        }
    }
    (sent, refusals)
}

fn u(x: u64) -> U256 {
    U256::from(x)
}

fn sig(seed: u8) -> perun::wallet::Signature {
    perun::wallet::Signature::new(U256::from(seed) + U256::from(1), U256::from(seed), false)
}

/// A state of a channel that does not exist, with `app` bytes of app data.
fn junk_state(rng: &mut impl RngCore, app: usize) -> SignedState {
    let mut id = [0u8; 32];
    rng.fill_bytes(&mut id);
    SignedState {
        state: State {
            channelId: B256::from(id),
            version: rng.next_u64(),
            outcome: Allocation::new(
                vec![perun::channel::Asset {
                    chainId: U256::from(1),
                    holder: Address::repeat_byte(1),
                }],
                vec![vec![U256::from(5), U256::from(5)]],
            ),
            appData: Bytes::from(vec![0x11; app]),
            isFinal: false,
        },
        sigs: vec![Some(sig(1)), Some(sig(2))],
    }
}

/// One protocol message of the flood: `i` picks the kind.
fn protocol_message(
    i: u64,
    rng: &mut impl RngCore,
    me: &Participant,
    victim: &Participant,
) -> Message {
    match i % 6 {
        0 => {
            let mut id = [0u8; 32];
            rng.fill_bytes(&mut id);
            Message::Proposal(Proposal {
                proposal_id: B256::from(id),
                // The victim's own deployment, so the proposal reaches its handler.
                domain: perun::channel::Domain {
                    chain_id: U256::from(1337),
                    adjudicator: perun::adjudicator::SimLedger::ADJUDICATOR,
                },
                challenge_duration: 60,
                participants: vec![me.clone(), victim.clone()],
                proposer: 0,
                allocation: Allocation::new(
                    vec![perun::channel::Asset {
                        chainId: U256::from(1337),
                        holder: Address::repeat_byte(0xaa),
                    }],
                    vec![vec![U256::from(1), U256::from(1)]],
                ),
                app: Address::ZERO,
                app_data: Bytes::new(),
                nonce_share: B256::from(id),
            })
        }
        1 => {
            let st = junk_state(rng, 0);
            Message::Update(Update {
                channel_id: st.state.channelId,
                state: st.state,
                actor: 0,
            })
        }
        // The largest app data a state may carry: a large frame.
        2 => {
            let st = junk_state(rng, 60 * 1024);
            Message::Update(Update {
                channel_id: st.state.channelId,
                state: st.state,
                actor: 0,
            })
        }
        3 => {
            let st = junk_state(rng, 0);
            Message::UpdateCommit(UpdateCommit {
                channel_id: st.state.channelId,
                version: st.state.version,
                index: 0,
                signatures: vec![sig(1), sig(2)],
            })
        }
        4 => {
            let st = junk_state(rng, 0);
            Message::UpdateReject(UpdateReject {
                channel_id: st.state.channelId,
                version: u64::MAX,
                index: 0,
                reason: "abort".into(),
                kind: RejectKind::Refused,
            })
        }
        _ => {
            let latest = junk_state(rng, 30 * 1024);
            let staged = Some(junk_state(rng, 30 * 1024));
            Message::Sync(Sync {
                channel_id: latest.state.channelId,
                index: 0,
                phase: Phase::Active,
                latest,
                staged,
            })
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_keeps_memory_bounded_and_honest_channels_updating() {
    let ledger = Ledger::sim().await;
    let victim_opts = Options {
        proposal_handler: Some(Arc::new(NeverDecides)),
        ..Options::default()
    };
    let victim = party(&ledger, u(1_000_000), &victim_opts).await;
    let honest = party(&ledger, u(1_000_000), &Options::default()).await;
    let mut ps = vec![victim, honest];
    introduce(&ps).await;
    let chans = open(&ledger, &mut ps, u(100_000)).await;
    let victim_addr = ps[0].client.listen_addrs().await.unwrap()[0].clone();
    let victim_part = ps[0].participant();
    let victim_id = victim_part.peer;

    // Settle in, then take the baseline.
    for i in 0..20 {
        chans[i % 2].pay(1 - i % 2, 0, u(1)).await.unwrap();
    }
    let baseline = rss_kib();
    let deadline = Instant::now() + FLOOD;

    // The attacker: a real perun endpoint with its own identity.
    let (attacker, _attacker_in) =
        perun::wire::Node::start(perun::wire::Config::new(perun::wire::generate_key()))
            .await
            .unwrap();
    attacker
        .add_address(victim_id, victim_addr.clone())
        .await
        .unwrap();
    let me = Participant {
        address: Address::repeat_byte(0x66),
        peer: attacker.local_peer_id(),
    };
    let sent = Arc::new(AtomicU64::new(0));
    let refused_busy = Arc::new(AtomicU64::new(0));
    let proposals_capped = Arc::new(AtomicU64::new(0));
    let mut floods = Vec::new();
    // As many senders as the attacker has send slots to one peer (512).
    for worker in 0..512u64 {
        let (attacker, sent, busy) = (attacker.clone(), sent.clone(), refused_busy.clone());
        let capped = proposals_capped.clone();
        let (me, victim_part) = (me.clone(), victim_part.clone());
        floods.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(worker);
            let mut i = worker;
            while Instant::now() < deadline {
                let msg = protocol_message(i, &mut rng, &me, &victim_part);
                i += 1;
                sent.fetch_add(1, Ordering::Relaxed);
                match attacker.send(victim_id, &msg).await {
                    Err(perun::wire::Error::Refused(r))
                        if r.code == perun::wire::RefusalCode::Busy =>
                    {
                        busy.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Message::ProposalReject(r))
                        if r.reason.contains("pending proposals at its limit") =>
                    {
                        capped.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        }));
    }
    let raw = tokio::spawn(raw_flood(victim_id, victim_addr, deadline));

    // The honest channel keeps updating, both ways.
    let updates = Arc::new(AtomicU64::new(0));
    let honest_pays = {
        let (chans, updates) = (chans.clone(), updates.clone());
        tokio::spawn(async move {
            let mut windows = Vec::new();
            let mut window_start = Instant::now();
            let mut in_window = 0u64;
            let mut i = 0usize;
            while Instant::now() < deadline {
                let payer = i % 2;
                match tokio::time::timeout(
                    Duration::from_secs(5),
                    chans[payer].pay(1 - payer, 0, u(1)),
                )
                .await
                {
                    Ok(Ok(_)) => {
                        in_window += 1;
                        updates.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) if e.is_retryable() => {}
                    Ok(Err(e)) => panic!("honest update failed: {e}"),
                    Err(_) => {}
                }
                i += 1;
                if window_start.elapsed() >= Duration::from_secs(5) {
                    windows.push(in_window);
                    in_window = 0;
                    window_start = Instant::now();
                }
            }
            windows.push(in_window);
            windows
        })
    };

    let mut peak = baseline;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        peak = peak.max(rss_kib());
    }
    let windows = honest_pays.await.unwrap();
    // A send still waiting for its reply (a proposal the handler sits on)
    // is of no interest any more.
    for f in floods {
        f.abort();
        let _ = f.await;
    }
    let (raw_sent, raw_refusals) = raw.await.unwrap();
    peak = peak.max(rss_kib());
    let total = updates.load(Ordering::Relaxed);
    println!(
        "flood: {} protocol messages ({} refused busy, {} proposals over the cap), \
         {raw_sent} raw frames (refused: {raw_refusals:?}); \
         RSS baseline {} MiB, peak {} MiB (bound {RSS_BOUND_MIB} MiB); \
         honest updates {total}, per 5 s window {windows:?}",
        sent.load(Ordering::Relaxed),
        refused_busy.load(Ordering::Relaxed),
        proposals_capped.load(Ordering::Relaxed),
        baseline / 1024,
        peak / 1024,
    );
    assert!(
        peak / 1024 < RSS_BOUND_MIB,
        "RSS peaked at {} MiB, over the bound of {RSS_BOUND_MIB} MiB",
        peak / 1024
    );
    assert!(
        windows[..windows.len() - 1].iter().all(|w| *w > 0),
        "a 5 s window without an honest update: {windows:?}"
    );
    assert!(total >= 30, "only {total} honest updates in {FLOOD:?}");
    // Bad frames get typed refusals (the victim answers; nothing panics).
    for code in ["TooLarge", "Malformed"] {
        assert!(
            raw_refusals.get(code).is_some_and(|n| *n > 0),
            "no {code} refusal: {raw_refusals:?}"
        );
    }
    // The victim's handler never decides: every proposal past the cap of
    // pending proposals is rejected at once, with the typed error's text.
    assert!(
        proposals_capped.load(Ordering::Relaxed) > 0,
        "proposals past the cap were not rejected"
    );

    // The victim is unharmed: the channel is active, both sides agree.
    let st = caught_up(&chans).await;
    assert_eq!(chans[0].phase(), Phase::Active);
    assert_eq!(
        ps[0].client.channels().len(),
        1,
        "no channel from the flood"
    );
    assert!(st.state.version >= 20 + total);
    attacker.shutdown().await;
}
