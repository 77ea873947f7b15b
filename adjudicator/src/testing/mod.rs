//! Test harnesses (feature `testing`): a local chain, a fault proxy in front
//! of it, and a fault-injecting wrapper around any backend.
//!
//! [`Anvil::spawn`] starts the pinned anvil (`tools/node_modules/.bin/anvil`
//! under the workspace root, or `$PERUN_ANVIL`) on a free 127.0.0.1 port with
//! instant mining, and kills it on drop; [`Anvil::attach`] drives a node the
//! test started itself. It never skips: without anvil it fails with a message
//! that says to run `cargo xtask setup`. Besides the clock it can reorganise
//! the chain (snapshot/revert, `anvil_reorg`), mine blocks in the background
//! ([`Miner`]) for confirmation depths, and put a [`Relay`] in front of
//! itself that a test cuts to lose the connection.
//!
//! For chaos tests:
//! - [`RpcProxy`] (`proxy`) sits between a backend and the node and drops,
//!   fails, delays and disconnects JSON-RPC traffic (HTTP and websocket).
//! - [`FaultyChain`] (`faults`) wraps any [`Adjudicator`](crate::Adjudicator)
//!   and [`Funder`](crate::Funder) and fails, repeats and delays calls and
//!   drops, repeats, reorders and ends event streams.
//!
//! Both follow a seeded schedule (`schedule`): the decision for the n-th
//! message or call is a pure function of the seed and n, so a failing seed
//! can be replayed.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use alloy::providers::{DynProvider, Provider, ProviderBuilder, WsConnect};
use alloy_primitives::{Address, B256, Bytes, U256};
use perun_wallet::LocalAccount;

use crate::{Error, Result};

mod faults;
mod proxy;
mod schedule;

pub use faults::{CallPlan, EventPlan, FaultConfig, FaultStats, FaultyChain};
pub use proxy::{
    NotificationFault, ProxyFaults, ProxyStats, RequestFault, ResponseFault, RpcProxy,
};

/// A fresh channel of `participants` settled by `adjudicator` on this chain (a random nonce, a
/// 60 s challenge period) holding nothing in one asset at `holder`, and its
/// version-0 state: what registration tests need (registering costs no
/// deposit).
pub fn empty_channel(
    adjudicator: Address,
    participants: Vec<Address>,
    holder: Address,
) -> (perun_channel::Params, perun_channel::State) {
    use perun_channel::{Allocation, Asset, Domain, Params, State};
    let n = participants.len();
    let domain = Domain {
        chain_id: U256::from(CHAIN_ID),
        adjudicator,
    };
    let params = Params::payment(
        domain,
        60,
        U256::from(rand_nonce()),
        participants,
        vec![vec![U256::ZERO; n]],
    );
    let asset = Asset {
        chainId: U256::from(CHAIN_ID),
        holder,
    };
    let state = State::initial(
        &params,
        Allocation::new(vec![asset], vec![vec![U256::ZERO; n]]),
    );
    (params, state)
}

/// A nonce that differs between calls (no RNG crate in the library).
fn rand_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// The chain id anvil runs with.
pub const CHAIN_ID: u64 = 31337;

/// A running anvil: spawned (killed on drop) or attached (left alone).
#[derive(Debug)]
pub struct Anvil {
    /// The process we started; `None` for an attached node.
    child: Option<Child>,
    ws_url: String,
    admin: DynProvider,
}

/// Where the pinned anvil lives: `$PERUN_ANVIL`, else `tools/node_modules/.bin/anvil`
/// under the workspace root.
pub fn anvil_path() -> PathBuf {
    if let Some(p) = std::env::var_os("PERUN_ANVIL") {
        return PathBuf::from(p);
    }
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(PathBuf::from)
        .unwrap_or(manifest)
        .join("tools/node_modules/.bin/anvil")
}

impl Anvil {
    /// Starts the pinned anvil ([`anvil_path`]) on a free 127.0.0.1 port and
    /// connects an admin provider to it.
    pub async fn spawn() -> Result<Self> {
        Self::spawn_at(anvil_path()).await
    }

