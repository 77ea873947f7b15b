//! What is stored per channel, and the rules every store applies to it.
//!
//! Both stores run the same `ChannelRecord::apply` and
//! [`ChannelRecord::validate`], so they cannot disagree about what a call
//! means.

use perun_channel::limits::MAX_VERSION_STEP;
use perun_channel::{ChannelId, Machine, Params, Phase, SignedState};
use tracing::warn;

use crate::{Error, Result};

/// Longest opaque network id of one peer, in bytes (a libp2p `PeerId` is
/// under 64).
pub const MAX_PEER_ID_LEN: usize = 256;
/// Largest opaque metadata blob, in bytes.
pub const MAX_METADATA_LEN: usize = 16 * 1024;

/// Everything needed to rebuild one channel after a restart.
///
/// It maps one-to-one onto [`Machine::restore`]; see
/// [`ChannelRecord::to_machine`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelRecord {
    /// The channel's fixed parameters; their hash is the channel id.
    pub params: Params,
    /// This participant's index in `params.participants`.
    pub index: usize,
    /// The phase the channel's machine is in.
    pub phase: Phase,
    /// The latest fully signed state, once version 0 is fully signed.
    pub current: Option<SignedState>,
    /// A newer state under signature (some signatures may be missing).
    pub staged: Option<SignedState>,
    /// Each participant's network id, in participant order, as opaque bytes
    /// (the client stores libp2p `PeerId` bytes). One entry per participant.
    pub peers: Vec<Vec<u8>>,
    /// Opaque bytes for the client, at most [`MAX_METADATA_LEN`].
    pub metadata: Vec<u8>,
    /// The highest version burnt by a failed update (0: none): some
    /// participant may have signed it, so this participant never proposes
    /// it or anything below. Stored so a restart does not forget it (a peer
    /// that signed it would refuse every proposal of that version). At most
    /// `MAX_VERSION_STEP - 1` past the current version.
    pub burnt: u64,
}

/// One change to a stored channel, applied by
/// [`Persister::update`](crate::Persister::update).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Store a (possibly partially signed) state under signature, replacing
    /// any staged state. Its version must be newer than the current state's.
    Staged(SignedState),
    /// Store a fully signed state as current. Clears a staged state of the
    /// same or a lower version.
    Committed(SignedState),
    /// Drop the staged state, if any.
    DiscardStaged,
    /// Record the machine's new phase.
    Phase(Phase),
    /// Replace the metadata blob.
    Metadata(Vec<u8>),
    /// Raise the burnt version to this one (a lower one changes nothing).
    /// At most `MAX_VERSION_STEP - 1` past the current version.
    Burnt(u64),
}

/// Which stored parts a change touched, so a store rewrites only those.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dirty {
    /// Params, index, phase, peers, metadata or the burnt version.
    pub(crate) meta: bool,
    /// The current state.
    pub(crate) current: bool,
    /// The staged state.
    pub(crate) staged: bool,
}

impl Dirty {
    fn or(self, other: Dirty) -> Dirty {
        Dirty {
            meta: self.meta || other.meta,
            current: self.current || other.current,
            staged: self.staged || other.staged,
        }
    }
}

impl ChannelRecord {
    /// The channel id, `keccak256(abi.encode(params))`.
    pub fn id(&self) -> ChannelId {
        self.params.channel_id()
    }

    /// Rebuilds the channel's machine, re-checking every stored signature.
    pub fn to_machine(&self) -> perun_channel::Result<Machine> {
        Machine::restore(
            self.params.clone(),
            self.index,
            self.phase,
            self.current.clone(),
            self.staged.clone(),
        )
    }

