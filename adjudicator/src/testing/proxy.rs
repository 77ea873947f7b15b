//! [`RpcProxy`]: a JSON-RPC proxy on 127.0.0.1 in front of a node that
//! loses, fails, delays and disconnects traffic on a seeded schedule, for
//! chaos tests of whatever talks to the node (the Ethereum backend, alloy).
//!
//! Like anvil it serves HTTP (POST, single and batch) and websocket on one
//! port. Every client connection gets its own upstream connection, so a
//! disconnect kills exactly that client's subscriptions.
//!
//! # The schedule
//! A *message* is one websocket text frame or one HTTP request body (a batch
//! is one message). Requests, responses and notifications are numbered in
//! the order they reach the proxy, each kind on its own counter shared by all
//! connections, and the fault for the n-th one is a pure function of the
//! seed and n ([`ProxyFaults::request_plan`] and its siblings): the same
//! seed gives the same plan. Concurrent traffic can reach the counters in
//! another order from run to run, so only sequential traffic replays
//! exactly.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hyper::Uri;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use self::message::RpcRequest;
use super::schedule::{delay, draw, hits};
use crate::Result;
use crate::error::ProxyError;

mod http;
mod message;
mod ws;

/// Fault rates of an [`RpcProxy`]; each rate is a probability in `0.0..=1.0`
/// (values outside act as the nearest bound). All zero: transparent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProxyFaults {
    /// Seeds the schedule: the same seed gives the same plan.
    pub seed: u64,
    /// A request is swallowed: not forwarded, never answered. Over HTTP the
    /// connection is closed without a response.
    pub drop: f64,
    /// A request is not forwarded but answered with a JSON-RPC error carrying
    /// its id: -32005 "limit exceeded" or -32603 "internal error", half each.
    pub error: f64,
    /// A request, or a response, is held for up to `max_delay`.
    pub delay: f64,
    /// A request reaches the node, but its response is lost (the call took
    /// effect, the caller never learns). Over HTTP the connection is closed.
    pub response_drop: f64,
    /// Instead of forwarding a request the proxy closes the client's
    /// connection, which over websocket ends all its subscriptions.
    pub disconnect: f64,
    /// A subscription notification is lost.
    pub notification_drop: f64,
    /// A notification is delivered twice.
    pub notification_duplicate: f64,
    /// A notification is held for up to `max_delay`; later notifications of
    /// the connection wait behind it (they keep their order).
    pub notification_delay: f64,
    /// The longest injected delay.
    pub max_delay: Duration,
}

impl ProxyFaults {
    /// No faults: the proxy is transparent.
    pub fn none(seed: u64) -> Self {
        Self {
            seed,
            drop: 0.0,
            error: 0.0,
            delay: 0.0,
            response_drop: 0.0,
            disconnect: 0.0,
            notification_drop: 0.0,
            notification_duplicate: 0.0,
            notification_delay: 0.0,
            max_delay: Duration::ZERO,
        }
    }

    /// A flaky node, for chaos runs: of the requests 2 % are lost, 5 %
    /// answered with an error, 10 % delayed (and 10 % of responses), 2 % lose
    /// their response and 1 % cut the connection; of the notifications 5 %
    /// are lost, 5 % repeated and 10 % delayed; delays up to 200 ms.
    pub fn chaos(seed: u64) -> Self {
        Self {
            seed,
            drop: 0.02,
            error: 0.05,
            delay: 0.10,
            response_drop: 0.02,
            disconnect: 0.01,
            notification_drop: 0.05,
            notification_duplicate: 0.05,
            notification_delay: 0.10,
            max_delay: Duration::from_millis(200),
        }
    }

    /// The fault for the `n`-th request message (0-based). One draw picks at
    /// most one fault, in the order disconnect, drop, error, delay, so each
    /// happens at exactly its rate while the rates sum to at most 1.
    pub fn request_plan(&self, n: u64) -> RequestFault {
        let (u, extra) = self.draws(REQUESTS, n);
        match pick(u, [self.disconnect, self.drop, self.error, self.delay]) {
            Some(0) => RequestFault::Disconnect,
            Some(1) => RequestFault::Drop,
            Some(2) if extra < 0.5 => RequestFault::Error(LIMIT_EXCEEDED),
            Some(2) => RequestFault::Error(INTERNAL_ERROR),
            Some(_) => RequestFault::Delay(delay(self.max_delay, extra)),
            None => RequestFault::Forward,
        }
    }

