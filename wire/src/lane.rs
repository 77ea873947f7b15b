//! Lanes: one long-lived stream per peer and direction on `/perun/wire/2`.
//!
//! On `/perun/wire/1` every request opens its own yamux stream, negotiates
//! the protocol, starts a `futures-timer` timeout (a wake-up of that
//! crate's helper thread, twice per side) and passes through the swarm task
//! twice on each side. A lane pays for its stream once: the peer that opened
//! it writes requests on it, the other peer writes the replies, and every
//! frame is `[id: u64 big-endian][frame]` so replies may come in any order.
//! Frames queued together are written together (one yamux frame, one noise
//! frame, one syscall), which is what makes many channels between the same
//! two peers cheap.
//!
//! We open a lane only to a peer whose identify info lists the protocol;
//! until then, and with peers of older releases, requests go on
//! `/perun/wire/1` as before. Both sides serve both protocols. The serving
//! side first writes a one-byte preface, and the opener writes no request
//! before it came: a lane that was not taken costs no request, and its
//! peer's requests go on `/perun/wire/1` for a while (a backoff from 1 s
//! to 5 min).
//!
//! An inbound lane is untrusted input like a request stream, under the same
//! caps and with the same answers (DESIGN §6): a frame over the size limit
//! or over the large-frame budget is skipped and refused (`TooLarge`,
//! `Busy`), a bad body is refused `Malformed`, a reply sent as a request
//! `NotARequest`, a request over a request cap or the incoming queue
//! `Busy`, each under its id, and the lane goes on. A frame that stalls
//! half-way (`read_timeout`) is refused `Stalled` and ends the lane, since
//! its framing is lost. An answer keeps its request's place under the caps
//! until it is written, refusals have [`REFUSALS`] places of their own (the
//! lane stops reading while they are taken), and a peer that does not take
//! a write within `request_timeout` loses the lane. A peer holds at most
//! [`LANES_PER_PEER`] inbound lanes.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};
use libp2p_stream::{Control, IncomingStreams};
use perun_channel::throttle::Throttle;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::{Instant, timeout, timeout_at};
use tracing::{Instrument, debug, debug_span, warn};

use crate::codec::{LargeFrames, refusal_code, tagged_refusal};
use crate::frame::{self, LANE_PROTOCOL, Reply, TAG_LEN};
use crate::message::{Message, Refusal, RefusalCode};
use crate::node::{Admission, Request, Responder, Ticket, lock};
use crate::{Error, Result};

/// Inbound lanes one peer may hold open at once.
pub(crate) const LANES_PER_PEER: usize = 8;

/// The first byte the serving side writes on a lane: it took the lane.
const PREFACE: [u8; 1] = [0x01];

/// Refusals a lane's reply queue holds beyond its replies.
const REFUSALS: usize = 64;

/// Most replies a lane's queue keeps a place for (`Limits` may allow more
/// unanswered requests; replies beyond this fail on a lane).
const MAX_RESERVED: usize = 1 << 16;

/// Bytes gathered into one write.
const WRITE_BATCH: usize = 64 * 1024;

/// Timing and size settings of lanes, from the endpoint's `Config`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LaneConfig {
    pub(crate) max_frame: usize,
    pub(crate) request_timeout: Duration,
    pub(crate) read_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    /// Requests queued on one of our lanes: our send slots per peer.
    pub(crate) queue: usize,
}

/// Our outbound lanes, per peer.
pub(crate) struct Lanes {
    control: Mutex<Control>,
    peers: Mutex<HashMap<PeerId, Peer>>,
    config: LaneConfig,
}

impl std::fmt::Debug for Lanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lanes").finish_non_exhaustive()
    }
}

/// What we know of one peer: whether it speaks lanes, and our lane to it.
#[derive(Default)]
struct Peer {
    capable: bool,
    lane: Option<Arc<Lane>>,
    /// Held while a lane is being opened, so concurrent sends open one;
    /// also names this entry (a reconnect makes a new one).
    opening: Arc<tokio::sync::Mutex<()>>,
    /// Lane opens that failed in a row, and when to try again.
    failures: u32,
    retry_at: Option<Instant>,
}

impl Peer {
    fn usable(&self) -> bool {
        self.capable && self.retry_at.is_none_or(|t| Instant::now() >= t)
    }
}

