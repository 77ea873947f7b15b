//! One client connection: HTTP/1.1 JSON-RPC, forwarded over the
//! connection's own upstream HTTP connection, or a websocket upgrade handed
//! to [`ws::session`](super::ws::session).
//!
//! Closing "without a response" (a dropped request or response, a
//! disconnect, garbage) is done by the connection's task: the handler asks
//! for it and never answers, and the task drops the socket.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Notify, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tracing::debug;

use super::message::{RpcRequest, classify};
use super::{BLOCKED, RequestAction, RequestFault, ResponseFault, Shared, bump, error_message, ws};
use crate::error::{GarbageReason, ProxyError, ProxySide};

/// The largest HTTP body the proxy reads, either way.
const MAX_BODY: usize = 16 << 20;

/// Serves one client connection until it ends, the handler closes it, or
/// the test disconnects everyone.
pub(super) async fn serve(shared: Arc<Shared>, stream: TcpStream, mut kill: watch::Receiver<u64>) {
    let conn = Arc::new(Conn {
        shared,
        close: Notify::new(),
        upstream: Mutex::new(None),
        kill: kill.clone(),
    });
    let handler = conn.clone();
    let service = service_fn(move |req| {
        let conn = handler.clone();
        async move { Ok::<_, Infallible>(conn.handle(req).await) }
    });
    let http = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::select! {
        r = http => match r {
            Err(e) if e.is_parse() || e.is_parse_too_large() => conn.shared.closing(&ProxyError::Garbage {
                from: ProxySide::Client,
                reason: GarbageReason::Protocol(Arc::new(e)),
            }),
            Err(e) => debug!(%e, "client HTTP connection failed"),
            Ok(()) => {}
        },
        () = conn.close.notified() => debug!("closing a client HTTP connection"),
        _ = kill.changed() => debug!("disconnecting a client HTTP connection"),
    }
}

/// Why a request gets no response: its connection is closed instead.
enum Close {
    /// A fault the schedule planned.
    Injected(&'static str),
    /// Garbage or a failure, logged as a warning.
    Failed(ProxyError),
}

/// A client connection's state.
struct Conn {
    shared: Arc<Shared>,
    /// Tells the connection's task to drop the socket.
    close: Notify,
    /// This client's own connection to the node, opened on first use.
    upstream: Mutex<Option<SendRequest<Full<Bytes>>>>,
    kill: watch::Receiver<u64>,
}

type Reply = Response<Full<Bytes>>;

impl Conn {
    async fn handle(&self, req: Request<Incoming>) -> Reply {
        if is_upgrade(&req) {
            return self.upgrade(req);
        }
        if req.method() != Method::POST {
            return status(StatusCode::METHOD_NOT_ALLOWED);
        }
        let body = read_body(req.into_body(), ProxySide::Client, |e| {
            ProxyError::Client(Arc::from(e))
        });
        let outcome = match body.await {
            Ok(body) => self.rpc(body).await,
            Err(e) => Err(Close::Failed(e)),
        };
        match outcome {
            Ok(reply) => reply,
            Err(close) => {
                match close {
                    Close::Injected(what) => debug!(what, "closing without a response"),
                    Close::Failed(e) => self.shared.closing(&e),
                }
                self.close.notify_one();
                // The connection's task drops the socket; this never answers.
                std::future::pending().await
            }
        }
    }

    /// One JSON-RPC message under the schedule.
    async fn rpc(&self, body: Bytes) -> Result<Reply, Close> {
        let shared = &self.shared;
        let req = RpcRequest::parse(&body).map_err(|reason| garbage(ProxySide::Client, reason))?;
        let action = shared.request(&req);
        let reply = |body: String| async move {
            shared.unstalled().await;
            Ok(json(StatusCode::OK, Bytes::from(body)))
        };
        let answer = |(code, message): (i64, &str)| reply(req.error_response(code, message));
        match action {
            RequestAction::Blocked => return answer(BLOCKED).await,
            RequestAction::Null => return reply(req.null_response()).await,
            RequestAction::Planned(RequestFault::Drop) => return Err(Close::Injected("drop")),
            RequestAction::Planned(RequestFault::Disconnect) => {
                return Err(Close::Injected("disconnect"));
            }
            RequestAction::Planned(RequestFault::Error(code)) => {
                return answer((code, error_message(code))).await;
            }
            RequestAction::Planned(RequestFault::Delay(wait)) => tokio::time::sleep(wait).await,
            RequestAction::Planned(RequestFault::Forward) => {}
        }
        shared.unstalled().await;
        let (code, body) = self.forward(body).await.map_err(Close::Failed)?;
        bump(&shared.stats.requests);
        classify(&body).map_err(|reason| garbage(ProxySide::Upstream, reason))?;
        match shared.response() {
            ResponseFault::Drop => return Err(Close::Injected("response drop")),
            ResponseFault::Delay(wait) => tokio::time::sleep(wait).await,
            ResponseFault::Forward => {}
        }
        shared.unstalled().await;
        bump(&shared.stats.responses);
        Ok(json(code, body))
    }

