//! The connection to the node: one provider, every call bounded by
//! `rpc_timeout` and its failure typed, and the provider rebuilt from the URL
//! once alloy's websocket service has given up on it.
//!
//! alloy's pubsub service reconnects a dropped websocket itself (a few times,
//! see [`RECONNECTS`]) and re-issues pending requests and subscriptions; after
//! that it stops for good and every call fails with "backend gone". [`Conn`]
//! notices that (and a closed block subscription, and a run of unanswered
//! calls) and builds a new provider on the next call, if it knows the URL and
//! the key ([`Conn::connect`]). A provider handed in ([`Conn::new`]) cannot
//! be rebuilt: its calls keep failing until its own reconnects succeed.
//!
//! [`Heads`] waits for block headers for the loops that follow the chain
//! (the transaction queue, the scanner, funding); it never fails: a broken
//! subscription is re-opened, and while there is none it polls.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use alloy::network::EthereumWallet;
use alloy::primitives::Bytes;
use alloy::providers::{DynProvider, Provider, ProviderBuilder, WsConnect};
use alloy::pubsub::Subscription;
use alloy::rpc::types::Header;
use alloy::transports::{RpcError, TransportErrorKind};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::{Error, Result, RpcFailure};

/// How often alloy's websocket service tries to reconnect before it gives
/// up (after which [`Conn`] builds a new provider on the next call).
pub(super) const RECONNECTS: u32 = 3;
/// alloy's first reconnect delay (it doubles per attempt).
const RECONNECT_INTERVAL: Duration = Duration::from_millis(500);
/// Unanswered calls in a row after which the connection counts as dead (a
/// socket that silently stopped carrying anything).
const STALLS: u32 = 3;
/// The longest a node's error message is kept (the node is not trusted).
const MAX_MESSAGE: usize = 500;

/// The provider of a backend, rebuilt when it died.
pub(super) struct Conn {
    slot: RwLock<Slot>,
    /// How to build a new provider; `None` for a provider handed in.
    source: Option<Source>,
    /// Held while a new provider is being built.
    rebuilding: tokio::sync::Mutex<()>,
    rpc_timeout: Duration,
    /// Unanswered calls in a row.
    stalls: AtomicU32,
    /// The chain id a rebuilt provider must serve (0: not known yet).
    chain_id: AtomicU64,
}

#[derive(Clone)]
struct Slot {
    provider: DynProvider,
    /// Counts rebuilds, so a failure seen on an old provider does not condemn a new one.
    generation: u64,
    dead: bool,
}

/// The URL and the key a provider is built from.
struct Source {
    url: String,
    wallet: EthereumWallet,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let slot = self.read();
        f.debug_struct("Conn")
            .field("url", &self.source.as_ref().map(|s| &s.url))
            .field("generation", &slot.generation)
            .field("dead", &slot.dead)
            .field("rpc_timeout", &self.rpc_timeout)
            .finish()
    }
}

/// Builds a websocket provider that signs with `wallet` (for contract
/// deployment and tests; the backends sign through their transaction queue).
pub(super) async fn build(
    url: &str,
    wallet: EthereumWallet,
) -> std::result::Result<DynProvider, RpcError<TransportErrorKind>> {
    let ws = WsConnect::new(url)
        .with_max_retries(RECONNECTS)
        .with_retry_interval(RECONNECT_INTERVAL);
    let provider = ProviderBuilder::new()
        .disable_recommended_fillers()
        .with_gas_estimation()
        .with_simple_nonce_management()
        .fetch_chain_id()
        .wallet(wallet)
        .connect_ws(ws)
        .await?;
    Ok(provider.erased())
}

impl Conn {
    /// A connection over a provider handed in: it cannot be rebuilt.
    pub(super) fn new(provider: DynProvider, rpc_timeout: Duration) -> Self {
        Self::with(provider, None, rpc_timeout)
    }

    /// Connects to `url`; the provider is rebuilt from it when it dies.
    pub(super) async fn connect(
        url: &str,
        wallet: EthereumWallet,
        rpc_timeout: Duration,
    ) -> Result<Self> {
        let provider = tokio::time::timeout(rpc_timeout, build(url, wallet.clone()))
            .await
            .map_err(|_| Error::rpc("connect", RpcFailure::Timeout(rpc_timeout)))?
            .map_err(|e| Error::rpc("connect", classify(e).0))?;
        let source = Source {
            url: url.to_owned(),
            wallet,
        };
        Ok(Self::with(provider, Some(source), rpc_timeout))
    }