/// The wait after a failed lane open, doubling with each failure in a row
/// up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(300);

impl Lanes {
    /// When a request sent now must have its answer.
    pub(crate) fn deadline(&self) -> Instant {
        Instant::now() + self.config.request_timeout
    }

    pub(crate) fn new(control: Control, config: LaneConfig) -> Arc<Self> {
        Arc::new(Self {
            control: Mutex::new(control),
            peers: Mutex::new(HashMap::new()),
            config,
        })
    }

    /// The peer's identify info lists [`LANE_PROTOCOL`].
    pub(crate) fn set_capable(&self, peer: PeerId) {
        lock(&self.peers).entry(peer).or_default().capable = true;
    }

    /// The peer's last connection is gone; it may come back as another
    /// release. Its lane ends at once ([`Lane::end`]), not at its requests'
    /// timeout.
    pub(crate) fn forget(&self, peer: &PeerId) {
        let gone = lock(&self.peers).remove(peer);
        if let Some(lane) = gone.and_then(|p| p.lane) {
            lane.end();
        }
    }

    /// The node stops: every lane ends as in [`forget`](Self::forget).
    pub(crate) fn forget_all(&self) {
        let gone = std::mem::take(&mut *lock(&self.peers));
        for lane in gone.into_values().filter_map(|p| p.lane) {
            lane.end();
        }
    }

    /// Whether a lane to `peer` is open (for tests and diagnostics).
    pub(crate) fn is_open(&self, peer: &PeerId) -> bool {
        lock(&self.peers)
            .get(peer)
            .and_then(|p| p.lane.as_ref())
            .is_some_and(|l| l.is_open())
    }

    /// The lane to use for `peer`, opened if need be; `None`: use
    /// `/perun/wire/1` (the peer does not speak lanes, or a lane could not
    /// be opened lately). Waits until the request's `deadline` at most, for
    /// one attempt that concurrent callers share.
    pub(crate) async fn route(
        self: &Arc<Self>,
        peer: PeerId,
        deadline: Instant,
    ) -> Option<Arc<Lane>> {
        let opening = {
            let peers = lock(&self.peers);
            let p = peers.get(&peer).filter(|p| p.usable())?;
            if let Some(lane) = p.lane.as_ref().filter(|l| l.is_open()) {
                return Some(lane.clone());
            }
            p.opening.clone()
        };
        let _opening = timeout_at(deadline, opening.lock()).await.ok()?;
        {
            let peers = lock(&self.peers);
            // Another entry (the peer reconnected meanwhile) or an attempt
            // that just failed: not ours to try.
            let p = peers
                .get(&peer)
                .filter(|p| Arc::ptr_eq(&p.opening, &opening))?;
            if let Some(lane) = p.lane.as_ref().filter(|l| l.is_open()) {
                return Some(lane.clone());
            }
            if !p.usable() {
                return None;
            }
        }
        let mut control = lock(&self.control).clone();
        let protocol = StreamProtocol::new(LANE_PROTOCOL);
        // The lane is usable once the peer's preface arrived: a peer that
        // dropped the stream (too many lanes, or its acceptor busy) is
        // found out before any request is written on it.
        let open = async {
            let mut stream = control
                .open_stream(peer, protocol)
                .await
                .map_err(|e| io::Error::other(e.to_string()))?;
            let mut preface = [0u8; 1];
            stream.read_exact(&mut preface).await?;
            if preface != PREFACE {
                return Err(io::Error::from(io::ErrorKind::InvalidData));
            }
            Ok::<_, io::Error>(stream)
        };
        let opened = timeout_at(deadline, open).await;
        let mut peers = lock(&self.peers);
        let p = peers
            .get_mut(&peer)
            .filter(|p| Arc::ptr_eq(&p.opening, &opening))?;
        let stream = match opened {
            Ok(Ok(stream)) => stream,
            failed => {
                // Its requests go on /perun/wire/1 for a while, longer
                // after each failure in a row.
                p.failures = p.failures.saturating_add(1);
                let backoff = RETRY_FIRST
                    .saturating_mul(1 << p.failures.min(16).saturating_sub(1))
                    .min(RETRY_MAX);
                p.retry_at = Some(Instant::now() + backoff);
                debug!(%peer, ?failed, ?backoff, "lane not opened; using /perun/wire/1");
                return None;
            }
        };
        p.failures = 0;
        p.retry_at = None;
        let (tx, rx) = mpsc::channel(self.config.queue.max(1));
        let lane = Arc::new(Lane {
            tx,
            pending: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            open: AtomicBool::new(true),
            delivered: Notify::new(),
            cut: Notify::new(),
            config: self.config,
        });
        p.lane = Some(lane.clone());
        drop(peers);
        debug!(%peer, "lane opened");
        tokio::spawn(
            run_outbound(stream, rx, lane.clone(), self.clone(), peer)
                .instrument(debug_span!("lane", %peer)),
        );
        Some(lane)
    }

