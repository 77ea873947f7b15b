//! The on-disk encoding of records: versioned and self-checking.
//!
//! Every value is `format ‖ kind ‖ postcard body ‖ crc32(format ‖ kind ‖ body)`
//! (CRC little-endian). The format byte lets a later build change the
//! layout and lets this build refuse a newer one instead of misreading it;
//! the kind byte stops one kind of record from being read as another; the
//! CRC catches torn or flipped bytes before postcard sees them. The body
//! uses stable, explicit representations (phase codes, 65-byte signatures)
//! rather than the derived serde forms of types owned by other crates, so
//! a change there cannot silently change what is on disk.
//!
//! Formats: 1 wrote no burnt version (it decodes as 0); 2 adds it to the
//! channel record. States are the same in both. A build writes the newest
//! format and reads every older one.
//!
//! Decoding only checks the encoding. Whether the contents are a valid
//! channel (signatures, limits) is [`ChannelRecord::validate`]'s job.

use perun_channel::{ChannelId, Params, Phase, SignedState, State};
use serde::{Deserialize, Serialize};

use crate::{ChannelRecord, Error, Result};

/// The record format this build writes and the newest it reads.
pub const RECORD_FORMAT: u8 = 2;
/// The oldest record format this build reads.
pub const OLDEST_RECORD_FORMAT: u8 = 1;
/// Largest encoded value accepted, in bytes: far above the largest valid
/// record (a 16 × 16 state with 64 KiB of app data is about 80 KiB), small
/// enough that a corrupted length cannot make us allocate much.
pub const MAX_ENCODED_LEN: usize = 1024 * 1024;

const KIND_META: u8 = 1;
const KIND_STATE: u8 = 2;

/// The parts of a [`ChannelRecord`] other than its states, format 1.
#[derive(Serialize, Deserialize)]
struct MetaV1 {
    params: Params,
    index: u32,
    phase: u8,
    peers: Vec<Vec<u8>>,
    metadata: Vec<u8>,
}

/// Format 2: format 1 and the burnt version.
#[derive(Serialize, Deserialize)]
struct MetaV2 {
    params: Params,
    index: u32,
    phase: u8,
    peers: Vec<Vec<u8>>,
    metadata: Vec<u8>,
    burnt: u64,
}

/// A [`SignedState`] with signatures as 65-byte `r ‖ s ‖ v`.
#[derive(Serialize, Deserialize)]
struct StateV1 {
    state: State,
    sigs: Vec<Option<Vec<u8>>>,
}

/// [`StateV1`] as it is written: borrowed, so a write copies nothing before
/// the bytes (the same postcard encoding: a slice and a `Vec<u8>` are both
/// a length and the bytes).
#[derive(Serialize)]
struct StateV1Ref<'a> {
    #[serde(serialize_with = "state_ref")]
    state: &'a State,
    sigs: SigsRef<'a>,
}

/// The state as its derived `Serialize` writes it, without allocating.
fn state_ref<S: serde::Serializer>(st: &&State, s: S) -> std::result::Result<S::Ok, S::Error> {
    perun_channel::serial::state(st, s)
}

/// Signatures, each written as 65 bytes when present.
struct SigsRef<'a>(&'a [Option<perun_wallet::Signature>]);

impl Serialize for SigsRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for sig in self.0 {
            let bytes = sig.as_ref().map(perun_wallet::signature_bytes);
            seq.serialize_element(&bytes.as_ref().map(|b| &b[..]))?;
        }
        seq.end()
    }
}

/// Room for a typical encoded value (a two-party state is about 250 bytes),
/// so postcard rarely grows the buffer while it writes.
const TYPICAL_LEN: usize = 512;

/// The stored parts of a record other than its two states.
pub(crate) struct Meta {
    pub(crate) params: Params,
    pub(crate) index: usize,
    pub(crate) phase: Phase,
    pub(crate) peers: Vec<Vec<u8>>,
    pub(crate) metadata: Vec<u8>,
    pub(crate) burnt: u64,
}

