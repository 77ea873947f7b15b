//! The state every protocol shares: the client's [`Shared`] parts, each
//! channel's [`ChannelCore`] and its [`Locked`] machine.
//!
//! This is the leaf the protocols (`open`, `update`, `sync`, `watcher`,
//! `settle`) build on; it knows none of them. A protocol step takes the
//! channel's lock, changes a trial copy of the machine, writes it durably
//! through [`Locked::write`], and only then installs and announces it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};

use perun_adjudicator::{Adjudicator, Funder};
use perun_channel::{ChannelId, Machine, Params, Phase, SignedState, State};
use perun_persistence::{Change, ChannelRecord, Persister};
use perun_wallet::Account;
use perun_wire::{Handle, Message, PeerId};
use tokio::sync::{Notify, Semaphore, broadcast, watch};
use tracing::{debug, warn};

use crate::event::{ChannelEvent, WatchStatus};
use crate::handler::{ProposalHandler, UpdateHandler};
use crate::{Channel, Error, Result, Timeouts};

/// Channels whose first chain read or sync after a restore run at once.
pub(crate) const RESUME_CONCURRENCY: usize = 32;
/// Chain reads and transactions the watchers of one client run at once (a
/// limit of their own: a watcher never waits behind a peer's `Sync`).
pub(crate) const WATCH_CONCURRENCY: usize = 64;
/// Most peers whose address the client keeps in memory
/// ([`Shared::note_peer_address`]); the store keeps every one.
pub(crate) const PEER_BOOK: usize = 65_536;
/// The store's metadata key of a peer's address: this prefix and the
/// peer id (base58). The value: the address and the first 4 bytes of
/// `keccak256(key ‖ address)`, so a damaged value, or one copied under
/// another peer's key, is told from a good one.
const PEER_KEY_PREFIX: &str = "perun/peer/";

/// The peer and its address, for a two-party channel that holds funds
/// (what the book takes: see [`Shared::note_peer_address`]).
fn book_entry(core: &ChannelCore) -> Option<(PeerId, perun_channel::Address)> {
    // A channel with nothing deposited is funded at once and for free.
    let holds_funds = core.params.funding.iter().flatten().any(|x| !x.is_zero());
    if core.peers.len() != 2 || !holds_funds {
        return None;
    }
    Some((
        core.peers[1 - core.index],
        core.params.participants[1 - core.index],
    ))
}

/// A peer book entry's stored bytes ([`PEER_KEY_PREFIX`]).
fn peer_entry(key: &str, address: perun_channel::Address) -> [u8; 24] {
    let mut out = [0u8; 24];
    out[..20].copy_from_slice(address.as_slice());
    let check = alloy_primitives::keccak256([key.as_bytes(), address.as_slice()].concat());
    out[20..].copy_from_slice(&check[..4]);
    out
}

/// What the channel follower ([`Shared::follow_channels`]) learns, in the
/// order it happened.
#[derive(Debug)]
pub(crate) enum ChannelNews {
    /// A channel to follow: each fully signed state after `baseline`
    /// arrives on `states`.
    Added {
        core: Arc<ChannelCore>,
        states: broadcast::Receiver<SignedState>,
        baseline: SignedState,
    },
    /// The channel left the client (an opening that failed, or a withdrawn
    /// channel past `Limits::withdrawn_kept`; its follower ended on the
    /// phase already).
    Removed(ChannelId),
}

/// The follower's channel and which channels it follows.
struct NewsTo {
    wants: fn(&ChannelCore) -> bool,
    tx: tokio::sync::mpsc::UnboundedSender<ChannelNews>,
}

impl NewsTo {
    /// Tells of `core` if it is wanted; `false` once the follower is gone.
    fn added(&self, core: &Arc<ChannelCore>) -> bool {
        if !(self.wants)(core) {
            return true;
        }
        // Subscribed before the baseline is read: an update published in
        // between is seen twice, never lost (the follower skips versions
        // it has passed).
        let states = core.subscribe_updates();
        let baseline = core.state.borrow().clone();
        self.tx
            .send(ChannelNews::Added {
                core: core.clone(),
                states,
                baseline,
            })
            .is_ok()
    }
}

/// An accepted proposal waiting for its `Signing0`.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) proposal: perun_wire::Proposal,
    pub(crate) from: PeerId,
    pub(crate) index: usize,
    pub(crate) share: perun_channel::B256,
    pub(crate) done: tokio::sync::oneshot::Sender<Result<Channel>>,
    /// Its place among the pending proposals ([`Shared::proposals`]),
    /// kept until the channel is funded or failed.
    pub(crate) _slot: crate::dispatch::Pass,
}

