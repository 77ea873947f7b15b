//! The books: which amounts are reserved on which channel, and which
//! payments we expect from whom. Plain data under one lock, no I/O, so
//! every rule here is checked by unit tests without a network.
//!
//! The channels' fully signed states are the truth about balances; the
//! books only add what is promised on top of them. What a channel can still
//! give is `balance − reserved`, recomputed from its latest state at every
//! reservation, so nothing the books hold can disagree with a channel.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use perun_channel::{Asset, ChannelId, U256};
use perun_wire::PeerId;
use tokio::sync::{Notify, oneshot};

use crate::{Error, Result};

/// A channel the books may draw on for one asset.
#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    /// The channel.
    pub(crate) id: ChannelId,
    /// The asset's index in the channel's outcome.
    pub(crate) asset: usize,
    /// Our balance of the asset in the channel's latest fully signed state.
    pub(crate) balance: U256,
}

/// One open reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hold {
    pub(crate) channel: ChannelId,
    pub(crate) asset: usize,
    pub(crate) amount: U256,
    /// Its payment is under way: the channel's balance may already show
    /// it while the hold still counts (until the update returned).
    pub(crate) sending: bool,
}

/// The hold of a `send` whose outcome is unknown (the peer's answer was
/// lost): the peer may still complete the update on a later sync, so the
/// amount stays reserved until the channel moves past `base`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Doubt {
    pub(crate) channel: ChannelId,
    pub(crate) asset: usize,
    pub(crate) amount: U256,
    /// The version the update was built on.
    pub(crate) base: u64,
    /// The proposal's hash (`Locked::pending` names it while a peer's
    /// `Sync` may still complete it).
    pub(crate) proposal: perun_channel::B256,
}

/// What arrived for a payment we expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// The amount expected (and now arrived).
    pub amount: U256,
}

struct Expect {
    id: u64,
    remaining: U256,
    tx: oneshot::Sender<Received>,
    amount: U256,
    /// The version each of the peer's channels stood at when the
    /// expectation was made: only later states pay it (a state that landed
    /// before may be booked a moment after).
    after: HashMap<ChannelId, u64>,
}

impl Expect {
    /// Whether money in `version` of `channel` may count toward it.
    fn takes(&self, channel: ChannelId, version: u64) -> bool {
        self.after.get(&channel).is_none_or(|&v| version > v)
    }
}

/// Reservations and expected payments.
#[derive(Default)]
pub(crate) struct Books {
    next_id: u64,
    /// The sum of the open holds per (channel, asset index).
    reserved: HashMap<(ChannelId, usize), U256>,
    holds: HashMap<u64, Hold>,
    /// Holds of sends with an unknown outcome (also in `reserved`).
    doubts: Vec<Doubt>,
    /// Expected payments per (peer, asset), oldest first.
    expected: HashMap<(PeerId, Asset), VecDeque<Expect>>,
    /// Gains the handler let in against the expectations and the follower
    /// has not booked yet, per channel. A peer's commit is stored (and
    /// booked) only with our next write, so without these a second payment
    /// in a burst would be checked against the same expectation again.
    earmarked: HashMap<ChannelId, Vec<Earmark>>,
    /// Woken when claims end: an expectation past its timeout waits for
    /// the claims on its peer's money to end before it gives up.
    claims_ended: Arc<Notify>,
}

/// How long an update the handler let in claims its gain if its version
/// is never booked and no later update of the channel replaces it: a
/// peer's commit comes within milliseconds, or through a `Sync` within a
/// request's time.
pub(crate) const EARMARK_LIFE: std::time::Duration = std::time::Duration::from_secs(30);

/// One accepted update's gain in one asset, until it is booked, dead, or
/// old.
struct Earmark {
    version: u64,
    peer: PeerId,
    asset: Asset,
    amount: U256,
    at: Instant,
}

impl Books {
    /// What is reserved of the asset on the channel.
    pub(crate) fn reserved(&self, channel: ChannelId, asset: usize) -> U256 {
        self.reserved
            .get(&(channel, asset))
            .copied()
            .unwrap_or(U256::ZERO)
    }

    /// What the candidate can still give.
    pub(crate) fn free(&self, c: &Candidate) -> U256 {
        c.balance.saturating_sub(self.reserved(c.id, c.asset))
    }