impl Meta {
    pub(crate) fn into_record(
        self,
        current: Option<SignedState>,
        staged: Option<SignedState>,
    ) -> ChannelRecord {
        ChannelRecord {
            params: self.params,
            index: self.index,
            phase: self.phase,
            current,
            staged,
            peers: self.peers,
            metadata: self.metadata,
            burnt: self.burnt,
        }
    }
}

fn phase_code(p: Phase) -> u8 {
    match p {
        Phase::Proposing => 0,
        Phase::Signing0 => 1,
        Phase::Funding => 2,
        Phase::Active => 3,
        Phase::Updating => 4,
        Phase::Final => 5,
        Phase::Registered => 6,
        Phase::Concluded => 7,
        Phase::Withdrawn => 8,
    }
}

fn phase_from_code(c: u8) -> Option<Phase> {
    Some(match c {
        0 => Phase::Proposing,
        1 => Phase::Signing0,
        2 => Phase::Funding,
        3 => Phase::Active,
        4 => Phase::Updating,
        5 => Phase::Final,
        6 => Phase::Registered,
        7 => Phase::Concluded,
        8 => Phase::Withdrawn,
        _ => return None,
    })
}

fn frame<T: Serialize>(kind: u8, body: &T) -> Result<Vec<u8>> {
    frame_as(RECORD_FORMAT, kind, body)
}

fn frame_as<T: Serialize>(format: u8, kind: u8, body: &T) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(TYPICAL_LEN);
    out.extend_from_slice(&[format, kind]);
    let mut out = postcard::to_extend(body, out)
        .map_err(|e| Error::Storage(format!("encoding record: {e}")))?;
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Checks a value's frame; returns its format and its body.
fn unframe(id: ChannelId, kind: u8, bytes: &[u8]) -> Result<(u8, &[u8])> {
    let corrupt = |reason: String| Error::Corrupt {
        id: Some(id),
        reason,
    };
    if bytes.len() > MAX_ENCODED_LEN {
        return Err(corrupt(format!("record of {} bytes", bytes.len())));
    }
    let (framed, crc) = match bytes.len().checked_sub(4) {
        Some(split) if split >= 2 => bytes.split_at(split),
        _ => return Err(corrupt(format!("record of {} bytes", bytes.len()))),
    };
    let mut crc_bytes = [0u8; 4];
    crc_bytes.copy_from_slice(crc);
    if crc32fast::hash(framed) != u32::from_le_bytes(crc_bytes) {
        return Err(corrupt("checksum mismatch".into()));
    }
    let (format, found_kind, body) = (framed[0], framed[1], &framed[2..]);
    if format > RECORD_FORMAT {
        return Err(Error::FormatTooNew {
            found: format,
            supported: RECORD_FORMAT,
        });
    }
    if format < OLDEST_RECORD_FORMAT {
        return Err(corrupt(format!("unknown record format {format}")));
    }
    if found_kind != kind {
        return Err(corrupt(format!(
            "record kind {found_kind}, expected {kind}"
        )));
    }
    Ok((format, body))
}

/// Decodes a whole body: trailing bytes are damage too.
fn body<'a, T: Deserialize<'a>>(id: ChannelId, body: &'a [u8]) -> Result<T> {
    let corrupt = |reason: String| Error::Corrupt {
        id: Some(id),
        reason,
    };
    let (value, rest) =
        postcard::take_from_bytes(body).map_err(|e| corrupt(format!("decoding: {e}")))?;
    if !rest.is_empty() {
        return Err(corrupt(format!("{} trailing bytes", rest.len())));
    }
    Ok(value)
}

/// Encodes the non-state parts of `rec`.
pub(crate) fn encode_meta(rec: &ChannelRecord) -> Result<Vec<u8>> {
    let index = u32::try_from(rec.index)
        .map_err(|_| Error::Storage(format!("index {} does not fit", rec.index)))?;
    frame(
        KIND_META,
        &MetaV2 {
            params: rec.params.clone(),
            index,
            phase: phase_code(rec.phase),
            peers: rec.peers.clone(),
            metadata: rec.metadata.clone(),
            burnt: rec.burnt,
        },
    )
}

