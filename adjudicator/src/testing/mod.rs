//! Test harnesses (feature `testing`): a local chain, a fault proxy in front
//! of it, and a fault-injecting wrapper around any backend.
//!
//! [`Anvil::spawn`] starts the pinned anvil (`tools/node_modules/.bin/anvil`
//! under the workspace root, or `$PERUN_ANVIL`) on a free 127.0.0.1 port with
//! instant mining, and kills it on drop; [`Anvil::attach`] drives a node the
//! test started itself. It never skips: without anvil it fails with a message
//! that says to run `cargo xtask setup`. Besides the clock it can reorganise
//! the chain (snapshot/revert, `anvil_reorg`) and mine blocks in the
//! background ([`Miner`]) for confirmation depths.
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
use alloy_primitives::{Address, Bytes, U256};
use perun_wallet::LocalAccount;

use crate::{Error, Result};

mod faults;
mod proxy;
mod schedule;

pub use faults::{CallPlan, EventPlan, FaultConfig, FaultStats, FaultyChain};
pub use proxy::{
    NotificationFault, ProxyFaults, ProxyStats, RequestFault, ResponseFault, RpcProxy,
};

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

    /// Takes a snapshot of the chain to [`revert`](Self::revert) to.
    pub async fn snapshot(&self) -> Result<U256> {
        self.admin
            .raw_request("evm_snapshot".into(), ())
            .await
            .map_err(|e| Error::Anvil(format!("evm_snapshot: {e}")))
    }

    /// Drops every block after the snapshot (their transactions are gone too).
    pub async fn revert(&self, snapshot: U256) -> Result<()> {
        let ok: bool = self
            .admin
            .raw_request("evm_revert".into(), (snapshot,))
            .await
            .map_err(|e| Error::Anvil(format!("evm_revert: {e}")))?;
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
        let status: serde_json::Value = self
            .admin
            .raw_request("txpool_status".into(), ())
            .await
            .map_err(|e| Error::Anvil(format!("txpool_status: {e}")))?;
        let pending = &status["pending"];
        pending
            .as_u64()
            .or_else(|| {
                let hex = pending.as_str()?.trim_start_matches("0x");
                u64::from_str_radix(hex, 16).ok()
            })
            .ok_or_else(|| Error::Anvil(format!("txpool_status: {status}")))
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

    async fn rpc(&self, method: &'static str, params: serde_json::Value) -> Result<()> {
        self.admin
            .raw_request::<_, serde_json::Value>(method.into(), params)
            .await
            .map_err(|e| Error::Anvil(format!("{method}: {e}")))?;
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