    /// Holds `amount` on one candidate, picked by the rule of
    /// [`Payments::reserve`](super::Payments::reserve): the smallest free
    /// balance that covers it, ties to the lowest channel id.
    pub(crate) fn reserve(
        &mut self,
        candidates: &[Candidate],
        amount: U256,
    ) -> Result<(u64, Hold)> {
        if amount.is_zero() {
            return Err(Error::ZeroAmount);
        }
        let pick = candidates
            .iter()
            .map(|c| (self.free(c), c))
            .filter(|(free, _)| *free >= amount)
            .min_by(|(fa, a), (fb, b)| fa.cmp(fb).then(a.id.cmp(&b.id)));
        let Some((_, c)) = pick else {
            let available = candidates
                .iter()
                .map(|c| self.free(c))
                .max()
                .unwrap_or(U256::ZERO);
            return Err(Error::InsufficientFunds {
                available,
                requested: amount,
            });
        };
        let hold = Hold {
            channel: c.id,
            asset: c.asset,
            amount,
            sending: false,
        };
        // Cannot overflow: reserved + amount ≤ balance.
        *self.reserved.entry((c.id, c.asset)).or_default() += amount;
        self.next_id += 1;
        self.holds.insert(self.next_id, hold.clone());
        Ok((self.next_id, hold))
    }

    /// The open hold `id`.
    pub(crate) fn hold(&self, id: u64) -> Option<&Hold> {
        self.holds.get(&id)
    }

    /// Lowers hold `id` to `to` (releasing the rest) and marks its
    /// payment under way.
    pub(crate) fn sending(&mut self, id: u64, to: U256) {
        let Some(h) = self.holds.get_mut(&id) else {
            return;
        };
        h.sending = true;
        let less = h.amount.saturating_sub(to);
        h.amount -= less;
        let key = (h.channel, h.asset);
        self.unreserve(key, less);
    }

    /// Ends hold `id`, releasing what it held; `None` if it is not open.
    pub(crate) fn release(&mut self, id: u64) -> Option<Hold> {
        let h = self.holds.remove(&id)?;
        self.unreserve((h.channel, h.asset), h.amount);
        Some(h)
    }

    fn unreserve(&mut self, key: (ChannelId, usize), amount: U256) {
        if let Some(r) = self.reserved.get_mut(&key) {
            *r = r.saturating_sub(amount);
            if r.is_zero() {
                self.reserved.remove(&key);
            }
        }
    }

    /// Turns hold `id` into a [`Doubt`] on the update built on `base`.
    pub(crate) fn doubt(&mut self, id: u64, base: u64, proposal: perun_channel::B256) {
        if let Some(h) = self.holds.remove(&id) {
            self.doubts.push(Doubt {
                channel: h.channel,
                asset: h.asset,
                amount: h.amount,
                base,
                proposal,
            });
        }
    }

    /// Releases every doubt `settled` says is settled.
    pub(crate) fn settle_doubts(&mut self, settled: impl Fn(&Doubt) -> bool) {
        let (done, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.doubts)
            .into_iter()
            .partition(|d| settled(d));
        self.doubts = keep;
        for d in done {
            self.unreserve((d.channel, d.asset), d.amount);
        }
    }

    /// The holds of sends with an unknown outcome.
    pub(crate) fn doubts(&self) -> &[Doubt] {
        &self.doubts
    }

    /// How many holds are open.
    pub(crate) fn open_holds(&self) -> usize {
        self.holds.len()
    }

    /// What is promised per (channel, asset index): the holds whose
    /// payment is not under way. Every channel's balance covers this at
    /// all times; a hold being sent or in doubt may or may not be out of
    /// the balance already, so it is not counted.
    pub(crate) fn promised(&self) -> HashMap<(ChannelId, usize), U256> {
        let mut out: HashMap<_, U256> = HashMap::new();
        for h in self.holds.values().filter(|h| !h.sending) {
            let sum = out.entry((h.channel, h.asset)).or_default();
            *sum = sum.saturating_add(h.amount);
        }
        out
    }