/// State shared by the client handle, its channels and its protocol tasks.
pub(crate) struct Shared {
    pub(crate) account: Arc<dyn Account>,
    pub(crate) wire: Handle,
    pub(crate) funder: Arc<dyn Funder>,
    pub(crate) adjudicator: Arc<dyn Adjudicator>,
    pub(crate) persister: Arc<dyn Persister>,
    pub(crate) proposal_handler: Arc<dyn ProposalHandler>,
    /// Replaceable once built: [`Payments`](crate::payments::Payments)
    /// installs its own.
    pub(crate) update_handler: std::sync::RwLock<Arc<dyn UpdateHandler>>,
    pub(crate) apps: crate::apps::Apps,
    pub(crate) timeouts: Timeouts,
    channels: Mutex<HashMap<ChannelId, Arc<ChannelCore>>>,
    /// The withdrawn channels still in `channels`, oldest first (at most
    /// `withdrawn_kept`).
    withdrawn: Mutex<std::collections::VecDeque<ChannelId>>,
    withdrawn_kept: usize,
    /// Each peer's on-chain address, from the funded two-party channels it
    /// was in: kept after they leave the client (the payments layer opens
    /// new ones with it). At most `PEER_BOOK` entries.
    peer_addresses: Mutex<HashMap<PeerId, perun_channel::Address>>,
    /// Where the payments tracker learns of channels, if one follows them.
    /// Only taken with `channels` held, so the news keeps the map's order.
    channel_news: Mutex<Option<NewsTo>>,
    /// Whether a `Payments` lives for this client (one at a time).
    pub(crate) payments_active: AtomicBool,
    pub(crate) pending: Mutex<HashMap<perun_wire::ProposalId, Pending>>,
    /// Proposals waiting for our handler or for their `Signing0`.
    pub(crate) proposals: Arc<crate::dispatch::Gate>,
    /// Tasks working on peers' requests.
    pub(crate) tasks: Arc<crate::dispatch::Gate>,
    /// Set to `true` on shutdown; background tasks stop.
    pub(crate) stop: watch::Sender<bool>,
    /// Commits still being handed to peers; `shutdown` lets them finish.
    pub(crate) commits_in_flight: watch::Sender<usize>,
    /// Bounds the syncs a restore starts at once (a client with 10,000
    /// channels must not open 10,000 requests in one go).
    pub(crate) resume_permits: Arc<Semaphore>,
    /// Bounds the chain calls of all watchers together.
    pub(crate) watch_permits: Arc<Semaphore>,
    /// Channels that may disagree with a peer (a commit or abort that did not
    /// reach it, a commit we wait for): synced when the peer is reachable.
    pub(crate) unsynced: Mutex<HashMap<PeerId, HashSet<ChannelId>>>,
    /// Peers with a resync worker running, and how to wake it.
    pub(crate) resyncing: Mutex<HashMap<PeerId, Arc<Notify>>>,
    /// Wakes resync tasks (a peer connected).
    pub(crate) resync_wake: broadcast::Sender<PeerId>,
    /// The watchtowers, if any are configured.
    pub(crate) towers: Option<Arc<crate::tower::Towers>>,
    /// Chores updates leave for a moment later (`update::run_chores`).
    pub(crate) later: Arc<crate::later::Later>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("address", &self.account.address())
            .field("peer", &self.wire.local_peer_id())
            .finish_non_exhaustive()
    }
}

/// What [`Shared::new`] needs.
pub(crate) struct Parts {
    pub(crate) account: Arc<dyn Account>,
    pub(crate) wire: Handle,
    pub(crate) funder: Arc<dyn Funder>,
    pub(crate) adjudicator: Arc<dyn Adjudicator>,
    pub(crate) persister: Arc<dyn Persister>,
    pub(crate) proposal_handler: Arc<dyn ProposalHandler>,
    pub(crate) update_handler: Arc<dyn UpdateHandler>,
    pub(crate) apps: crate::apps::Apps,
    pub(crate) timeouts: Timeouts,
    pub(crate) limits: crate::Limits,
    pub(crate) towers: Option<Arc<crate::tower::Towers>>,
}

impl Shared {
    pub(crate) fn new(p: Parts) -> Arc<Self> {
        Arc::new(Self {
            account: p.account,
            wire: p.wire,
            funder: p.funder,
            adjudicator: p.adjudicator,
            persister: p.persister,
            proposal_handler: p.proposal_handler,
            update_handler: std::sync::RwLock::new(p.update_handler),
            apps: p.apps,
            timeouts: p.timeouts,
            channels: Mutex::new(HashMap::new()),
            withdrawn: Mutex::default(),
            withdrawn_kept: p.limits.withdrawn_kept,
            peer_addresses: Mutex::default(),
            channel_news: Mutex::new(None),
            payments_active: AtomicBool::new(false),
            pending: Mutex::new(HashMap::new()),
            proposals: crate::dispatch::Gate::new(
                "pending proposals",
                p.limits.proposals_per_peer,
                p.limits.proposals,
            ),
            tasks: crate::dispatch::Gate::new("request tasks", p.limits.tasks_per_peer, usize::MAX),
            stop: watch::channel(false).0,
            commits_in_flight: watch::channel(0).0,
            resume_permits: Arc::new(Semaphore::new(RESUME_CONCURRENCY)),
            watch_permits: Arc::new(Semaphore::new(WATCH_CONCURRENCY)),
            unsynced: Mutex::new(HashMap::new()),
            resyncing: Mutex::new(HashMap::new()),
            resync_wake: broadcast::channel(64).0,
            towers: p.towers,
            later: Arc::default(),
        })
    }

    pub(crate) fn channel_core(&self, id: &ChannelId) -> Option<Arc<ChannelCore>> {
        lock(&self.channels).get(id).cloned()
    }

    pub(crate) fn insert_channel(&self, core: Arc<ChannelCore>) {
        if core.phase() >= Phase::Active {
            self.note_peer_address(&core);
        }
        let mut channels = lock(&self.channels);
        // A channel is told of once: two followers on one stream would
        // each book some of its payments.
        if channels.insert(core.id, core.clone()).is_none() {
            self.tell(|to| to.added(&core));
        }
    }

    pub(crate) fn remove_channel(&self, id: &ChannelId) {
        let mut channels = lock(&self.channels);
        if channels.remove(id).is_some() {
            // Unwanted ones too: the follower ignores what it never followed.
            self.tell(|to| to.tx.send(ChannelNews::Removed(*id)).is_ok());
        }
    }

    /// Removes a channel that never got to funding from the client and
    /// from the store (nothing of ours is at stake in it).
    pub(crate) async fn forget_channel(&self, id: ChannelId) {
        self.remove_channel(&id);
        match self.persister.channel_removed(id).await {
            Ok(()) | Err(perun_persistence::Error::UnknownChannel(_)) => {}
            Err(e) => {
                warn!(channel = %id, error = %e, "could not remove an unfunded channel's record")
            }
        }
    }

    /// A channel reached `Withdrawn`: it stays for readers until
    /// `withdrawn_kept` newer ones did.
    pub(crate) fn retire_channel(&self, id: ChannelId) {
        let gone: Vec<ChannelId> = {
            let mut w = lock(&self.withdrawn);
            // Once per channel: `set_phase` moves to `Withdrawn` once.
            w.push_back(id);
            let over = w.len().saturating_sub(self.withdrawn_kept);
            w.drain(..over).collect()
        };
        for id in gone {
            self.remove_channel(&id);
        }
    }

    /// Keeps the peer's address of a funded two-party channel that holds
    /// funds, in memory. Only those: the peer itself gave it (an n-party
    /// proposal names peers with addresses its proposer picked), and
    /// deposits bound how fast the book grows; past `PEER_BOOK` entries one
    /// makes room (the store still has it: [`Self::peer_address`]).
    /// Returns the entry if it is new or changed.
    pub(crate) fn note_peer_address(
        &self,
        core: &ChannelCore,
    ) -> Option<(PeerId, perun_channel::Address)> {
        let (peer, address) = book_entry(core)?;
        self.book_insert(peer, address).then_some((peer, address))
    }

