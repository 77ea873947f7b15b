//! The `Client`: its builder, and the handle applications hold.

use std::sync::Arc;

use perun_adjudicator::{Adjudicator, Funder};
use perun_channel::{Address, App, ChannelId};
use perun_persistence::{MemoryPersister, Persister};
use perun_wallet::Account;
use perun_wire::{Keypair, Multiaddr, PeerId};
use tracing::{error, info, warn};

use crate::core::{Parts, Shared};
use crate::handler::{ProposalHandler, RejectAll, UpdateHandler};
use crate::open::{self, ChannelProposal};
use crate::{AcceptPaymentsToMe, Channel, Error, Limits, Result, Timeouts};

/// Builds a [`Client`]. `account`, `funder` and `adjudicator` are required.
pub struct ClientBuilder {
    account: Option<Arc<dyn Account>>,
    network_key: Option<Keypair>,
    listen: Option<Vec<Multiaddr>>,
    funder: Option<Arc<dyn Funder>>,
    adjudicator: Option<Arc<dyn Adjudicator>>,
    persister: Option<Arc<dyn Persister>>,
    proposal_handler: Arc<dyn ProposalHandler>,
    update_handler: Arc<dyn UpdateHandler>,
    apps: crate::apps::Apps,
    timeouts: Timeouts,
    limits: Limits,
    peers: Vec<(PeerId, Multiaddr)>,
    refuse_damaged: bool,
    towers: Vec<crate::TowerConfig>,
    policy: crate::AppointmentPolicy,
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
            apps: crate::apps::Apps::default(),
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            peers: Vec::new(),
            refuse_damaged: false,
            towers: Vec::new(),
            policy: crate::AppointmentPolicy::default(),
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
        self.listen = Some(vec![addr]);
        self
    }
    /// Listen nowhere: peers reach this client only over connections it
    /// opens (a client behind a NAT). Its channels stay in sync through the
    /// `Sync` it sends when a connection comes back.
    pub fn dial_only(mut self) -> Self {
        self.listen = Some(Vec::new());
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
    /// The rules of the app contract at `address` (call once per app).
    /// Payment channels always use the payment rule; a proposed channel
    /// whose app is not registered here is refused
    /// ([`UnknownApp`](perun_channel::Error::UnknownApp)), since none of
    /// its states could be checked before signing.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use perun_channel::{Address, tictactoe::TicTacToe};
    /// # let tictactoe_contract = Address::repeat_byte(0x77);
    /// let builder = perun_client::Client::builder().app(tictactoe_contract, Arc::new(TicTacToe));
    /// # let _ = builder;
    /// ```
    pub fn app(mut self, address: Address, app: Arc<dyn App>) -> Self {
        self.apps.insert(address, app);
        self
    }
    /// Protocol timeouts.
    pub fn timeouts(mut self, t: Timeouts) -> Self {
        self.timeouts = t;
        self
    }
    /// Caps on what peers can make the client hold (default
    /// [`Limits::default`]).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }
    /// Where to reach a peer; known before restored channels sync.
    pub fn peer(mut self, peer: PeerId, addr: Multiaddr) -> Self {
        self.peers.push((peer, addr));
        self
    }
    /// How long one request to a peer may wait for its reply: sets
    /// [`Timeouts::request`] (default 15 s; at least 3/2 × the handler
    /// timeout, see [`Timeouts::check`]).
    pub fn request_timeout(mut self, t: std::time::Duration) -> Self {
        self.timeouts.request = t;
        self
    }

    /// Keeps appointments with this watchtower (call again for more
    /// towers): the client registers with it and sends each funded
    /// channel's latest fully signed state, sealed, by the
    /// [`appointment_policy`](Self::appointment_policy), in the background.
    /// Receipts are checked against `tower.address` and stored with the
    /// channel ([`Channel::tower_status`]); failures are
    /// [`ChannelEvent::TowerFailed`](crate::ChannelEvent::TowerFailed)
    /// events and are retried. A down tower never fails an update.
    pub fn watchtower(mut self, tower: crate::TowerConfig) -> Self {
        self.towers.push(tower);
        self
    }

    /// When appointments are sent (default
    /// [`AppointmentPolicy::EveryUpdate`](crate::AppointmentPolicy::EveryUpdate)).
    pub fn appointment_policy(mut self, policy: crate::AppointmentPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Make [`build`](Self::build) fail with [`Error::DamagedRecords`] if
    /// any stored channel cannot be restored, instead of starting with the
    /// others and listing the damaged ones in
    /// [`Client::damaged_records`]. For an application that would rather
    /// not run at all than run with a channel it cannot watch.
    pub fn refuse_damaged_records(mut self) -> Self {
        self.refuse_damaged = true;
        self
    }

    /// Starts the network endpoint, restores every persisted channel and
    /// starts serving peers.
    ///
    /// A stored channel whose record does not decode or fails its checks is
    /// not restored (its money is not watched!) and is reported: in
    /// [`Client::damaged_records`], or as [`Error::DamagedRecords`] with
    /// [`refuse_damaged_records`](Self::refuse_damaged_records).
    ///
    /// Fails with [`Error::Timeouts`] if the timeouts break a relation of
    /// [`Timeouts::check`], before anything starts.
    pub async fn build(self) -> Result<Client> {
        self.timeouts.check().map_err(Error::Timeouts)?;
        let account = self.account.ok_or(Error::Missing("an account"))?;
        let funder = self.funder.ok_or(Error::Missing("a funder"))?;
        let adjudicator = self.adjudicator.ok_or(Error::Missing("an adjudicator"))?;
        let persister = self
            .persister
            .unwrap_or_else(|| Arc::new(MemoryPersister::new()));
        let towers = if self.towers.is_empty() {
            None
        } else {
            Some(Arc::new(crate::tower::Towers::new(
                self.towers,
                self.policy,
            )?))
        };
        let mut cfg =
            perun_wire::Config::new(self.network_key.unwrap_or_else(perun_wire::generate_key));
        if let Some(addrs) = self.listen {
            cfg.listen = addrs;
        }
        cfg.request_timeout = self.timeouts.request;
        cfg.limits = self.limits.wire;
        let (wire, incoming) = perun_wire::Node::start(cfg).await?;
        for (peer, addr) in self.peers {
            wire.add_address(peer, addr).await?;
        }
        let shared = Shared::new(Parts {
            account,
            wire,
            funder,
            adjudicator,
            persister,
            proposal_handler: self.proposal_handler,
            update_handler: self.update_handler,
            apps: self.apps,
            timeouts: self.timeouts,
            limits: self.limits,
            towers,
        });
        let restored = crate::restore::restore(&shared).await?;
        if self.refuse_damaged && !restored.damaged.is_empty() {
            for d in &restored.damaged {
                error!(channel = %d.id, error = %d.error, "stored channel is damaged");
            }
            shared.stop.send_replace(true);
            shared.wire.shutdown().await;
            return Err(Error::DamagedRecords(restored.damaged));
        }
        for d in &restored.damaged {
            error!(channel = %d.id, error = %d.error, "stored channel is damaged; not restored, not watched");
        }
        tokio::spawn(crate::dispatch::dispatch(Arc::downgrade(&shared), incoming));
        tokio::spawn(crate::update::run_chores(
            Arc::downgrade(&shared),
            shared.later.clone(),
            shared.stop.subscribe(),
        ));
        crate::sync::spawn_resync(&shared);
        crate::tower::spawn_renewals(&shared);
        for core in restored.channels {
            crate::restore::resume(&shared, core);
        }
        info!(peer = %shared.wire.local_peer_id(), address = %shared.account.address(), "client started");
        Ok(Client {
            shared,
            damaged: restored.damaged.into(),
        })
    }
}

/// How long [`Client::shutdown`] waits for commits still on their way.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// A stored channel the client could not restore: its record does not
/// decode, or fails its checks (a signature, a channel rule, a peer id).
/// The channel is not watched; the store still holds the record, for
/// repair or inspection.
#[derive(Debug, Clone)]
pub struct DamagedRecord {
    /// The channel (the key it is stored under).
    pub id: ChannelId,
    /// Why it could not be restored: [`Error::Persistence`] for a record
    /// the store refuses to hand out, another variant for one that did not
    /// rebuild.
    pub error: Arc<Error>,
}

/// A perun client: proposes and accepts channels, and hands out
/// [`Channel`] controllers. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    pub(crate) shared: Arc<Shared>,
    damaged: Arc<[DamagedRecord]>,
}