    /// Takes `lane` out of use if it is still `peer`'s, so no new request
    /// picks it; returns whether it was idle (nothing pending) and is now
    /// retired. Under the map's lock, so a request either saw the lane
    /// before it closed (and is drained) or opens a new one.
    fn retire_if_idle(&self, peer: &PeerId, lane: &Arc<Lane>) -> bool {
        let mut peers = lock(&self.peers);
        {
            let pending = lock(&lane.pending);
            if !pending.is_empty() {
                return false;
            }
            lane.open.store(false, Ordering::Release);
        }
        unset(&mut peers, peer, lane);
        true
    }

    fn remove(&self, peer: &PeerId, lane: &Arc<Lane>) {
        unset(&mut lock(&self.peers), peer, lane);
    }
}

/// Clears `peer`'s lane if it is still `lane` (a reconnect may have put
/// another entry there).
fn unset(peers: &mut HashMap<PeerId, Peer>, peer: &PeerId, lane: &Arc<Lane>) {
    if let Some(p) = peers.get_mut(peer)
        && p.lane.as_ref().is_some_and(|l| Arc::ptr_eq(l, lane))
    {
        p.lane = None;
    }
}

/// One outbound lane: requests go out tagged, replies find their caller.
pub(crate) struct Lane {
    tx: mpsc::Sender<Queued>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
    next: AtomicU64,
    open: AtomicBool,
    /// Signalled whenever a reply was handed on (a retiring lane waits for
    /// the last one).
    delivered: Notify,
    /// Signalled when the peer's last connection closed: the stream's
    /// reader is not always woken then, and its requests would wait for
    /// their timeout.
    cut: Notify,
    config: LaneConfig,
}

/// A request waiting to be written on our lane.
struct Queued {
    id: u64,
    frame: Vec<u8>,
}

impl AsRef<[u8]> for Queued {
    fn as_ref(&self) -> &[u8] {
        &self.frame
    }
}

/// How a request on our lane ended.
#[expect(
    clippy::large_enum_variant,
    reason = "moved once through a oneshot; a box would cost an allocation per reply"
)]
enum Answer {
    /// What came back under its id (a reply, a refusal or a bad frame).
    Reply(Result<Reply>),
    /// The lane closed before the request was written in full: the peer
    /// cannot have taken it, so it may go another way.
    Unsent,
}