    /// Stores the peer's address of a settled channel that qualifies for
    /// the book, whatever memory holds: a channel restored from before the
    /// book was stored had its peer noted in memory only.
    pub(crate) async fn keep_peer_address(&self, core: &ChannelCore) {
        if let Some((peer, address)) = book_entry(core) {
            self.book_insert(peer, address);
            self.store_peer_address(peer, address).await;
        }
    }

    /// As [`Self::note_peer_address`], and stores the entry (the book
    /// outlives a restart, after which a peer whose channels were all
    /// settled is known only from there). A failed write is warned about:
    /// the channel goes on, and its record still names the peer.
    pub(crate) async fn remember_peer_address(&self, core: &ChannelCore) {
        let Some((peer, address)) = self.note_peer_address(core) else {
            return;
        };
        self.store_peer_address(peer, address).await;
    }

    /// Stores a peer book entry (a failed write is warned about).
    async fn store_peer_address(&self, peer: PeerId, address: perun_channel::Address) {
        let key = format!("{PEER_KEY_PREFIX}{peer}");
        match self
            .persister
            .meta_put(&key, &peer_entry(&key, address))
            .await
        {
            Ok(()) | Err(perun_persistence::Error::MetaUnsupported) => {}
            Err(e) => warn!(%peer, error = %e, "could not store the peer's address"),
        }
    }

    /// Puts an entry in the memory book; whether it was new or changed.
    fn book_insert(&self, peer: PeerId, address: perun_channel::Address) -> bool {
        let mut book = lock(&self.peer_addresses);
        if book.len() >= PEER_BOOK
            && !book.contains_key(&peer)
            && let Some(any) = book.keys().next().copied()
        {
            book.remove(&any);
        }
        book.insert(peer, address) != Some(address)
    }

    /// The on-chain address `peer` had in a funded two-party channel with
    /// us, from memory or else from the store (bytes from disk: anything
    /// but 20 bytes is warned about and ignored).
    pub(crate) async fn peer_address(&self, peer: &PeerId) -> Option<perun_channel::Address> {
        if let Some(a) = lock(&self.peer_addresses).get(peer).copied() {
            return Some(a);
        }
        let key = format!("{PEER_KEY_PREFIX}{peer}");
        let bytes = match self.persister.meta_get(&key).await {
            Ok(b) => b?,
            Err(perun_persistence::Error::MetaUnsupported) => return None,
            Err(e) => {
                warn!(%peer, error = %e, "could not read the peer's address");
                return None;
            }
        };
        let address = <[u8; 24]>::try_from(bytes.as_slice())
            .ok()
            .map(|b| perun_channel::Address::from_slice(&b[..20]))
            .filter(|a| bytes.as_slice() == peer_entry(&key, *a));
        let Some(address) = address else {
            warn!(%peer, len = bytes.len(), "the stored peer address is damaged; ignored");
            return None;
        };
        self.book_insert(*peer, address);
        Some(address)
    }

    /// Tells the follower, if any, through `send` (`false`: it is gone).
    /// Called with `channels` locked, so the news keeps their order.
    fn tell(&self, send: impl FnOnce(&NewsTo) -> bool) {
        let mut news = lock(&self.channel_news);
        if news.as_ref().is_some_and(|to| !send(to)) {
            *news = None;
        }
    }

    /// From now on, `tx` learns of every channel that `wants` accepts: the
    /// ones the client holds now at once, each later one as it is
    /// inserted, each removal after it. Each comes with its updates
    /// subscribed at the same moment its baseline state is read, so no
    /// update is missed however late the follower runs (one that read
    /// the state itself once it ran missed what came before). Replaces an
    /// earlier follower.
    pub(crate) fn follow_channels(
        &self,
        wants: fn(&ChannelCore) -> bool,
        tx: tokio::sync::mpsc::UnboundedSender<ChannelNews>,
    ) {
        let channels = lock(&self.channels);
        let to = NewsTo { wants, tx };
        for core in channels.values() {
            to.added(core);
        }
        *lock(&self.channel_news) = Some(to);
    }

    /// Stops telling the follower.
    pub(crate) fn unfollow_channels(&self) {
        let _channels = lock(&self.channels);
        *lock(&self.channel_news) = None;
    }

    /// The update handler in charge now.
    pub(crate) fn update_handler(&self) -> Arc<dyn UpdateHandler> {
        self.update_handler
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every channel the client knows.
    pub(crate) fn channel_cores(&self) -> Vec<Arc<ChannelCore>> {
        lock(&self.channels).values().cloned().collect()
    }

    /// Whether the client is shutting down.
    pub(crate) fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Resolves once the client shuts down.
    pub(crate) async fn stopping(&self) {
        let mut stop = self.stop.subscribe();
        let _ = stop.wait_for(|s| *s).await;
    }

    /// Sends `msg` to every other participant at once; one result per peer.
    pub(crate) async fn broadcast(
        &self,
        core: &ChannelCore,
        msg: &Message,
    ) -> Vec<(PeerId, usize, perun_wire::Result<Message>)> {
        let mut others = core
            .peers
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != core.index);
        // Two parties, one peer: no joined futures to allocate.
        if core.peers.len() == 2
            && let Some((i, peer)) = others.next()
        {
            return vec![(*peer, i, self.wire.send(*peer, msg).await)];
        }
        let sends =
            others.map(|(i, peer)| async move { (*peer, i, self.wire.send(*peer, msg).await) });
        futures::future::join_all(sends).await
    }
}

