//! The endpoint: a libp2p swarm in its own task, behind a cloneable [`Handle`].
//!
//! The swarm task owns all libp2p state and only moves pre-encoded frames;
//! callers talk to it through an mpsc of commands, each with a oneshot for
//! the answer (the shape of rust-libp2p's file-sharing example). Inbound
//! requests come out of [`Incoming`], each with a [`Responder`] whose reply
//! goes straight to the stream's writer, without another trip through the
//! swarm task.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, InboundFailure, OutboundFailure, OutboundRequestId};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, ListenError, NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, connection_limits, identify, noise, tcp, yamux,
};
use perun_channel::throttle::Throttle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc, oneshot};
use tracing::{Instrument, debug, info_span, instrument, warn};

use crate::codec::{LargeFrames, Req, Resp, WireCodec, refusal_code, refusal_frame};
use crate::frame::{self, DEFAULT_MAX_FRAME, LANE_PROTOCOL, PROTOCOL, Reply};
use crate::lane::{self, Inbound, LaneConfig, LaneReply, Lanes};
use crate::message::{Message, Refusal, RefusalCode};
use crate::{Error, Result, authorize};

/// Most addresses remembered per peer.
const MAX_ADDRS_PER_PEER: usize = 8;

/// Caps on what peers can make this endpoint hold (DESIGN §6). Whatever is
/// over a cap is refused with a typed error ([`Error::Busy`], answered as
/// [`RefusalCode::Busy`]) or a denied connection, and a rate-limited `warn!`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Established connections that peers opened to us.
    pub incoming_connections: u32,
    /// Connections being set up that peers opened to us.
    pub pending_incoming_connections: u32,
    /// Established connections with one peer (either direction).
    pub connections_per_peer: u32,
    /// Inbound requests of one peer that are not answered yet. Keep it at
    /// least half of `max_concurrent_streams`: that is how many requests an
    /// honest peer with the same settings has in flight to us.
    pub requests_per_peer: usize,
    /// Inbound requests of all peers together that are not answered yet.
    pub requests: usize,
    /// Bytes of inbound frames larger than 16 KiB held at once (from their
    /// length prefix until they are answered), over all peers.
    pub large_frame_bytes: usize,
    /// Peers in the address book. Addresses the application gave are
    /// never evicted; learned ones (identify, dials) are, oldest first.
    pub known_peers: usize,
}

impl Default for Limits {
    /// 128 incoming connections (32 in setup), 4 per peer, 512 unanswered
    /// requests per peer and 4096 in all, 32 MiB of large frames, 4096
    /// known peers.
    fn default() -> Self {
        Self {
            incoming_connections: 128,
            pending_incoming_connections: 32,
            connections_per_peer: 4,
            requests_per_peer: 512,
            requests: 4096,
            large_frame_bytes: 32 << 20,
            known_peers: 4096,
        }
    }
}

/// How an endpoint is set up. Start from [`Config::new`] and adjust fields.
#[derive(Debug, Clone)]
pub struct Config {
    /// The network identity; its public key is our `PeerId`.
    pub keypair: Keypair,
    /// Addresses to listen on (default `/ip4/127.0.0.1/tcp/0`).
    pub listen: Vec<Multiaddr>,
    /// Largest frame body accepted or sent, in bytes.
    pub max_frame: usize,
    /// How long a request may wait for its reply (both directions).
    pub request_timeout: Duration,
    /// How long an inbound frame may take to arrive once its stream opened;
    /// keep it below `request_timeout` so a staller still gets its refusal.
    pub read_timeout: Duration,
    /// How long an unused connection is kept open.
    pub idle_timeout: Duration,
    /// Concurrent request streams per connection, inbound + outbound
    /// (clamped to 2..=2048). Our own outstanding requests to one peer are
    /// capped at half of it, so both directions fit when the peer uses the
    /// same setting; further `send`s to that peer wait for a slot instead of
    /// failing (sends to other peers do not wait behind a slow one).
    pub max_concurrent_streams: usize,
    /// Inbound requests queued for the application before we answer `Busy`.
    pub incoming_capacity: usize,
    /// Caps on remote input.
    pub limits: Limits,
}

impl Config {
    /// Defaults: loopback on an OS-chosen port, 1 MiB frames, 10 s requests,
    /// 5 s frame reads, 60 s idle connections, 1024 concurrent streams.
    pub fn new(keypair: Keypair) -> Self {
        Self {
            keypair,
            listen: vec![
                Multiaddr::empty()
                    .with(Protocol::Ip4([127, 0, 0, 1].into()))
                    .with(Protocol::Tcp(0)),
            ],
            max_frame: DEFAULT_MAX_FRAME,
            request_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            max_concurrent_streams: 1024,
            incoming_capacity: 4096,
            limits: Limits::default(),
        }
    }
}

/// A change in our connections to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerEvent {
    /// The first connection to the peer is up.
    Connected(PeerId),
    /// The last connection to the peer is gone.
    Disconnected(PeerId),
}

#[derive(NetworkBehaviour)]
#[behaviour(prelude = "libp2p::swarm::derive_prelude")]
struct Behaviour {
    limits: connection_limits::Behaviour,
    rr: request_response::Behaviour<WireCodec>,
    streams: libp2p_stream::Behaviour,
    identify: identify::Behaviour,
}