    fn with(provider: DynProvider, source: Option<Source>, rpc_timeout: Duration) -> Self {
        Self {
            slot: RwLock::new(Slot {
                provider,
                generation: 0,
                dead: false,
            }),
            source,
            rebuilding: tokio::sync::Mutex::new(()),
            rpc_timeout,
            stalls: AtomicU32::new(0),
            chain_id: AtomicU64::new(0),
        }
    }

    fn read(&self) -> Slot {
        // A slot is replaced in one assignment; a panic cannot leave it torn.
        self.slot
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The key transactions are signed with, if this connection has it.
    pub(super) fn wallet(&self) -> Option<&EthereumWallet> {
        self.source.as_ref().map(|s| &s.wallet)
    }

    /// Remembers the chain id a rebuilt provider must serve.
    pub(super) fn set_chain_id(&self, id: u64) {
        self.chain_id.store(id, Ordering::Relaxed);
    }

    /// Which provider is current (a new subscription is due when it changes).
    pub(super) fn generation(&self) -> u64 {
        self.read().generation
    }

    /// Marks the provider of `generation` dead: the next call builds a new one.
    pub(super) fn mark_dead(&self, generation: u64) {
        let mut slot = self.slot.write().unwrap_or_else(PoisonError::into_inner);
        if slot.generation == generation && !slot.dead {
            slot.dead = true;
            if self.source.is_some() {
                warn!(
                    generation,
                    "connection to the node lost; reconnecting on the next call"
                );
            } else {
                warn!(
                    generation,
                    "connection to the node lost; a provider handed in cannot be rebuilt"
                );
            }
        }
    }

    /// The current provider and its generation, building a new one first if it died.
    async fn provider(&self, op: &'static str) -> Result<(DynProvider, u64)> {
        let slot = self.read();
        let Some(source) = self.source.as_ref().filter(|_| slot.dead) else {
            return Ok((slot.provider, slot.generation));
        };
        let _building = self.rebuilding.lock().await;
        let slot = self.read();
        if !slot.dead {
            return Ok((slot.provider, slot.generation));
        }
        let built = tokio::time::timeout(self.rpc_timeout, async {
            let provider = build(&source.url, source.wallet.clone()).await?;
            let chain_id = provider.get_chain_id().await?;
            Ok::<_, RpcError<TransportErrorKind>>((provider, chain_id))
        })
        .await;
        let (provider, chain_id) = match built {
            Ok(Ok(built)) => built,
            Ok(Err(e)) => {
                let (failure, _) = classify(e);
                warn!(op, %failure, url = %source.url, "reconnecting failed");
                return Err(Error::rpc(op, failure));
            }
            Err(_) => {
                warn!(op, url = %source.url, "reconnecting timed out");
                return Err(Error::rpc(op, RpcFailure::Timeout(self.rpc_timeout)));
            }
        };
        let expected = self.chain_id.load(Ordering::Relaxed);
        if expected != 0 && chain_id != expected {
            warn!(expected, got = chain_id, url = %source.url, "the endpoint serves another chain now");
            return Err(Error::rpc(
                op,
                RpcFailure::WrongChain {
                    expected,
                    got: chain_id,
                },
            ));
        }
        let generation = slot.generation.wrapping_add(1);
        *self.slot.write().unwrap_or_else(PoisonError::into_inner) = Slot {
            provider: provider.clone(),
            generation,
            dead: false,
        };
        self.stalls.store(0, Ordering::Relaxed);
        info!(generation, url = %source.url, "reconnected to the node");
        Ok((provider, generation))
    }

    /// Runs one call against the node within `rpc_timeout`, keeping a revert's data apart.
    pub(super) async fn try_rpc<T, E, Fut>(
        &self,
        op: &'static str,
        call: impl FnOnce(DynProvider) -> Fut,
    ) -> std::result::Result<T, Fault>
    where
        Fut: Future<Output = std::result::Result<T, E>>,
        E: IntoFault,
    {
        let (provider, generation) = self.provider(op).await.map_err(|e| match e {
            Error::Rpc { source, .. } => Fault::Rpc(source),
            _ => Fault::Rpc(RpcFailure::Disconnected),
        })?;
        match tokio::time::timeout(self.rpc_timeout, call(provider)).await {
            Ok(Ok(v)) => {
                self.stalls.store(0, Ordering::Relaxed);
                Ok(v)
            }
            Ok(Err(e)) => {
                self.stalls.store(0, Ordering::Relaxed);
                let (fault, gone) = e.into_fault();
                if gone {
                    self.mark_dead(generation);
                }
                if let Fault::Rpc(failure) = &fault {
                    warn!(op, %failure, "call to the node failed");
                }
                Err(fault)
            }
            Err(_) => {
                warn!(op, timeout = ?self.rpc_timeout, "the node did not answer");
                if self.stalls.fetch_add(1, Ordering::Relaxed) + 1 >= STALLS {
                    self.mark_dead(generation);
                }
                Err(Fault::Rpc(RpcFailure::Timeout(self.rpc_timeout)))
            }
        }
    }

    /// Runs one call against the node within `rpc_timeout`; a revert becomes its decoded error.
    pub(super) async fn rpc<T, E, Fut>(
        &self,
        op: &'static str,
        call: impl FnOnce(DynProvider) -> Fut,
    ) -> Result<T>
    where
        Fut: Future<Output = std::result::Result<T, E>>,
        E: IntoFault,
    {
        self.try_rpc(op, call)
            .await
            .map_err(|f| f.into_error(op, None))
    }
}

/// Why a call failed: the node or the connection, or the call reverted.
#[derive(Debug, Clone)]
pub(super) enum Fault {
    /// No verdict of the contracts.
    Rpc(RpcFailure),
    /// The call reverted with this data (empty if the node gave none).
    Revert(Bytes),
}

impl Fault {
    /// The crate error for a failure of `op` (`tx`: the mined transaction, if any).
    pub(super) fn into_error(self, op: &'static str, tx: Option<alloy::primitives::B256>) -> Error {
        match self {
            Fault::Rpc(failure) => Error::rpc(op, failure),
            Fault::Revert(data) => super::revert::decode(op, tx, &data),
        }
    }
}

/// A call's error as a [`Fault`], and whether it says the provider is gone for good.
pub(super) trait IntoFault {
    /// The fault and whether the provider must be rebuilt.
    fn into_fault(self) -> (Fault, bool);
}

impl IntoFault for RpcError<TransportErrorKind> {
    fn into_fault(self) -> (Fault, bool) {
        if let Some(resp) = self.as_error_resp() {
            if let Some(data) = resp.as_revert_data() {
                return (Fault::Revert(data), false);
            }
            if resp.message.contains("execution reverted") {
                return (Fault::Revert(Bytes::new()), false);
            }
        }
        let (failure, gone) = classify(self);
        (Fault::Rpc(failure), gone)
    }
}

impl IntoFault for alloy::contract::Error {
    fn into_fault(self) -> (Fault, bool) {
        use alloy::contract::Error as C;
        match self {
            C::TransportError(e) => e.into_fault(),
            other => (Fault::Rpc(RpcFailure::Decode(Arc::new(other))), false),
        }
    }
}

/// Types a transport error; `true` if the provider is gone for good.
pub(super) fn classify(e: RpcError<TransportErrorKind>) -> (RpcFailure, bool) {
    match e {
        RpcError::ErrorResp(p) => {
            let mut message = p.message.to_string();
            if message.len() > MAX_MESSAGE {
                let mut end = MAX_MESSAGE;
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                message.truncate(end);
            }
            (
                RpcFailure::Node {
                    code: p.code,
                    message,
                },
                false,
            )
        }
        RpcError::Transport(k) if k.is_backend_gone() => (RpcFailure::Disconnected, true),
        RpcError::Transport(TransportErrorKind::PubsubUnavailable) => {
            (RpcFailure::Disconnected, true)
        }
        RpcError::Transport(k) => (RpcFailure::Transport(Arc::new(k)), false),
        RpcError::NullResp => (RpcFailure::Missing("a result (null answer)"), false),
        e @ (RpcError::DeserError { .. } | RpcError::SerError(_)) => {
            (RpcFailure::Decode(Arc::new(e)), false)
        }
        e => (RpcFailure::Transport(Arc::new(e)), false),
    }
}

/// Capped exponential backoff for loops that retry a failing step.
#[derive(Debug)]
pub(super) struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `min`, doubles up to `max`.
    pub(super) fn new(min: Duration, max: Duration) -> Self {
        Self {
            next: min,
            min,
            max,
        }
    }

