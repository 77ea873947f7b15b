//! Shared helpers for the transport tests: endpoints on 127.0.0.1 and one
//! sample of every message.
#![allow(dead_code)]

use std::time::Duration;

use perun_channel::{Address, Allocation, Asset, B256, Bytes, Phase, SignedState, State, U256};
use perun_wallet::Signature;
use perun_wire::{
    Config, Handle, Incoming, Message, Node, Participant, PeerId, Proposal, ProposalAccept,
    ProposalReject, RejectKind, Signing0, Sync, Update, UpdateAccept, UpdateCommit, UpdateReject,
    UpdateWithCommit, generate_key,
};

/// How long any single wait in a test may take before it fails.
pub(crate) const WAIT: Duration = Duration::from_secs(20);

pub(crate) fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

pub(crate) async fn node() -> (Handle, Incoming) {
    node_with(|_| {}).await
}

pub(crate) async fn node_with(f: impl FnOnce(&mut Config)) -> (Handle, Incoming) {
    let mut config = Config::new(generate_key());
    f(&mut config);
    Node::start(config).await.expect("start node")
}

/// Tells `from` where `to` listens.
pub(crate) async fn introduce(from: &Handle, to: &Handle) {
    let addr = to.listen_addrs().await.expect("addrs")[0].clone();
    from.add_address(to.local_peer_id(), addr)
        .await
        .expect("add address");
}

/// Connects `from` to `to` before a test's short request timeouts start
/// (a dial on a loaded machine must not count against them).
pub(crate) async fn connect(from: &Handle, to: &Handle) {
    introduce(from, to).await;
    tokio::time::timeout(WAIT, from.dial(to.local_peer_id(), None))
        .await
        .expect("in time")
        .expect("dial");
}

pub(crate) fn sig(seed: u8) -> Signature {
    Signature::new(
        U256::from(seed) + U256::from(1),
        U256::from(seed),
        seed.is_multiple_of(2),
    )
}

pub(crate) fn state(n: usize, version: u64) -> State {
    State {
        channelId: B256::repeat_byte(0xcc),
        version,
        outcome: Allocation::new(
            vec![Asset {
                chainId: U256::from(31337),
                holder: Address::repeat_byte(0xaa),
            }],
            vec![vec![U256::from(10); n]],
        ),
        appData: Bytes::new(),
        isFinal: false,
    }
}

/// One request of every kind, with the reply its receiver sends back.
pub(crate) fn exchanges(peers: &[PeerId]) -> Vec<(Message, Message)> {
    let n = peers.len();
    let id = B256::repeat_byte(0xcc);
    let proposal = Proposal {
        proposal_id: B256::repeat_byte(1),
        challenge_duration: 60,
        domain: perun_channel::Domain {
            chain_id: alloy_primitives::U256::from(31337),
            adjudicator: Address::repeat_byte(0xad),
        },
        participants: peers
            .iter()
            .enumerate()
            .map(|(i, p)| Participant {
                address: Address::repeat_byte(i as u8 + 1),
                peer: *p,
            })
            .collect(),
        proposer: 0,
        allocation: state(n, 0).outcome,
        app: Address::ZERO,
        app_data: Bytes::new(),
        nonce_share: B256::repeat_byte(0x11),
    };
    let signed = SignedState {
        state: state(n, 5),
        sigs: (0..n).map(|i| Some(sig(i as u8))).collect(),
    };
    vec![
        (
            Message::Proposal(proposal.clone()),
            Message::ProposalAccept(ProposalAccept {
                proposal_id: proposal.proposal_id,
                index: 1,
                nonce_share: B256::repeat_byte(0x22),
                address: Address::repeat_byte(2),
            }),
        ),
        (
            Message::Proposal(proposal),
            Message::ProposalReject(ProposalReject {
                proposal_id: B256::repeat_byte(1),
                index: 1,
                reason: "not today".into(),
            }),
        ),
        (
            Message::Signing0(Signing0 {
                proposal_id: B256::repeat_byte(1),
                nonce_shares: (0..n).map(|i| B256::repeat_byte(i as u8)).collect(),
                signature: sig(0),
            }),
            Message::UpdateAccept(UpdateAccept {
                channel_id: id,
                version: 0,
                index: 1,
                signature: sig(1),
            }),
        ),
        (
            Message::Update(Update {
                channel_id: id,
                state: state(n, 6),
                actor: 0,
            }),
            Message::UpdateAccept(UpdateAccept {
                channel_id: id,
                version: 6,
                index: 1,
                signature: sig(1),
            }),
        ),
        (
            Message::Update(Update {
                channel_id: id,
                state: state(n, 7),
                actor: 0,
            }),
            Message::UpdateReject(UpdateReject {
                channel_id: id,
                version: 7,
                index: 1,
                reason: "no".into(),
                kind: RejectKind::Refused,
            }),
        ),
        (
            Message::UpdateCommit(UpdateCommit {
                channel_id: id,
                version: 6,
                index: 0,
                signatures: (0..n).map(|i| sig(i as u8)).collect(),
            }),
            Message::Ack,
        ),
        (
            Message::UpdateWithCommit(UpdateWithCommit {
                commit: UpdateCommit {
                    channel_id: id,
                    version: 6,
                    index: 0,
                    signatures: (0..n).map(|i| sig(i as u8)).collect(),
                },
                update: Update {
                    channel_id: id,
                    state: state(n, 7),
                    actor: 0,
                },
            }),
            Message::UpdateAccept(UpdateAccept {
                channel_id: id,
                version: 7,
                index: 1,
                signature: sig(1),
            }),
        ),
        (
            Message::Sync(Sync {
                channel_id: id,
                index: 0,
                phase: Phase::Updating,
                latest: signed.clone(),
                staged: Some(SignedState {
                    state: state(n, 6),
                    sigs: vec![None; n],
                }),
            }),
            Message::Sync(Sync {
                channel_id: id,
                index: 1,
                phase: Phase::Active,
                latest: signed,
                staged: None,
            }),
        ),
    ]
}

