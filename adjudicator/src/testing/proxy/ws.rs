//! One websocket client: a session that owns the client's socket and its
//! own upstream websocket, and moves JSON-RPC text frames between them
//! under the schedule, in one task (so nothing needs a lock).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};
use tracing::{debug, warn};

use super::message::{FromUpstream, RpcRequest, classify};
use super::{
    BLOCKED, NotificationFault, RequestAction, RequestFault, ResponseFault, Shared, bump,
    error_message,
};
use crate::error::{GarbageReason, ProxyError, ProxySide};

/// How long closing either socket may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Runs a websocket client's session until either side leaves, a fault or
/// the test disconnects it, or the proxy is dropped.
pub(super) async fn session<S>(
    shared: Arc<Shared>,
    mut client: WebSocketStream<S>,
    kill: watch::Receiver<u64>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    bump(&shared.stats.websockets);
    let upstream = match connect_async(shared.upstream.ws_url.as_str()).await {
        Ok((upstream, _)) => upstream,
        Err(e) => {
            warn!(e = %shared.upstream.error(e), "no upstream websocket for a client");
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, client.close(None)).await;
            return;
        }
    };
    let (later_tx, later_rx) = mpsc::unbounded_channel();
    let mut session = Session {
        stall: shared.stall.subscribe(),
        shared,
        client,
        upstream,
        kill,
        held: VecDeque::new(),
        paced: VecDeque::new(),
        later_tx,
        later_rx,
    };
    let end = session.run().await;
    match &end {
        End::Failed(e) => session.shared.closing(e),
        End::Closed { why, .. } => debug!(why, "closing a proxied websocket"),
    }
    session.close(end).await;
}

/// Which way a frame goes.
#[derive(Debug, Clone, Copy)]
enum To {
    Client,
    Upstream,
}

/// What a frame is, for the stats.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Request,
    Response,
    Notification,
    /// An answer the proxy made up (an injected or blocked error).
    Answer,
}

/// A frame on its way.
type Frame = (To, Kind, Utf8Bytes);