impl Lane {
    fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire) && !self.tx.is_closed()
    }

    /// Sends `msg` and waits for its reply until `deadline`. `None`: the
    /// lane closed before the request was written in full, so it can go
    /// another way (a peer that restarted leaves a lane that breaks under
    /// the next request).
    pub(crate) async fn request(
        &self,
        msg: &Message,
        deadline: Instant,
    ) -> Option<Result<Message>> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let frame = match frame::encode_tagged(id, msg, self.config.max_frame) {
            Ok(frame) => frame,
            Err(e) => return Some(Err(e)),
        };
        let (tx, rx) = oneshot::channel();
        {
            // `close` clears `open` before it takes the pending map: a
            // request either sees it closed here, or is in the map it fails.
            let mut pending = lock(&self.pending);
            if !self.open.load(Ordering::Acquire) {
                return None;
            }
            pending.insert(id, tx);
        }
        let _pending = PendingGuard { lane: self, id };
        // The deadline covers the wait for a place in the queue too: behind
        // a peer that reads slowly the queue stays full.
        match timeout_at(deadline, self.tx.send(Queued { id, frame })).await {
            Err(_) => return Some(Err(Error::Timeout)),
            Ok(Err(_)) => return None,
            Ok(Ok(())) => {}
        }
        let reply = match timeout_at(deadline, rx).await {
            Err(_) => Err(Error::Timeout),
            Ok(Err(_)) => Err(Error::ConnectionClosed),
            Ok(Ok(Answer::Unsent)) => return None,
            Ok(Ok(Answer::Reply(reply))) => reply,
        };
        Some(reply.and_then(|r| r.map_err(Error::Refused)))
    }

    /// Takes the request `id` out of the pending map. The map's lock is
    /// released on return, before anyone answers the request: the answer
    /// wakes its caller, who takes that lock at once to leave the map, and
    /// a caller woken on this core would preempt us while we still held it.
    fn take_pending(&self, id: u64) -> Option<oneshot::Sender<Answer>> {
        lock(&self.pending).remove(&id)
    }

    /// Tells the request `id` that it never left.
    fn unsent(&self, id: u64) {
        if let Some(tx) = self.take_pending(id) {
            let _ = tx.send(Answer::Unsent);
        }
    }

    /// Takes no more requests and has its task end it: the task tells
    /// those still queued that they never left (they go another way) and
    /// fails the rest, which may have reached the peer.
    fn end(&self) {
        {
            // Under the map's lock: a request either sees it closed, or is
            // in the map the task drains.
            let _pending = lock(&self.pending);
            self.open.store(false, Ordering::Release);
        }
        self.cut.notify_one();
    }

    /// Fails every request still waiting: each may have reached the peer.
    fn close(&self) {
        self.open.store(false, Ordering::Release);
        let pending = std::mem::take(&mut *lock(&self.pending));
        for (_, tx) in pending {
            let _ = tx.send(Answer::Reply(Err(Error::ConnectionClosed)));
        }
        self.delivered.notify_one();
    }
}

/// Takes a request out of the pending map however its caller ends.
struct PendingGuard<'a> {
    lane: &'a Lane,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.lane.take_pending(self.id);
    }
}

/// Drives one outbound lane until its stream breaks or it has been idle
/// for `idle_timeout`; then every request still waiting fails.
async fn run_outbound(
    stream: libp2p::Stream,
    mut rx: mpsc::Receiver<Queued>,
    lane: Arc<Lane>,
    lanes: Arc<Lanes>,
    peer: PeerId,
) {
    let config = lane.config;
    let (mut reader, mut writer) = stream.split();
    let write = async {
        loop {
            let first = match timeout(config.idle_timeout, rx.recv()).await {
                Ok(Some(first)) => first,
                // Retired and drained.
                Ok(None) => break,
                Err(_) => {
                    if lanes.retire_if_idle(&peer, &lane) {
                        rx.close();
                    }
                    continue;
                }
            };
            // A request whose caller is gone (timed out, dropped) is not
            // written: nobody waits for its reply.
            let waited = |q: &Queued| lock(&lane.pending).contains_key(&q.id);
            if let Err((e, unwritten)) =
                write_batch(&mut writer, &mut rx, first, waited, config).await
            {
                debug!(error = %e, unwritten = unwritten.len(), "lane write failed");
                for q in unwritten {
                    lane.unsent(q.id);
                }
                return;
            }
        }
        // Requests that were written before the lane retired still get
        // their replies.
        let deadline = Instant::now() + config.request_timeout;
        while !lock(&lane.pending).is_empty() {
            if timeout_at(deadline, lane.delivered.notified())
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = writer.close().await;
    };
    let read = async {
        loop {
            match read_reply(&mut reader, &lane).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    debug!(error = %e, "lane read ended");
                    return;
                }
            }
        }
    };
    tokio::select! {
        () = write => {}
        () = read => {}
        () = lane.cut.notified() => debug!("the peer's connection closed"),
    }
    lanes.remove(&peer, &lane);
    // What is still queued never left; a request not yet queued finds the
    // queue closed. Both go another way.
    rx.close();
    while let Ok(q) = rx.try_recv() {
        lane.unsent(q.id);
    }
    lane.close();
    debug!("lane closed");
}

