//! The `Channel` controller: what an application does with one channel.

use std::sync::Arc;

use perun_channel::{ChannelId, Params, Phase, SignedState, State, U256};
use perun_wire::PeerId;
use tokio::sync::broadcast;

use crate::core::{ChannelCore, Shared};
use crate::event::{ChannelEvent, WatchStatus};
use crate::{Error, Result};

/// A handle on one open channel. Cheap to clone; all clones control the
/// same channel.
#[derive(Clone)]
pub struct Channel {
    pub(crate) core: Arc<ChannelCore>,
    pub(crate) shared: Arc<Shared>,
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
    /// latest one is always delivered); `None` once the client is gone, or
    /// the channel left it (withdrawn, past `Limits::withdrawn_kept`) and
    /// no other handle holds it.
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

/// A channel's events: chain events, watcher steps and retries, phases.
#[derive(Debug)]
pub struct EventStream {
    rx: broadcast::Receiver<ChannelEvent>,
}

impl EventStream {
    /// The next event; `None` once the client is gone, or the channel left
    /// it (withdrawn, past `Limits::withdrawn_kept`, after its `Withdrawn`
    /// event) and no other handle holds it. Events missed by a slow reader
    /// are skipped.
    pub async fn next(&mut self) -> Option<ChannelEvent> {
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
    pub(crate) fn new(core: Arc<ChannelCore>, shared: Arc<Shared>) -> Self {
        Self { core, shared }
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

    /// The channel's events from now on: chain events as the watcher sees
    /// them (registrations, conclusion, withdrawals), every on-chain step
    /// the watcher takes and every retry, phase changes.
    pub fn events(&self) -> EventStream {
        EventStream {
            rx: self.core.subscribe_events(),
        }
    }

    /// Whether the channel's watcher protects it right now.
    pub fn watch_status(&self) -> WatchStatus {
        *self.core.watch_status.borrow()
    }

    /// What each configured watchtower holds for this channel: the version
    /// its stored, checked receipt covers and whether that is the latest
    /// fully signed state. Empty without towers.
    pub fn tower_status(&self) -> Vec<crate::TowerStatus> {
        self.shared
            .towers
            .as_ref()
            .map(|t| t.status(&self.core))
            .unwrap_or_default()
    }

    /// A stream of the channel's new fully signed states.
    pub fn updates(&self) -> UpdateStream {
        UpdateStream {
            rx: self.core.subscribe_updates(),
        }
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
    ///
    /// Dropping the future (a timeout, a `select!`) does not cut short an
    /// update whose proposal is made: the rest runs on a task of its own,
    /// and [`state`](Self::state) shows whether it went through.
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
        crate::update::propose(&self.shared, &self.core, f).await
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

    /// Forces our move in an app channel on-chain, for when the other
    /// players stop answering (an [`update`](Self::update) timed out or was
    /// refused although the move is valid).
    ///
    /// `f` builds the move from the state it follows: the state registered
    /// on-chain if a dispute runs, else our latest fully signed one, which
    /// is registered first. The move gets that state's version + 1 (the
    /// adjudicator allows one step) and must pass the app's rules with us as
    /// the actor. It is signed by us alone, after its version is stored, and
    /// a version we signed before is signed again only with the same
    /// contents ([`DoubleSign`](perun_channel::Error::DoubleSign) otherwise:
    /// force the move the peer did not answer).
    ///
    /// The channel leaves off-chain updates for good. The watcher sends the
    /// move once the refutation period is over (or at once, while a
    /// progression's timeout runs), and `force_update` returns it once it is
    /// the dispute's state. The other players then have one challenge
    /// duration to answer with their move; the watcher tells us when it is
    /// our move again ([`ChannelEvent::YourMove`](crate::ChannelEvent::YourMove)),
    /// and concludes and withdraws once the last move's timeout passes.
    ///
    /// ```no_run
    /// # async fn f(ch: perun_client::Channel) -> perun_client::Result<()> {
    /// use perun_channel::tictactoe::TicTacToe;
    /// let (params, me) = (ch.params().clone(), ch.index());
    /// let on_chain = ch.force_update(|s| TicTacToe.play(&params, s, me, 4)).await?;
    /// println!("version {} is on-chain", on_chain.version);
    /// # Ok(()) }
    /// ```
    ///
    /// Errors: [`NotAnAppChannel`](Error::NotAnAppChannel), the app's or the
    /// generic rule's reason ([`Error::Channel`]), or
    /// [`MoveMoot`](Error::MoveMoot) if the dispute moved on or its window
    /// closed before the move landed.
    pub async fn force_update<E>(
        &self,
        f: impl FnOnce(&State) -> std::result::Result<State, E>,
    ) -> Result<State>
    where
        perun_channel::AppRejection: From<E>,
    {
        crate::force::force_update(&self.shared, &self.core, f).await
    }

    /// Closes the channel and withdraws our funds to our address.
    ///
    /// Cooperatively if the peers answer: a final update (unless the state
    /// is final already), then `concludeFinal` (a no-op if a peer did it
    /// first). If they do not, it registers our latest state, waits out the
    /// challenge period and concludes. A dispute that runs already is
    /// driven to its end. The watcher takes every on-chain step, retrying
    /// failures; `settle` returns once our funds are withdrawn, or with
    /// [`Error::Stalled`] after
    /// 20 failures in a row (the watcher goes on trying; call `settle`
    /// again or wait for [`Phase::Withdrawn`]).
    pub async fn settle(&self) -> Result<()> {
        crate::settle::settle(&self.shared, &self.core).await
    }
}