    /// Checks everything that can be checked without context: params,
    /// index, limits, dimensions, every signature present (via
    /// [`Machine::restore`]), that `current` is fully signed and that a
    /// staged state is newer than it.
    ///
    /// Run on every record created and on every record loaded from disk.
    pub fn validate(&self) -> Result<()> {
        let id = self.id();
        let invalid = |source| Error::InvalidInput { id, source };
        self.check_limits()?;
        self.params.validate().map_err(invalid)?;
        if let Some(cur) = &self.current {
            check_shape(id, &self.params, cur).map_err(invalid)?;
        }
        if let Some(st) = &self.staged {
            check_shape(id, &self.params, st).map_err(invalid)?;
            if let Some(cur) = &self.current
                && st.state.version <= cur.state.version
            {
                return Err(Error::StaleVersion {
                    id,
                    stored: cur.state.version,
                    got: st.state.version,
                });
            }
        }
        check_burnt(id, self.current.as_ref(), self.burnt)?;
        self.to_machine().map_err(invalid)?;
        Ok(())
    }

    /// The crate's own limits (not the channel rules): peer ids, metadata,
    /// index range.
    fn check_limits(&self) -> Result<()> {
        let id = self.id();
        let limit = |what: String| Error::LimitExceeded { id, what };
        let n = self.params.participants.len();
        if self.index >= n {
            return Err(limit(format!("index {} with {n} participants", self.index)));
        }
        if self.peers.len() != n {
            return Err(limit(format!(
                "{} peer ids for {n} participants",
                self.peers.len()
            )));
        }
        if let Some(p) = self.peers.iter().find(|p| p.len() > MAX_PEER_ID_LEN) {
            return Err(limit(format!(
                "peer id of {} bytes, limit {MAX_PEER_ID_LEN}",
                p.len()
            )));
        }
        check_metadata(id, &self.metadata)
    }

    /// Applies one change in place, after checking it against the record,
    /// keeping in `undo` what it replaced.
    ///
    /// On error the record is unchanged (every check comes before the
    /// first assignment). Applying the same change twice is the same as
    /// applying it once.
    fn apply_noting(&mut self, id: ChannelId, change: Change, undo: &mut Undo) -> Result<Dirty> {
        let invalid = |source| Error::InvalidInput { id, source };
        match change {
            Change::Staged(st) => {
                check_shape(id, &self.params, &st).map_err(invalid)?;
                if let Some(cur) = &self.current
                    && st.state.version <= cur.state.version
                {
                    return Err(Error::StaleVersion {
                        id,
                        stored: cur.state.version,
                        got: st.state.version,
                    });
                }
                if self.staged.as_ref() == Some(&st) {
                    return Ok(Dirty::default());
                }
                undo.staged(self.staged.replace(st));
                Ok(Dirty {
                    staged: true,
                    ..Dirty::default()
                })
            }
            Change::Committed(st) => {
                check_shape(id, &self.params, &st).map_err(invalid)?;
                if !st.is_fully_signed() {
                    let missing = st.sigs.iter().position(Option::is_none).unwrap_or(0);
                    return Err(invalid(perun_channel::Error::MissingSignature(missing)));
                }
                let version = st.state.version;
                let mut dirty = Dirty::default();
                match &self.current {
                    Some(cur) if version < cur.state.version => {
                        return Err(Error::StaleVersion {
                            id,
                            stored: cur.state.version,
                            got: version,
                        });
                    }
                    Some(cur) if version == cur.state.version && *cur != st => {
                        return Err(Error::VersionConflict { id, version });
                    }
                    Some(cur) if *cur == st => {}
                    _ => {
                        undo.current(self.current.replace(st));
                        dirty.current = true;
                    }
                }
                if self
                    .staged
                    .as_ref()
                    .is_some_and(|s| s.state.version <= version)
                {
                    undo.staged(self.staged.take());
                    dirty.staged = true;
                }
                Ok(dirty)
            }
            Change::DiscardStaged => {
                let discarded = self.staged.take();
                let staged = discarded.is_some();
                undo.staged(discarded);
                Ok(Dirty {
                    staged,
                    ..Dirty::default()
                })
            }
            Change::Phase(phase) => {
                let changed = self.phase != phase;
                self.phase = phase;
                Ok(Dirty {
                    meta: changed,
                    ..Dirty::default()
                })
            }
            Change::Burnt(version) => {
                if version <= self.burnt {
                    return Ok(Dirty::default());
                }
                check_burnt(id, self.current.as_ref(), version)?;
                self.burnt = version;
                Ok(Dirty {
                    meta: true,
                    ..Dirty::default()
                })
            }
            Change::Metadata(metadata) => {
                check_metadata(id, &metadata)?;
                let changed = self.metadata != metadata;
                undo.metadata(std::mem::replace(&mut self.metadata, metadata));
                Ok(Dirty {
                    meta: changed,
                    ..Dirty::default()
                })
            }
        }
    }