    /// Expects `amount` of `asset` from `peer`; the receiver fires once it
    /// arrived. Fails with [`Error::AmountOverflow`] if what is expected
    /// from the peer in the asset would pass 2^256 − 1.
    pub(crate) fn expect(
        &mut self,
        peer: PeerId,
        asset: Asset,
        amount: U256,
        after: HashMap<ChannelId, u64>,
    ) -> Result<(u64, oneshot::Receiver<Received>)> {
        if amount.is_zero() {
            return Err(Error::ZeroAmount);
        }
        let key = (peer, asset);
        self.incoming_of(&key)
            .checked_add(amount)
            .ok_or(Error::AmountOverflow)?;
        let (tx, rx) = oneshot::channel();
        self.next_id += 1;
        self.expected.entry(key).or_default().push_back(Expect {
            id: self.next_id,
            remaining: amount,
            tx,
            amount,
            after,
        });
        Ok((self.next_id, rx))
    }

    /// What is still expected from `peer` in `asset`.
    pub(crate) fn incoming(&self, peer: PeerId, asset: &Asset) -> U256 {
        self.incoming_of(&(peer, asset.clone()))
    }

    fn incoming_of(&self, key: &(PeerId, Asset)) -> U256 {
        self.expected.get(key).map_or(U256::ZERO, |q| {
            q.iter()
                .fold(U256::ZERO, |sum, e| sum.saturating_add(e.remaining))
        })
    }

    /// What is still expected from `peer` in `asset` and not yet taken by
    /// an update the handler let in since `since` (older claims are of
    /// updates that died without a word: their version was never booked).
    pub(crate) fn unclaimed(&self, peer: PeerId, asset: &Asset, since: Instant) -> U256 {
        let claimed = self
            .earmarked
            .values()
            .flatten()
            .filter(|m| m.peer == peer && m.asset == *asset && m.at >= since)
            .fold(U256::ZERO, |sum, m| sum.saturating_add(m.amount));
        self.incoming(peer, asset).saturating_sub(claimed)
    }

    /// An update of `channel` on the base `base` is being decided: updates
    /// above that base that we let in before did not get installed, and a
    /// new one replaces them (ours failed after the handler, or the peer
    /// gave up on it). Their claims end.
    pub(crate) fn proposed_on(&mut self, channel: ChannelId, base: u64) {
        self.booked_or_dead(channel, |m| m.version <= base);
    }

    /// Notes that the update to `version` of `channel`, which the handler
    /// let in, brings `amount` of `asset` from `peer`, until it is booked.
    pub(crate) fn earmark(
        &mut self,
        channel: ChannelId,
        version: u64,
        peer: PeerId,
        asset: &Asset,
        amount: U256,
    ) {
        let marks = self.earmarked.entry(channel).or_default();
        // The same update asked again (a repeated request) claims once.
        marks.retain(|m| !(m.version == version && m.asset == *asset));
        marks.push(Earmark {
            version,
            peer,
            asset: asset.clone(),
            amount,
            at: Instant::now(),
        });
    }

    /// Keeps only `channel`'s claims for which `keep` holds.
    fn booked_or_dead(&mut self, channel: ChannelId, keep: impl Fn(&Earmark) -> bool) {
        if let Some(marks) = self.earmarked.get_mut(&channel) {
            let before = marks.len();
            marks.retain(keep);
            if marks.len() < before {
                self.claims_ended.notify_waiters();
            }
            if marks.is_empty() {
                self.earmarked.remove(&channel);
            }
        }
    }

    /// When the last live claim on `peer`'s money in `asset` made by
    /// `made_by` runs out ([`EARMARK_LIFE`] after it was made), if any is
    /// live: an update bringing that money was let in and is neither booked
    /// nor dead yet. Later claims do not count, so a peer that keeps
    /// sending payments it never commits cannot keep a waiter waiting.
    pub(crate) fn claimed_until(
        &self,
        peer: PeerId,
        asset: &Asset,
        made_by: Instant,
    ) -> Option<Instant> {
        let now = Instant::now();
        self.earmarked
            .values()
            .flatten()
            .filter(|m| m.peer == peer && m.asset == *asset && m.at <= made_by)
            .map(|m| m.at + EARMARK_LIFE)
            .filter(|end| *end > now)
            .max()
    }

    /// Notified whenever claims end (see [`claimed_until`](Self::claimed_until)).
    pub(crate) fn claims_ended(&self) -> Arc<Notify> {
        Arc::clone(&self.claims_ended)
    }