enum Command {
    Send {
        peer: PeerId,
        frame: Vec<u8>,
        tx: oneshot::Sender<Result<Reply>>,
    },
    AddAddress {
        peer: PeerId,
        addr: Multiaddr,
    },
    KnownPeers(oneshot::Sender<usize>),
    Dial {
        peer: PeerId,
        addr: Option<Multiaddr>,
        tx: oneshot::Sender<Result<()>>,
    },
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    IsConnected(PeerId, oneshot::Sender<bool>),
    Disconnect(PeerId, oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
}

/// The entry point: starts an endpoint.
#[derive(Debug)]
pub struct Node;

impl Node {
    /// Builds the swarm, starts listening, and spawns its task on the current
    /// tokio runtime. Returns once every listen address is bound.
    pub async fn start(config: Config) -> Result<(Handle, Incoming)> {
        let large_frames = LargeFrames::new(config.limits.large_frame_bytes);
        let mut swarm = build_swarm(&config, &large_frames)?;
        let mut unbound = HashSet::new();
        for addr in &config.listen {
            let id = swarm
                .listen_on(addr.clone())
                .map_err(|e| Error::Transport(format!("listen on {addr}: {e}")))?;
            unbound.insert(id);
        }
        while !unbound.is_empty() {
            match swarm.select_next_some().await {
                SwarmEvent::NewListenAddr { listener_id, .. } => {
                    unbound.remove(&listener_id);
                }
                SwarmEvent::ListenerError { error, .. } => {
                    return Err(Error::Transport(format!("listener: {error}")));
                }
                SwarmEvent::ListenerClosed { reason, .. } => {
                    return Err(Error::Transport(format!("listener closed: {reason:?}")));
                }
                _ => {}
            }
        }
        let local = *swarm.local_peer_id();
        let (cmd_tx, cmd_rx) = mpsc::channel(1024);
        let (in_tx, in_rx) = mpsc::channel(config.incoming_capacity.max(1));
        let (events, _) = broadcast::channel(256);
        let admission = Arc::new(Admission {
            limits: config.limits,
            held: Mutex::new(Held::default()),
        });
        let lane_config = LaneConfig {
            max_frame: config.max_frame,
            request_timeout: config.request_timeout,
            read_timeout: config.read_timeout,
            idle_timeout: config.idle_timeout,
            queue: per_peer_slots(&config),
        };
        let mut control = swarm.behaviour().streams.new_control();
        let accepted = control
            .accept(StreamProtocol::new(LANE_PROTOCOL))
            .map_err(|e| Error::Transport(e.to_string()))?;
        let lanes = Lanes::new(control, lane_config);
        let inbound = Arc::new(Inbound {
            admission: admission.clone(),
            in_tx: in_tx.downgrade(),
            large_frames,
            config: lane_config,
            lanes: Mutex::new(HashMap::new()),
            refused: Mutex::new(Throttle::default()),
            bad_frames: Mutex::new(Throttle::default()),
        });
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(
            lane::accept(accepted, inbound, stopped).instrument(info_span!("lanes", peer = %local)),
        );
        let event_loop = EventLoop {
            swarm,
            lanes: lanes.clone(),
            _stop_lanes: stop,
            cmd_rx,
            in_tx,
            events: events.clone(),
            pending: HashMap::new(),
            dials: HashMap::new(),
            dialed: HashMap::new(),
            book: Book::new(config.limits.known_peers),
            max_frame: config.max_frame,
            admission,
            refused: Throttle::default(),
            bad_frames: Throttle::default(),
            denied: Throttle::default(),
        };
        tokio::spawn(
            event_loop
                .run()
                .instrument(info_span!("wire", peer = %local)),
        );
        let handle = Handle {
            slots: Arc::new(SendSlots {
                per_peer: per_peer_slots(&config),
                peers: Mutex::new(HashMap::new()),
            }),
            cmd: cmd_tx,
            lanes,
            local,
            max_frame: config.max_frame,
            events,
        };
        Ok((handle, Incoming { rx: in_rx }))
    }
}

/// Our requests in flight to one peer: half the streams of a connection.
fn per_peer_slots(config: &Config) -> usize {
    config.max_concurrent_streams.clamp(2, MAX_STREAMS) / 2
}

/// Most request streams per connection: yamux refuses more than 4096 streams
/// with its default 1 GiB connection window, and we give yamux twice ours.
const MAX_STREAMS: usize = 2048;

fn build_swarm(config: &Config, large_frames: &LargeFrames) -> Result<Swarm<Behaviour>> {
    let streams = config.max_concurrent_streams.clamp(2, MAX_STREAMS);
    // yamux kills the whole connection when the remote opens one stream too
    // many, so it gets headroom above the request-response limit for
    // identify and for streams still closing.
    let mut yamux_config = yamux::Config::default();
    yamux_config.set_max_num_streams(streams * 2);
    let codec = WireCodec {
        max_frame: config.max_frame,
        read_timeout: config.read_timeout,
        large_frames: large_frames.clone(),
    };
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established_incoming(Some(config.limits.incoming_connections))
        .with_max_pending_incoming(Some(config.limits.pending_incoming_connections))
        .with_max_established_per_peer(Some(config.limits.connections_per_peer));
    let rr_config = request_response::Config::default()
        .with_request_timeout(config.request_timeout)
        .with_max_concurrent_streams(streams);
    let swarm = libp2p::SwarmBuilder::with_existing_identity(config.keypair.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            move || yamux_config.clone(),
        )
        .map_err(|e| Error::Transport(e.to_string()))?
        .with_behaviour(|key| Behaviour {
            limits: connection_limits::Behaviour::new(limits),
            rr: request_response::Behaviour::with_codec(
                codec,
                [(
                    StreamProtocol::new(PROTOCOL),
                    request_response::ProtocolSupport::Full,
                )],
                rr_config,
            ),
            streams: libp2p_stream::Behaviour::new(),
            identify: identify::Behaviour::new(identify::Config::new(
                "/perun/1".into(),
                key.public(),
            )),
        })
        .map_err(|e| Error::Transport(e.to_string()))?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(config.idle_timeout)
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
                .with_notify_handler_buffer_size(
                    NonZeroUsize::new(256).unwrap_or(NonZeroUsize::MIN),
                )
                .with_per_connection_event_buffer_size(256)
        })
        .build();
    Ok(swarm)
}

