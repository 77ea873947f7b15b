//! The `Client`: builder, the dispatcher of incoming messages, and the
//! registry of channels.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use perun_adjudicator::{Adjudicator, Funder};
use perun_channel::{App, ChannelId, PaymentApp};
use perun_persistence::{MemoryPersister, Persister};
use perun_wallet::Account;
use perun_wire::{Handle, Incoming, Keypair, Message, Multiaddr, PeerId, Refusal, RefusalCode};
use tracing::{debug, info, warn};

use crate::channel::{Channel, ChannelCore};
use crate::handler::{ProposalHandler, RejectAll, UpdateHandler};
use crate::open::{self, ChannelProposal, Pending};
use crate::{AcceptPaymentsToMe, Error, Result, Timeouts};

/// State shared by the client handle, its channels and its protocol tasks.
pub(crate) struct Inner {
    pub(crate) account: Arc<dyn Account>,
    pub(crate) wire: Handle,
    pub(crate) funder: Arc<dyn Funder>,
    pub(crate) adjudicator: Arc<dyn Adjudicator>,
    pub(crate) persister: Arc<dyn Persister>,
    pub(crate) proposal_handler: Arc<dyn ProposalHandler>,
    pub(crate) update_handler: Arc<dyn UpdateHandler>,
    pub(crate) app: Arc<dyn App>,
    pub(crate) timeouts: Timeouts,
    channels: Mutex<HashMap<ChannelId, Arc<ChannelCore>>>,
    pub(crate) pending: Mutex<HashMap<perun_wire::ProposalId, Pending>>,
    /// Set to `true` on shutdown; background tasks stop.
    pub(crate) stop: tokio::sync::watch::Sender<bool>,
    /// Commits still being handed to peers; `shutdown` lets them finish.
    pub(crate) commits_in_flight: tokio::sync::watch::Sender<usize>,
    /// Bounds the chain reads and syncs a restore starts at once (a client
    /// with 10,000 channels must not open 10,000 requests in one go).
    pub(crate) resume_permits: Arc<tokio::sync::Semaphore>,
}

/// Channels whose first chain read or sync after a restore run at once.
pub(crate) const RESUME_CONCURRENCY: usize = 32;

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("address", &self.account.address())
            .field("peer", &self.wire.local_peer_id())
            .finish_non_exhaustive()
    }
}

impl Inner {
    pub(crate) fn channel_core(&self, id: &ChannelId) -> Option<Arc<ChannelCore>> {
        lock(&self.channels).get(id).cloned()
    }

    pub(crate) fn insert_channel(&self, core: Arc<ChannelCore>) {
        lock(&self.channels).insert(core.id, core);
    }

    pub(crate) fn remove_channel(&self, id: &ChannelId) {
        lock(&self.channels).remove(id);
    }

    /// Sends `msg` to every other participant at once; one result per peer.
    pub(crate) async fn broadcast(
        &self,
        core: &ChannelCore,
        msg: &Message,
    ) -> Vec<(PeerId, usize, perun_wire::Result<Message>)> {
        let sends = core
            .peers
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != core.index)
            .map(|(i, peer)| async move { (*peer, i, self.wire.send(*peer, msg).await) });
        futures::future::join_all(sends).await
    }
}

/// A poisoned registry lock only means another task panicked mid-insert;
/// the map itself is still consistent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Builds a [`Client`]. `account`, `funder` and `adjudicator` are required.
pub struct ClientBuilder {
    account: Option<Arc<dyn Account>>,
    network_key: Option<Keypair>,
    listen: Option<Multiaddr>,
    funder: Option<Arc<dyn Funder>>,
    adjudicator: Option<Arc<dyn Adjudicator>>,
    persister: Option<Arc<dyn Persister>>,
    proposal_handler: Arc<dyn ProposalHandler>,
    update_handler: Arc<dyn UpdateHandler>,
    app: Arc<dyn App>,
    timeouts: Timeouts,
    request_timeout: Option<std::time::Duration>,
    peers: Vec<(PeerId, Multiaddr)>,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder").finish_non_exhaustive()
    }
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self {
            account: None,
            network_key: None,
            listen: None,
            funder: None,
            adjudicator: None,
            persister: None,
            proposal_handler: Arc::new(RejectAll),
            update_handler: Arc::new(AcceptPaymentsToMe),
            app: Arc::new(PaymentApp),
            timeouts: Timeouts::default(),
            request_timeout: None,
            peers: Vec::new(),
        }
    }
}

