//! What the client's chain index keeps: the last block it scanned and the
//! facts it found about this account's channels in the logs up to there.
//!
//! It lives in the store's metadata slot ([`Persister::meta_put`]) under
//! [`ChainIndexRecord::key`], one record per deployment and account, so a
//! scan after a restart starts where the last one ended and still answers
//! for the older channels. A channel's facts stay after the channel's
//! record is removed: they are the chain's history, not the channel's state.
//!
//! Encoding: `CHAIN_INDEX_FORMAT ‖ postcard body ‖ crc32` (the crc covers
//! the format and the body): the slot returns the caller's bytes as stored,
//! so a damaged value is detected here and reported, never used.
//!
//! [`Persister::meta_put`]: crate::Persister::meta_put

use perun_channel::{Address, ChannelId, U256};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The format byte this build writes and the newest it reads.
pub const CHAIN_INDEX_FORMAT: u8 = 1;

/// The index of one account on one deployment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainIndexRecord {
    /// The last block scanned (every log up to it is reflected in `facts`);
    /// `None` before the first scan.
    pub cursor: Option<u64>,
    /// Every fact found, in chain order (block, then log index), each once.
    pub facts: Vec<IndexedFact>,
}

/// One log of the chain about one of the account's channels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedFact {
    /// The block the log was mined in.
    pub block: u64,
    /// Its index in the block (with `block`: its position, the key that
    /// keeps a log from being counted twice).
    pub log_index: u64,
    /// The channel.
    pub channel: ChannelId,
    /// What happened.
    pub kind: FactKind,
}

/// What a log says. Holder events are about the account (the participant
/// the log names); the adjudicator's are about the channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FactKind {
    /// `amount` arrived at `holder` for the account (`Deposited`).
    Deposited {
        /// The asset holder.
        holder: Address,
        /// What arrived.
        amount: U256,
    },
    /// A state was registered (`Registered`).
    Registered {
        /// Its version.
        version: u64,
        /// When its challenge ends.
        timeout: u64,
    },
    /// The channel was concluded (`Concluded`).
    Concluded {
        /// The concluded version.
        version: u64,
    },
    /// The outcome paid the account `amount` at `holder` (`Paid`).
    Paid {
        /// The asset holder.
        holder: Address,
        /// What was paid.
        amount: U256,
    },
    /// The outcome's push to the account failed; `amount` is credited
    /// (`Credited`).
    Credited {
        /// The asset holder.
        holder: Address,
        /// What was credited.
        amount: U256,
    },
    /// `amount` of the account's credit was paid to `receiver` (`Withdrawn`).
    Withdrawn {
        /// The asset holder.
        holder: Address,
        /// Who got it.
        receiver: Address,
        /// What was paid.
        amount: U256,
    },
}

impl ChainIndexRecord {
    /// The metadata key of `account`'s index on the deployment (`chain_id`,
    /// `adjudicator`): one store may serve several.
    pub fn key(chain_id: U256, adjudicator: Address, account: Address) -> String {
        format!("chain_index/{chain_id}/{adjudicator}/{account}")
    }

    /// The stored bytes.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut bytes =
            postcard::to_extend(self, vec![CHAIN_INDEX_FORMAT]).map_err(|e| Error::Corrupt {
                id: None,
                reason: format!("encoding the chain index: {e}"),
            })?;
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        Ok(bytes)
    }

    /// Reads a record; a damaged, truncated or foreign value is
    /// [`Error::Corrupt`], one of a newer build [`Error::FormatTooNew`].
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let corrupt = |reason: String| Error::Corrupt { id: None, reason };
        let Some((body, crc)) = bytes.split_last_chunk::<4>() else {
            return Err(corrupt("chain index: truncated".into()));
        };
        if crc32fast::hash(body) != u32::from_le_bytes(*crc) {
            return Err(corrupt("chain index: checksum mismatch".into()));
        }
        let Some((format, body)) = body.split_first() else {
            return Err(corrupt("chain index: empty".into()));
        };
        if *format > CHAIN_INDEX_FORMAT {
            return Err(Error::FormatTooNew {
                found: *format,
                supported: CHAIN_INDEX_FORMAT,
            });
        }
        if *format == 0 {
            return Err(corrupt("chain index: format 0".into()));
        }
        let (rec, rest): (Self, _) = postcard::take_from_bytes(body)
            .map_err(|e| corrupt(format!("chain index does not decode: {e}")))?;
        if !rest.is_empty() {
            return Err(corrupt(format!(
                "chain index: {} trailing bytes",
                rest.len()
            )));
        }
        Ok(rec)
    }
}

impl IndexedFact {
    /// The log's position in the chain.
    pub fn position(&self) -> (u64, u64) {
        (self.block, self.log_index)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use perun_channel::B256;

    fn record() -> ChainIndexRecord {
        ChainIndexRecord {
            cursor: Some(42),
            facts: vec![
                IndexedFact {
                    block: 7,
                    log_index: 1,
                    channel: B256::repeat_byte(1),
                    kind: FactKind::Deposited {
                        holder: Address::repeat_byte(2),
                        amount: U256::from(10),
                    },
                },
                IndexedFact {
                    block: 9,
                    log_index: 0,
                    channel: B256::repeat_byte(1),
                    kind: FactKind::Withdrawn {
                        holder: Address::repeat_byte(2),
                        receiver: Address::repeat_byte(3),
                        amount: U256::MAX,
                    },
                },
            ],
        }
    }

    #[test]
    fn round_trips() {
        let r = record();
        assert_eq!(ChainIndexRecord::decode(&r.encode().unwrap()).unwrap(), r);
        let empty = ChainIndexRecord::default();
        assert_eq!(
            ChainIndexRecord::decode(&empty.encode().unwrap()).unwrap(),
            empty
        );
    }

    #[test]
    fn damage_and_newer_formats_are_errors() {
        let bytes = record().encode().unwrap();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(ChainIndexRecord::decode(&b).is_err(), "flipped byte {i}");
        }
        for n in 0..bytes.len() {
            assert!(ChainIndexRecord::decode(&bytes[..n]).is_err(), "cut at {n}");
        }
        let mut newer = vec![CHAIN_INDEX_FORMAT + 1, 0];
        let crc = crc32fast::hash(&newer);
        newer.extend_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            ChainIndexRecord::decode(&newer),
            Err(Error::FormatTooNew { .. })
        ));
    }
}