/// A cloneable handle to a running endpoint.
///
/// ```
/// use alloy_primitives::{Signature, U256};
/// use perun_wire::{Config, Message, Node, UpdateCommit, generate_key};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> perun_wire::Result<()> {
/// let (alice, _) = Node::start(Config::new(generate_key())).await?;
/// let (bob, mut bob_in) = Node::start(Config::new(generate_key())).await?;
/// alice.add_address(bob.local_peer_id(), bob.listen_addrs().await?[0].clone()).await?;
///
/// // Bob acknowledges every request, after checking who sent it.
/// let peers = [alice.local_peer_id(), bob.local_peer_id()];
/// tokio::spawn(async move {
///     while let Some(req) = bob_in.next().await {
///         let claimed = req.message().claimed_index().unwrap_or(usize::MAX);
///         if req.authorize(&peers, claimed).is_ok() {
///             let (_peer, _msg, responder) = req.into_parts();
///             let _ = responder.reply(Message::Ack);
///         } // else: dropping the responder answers with a refusal
///     }
/// });
///
/// let sig = Signature::new(U256::from(1), U256::from(2), false);
/// let commit = Message::UpdateCommit(UpdateCommit {
///     channel_id: Default::default(),
///     version: 1,
///     index: 0,
///     signatures: vec![sig, sig],
/// });
/// assert_eq!(alice.send(bob.local_peer_id(), &commit).await?, Message::Ack);
/// alice.shutdown().await;
/// bob.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Handle {
    cmd: mpsc::Sender<Command>,
    lanes: Arc<Lanes>,
    slots: Arc<SendSlots>,
    local: PeerId,
    max_frame: usize,
    events: broadcast::Sender<PeerEvent>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl Handle {
    /// Our `PeerId`.
    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    /// Sends a request and waits for its reply. Dials `peer` first if we have
    /// no connection, using the addresses we know for it.
    ///
    /// At most half of [`Config::max_concurrent_streams`] requests to one
    /// peer are in flight at once; more wait here for a slot. The request
    /// timeout starts once the request has its slot and covers everything
    /// after: opening a lane, a place in its queue, the fallback to
    /// `/perun/wire/1`, dialing, the reply. Each peer has
    /// its own slots, so a peer that answers slowly never delays requests
    /// to the others.
    ///
    /// Errors: [`Error::Refused`] if the peer's transport refused the
    /// request, [`Error::Timeout`] / [`Error::ConnectionClosed`] /
    /// [`Error::DialFailure`] if no reply came, frame errors if the reply was bad.
    #[instrument(level = "debug", skip(self, msg), fields(kind = msg.kind()))]
    pub async fn send(&self, peer: PeerId, msg: &Message) -> Result<Message> {
        if !msg.is_request() {
            return Err(Error::NotARequest(msg.kind()));
        }
        let _slot = self.slots.acquire(peer).await?;
        if self.cmd.is_closed() {
            return Err(Error::Shutdown);
        }
        // One request timeout for all of it: opening a lane, the lane's
        // queue and reply, and `/perun/wire/1` if the lane cannot take it.
        let deadline = self.lanes.deadline();
        if let Some(lane) = self.lanes.route(peer, deadline).await
            && let Some(reply) = lane.request(msg, deadline).await
        {
            return match reply {
                Err(Error::ConnectionClosed) if self.cmd.is_closed() => Err(Error::Shutdown),
                reply => reply,
            };
        }
        if tokio::time::Instant::now() >= deadline {
            // Opening a lane took it all: no request the caller no longer
            // waits for goes out.
            return Err(Error::Timeout);
        }
        let frame = frame::encode_frame(msg, self.max_frame)?;
        let (tx, rx) = oneshot::channel();
        let fallback = async {
            self.command(Command::Send { peer, frame, tx }).await?;
            rx.await.map_err(|_| Error::Shutdown)?
        };
        match tokio::time::timeout_at(deadline, fallback).await {
            Err(_) => Err(Error::Timeout),
            Ok(reply) => reply?.map_err(Error::Refused),
        }
    }

    /// Whether our requests to `peer` go on a lane (`/perun/wire/2`) now.
    #[doc(hidden)]
    pub fn on_lane(&self, peer: &PeerId) -> bool {
        self.lanes.is_open(peer)
    }

    /// How many peers the address book holds (at most
    /// [`Limits::known_peers`]).
    pub async fn known_peers(&self) -> Result<usize> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::KnownPeers(tx)).await?;
        rx.await.map_err(|_| Error::Shutdown)
    }

    /// Remembers an address of `peer` for dialing on demand; it is never
    /// evicted from the address book.
    pub async fn add_address(&self, peer: PeerId, addr: Multiaddr) -> Result<()> {
        self.command(Command::AddAddress { peer, addr }).await
    }

    /// Connects to `peer` (at `addr` if given, else at a known address) and
    /// waits until the connection is up.
    pub async fn dial(&self, peer: PeerId, addr: Option<Multiaddr>) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::Dial { peer, addr, tx }).await?;
        rx.await.map_err(|_| Error::Shutdown)?
    }

    /// The addresses we listen on.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::ListenAddrs(tx)).await?;
        rx.await.map_err(|_| Error::Shutdown)
    }

    /// Whether we have a connection to `peer` right now.
    pub async fn is_connected(&self, peer: PeerId) -> Result<bool> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::IsConnected(peer, tx)).await?;
        rx.await.map_err(|_| Error::Shutdown)
    }

    /// Closes every connection to `peer`: its requests in flight on them
    /// fail ([`Error::ConnectionClosed`]), and a later send dials it again.
    pub async fn disconnect(&self, peer: PeerId) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::Disconnect(peer, tx)).await?;
        rx.await.map_err(|_| Error::Shutdown)
    }

    /// Connection changes from now on (e.g. to run `Sync` after a reconnect).
    pub fn peer_events(&self) -> broadcast::Receiver<PeerEvent> {
        self.events.subscribe()
    }

    /// Stops the endpoint: closes listeners and connections, fails pending
    /// requests with [`Error::Shutdown`]. Returns once the swarm is gone.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    async fn command(&self, cmd: Command) -> Result<()> {
        self.cmd.send(cmd).await.map_err(|_| Error::Shutdown)
    }
}

