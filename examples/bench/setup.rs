//! The local chain and pairs of clients on it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use perun::adjudicator::testing::{Anvil, CHAIN_ID};
use perun::adjudicator::{Deployment, EthAdjudicator, EthConfig, EthFunder, deploy};
use perun::channel::{Allocation, Asset, U256};
use perun::client::{
    AcceptAllForTesting, AcceptPaymentsToMe, Channel, ChannelProposal, Client, Participant,
};
use perun::persistence::{MemoryPersister, Persister, RedbPersister};

use crate::Res;

/// Each side's deposit per channel: 0.001 ETH, enough for a million 1-wei payments.
pub(crate) fn deposit() -> U256 {
    U256::from(10u64).pow(U256::from(15))
}

/// A local anvil with the contracts deployed.
pub(crate) struct Chain {
    pub(crate) anvil: Anvil,
    pub(crate) deployment: Deployment,
    pub(crate) config: EthConfig,
}

impl Chain {
    /// Starts anvil (instant mining) and deploys the contracts.
    pub(crate) async fn start() -> Res<Self> {
        let anvil = Anvil::spawn().await?;
        let deployer = anvil.funded_account().await?;
        let deployment = deploy(&anvil.provider(&deployer).await?).await?;
        let config = EthConfig::from_deployment(&deployment);
        Ok(Self {
            anvil,
            deployment,
            config,
        })
    }

    /// Ether, the asset every benchmark channel holds.
    pub(crate) fn asset(&self) -> Asset {
        eth_asset(&self.deployment)
    }
}

/// Ether held by `deployment`'s holder on anvil's chain.
pub(crate) fn eth_asset(deployment: &Deployment) -> Asset {
    Asset {
        chainId: U256::from(CHAIN_ID),
        holder: deployment.eth_holder,
    }
}

/// Where a pair keeps its channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Store {
    /// A redb file per client, fsynced on every write.
    Durable,
    /// In memory.
    Memory,
}

/// Alice (proposes and pays) and Bob (accepts everything), connected.
pub(crate) struct Pair {
    pub(crate) alice: Client,
    pub(crate) bob: Client,
    bob_opened: perun::client::Opened,
}

async fn persister(store: Store, dir: &Path, name: &str) -> Res<Arc<dyn Persister>> {
    Ok(match store {
        Store::Durable => Arc::new(RedbPersister::open(dir.join(format!("{name}.redb"))).await?),
        Store::Memory => Arc::new(MemoryPersister::new()),
    })
}

async fn client(
    chain: &Chain,
    store: Store,
    dir: &Path,
    name: &str,
) -> Res<(Client, perun::client::Opened)> {
    let account = chain.anvil.funded_account().await?;
    let url = chain.anvil.ws_url();
    let funder = EthFunder::connect(&url, &account, chain.config.clone()).await?;
    let adjudicator = EthAdjudicator::connect(&url, &account, chain.config.clone()).await?;
    let (accept_all, opened) = AcceptAllForTesting::new();
    let client = Client::builder()
        .account(Arc::new(account))
        .funder(Arc::new(funder))
        .adjudicator(Arc::new(adjudicator))
        .persister(persister(store, dir, name).await?)
        .proposal_handler(accept_all)
        .update_handler(Arc::new(AcceptPaymentsToMe))
        .build()
        .await?;
    Ok((client, opened))
}

impl Pair {
    /// Two fresh clients with funded accounts; redb files go to `dir`.
    pub(crate) async fn start(chain: &Chain, store: Store, dir: &Path) -> Res<Self> {
        std::fs::create_dir_all(dir)?;
        let (alice, _) = client(chain, store, dir, "alice").await?;
        let (bob, bob_opened) = client(chain, store, dir, "bob").await?;
        for addr in bob.listen_addrs().await? {
            alice.add_peer(bob.peer_id(), addr).await?;
        }
        Ok(Self {
            alice,
            bob,
            bob_opened,
        })
    }

    fn proposal(&self, asset: Asset) -> ChannelProposal {
        let participants = [&self.alice, &self.bob]
            .iter()
            .map(|c| Participant {
                address: c.address(),
                peer: c.peer_id(),
            })
            .collect();
        ChannelProposal::payment(
            participants,
            Allocation::new(vec![asset], vec![vec![deposit(), deposit()]]),
            60,
        )
    }

    /// Alice proposes a channel; returns her handle once it is active and
    /// Bob's side reported it open.
    pub(crate) async fn open(&mut self, asset: Asset) -> Res<Channel> {
        let ch = self.alice.propose_channel(self.proposal(asset)).await?;
        let bob = tokio::time::timeout(Duration::from_secs(30), self.bob_opened.recv())
            .await
            .map_err(|_| "Bob did not report the channel within 30 s")?
            .ok_or("Bob's proposal handler stopped")??;
        if bob.id() != ch.id() {
            return Err("Bob opened a different channel".into());
        }
        Ok(ch)
    }

    /// Stops both clients (their channels stay in the stores).
    pub(crate) async fn shutdown(self) {
        self.alice.shutdown().await;
        self.bob.shutdown().await;
    }
}