impl ClientBuilder {
    /// The on-chain account that signs states and withdraws.
    pub fn account(mut self, account: Arc<dyn Account>) -> Self {
        self.account = Some(account);
        self
    }
    /// The libp2p identity (default: a fresh random key).
    pub fn network_key(mut self, key: Keypair) -> Self {
        self.network_key = Some(key);
        self
    }
    /// Where to listen (default `/ip4/127.0.0.1/tcp/0`).
    pub fn listen(mut self, addr: Multiaddr) -> Self {
        self.listen = Some(addr);
        self
    }
    /// Deposits funds when channels open.
    pub fn funder(mut self, funder: Arc<dyn Funder>) -> Self {
        self.funder = Some(funder);
        self
    }
    /// Concludes, disputes and withdraws on-chain.
    pub fn adjudicator(mut self, adjudicator: Arc<dyn Adjudicator>) -> Self {
        self.adjudicator = Some(adjudicator);
        self
    }
    /// The durable store (default: in memory, which does not survive a restart).
    pub fn persister(mut self, persister: Arc<dyn Persister>) -> Self {
        self.persister = Some(persister);
        self
    }
    /// Decides on incoming proposals (default: reject all).
    pub fn proposal_handler(mut self, h: Arc<dyn ProposalHandler>) -> Self {
        self.proposal_handler = h;
        self
    }
    /// Decides on incoming updates (default: accept payments to us).
    pub fn update_handler(mut self, h: Arc<dyn UpdateHandler>) -> Self {
        self.update_handler = h;
        self
    }
    /// Rules of app channels (payment channels always use the payment rule).
    pub fn app(mut self, app: Arc<dyn App>) -> Self {
        self.app = app;
        self
    }
    /// Protocol timeouts.
    pub fn timeouts(mut self, t: Timeouts) -> Self {
        self.timeouts = t;
        self
    }
    /// Where to reach a peer; known before restored channels sync.
    pub fn peer(mut self, peer: PeerId, addr: Multiaddr) -> Self {
        self.peers.push((peer, addr));
        self
    }
    /// How long one request to a peer may wait for its reply (default 10 s).
    pub fn request_timeout(mut self, t: std::time::Duration) -> Self {
        self.request_timeout = Some(t);
        self
    }

    /// Starts the network endpoint, restores every persisted channel and
    /// starts serving peers.
    pub async fn build(self) -> Result<Client> {
        let account = self
            .account
            .ok_or(Error::Config("account is required".into()))?;
        let funder = self
            .funder
            .ok_or(Error::Config("funder is required".into()))?;
        let adjudicator = self
            .adjudicator
            .ok_or(Error::Config("adjudicator is required".into()))?;
        let persister = self
            .persister
            .unwrap_or_else(|| Arc::new(MemoryPersister::new()));
        let mut cfg =
            perun_wire::Config::new(self.network_key.unwrap_or_else(perun_wire::generate_key));
        if let Some(addr) = self.listen {
            cfg.listen = vec![addr];
        }
        if let Some(t) = self.request_timeout {
            cfg.request_timeout = t;
        }
        let (wire, incoming) = perun_wire::Node::start(cfg).await?;
        for (peer, addr) in self.peers {
            wire.add_address(peer, addr).await?;
        }
        let inner = Arc::new(Inner {
            account,
            wire,
            funder,
            adjudicator,
            persister,
            proposal_handler: self.proposal_handler,
            update_handler: self.update_handler,
            app: self.app,
            timeouts: self.timeouts,
            channels: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            stop: tokio::sync::watch::channel(false).0,
            commits_in_flight: tokio::sync::watch::channel(0).0,
            resume_permits: Arc::new(tokio::sync::Semaphore::new(RESUME_CONCURRENCY)),
        });
        let restored = restore(&inner).await?;
        tokio::spawn(dispatch(Arc::downgrade(&inner), incoming));
        for core in restored {
            resume(&inner, core);
        }
        info!(peer = %inner.wire.local_peer_id(), address = %inner.account.address(), "client started");
        Ok(Client { inner })
    }
}