/// A bare swarm (TCP + noise + yamux, a fresh identity) around the
/// behaviour `make` builds from its key, for tests that play a peer
/// writing raw bytes.
pub(crate) fn raw_swarm<B: libp2p::swarm::NetworkBehaviour>(
    make: impl FnOnce(&libp2p::identity::Keypair) -> B,
) -> libp2p::Swarm<B> {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .expect("tcp")
        .with_behaviour(make)
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(30)))
        .build()
}

/// Dials `addr`, waits until connected, then drives `swarm` on a task of
/// its own.
pub(crate) async fn connect_and_drive<B>(mut swarm: libp2p::Swarm<B>, addr: libp2p::Multiaddr)
where
    B: libp2p::swarm::NetworkBehaviour + Send + 'static,
    B::ToSwarm: Send,
{
    use futures::StreamExt;
    swarm.dial(addr).expect("dial");
    loop {
        match tokio::time::timeout(Duration::from_secs(10), swarm.select_next_some()).await {
            Ok(libp2p::swarm::SwarmEvent::ConnectionEstablished { .. }) => break,
            Ok(_) => {}
            Err(_) => panic!("raw peer did not connect"),
        }
    }
    tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
}

/// A raw peer connected to `addr` that only opens lanes and writes bytes
/// on them.
pub(crate) async fn raw_lane_peer(addr: libp2p::Multiaddr) -> libp2p_stream::Control {
    let swarm = raw_swarm(|_| libp2p_stream::Behaviour::new());
    let control = swarm.behaviour().new_control();
    connect_and_drive(swarm, addr).await;
    control
}

/// Every `warn!` message logged in this test binary so far.
static WARNS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Records `warn!` messages for [`warns`] (and logs at `RUST_LOG`, default
/// `error`), for the whole test binary; later calls do nothing.
pub(crate) fn count_warns() {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt;
    let subscriber = tracing_subscriber::registry().with(WarnRecorder).with(
        tracing_subscriber::fmt::layer()
            .with_test_writer()
            .with_filter(tracing_subscriber::EnvFilter::new(
                std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()),
            )),
    );
    let _ = tracing::subscriber::set_global_default(subscriber);
}

/// How many `warn!` messages containing `text` were logged since
/// [`count_warns`].
pub(crate) fn warns(text: &str) -> usize {
    WARNS
        .lock()
        .expect("warns")
        .iter()
        .filter(|m| m.contains(text))
        .count()
}

struct WarnRecorder;

struct MessageVisitor(String);

impl tracing::field::Visit for MessageVisitor {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for WarnRecorder {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() == tracing::Level::WARN {
            let mut v = MessageVisitor(String::new());
            event.record(&mut v);
            WARNS.lock().expect("warns").push(v.0);
        }
    }
}

/// Serves `incoming`: answers every request `Ack`, except that an
/// `UpdateCommit` of version `hold` is held unanswered until the endpoint
/// is gone, and one of version `drop` (if any) is dropped unanswered. The
/// receiver hears when the first held request arrives; the task ends with
/// the incoming queue and returns how many it held.
pub(crate) fn serve_holding(
    mut incoming: Incoming,
    hold: u64,
    drop: Option<u64>,
) -> (
    tokio::sync::oneshot::Receiver<()>,
    tokio::task::JoinHandle<usize>,
) {
    let (holding, is_held) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        let mut holding = Some(holding);
        while let Some(req) = incoming.next().await {
            let (_, msg, r) = req.into_parts();
            match msg {
                Message::UpdateCommit(c) if Some(c.version) == drop => std::mem::drop(r),
                Message::UpdateCommit(c) if c.version == hold => {
                    held.push(r);
                    if let Some(tx) = holding.take() {
                        let _ = tx.send(());
                    }
                }
                _ => {
                    let _ = r.reply(Message::Ack);
                }
            }
        }
        held.len()
    });
    (is_held, server)
}

/// An `UpdateCommit` of `version`, two signatures.
pub(crate) fn commit(version: u64) -> Message {
    Message::UpdateCommit(UpdateCommit {
        channel_id: Default::default(),
        version,
        index: 0,
        signatures: vec![sig(0), sig(1)],
    })
}

/// Opens a lane to `peer` from a raw peer; `None` if the endpoint did not
/// take it (no preface byte).
pub(crate) async fn try_open_lane(
    control: &libp2p_stream::Control,
    peer: PeerId,
) -> Option<libp2p::Stream> {
    use futures::AsyncReadExt;
    let mut stream = control
        .clone()
        .open_stream(peer, libp2p::StreamProtocol::new(perun_wire::LANE_PROTOCOL))
        .await
        .expect("open lane");
    let mut preface = [0u8; 1];
    let read = tokio::time::timeout(WAIT, stream.read_exact(&mut preface));
    match read.await.expect("preface or end in time") {
        Ok(()) => {
            assert_eq!(preface, [1], "the lane's preface");
            Some(stream)
        }
        Err(_) => None,
    }
}

/// Reads one `[id][len][body]` frame off a lane; `None` if it ended.
pub(crate) async fn read_tagged_frame(stream: &mut libp2p::Stream) -> Option<(u64, Vec<u8>)> {
    use futures::AsyncReadExt;
    let mut tag = [0u8; 8];
    stream.read_exact(&mut tag).await.ok()?;
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).await.ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(prefix) as usize];
    stream.read_exact(&mut body).await.ok()?;
    Some((u64::from_be_bytes(tag), body))
}
