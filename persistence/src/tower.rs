//! What the client keeps about a channel's watchtowers: the last
//! appointment sequence number it used and the receipt each tower signed.
//!
//! It lives in the channel record's `metadata` ([`Change::Metadata`]), so
//! it is written with the same durability, atomicity and crash safety as
//! the rest of the record, in every store, and goes away with the channel.
//! Empty metadata is an empty record (a channel from before towers).
//!
//! Encoding: `TOWER_RECORD_FORMAT ‖ postcard body`. Like the rest of a
//! record, it is covered by the store's checksum.
//!
//! [`Change::Metadata`]: crate::Change::Metadata

use perun_channel::{Address, B256, ChannelId};
use serde::{Deserialize, Serialize};

use crate::{Error, MAX_METADATA_LEN, Result};

/// The format byte this build writes and the newest it reads (2 added the
/// sealed blobs, 3 the channel's own tower identity; older records still
/// decode).
pub const TOWER_RECORD_FORMAT: u8 = 3;
/// Most towers one channel keeps receipts of (well inside
/// [`MAX_METADATA_LEN`]: a receipt is about 200 bytes).
pub const MAX_TOWERS: usize = 32;

/// A receipt a tower signed for one of the channel's appointments, checked
/// by the client before it was stored. With the sealed blob it covers
/// ([`TowerRecord::blob`]; sealing is randomised, so the blob cannot be made
/// again), it proves the tower took the job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TowerReceipt {
    /// The tower's address (what its signature recovers to).
    pub tower: Address,
    /// The state version the appointment carried.
    pub version: u64,
    /// The appointment's sequence number.
    pub seq: u64,
    /// The appointment's locator.
    pub locator: B256,
    /// The block the tower watches from.
    pub start_block: u64,
    /// The user's signature over the appointment (65 bytes).
    pub user_signature: Vec<u8>,
    /// The tower's signature over the receipt (65 bytes).
    pub tower_signature: Vec<u8>,
}

/// A channel's tower record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TowerRecord {
    /// The highest appointment sequence number used; the next one is
    /// higher, also after a restart (it is stored before it is sent).
    pub seq: u64,
    /// The newest receipt of each tower, at most [`MAX_TOWERS`].
    pub receipts: Vec<TowerReceipt>,
    /// The sealed blobs the receipts cover, once per sequence number (every
    /// tower of a round gets the same blob); only those a receipt names.
    pub blobs: Vec<SealedBlob>,
    /// The secret key of this channel's own identity at the towers (random,
    /// made before the first appointment). Towers never see the client's
    /// on-chain account, which `Deposited` logs next to the channel id: one
    /// unlinkable user per channel. It only signs appointments; whoever
    /// holds it can replace this channel's appointments, so it is kept with
    /// the channel's states.
    pub identity: Option<[u8; 32]>,
}

/// The blob of one appointment round, as the towers received it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedBlob {
    /// The round's sequence number.
    pub seq: u64,
    /// The sealed blob.
    pub blob: Vec<u8>,
}

/// Format 1: no blobs.
#[derive(Deserialize)]
struct TowerRecordV1 {
    seq: u64,
    receipts: Vec<TowerReceipt>,
}

/// Format 2: no identity (the client's account was the towers' user).
#[derive(Deserialize)]
struct TowerRecordV2 {
    seq: u64,
    receipts: Vec<TowerReceipt>,
    blobs: Vec<SealedBlob>,
}

impl TowerRecord {
    /// The receipt of `tower`, if any.
    pub fn receipt(&self, tower: Address) -> Option<&TowerReceipt> {
        self.receipts.iter().find(|r| r.tower == tower)
    }

    /// Keeps `r` as `tower`'s receipt unless the stored one has a higher
    /// `seq` (a late answer never replaces a newer receipt). Returns whether
    /// it was kept.
    ///
    /// A full record makes room by dropping the oldest receipt (lowest
    /// `seq`) of a tower `current` says no longer serves the channel (a
    /// client configured with other towers before a restart): with at most
    /// [`MAX_TOWERS`] current towers there always is one, so a current
    /// tower's receipt is never refused for room.
    pub fn put(&mut self, r: TowerReceipt, current: impl Fn(&Address) -> bool) -> bool {
        if let Some(old) = self.receipts.iter_mut().find(|x| x.tower == r.tower) {
            if old.seq > r.seq {
                return false;
            }
            *old = r;
            return true;
        }
        if self.receipts.len() >= MAX_TOWERS {
            let oldest_gone = self
                .receipts
                .iter()
                .enumerate()
                .filter(|(_, x)| !current(&x.tower))
                .min_by_key(|(_, x)| x.seq)
                .map(|(i, _)| i);
            match oldest_gone {
                Some(i) => {
                    self.receipts.swap_remove(i);
                }
                None => return false,
            }
        }
        self.receipts.push(r);
        true
    }