/// A poisoned registry lock only means another task panicked mid-insert;
/// the map itself is still consistent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The machine plus what the protocol needs to know about its staged state.
#[derive(Debug)]
pub(crate) struct Locked {
    pub(crate) machine: Machine,
    /// Who proposed the staged state (unknown for a state restored from disk).
    pub(crate) staged_actor: Option<usize>,
    /// The highest version some participant signed in an update that then
    /// failed. Nobody may sign it again with other contents, so our next
    /// proposal skips past it. Stored with the channel ([`Locked::burn`]):
    /// after a restart a peer that signed it would refuse it again.
    pub(crate) burnt: u64,
    /// The hash of our last proposal that failed while a peer's answer was
    /// unknown (2-party channels): that peer may have signed and stored it,
    /// and its `Sync` may hand it back for us to complete. Only a state in
    /// here is ever completed from a peer's `Sync`: anything else a peer
    /// sends there is a state we never proposed.
    pub(crate) pending: Option<Pending2>,
    /// The last staged update we dropped as abandoned. If its proposer did
    /// complete it after all, its commit still applies.
    pub(crate) abandoned: Option<SignedState>,
    /// The version of a peer's commit we applied but have not stored yet:
    /// the machine's current state, held back from readers until it is
    /// durable. It rides along with our next write (in a tight loop: our
    /// signature on the next update), or is written on its own a moment
    /// later ([`COMMIT_FLUSH_DELAY`]). Our signed staged copy is on disk
    /// meanwhile, so a crash loses nothing a `Sync` cannot bring back.
    ///
    /// Only the version is kept, not a copy: while it is set, the machine's
    /// current state *is* that commit. Every other way the current state
    /// moves writes first (which stores the commit and clears this), or
    /// applies a newer commit and sets this anew (`hold_unsaved`).
    pub(crate) unsaved: Option<u64>,
    /// When we signed the staged state of a peer's update (or last asked
    /// for its commit): a commit that has not come `update_wait` later is
    /// asked for by `Sync` (`sync::sweep_commits`).
    pub(crate) signed_at: Option<std::time::Instant>,
    /// The commit of our last update, held back for a moment to ride with
    /// our next update (`UpdateWithCommit`) when we are updating back to
    /// back; sent on its own after [`COMMIT_RIDE_WAIT`] otherwise.
    pub(crate) held: Option<HeldCommit>,
    /// The version and time of our last update's commit: a proposal that
    /// starts on that very state within [`COMMIT_RIDE_WINDOW`] is part of
    /// a burst, so its own commit is held for the next one.
    pub(crate) last_own_commit: Option<(u64, std::time::Instant)>,
    /// A chore is queued to store `unsaved` (at most one per channel).
    pub(crate) flush_pending: bool,
    /// Wakes that chore's retry while it waits out its backoff after a
    /// failed write: a newer commit is tried at once, not after the wait.
    pub(crate) flush_retry: Option<Arc<tokio::sync::Notify>>,
}

/// The commit of a fully signed state of ours that no peer has yet: the
/// signatures are all a peer needs (it holds the state staged), so no copy
/// of the state is kept.
#[derive(Debug)]
pub(crate) struct HeldCommit {
    pub(crate) commit: perun_wire::UpdateCommit,
    pub(crate) in_flight: InFlight,
}

/// How long a held commit waits for our next update before it is sent on
/// its own: the peers see a burst's last state this much later.
pub(crate) const COMMIT_RIDE_WAIT: std::time::Duration = std::time::Duration::from_millis(1);
/// A proposal this soon after our previous commit, on that state, is part
/// of a burst.
pub(crate) const COMMIT_RIDE_WINDOW: std::time::Duration = std::time::Duration::from_millis(2);

/// Counts a commit, or a protocol run whose caller is gone
/// (`crate::to_end`), as in flight from creation until dropped (see
/// `Client::shutdown`). Weak: a held commit lives in the channel's lock,
/// which the client owns, and must not keep the client alive.
pub(crate) struct InFlight(std::sync::Weak<Shared>);

impl InFlight {
    pub(crate) fn new(shared: &Arc<Shared>) -> Self {
        shared.commits_in_flight.send_modify(|n| *n += 1);
        Self(Arc::downgrade(shared))
    }
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InFlight")
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(shared) = self.0.upgrade() {
            shared
                .commits_in_flight
                .send_modify(|n| *n = n.saturating_sub(1));
        }
    }
}

/// Our 2-party proposal that failed with the peer's answer unknown: the
/// proposed state's hash and the version of the state it was built on. Only
/// while the channel still stands on that base may a peer's `Sync`
/// complete it (on a newer base it would undo the updates in between).
/// A channel's current state only ever moves to a higher version
/// (`commit_staged` and `adopt` require one; restore builds a new core),
/// so while its version is the base's, it is the base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pending2 {
    pub(crate) proposal: perun_channel::B256,
    pub(crate) base: u64,
}

/// The phase a store keeps for `p`: `Updating` is a moment, not a place
/// (the store holds `Active` and the staged state meanwhile).
pub(crate) fn stored_phase(p: Phase) -> Phase {
    if p == Phase::Updating {
        Phase::Active
    } else {
        p
    }
}

/// How long a peer's commit may wait to ride along with our next write.
pub(crate) const COMMIT_FLUSH_DELAY: std::time::Duration = std::time::Duration::from_millis(1);

impl Locked {
    /// Drops the staged update (`Updating → Active`) and announces it.
    /// Only for a state nobody holds our signature on.
    pub(crate) fn drop_staged(&mut self, core: &ChannelCore) {
        if let Some(v) = self.machine.staged().map(|s| s.state.version) {
            core.dropped.send_replace(v);
        }
        let _ = self.machine.discard_staged();
        self.staged_actor = None;
        self.signed_at = None;
        self.announce(core);
    }

    /// Publishes the phase and the latest *durable* fully signed state.
    pub(crate) fn announce(&self, core: &ChannelCore) {
        core.publish(&self.machine, self.unsaved.is_some());
    }

    /// Durably writes `changes` for this channel. Every write of the
    /// channel goes through here, so an unsaved commit rides along with
    /// whichever write comes next (it is stored first). Returns whether one
    /// did; it is no longer unsaved then.
    ///
    /// An unsaved commit is stored with the machine's phase: a commit can
    /// move it (version 0 to `Funding`, a final state to `Final`), and a
    /// restart must find the channel in the phase its state belongs to (a
    /// responder of an n-party channel restored in `Signing0` would never
    /// fund). Later changes in `changes` still override it.
    pub(crate) async fn write(
        &mut self,
        shared: &Shared,
        core: &ChannelCore,
        changes: Vec<Change>,
    ) -> Result<bool> {
        debug_assert!(
            self.unsaved.is_none()
                || self.unsaved == self.machine.current().map(|c| c.state.version),
            "an unsaved commit is the machine's current state"
        );
        let held = self.unsaved.and(self.machine.current());
        let carried = held.is_some();
        let changes = match held {
            Some(u) => [
                Change::Committed(u.clone()),
                Change::Phase(stored_phase(self.machine.phase())),
            ]
            .into_iter()
            .chain(changes)
            .collect(),
            None => changes,
        };
        persist(shared, core.id, changes).await?;
        if carried && let Some(u) = self.machine.current() {
            self.unsaved = None;
            // Durable now: readers see it before whatever this write
            // carries (a payment to us must not be netted away by our
            // next payment back).
            core.publish_state(u);
        }
        Ok(carried)
    }