    /// The fault for the `n`-th response message from the node (drop, then delay).
    pub fn response_plan(&self, n: u64) -> ResponseFault {
        let (u, extra) = self.draws(RESPONSES, n);
        match pick(u, [self.response_drop, self.delay]) {
            Some(0) => ResponseFault::Drop,
            Some(_) => ResponseFault::Delay(delay(self.max_delay, extra)),
            None => ResponseFault::Forward,
        }
    }

    /// The fault for the `n`-th notification from the node (drop, duplicate, delay).
    pub fn notification_plan(&self, n: u64) -> NotificationFault {
        let (u, extra) = self.draws(NOTIFICATIONS, n);
        let rates = [
            self.notification_drop,
            self.notification_duplicate,
            self.notification_delay,
        ];
        match pick(u, rates) {
            Some(0) => NotificationFault::Drop,
            Some(1) => NotificationFault::Duplicate,
            Some(_) => NotificationFault::Delay(delay(self.max_delay, extra)),
            None => NotificationFault::Forward,
        }
    }

    /// The draw that picks the fault and the one that sizes it.
    fn draws(&self, lane: u64, n: u64) -> (f64, f64) {
        (
            draw(self.seed, &[lane, n, 0]),
            draw(self.seed, &[lane, n, 1]),
        )
    }
}

/// Schedule lanes, so the three kinds of message never share a draw.
const REQUESTS: u64 = 11;
const RESPONSES: u64 = 12;
const NOTIFICATIONS: u64 = 13;

/// The JSON-RPC error codes the proxy answers with.
const LIMIT_EXCEEDED: i64 = -32005;
const INTERNAL_ERROR: i64 = -32603;

/// Which of consecutive ranges of widths `rates` the draw `u` falls in.
fn pick<const N: usize>(mut u: f64, rates: [f64; N]) -> Option<usize> {
    for (i, rate) in rates.into_iter().enumerate() {
        if hits(rate, u) {
            return Some(i);
        }
        u -= rate.max(0.0);
    }
    None
}

/// What the schedule does to a request ([`ProxyFaults::request_plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFault {
    /// Forward it.
    Forward,
    /// Swallow it (HTTP: close the connection without a response).
    Drop,
    /// Answer it with this JSON-RPC error code.
    Error(i64),
    /// Forward it after this long.
    Delay(Duration),
    /// Close the client's connection instead.
    Disconnect,
}

/// What the schedule does to a response ([`ProxyFaults::response_plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFault {
    /// Forward it.
    Forward,
    /// Lose it (HTTP: close the connection without a response).
    Drop,
    /// Forward it after this long.
    Delay(Duration),
}

/// What the schedule does to a notification ([`ProxyFaults::notification_plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotificationFault {
    /// Forward it.
    Forward,
    /// Lose it.
    Drop,
    /// Forward it twice.
    Duplicate,
    /// Forward it after this long (later ones wait behind it).
    Delay(Duration),
}

/// What an [`RpcProxy`] passed on and what it injected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Client connections accepted (HTTP and websocket).
    pub connections: u64,
    /// Websocket sessions opened (each with its own upstream websocket).
    pub websockets: u64,
    /// Request messages forwarded to the node.
    pub requests: u64,
    /// Response messages forwarded to clients.
    pub responses: u64,
    /// Notifications forwarded to clients (a duplicate counts twice).
    pub notifications: u64,
    /// Requests swallowed.
    pub dropped: u64,
    /// Requests answered with an injected error.
    pub errors: u64,
    /// Requests and responses delayed.
    pub delayed: u64,
    /// Responses lost.
    pub responses_dropped: u64,
    /// Connections closed by an injected disconnect.
    pub disconnects: u64,
    /// Notifications lost.
    pub notifications_dropped: u64,
    /// Notifications repeated.
    pub notifications_duplicated: u64,
    /// Notifications delayed.
    pub notifications_delayed: u64,
    /// Requests refused because of [`RpcProxy::block_method`] (a manual
    /// control, not counted as an injected fault).
    pub blocked: u64,
    /// Requests answered `null` because of [`RpcProxy::answer_null`] (a
    /// manual control, not counted as an injected fault).
    pub nulled: u64,
    /// Connections closed because a client or the node sent garbage.
    pub garbage: u64,
}

impl ProxyStats {
    /// All faults the schedule injected.
    pub fn faults_injected(&self) -> u64 {
        self.dropped
            + self.errors
            + self.delayed
            + self.responses_dropped
            + self.disconnects
            + self.notifications_dropped
            + self.notifications_duplicated
            + self.notifications_delayed
    }
}