/// Writes `first` and whatever else is queued, up to [`WRITE_BATCH`] bytes,
/// as one write, leaving out the frames `keep` refuses; the peer must take
/// it within the request timeout. On failure, also returns the frames the
/// stream did not take in full (the peer cannot have read them).
async fn write_batch<W: AsyncWrite + Unpin, T: AsRef<[u8]>>(
    writer: &mut W,
    rx: &mut mpsc::Receiver<T>,
    first: T,
    keep: impl Fn(&T) -> bool,
    config: LaneConfig,
) -> std::result::Result<(), (io::Error, Vec<T>)> {
    // Held (replies with their tickets) until written.
    let mut taken = Vec::with_capacity(1);
    let mut bytes = 0;
    let mut next = Some(first);
    while let Some(frame) = next.take() {
        if keep(&frame) {
            bytes += frame.as_ref().len();
            taken.push(frame);
        }
        if bytes < WRITE_BATCH {
            next = rx.try_recv().ok();
        }
    }
    if taken.is_empty() {
        return Ok(());
    }
    // A lone frame goes out as it is; several are joined into one write.
    let joined = (taken.len() > 1).then(|| {
        taken
            .iter()
            .flat_map(|f| f.as_ref())
            .copied()
            .collect::<Vec<u8>>()
    });
    let batch = joined.as_deref().unwrap_or_else(|| taken[0].as_ref());
    let mut accepted = 0;
    let write = async {
        while accepted < batch.len() {
            match writer.write(&batch[accepted..]).await? {
                0 => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                n => accepted += n,
            }
        }
        writer.flush().await
    };
    let written = timeout(config.request_timeout, write)
        .await
        .unwrap_or_else(|_| Err(io::Error::from(io::ErrorKind::TimedOut)));
    written.map_err(|e| {
        let mut end = 0;
        let unwritten = taken
            .into_iter()
            .filter(|f| {
                end += f.as_ref().len();
                end > accepted
            })
            .collect();
        (e, unwritten)
    })
}

/// Reads one reply and hands it to its caller. `Ok(false)`: the stream
/// ended. A reply nobody waits for (it came after its timeout) is dropped.
async fn read_reply<R: AsyncRead + Unpin>(reader: &mut R, lane: &Lane) -> io::Result<bool> {
    let Some((id, body)) = read_tagged(reader, lane.config, None).await? else {
        return Ok(false);
    };
    let reply = match body {
        Body::Frame(bytes, _) => frame::decode_reply(&bytes),
        // Skipped whole: only its request fails.
        Body::Refused(e) => Err(e),
        Body::Broken(e) => {
            warn!(error = %e, "reply frame stalled on a lane");
            return Err(io::Error::new(io::ErrorKind::TimedOut, e));
        }
    };
    match lane.take_pending(id) {
        Some(tx) => {
            // At most one per request we sent: no throttle needed.
            if let Err(e) = &reply {
                warn!(error = %e, "bad reply frame");
            }
            let _ = tx.send(Answer::Reply(reply));
        }
        // Anything the peer likes, as often as it likes: no warn.
        None => debug!(id, ok = reply.is_ok(), "reply for no waiting request"),
    }
    lane.delivered.notify_one();
    Ok(true)
}

/// One tagged frame as read.
enum Body {
    /// The frame's body, and its share of the large-frame budget.
    Frame(Vec<u8>, Option<OwnedSemaphorePermit>),
    /// The frame was skipped: over the size limit or the budget.
    Refused(Error),
    /// The frame stalled: the lane's framing is lost.
    Broken(Error),
}