/// The inbound requests of an endpoint, in arrival order.
#[derive(Debug)]
pub struct Incoming {
    rx: mpsc::Receiver<Request>,
}

impl Incoming {
    /// The next request; `None` once the endpoint has shut down.
    pub async fn next(&mut self) -> Option<Request> {
        self.rx.recv().await
    }
}

impl futures::Stream for Incoming {
    type Item = Request;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Request>> {
        self.rx.poll_recv(cx)
    }
}

/// One inbound request: who sent it (authenticated by noise), what, and
/// where the reply goes.
#[derive(Debug)]
pub struct Request {
    peer: PeerId,
    message: Message,
    responder: Responder,
}

impl Request {
    pub(crate) fn new(peer: PeerId, message: Message, responder: Responder) -> Self {
        Self {
            peer,
            message,
            responder,
        }
    }

    /// The authenticated sender.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// The request.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// Checks that the sender is the participant at `index` of `peers`.
    pub fn authorize(&self, peers: &[PeerId], index: usize) -> Result<()> {
        authorize(&self.peer, peers, index)
    }

    /// Takes the request apart to answer it.
    pub fn into_parts(self) -> (PeerId, Message, Responder) {
        (self.peer, self.message, self.responder)
    }
}

/// Answers one request, once: both methods consume it. Dropping it answers
/// the sender with a [`RefusalCode::NoReply`] refusal. Until then the
/// request counts against its peer's caps ([`Limits`]).
#[derive(Debug)]
pub struct Responder {
    to: ReplyTo,
    max_frame: usize,
    /// A request stream's place under the caps (a lane's reply holds its
    /// own until it is written).
    _ticket: Option<Ticket>,
}

/// Where a reply goes: the request's own stream, or the lane it came on.
#[derive(Debug)]
enum ReplyTo {
    Stream(oneshot::Sender<Vec<u8>>),
    Lane(LaneReply),
}

impl Responder {
    pub(crate) fn on_lane(reply: LaneReply, max_frame: usize) -> Self {
        Self {
            to: ReplyTo::Lane(reply),
            max_frame,
            _ticket: None,
        }
    }

    /// Sends `reply`. Fails if it does not fit a frame (the sender is then
    /// refused instead) or if the request's stream is already gone.
    pub fn reply(self, reply: Message) -> Result<()> {
        self.answer(&Ok(reply))
    }

    /// Refuses the request, e.g. because the sender is not who it claims.
    pub fn refuse(self, refusal: Refusal) -> Result<()> {
        self.answer(&Err(refusal))
    }

    fn answer(self, framed: &Reply) -> Result<()> {
        match self.to {
            ReplyTo::Lane(lane) => lane.send(framed, self.max_frame),
            ReplyTo::Stream(tx) => match frame::encode_frame(framed, self.max_frame) {
                Ok(frame) => tx.send(frame).map_err(|_| Error::ConnectionClosed),
                Err(e) => {
                    let _ = tx.send(refusal_frame(RefusalCode::TooLarge, e.to_string()));
                    Err(e)
                }
            },
        }
    }
}