/// Decodes what [`encode_meta`] wrote for channel `id`.
pub(crate) fn decode_meta(id: ChannelId, bytes: &[u8]) -> Result<Meta> {
    let m = match unframe(id, KIND_META, bytes)? {
        (1, b) => {
            let m: MetaV1 = body(id, b)?;
            MetaV2 {
                params: m.params,
                index: m.index,
                phase: m.phase,
                peers: m.peers,
                metadata: m.metadata,
                burnt: 0,
            }
        }
        (_, b) => body(id, b)?,
    };
    let phase = phase_from_code(m.phase).ok_or_else(|| Error::Corrupt {
        id: Some(id),
        reason: format!("unknown phase code {}", m.phase),
    })?;
    let index = usize::try_from(m.index).map_err(|_| Error::Corrupt {
        id: Some(id),
        reason: format!("index {} does not fit", m.index),
    })?;
    Ok(Meta {
        params: m.params,
        index,
        phase,
        peers: m.peers,
        metadata: m.metadata,
        burnt: m.burnt,
    })
}

/// Encodes a signed state.
pub(crate) fn encode_state(st: &SignedState) -> Result<Vec<u8>> {
    frame(
        KIND_STATE,
        &StateV1Ref {
            state: &st.state,
            sigs: SigsRef(&st.sigs),
        },
    )
}

