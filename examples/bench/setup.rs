//! The local chain and pairs of clients on it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use perun::adjudicator::testing::{Anvil, CHAIN_ID};
use perun::adjudicator::{Deployment, EthAdjudicator, EthConfig, EthFunder, deploy};
use perun::channel::{Address, Allocation, Asset, U256};
use perun::client::{
    AcceptAllForTesting, AcceptPaymentsToMe, Channel, ChannelProposal, Client, Participant,
};
use perun::persistence::{MemoryPersister, Persister, RedbPersister};

use crate::Res;
use crate::peer::Peer;

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

/// How long Bob may take to report a channel open.
const OPEN_WAIT: Duration = Duration::from_secs(30);

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
    /// Alice's redb store, when durable.
    pub(crate) alice_store: Option<Arc<RedbPersister>>,
    bob: Bob,
}

/// Where Bob runs.
enum Bob {
    /// In this process, beside Alice: only for figures that need his
    /// client's API (the payments layer's follower).
    Local {
        client: Client,
        opened: perun::client::Opened,
    },
    /// In a child process of his own, as a peer is in deployment: nothing
    /// is shared with Alice but the connection (in one process the two
    /// clients would share the wallet's memo of checked signatures, and
    /// neither would ever recover the other's).
    Remote(Peer),
}

/// The store, and its redb handle when it has one (for its batch counters).
async fn persister(
    store: Store,
    dir: &Path,
    name: &str,
) -> Res<(Arc<dyn Persister>, Option<Arc<RedbPersister>>)> {
    Ok(match store {
        Store::Durable => {
            let redb = Arc::new(RedbPersister::open(dir.join(format!("{name}.redb"))).await?);
            (redb.clone(), Some(redb))
        }
        Store::Memory => (Arc::new(MemoryPersister::new()), None),
    })
}

/// A client with a fresh funded account on `anvil` and Bob's accept-all
/// handlers; `opened` reports the channels it accepted once they are active,
/// and the redb store is there when `store` is durable.
pub(crate) async fn client(
    anvil: &Anvil,
    config: &EthConfig,
    store: Store,
    dir: &Path,
    name: &str,
) -> Res<(Client, perun::client::Opened, Option<Arc<RedbPersister>>)> {
    let account = anvil.funded_account().await?;
    let url = anvil.ws_url();
    let funder = EthFunder::connect(&url, &account, config.clone()).await?;
    let adjudicator = EthAdjudicator::connect(&url, &account, config.clone()).await?;
    let (accept_all, opened) = AcceptAllForTesting::new();
    let (persister, redb) = persister(store, dir, name).await?;
    let client = Client::builder()
        .account(Arc::new(account))
        .funder(Arc::new(funder))
        .adjudicator(Arc::new(adjudicator))
        .persister(persister)
        .proposal_handler(accept_all)
        .update_handler(Arc::new(AcceptPaymentsToMe))
        .build()
        .await?;
    Ok((client, opened, redb))
}

/// The deployment as command-line arguments for a child process.
pub(crate) fn deployment_args(d: &Deployment) -> Vec<String> {
    [d.adjudicator, d.eth_holder, d.token, d.erc20_holder]
        .iter()
        .map(|a| a.to_string())
        .chain([d.block.to_string()])
        .collect()
}

/// The deployment from [`deployment_args`]' five arguments.
pub(crate) fn parse_deployment(args: &[String]) -> Res<Deployment> {
    let [adj, eth, token, erc20, block] = args else {
        return Err("expected ADJUDICATOR ETH_HOLDER TOKEN ERC20_HOLDER BLOCK".into());
    };
    let addr = |s: &String| s.parse::<Address>();
    Ok(Deployment {
        adjudicator: addr(adj)?,
        eth_holder: addr(eth)?,
        token: addr(token)?,
        erc20_holder: addr(erc20)?,
        block: block.parse()?,
    })
}

impl Pair {
    /// Two fresh clients with funded accounts in this process; redb files
    /// go to `dir`.
    pub(crate) async fn start(chain: &Chain, store: Store, dir: &Path) -> Res<Self> {
        std::fs::create_dir_all(dir)?;
        let (alice, _, alice_store) =
            client(&chain.anvil, &chain.config, store, dir, "alice").await?;
        let (bob, opened, _) = client(&chain.anvil, &chain.config, store, dir, "bob").await?;
        for addr in bob.listen_addrs().await? {
            alice.add_peer(bob.peer_id(), addr).await?;
        }
        Ok(Self {
            alice,
            alice_store,
            bob: Bob::Local {
                client: bob,
                opened,
            },
        })
    }

    /// Alice in this process, Bob in a child process ([`Peer`]); each
    /// keeps its redb file in `dir`.
    pub(crate) async fn start_apart(chain: &Chain, store: Store, dir: &Path) -> Res<Self> {
        std::fs::create_dir_all(dir)?;
        let (alice, _, alice_store) =
            client(&chain.anvil, &chain.config, store, dir, "alice").await?;
        let bob = Peer::spawn(chain, store, dir).await?;
        for addr in &bob.addrs {
            alice.add_peer(bob.peer, addr.clone()).await?;
        }
        Ok(Self {
            alice,
            alice_store,
            bob: Bob::Remote(bob),
        })
    }

    /// Bob's client, when he runs in this process.
    pub(crate) fn local_bob(&self) -> Option<&Client> {
        match &self.bob {
            Bob::Local { client, .. } => Some(client),
            Bob::Remote(_) => None,
        }
    }

    /// The CPU time Bob's process used so far, when he has one of his own
    /// (in this process his time is the process's).
    pub(crate) fn bob_cpu_time(&self) -> Res<Option<Duration>> {
        match &self.bob {
            Bob::Local { .. } => Ok(None),
            Bob::Remote(peer) => peer.cpu_time().map(Some),
        }
    }

    fn proposal(&self, asset: Asset) -> ChannelProposal {
        let (bob_address, bob_peer) = match &self.bob {
            Bob::Local { client, .. } => (client.address(), client.peer_id()),
            Bob::Remote(peer) => (peer.address, peer.peer),
        };
        let participants = vec![
            Participant {
                address: self.alice.address(),
                peer: self.alice.peer_id(),
            },
            Participant {
                address: bob_address,
                peer: bob_peer,
            },
        ];
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
        let bob = match &mut self.bob {
            Bob::Local { opened, .. } => tokio::time::timeout(OPEN_WAIT, opened.recv())
                .await
                .map_err(|_| format!("Bob did not report the channel within {OPEN_WAIT:?}"))?
                .ok_or("Bob's proposal handler stopped")??
                .id(),
            Bob::Remote(peer) => peer.opened(OPEN_WAIT).await?,
        };
        if bob != ch.id() {
            return Err("Bob opened a different channel".into());
        }
        Ok(ch)
    }

    /// Stops both clients (their channels stay in the stores).
    pub(crate) async fn shutdown(self) -> Res<()> {
        self.alice.shutdown().await;
        match self.bob {
            Bob::Local { client, .. } => {
                client.shutdown().await;
                Ok(())
            }
            Bob::Remote(peer) => peer.shutdown().await,
        }
    }
}