/// Our outbound requests in flight, per peer: each peer has its own slots.
#[derive(Debug)]
struct SendSlots {
    per_peer: usize,
    peers: Mutex<HashMap<PeerId, Arc<Semaphore>>>,
}

impl SendSlots {
    async fn acquire(self: &Arc<Self>, peer: PeerId) -> Result<SendSlot> {
        let sem = lock(&self.peers)
            .entry(peer)
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_peer)))
            .clone();
        let permit = sem.acquire_owned().await.map_err(|_| Error::Shutdown)?;
        Ok(SendSlot {
            permit: Some(permit),
            peer,
            slots: self.clone(),
        })
    }
}

/// One outbound request's slot; the peer's entry goes once nobody uses it.
struct SendSlot {
    permit: Option<OwnedSemaphorePermit>,
    peer: PeerId,
    slots: Arc<SendSlots>,
}

impl Drop for SendSlot {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut peers = lock(&self.slots.peers);
        // Only the map holds it: no request in flight, nobody waiting (a
        // waiter clones the semaphore under this lock).
        if peers
            .get(&self.peer)
            .is_some_and(|s| Arc::strong_count(s) == 1)
        {
            peers.remove(&self.peer);
        }
    }
}

/// A poisoned lock only means a panic elsewhere mid-update of a counter map;
/// the map is still usable.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Unanswered inbound requests, in all and per peer.
#[derive(Debug, Default)]
struct Held {
    total: usize,
    per_peer: HashMap<PeerId, usize>,
}

/// Admits inbound requests under the caps of [`Limits`].
#[derive(Debug)]
pub(crate) struct Admission {
    pub(crate) limits: Limits,
    held: Mutex<Held>,
}

impl Admission {
    /// A ticket for one more request of `peer`, or which cap is full.
    pub(crate) fn admit(
        self: &Arc<Self>,
        peer: PeerId,
        bytes: Option<OwnedSemaphorePermit>,
    ) -> Result<Ticket> {
        let mut held = lock(&self.held);
        if held.total >= self.limits.requests {
            return Err(Error::Busy {
                what: "unanswered requests",
                limit: self.limits.requests,
            });
        }
        let mine = held.per_peer.entry(peer).or_default();
        if *mine >= self.limits.requests_per_peer {
            return Err(Error::Busy {
                what: "unanswered requests of this peer",
                limit: self.limits.requests_per_peer,
            });
        }
        *mine += 1;
        held.total += 1;
        Ok(Ticket {
            admission: self.clone(),
            peer,
            _bytes: bytes,
        })
    }
}

/// One admitted request; releases its place (and its frame bytes) on drop.
#[derive(Debug)]
pub(crate) struct Ticket {
    admission: Arc<Admission>,
    peer: PeerId,
    _bytes: Option<OwnedSemaphorePermit>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut held = lock(&self.admission.held);
        held.total = held.total.saturating_sub(1);
        if let Some(n) = held.per_peer.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.per_peer.remove(&self.peer);
            }
        }
    }
}

/// Addresses we may dial, per peer, for at most `cap` peers. Kept here
/// rather than in the swarm because libp2p forgets an address after one
/// failed dial, and a peer that restarts must stay reachable. Entries the
/// application gave are pinned; learned ones are evicted oldest first, so
/// peers that connect cannot grow it.
#[derive(Debug)]
struct Book {
    cap: usize,
    tick: u64,
    peers: HashMap<PeerId, BookEntry>,
}

#[derive(Debug, Default)]
struct BookEntry {
    addrs: Vec<Multiaddr>,
    pinned: bool,
    touched: u64,
    /// The tick of the last address new to this entry.
    generation: u64,
}

impl Book {
    fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            tick: 0,
            peers: HashMap::new(),
        }
    }

    /// When `peer`'s entry last took an address it did not have (0: no
    /// entry).
    fn generation(&self, peer: &PeerId) -> u64 {
        self.peers.get(peer).map_or(0, |e| e.generation)
    }

    fn addrs(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.peers
            .get(peer)
            .map(|e| e.addrs.clone())
            .unwrap_or_default()
    }

    /// Adds an address; the newest [`MAX_ADDRS_PER_PEER`] of a peer are
    /// kept. Returns `false` if the book is full of pinned entries.
    fn remember(&mut self, peer: PeerId, addr: Multiaddr, pin: bool) -> bool {
        if !self.peers.contains_key(&peer) && self.peers.len() >= self.cap {
            let oldest = self
                .peers
                .iter()
                .filter(|(_, e)| !e.pinned)
                .min_by_key(|(_, e)| e.touched)
                .map(|(p, _)| *p);
            match oldest {
                Some(p) => {
                    self.peers.remove(&p);
                }
                None => return false,
            }
        }
        self.tick += 1;
        let entry = self.peers.entry(peer).or_default();
        entry.pinned |= pin;
        entry.touched = self.tick;
        let addrs = &mut entry.addrs;
        if let Some(i) = addrs.iter().position(|a| *a == addr) {
            addrs.remove(i);
        } else {
            entry.generation = self.tick;
            if addrs.len() == MAX_ADDRS_PER_PEER {
                addrs.remove(0);
            }
        }
        addrs.push(addr);
        true
    }
}