    /// Writes the unsaved commit on its own, if it is still unsaved (no
    /// write otherwise).
    pub(crate) async fn flush_unsaved(
        &mut self,
        shared: &Shared,
        core: &ChannelCore,
    ) -> Result<()> {
        if self.unsaved.is_none() {
            return Ok(());
        }
        if self.write(shared, core, Vec::new()).await? {
            self.announce(core);
        }
        Ok(())
    }

    /// Makes `trial`, whose current state is newly fully signed, the
    /// machine (no write: callers write first, or hold it as unsaved).
    pub(crate) fn install(&mut self, trial: Machine) {
        self.machine = trial;
        self.installed();
    }

    /// What follows a newly fully signed current state, however the machine
    /// got it: no staged proposal is pending any more. A newer staged one
    /// that outlived the adoption of a state from a `Sync` (`Machine::adopt`
    /// keeps it; an abandoned update's commit is adopted only with nothing
    /// staged) was checked against an older state: completed, it would
    /// undo the adopted one. It is dropped
    /// as abandoned (its version burnt); it once stayed staged with no
    /// actor, and the channel in `Updating` until a restart.
    /// Callers announce.
    pub(crate) fn installed(&mut self) {
        if let Some(version) = self.machine.staged().map(|s| s.state.version) {
            debug!(
                version,
                "a newer state was adopted under a staged update; dropping it"
            );
            self.set_abandoned();
            let _ = self.machine.discard_staged();
        }
        let v = self.machine.current().map_or(0, |c| c.state.version);
        self.staged_actor = None;
        self.signed_at = None;
        self.abandoned = self.abandoned.take().filter(|a| a.state.version > v);
    }

    /// Drops a staged update that some participant may have signed: its
    /// version is burnt. The store keeps the staged state, which is our
    /// record of what we signed, until a newer state replaces it.
    pub(crate) fn abandon_staged(&mut self, core: &ChannelCore) {
        self.set_abandoned();
        self.drop_staged(core);
    }

    /// Burns the staged update's version and keeps it as `abandoned` (its
    /// commit may still come); the machine still holds it staged.
    fn set_abandoned(&mut self) {
        if let Some(s) = self.machine.staged().cloned() {
            self.note_burnt(s.state.version);
            self.abandoned = Some(s);
        }
    }

    /// Records that `version` is burnt (some participant signed it in a
    /// failed update), as far as a proposal can still skip it: at most
    /// `MAX_VERSION_STEP - 1` past the current state, so a peer that names
    /// a huge version (in an abort or a `Sync`) cannot push our next
    /// proposal out of reach.
    pub(crate) fn note_burnt(&mut self, version: u64) {
        let cur = self.machine.current().map_or(0, |c| c.state.version);
        let cap = cur.saturating_add(perun_channel::limits::MAX_VERSION_STEP - 1);
        self.burnt = self.burnt.max(version.min(cap));
    }

    /// [`note_burnt`](Self::note_burnt), stored with the channel if it
    /// moved: a proposal of ours after a restart must still skip it (a peer
    /// that signed it refuses that version for good). A failed write is
    /// logged and the burnt version kept in memory: it only costs a
    /// `Conflict` after a restart, and that conflict burns it again.
    pub(crate) async fn burn(&mut self, shared: &Shared, core: &ChannelCore, version: u64) {
        let before = self.burnt;
        self.note_burnt(version);
        if self.burnt == before {
            return;
        }
        match self
            .write(shared, core, vec![Change::Burnt(self.burnt)])
            .await
        {
            Ok(true) => self.announce(core),
            Ok(false) => {}
            Err(e) => {
                warn!(channel = %core.id, burnt = self.burnt, error = %e, "could not store the burnt version");
            }
        }
    }

    /// The version our next proposal gets: past the current state, past
    /// anything we signed and past every version known to be burnt.
    pub(crate) fn next_version(&self) -> Option<u64> {
        let cur = self.machine.current()?.state.version;
        let signed = self.machine.last_signed().map_or(0, |(v, _)| v);
        cur.max(signed).max(self.burnt).checked_add(1)
    }

    /// Makes `trial`, whose current state is newly fully signed, the
    /// machine: persisted first (with its phase if that moved), then
    /// announced. On error nothing changed.
    pub(crate) async fn commit_trial(
        &mut self,
        shared: &Shared,
        core: &ChannelCore,
        trial: Machine,
    ) -> Result<SignedState> {
        let full = trial
            .current()
            .cloned()
            .ok_or(Error::Channel(perun_channel::Error::NothingStaged))?;
        self.store_commit(shared, core, &full, trial.phase())
            .await?;
        self.install(trial);
        self.announce(core);
        Ok(full)
    }

    /// [`commit_trial`](Self::commit_trial) without a copy of the machine:
    /// `full` is the staged state with our signature, `signed`, on it
    /// ([`Machine::sign_staged_copy`]). It is persisted first; only then
    /// does the machine take the signature (so a caller dropped during the
    /// write leaves none in memory for a `Sync` to hand out), commit in
    /// place and announce. On error the machine holds the state staged,
    /// unsigned by us (the caller drops it).
    pub(crate) async fn commit_signed(
        &mut self,
        shared: &Shared,
        core: &ChannelCore,
        full: SignedState,
        signed: perun_channel::Presigned,
    ) -> Result<SignedState> {
        // `full` and `signed` come from the staged state as it still is
        // (the lock is held): nothing else may be stored as committed.
        if self.machine.staged_hash() != Some(signed.hash()) {
            return Err(Error::Conflict);
        }
        let after = self.machine.committed_phase_of(&full)?;
        self.store_commit(shared, core, &full, after).await?;
        self.machine
            .sign_staged_with(shared.account.as_ref(), Some(signed))?;
        self.machine.commit_staged()?;
        self.installed();
        self.announce(core);
        Ok(full)
    }