/// Rebuilds every persisted channel. A record that fails its checks (a
/// damaged file, a tampered state) is reported and left alone, never
/// half-loaded; the others are restored.
async fn restore(inner: &Arc<Inner>) -> Result<Vec<Arc<ChannelCore>>> {
    // Fast path: every record in one read, checked on every core.
    let records = match inner.persister.load_all().await {
        Ok(records) => records,
        // One bad record fails the whole read: load one by one instead, so
        // it does not keep the others from loading.
        Err(e) => {
            warn!(error = %e, "loading all channels failed; loading them one by one");
            load_one_by_one(inner).await?
        }
    };
    let mut restored = Vec::with_capacity(records.len());
    for rec in records {
        let id = rec.id();
        match build_core(rec) {
            Ok(core) => {
                debug!(channel = %core.id, phase = ?core.phase(), "restored channel");
                inner.insert_channel(core.clone());
                restored.push(core);
            }
            Err(e) => {
                warn!(channel = %id, error = %e, "stored channel failed its checks; not loaded")
            }
        }
    }
    info!(channels = restored.len(), "restored channels");
    Ok(restored)
}

/// Every stored record that passes its checks, loaded one by one (many at
/// once, so the checks spread over the cores); the others are logged.
async fn load_one_by_one(inner: &Arc<Inner>) -> Result<Vec<perun_persistence::ChannelRecord>> {
    use futures::StreamExt;
    let ids = inner.persister.channel_ids().await?;
    let loads = futures::stream::iter(ids)
        .map(|id| async move {
            match inner.persister.load(id).await {
                Ok(rec) => rec,
                Err(e) => {
                    warn!(channel = %id, error = %e, "stored channel failed its checks; not loaded");
                    None
                }
            }
        })
        .buffer_unordered(64);
    Ok(loads.filter_map(std::future::ready).collect().await)
}

/// A stored record as a `ChannelCore` (its signatures are checked again;
/// the wallet's memo makes that cheap right after a load).
fn build_core(
    rec: perun_persistence::ChannelRecord,
) -> std::result::Result<Arc<ChannelCore>, String> {
    let peers = rec
        .peers
        .iter()
        .map(|b| PeerId::from_bytes(b))
        .collect::<std::result::Result<Vec<PeerId>, _>>()
        .map_err(|e| e.to_string())?;
    let machine = rec.to_machine().map_err(|e| e.to_string())?;
    ChannelCore::new(machine, peers).map_err(|e| e.to_string())
}