/// A request on `/perun/wire/1` waiting for its reply.
struct Pending {
    tx: oneshot::Sender<Result<Reply>>,
    /// The frame, kept while the request waits for a dial, to send it again
    /// if a dial other than our latest fails (see `on_dial_failure`).
    redial: Option<Vec<u8>>,
    /// How many times it was sent again after such a failure.
    resent: u8,
}

/// How often one request is sent again after a dial failure while another
/// dial to its peer is still running: each time is a different dial.
const MAX_RESENDS: u8 = 4;

struct EventLoop {
    swarm: Swarm<Behaviour>,
    lanes: Arc<Lanes>,
    /// Dropped with the loop: the lane acceptor stops.
    _stop_lanes: oneshot::Sender<()>,
    cmd_rx: mpsc::Receiver<Command>,
    in_tx: mpsc::Sender<Request>,
    events: broadcast::Sender<PeerEvent>,
    pending: HashMap<OutboundRequestId, Pending>,
    dials: HashMap<PeerId, Vec<oneshot::Sender<Result<()>>>>,
    /// Per peer: our latest dial to it and the book's address generation
    /// (`Book::generation`) it started with, until that dial connects or
    /// fails (see `dial_peer`).
    dialed: HashMap<PeerId, (ConnectionId, u64)>,
    book: Book,
    max_frame: usize,
    admission: Arc<Admission>,
    /// Requests refused because a cap was full.
    refused: Throttle,
    /// Requests whose frame was bad.
    bad_frames: Throttle,
    /// Connections denied by a connection cap.
    denied: Throttle,
}

