//! The `Channel` controller and the per-channel state it shares with the
//! protocol tasks.

use std::sync::Arc;

use perun_channel::{ChannelId, Machine, Params, Phase, SignedState, State, U256};
use perun_persistence::{Change, ChannelRecord};
use perun_wire::PeerId;
use std::sync::OnceLock;
use std::sync::atomic::AtomicBool;

use perun_adjudicator::AdjudicatorEvent;
use tokio::sync::{Mutex, broadcast, watch};

use crate::client::Inner;
use crate::{Error, Result};

/// The machine plus what the protocol needs to know about its staged state.
#[derive(Debug)]
pub(crate) struct Locked {
    pub(crate) machine: Machine,
    /// Who proposed the staged state (unknown for a state restored from disk).
    pub(crate) staged_actor: Option<usize>,
    /// The highest version some participant signed in an update that then
    /// failed. Nobody may sign it again with other contents, so our next
    /// proposal skips past it.
    pub(crate) burnt: u64,
    /// The hash of our last proposal that failed while a peer's answer was
    /// unknown (2-party channels): that peer may have signed and stored it,
    /// and its `Sync` may hand it back for us to complete. Only a state in
    /// here is ever completed from a peer's `Sync`: anything else a peer
    /// sends there is a state we never proposed.
    pub(crate) pending: Option<perun_channel::B256>,
    /// The last staged update we dropped as abandoned. If its proposer did
    /// complete it after all, its commit still applies.
    pub(crate) abandoned: Option<SignedState>,
    /// A peer's commit we applied but have not stored yet: the machine's
    /// current state, held back from readers until it is durable. It rides
    /// along with our next write (in a tight loop: our signature on the
    /// next update), or is written on its own a moment later
    /// ([`COMMIT_FLUSH_DELAY`]). Our signed staged copy is on disk
    /// meanwhile, so a crash loses nothing a `Sync` cannot bring back.
    pub(crate) unsaved: Option<SignedState>,
}

/// How long a peer's commit may wait to ride along with our next write.
pub(crate) const COMMIT_FLUSH_DELAY: std::time::Duration = std::time::Duration::from_millis(1);