    /// Applies `changes` in order, all or nothing: on error `self` is left
    /// as it was.
    pub(crate) fn apply_all(&mut self, id: ChannelId, changes: Vec<Change>) -> Result<Dirty> {
        // In place: what the changes replace is kept until all of them
        // applied, and put back if one fails (no copy of the record).
        let mut undo = Undo::of(self);
        let mut dirty = Dirty::default();
        for change in changes {
            match self.apply_noting(id, change, &mut undo) {
                Ok(d) => dirty = dirty.or(d),
                Err(e) => {
                    undo.restore(self);
                    warn!(channel = %id, error = %e, "persistence: change rejected");
                    return Err(e);
                }
            }
        }
        Ok(dirty)
    }
}

/// What a series of changes replaced in a record, first value of each
/// field only: enough to put the record back as it was.
struct Undo {
    phase: Phase,
    burnt: u64,
    current: Option<Option<SignedState>>,
    staged: Option<Option<SignedState>>,
    metadata: Option<Vec<u8>>,
}

impl Undo {
    fn of(rec: &ChannelRecord) -> Self {
        Self {
            phase: rec.phase,
            burnt: rec.burnt,
            current: None,
            staged: None,
            metadata: None,
        }
    }

    fn current(&mut self, old: Option<SignedState>) {
        self.current.get_or_insert(old);
    }

    fn staged(&mut self, old: Option<SignedState>) {
        self.staged.get_or_insert(old);
    }

    fn metadata(&mut self, old: Vec<u8>) {
        self.metadata.get_or_insert(old);
    }

    fn restore(self, rec: &mut ChannelRecord) {
        rec.phase = self.phase;
        rec.burnt = self.burnt;
        if let Some(old) = self.current {
            rec.current = old;
        }
        if let Some(old) = self.staged {
            rec.staged = old;
        }
        if let Some(old) = self.metadata {
            rec.metadata = old;
        }
    }
}

/// A burnt version lies at most `MAX_VERSION_STEP - 1` past the current
/// version (the client caps it so; a peer naming a huge version cannot push
/// our proposals out of reach, not even across a restart).
fn check_burnt(id: ChannelId, current: Option<&SignedState>, burnt: u64) -> Result<()> {
    let cur = current.map_or(0, |c| c.state.version);
    let cap = cur.saturating_add(MAX_VERSION_STEP - 1);
    if burnt > cap {
        return Err(Error::BurntTooFar { id, burnt, cap });
    }
    Ok(())
}

fn check_metadata(id: ChannelId, metadata: &[u8]) -> Result<()> {
    if metadata.len() > MAX_METADATA_LEN {
        return Err(Error::LimitExceeded {
            id,
            what: format!(
                "metadata of {} bytes, limit {MAX_METADATA_LEN}",
                metadata.len()
            ),
        });
    }
    Ok(())
}

/// The cheap structural checks every stored state passes: valid for the
/// channel (limits, dimensions, channel id) and one signature slot per
/// participant, or none yet. Signatures themselves are verified on load.
fn check_shape(id: ChannelId, params: &Params, st: &SignedState) -> perun_channel::Result<()> {
    // A record's params are checked, and its key is their hash, when it is
    // created or loaded: no need to hash them again on every write.
    st.state.validate_for(params, id)?;
    let n = params.participants.len();
    if !st.sigs.is_empty() && st.sigs.len() != n {
        return Err(perun_channel::Error::SignatureCount {
            expected: n,
            got: st.sigs.len(),
        });
    }
    Ok(())
}