impl EventLoop {
    async fn run(mut self) {
        loop {
            tokio::select! {
                cmd = self.cmd_rx.recv() => match cmd {
                    Some(Command::Shutdown(tx)) => {
                        // Requests on lanes end now, not at their timeout;
                        // the handle is closed first, so one that fails
                        // sees `Shutdown`.
                        self.cmd_rx.close();
                        let lanes = self.lanes.clone();
                        drop(self);
                        lanes.forget_all();
                        let _ = tx.send(());
                        return;
                    }
                    Some(cmd) => self.on_command(cmd),
                    None => {
                        self.lanes.forget_all();
                        return;
                    }
                },
                event = self.swarm.select_next_some() => self.on_event(event),
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Send { peer, frame, tx } => {
                let redial = if self.swarm.is_connected(&peer) {
                    None
                } else {
                    // Ours goes first; the behaviour's own dial then finds one
                    // in progress and waits for it.
                    match self.dial_peer(peer) {
                        Ok(()) | Err(DialError::DialPeerConditionFalse(_)) => {}
                        Err(e) => debug!(%peer, error = %e, "dial on demand not started"),
                    }
                    Some(frame.clone())
                };
                self.send_request(
                    peer,
                    frame,
                    Pending {
                        tx,
                        redial,
                        resent: 0,
                    },
                );
            }
            Command::AddAddress { peer, addr } => self.remember(peer, addr, true),
            Command::KnownPeers(tx) => {
                let _ = tx.send(self.book.peers.len());
            }
            Command::Dial { peer, addr, tx } => {
                if let Some(addr) = &addr {
                    self.remember(peer, addr.clone(), true);
                }
                if self.swarm.is_connected(&peer) {
                    let _ = tx.send(Ok(()));
                    return;
                }
                match self.dial_peer(peer) {
                    Ok(()) | Err(DialError::DialPeerConditionFalse(_)) => {
                        self.dials.entry(peer).or_default().push(tx);
                    }
                    Err(e) => {
                        debug!(%peer, error = %e, "dial failed");
                        let _ = tx.send(Err(Error::DialFailure(peer)));
                    }
                }
            }
            Command::ListenAddrs(tx) => {
                let _ = tx.send(self.swarm.listeners().cloned().collect());
            }
            Command::Disconnect(peer, tx) => {
                // Not connected: nothing to close.
                let _ = self.swarm.disconnect_peer_id(peer);
                let _ = tx.send(());
            }
            Command::IsConnected(peer, tx) => {
                let _ = tx.send(self.swarm.is_connected(&peer));
            }
            Command::Shutdown(_) => {}
        }
    }

    /// Dials `peer` at the addresses in the book, from a fresh local port:
    /// with port reuse, two peers dialing each other at the same moment form
    /// one TCP simultaneous-open connection on which both sides act as noise
    /// initiator, and the handshake fails.
    ///
    /// A dial already in progress is joined (`DialPeerConditionFalse`)
    /// unless the book took a new address for the peer since our latest
    /// dial started: then one more dial goes out with the book's addresses.
    /// Otherwise a dial hanging on a stale address (a peer that restarted
    /// on another port, the old one taken by something mute) would hold
    /// every send until libp2p's connection timeout (10 s), and its failure
    /// fails every request waiting for a connection.
    fn dial_peer(&mut self, peer: PeerId) -> std::result::Result<(), DialError> {
        let generation = self.book.generation(&peer);
        match self.dial_book(peer, PeerCondition::DisconnectedAndNotDialing, generation) {
            Err(DialError::DialPeerConditionFalse(c))
                if !self.swarm.is_connected(&peer)
                    && self.dialed.get(&peer).is_some_and(|(_, g)| *g < generation) =>
            {
                debug!(%peer, "the book has a new address since our dial started; dialing again");
                if let Err(e) = self.dial_book(peer, PeerCondition::Disconnected, generation) {
                    // The dial in progress is still there to join.
                    debug!(%peer, error = %e, "second dial not started");
                }
                Err(DialError::DialPeerConditionFalse(c))
            }
            other => other,
        }
    }

    /// One dial of `peer` at the book's addresses (`generation` of them),
    /// remembered as our latest if it starts.
    fn dial_book(
        &mut self,
        peer: PeerId,
        condition: PeerCondition,
        generation: u64,
    ) -> std::result::Result<(), DialError> {
        let opts = DialOpts::peer_id(peer)
            .condition(condition)
            .addresses(self.book.addrs(&peer))
            .allocate_new_port()
            .build();
        let id = opts.connection_id();
        self.swarm.dial(opts)?;
        self.dialed.insert(peer, (id, generation));
        Ok(())
    }

    fn send_request(&mut self, peer: PeerId, frame: Vec<u8>, pending: Pending) {
        let id = self
            .swarm
            .behaviour_mut()
            .rr
            .send_request(&peer, Req::Frame(frame));
        self.pending.insert(id, pending);
    }

    /// A request failed because *a* dial to its peer failed. The
    /// request-response behaviour fails every request waiting for a
    /// connection on any dial failure, even with another dial running: an
    /// old dial to a stale address (a peer that restarted on another port)
    /// would fail requests that our latest dial, made with the address
    /// learned since, is about to carry. Such a request never left the
    /// process, so it goes out again while that dial runs or once the peer
    /// is connected; otherwise it fails with [`Error::DialFailure`].
    fn on_dial_failure(
        &mut self,
        peer: PeerId,
        failed: ConnectionId,
        request_id: OutboundRequestId,
    ) {
        let Some(mut pending) = self.pending.remove(&request_id) else {
            return;
        };
        if pending.tx.is_closed() {
            // Its caller gave up (timed out): it must not go out later.
            return;
        }
        let Some(frame) = pending.redial.take() else {
            let _ = pending.tx.send(Err(Error::DialFailure(peer)));
            return;
        };
        let another_dial = self.dialed.get(&peer).is_some_and(|(id, _)| *id != failed);
        if pending.resent < MAX_RESENDS && (another_dial || self.swarm.is_connected(&peer)) {
            debug!(%peer, "a dial failed while another runs; sending the request again");
            pending.resent += 1;
            pending.redial = Some(frame.clone());
            self.send_request(peer, frame, pending);
        } else {
            let _ = pending.tx.send(Err(Error::DialFailure(peer)));
        }
    }

    /// Adds an address to the book (pinned: the application gave it).
    fn remember(&mut self, peer: PeerId, addr: Multiaddr, pin: bool) {
        if !self.book.remember(peer, addr, pin) {
            warn!(%peer, cap = self.book.cap, "address book full of pinned peers; address not kept");
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Rr(ev)) => self.on_rr(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                // Identify may report after the peer already left.
                if self.swarm.is_connected(&peer_id)
                    && info.protocols.iter().any(|p| p.as_ref() == LANE_PROTOCOL)
                {
                    self.lanes.set_capable(peer_id);
                }
                for addr in info.listen_addrs.into_iter().take(MAX_ADDRS_PER_PEER) {
                    self.remember(peer_id, addr, false);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(_)) => {}
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                endpoint,
                connection_id,
                ..
            } => {
                if endpoint.is_dialer() {
                    self.remember(peer_id, endpoint.get_remote_address().clone(), false);
                }
                if self
                    .dialed
                    .get(&peer_id)
                    .is_some_and(|(id, _)| *id == connection_id)
                {
                    self.dialed.remove(&peer_id);
                }
                for tx in self.dials.remove(&peer_id).unwrap_or_default() {
                    let _ = tx.send(Ok(()));
                }
                if num_established.get() == 1 {
                    debug!(peer = %peer_id, "connected");
                    let _ = self.events.send(PeerEvent::Connected(peer_id));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                cause,
                ..
            } => {
                debug!(peer = %peer_id, ?cause, "disconnected");
                self.lanes.forget(&peer_id);
                let _ = self.events.send(PeerEvent::Disconnected(peer_id));
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                connection_id,
            } => {
                debug!(%peer, %error, "outgoing connection failed");
                // An older dial's failure leaves our latest one running:
                // `Handle::dial` callers wait for that one.
                let latest = match self.dialed.get(&peer) {
                    Some((id, _)) if *id != connection_id => false,
                    _ => {
                        self.dialed.remove(&peer);
                        true
                    }
                };
                if latest && !self.swarm.is_connected(&peer) {
                    for tx in self.dials.remove(&peer).unwrap_or_default() {
                        let _ = tx.send(Err(Error::DialFailure(peer)));
                    }
                }
            }
            SwarmEvent::IncomingConnectionError {
                error: ListenError::Denied { cause },
                send_back_addr,
                ..
            } => {
                if let Some(skipped) = self.denied.pass() {
                    warn!(from = %send_back_addr, %cause, skipped, "incoming connection denied");
                }
            }
            SwarmEvent::IncomingConnectionError { error, .. } => {
                debug!(%error, "incoming connection failed");
            }
            _ => {}
        }
    }

    fn on_rr(&mut self, ev: request_response::Event<Req, Resp>) {
        match ev {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => self.on_request(peer, request, channel),
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    let result = match response {
                        Resp::Received(Ok(reply)) => Ok(reply),
                        Resp::Received(Err(e)) => {
                            warn!(%peer, error = %e, "bad reply frame");
                            Err(e)
                        }
                        Resp::Pending(_) | Resp::Frame(_) => Err(Error::ConnectionClosed),
                    };
                    if let Some(pending) = self.pending.remove(&request_id) {
                        let _ = pending.tx.send(result);
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error: OutboundFailure::DialFailure,
                connection_id,
            } => {
                debug!(%peer, "request failed: a dial failed");
                self.on_dial_failure(peer, connection_id, request_id);
            }
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                debug!(%peer, %error, "request failed");
                let err = match error {
                    OutboundFailure::DialFailure => Error::DialFailure(peer),
                    OutboundFailure::Timeout => Error::Timeout,
                    OutboundFailure::ConnectionClosed => Error::ConnectionClosed,
                    OutboundFailure::UnsupportedProtocols => Error::UnsupportedProtocol,
                    OutboundFailure::Io(e) => Error::Io(e),
                };
                if let Some(pending) = self.pending.remove(&request_id) {
                    let _ = pending.tx.send(Err(err));
                }
            }
            // A peer causes these at will (a stream it resets after one
            // byte fails our refusal's write): throttled like bad frames.
            request_response::Event::InboundFailure { peer, error, .. } => match error {
                InboundFailure::Io(e) => {
                    if let Some(skipped) = self.bad_frames.pass() {
                        warn!(%peer, error = %e, skipped, "inbound stream failed");
                    }
                }
                InboundFailure::Timeout => {
                    if let Some(skipped) = self.bad_frames.pass() {
                        warn!(%peer, skipped, "inbound request timed out");
                    }
                }
                other => debug!(%peer, error = %other, "inbound request failed"),
            },
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn on_request(
        &mut self,
        peer: PeerId,
        request: Req,
        channel: request_response::ResponseChannel<Resp>,
    ) {
        let rr = &mut self.swarm.behaviour_mut().rr;
        let (message, bytes) = match request {
            Req::Received(Ok(msg), bytes) if msg.is_request() => (msg, bytes),
            Req::Received(Ok(msg), _) => {
                if let Some(skipped) = self.bad_frames.pass() {
                    warn!(%peer, kind = msg.kind(), skipped, "reply sent as a request");
                }
                let frame = refusal_frame(RefusalCode::NotARequest, msg.kind());
                let _ = rr.send_response(channel, Resp::Frame(frame));
                return;
            }
            Req::Received(Err(e), _) => {
                let code = refusal_code(&e);
                let throttle = if code == RefusalCode::Busy {
                    &mut self.refused
                } else {
                    &mut self.bad_frames
                };
                if let Some(skipped) = throttle.pass() {
                    warn!(%peer, error = %e, skipped, "refusing request frame");
                }
                let _ = rr.send_response(channel, Resp::Frame(refusal_frame(code, e.to_string())));
                return;
            }
            Req::Frame(_) => return,
        };
        let ticket = match self.admission.admit(peer, bytes) {
            Ok(t) => t,
            Err(e) => {
                if let Some(skipped) = self.refused.pass() {
                    warn!(%peer, error = %e, skipped, "refusing request");
                }
                let frame = refusal_frame(RefusalCode::Busy, e.to_string());
                let _ = rr.send_response(channel, Resp::Frame(frame));
                return;
            }
        };
        let (tx, rx) = oneshot::channel();
        if rr.send_response(channel, Resp::Pending(rx)).is_err() {
            return;
        }
        let responder = Responder {
            to: ReplyTo::Stream(tx),
            max_frame: self.max_frame,
            _ticket: Some(ticket),
        };
        let request = Request {
            peer,
            message,
            responder,
        };
        match self.in_tx.try_send(request) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(req)) => {
                if let Some(skipped) = self.refused.pass() {
                    warn!(%peer, skipped, "incoming queue full, refusing request");
                }
                let _ = req
                    .responder
                    .refuse(Refusal::new(RefusalCode::Busy, "incoming queue full"));
            }
            // Nobody listens: the dropped responder answers NoReply.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_address_new_to_the_book_starts_a_generation() {
        let mut book = Book::new(4);
        let peer = PeerId::random();
        let a: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        let b: Multiaddr = "/ip4/127.0.0.1/tcp/2".parse().unwrap();
        assert_eq!(book.generation(&peer), 0);
        assert!(book.remember(peer, a.clone(), true));
        let first = book.generation(&peer);
        assert!(first > 0);
        // Given again (e.g. re-introduced): no reason to dial again.
        assert!(book.remember(peer, a, true));
        assert_eq!(book.generation(&peer), first);
        assert!(book.remember(peer, b, false));
        assert!(book.generation(&peer) > first);
    }
}