impl Locked {
    /// Drops the staged update (`Updating → Active`) and announces it.
    /// Only for a state nobody holds our signature on.
    pub(crate) fn drop_staged(&mut self, core: &ChannelCore) {
        let _ = self.machine.discard_staged();
        self.staged_actor = None;
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
    pub(crate) async fn write(
        &mut self,
        inner: &Inner,
        core: &ChannelCore,
        changes: Vec<Change>,
    ) -> Result<bool> {
        let carried = self.unsaved.is_some();
        let changes = match &self.unsaved {
            Some(u) => std::iter::once(Change::Committed(u.clone()))
                .chain(changes)
                .collect(),
            None => changes,
        };
        persist(inner, core.id, changes).await?;
        self.unsaved = None;
        Ok(carried)
    }

    /// Writes the unsaved commit on its own, if it is still unsaved.
    pub(crate) async fn flush_unsaved(&mut self, inner: &Inner, core: &ChannelCore) -> Result<()> {
        if self.write(inner, core, Vec::new()).await? {
            self.announce(core);
        }
        Ok(())
    }

    /// Makes `trial`, whose current state is newly fully signed, the
    /// machine (no write: callers write first, or hold it as unsaved).
    pub(crate) fn install(&mut self, trial: Machine) {
        let v = trial.current().map_or(0, |c| c.state.version);
        self.machine = trial;
        self.staged_actor = None;
        self.abandoned = self.abandoned.take().filter(|a| a.state.version > v);
    }

    /// Drops a staged update that some participant may have signed: its
    /// version is burnt. The store keeps the staged state, which is our
    /// record of what we signed, until a newer state replaces it.
    pub(crate) fn abandon_staged(&mut self, core: &ChannelCore) {
        if let Some(s) = self.machine.staged() {
            self.burnt = self.burnt.max(s.state.version);
            self.abandoned = Some(s.clone());
        }
        self.drop_staged(core);
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
        inner: &Inner,
        core: &ChannelCore,
        trial: Machine,
    ) -> Result<SignedState> {
        let full = trial
            .current()
            .cloned()
            .ok_or(Error::Channel(perun_channel::Error::NothingStaged))?;
        // `Updating` is never stored (the store holds `Active` meanwhile),
        // so a plain update writes the state alone.
        let stored = |p: Phase| {
            if p == Phase::Updating {
                Phase::Active
            } else {
                p
            }
        };
        let mut changes = vec![Change::Committed(full.clone())];
        if stored(trial.phase()) != stored(self.machine.phase()) {
            changes.push(Change::Phase(trial.phase()));
        }
        self.write(inner, core, changes).await?;
        self.install(trial);
        self.announce(core);
        Ok(full)
    }
}

/// States an `updates()` reader may fall behind by before it skips some.
const UPDATE_BUFFER: usize = 256;
/// Chain events an `events()` reader may fall behind by.
const EVENT_BUFFER: usize = 64;

/// Everything about one channel that the controller and the protocol tasks share.
#[derive(Debug)]
pub(crate) struct ChannelCore {
    pub(crate) id: ChannelId,
    pub(crate) params: Params,
    pub(crate) index: usize,
    pub(crate) peers: Vec<PeerId>,
    /// Protocol steps take this lock; readers never do.
    pub(crate) locked: Mutex<Locked>,
    /// One local update at a time.
    pub(crate) update_lock: Mutex<()>,
    /// The latest fully signed state, for lock-free reads (before version 0
    /// is fully signed: the staged version 0; no `Channel` exists yet then).
    state: watch::Sender<SignedState>,
    phase: watch::Sender<Phase>,
    /// `false` while a restored channel's first `Sync` runs: we propose
    /// only after it, so a peer never gets our update before our Sync.
    pub(crate) synced: watch::Sender<bool>,
    /// Created on the first `updates()` call: a channel nobody listens to
    /// costs no buffer (10,000 channels in one client must stay small).
    updates: OnceLock<broadcast::Sender<SignedState>>,
    /// Chain events, re-broadcast to the application; created on first use.
    events: OnceLock<broadcast::Sender<AdjudicatorEvent>>,
    /// Whether a watcher task runs for this channel.
    pub(crate) watching: AtomicBool,
    /// Serialises dispute steps (watcher, settle).
    pub(crate) act_lock: Mutex<()>,
    /// States seen in `Registered` events, to conclude with (bounded).
    registered: std::sync::Mutex<Vec<State>>,
}

impl ChannelCore {
    pub(crate) fn new(machine: Machine, peers: Vec<PeerId>) -> Result<Arc<Self>> {
        let params = machine.params().clone();
        let snapshot = machine
            .current()
            .or(machine.staged())
            .cloned()
            .ok_or(Error::Channel(perun_channel::Error::NothingStaged))?;
        let (state, _) = watch::channel(snapshot);
        let (phase, _) = watch::channel(machine.phase());
        let (synced, _) = watch::channel(true);
        Ok(Arc::new(Self {
            id: params.channel_id(),
            index: machine.index(),
            params,
            peers,
            locked: Mutex::new(Locked {
                machine,
                staged_actor: None,
                burnt: 0,
                pending: None,
                abandoned: None,
                unsaved: None,
            }),
            update_lock: Mutex::new(()),
            state,
            phase,
            synced,
            updates: OnceLock::new(),
            events: OnceLock::new(),
            watching: AtomicBool::new(false),
            act_lock: Mutex::new(()),
            registered: std::sync::Mutex::new(Vec::new()),
        }))
    }

    /// Hands a chain event to the application's `events()` streams, if any.
    pub(crate) fn announce(&self, ev: AdjudicatorEvent) {
        if let Some(tx) = self.events.get() {
            let _ = tx.send(ev);
        }
    }

    /// Remembers a state seen registered on-chain (the last few only).
    pub(crate) fn note_registered(&self, state: State) {
        let mut r = crate::client::lock(&self.registered);
        if !r.contains(&state) {
            if r.len() >= 8 {
                r.remove(0);
            }
            r.push(state);
        }
    }

    /// A remembered registered state with this hash.
    pub(crate) fn registered_matching(&self, hash: perun_channel::B256) -> Option<State> {
        crate::client::lock(&self.registered)
            .iter()
            .find(|s| s.hash() == hash)
            .cloned()
    }