    /// The delay before the next attempt (and doubles the one after).
    pub(super) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// After a success: the next failure waits `min` again.
    pub(super) fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Waits for new blocks for a loop that follows the chain, and never fails:
/// a closed subscription is re-opened (on a rebuilt provider if need be), and
/// without one, or when no header comes for `poll`, it returns anyway so the
/// caller polls the chain.
#[derive(Debug)]
pub(super) struct Heads {
    conn: Arc<Conn>,
    sub: Option<(Subscription<Header>, u64)>,
    poll: Duration,
    /// When to try subscribing again after a failure.
    retry_at: Option<Instant>,
    backoff: Backoff,
}

impl Heads {
    /// Headers of `conn`'s node; returns at least every `poll`.
    pub(super) fn new(conn: Arc<Conn>, poll: Duration) -> Self {
        Self {
            conn,
            sub: None,
            poll,
            retry_at: None,
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(10)),
        }
    }

    /// Opens a block subscription on the current provider unless one is open,
    /// at most once per backoff period after a failure.
    pub(super) async fn ensure(&mut self) {
        let generation = self.conn.generation();
        if self.sub.as_ref().is_some_and(|(_, g)| *g == generation) {
            return;
        }
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let sub = self
            .conn
            .try_rpc(
                "eth_subscribe",
                |p| async move { p.subscribe_blocks().await },
            )
            .await;
        match sub {
            Ok(sub) => {
                debug!("block subscription open");
                // The generation the subscription was opened on (it may have moved during the call).
                self.sub = Some((sub, self.conn.generation()));
                self.retry_at = None;
                self.backoff.reset();
            }
            Err(fault) => {
                let delay = self.backoff.next_delay();
                warn!(
                    ?fault,
                    ?delay,
                    "block subscription failed; polling meanwhile"
                );
                self.sub = None;
                self.retry_at = Some(Instant::now() + delay);
            }
        }
    }