    /// Durably writes `full` as the current state, with `after`, the phase
    /// its commit moves the machine to, if that is stored differently (a
    /// plain update writes the state alone).
    async fn store_commit(
        &mut self,
        shared: &Shared,
        core: &ChannelCore,
        full: &SignedState,
        after: Phase,
    ) -> Result<()> {
        let mut changes = vec![Change::Committed(full.clone())];
        if stored_phase(after) != stored_phase(self.machine.phase()) {
            changes.push(Change::Phase(after));
        }
        self.write(shared, core, changes).await.map(|_| ())
    }
}

/// States an `updates()` reader may fall behind by before it skips some.
const UPDATE_BUFFER: usize = 256;
/// Channel events an `events()` reader may fall behind by.
const EVENT_BUFFER: usize = 256;
/// Registered states remembered per channel (to conclude with).
const REGISTERED_MEMORY: usize = 8;

/// Everything about one channel that the controller and the protocol tasks share.
#[derive(Debug)]
pub(crate) struct ChannelCore {
    pub(crate) id: ChannelId,
    pub(crate) params: Arc<Params>,
    pub(crate) index: usize,
    pub(crate) peers: Vec<PeerId>,
    /// Protocol steps take this lock; readers never do.
    pub(crate) locked: tokio::sync::Mutex<Locked>,
    /// One local update at a time (held by the update's task, which may
    /// outlive its caller).
    pub(crate) update_lock: Arc<tokio::sync::Mutex<()>>,
    /// The latest fully signed state, for lock-free reads (before version 0
    /// is fully signed: the staged version 0; no `Channel` exists yet then).
    pub(crate) state: watch::Sender<SignedState>,
    phase: watch::Sender<Phase>,
    /// `false` while a restored channel's first `Sync` runs: we propose
    /// only after it, so a peer never gets our update before our Sync.
    pub(crate) synced: watch::Sender<bool>,
    /// The version of the last staged update dropped uncommitted (given
    /// up, superseded, refused): the payments layer ends the claim of the
    /// update it let in at that version. Only that version: an older one
    /// may be committed, and booked only with our next write.
    pub(crate) dropped: watch::Sender<u64>,
    /// The newest version of a peer's update we signed (at a restore: of
    /// any state we signed): an expected payment counts only money in
    /// later states.
    pub(crate) answered: std::sync::atomic::AtomicU64,
    /// Created on the first `updates()` call: a channel nobody listens to
    /// costs no buffer (10,000 channels in one client must stay small).
    pub(crate) updates: OnceLock<broadcast::Sender<SignedState>>,
    /// Events for the application; created on first use.
    pub(crate) events: OnceLock<broadcast::Sender<ChannelEvent>>,
    /// What the watcher reports about itself (`Starting` or `Watching`:
    /// its task runs).
    pub(crate) watch_status: watch::Sender<WatchStatus>,
    /// Wakes the watcher for a fresh look at the chain (settle, a phase change).
    pub(crate) nudge: Notify,
    /// `settle` was called: a final state is concluded at once (otherwise
    /// the watcher gives the peer that asked for it time to do so).
    pub(crate) settling: AtomicBool,
    /// Our commits may ride with our next update (`UpdateWithCommit`);
    /// off once a peer could not read one.
    pub(crate) rides: AtomicBool,
    /// States seen in `Registered` events, to conclude with (bounded).
    registered: Mutex<Vec<State>>,
    /// The version (+ 1; 0: none) whose conclusion the watcher announced,
    /// so a conclusion that waits out a challenge period is announced once,
    /// not at every poll.
    pub(crate) conclude_announced: std::sync::atomic::AtomicU64,
    /// Our moves in an app channel's on-chain dispute; created on first use.
    forced: OnceLock<Forced>,
}

/// Our move in an app channel's on-chain dispute: `to`, signed by us alone,
/// follows the registered state `from` (sent by the watcher once its
/// window opens; see `force` and `watcher::progress`). `from` is `None` for
/// a move restored from the store: it follows whatever registered state
/// it is a valid move of ours from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ForcedMove {
    pub(crate) from: Option<State>,
    pub(crate) to: State,
    pub(crate) signature: perun_channel::Signature,
}

/// Where our latest forced move stands; moves are named by their hash.
#[derive(Debug, Clone, Default)]
pub(crate) enum Forcing {
    /// No move of ours waits.
    #[default]
    Idle,
    /// Signed, waiting for its window on-chain.
    Pending(Box<ForcedMove>),
    /// The dispute's state is this move of ours.
    Landed(perun_channel::B256),
    /// This move of ours will never land.
    Moot(perun_channel::B256, crate::error::MootReason),
}

/// An app channel's dispute as this client takes part in it.
#[derive(Debug, Default)]
pub(crate) struct Forced {
    /// Our pending or last move.
    pub(crate) status: watch::Sender<Forcing>,
    /// The hash of the registered state we last announced as our move.
    pub(crate) announced: Mutex<Option<perun_channel::B256>>,
    /// Our refutation came too late: the registered state stands, and a
    /// move must follow it, not our latest state.
    pub(crate) refute_closed: AtomicBool,
}