    /// The sealed blob of round `seq`, if kept.
    pub fn blob(&self, seq: u64) -> Option<&[u8]> {
        self.blobs
            .iter()
            .find(|b| b.seq == seq)
            .map(|b| b.blob.as_slice())
    }

    /// Keeps `blob` as round `seq`'s and drops blobs no receipt names.
    /// Blobs are evidence, not state: when the record would outgrow
    /// [`MAX_METADATA_LEN`] (very large channels), the oldest are dropped
    /// and the receipts stay.
    pub fn keep_blob(&mut self, seq: u64, blob: &[u8]) {
        if self.blob(seq).is_none() {
            self.blobs.push(SealedBlob {
                seq,
                blob: blob.to_vec(),
            });
        }
        let receipts = &self.receipts;
        self.blobs
            .retain(|b| receipts.iter().any(|r| r.seq == b.seq));
        self.blobs.sort_by_key(|b| std::cmp::Reverse(b.seq));
        // A receipt is about 200 bytes; keep room for all of them.
        let budget = MAX_METADATA_LEN.saturating_sub(64 + MAX_TOWERS * 256);
        let mut used = 0;
        self.blobs.retain(|b| {
            used += b.blob.len() + 16;
            used <= budget
        });
    }

    /// The metadata bytes.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let bytes =
            postcard::to_extend(self, vec![TOWER_RECORD_FORMAT]).map_err(|e| Error::Corrupt {
                id: None,
                reason: format!("encoding tower record: {e}"),
            })?;
        if bytes.len() > MAX_METADATA_LEN {
            return Err(Error::Corrupt {
                id: None,
                reason: format!("tower record of {} bytes", bytes.len()),
            });
        }
        Ok(bytes)
    }

    /// Reads the record from channel `id`'s metadata (empty: no record).
    pub fn decode(id: ChannelId, metadata: &[u8]) -> Result<Self> {
        let corrupt = |reason: String| Error::Corrupt {
            id: Some(id),
            reason,
        };
        let Some((format, body)) = metadata.split_first() else {
            return Ok(Self::default());
        };
        if *format > TOWER_RECORD_FORMAT {
            return Err(Error::FormatTooNew {
                found: *format,
                supported: TOWER_RECORD_FORMAT,
            });
        }
        let (rec, rest): (Self, _) = match *format {
            1 => {
                let (v1, rest): (TowerRecordV1, _) = postcard::take_from_bytes(body)
                    .map_err(|e| corrupt(format!("tower record: {e}")))?;
                let rec = Self {
                    seq: v1.seq,
                    receipts: v1.receipts,
                    ..Self::default()
                };
                (rec, rest)
            }
            2 => {
                let (v2, rest): (TowerRecordV2, _) = postcard::take_from_bytes(body)
                    .map_err(|e| corrupt(format!("tower record: {e}")))?;
                let rec = Self {
                    seq: v2.seq,
                    receipts: v2.receipts,
                    blobs: v2.blobs,
                    identity: None,
                };
                (rec, rest)
            }
            TOWER_RECORD_FORMAT => postcard::take_from_bytes(body)
                .map_err(|e| corrupt(format!("tower record: {e}")))?,
            _ => return Err(corrupt(format!("tower record format {format}"))),
        };
        if !rest.is_empty() {
            return Err(corrupt(format!(
                "tower record: {} trailing bytes",
                rest.len()
            )));
        }
        Ok(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(tower: u8, seq: u64) -> TowerReceipt {
        TowerReceipt {
            tower: Address::repeat_byte(tower),
            version: seq * 2,
            seq,
            locator: B256::repeat_byte(7),
            start_block: 3,
            user_signature: vec![1; 65],
            tower_signature: vec![2; 65],
        }
    }

    #[test]
    fn round_trip_and_newest_receipt_wins() {
        let id = ChannelId::repeat_byte(1);
        assert_eq!(
            TowerRecord::decode(id, &[]).expect("empty"),
            TowerRecord::default()
        );
        let mut rec = TowerRecord {
            seq: 9,
            ..TowerRecord::default()
        };
        assert!(rec.put(receipt(1, 5), |_| true));
        assert!(rec.put(receipt(2, 4), |_| true));
        assert!(!rec.put(receipt(1, 3), |_| true), "older receipt kept out");
        assert!(rec.put(receipt(1, 6), |_| true));
        let bytes = rec.encode().expect("encode");
        assert_eq!(TowerRecord::decode(id, &bytes).expect("decode"), rec);
        assert_eq!(rec.receipt(Address::repeat_byte(1)).map(|r| r.seq), Some(6));

        let mut newer = bytes.clone();
        newer[0] = TOWER_RECORD_FORMAT + 1;
        assert!(matches!(
            TowerRecord::decode(id, &newer),
            Err(Error::FormatTooNew { .. })
        ));
        assert!(matches!(
            TowerRecord::decode(id, &bytes[..bytes.len() - 3]),
            Err(Error::Corrupt { .. })
        ));
    }

    #[test]
    fn a_full_record_drops_the_oldest_receipt_of_a_tower_gone() {
        let mut rec = TowerRecord::default();
        for t in 0..MAX_TOWERS as u8 {
            assert!(rec.put(receipt(t, 10 + u64::from(t)), |_| true));
        }
        // Towers 0..4 are still configured; 4 is the oldest of the rest.
        let current = |a: &Address| (0..4).any(|t| *a == Address::repeat_byte(t));
        assert!(rec.put(receipt(200, 99), current));
        assert_eq!(rec.receipts.len(), MAX_TOWERS);
        assert!(rec.receipt(Address::repeat_byte(4)).is_none());
        assert!(rec.receipt(Address::repeat_byte(200)).is_some());
        assert!((0..4).all(|t| rec.receipt(Address::repeat_byte(t)).is_some()));
        // Were every stored tower current, there is no room (a client never
        // configures more than MAX_TOWERS).
        assert!(!rec.put(receipt(201, 100), |_| true));
        assert!(rec.receipt(Address::repeat_byte(201)).is_none());
    }

    #[test]
    fn blobs_are_kept_for_the_receipts_that_name_them() {
        let id = ChannelId::repeat_byte(1);
        let mut rec = TowerRecord::default();
        rec.put(receipt(1, 5), |_| true);
        rec.keep_blob(5, &[5; 700]);
        rec.put(receipt(2, 6), |_| true);
        rec.keep_blob(6, &[6; 700]);
        assert_eq!(rec.blob(5), Some(&[5u8; 700][..]));
        // Tower 1 moves on to round 6: round 5's blob is named by no receipt.
        rec.put(receipt(1, 6), |_| true);
        rec.keep_blob(6, &[6; 700]);
        assert_eq!(rec.blob(5), None);
        assert_eq!(rec.blobs.len(), 1);
        let bytes = rec.encode().expect("encode");
        assert_eq!(TowerRecord::decode(id, &bytes).expect("decode"), rec);
        // A blob too big for the record is dropped; the receipts stay.
        rec.put(receipt(3, 7), |_| true);
        rec.keep_blob(7, &vec![7; MAX_METADATA_LEN]);
        assert_eq!(rec.blob(7), None);
        assert!(rec.encode().is_ok());
    }

    #[test]
    fn format_1_records_decode_without_blobs() {
        #[derive(Serialize)]
        struct V1<'a> {
            seq: u64,
            receipts: &'a [TowerReceipt],
        }
        let receipts = vec![receipt(1, 5)];
        let bytes = postcard::to_extend(
            &V1 {
                seq: 5,
                receipts: &receipts,
            },
            vec![1],
        )
        .expect("encode");
        let rec = TowerRecord::decode(ChannelId::repeat_byte(1), &bytes).expect("decode");
        assert_eq!(
            (rec.seq, rec.receipts, rec.blobs, rec.identity),
            (5, receipts, vec![], None)
        );
    }
}