/// Why a session ends.
enum End {
    /// Garbage, or a socket failed.
    Failed(ProxyError),
    /// Normal or intended: `handshake` says whether to send close frames
    /// (an injected disconnect just drops the connection, as a broken link does).
    Closed { why: &'static str, handshake: bool },
}

fn closed(why: &'static str) -> End {
    End::Closed {
        why,
        handshake: true,
    }
}

fn garbage(from: ProxySide, reason: GarbageReason) -> End {
    End::Failed(ProxyError::Garbage { from, reason })
}

/// A failed read: a peer that broke the protocol sent garbage; one that
/// just went away (reset, closed) did not.
fn failed(from: ProxySide, e: tungstenite::Error, shared: &Shared) -> End {
    use tungstenite::Error as E;
    use tungstenite::error::ProtocolError as P;
    let gone = matches!(
        e,
        E::ConnectionClosed
            | E::AlreadyClosed
            | E::Io(_)
            | E::Protocol(P::ResetWithoutClosingHandshake)
    );
    End::Failed(match (from, gone) {
        (_, false) => ProxyError::Garbage {
            from,
            reason: GarbageReason::Protocol(Arc::new(e)),
        },
        (ProxySide::Client, true) => ProxyError::Client(Arc::new(e)),
        (ProxySide::Upstream, true) => shared.upstream.error(e),
    })
}

struct Session<S> {
    shared: Arc<Shared>,
    client: WebSocketStream<S>,
    upstream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    kill: watch::Receiver<u64>,
    stall: watch::Receiver<bool>,
    /// Frames held while the proxy is stalled, in order.
    held: VecDeque<Frame>,
    /// Notifications waiting for their time, in order (a delayed one holds
    /// back those behind it).
    paced: VecDeque<(Instant, Utf8Bytes)>,
    /// Delayed requests and responses come back here when due.
    later_tx: mpsc::UnboundedSender<Frame>,
    later_rx: mpsc::UnboundedReceiver<Frame>,
}

type Step = Result<(), End>;

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    async fn run(&mut self) -> End {
        loop {
            let due = self.paced.front().map(|(at, _)| *at);
            let step = tokio::select! {
                m = self.client.next() => self.on_client(m).await,
                m = self.upstream.next() => self.on_upstream(m).await,
                Some((to, kind, text)) = self.later_rx.recv() => self.send(to, kind, text).await,
                () = until(due) => self.release_paced().await,
                r = self.stall.changed() => match r {
                    Ok(()) => self.flush_held().await,
                    Err(_) => Err(closed("proxy dropped")),
                },
                r = self.kill.changed() => Err(match r {
                    Ok(()) => End::Closed { why: "disconnected by the test", handshake: false },
                    Err(_) => closed("proxy dropped"),
                }),
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    async fn on_client(&mut self, m: Option<Result<Message, tungstenite::Error>>) -> Step {
        let text = match m {
            None | Some(Ok(Message::Close(_))) => return Err(closed("client left")),
            Some(Err(e)) => return Err(failed(ProxySide::Client, e, &self.shared)),
            Some(Ok(Message::Binary(b))) => {
                return Err(garbage(ProxySide::Client, GarbageReason::Binary(b.len())));
            }
            // Pings are answered by tungstenite; nothing else to do.
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => return Ok(()),
            Some(Ok(Message::Text(text))) => text,
        };
        let req = RpcRequest::parse(text.as_bytes())
            .map_err(|reason| garbage(ProxySide::Client, reason))?;
        let answer =
            |(code, message): (i64, &str)| Utf8Bytes::from(req.error_response(code, message));
        match self.shared.request(&req) {
            RequestAction::Blocked => self.send(To::Client, Kind::Answer, answer(BLOCKED)).await,
            RequestAction::Null => {
                let body = Utf8Bytes::from(req.null_response());
                self.send(To::Client, Kind::Answer, body).await
            }
            RequestAction::Planned(fault) => match fault {
                RequestFault::Forward => self.send(To::Upstream, Kind::Request, text).await,
                RequestFault::Drop => Ok(()),
                RequestFault::Error(code) => {
                    let body = answer((code, error_message(code)));
                    self.send(To::Client, Kind::Answer, body).await
                }
                RequestFault::Delay(wait) => {
                    self.later(wait, (To::Upstream, Kind::Request, text));
                    Ok(())
                }
                RequestFault::Disconnect => Err(End::Closed {
                    why: "injected disconnect",
                    handshake: false,
                }),
            },
        }
    }

    async fn on_upstream(&mut self, m: Option<Result<Message, tungstenite::Error>>) -> Step {
        let text = match m {
            None | Some(Ok(Message::Close(_))) => return Err(closed("upstream left")),
            Some(Err(e)) => return Err(failed(ProxySide::Upstream, e, &self.shared)),
            Some(Ok(Message::Binary(b))) => {
                return Err(garbage(ProxySide::Upstream, GarbageReason::Binary(b.len())));
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => return Ok(()),
            Some(Ok(Message::Text(text))) => text,
        };
        match classify(text.as_bytes()).map_err(|reason| garbage(ProxySide::Upstream, reason))? {
            FromUpstream::Response => match self.shared.response() {
                ResponseFault::Forward => self.send(To::Client, Kind::Response, text).await,
                ResponseFault::Drop => Ok(()),
                ResponseFault::Delay(wait) => {
                    self.later(wait, (To::Client, Kind::Response, text));
                    Ok(())
                }
            },
            FromUpstream::Notification => {
                let now = Instant::now();
                match self.shared.notification() {
                    NotificationFault::Forward => self.pace(now, text).await,
                    NotificationFault::Drop => Ok(()),
                    NotificationFault::Duplicate => {
                        self.pace(now, text.clone()).await?;
                        self.pace(now, text).await
                    }
                    NotificationFault::Delay(wait) => self.pace(now + wait, text).await,
                }
            }
        }
    }

    /// Sends `frame` after `wait`, overtaking or overtaken by others.
    fn later(&self, wait: Duration, frame: Frame) {
        let tx = self.later_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            // The session may be gone: then so is the frame.
            let _ = tx.send(frame);
        });
    }

    /// Delivers a notification at `at`, but never before one queued earlier.
    async fn pace(&mut self, at: Instant, text: Utf8Bytes) -> Step {
        match self.paced.back() {
            None if at <= Instant::now() => self.send(To::Client, Kind::Notification, text).await,
            back => {
                let at = back.map_or(at, |(last, _)| at.max(*last));
                self.paced.push_back((at, text));
                Ok(())
            }
        }
    }

    async fn release_paced(&mut self) -> Step {
        let now = Instant::now();
        while self.paced.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, text)) = self.paced.pop_front() {
                self.send(To::Client, Kind::Notification, text).await?;
            }
        }
        Ok(())
    }

    /// Sends a frame, or holds it while the proxy is stalled.
    async fn send(&mut self, to: To, kind: Kind, text: Utf8Bytes) -> Step {
        if *self.stall.borrow() {
            self.held.push_back((to, kind, text));
            return Ok(());
        }
        self.deliver(to, kind, text).await
    }

    async fn flush_held(&mut self) -> Step {
        if *self.stall.borrow_and_update() {
            return Ok(());
        }
        while let Some((to, kind, text)) = self.held.pop_front() {
            self.deliver(to, kind, text).await?;
        }
        Ok(())
    }

    async fn deliver(&mut self, to: To, kind: Kind, text: Utf8Bytes) -> Step {
        let frame = Message::Text(text);
        match to {
            To::Client => self
                .client
                .send(frame)
                .await
                .map_err(|e| End::Failed(ProxyError::Client(Arc::new(e))))?,
            To::Upstream => self
                .upstream
                .send(frame)
                .await
                .map_err(|e| End::Failed(self.shared.upstream.error(e)))?,
        }
        let stats = &self.shared.stats;
        match kind {
            Kind::Request => bump(&stats.requests),
            Kind::Response => bump(&stats.responses),
            Kind::Notification => bump(&stats.notifications),
            Kind::Answer => {}
        }
        Ok(())
    }

    /// Closes both sockets: with close frames, or by just dropping them.
    async fn close(mut self, end: End) {
        if matches!(
            end,
            End::Closed {
                handshake: false,
                ..
            }
        ) {
            return;
        }
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.client.close(None)).await;
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.upstream.close(None)).await;
    }
}

/// Resolves at `at`, or never.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