/// Reads one `[id][frame]`. `Ok(None)`: the stream ended between frames.
/// Only the first byte may wait indefinitely (a lane sits idle between
/// frames); the rest must arrive within `read_timeout`.
async fn read_tagged<R: AsyncRead + Unpin>(
    io: &mut R,
    config: LaneConfig,
    large: Option<&LargeFrames>,
) -> io::Result<Option<(u64, Body)>> {
    let mut tag = [0u8; TAG_LEN];
    if io.read(&mut tag[..1]).await? == 0 {
        return Ok(None);
    }
    let deadline = Instant::now() + config.read_timeout;
    // A frame stalled inside its id ends the lane unanswered: a refusal
    // under a partial id could reach another request.
    timeout_at(deadline, io.read_exact(&mut tag[1..]))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    let rest = async {
        let (refused, len) = match frame::read_len(io, config.max_frame).await {
            Ok(len) => match large.map_or(Ok(None), |l| l.take(len)) {
                Ok(permit) => {
                    let body = frame::read_exact_body(io, len).await.map_err(into_io)?;
                    return Ok(Body::Frame(body, permit));
                }
                Err(e) => (e, len),
            },
            Err(e @ Error::FrameTooLarge { len, .. }) => (e, len),
            Err(e) => return Err(into_io(e)),
        };
        // Skip the body so that the next frame can be read.
        let skipped = futures::io::copy(
            io.take(u64::try_from(len).unwrap_or(u64::MAX)),
            &mut futures::io::sink(),
        )
        .await?;
        if usize::try_from(skipped).ok() != Some(len) {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        Ok(Body::Refused(refused))
    };
    let body = match timeout_at(deadline, rest).await {
        Ok(body) => body?,
        Err(_) => Body::Broken(Error::ReadTimeout(config.read_timeout)),
    };
    Ok(Some((u64::from_be_bytes(tag), body)))
}

fn into_io(e: Error) -> io::Error {
    match e {
        Error::Io(e) => e,
        other => io::Error::new(io::ErrorKind::UnexpectedEof, other),
    }
}

/// A reply owed on an inbound lane. Dropping it unanswered answers
/// [`RefusalCode::NoReply`], like a dropped request stream.
#[derive(Debug)]
pub(crate) struct LaneReply {
    id: u64,
    tx: Option<mpsc::Sender<Outgoing>>,
    /// The request's place under its peer's caps, until its answer
    /// (reply or `NoReply`) is written.
    ticket: Option<Ticket>,
}

/// A frame waiting on an inbound lane, with what reserves its place in
/// the queue: a request's ticket until its answer is written (so a peer
/// that reads slowly cannot make us hold more than its caps allow), or one
/// of the lane's [`REFUSALS`] places for a refusal.
#[derive(Debug)]
pub(crate) struct Outgoing {
    frame: Vec<u8>,
    _place: Place,
}

#[derive(Debug)]
enum Place {
    Request { _ticket: Option<Ticket> },
    Refusal { _place: OwnedSemaphorePermit },
}

impl AsRef<[u8]> for Outgoing {
    fn as_ref(&self) -> &[u8] {
        &self.frame
    }
}

impl LaneReply {
    /// Queues `reply`; a reply too large for a frame is refused `TooLarge`
    /// instead, and its error returned.
    pub(crate) fn send(mut self, reply: &Reply, max_frame: usize) -> Result<()> {
        let Some(tx) = self.tx.take() else {
            return Err(Error::ConnectionClosed);
        };
        let (frame, result) = match frame::encode_tagged(self.id, reply, max_frame) {
            Ok(frame) => (frame, Ok(())),
            Err(e) => (
                tagged_refusal(self.id, RefusalCode::TooLarge, e.to_string()),
                Err(e),
            ),
        };
        let queued = Outgoing {
            frame,
            _place: Place::Request {
                _ticket: self.ticket.take(),
            },
        };
        // The queue keeps a place for every admitted request (see `serve`).
        tx.try_send(queued).map_err(|_| Error::ConnectionClosed)?;
        result
    }
}

impl Drop for LaneReply {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let refusal = tagged_refusal(
                self.id,
                RefusalCode::NoReply,
                "the receiver dropped the request",
            );
            let _ = tx.try_send(Outgoing {
                frame: refusal,
                _place: Place::Request {
                    _ticket: self.ticket.take(),
                },
            });
        }
    }
}

/// What serving inbound lanes shares with the endpoint.
pub(crate) struct Inbound {
    pub(crate) admission: Arc<Admission>,
    /// Weak: the incoming queue ends with the endpoint, whatever lanes
    /// are still writing replies.
    pub(crate) in_tx: mpsc::WeakSender<Request>,
    pub(crate) large_frames: LargeFrames,
    pub(crate) config: LaneConfig,
    /// Inbound lanes per peer.
    pub(crate) lanes: Mutex<HashMap<PeerId, usize>>,
    /// Requests refused because a cap was full.
    pub(crate) refused: Mutex<Throttle>,
    /// Frames that were bad.
    pub(crate) bad_frames: Mutex<Throttle>,
}

impl Inbound {
    fn warn_refused(&self, peer: &PeerId, code: RefusalCode, error: &dyn std::fmt::Display) {
        let throttle = if code == RefusalCode::Busy {
            &self.refused
        } else {
            &self.bad_frames
        };
        if let Some(skipped) = lock(throttle).pass() {
            warn!(%peer, %error, ?code, skipped, "refusing a request on a lane");
        }
    }
}

