//! A store wrapper that records every signature a client persists, to
//! check the first safety rule across a whole run, restarts included:
//! nobody signs two different states of one channel with one version.
//!
//! It relies on the other rule, persist before a signature leaves: every
//! signature of ours that a peer can hold was stored with its state first
//! (as `Staged`, `Committed` or in a created record), so the log sees it.
//! Peers' signatures in our store are checked too.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use perun::channel::{B256, ChannelId, SignedState, U256};
use perun::persistence::{Change, ChannelRecord, Persister, Result};

/// Which wrapped store took a state, as what change, with which slots signed.
type Stored = (usize, &'static str, Vec<bool>);

/// (channel, signer's index, version) → hash of each state it signed →
/// the signer's balance of the first asset in it.
type Seen = BTreeMap<(ChannelId, usize, u64), BTreeMap<B256, U256>>;

#[derive(Default)]
pub struct SignLog {
    seen: Mutex<Seen>,
    /// Where each state was stored: (store, how, signature slots filled).
    whence: Mutex<BTreeMap<B256, Vec<Stored>>>,
    stores: std::sync::atomic::AtomicUsize,
}

impl SignLog {
    /// A log, and a wrapper for `Options::wrap_persister` writing to it.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Wraps `inner`; every party of a run may share one log.
    pub fn wrap(self: &Arc<Self>, inner: Arc<dyn Persister>) -> Arc<dyn Persister> {
        Arc::new(Logged {
            inner,
            log: Arc::clone(self),
            store: self
                .stores
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst),
        })
    }

    fn note(&self, store: usize, how: &'static str, id: ChannelId, st: &SignedState) {
        let hash = st.state.hash();
        self.whence.lock().unwrap().entry(hash).or_default().push((
            store,
            how,
            st.sigs.iter().map(Option::is_some).collect(),
        ));
        let mut seen = self.seen.lock().unwrap();
        for (i, sig) in st.sigs.iter().enumerate() {
            if sig.is_some() {
                let balance = st.state.balance(0, i).unwrap_or_default();
                seen.entry((id, i, st.state.version))
                    .or_default()
                    .insert(hash, balance);
            }
        }
    }

    /// Signatures recorded so far.
    pub fn signatures(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Panics, naming them, if anyone signed two states with one version.
    pub fn assert_no_double_sign(&self) {
        self.assert_no_double_sign_by(|_| true);
    }

    /// Panics, naming them, if a signer for which `honest` holds signed two
    /// states with one version (a hostile peer's own are no finding).
    pub fn assert_no_double_sign_by(&self, honest: impl Fn(usize) -> bool) {
        let seen = self.seen.lock().unwrap();
        let doubles: Vec<_> = seen
            .iter()
            .filter(|((_, signer, _), h)| honest(*signer) && h.len() > 1)
            .collect();
        let whence = self.whence.lock().unwrap();
        let how: Vec<_> = doubles
            .iter()
            .flat_map(|(_, hs)| hs.keys().map(|h| (h, whence.get(h))))
            .collect();
        assert!(
            doubles.is_empty(),
            "two different states signed with one version (channel, signer, version → hashes): {doubles:?}; stored as (store, change, slots signed): {how:?}"
        );
    }

    /// Panics if signer `who` signed a state newer than version `after`
    /// that gives it less than `floor` of the first asset.
    pub fn assert_floor(&self, who: usize, floor: U256, after: u64) {
        let seen = self.seen.lock().unwrap();
        for ((_, signer, version), states) in seen.iter() {
            if *signer != who || *version <= after {
                continue;
            }
            for (hash, balance) in states {
                assert!(
                    *balance >= floor,
                    "signer {who} signed version {version} ({hash}) giving it {balance} < {floor}"
                );
            }
        }
    }
}

struct Logged {
    inner: Arc<dyn Persister>,
    log: Arc<SignLog>,
    /// Which wrapped store this is (the order `wrap` was called in).
    store: usize,
}

#[async_trait]
impl Persister for Logged {
    // Only what the store took: a refused write sends nothing.
    async fn channel_created(&self, ch: &ChannelRecord) -> Result<()> {
        self.inner.channel_created(ch).await?;
        for st in ch.current.iter().chain(&ch.staged) {
            self.log.note(self.store, "created", ch.id(), st);
        }
        Ok(())
    }
    async fn update(&self, id: ChannelId, changes: Vec<Change>) -> Result<()> {
        let states: Vec<(&'static str, SignedState)> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Staged(st) => Some(("staged", st.clone())),
                Change::Committed(st) => Some(("committed", st.clone())),
                _ => None,
            })
            .collect();
        self.inner.update(id, changes).await?;
        for (how, st) in &states {
            self.log.note(self.store, how, id, st);
        }
        Ok(())
    }
    async fn channel_removed(&self, id: ChannelId) -> Result<()> {
        self.inner.channel_removed(id).await
    }
    async fn channel_ids(&self) -> Result<Vec<ChannelId>> {
        self.inner.channel_ids().await
    }
    async fn load(&self, id: ChannelId) -> Result<Option<ChannelRecord>> {
        self.inner.load(id).await
    }
    async fn load_all(&self) -> Result<Vec<ChannelRecord>> {
        self.inner.load_all().await
    }
    async fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.inner.meta_get(key).await
    }
    async fn meta_put(&self, key: &str, value: &[u8]) -> Result<()> {
        self.inner.meta_put(key, value).await
    }
}