/// The live counters behind [`ProxyStats`].
#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    websockets: AtomicU64,
    requests: AtomicU64,
    responses: AtomicU64,
    notifications: AtomicU64,
    dropped: AtomicU64,
    errors: AtomicU64,
    delayed: AtomicU64,
    responses_dropped: AtomicU64,
    disconnects: AtomicU64,
    notifications_dropped: AtomicU64,
    notifications_duplicated: AtomicU64,
    notifications_delayed: AtomicU64,
    blocked: AtomicU64,
    nulled: AtomicU64,
    garbage: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> ProxyStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ProxyStats {
            connections: get(&self.connections),
            websockets: get(&self.websockets),
            requests: get(&self.requests),
            responses: get(&self.responses),
            notifications: get(&self.notifications),
            dropped: get(&self.dropped),
            errors: get(&self.errors),
            delayed: get(&self.delayed),
            responses_dropped: get(&self.responses_dropped),
            disconnects: get(&self.disconnects),
            notifications_dropped: get(&self.notifications_dropped),
            notifications_duplicated: get(&self.notifications_duplicated),
            notifications_delayed: get(&self.notifications_delayed),
            blocked: get(&self.blocked),
            nulled: get(&self.nulled),
            garbage: get(&self.garbage),
        }
    }
}

/// What to do with a request: its planned fault, refuse a blocked method,
/// or answer `null` for a hidden one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestAction {
    Planned(RequestFault),
    Blocked,
    /// Answered `null`, not forwarded ([`RpcProxy::answer_null`]).
    Null,
}

/// The error answer to a request for a blocked method.
const BLOCKED: (i64, &str) = (INTERNAL_ERROR, "method blocked by the fault proxy");

/// The message of an injected error code.
fn error_message(code: i64) -> &'static str {
    if code == LIMIT_EXCEEDED {
        "limit exceeded"
    } else {
        "internal error"
    }
}

/// Where the node is.
#[derive(Debug)]
struct Upstream {
    ws_url: String,
    /// `host:port`, to connect to and for the `Host` header.
    authority: String,
    /// Path and query of the URL (`/` if none), for HTTP requests.
    path: String,
}

impl Upstream {
    fn parse(ws_url: &str) -> Result<Self, ProxyError> {
        let bad = || ProxyError::UpstreamUrl(ws_url.to_owned());
        let uri: Uri = ws_url.parse().map_err(|_| bad())?;
        if uri.scheme_str() != Some("ws") {
            return Err(bad());
        }
        let host = uri.host().ok_or_else(bad)?;
        let port = uri.port_u16().unwrap_or(80);
        let path = uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
        Ok(Self {
            ws_url: ws_url.to_owned(),
            authority: format!("{host}:{port}"),
            path: if path.is_empty() {
                "/".to_owned()
            } else {
                path
            },
        })
    }

    fn error(&self, source: impl std::error::Error + Send + Sync + 'static) -> ProxyError {
        ProxyError::Upstream {
            url: self.ws_url.clone(),
            source: Arc::new(source),
        }
    }
}

/// What the proxy's tasks share.
#[derive(Debug)]
struct Shared {
    upstream: Upstream,
    faults: Mutex<ProxyFaults>,
    blocked: Mutex<HashSet<String>>,
    /// Methods answered `null` ([`RpcProxy::answer_null`]).
    nulled: Mutex<HashSet<String>>,
    /// `true` while everything is held ([`RpcProxy::stall`]).
    stall: watch::Sender<bool>,
    next_request: AtomicU64,
    next_response: AtomicU64,
    next_notification: AtomicU64,
    stats: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a plain read or write: nothing is left half-done.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn faults(&self) -> ProxyFaults {
        *lock(&self.faults)
    }

    /// Takes the next request number and decides, counting the fault.
    fn request(&self, req: &RpcRequest) -> RequestAction {
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        let calls = |set: &Mutex<HashSet<String>>| {
            let set = lock(set);
            req.methods().any(|m| set.contains(m))
        };
        if calls(&self.blocked) {
            bump(&self.stats.blocked);
            debug!(n, "request for a blocked method");
            return RequestAction::Blocked;
        }
        if calls(&self.nulled) {
            bump(&self.stats.nulled);
            debug!(n, "request for a method answered null");
            return RequestAction::Null;
        }
        let fault = self.faults().request_plan(n);
        let s = &self.stats;
        match fault {
            RequestFault::Forward => {}
            RequestFault::Drop => bump(&s.dropped),
            RequestFault::Error(_) => bump(&s.errors),
            RequestFault::Delay(_) => bump(&s.delayed),
            RequestFault::Disconnect => bump(&s.disconnects),
        }
        if fault != RequestFault::Forward {
            debug!(n, ?fault, "injected request fault");
        }
        RequestAction::Planned(fault)
    }