    /// The channels with claims.
    pub(crate) fn claimed_channels(&self) -> Vec<ChannelId> {
        self.earmarked.keys().copied().collect()
    }

    /// `channel`'s staged update of `version` was dropped uncommitted: its
    /// claim ends (a commit that comes after all is booked as it arrives).
    pub(crate) fn dead(&mut self, channel: ChannelId, version: u64) {
        self.booked_or_dead(channel, |m| m.version != version);
    }

    /// `channel`'s state `version` was booked: updates up to it either are
    /// in it or will never be (versions only grow).
    pub(crate) fn booked(&mut self, channel: ChannelId, version: u64) {
        self.booked_or_dead(channel, |m| m.version > version);
    }

    /// Books an arrived payment against the oldest expectations first;
    /// each one that is met resolves. A surplus is simply ours.
    pub(crate) fn arrived(
        &mut self,
        peer: PeerId,
        asset: &Asset,
        mut amount: U256,
        (channel, version): (ChannelId, u64),
    ) {
        let key = (peer, asset.clone());
        let Some(queue) = self.expected.get_mut(&key) else {
            return;
        };
        while !amount.is_zero() {
            // Later expectations were made later: if the oldest does not
            // take this state, none does.
            let Some(front) = queue.front_mut().filter(|e| e.takes(channel, version)) else {
                break;
            };
            let take = front.remaining.min(amount);
            front.remaining -= take;
            amount -= take;
            if front.remaining.is_zero()
                && let Some(done) = queue.pop_front()
            {
                let _ = done.tx.send(Received {
                    amount: done.amount,
                });
            }
        }
        if queue.is_empty() {
            self.expected.remove(&key);
        }
    }