/// Picks a restored channel up where it was: its watcher for every funded
/// phase, a `Sync` with the peers for an open channel, and the rest of the
/// opening protocol for one that was funding.
fn resume(inner: &Arc<Inner>, core: Arc<ChannelCore>) {
    use perun_channel::Phase::*;
    let phase = core.phase();
    if matches!(
        phase,
        Funding | Active | Updating | Final | Registered | Concluded
    ) {
        crate::watcher::spawn(inner, &core);
    }
    let inner = inner.clone();
    if matches!(phase, Active | Updating) {
        core.synced.send_replace(false);
    }
    tokio::spawn(async move {
        let res = match phase {
            Active | Updating => {
                let _permit = inner.resume_permits.clone().acquire_owned().await;
                let res = crate::sync::sync_with_peers(&inner, &core).await;
                core.synced.send_replace(true);
                res
            }
            Funding => open::resume_funding(&inner, core.clone()).await.map(|_| ()),
            Final | Concluded => crate::settle::conclude_and_withdraw(&inner, &core).await,
            _ => Ok(()),
        };
        if let Err(e) = res {
            warn!(channel = %core.id, error = %e, "resuming the channel failed");
        }
    });
}

async fn dispatch(inner: Weak<Inner>, mut incoming: Incoming) {
    while let Some(req) = incoming.next().await {
        let Some(inner) = inner.upgrade() else { break };
        let (peer, msg, responder) = req.into_parts();
        match msg {
            Message::Proposal(p) => {
                tokio::spawn(open::handle_proposal(inner, peer, p, responder));
            }
            Message::ProposalReject(r) => open::handle_abort(&inner, peer, r, responder),
            Message::Signing0(s) => {
                tokio::spawn(open::handle_signing0(inner, peer, s, responder));
            }
            Message::Update(u) => {
                tokio::spawn(crate::update::handle_update(inner, peer, u, responder));
            }
            Message::UpdateCommit(c) => {
                tokio::spawn(crate::update::handle_commit(inner, peer, c, responder));
            }
            Message::UpdateReject(r) => {
                tokio::spawn(crate::update::handle_abort(inner, peer, r, responder));
            }
            Message::Sync(s) => {
                tokio::spawn(crate::sync::handle_sync(inner, peer, s, responder));
            }
            other => {
                warn!(%peer, ?other, "not a request");
                let _ = responder.refuse(Refusal::new(RefusalCode::NotARequest, "not a request"));
            }
        }
    }
}

/// How long [`Client::shutdown`] waits for commits still on their way.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// A perun client: proposes and accepts channels, and hands out
/// [`Channel`] controllers. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// A builder with defaults for everything optional.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Our on-chain address.
    pub fn address(&self) -> perun_channel::Address {
        self.inner.account.address()
    }

    /// Our network identity.
    pub fn peer_id(&self) -> PeerId {
        self.inner.wire.local_peer_id()
    }

    /// The addresses we listen on.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>> {
        Ok(self.inner.wire.listen_addrs().await?)
    }

    /// Tells the client where to reach `peer`.
    pub async fn add_peer(&self, peer: PeerId, addr: Multiaddr) -> Result<()> {
        Ok(self.inner.wire.add_address(peer, addr).await?)
    }

    /// Runs the channel proposal protocol: every participant must accept,
    /// sign version 0 and fund; returns the active channel.
    pub async fn propose_channel(&self, proposal: ChannelProposal) -> Result<Channel> {
        open::propose(&self.inner, proposal).await
    }

    /// A channel the client knows (open or restored).
    pub fn channel(&self, id: &ChannelId) -> Option<Channel> {
        self.inner
            .channel_core(id)
            .map(|core| Channel::new(core, self.inner.clone()))
    }

    /// Every channel the client knows.
    pub fn channels(&self) -> Vec<Channel> {
        lock(&self.inner.channels)
            .values()
            .map(|core| Channel::new(core.clone(), self.inner.clone()))
            .collect()
    }

    /// Stops the network endpoint. Channels stay in the persister.
    ///
    /// Commits of updates that already returned are handed to the peers
    /// first (for at most [`SHUTDOWN_GRACE`]), so a peer learns of an update
    /// before its proposer goes away.
    pub async fn shutdown(&self) {
        let mut commits = self.inner.commits_in_flight.subscribe();
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, commits.wait_for(|n| *n == 0)).await;
        self.inner.stop.send_replace(true);
        self.inner.wire.shutdown().await;
    }
}