impl ChannelCore {
    /// A channel's core; `burnt` as stored with it (0 for a new channel).
    pub(crate) fn new(machine: Machine, peers: Vec<PeerId>, burnt: u64) -> Result<Arc<Self>> {
        let params = machine.params().clone();
        let snapshot = machine
            .current()
            .or(machine.staged())
            .cloned()
            .ok_or(Error::Channel(perun_channel::Error::NothingStaged))?;
        let (state, _) = watch::channel(snapshot);
        let (phase, _) = watch::channel(machine.phase());
        let (synced, _) = watch::channel(true);
        // A restored update still staged: its proposer is not stored, so
        // the commit sweep asks every peer about it `update_wait` from now.
        let signed_at = (machine.phase() == Phase::Updating).then(std::time::Instant::now);
        // Restored: the newest version we signed, a peer's staged update
        // included (an expected payment counts only later states).
        let answered = machine.last_signed().map_or(0, |(v, _)| v);
        Ok(Arc::new(Self {
            id: params.channel_id(),
            index: machine.index(),
            params: Arc::new(params),
            peers,
            locked: tokio::sync::Mutex::new(Locked {
                machine,
                staged_actor: None,
                burnt,
                pending: None,
                abandoned: None,
                unsaved: None,
                signed_at,
                held: None,
                last_own_commit: None,
                flush_pending: false,
                flush_retry: None,
            }),
            update_lock: Arc::new(tokio::sync::Mutex::new(())),
            state,
            phase,
            synced,
            dropped: watch::channel(0).0,
            answered: std::sync::atomic::AtomicU64::new(answered),
            updates: OnceLock::new(),
            events: OnceLock::new(),
            watch_status: watch::channel(WatchStatus::Idle).0,
            nudge: Notify::new(),
            settling: AtomicBool::new(false),
            rides: AtomicBool::new(true),
            registered: Mutex::new(Vec::new()),
            conclude_announced: std::sync::atomic::AtomicU64::new(0),
            forced: OnceLock::new(),
        }))
    }

    /// Hands an event to the application's `events()` streams, if any.
    pub(crate) fn emit(&self, ev: ChannelEvent) {
        if let Some(tx) = self.events.get() {
            let _ = tx.send(ev);
        }
    }

    /// A receiver of the channel's events (creating the buffer on first use).
    pub(crate) fn subscribe_events(&self) -> broadcast::Receiver<ChannelEvent> {
        self.events
            .get_or_init(|| broadcast::channel(EVENT_BUFFER).0)
            .subscribe()
    }

    /// A receiver of the channel's new fully signed states.
    pub(crate) fn subscribe_updates(&self) -> broadcast::Receiver<SignedState> {
        self.updates
            .get_or_init(|| broadcast::channel(UPDATE_BUFFER).0)
            .subscribe()
    }

    /// Remembers a state seen registered on-chain (the last few only).
    pub(crate) fn note_registered(&self, state: State) {
        let mut r = lock(&self.registered);
        if !r.contains(&state) {
            if r.len() >= REGISTERED_MEMORY {
                r.remove(0);
            }
            r.push(state);
        }
    }

    /// Our moves in this (app) channel's dispute.
    pub(crate) fn forced(&self) -> &Forced {
        self.forced.get_or_init(Forced::default)
    }

    /// After a restore: a move of ours the store holds signed (the staged
    /// state of a channel closing on-chain, signed by us alone) goes on
    /// waiting for its window, as it did before the restart.
    pub(crate) fn resume_forced_move(&self) {
        if self.params.is_payment() || !matches!(self.phase(), Phase::Registered) {
            return;
        }
        let Ok(l) = self.locked.try_lock() else {
            return;
        };
        let Some(staged) = l.machine.staged() else {
            return;
        };
        let mine = staged.sigs.get(self.index).cloned().flatten();
        let others = staged
            .sigs
            .iter()
            .enumerate()
            .any(|(i, s)| i != self.index && s.is_some());
        if let (Some(signature), false) = (mine, others) {
            tracing::info!(channel = %self.id, version = staged.state.version, "resuming our forced move");
            self.forced()
                .status
                .send_replace(Forcing::Pending(Box::new(ForcedMove {
                    from: None,
                    to: staged.state.clone(),
                    signature,
                })));
        }
    }

    /// The state whose hash is on-chain in `d`: `latest`, one a
    /// registration or progression event showed, or our staged one.
    pub(crate) fn registered_state(
        &self,
        d: &perun_adjudicator::Dispute,
        latest: Option<&SignedState>,
    ) -> Option<State> {
        if let Some(l) = latest
            && l.state.hash() == d.state_hash
        {
            return Some(l.state.clone());
        }
        self.registered_matching(d.state_hash)
            .or_else(|| self.staged_matching(d.state_hash))
    }

    /// Our staged state if `hash` is its hash: an update we signed that the
    /// peer completed and registered without committing it to us. Known
    /// without any event; `None` while a protocol step holds the channel.
    pub(crate) fn staged_matching(&self, hash: perun_channel::B256) -> Option<State> {
        let l = self.locked.try_lock().ok()?;
        if l.machine.staged_hash()? != hash {
            return None;
        }
        l.machine.staged().map(|s| s.state.clone())
    }

    /// A remembered registered state with this hash.
    pub(crate) fn registered_matching(&self, hash: perun_channel::B256) -> Option<State> {
        lock(&self.registered)
            .iter()
            .find(|s| s.hash() == hash)
            .cloned()
    }

    /// The latest fully signed state.
    pub(crate) async fn latest(&self) -> Option<SignedState> {
        self.locked.lock().await.machine.current().cloned()
    }

    /// The latest fully signed state, for an on-chain step: if the
    /// channel's lock stays taken for [`LOCAL_WAIT`] (a write that does not
    /// return holds it), the latest one readers were shown, which is
    /// durable and at most a peer's commit not stored yet behind.
    pub(crate) async fn latest_for_chain(&self) -> Option<SignedState> {
        match tokio::time::timeout(LOCAL_WAIT, self.locked.lock()).await {
            Ok(l) => l.machine.current().cloned(),
            Err(_) => {
                warn!(channel = %self.id, "the channel stayed busy (a write that does not return?); acting on its last published state");
                let shown = self.state.borrow().clone();
                shown.is_fully_signed().then_some(shown)
            }
        }
    }

    /// Publishes the machine's phase and, unless `hold_state` (it is not
    /// durable yet), its current state to readers; announces a new fully
    /// signed state on the updates stream. Use [`Locked::announce`].
    /// Publishes `st` (durable and fully signed) if it is newer than what
    /// readers have.
    pub(crate) fn publish_state(&self, st: &SignedState) {
        let newer = {
            let old = self.state.borrow();
            st.state.version > old.state.version || !old.is_fully_signed()
        };
        if newer {
            // The state first, then the stream: a follower that subscribes
            // and then reads the state (`Shared::follow_channels`) loses
            // nothing in between.
            self.state.send_modify(|old| old.clone_from(st));
            if let Some(tx) = self.updates.get() {
                let _ = tx.send(st.clone());
            }
        }
    }