    /// Waits for the next header, at most `poll`. Cancel-safe.
    pub(super) async fn recv(&mut self) {
        let Some((sub, generation)) = &mut self.sub else {
            tokio::time::sleep(self.poll).await;
            return;
        };
        match tokio::time::timeout(self.poll, sub.recv()).await {
            Ok(Ok(_)) => {}
            // Missed headers do not matter: the caller re-reads the chain.
            Ok(Err(RecvError::Lagged(n))) => debug!(n, "block subscription lagged"),
            Ok(Err(RecvError::Closed)) => {
                warn!("block subscription closed; re-subscribing");
                self.conn.mark_dead(*generation);
                self.sub = None;
            }
            Err(_) => debug!(poll = ?self.poll, "no block header; polling the chain"),
        }
    }

    /// [`ensure`](Self::ensure), then [`recv`](Self::recv).
    pub(super) async fn next(&mut self) {
        self.ensure().await;
        self.recv().await;
    }
}

#[cfg(test)]
mod tests {
    use alloy_json_rpc::ErrorPayload;

    use super::*;

    #[test]
    fn node_errors_keep_code_and_message_and_reverts_their_data() {
        let refused = RpcError::<TransportErrorKind>::ErrorResp(ErrorPayload {
            code: -32003,
            message: "nonce too low".into(),
            data: None,
        });
        match refused.into_fault() {
            (Fault::Rpc(RpcFailure::Node { code, message }), false) => {
                assert_eq!((code, message.as_str()), (-32003, "nonce too low"));
            }
            other => panic!("{other:?}"),
        }
        let long = RpcError::<TransportErrorKind>::ErrorResp(ErrorPayload {
            code: 1,
            message: "é".repeat(MAX_MESSAGE).into(),
            data: None,
        });
        match long.into_fault() {
            (Fault::Rpc(RpcFailure::Node { message, .. }), _) => {
                assert!(message.len() <= MAX_MESSAGE);
            }
            other => panic!("{other:?}"),
        }
        let reverted = RpcError::<TransportErrorKind>::ErrorResp(ErrorPayload {
            code: 3,
            message: "execution reverted".into(),
            data: Some(serde_json::value::to_raw_value("0x12345678").unwrap()),
        });
        match reverted.into_fault() {
            (Fault::Revert(data), false) => assert_eq!(data.to_string(), "0x12345678"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_gone_backend_asks_for_a_new_provider() {
        let gone = RpcError::<TransportErrorKind>::Transport(TransportErrorKind::BackendGone);
        assert!(matches!(
            gone.into_fault(),
            (Fault::Rpc(RpcFailure::Disconnected), true)
        ));
    }
}