impl Client {
    /// A builder with defaults for everything optional.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The stored channels [`ClientBuilder::build`] could not restore, in
    /// channel id order: their funds are not watched until the records are
    /// repaired. Empty when every record was sound.
    pub fn damaged_records(&self) -> &[DamagedRecord] {
        &self.damaged
    }

    /// Our on-chain address.
    pub fn address(&self) -> perun_channel::Address {
        self.shared.account.address()
    }

    /// Our network identity.
    pub fn peer_id(&self) -> PeerId {
        self.shared.wire.local_peer_id()
    }

    /// The addresses we listen on.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>> {
        Ok(self.shared.wire.listen_addrs().await?)
    }

    /// Closes every connection to `peer` (e.g. one that misbehaves, or to
    /// test how channels ride out a dropped connection). Its requests in
    /// flight fail with a transient error; the next message to it dials it
    /// again, and channels with it resync when it is back.
    pub async fn disconnect(&self, peer: PeerId) -> Result<()> {
        Ok(self.shared.wire.disconnect(peer).await?)
    }

    /// Tells the client where to reach `peer`.
    pub async fn add_peer(&self, peer: PeerId, addr: Multiaddr) -> Result<()> {
        Ok(self.shared.wire.add_address(peer, addr).await?)
    }

    /// Runs the channel proposal protocol: every participant must accept,
    /// sign version 0 and fund; returns the active channel.
    ///
    /// Dropping the future does not stop the protocol: the rest runs on a
    /// task of its own (a deposit is never left behind for a channel the
    /// client does not follow), and a channel it opens appears in
    /// [`channels`](Self::channels).
    pub async fn propose_channel(&self, proposal: ChannelProposal) -> Result<Channel> {
        open::propose(&self.shared, proposal).await
    }

    /// A channel the client knows (open, restored, or withdrawn among the
    /// last [`Limits::withdrawn_kept`](crate::Limits::withdrawn_kept)).
    pub fn channel(&self, id: &ChannelId) -> Option<Channel> {
        self.shared
            .channel_core(id)
            .map(|core| Channel::new(core, self.shared.clone()))
    }

    /// Every channel the client knows.
    pub fn channels(&self) -> Vec<Channel> {
        self.shared
            .channel_cores()
            .into_iter()
            .map(|core| Channel::new(core, self.shared.clone()))
            .collect()
    }

    /// How many channels' watchers have read the chain and watch it now.
    pub fn watching(&self) -> usize {
        self.shared
            .channel_cores()
            .iter()
            .filter(|c| *c.watch_status.borrow() == crate::WatchStatus::Watching)
            .count()
    }

    /// Waits until every channel with money at stake (funded and not yet
    /// withdrawn) is protected: its watcher subscribed to the chain and read
    /// the channel's history. After a restore this is the moment the client
    /// can be left alone. Fails with [`Error::Timeout`] after `timeout`.
    pub async fn wait_protected(&self, timeout: std::time::Duration) -> Result<()> {
        use crate::WatchStatus::{Done, Watching};
        let protected = async {
            for core in self.shared.channel_cores() {
                let phase = core.phase();
                if !phase.is_funded() || phase == perun_channel::Phase::Withdrawn {
                    continue;
                }
                let mut status = core.watch_status.subscribe();
                if status
                    .wait_for(|s| matches!(s, Watching | Done))
                    .await
                    .is_err()
                {
                    return Err(Error::Closed);
                }
            }
            Ok(())
        };
        tokio::time::timeout(timeout, protected)
            .await
            .map_err(|_| Error::Timeout("watchers to read the chain"))?
    }

    /// This account's chain index on the adjudicator's deployment, kept in
    /// the client's store (see [`recover`](crate::recover)); for a
    /// non-default [`IndexConfig`](crate::IndexConfig) use
    /// [`ChainIndex::new`](crate::ChainIndex::new). Fails with
    /// [`Error::NoChainHistory`] if the backend cannot read history.
    pub fn chain_index_handle(&self) -> Result<crate::ChainIndex> {
        let s = &self.shared;
        crate::ChainIndex::new(
            s.adjudicator.clone(),
            s.persister.clone(),
            s.account.clone(),
            crate::IndexConfig::default(),
        )
    }

    /// Scans the chain from where the last scan ended and answers: every
    /// channel this account took part in that appeared on-chain, and every
    /// credit it can withdraw now.
    pub async fn chain_index(&self) -> Result<crate::ChainView> {
        self.chain_index_handle()?.scan().await
    }

    /// Withdraws every credit the chain index finds, to this account: what
    /// the chain owes it, also after the local store was lost. A second
    /// call withdraws nothing.
    pub async fn recover_funds(&self) -> Result<crate::Recovered> {
        self.chain_index_handle()?.recover_funds().await
    }

    /// Holds this client's timer chores back while `held` (a peer's
    /// commit then stays unsaved, our held commit unsent), as a stalled
    /// runtime would. Tests only (feature `failpoints`).
    #[cfg(feature = "failpoints")]
    #[doc(hidden)]
    pub fn hold_chores_for_testing(&self, held: bool) {
        self.shared.later.hold(held);
    }

    /// Stops the network endpoint. Channels stay in the persister.
    ///
    /// With watchtowers, each channel first sends its latest state to the
    /// towers that lack it (for at most 5 s), whatever the
    /// [`AppointmentPolicy`](crate::AppointmentPolicy).
    ///
    /// Commits of updates that already returned are handed to the peers
    /// first (for at most [`SHUTDOWN_GRACE`]), so a peer learns of an update
    /// before its proposer goes away; within the same grace, updates and
    /// channel proposals whose callers gave up run to their end. A peer's
    /// commit held back to ride with our next write is stored before it
    /// returns (again for at most [`SHUTDOWN_GRACE`]).
    ///
    /// From then on the client signs nothing and closes no channel, even
    /// in tasks that outlive this call (an answer to a peer's update still
    /// waiting on its handler): another client may be started on the same
    /// store, and must know every signature in it. Call this before doing
    /// so; dropping a `Client` does not stop it.
    pub async fn shutdown(&self) {
        let mut commits = self.shared.commits_in_flight.subscribe();
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, commits.wait_for(|n| *n == 0)).await;
        if let Some(towers) = &self.shared.towers {
            towers.flush(crate::tower::FLUSH_TIMEOUT).await;
        }
        self.shared.stop.send_replace(true);
        self.shared.wire.shutdown().await;
        // A peer's commit taken in the last moment is stored before we
        // return: its chore ([`crate::later`]) would come too late for a
        // process that exits now.
        let flush = async {
            for core in self.shared.channel_cores() {
                let mut l = core.locked.lock().await;
                if let Err(e) = l.flush_unsaved(&self.shared, &core).await {
                    warn!(channel = %core.id, error = %e, "could not store a peer's commit at shutdown; after a restart a sync asks the peer for it");
                }
            }
        };
        if tokio::time::timeout(SHUTDOWN_GRACE, flush).await.is_err() {
            warn!("shutdown: a channel stayed busy; its unsaved commit, if any, waits for a sync");
        }
    }
}