    /// The latest fully signed state.
    pub(crate) async fn latest(&self) -> Option<SignedState> {
        self.locked.lock().await.machine.current().cloned()
    }

    /// Publishes the machine's phase and, unless `hold_state` (it is not
    /// durable yet), its current state to readers; announces a new fully
    /// signed state on the updates stream. Use [`Locked::announce`].
    fn publish(&self, m: &Machine, hold_state: bool) {
        if let Some(cur) = m.current().filter(|_| !hold_state) {
            let newer = {
                let old = self.state.borrow();
                cur.state.version > old.state.version || !old.is_fully_signed()
            };
            if newer {
                self.state.send_replace(cur.clone());
                if let Some(tx) = self.updates.get() {
                    let _ = tx.send(cur.clone());
                }
            }
        }
        self.phase.send_if_modified(|p| {
            let changed = *p != m.phase();
            *p = m.phase();
            changed
        });
    }

    pub(crate) fn phase(&self) -> Phase {
        *self.phase.borrow()
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

    pub(crate) fn record(&self, m: &Machine) -> ChannelRecord {
        ChannelRecord {
            params: self.params.clone(),
            index: self.index,
            phase: m.phase(),
            current: m.current().cloned(),
            staged: m.staged().cloned(),
            peers: self.peers.iter().map(|p| p.to_bytes()).collect(),
            metadata: Vec::new(),
        }
    }

    pub(crate) fn peer_index(&self, peer: &PeerId) -> Option<usize> {
        self.peers.iter().position(|p| p == peer)
    }
}

/// A handle on one open channel. Cheap to clone; all clones control the
/// same channel.
#[derive(Clone)]
pub struct Channel {
    pub(crate) core: Arc<ChannelCore>,
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("id", &self.core.id)
            .field("index", &self.core.index)
            .field("phase", &self.core.phase())
            .finish()
    }
}

/// New fully signed states of a channel, in version order.
#[derive(Debug)]
pub struct UpdateStream {
    rx: broadcast::Receiver<SignedState>,
}

impl UpdateStream {
    /// The next new state. States missed by a slow reader are skipped (the
    /// latest one is always delivered); `None` once the client is gone.
    pub async fn next(&mut self) -> Option<SignedState> {
        loop {
            match self.rx.recv().await {
                Ok(s) => return Some(s),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// A channel's on-chain events, in chain order.
#[derive(Debug)]
pub struct EventStream {
    rx: broadcast::Receiver<AdjudicatorEvent>,
}

impl EventStream {
    /// The next event; `None` once the client is gone. Events missed by a
    /// slow reader are skipped.
    pub async fn next(&mut self) -> Option<AdjudicatorEvent> {
        loop {
            match self.rx.recv().await {
                Ok(e) => return Some(e),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

impl Channel {
    pub(crate) fn new(core: Arc<ChannelCore>, inner: Arc<Inner>) -> Self {
        Self { core, inner }
    }

    /// The channel id.
    pub fn id(&self) -> ChannelId {
        self.core.id
    }

    /// The channel's fixed parameters.
    pub fn params(&self) -> &Params {
        &self.core.params
    }

    /// Our participant index.
    pub fn index(&self) -> usize {
        self.core.index
    }

    /// The participants' network ids, in participant order.
    pub fn peers(&self) -> &[PeerId] {
        &self.core.peers
    }

    /// The latest fully signed state. Never waits for an update in flight.
    pub fn state(&self) -> SignedState {
        self.core.state.borrow().clone()
    }

    /// The channel's phase.
    pub fn phase(&self) -> Phase {
        self.core.phase()
    }

    /// The channel's on-chain events (registrations, conclusion,
    /// withdrawals) as the watcher sees them, from now on.
    pub fn events(&self) -> EventStream {
        let tx = self
            .core
            .events
            .get_or_init(|| broadcast::channel(EVENT_BUFFER).0);
        EventStream { rx: tx.subscribe() }
    }

    /// A stream of the channel's new fully signed states.
    pub fn updates(&self) -> UpdateStream {
        let tx = self
            .core
            .updates
            .get_or_init(|| broadcast::channel(UPDATE_BUFFER).0);
        UpdateStream { rx: tx.subscribe() }
    }

    /// Waits until the channel reaches `phase` (e.g. `Withdrawn` after a
    /// dispute the watcher runs), or `timeout` passes.
    pub async fn wait_for_phase(&self, phase: Phase, timeout: std::time::Duration) -> Result<()> {
        self.core
            .wait_phase(timeout, "phase", |p| p == phase)
            .await
            .map(|_| ())
    }

    /// Waits until the latest fully signed state has at least `version`,
    /// and returns it; fails with [`Error::Timeout`] after `timeout`.
    ///
    /// An update returns to its proposer once every participant signed it
    /// and it is durable there; the full signature set then reaches each
    /// peer, which stores it. A peer waiting for a payment waits here.
    ///
    /// ```no_run
    /// # async fn f(ch: perun_client::Channel) -> perun_client::Result<()> {
    /// let st = ch.wait_for_version(7, std::time::Duration::from_secs(5)).await?;
    /// println!("balances now {:?}", st.state.outcome.balances);
    /// # Ok(()) }
    /// ```
    pub async fn wait_for_version(
        &self,
        version: u64,
        timeout: std::time::Duration,
    ) -> Result<SignedState> {
        let mut rx = self.core.state.subscribe();
        match tokio::time::timeout(timeout, rx.wait_for(|s| s.state.version >= version)).await {
            Ok(Ok(s)) => Ok(s.clone()),
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout("version")),
        }
    }

    /// Proposes the next state: `f` edits a copy of the current state whose
    /// version is already incremented (versions burnt by a failed update
    /// are skipped). Returns the new fully signed state once every
    /// participant signed it and it is durably stored here; the peers
    /// receive the full signature set right after
    /// ([`wait_for_version`](Self::wait_for_version)).
    ///
    /// Fails with [`Error::Rejected`] if a peer refuses, with the retryable
    /// [`Error::Conflict`] if a peer with a lower index proposed at the same
    /// time; in both cases the channel stays on its old state.
    pub async fn update(&self, f: impl FnOnce(&mut State)) -> Result<SignedState> {
        self.try_update(|s| {
            f(s);
            Ok(())
        })
        .await
    }

    /// Like [`update`](Self::update), but `f` may refuse (with a reason),
    /// in which case nothing is sent and [`Error::InvalidUpdate`] is returned.
    pub async fn try_update(
        &self,
        f: impl FnOnce(&mut State) -> std::result::Result<(), String>,
    ) -> Result<SignedState> {
        crate::update::propose(&self.inner, &self.core, f).await
    }

    /// Moves `amount` of asset `asset` from us to participant `to`.
    pub async fn pay(&self, to: usize, asset: usize, amount: U256) -> Result<SignedState> {
        let me = self.core.index;
        self.try_update(|s| {
            let row = s
                .outcome
                .balances
                .get_mut(asset)
                .ok_or_else(|| format!("no asset {asset}"))?;
            if to >= row.len() || to == me {
                return Err(format!("cannot pay participant {to}"));
            }
            row[me] = row[me]
                .checked_sub(amount)
                .ok_or_else(|| format!("balance {} is below {amount}", row[me]))?;
            row[to] += amount;
            Ok(())
        })
        .await
    }

    /// Closes the channel and withdraws our funds to our address.
    ///
    /// Cooperatively if the peers answer: a final update (unless the state
    /// is final already), then `concludeFinal` (a no-op if a peer did it
    /// first). If they do not, it registers our latest state, waits out the
    /// challenge period and concludes. Returns once our funds are withdrawn.
    pub async fn settle(&self) -> Result<()> {
        crate::settle::settle(&self.inner, &self.core).await
    }
}

/// Persists `changes` for channel `id`.
pub(crate) async fn persist(inner: &Inner, id: ChannelId, changes: Vec<Change>) -> Result<()> {
    inner
        .persister
        .update(id, changes)
        .await
        .map_err(Error::from)
}

/// Moves the channel to phase `to` and persists it (a no-op if it is there).
pub(crate) async fn set_phase(inner: &Inner, core: &ChannelCore, to: Phase) -> Result<()> {
    let mut l = core.locked.lock().await;
    if l.machine.phase() == to {
        return Ok(());
    }
    let mut trial = l.machine.clone();
    trial.set_phase(to)?;
    l.write(inner, core, vec![Change::Phase(to)]).await?;
    l.machine = trial;
    l.announce(core);
    Ok(())
}