/// Decodes what [`encode_state`] wrote for channel `id`. Signatures must be
/// canonical (65 bytes, low `s`, `v ∈ {27, 28}`); whether they verify is
/// checked later.
pub(crate) fn decode_state(id: ChannelId, bytes: &[u8]) -> Result<SignedState> {
    // Every format stores a state alike.
    let (_, b) = unframe(id, KIND_STATE, bytes)?;
    let s: StateV1 = body(id, b)?;
    let sigs = s
        .sigs
        .iter()
        .map(|sig| {
            sig.as_deref()
                .map(perun_wallet::parse_signature)
                .transpose()
                .map_err(|e| Error::Corrupt {
                    id: Some(id),
                    reason: format!("signature: {e}"),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(SignedState {
        state: s.state,
        sigs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use perun_channel::{Address, Allocation, Asset, U256};
    use perun_wallet::{Account, LocalAccount};

    fn record() -> ChannelRecord {
        let (a, b) = (LocalAccount::random(), LocalAccount::random());
        let domain = perun_channel::Domain {
            chain_id: U256::from(1),
            adjudicator: Address::repeat_byte(0xad),
        };
        let funding = vec![vec![U256::from(5), U256::from(6)]];
        let params = Params::payment(
            domain,
            60,
            U256::from(7),
            vec![a.address(), b.address()],
            funding,
        );
        let asset = Asset {
            chainId: U256::from(1),
            holder: Address::repeat_byte(1),
        };
        let alloc = Allocation::new(vec![asset], vec![vec![U256::from(5), U256::from(6)]]);
        let mut st = SignedState::new(State::initial(&params, alloc));
        st.sign(&params, 0, &a).unwrap();
        st.sign(&params, 1, &b).unwrap();
        let mut staged = SignedState::new(st.state.next());
        staged.sign(&params, 0, &a).unwrap();
        ChannelRecord {
            params,
            index: 0,
            phase: Phase::Updating,
            current: Some(st),
            staged: Some(staged),
            peers: vec![vec![1, 2, 3], vec![4]],
            metadata: b"meta".to_vec(),
            burnt: 3,
        }
    }

    #[test]
    fn round_trip() {
        let rec = record();
        let id = rec.id();
        let meta = decode_meta(id, &encode_meta(&rec).unwrap()).unwrap();
        let cur = decode_state(id, &encode_state(rec.current.as_ref().unwrap()).unwrap()).unwrap();
        let staged =
            decode_state(id, &encode_state(rec.staged.as_ref().unwrap()).unwrap()).unwrap();
        assert_eq!(meta.into_record(Some(cur), Some(staged)), rec);
    }

    /// The borrowed form a write uses encodes exactly as the owned form a
    /// read decodes: stores written before it and after it are alike.
    #[test]
    fn a_state_is_written_as_the_owned_form_encodes() {
        let rec = record();
        // One signature missing: both the `None` and the 65 bytes appear.
        let staged = rec.staged.as_ref().unwrap();
        assert!(staged.sigs.iter().any(Option::is_none));
        for st in [rec.current.as_ref().unwrap(), staged] {
            assert_eq!(
                encode_state(st).unwrap(),
                frame(KIND_STATE, &owned(st)).unwrap()
            );
        }
    }

    /// The owned form of `st`, as reads decode it.
    fn owned(st: &SignedState) -> StateV1 {
        let mut sigs = Vec::with_capacity(st.sigs.len());
        for sig in &st.sigs {
            sigs.push(sig.map(|s| perun_wallet::signature_bytes(&s).to_vec()));
        }
        StateV1 {
            state: st.state.clone(),
            sigs,
        }
    }

    #[test]
    fn every_phase_round_trips() {
        for c in 0..=8u8 {
            let p = phase_from_code(c).unwrap();
            assert_eq!(phase_code(p), c);
        }
        assert!(phase_from_code(9).is_none());
    }

    #[test]
    fn any_flipped_bit_or_truncation_is_detected() {
        let rec = record();
        let id = rec.id();
        let bytes = encode_state(rec.current.as_ref().unwrap()).unwrap();
        for i in 0..bytes.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = bytes.clone();
                bad[i] ^= bit;
                assert!(decode_state(id, &bad).is_err(), "flip at {i} undetected");
            }
        }
        for len in 0..bytes.len() {
            assert!(decode_state(id, &bytes[..len]).is_err());
        }
    }

    #[test]
    fn kinds_and_newer_formats_are_refused() {
        let rec = record();
        let id = rec.id();
        let meta = encode_meta(&rec).unwrap();
        assert!(matches!(
            decode_state(id, &meta),
            Err(Error::Corrupt { .. })
        ));
        let mut newer = meta.clone();
        newer[0] = RECORD_FORMAT + 1;
        let n = newer.len() - 4;
        let crc = crc32fast::hash(&newer[..n]);
        newer[n..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            decode_meta(id, &newer),
            Err(Error::FormatTooNew { found, .. }) if found == RECORD_FORMAT + 1
        ));
    }

    /// A record written before the burnt version was stored (format 1)
    /// still decodes, with nothing burnt; one written now keeps it.
    #[test]
    fn format_1_records_still_decode() {
        let rec = record();
        let id = rec.id();
        let old = frame_as(
            1,
            KIND_META,
            &MetaV1 {
                params: rec.params.clone(),
                index: 0,
                phase: phase_code(rec.phase),
                peers: rec.peers.clone(),
                metadata: rec.metadata.clone(),
            },
        )
        .unwrap();
        let meta = decode_meta(id, &old).unwrap();
        assert_eq!(meta.burnt, 0);
        let back = meta.into_record(rec.current.clone(), rec.staged.clone());
        assert_eq!(
            back,
            ChannelRecord {
                burnt: 0,
                ..rec.clone()
            }
        );
        let old_state = frame_as(1, KIND_STATE, &owned(rec.current.as_ref().unwrap())).unwrap();
        assert_eq!(
            decode_state(id, &old_state).unwrap(),
            *rec.current.as_ref().unwrap()
        );
        assert_eq!(
            decode_meta(id, &encode_meta(&rec).unwrap()).unwrap().burnt,
            3
        );
        // Format 0 never existed.
        let zero = frame_as(0, KIND_META, &0u8).unwrap();
        assert!(matches!(decode_meta(id, &zero), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn high_s_signature_on_disk_is_refused() {
        let rec = record();
        let id = rec.id();
        let body = StateV1 {
            state: rec.current.as_ref().unwrap().state.clone(),
            sigs: vec![Some(vec![0xff; 64].into_iter().chain([27]).collect()), None],
        };
        let bytes = frame(KIND_STATE, &body).unwrap();
        assert!(matches!(
            decode_state(id, &bytes),
            Err(Error::Corrupt { .. })
        ));
    }
}