    /// Starts the anvil binary at `path`.
    pub async fn spawn_at(path: PathBuf) -> Result<Self> {
        if !path.exists() {
            return Err(Error::Anvil(format!(
                "{} not found: run cargo xtask setup",
                path.display()
            )));
        }
        let mut last = String::new();
        // A port picked free can be taken before anvil binds it; try a few.
        for _ in 0..5 {
            let port = free_port()?;
            match Self::start(&path, port).await {
                Ok(anvil) => return Ok(anvil),
                Err(e) => last = e.to_string(),
            }
        }
        Err(Error::Anvil(last))
    }

    async fn start(path: &PathBuf, port: u16) -> Result<Self> {
        let mut child = Command::new(path)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--chain-id", &CHAIN_ID.to_string(), "--accounts", "1"])
            // Old block states are not written to ~/.foundry/anvil/tmp:
            // 100,000 mined blocks (the chain-index benchmark) would fill
            // the disk with them. Recent states stay in memory (reorgs).
            .args(["--max-persisted-states", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                Error::Anvil(format!(
                    "starting {}: {e} (run cargo xtask setup)",
                    path.display()
                ))
            })?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| Error::Anvil("no stdout".into()))?;
        let (tx, rx) = std_mpsc::channel();
        // Reads until anvil says it listens, then keeps draining so it never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut ready = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("Listening on")
                    && let Some(tx) = ready.take()
                {
                    let _ = tx.send(());
                }
            }
        });
        let ready = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
            .await
            .map_err(|e| Error::Anvil(e.to_string()))?;
        if ready.is_err() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Anvil(format!("anvil did not start on port {port}")));
        }
        let admin = ProviderBuilder::new()
            .connect_ws(WsConnect::new(format!("ws://127.0.0.1:{port}")))
            .await
            .map_err(|e| Error::Anvil(e.to_string()));
        let admin = match admin {
            Ok(p) => p.erased(),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        Ok(Self {
            child: Some(child),
            ws_url: format!("ws://127.0.0.1:{port}"),
            admin,
        })
    }

    /// Uses an anvil that is already running at `ws_url` (started by the
    /// test itself, or behind an [`RpcProxy`]): no process is spawned, and
    /// dropping the handle leaves the node running.
    pub async fn attach(ws_url: &str) -> Result<Self> {
        let admin = ProviderBuilder::new()
            .connect_ws(WsConnect::new(ws_url))
            .await
            .map_err(|e| Error::Anvil(format!("attaching to {ws_url}: {e}")))?
            .erased();
        Ok(Self {
            child: None,
            ws_url: ws_url.to_owned(),
            admin,
        })
    }

    /// The websocket endpoint.
    pub fn ws_url(&self) -> String {
        self.ws_url.clone()
    }

    /// The HTTP endpoint: anvil serves HTTP and websocket on one port.
    pub fn http_url(&self) -> String {
        http_url(&self.ws_url)
    }

    /// A TCP relay to this anvil: backends connected through
    /// [`Relay::ws_url`] lose their connection when the test cuts it.
    pub async fn relay(&self) -> Result<Relay> {
        let port = self
            .ws_url
            .rsplit(':')
            .next()
            .and_then(|rest| rest.split('/').next())
            .and_then(|p| p.parse::<u16>().ok())
            .ok_or_else(|| Error::Anvil(format!("no port in {}", self.ws_url)))?;
        Relay::start(port).await
    }

    /// A provider without a wallet, for reads and anvil's admin calls.
    pub fn admin(&self) -> &DynProvider {
        &self.admin
    }

    /// A provider that signs transactions with `account`'s key.
    pub async fn provider(&self, account: &LocalAccount) -> Result<DynProvider> {
        crate::eth::ws_provider(&self.ws_url(), account).await
    }

    /// A fresh random account holding 1,000,000 ether.
    pub async fn funded_account(&self) -> Result<LocalAccount> {
        let account = LocalAccount::random();
        self.set_balance(
            perun_wallet::Account::address(&account),
            U256::from(10).pow(U256::from(24)),
        )
        .await?;
        Ok(account)
    }

    /// An address's ether balance.
    pub async fn eth_balance(&self, who: Address) -> Result<U256> {
        self.admin
            .get_balance(who)
            .await
            .map_err(|e| Error::Anvil(e.to_string()))
    }

    /// An address's balance of an ERC20 token.
    pub async fn token_balance(&self, token: Address, who: Address) -> Result<U256> {
        crate::bindings::TestToken::new(token, self.admin.clone())
            .balanceOf(who)
            .call()
            .await
            .map_err(|e| Error::Anvil(e.to_string()))
    }

    /// Mints `amount` of the test token to `minter`, sending the transaction
    /// from `minter` (anyone may mint the test token).
    pub async fn mint_token(
        &self,
        token: Address,
        minter: &LocalAccount,
        amount: U256,
    ) -> Result<()> {
        let t = crate::bindings::TestToken::new(token, self.provider(minter).await?);
        let pending = t
            .mint(perun_wallet::Account::address(minter), amount)
            .send()
            .await
            .map_err(|e| Error::Anvil(format!("mint: {e}")))?;
        pending
            .get_receipt()
            .await
            .map_err(|e| Error::Anvil(format!("mint receipt: {e}")))?;
        Ok(())
    }

    /// Sets an address's ether balance.
    pub async fn set_balance(&self, who: Address, wei: U256) -> Result<()> {
        self.rpc("anvil_setBalance", serde_json::json!([who, wei]))
            .await
    }

    /// Puts code at an address (e.g. a reverting receiver at a participant's address).
    pub async fn set_code(&self, who: Address, code: Bytes) -> Result<()> {
        self.rpc("anvil_setCode", serde_json::json!([who, code]))
            .await
    }

    /// Moves the chain's clock forward and mines a block at the new time.
    pub async fn increase_time(&self, secs: u64) -> Result<()> {
        self.admin
            .raw_request::<_, serde_json::Value>("evm_increaseTime".into(), (secs,))
            .await
            .map_err(|e| Error::Anvil(e.to_string()))?;
        self.rpc("evm_mine", serde_json::json!([])).await
    }

    /// The latest block's timestamp.
    pub async fn now(&self) -> Result<u64> {
        let block = self
            .admin
            .get_block_by_number(alloy::eips::BlockNumberOrTag::Latest)
            .await
            .map_err(|e| Error::Anvil(e.to_string()))?
            .ok_or_else(|| Error::Anvil("no latest block".into()))?;
        Ok(block.header.timestamp)
    }

    /// The latest block's number.
    pub async fn block_number(&self) -> Result<u64> {
        self.admin
            .get_block_number()
            .await
            .map_err(|e| Error::Anvil(e.to_string()))
    }

    /// Mines `blocks` empty blocks (plus any pending transactions).
    pub async fn mine(&self, blocks: u64) -> Result<()> {
        for _ in 0..blocks {
            mine_one(&self.admin).await?;
        }
        Ok(())
    }

    /// Mines `blocks` empty blocks in one call (`anvil_mine`): long chains
    /// for scanning benchmarks.
    pub async fn mine_batch(&self, blocks: u64) -> Result<()> {
        if blocks == 0 {
            return Ok(());
        }
        self.rpc("anvil_mine", serde_json::json!([blocks])).await
    }

    /// Takes a snapshot of the chain to [`revert`](Self::revert) to.
    pub async fn snapshot(&self) -> Result<U256> {
        self.call("evm_snapshot", ()).await
    }

    /// Drops every block after the snapshot (their transactions are gone too).
    pub async fn revert(&self, snapshot: U256) -> Result<()> {
        let ok: bool = self.call("evm_revert", (snapshot,)).await?;
        if !ok {
            return Err(Error::Anvil(format!("no snapshot {snapshot}")));
        }
        Ok(())
    }

    /// A chain reorganisation (`anvil_reorg`): the newest `depth` blocks are
    /// replaced by as many empty ones, so the height stays and their
    /// transactions are dropped.
    pub async fn reorg(&self, depth: u64) -> Result<()> {
        self.rpc("anvil_reorg", serde_json::json!([depth, []]))
            .await
    }

    /// Turns mining on every transaction on or off; while off, transactions
    /// wait in the pool until [`mine`](Self::mine) (to line up races).
    pub async fn set_automine(&self, on: bool) -> Result<()> {
        self.rpc("evm_setAutomine", serde_json::json!([on])).await
    }

    /// How many transactions wait in the pool.
    pub async fn pending_transactions(&self) -> Result<u64> {
        let status: serde_json::Value = self.call("txpool_status", ()).await?;
        let pending = &status["pending"];
        pending
            .as_u64()
            .or_else(|| {
                let hex = pending.as_str()?.trim_start_matches("0x");
                u64::from_str_radix(hex, 16).ok()
            })
            .ok_or_else(|| Error::Anvil(format!("txpool_status: {status}")))
    }

    /// The hashes of the transactions waiting in the pool (pending and queued).
    pub async fn pool_hashes(&self) -> Result<Vec<B256>> {
        let content: serde_json::Value = self.call("txpool_content", ()).await?;
        let mut hashes = Vec::new();
        for part in ["pending", "queued"] {
            let senders = content[part].as_object().into_iter().flatten();
            for (_, txs) in senders {
                for (_, tx) in txs.as_object().into_iter().flatten() {
                    let hash = tx["hash"]
                        .as_str()
                        .and_then(|h| h.parse().ok())
                        .ok_or_else(|| Error::Anvil(format!("txpool_content: {tx}")))?;
                    hashes.push(hash);
                }
            }
        }
        Ok(hashes)
    }

    /// Removes a transaction from the pool (`anvil_dropTransaction`), as a
    /// node that evicts it would; whether it was there to remove. (Reading
    /// the pool afterwards cannot tell: its sender may have sent it again.)
    pub async fn drop_transaction(&self, tx: B256) -> Result<bool> {
        let removed: Option<B256> = self
            .call("anvil_dropTransaction", serde_json::json!([tx]))
            .await?;
        Ok(removed == Some(tx))
    }

    /// Sets the base fee of the next block (`anvil_setNextBlockBaseFeePerGas`):
    /// transactions offering less are not mined (anvil drops them from the pool).
    pub async fn set_next_base_fee(&self, wei: u128) -> Result<()> {
        self.rpc(
            "anvil_setNextBlockBaseFeePerGas",
            serde_json::json!([U256::from(wei)]),
        )
        .await
    }

    /// The latest block's base fee.
    pub async fn base_fee(&self) -> Result<u128> {
        let block = self
            .admin
            .get_block_by_number(alloy::eips::BlockNumberOrTag::Latest)
            .await
            .map_err(|e| Error::Anvil(e.to_string()))?
            .ok_or_else(|| Error::Anvil("no latest block".into()))?;
        block
            .header
            .base_fee_per_gas
            .map(u128::from)
            .ok_or_else(|| Error::Anvil("no base fee".into()))
    }

    /// Starts mining a block every `interval` in the background, as a live
    /// chain does, so that transactions gain confirmations (on the current
    /// tokio runtime; it stops when the [`Miner`] is dropped or anvil is gone).
    pub fn start_miner(&self, interval: Duration) -> Miner {
        let admin = self.admin.clone();
        let gate = Arc::new(tokio::sync::Mutex::new(()));
        let lock = gate.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                let _open = lock.lock().await;
                if let Err(e) = mine_one(&admin).await {
                    tracing::warn!(%e, "background miner stopped");
                    return;
                }
            }
        });
        Miner { gate, task }
    }

    /// Calls `method` on the node; its answer.
    async fn call<P, T>(&self, method: &'static str, params: P) -> Result<T>
    where
        P: alloy::rpc::json_rpc::RpcSend,
        T: alloy::rpc::json_rpc::RpcRecv,
    {
        self.admin
            .raw_request(method.into(), params)
            .await
            .map_err(|e| Error::Anvil(format!("{method}: {e}")))
    }

    /// Calls `method` on the node, for its effect.
    async fn rpc(&self, method: &'static str, params: serde_json::Value) -> Result<()> {
        self.call::<_, serde_json::Value>(method, params).await?;
        Ok(())
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The HTTP URL of the node behind a websocket URL (same host, port and path).
fn http_url(ws_url: &str) -> String {
    if let Some(rest) = ws_url.strip_prefix("ws://") {
        format!("http://{rest}")
    } else if let Some(rest) = ws_url.strip_prefix("wss://") {
        format!("https://{rest}")
    } else {
        ws_url.to_owned()
    }
}

async fn mine_one(admin: &DynProvider) -> Result<()> {
    admin
        .raw_request::<_, serde_json::Value>("evm_mine".into(), ())
        .await
        .map_err(|e| Error::Anvil(format!("evm_mine: {e}")))?;
    Ok(())
}

/// A background block producer ([`Anvil::start_miner`]); stops on drop.
#[derive(Debug)]
pub struct Miner {
    gate: Arc<tokio::sync::Mutex<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Miner {
    /// Stops the miner until the guard is dropped: while it is held the miner
    /// mines no block (transactions still mine theirs).
    pub async fn pause(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.gate.clone().lock_owned().await
    }
}

impl Drop for Miner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| Error::Anvil(e.to_string()))?;
    Ok(l.local_addr()
        .map_err(|e| Error::Anvil(e.to_string()))?
        .port())
}

/// Ends the transaction queue task of `sender` on `chain_id` as if it had
/// died (a panic); `false` if none runs. Callers waiting on it get
/// [`Error::Stopped`], and the next transaction starts a new task.
pub fn abort_tx_queue(chain_id: u64, sender: Address) -> bool {
    crate::eth::txqueue::abort(chain_id, sender)
}

/// A TCP relay in front of anvil that a test can cut ([`Anvil::relay`]):
/// [`cut`](Self::cut) closes every connection through it (a websocket
/// drop), [`refuse`](Self::refuse) closes new ones at once (a node that stays
/// away), [`stall`](Self::stall) stops carrying bytes without closing (a
/// node that stops answering). Stops when dropped.
#[derive(Debug)]
pub struct Relay {
    port: u16,
    state: Arc<RelayState>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct RelayState {
    refuse: std::sync::atomic::AtomicBool,
    stall: tokio::sync::watch::Sender<bool>,
    conns: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
    accepted: std::sync::atomic::AtomicUsize,
}

impl Relay {
    async fn start(target: u16) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Error::Anvil(format!("relay: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::Anvil(format!("relay: {e}")))?
            .port();
        let state = Arc::new(RelayState {
            refuse: false.into(),
            stall: tokio::sync::watch::Sender::new(false),
            conns: std::sync::Mutex::default(),
            accepted: 0.into(),
        });
        let st = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                st.accepted
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if st.refuse.load(std::sync::atomic::Ordering::Relaxed) {
                    drop(client);
                    continue;
                }
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let mut conns = st.conns.lock().unwrap_or_else(|p| p.into_inner());
                for (r, w) in [(cr, sw), (sr, cw)] {
                    let stall = st.stall.subscribe();
                    conns.push(tokio::spawn(pipe(r, w, stall)).abort_handle());
                }
            }
        });
        Ok(Self {
            port,
            state,
            accept,
        })
    }

    /// The websocket endpoint through the relay.
    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    /// Closes every connection through the relay.
    pub fn cut(&self) {
        let conns =
            std::mem::take(&mut *self.state.conns.lock().unwrap_or_else(|p| p.into_inner()));
        for c in conns {
            c.abort();
        }
    }

    /// While on, new connections are closed at once.
    pub fn refuse(&self, on: bool) {
        self.state
            .refuse
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// While on, no byte is carried either way; connections stay open.
    pub fn stall(&self, on: bool) {
        self.state.stall.send_replace(on);
    }

    /// How many connections the relay accepted so far (reconnects included).
    pub fn accepted(&self) -> usize {
        self.state
            .accepted
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Copies one direction of a relayed connection, holding bytes while stalled.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stall: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stall.wait_for(|s| !*s).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