/// Accepts inbound lanes until `stop` fires or the endpoint is gone.
pub(crate) async fn accept(
    mut incoming: IncomingStreams,
    inbound: Arc<Inbound>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        let (peer, stream) = tokio::select! {
            next = incoming.next() => match next {
                Some(next) => next,
                None => return,
            },
            _ = &mut stop => return,
        };
        let seat = {
            let mut lanes = lock(&inbound.lanes);
            let n = lanes.entry(peer).or_default();
            if *n >= LANES_PER_PEER {
                None
            } else {
                *n += 1;
                Some(Seat {
                    inbound: inbound.clone(),
                    peer,
                })
            }
        };
        let Some(seat) = seat else {
            if let Some(skipped) = lock(&inbound.refused).pass() {
                warn!(%peer, limit = LANES_PER_PEER, skipped, "too many lanes; stream dropped");
            }
            continue;
        };
        tokio::spawn(serve(seat, stream).instrument(debug_span!("lane_in", %peer)));
    }
}

/// One peer's place among the inbound lanes; given back on drop.
struct Seat {
    inbound: Arc<Inbound>,
    peer: PeerId,
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut lanes = lock(&self.inbound.lanes);
        if let Some(n) = lanes.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                lanes.remove(&self.peer);
            }
        }
    }
}