    /// Sends `body` to the node over this client's upstream connection.
    async fn forward(&self, body: Bytes) -> Result<(StatusCode, Bytes), ProxyError> {
        let up = &self.shared.upstream;
        let mut sender = self.upstream.lock().await;
        let sender = match &mut *sender {
            Some(s) if !s.is_closed() => s,
            slot => slot.insert(self.connect().await?),
        };
        sender.ready().await.map_err(|e| up.error(e))?;
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = up.path.parse().map_err(|e| up.error(e))?;
        let headers = req.headers_mut();
        headers.insert(
            header::HOST,
            HeaderValue::from_str(&up.authority).map_err(|e| up.error(e))?,
        );
        headers.insert(header::CONTENT_TYPE, json_type());
        let resp = sender.send_request(req).await.map_err(|e| up.error(e))?;
        let code = resp.status();
        let body = read_body(resp.into_body(), ProxySide::Upstream, |e| {
            ProxyError::Upstream {
                url: up.ws_url.clone(),
                source: Arc::from(e),
            }
        })
        .await?;
        Ok((code, body))
    }

    /// Opens this client's HTTP connection to the node.
    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ProxyError> {
        let up = &self.shared.upstream;
        let tcp = TcpStream::connect(&up.authority)
            .await
            .map_err(|e| up.error(e))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| up.error(e))?;
        // Ends when the sender (this client's connection) is dropped.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%e, "upstream HTTP connection failed");
            }
        });
        Ok(sender)
    }

    /// Accepts a websocket handshake and hands the connection to a session.
    fn upgrade(&self, mut req: Request<Incoming>) -> Reply {
        let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
            return status(StatusCode::BAD_REQUEST);
        };
        let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) else {
            return status(StatusCode::INTERNAL_SERVER_ERROR);
        };
        let upgrade = hyper::upgrade::on(&mut req);
        let (shared, kill) = (self.shared.clone(), self.kill.clone());
        tokio::spawn(async move {
            match upgrade.await {
                Ok(io) => {
                    let client =
                        WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, None)
                            .await;
                    ws::session(shared, client, kill).await;
                }
                Err(e) => debug!(%e, "websocket upgrade failed"),
            }
        });
        let mut reply = status(StatusCode::SWITCHING_PROTOCOLS);
        let headers = reply.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        reply
    }
}

fn garbage(from: ProxySide, reason: GarbageReason) -> Close {
    Close::Failed(ProxyError::Garbage { from, reason })
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.method() == Method::GET
        && req
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

/// Reads a whole body of at most [`MAX_BODY`] bytes from `from`; `failed`
/// names a transport failure.
async fn read_body(
    body: Incoming,
    from: ProxySide,
    failed: impl FnOnce(BoxError) -> ProxyError,
) -> Result<Bytes, ProxyError> {
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(ProxyError::Garbage {
            from,
            reason: GarbageReason::TooLarge { limit: MAX_BODY },
        }),
        Err(e) => Err(failed(e)),
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn json_type() -> HeaderValue {
    HeaderValue::from_static("application/json")
}

fn json(code: StatusCode, body: Bytes) -> Reply {
    let mut reply = Response::new(Full::new(body));
    *reply.status_mut() = code;
    reply
        .headers_mut()
        .insert(header::CONTENT_TYPE, json_type());
    reply
}

fn status(code: StatusCode) -> Reply {
    let mut reply = Response::new(Full::new(Bytes::new()));
    *reply.status_mut() = code;
    reply
}