    /// Takes the next response number and decides, counting the fault.
    fn response(&self) -> ResponseFault {
        let n = self.next_response.fetch_add(1, Ordering::Relaxed);
        let fault = self.faults().response_plan(n);
        match fault {
            ResponseFault::Forward => {}
            ResponseFault::Drop => bump(&self.stats.responses_dropped),
            ResponseFault::Delay(_) => bump(&self.stats.delayed),
        }
        if fault != ResponseFault::Forward {
            debug!(n, ?fault, "injected response fault");
        }
        fault
    }

    /// Takes the next notification number and decides, counting the fault.
    fn notification(&self) -> NotificationFault {
        let n = self.next_notification.fetch_add(1, Ordering::Relaxed);
        let fault = self.faults().notification_plan(n);
        let s = &self.stats;
        match fault {
            NotificationFault::Forward => {}
            NotificationFault::Drop => bump(&s.notifications_dropped),
            NotificationFault::Duplicate => bump(&s.notifications_duplicated),
            NotificationFault::Delay(_) => bump(&s.notifications_delayed),
        }
        if fault != NotificationFault::Forward {
            debug!(n, ?fault, "injected notification fault");
        }
        fault
    }

    /// Waits while the proxy is stalled.
    async fn unstalled(&self) {
        let mut rx = self.stall.subscribe();
        // The sender lives in `self`: this cannot fail.
        let _ = rx.wait_for(|stalled| !stalled).await;
    }

    /// Says why a connection is closed, counting garbage. A client that
    /// just goes away (a reset, no closing handshake) is no news.
    fn closing(&self, e: &ProxyError) {
        match e {
            ProxyError::Client(_) => debug!(%e, "closing a proxied connection"),
            ProxyError::Garbage { .. } => {
                bump(&self.stats.garbage);
                warn!(%e, "closing a proxied connection");
            }
            _ => warn!(%e, "closing a proxied connection"),
        }
    }
}

/// A JSON-RPC fault proxy on 127.0.0.1 in front of a node (see the module
/// docs for the schedule). Starts transparent; dropping it closes every
/// connection.
#[derive(Debug)]
pub struct RpcProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Bumped by [`disconnect_all`](Self::disconnect_all); dropped with the
    /// proxy, which ends every connection.
    kill: watch::Sender<u64>,
    accept: JoinHandle<()>,
}

impl RpcProxy {
    /// Listens on a free 127.0.0.1 port, in front of the node at
    /// `upstream_ws_url` (`ws://host:port[/path]`; its HTTP endpoint is taken
    /// to be the same address). Connects upstream per client, on demand.
    pub async fn start(upstream_ws_url: &str) -> Result<Self> {
        let upstream = Upstream::parse(upstream_ws_url)?;
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| ProxyError::Listen(Arc::new(e)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| ProxyError::Listen(Arc::new(e)))?;
        let shared = Arc::new(Shared {
            upstream,
            faults: Mutex::new(ProxyFaults::none(0)),
            blocked: Mutex::new(HashSet::new()),
            nulled: Mutex::new(HashSet::new()),
            stall: watch::Sender::new(false),
            next_request: AtomicU64::new(0),
            next_response: AtomicU64::new(0),
            next_notification: AtomicU64::new(0),
            stats: Counters::default(),
        });
        let kill = watch::Sender::new(0);
        let accept = tokio::spawn(accept(listener, shared.clone(), kill.subscribe()));
        debug!(%addr, upstream = upstream_ws_url, "fault proxy listening");
        Ok(Self {
            addr,
            shared,
            kill,
            accept,
        })
    }

    /// The proxy's websocket endpoint.
    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// The proxy's HTTP endpoint (the same port).
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address the proxy listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the fault rates (and seed) for the messages that follow; the
    /// message counters keep running.
    pub fn set_faults(&self, faults: ProxyFaults) {
        *lock(&self.shared.faults) = faults;
    }