    /// Drops expectation `id` (timed out, or its future dropped); returns
    /// what had arrived for it.
    pub(crate) fn forget(&mut self, peer: PeerId, asset: &Asset, id: u64) -> Option<U256> {
        let key = (peer, asset.clone());
        let queue = self.expected.get_mut(&key)?;
        let pos = queue.iter().position(|e| e.id == id)?;
        let e = queue.remove(pos)?;
        if queue.is_empty() {
            self.expected.remove(&key);
        }
        Some(e.amount - e.remaining)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use perun_channel::{Address, B256};

    fn cand(id: u8, balance: u64) -> Candidate {
        Candidate {
            id: B256::repeat_byte(id),
            asset: 0,
            balance: U256::from(balance),
        }
    }

    fn u(x: u64) -> U256 {
        U256::from(x)
    }

    /// The asset the expectation tests book in.
    fn asset() -> Asset {
        Asset {
            chainId: u(1),
            holder: Address::repeat_byte(1),
        }
    }

    #[test]
    fn picks_the_smallest_channel_that_covers_ties_to_the_lowest_id() {
        let mut b = Books::default();
        let cs = [cand(3, 50), cand(1, 100), cand(2, 50)];
        let (_, h) = b.reserve(&cs, u(40)).unwrap();
        assert_eq!(h.channel, B256::repeat_byte(2));
        let (_, h) = b.reserve(&cs, u(40)).unwrap();
        assert_eq!(h.channel, B256::repeat_byte(3));
        let (_, h) = b.reserve(&cs, u(40)).unwrap();
        assert_eq!(h.channel, B256::repeat_byte(1));
        match b.reserve(&cs, u(70)) {
            Err(Error::InsufficientFunds {
                available,
                requested,
            }) => assert_eq!((available, requested), (u(60), u(70))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn shrink_and_release_give_back_exactly_what_was_held() {
        let mut b = Books::default();
        let cs = [cand(1, 100)];
        let (id, _) = b.reserve(&cs, u(80)).unwrap();
        b.sending(id, u(30));
        assert_eq!(b.reserved(cs[0].id, 0), u(30));
        assert_eq!(b.free(&cs[0]), u(70));
        assert_eq!(b.release(id).unwrap().amount, u(30));
        assert_eq!(b.release(id), None, "a hold is released once");
        assert_eq!(b.free(&cs[0]), u(100));
        assert_eq!(b.open_holds(), 0);
        assert!(matches!(b.reserve(&cs, U256::ZERO), Err(Error::ZeroAmount)));
    }

    #[test]
    fn a_doubt_stays_reserved_until_settled() {
        let mut b = Books::default();
        let cs = [cand(1, 100)];
        let (id, _) = b.reserve(&cs, u(60)).unwrap();
        b.doubt(id, 7, perun_channel::B256::ZERO);
        assert_eq!(b.release(id), None, "no longer a hold");
        assert_eq!(b.free(&cs[0]), u(40));
        b.settle_doubts(|d| d.base != 7);
        assert_eq!(b.free(&cs[0]), u(40));
        b.settle_doubts(|d| d.base == 7);
        assert_eq!((b.free(&cs[0]), b.doubts().len()), (u(100), 0));
    }

    #[test]
    fn earmarks_hold_an_expectation_until_their_version_is_booked() {
        let mut b = Books::default();
        let peer = PeerId::random();
        let asset = asset();
        let since = Instant::now();
        let (ch, other) = (ChannelId::from([1u8; 32]), ChannelId::from([2u8; 32]));
        let (_, _rx) = b
            .expect(peer, asset.clone(), u(10), HashMap::new())
            .unwrap();
        b.earmark(ch, 2, peer, &asset, u(6));
        // Asked again: claims once.
        b.earmark(ch, 2, peer, &asset, u(6));
        assert_eq!(b.unclaimed(peer, &asset, since), u(4));
        b.earmark(other, 7, peer, &asset, u(4));
        assert_eq!(b.unclaimed(peer, &asset, since), U256::ZERO);
        // Booked up to version 1 of `ch`: version 2 is still to come.
        b.booked(ch, 1);
        assert_eq!(b.unclaimed(peer, &asset, since), U256::ZERO);
        b.arrived(peer, &asset, u(6), (ChannelId::ZERO, 1));
        b.booked(ch, 2);
        assert_eq!(b.unclaimed(peer, &asset, since), U256::ZERO);
        // Version 7 was abandoned; version 8 of `other` settles it too.
        b.booked(other, 8);
        assert_eq!(b.unclaimed(peer, &asset, since), u(4));
        // A claim whose update died: a new update on an older base ends it.
        b.earmark(other, 9, peer, &asset, u(4));
        assert_eq!(b.unclaimed(peer, &asset, since), U256::ZERO);
        b.proposed_on(other, 8);
        assert_eq!(b.unclaimed(peer, &asset, since), u(4));
        // And an old one no longer counts.
        b.earmark(other, 10, peer, &asset, u(4));
        assert_eq!(b.unclaimed(peer, &asset, Instant::now()), u(4));
    }

    #[test]
    fn claims_tell_how_long_they_live_and_wake_waiters_as_they_end() {
        let mut b = Books::default();
        let (peer, stranger) = (PeerId::random(), PeerId::random());
        let asset = asset();
        let ch = ChannelId::from([1u8; 32]);
        let by_now = |b: &Books, p| b.claimed_until(p, &asset, Instant::now());
        assert_eq!(by_now(&b, peer), None);
        let before = Instant::now();
        b.earmark(ch, 3, peer, &asset, u(6));
        let until = by_now(&b, peer).unwrap();
        assert!(until >= before + EARMARK_LIFE && until <= Instant::now() + EARMARK_LIFE);
        assert_eq!(by_now(&b, stranger), None, "another peer's");
        assert_eq!(b.claimed_until(peer, &asset, before), None, "made later");
        let ended = b.claims_ended();
        let woken = ended.notified();
        futures::pin_mut!(woken);
        assert!(!woken.as_mut().enable(), "not yet");
        b.booked(ch, 2);
        assert!(by_now(&b, peer).is_some(), "version 3 is to come");
        b.booked(ch, 3);
        assert_eq!(by_now(&b, peer), None);
        assert!(woken.as_mut().enable(), "the waiter was woken");
        // A dropped update's claim ends; an older one (committed, booked
        // with our next write) stays.
        b.earmark(ch, 4, peer, &asset, u(1));
        b.earmark(ch, 5, peer, &asset, u(1));
        b.dead(ch, 5);
        assert!(by_now(&b, peer).is_some(), "version 4's claim stays");
        b.booked(ch, 4);
        assert_eq!(by_now(&b, peer), None);
    }

    #[test]
    fn an_expectation_takes_only_states_after_it() {
        let mut b = Books::default();
        let peer = PeerId::random();
        let asset = asset();
        let (ch, other) = (ChannelId::repeat_byte(1), ChannelId::repeat_byte(2));
        let (_, mut first) = b
            .expect(peer, asset.clone(), u(10), HashMap::from([(ch, 5)]))
            .unwrap();
        // Version 5 of `ch` was there before: it pays nothing expected.
        b.arrived(peer, &asset, u(10), (ch, 5));
        assert_eq!(b.incoming(peer, &asset), u(10));
        b.arrived(peer, &asset, u(4), (ch, 6));
        b.arrived(peer, &asset, u(6), (other, 1));
        assert_eq!(first.try_recv().unwrap().amount, u(10));
    }

    #[test]
    fn expectations_fill_oldest_first_and_overflow_is_refused() {
        let mut b = Books::default();
        let peer = PeerId::random();
        let asset = asset();
        let (_, mut first) = b
            .expect(peer, asset.clone(), u(10), HashMap::new())
            .unwrap();
        let (second_id, mut second) = b
            .expect(peer, asset.clone(), u(10), HashMap::new())
            .unwrap();
        b.arrived(peer, &asset, u(15), (ChannelId::ZERO, 1));
        assert_eq!(first.try_recv().unwrap().amount, u(10));
        assert!(second.try_recv().is_err());
        assert_eq!(b.incoming(peer, &asset), u(5));
        assert_eq!(b.forget(peer, &asset, second_id), Some(u(5)));
        assert_eq!(b.incoming(peer, &asset), U256::ZERO);
        b.expect(peer, asset.clone(), U256::MAX, HashMap::new())
            .unwrap();
        assert!(matches!(
            b.expect(peer, asset.clone(), u(1), HashMap::new()),
            Err(Error::AmountOverflow)
        ));
        b.arrived(PeerId::random(), &asset, u(1), (ChannelId::ZERO, 1)); // nobody expects it: ignored
    }

    proptest::proptest! {
        /// Random reservations, partial sends (the balance drops by what is
        /// sent), cancels and shrinks over three channels: what is reserved
        /// on a channel is the sum of its holds and never exceeds its
        /// balance, and a refused reservation could not have been covered.
        #[test]
        fn holds_never_exceed_balances(ops in proptest::collection::vec((0u8..4, 1u64..150, 0usize..8), 1..200)) {
            let mut b = Books::default();
            let mut cs = vec![cand(1, 100), cand(2, 250), cand(3, 40)];
            let mut open: Vec<u64> = Vec::new();
            for (op, amount, pick) in ops {
                match op {
                    0 | 1 => match b.reserve(&cs, u(amount)) {
                        Ok((id, _)) => open.push(id),
                        Err(Error::InsufficientFunds { available, requested }) => {
                            proptest::prop_assert!(available < requested);
                            proptest::prop_assert!(cs.iter().all(|c| b.free(c) < requested));
                        }
                        Err(e) => proptest::prop_assert!(false, "{e}"),
                    },
                    2 if !open.is_empty() => {
                        // Send part of a hold: the channel's balance drops, then the hold ends.
                        let id = open.swap_remove(pick % open.len());
                        let h = b.hold(id).unwrap().clone();
                        let part = u(amount).min(h.amount);
                        b.sending(id, part);
                        let c = cs.iter_mut().find(|c| c.id == h.channel).unwrap();
                        c.balance -= part;
                        // The window where the balance shows the payment
                        // and the hold still counts: promises stay covered.
                        let promised = b.promised().get(&(c.id, 0)).copied().unwrap_or_default();
                        proptest::prop_assert!(promised <= c.balance);
                        b.release(id).unwrap();
                    }
                    3 if !open.is_empty() => {
                        let id = open.swap_remove(pick % open.len());
                        b.release(id).unwrap();
                    }
                    _ => {}
                }
                for c in &cs {
                    let held = open
                        .iter()
                        .filter_map(|id| b.hold(*id))
                        .filter(|h| h.channel == c.id)
                        .fold(U256::ZERO, |s, h| s + h.amount);
                    proptest::prop_assert_eq!(held, b.reserved(c.id, 0));
                    proptest::prop_assert!(held <= c.balance);
                }
                proptest::prop_assert_eq!(b.open_holds(), open.len());
            }
        }
    }
}