/// Serves one inbound lane: reads requests until the stream ends, and
/// writes replies until the last one owed is written.
async fn serve(seat: Seat, stream: libp2p::Stream) {
    let inbound = seat.inbound.clone();
    let inbound = &inbound;
    let peer = seat.peer;
    let config = inbound.config;
    // A place in the queue for every reply the peer may be owed (its
    // tickets), and `REFUSALS` more for refusals.
    let reserved = inbound
        .admission
        .limits
        .requests_per_peer
        .clamp(1, MAX_RESERVED);
    let places = Arc::new(Semaphore::new(REFUSALS));
    let (mut reader, mut writer) = stream.split();
    let (tx, mut rx) = mpsc::channel::<Outgoing>(reserved + REFUSALS);
    let write = async move {
        let preface = async {
            writer.write_all(&PREFACE).await?;
            writer.flush().await
        };
        match timeout(config.request_timeout, preface).await {
            Ok(Ok(())) => {}
            failed => {
                debug!(?failed, "lane preface not written");
                return;
            }
        }
        while let Some(first) = rx.recv().await {
            if let Err((e, _)) = write_batch(&mut writer, &mut rx, first, |_| true, config).await {
                debug!(error = %e, "lane reply write failed");
                return;
            }
        }
        let _ = writer.close().await;
    };
    let read = async move {
        // Held while the lane reads: a lane still writing replies takes no
        // place of the peer's.
        let _seat = seat;
        // Queues a refusal in one of the lane's refusal places, waiting for
        // one while they are all taken (the peer is slow to read: this
        // lane stops reading meanwhile; one that does not read at all
        // fails the write timeout, and the lane ends). `false`: the lane
        // is gone.
        let refuse = async |id: u64, code: RefusalCode, detail: String| {
            inbound.warn_refused(&peer, code, &detail);
            let Ok(place) = places.clone().acquire_owned().await else {
                return false;
            };
            let frame = tagged_refusal(id, code, detail);
            tx.try_send(Outgoing {
                frame,
                _place: Place::Refusal { _place: place },
            })
            .is_ok()
        };
        loop {
            if tx.is_closed() {
                return;
            }
            let (id, body) =
                match read_tagged(&mut reader, config, Some(&inbound.large_frames)).await {
                    Ok(Some(read)) => read,
                    Ok(None) => return,
                    Err(e) => {
                        debug!(error = %e, "lane ended");
                        return;
                    }
                };
            let (bytes, permit) = match body {
                Body::Frame(bytes, permit) => (bytes, permit),
                Body::Refused(e) => {
                    if refuse(id, refusal_code(&e), e.to_string()).await {
                        continue;
                    }
                    return;
                }
                Body::Broken(e) => {
                    refuse(id, RefusalCode::Stalled, e.to_string()).await;
                    return;
                }
            };
            let message = match frame::decode_message(&bytes) {
                Ok(msg) if msg.is_request() => msg,
                Ok(msg) => {
                    let kind = msg.kind().to_string();
                    if refuse(id, RefusalCode::NotARequest, kind).await {
                        continue;
                    }
                    return;
                }
                Err(e) => {
                    if refuse(id, RefusalCode::Malformed, e.to_string()).await {
                        continue;
                    }
                    return;
                }
            };
            if tx.is_closed() {
                return;
            }
            let ticket = match inbound.admission.admit(peer, permit) {
                Ok(ticket) => ticket,
                Err(e) => {
                    if refuse(id, RefusalCode::Busy, e.to_string()).await {
                        continue;
                    }
                    return;
                }
            };
            let reply = LaneReply {
                id,
                tx: Some(tx.clone()),
                ticket: Some(ticket),
            };
            let request = Request::new(peer, message, Responder::on_lane(reply, config.max_frame));
            let Some(in_tx) = inbound.in_tx.upgrade() else {
                // The endpoint is gone: the dropped responder answers NoReply.
                return;
            };
            match in_tx.try_send(request) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(req)) => {
                    inbound.warn_refused(&peer, RefusalCode::Busy, &"incoming queue full");
                    let _ = req
                        .into_parts()
                        .2
                        .refuse(Refusal::new(RefusalCode::Busy, "incoming queue full"));
                }
                // Nobody listens: the dropped responder answers NoReply.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    };
    futures::join!(write, read);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests may panic on failure.

    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    /// Takes `room` bytes, at most `chunk` per write, then fails.
    struct Breaks {
        room: usize,
        chunk: usize,
    }

    impl AsyncWrite for Breaks {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.room == 0 {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            let n = buf.len().min(self.room).min(self.chunk);
            self.room -= n;
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn config() -> LaneConfig {
        LaneConfig {
            max_frame: 1024,
            request_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
            queue: 8,
        }
    }

    /// Frames `keep` refuses (requests whose caller is gone) are left out
    /// of the write, the first one included; the rest go out in order.
    #[tokio::test]
    async fn frames_nobody_waits_for_are_not_written() {
        let (tx, mut rx) = mpsc::channel(8);
        for id in 1..4u8 {
            tx.send(Queued {
                id: id.into(),
                frame: vec![id; 3],
            })
            .await
            .unwrap();
        }
        let first = Queued {
            id: 0,
            frame: vec![0; 3],
        };
        let mut w = Breaks {
            room: 100,
            chunk: 100,
        };
        let waited = |q: &Queued| q.id % 2 == 1;
        assert!(
            write_batch(&mut w, &mut rx, first, waited, config())
                .await
                .is_ok()
        );
        assert_eq!(w.room, 100 - 6, "only frames 1 and 3 were written");
        let mut w = Breaks { room: 0, chunk: 1 };
        let (tx, mut rx) = mpsc::channel::<Queued>(1);
        drop(tx);
        let gone = Queued {
            id: 0,
            frame: vec![0; 3],
        };
        // Nothing left to write: no write at all (the stream has no room).
        assert!(
            write_batch(&mut w, &mut rx, gone, |_| false, config())
                .await
                .is_ok()
        );
    }

    /// Writes three 10-byte frames into a stream that breaks after `room`
    /// bytes; returns the ids of the frames reported unwritten.
    async fn unwritten_after(room: usize) -> Vec<u64> {
        let (tx, mut rx) = mpsc::channel(8);
        for id in 1..3 {
            tx.send(Queued {
                id,
                frame: vec![0; 10],
            })
            .await
            .unwrap();
        }
        let first = Queued {
            id: 0,
            frame: vec![0; 10],
        };
        let mut w = Breaks { room, chunk: 7 };
        match write_batch(&mut w, &mut rx, first, |_| true, config()).await {
            Ok(()) => panic!("the stream broke"),
            Err((_, unwritten)) => unwritten.iter().map(|q| q.id).collect(),
        }
    }

    /// A frame the stream took in part is unwritten too: the peer cannot
    /// read a frame it did not get whole.
    #[tokio::test]
    async fn only_frames_the_stream_took_whole_count_as_sent() {
        assert_eq!(unwritten_after(0).await, vec![0, 1, 2]);
        assert_eq!(unwritten_after(9).await, vec![0, 1, 2]);
        assert_eq!(unwritten_after(10).await, vec![1, 2]);
        assert_eq!(unwritten_after(15).await, vec![1, 2]);
        assert_eq!(unwritten_after(20).await, vec![2]);
    }
}