    fn publish(&self, m: &Machine, hold_state: bool) {
        if let Some(cur) = m.current().filter(|_| !hold_state) {
            self.publish_state(cur);
        }
        let changed = self.phase.send_if_modified(|p| {
            let changed = *p != m.phase();
            *p = m.phase();
            changed
        });
        if changed {
            self.emit(ChannelEvent::Phase(m.phase()));
            // The watcher acts on closing phases at once (not on Active ⇄
            // Updating: that would wake it on every update).
            if matches!(
                m.phase(),
                Phase::Final | Phase::Registered | Phase::Concluded
            ) {
                self.nudge.notify_one();
            }
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// A receiver of phase changes.
    pub(crate) fn phase_changes(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// A receiver of every phase change (each `publish` wakes it, also
    /// when the phase comes back to what it was).
    pub(crate) fn subscribe_phase(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Waits until `pred(phase)` holds or `timeout` passes.
    pub(crate) async fn wait_phase(
        &self,
        timeout: std::time::Duration,
        what: &'static str,
        pred: impl Fn(Phase) -> bool,
    ) -> Result<Phase> {
        let mut rx = self.phase.subscribe();
        let res = tokio::time::timeout(timeout, rx.wait_for(|p| pred(*p))).await;
        match res {
            Ok(Ok(p)) => Ok(*p),
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout(what)),
        }
    }

    /// A new channel's record (nothing burnt yet).
    pub(crate) fn record(&self, m: &Machine) -> ChannelRecord {
        ChannelRecord {
            params: Params::clone(&self.params),
            index: self.index,
            phase: m.phase(),
            current: m.current().cloned(),
            staged: m.staged().cloned(),
            peers: self.peers.iter().map(|p| p.to_bytes()).collect(),
            metadata: Vec::new(),
            burnt: 0,
        }
    }

    pub(crate) fn peer_index(&self, peer: &PeerId) -> Option<usize> {
        self.peers.iter().position(|p| p == peer)
    }

    /// Every participant but us, with their index.
    pub(crate) fn others(&self) -> impl Iterator<Item = (usize, PeerId)> + '_ {
        self.peers
            .iter()
            .copied()
            .enumerate()
            .filter(|(i, _)| *i != self.index)
    }
}

/// Persists `changes` for channel `id`.
pub(crate) async fn persist(shared: &Shared, id: ChannelId, changes: Vec<Change>) -> Result<()> {
    shared
        .persister
        .update(id, changes)
        .await
        .map_err(Error::from)
}

/// Moves the channel to the closing phase `to` unless it is there or past
/// it (decided under the channel's lock). The phase moves in memory first
/// (no more updates), then is stored; a failed write is returned for the
/// caller to log, and a caller may drop a write that does not return (see
/// [`enter_closing_within`]): an on-chain step must not wait for a disk.
/// A restart then finds the old phase on disk, and the watcher moves it
/// again.
pub(crate) async fn enter_closing(shared: &Shared, core: &ChannelCore, to: Phase) -> Result<()> {
    let mut l = core.locked.lock().await;
    if closing_reached(l.machine.phase(), to) {
        return Ok(());
    }
    let mut trial = l.machine.clone();
    trial.set_phase(to)?;
    l.machine = trial;
    l.announce(core);
    l.write(shared, core, vec![Change::Phase(to)])
        .await
        .map(|_| ())
}

/// Whether a channel in phase `now` is at the closing phase `to` or past it.
fn closing_reached(now: Phase, to: Phase) -> bool {
    now == to || now >= to && now >= Phase::Registered
}

/// How long an on-chain step waits for the channel's lock or a local write
/// before it acts without them: a store that hangs (a stalled disk or
/// mount) must not keep a refutation from the chain.
pub(crate) const LOCAL_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// [`enter_closing`] for an on-chain step: it runs on a task of its own,
/// and the step waits for it at most [`LOCAL_WAIT`] (warning), then goes
/// on while the write may still finish. A task, not a timeout around the
/// future: a store may write on the caller's thread (redb's idle path), and
/// an `fsync` that hangs there blocks the thread, timeout and all.
pub(crate) async fn enter_closing_within(shared: &Arc<Shared>, core: &Arc<ChannelCore>, to: Phase) {
    // Moved already (also by a write still hanging: the phase moves in
    // memory before the write): no second task.
    if closing_reached(core.phase(), to) {
        return;
    }
    let (s, c) = (shared.clone(), core.clone());
    let write = tokio::spawn(async move { enter_closing(&s, &c, to).await });
    match tokio::time::timeout(LOCAL_WAIT, write).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => {
            warn!(error = %e, phase = ?to, "could not store the closing phase; acting anyway")
        }
        Ok(Err(e)) => {
            warn!(error = %e, phase = ?to, "the closing phase's write task failed; acting anyway")
        }
        Err(_) => warn!(
            phase = ?to,
            "the store did not answer within {LOCAL_WAIT:?}; acting without it"
        ),
    }
}

/// Moves the channel to phase `to` and persists it (a no-op if it is there).
///
/// `Withdrawn` is persisted by removing the channel's record: our funds are
/// out, nothing is at stake any more, and a store that kept every closed
/// channel would grow, and slow every restore, forever. A restart then does
/// not know the channel at all.
pub(crate) async fn set_phase(shared: &Shared, core: &ChannelCore, to: Phase) -> Result<()> {
    let mut l = core.locked.lock().await;
    if l.machine.phase() == to {
        return Ok(());
    }
    let mut trial = l.machine.clone();
    trial.set_phase(to)?;
    if to == Phase::Withdrawn {
        match shared.persister.channel_removed(core.id).await {
            // Removed already (a repeated call).
            Ok(()) | Err(perun_persistence::Error::UnknownChannel(_)) => {}
            Err(e) => return Err(e.into()),
        }
        l.unsaved = None;
    } else {
        l.write(shared, core, vec![Change::Phase(to)]).await?;
    }
    l.machine = trial;
    // Before the news: whoever sees `Withdrawn` sees the client trimmed.
    match to {
        Phase::Active => shared.remember_peer_address(core).await,
        Phase::Withdrawn => {
            shared.keep_peer_address(core).await;
            shared.retire_channel(core.id);
        }
        _ => {}
    }
    l.announce(core);
    Ok(())
}