    /// The current fault rates.
    pub fn faults(&self) -> ProxyFaults {
        self.shared.faults()
    }

    /// Closes every client connection now (websockets without a closing
    /// handshake, as a dropped link would), ending their subscriptions. New
    /// connections are accepted as before.
    pub fn disconnect_all(&self) {
        debug!("disconnecting every client");
        self.kill.send_modify(|generation| *generation += 1);
    }

    /// While on, holds everything: requests are not forwarded and nothing is
    /// delivered to clients (answers, notifications, injected errors); off,
    /// what was held goes on in order.
    pub fn stall(&self, on: bool) {
        self.shared.stall.send_replace(on);
    }

    /// Refuses (`on`) or again forwards requests for `method`: a message that
    /// calls it is answered with a JSON-RPC error (-32603) and not forwarded
    /// (a batch is refused whole), e.g. to keep transactions from the node.
    pub fn block_method(&self, method: &str, on: bool) {
        let mut blocked = lock(&self.shared.blocked);
        if on {
            blocked.insert(method.to_owned());
        } else {
            blocked.remove(method);
        }
    }

    /// Answers (`on`) requests for `method` with `"result": null` instead
    /// of forwarding them, or forwards them again: a node that does not know
    /// something yet, e.g. a receipt that lags behind its block (a batch
    /// that calls it gets `null` for every call).
    pub fn answer_null(&self, method: &str, on: bool) {
        let mut nulled = lock(&self.shared.nulled);
        if on {
            nulled.insert(method.to_owned());
        } else {
            nulled.remove(method);
        }
    }

    /// What was forwarded and injected so far.
    pub fn stats(&self) -> ProxyStats {
        self.shared.stats.snapshot()
    }
}

impl Drop for RpcProxy {
    fn drop(&mut self) {
        // Dropping `kill` right after ends the connections.
        self.accept.abort();
    }
}

/// Accepts clients until the proxy is dropped.
async fn accept(listener: TcpListener, shared: Arc<Shared>, kill: watch::Receiver<u64>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                bump(&shared.stats.connections);
                debug!(%peer, "client connected");
                let mut kill = kill.clone();
                // Only disconnects from now on concern this connection.
                kill.borrow_and_update();
                tokio::spawn(http::serve(shared.clone(), stream, kill));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                warn!(%e, "fault proxy cannot accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn upstream_urls() {
        let u = Upstream::parse("ws://127.0.0.1:8545").unwrap();
        assert_eq!(
            (u.authority.as_str(), u.path.as_str()),
            ("127.0.0.1:8545", "/")
        );
        let u = Upstream::parse("ws://localhost/rpc?x=1").unwrap();
        assert_eq!(
            (u.authority.as_str(), u.path.as_str()),
            ("localhost:80", "/rpc?x=1")
        );
        for bad in [
            "http://127.0.0.1:1",
            "wss://a:1",
            "127.0.0.1:1",
            "ws://",
            "",
        ] {
            assert!(Upstream::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plans_hit_their_rates() {
        let f = ProxyFaults {
            drop: 0.1,
            error: 0.2,
            delay: 0.3,
            max_delay: Duration::from_millis(100),
            ..ProxyFaults::none(5)
        };
        let plans: Vec<_> = (0..10_000).map(|n| f.request_plan(n)).collect();
        let share = |pred: &dyn Fn(&RequestFault) -> bool| {
            plans.iter().filter(|p| pred(p)).count() as f64 / plans.len() as f64
        };
        assert!((share(&|p| *p == RequestFault::Drop) - 0.1).abs() < 0.02);
        assert!((share(&|p| matches!(p, RequestFault::Error(_))) - 0.2).abs() < 0.02);
        assert!((share(&|p| matches!(p, RequestFault::Delay(_))) - 0.3).abs() < 0.02);
        assert_eq!(share(&|p| *p == RequestFault::Disconnect), 0.0);
        assert!(plans.contains(&RequestFault::Error(LIMIT_EXCEEDED)));
        assert!(plans.contains(&RequestFault::Error(INTERNAL_ERROR)));
        assert!(plans.iter().all(|p| match p {
            RequestFault::Delay(d) => *d <= Duration::from_millis(100),
            _ => true,
        }));
        let none = ProxyFaults::none(5);
        assert!(
            (0..1_000).all(|n| none.request_plan(n) == RequestFault::Forward
                && none.response_plan(n) == ResponseFault::Forward
                && none.notification_plan(n) == NotificationFault::Forward)
        );
    }
}
