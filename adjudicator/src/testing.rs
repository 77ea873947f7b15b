//! The anvil harness for tests and benchmarks (feature `testing`).
//!
//! [`Anvil::spawn`] starts the pinned anvil (`tools/node_modules/.bin/anvil`
//! under the workspace root, or `$PERUN_ANVIL`) on a free 127.0.0.1 port with
//! instant mining, and kills it on drop. It never skips: without anvil it
//! fails with a message that says to run `cargo xtask setup`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use alloy::providers::{DynProvider, Provider, ProviderBuilder, WsConnect};
use alloy_primitives::{Address, Bytes, U256};
use perun_wallet::LocalAccount;

use crate::{Error, Result};

/// The chain id anvil runs with.
pub const CHAIN_ID: u64 = 31337;

/// A running anvil, killed on drop.
#[derive(Debug)]
pub struct Anvil {
    child: Child,
    port: u16,
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
        Ok(Self { child, port, admin })
    }

    /// The websocket endpoint.
    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
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
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| Error::Anvil(e.to_string()))?;
    Ok(l.local_addr()
        .map_err(|e| Error::Anvil(e.to_string()))?
        .port())
}
