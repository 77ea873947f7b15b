//! Channel ids, state hashes and nonces.

use alloy_primitives::{B256, Keccak256, U256, keccak256};
use alloy_sol_types::SolValue;

use crate::{Params, State};

/// A channel's id: `keccak256(abi.encode(params))`.
pub type ChannelId = B256;

impl Params {
    /// `keccak256(abi.encode(params))`, as the adjudicator computes it.
    pub fn channel_id(&self) -> ChannelId {
        keccak256(self.abi_encode())
    }
}

impl State {
    /// `keccak256(abi.encode(state))`: what every participant signs (EIP-191 wrapped).
    ///
    /// Streamed into the hasher word by word: alloy's `abi_encode` builds
    /// tokens and a buffer first (three allocations per hash, two hashes
    /// per update). The tests pin it to `keccak256(self.abi_encode())`.
    pub fn hash(&self) -> B256 {
        let mut h = Abi(Keccak256::new());
        let alloc = &self.outcome;
        // The allocation's two dynamic members: a length and two words per
        // asset; a length, an offset per row, and each row's length and
        // words.
        let assets_len = 32 + 64 * alloc.assets.len();
        let rows_len: usize = alloc.balances.iter().map(|r| 32 + 32 * r.len()).sum();
        let balances_len = 32 + 32 * alloc.balances.len() + rows_len;
        // `abi.encode` of one dynamic struct: its offset, then the struct,
        // whose head holds the static fields and the offsets of the others.
        const HEAD: usize = 5 * 32;
        h.int(32);
        h.0.update(self.channelId);
        h.word(&U256::from(self.version));
        h.int(HEAD);
        h.int(HEAD + 64 + assets_len + balances_len);
        h.int(usize::from(self.isFinal));
        // The allocation: the offsets of its two members, then each.
        h.int(64);
        h.int(64 + assets_len);
        h.int(alloc.assets.len());
        for a in &alloc.assets {
            h.word(&a.chainId);
            h.0.update(a.holder.into_word());
        }
        h.int(alloc.balances.len());
        let mut offset = 32 * alloc.balances.len();
        for row in &alloc.balances {
            h.int(offset);
            offset += 32 + 32 * row.len();
        }
        for row in &alloc.balances {
            h.int(row.len());
            for v in row {
                h.word(v);
            }
        }
        // `bytes`: its length, then the bytes padded to whole words.
        h.int(self.appData.len());
        h.0.update(&self.appData);
        h.0.update(&[0u8; 32][..self.appData.len().next_multiple_of(32) - self.appData.len()]);
        h.0.finalize()
    }
}

/// A hasher fed ABI words.
struct Abi(Keccak256);

impl Abi {
    fn word(&mut self, v: &U256) {
        self.0.update(v.to_be_bytes::<32>());
    }

    fn int(&mut self, v: usize) {
        self.word(&U256::from(v));
    }
}

/// The channel nonce: `keccak256(share_0 ‖ … ‖ share_{n-1})` over every
/// participant's random 32-byte share, in participant order.
pub fn derive_nonce(shares: &[B256]) -> U256 {
    let mut buf = Vec::with_capacity(shares.len() * 32);
    for s in shares {
        buf.extend_from_slice(s.as_slice());
    }
    U256::from_be_bytes(keccak256(buf).0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Address, Allocation, Asset, Bytes};
    use proptest::prelude::*;

    fn word() -> impl Strategy<Value = U256> {
        any::<[u8; 32]>().prop_map(U256::from_be_bytes)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The streamed hash is `keccak256(abi.encode(state))` as alloy
        /// encodes it, for any shape of allocation and app data.
        #[test]
        fn the_streamed_hash_is_the_abi_encodings(
            id in any::<[u8; 32]>(),
            version in any::<u64>(),
            assets in proptest::collection::vec((word(), any::<[u8; 20]>()), 0..4),
            balances in proptest::collection::vec(proptest::collection::vec(word(), 0..5), 0..4),
            app in proptest::collection::vec(any::<u8>(), 0..100),
            is_final in any::<bool>(),
        ) {
            let state = State {
                channelId: B256::from(id),
                version,
                outcome: Allocation {
                    assets: assets
                        .into_iter()
                        .map(|(chain, holder)| Asset { chainId: chain, holder: Address::from(holder) })
                        .collect(),
                    balances,
                },
                appData: Bytes::from(app),
                isFinal: is_final,
            };
            prop_assert_eq!(state.hash(), keccak256(state.abi_encode()));
        }
    }
}
