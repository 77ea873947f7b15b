//! Serializers of the channel types that allocate nothing, for
//! `#[serde(serialize_with = ...)]` in the wire and store codecs.
//!
//! `ruint`'s binary `Serialize` for `U256` (and alloy's for `Signature`,
//! three integers) copies each number into a fresh `Vec` first: a state
//! with two balances and a signature cost six allocations per encoding, on
//! every update's message and store write. These write the same bytes from
//! the stack: in a binary format they produce exactly what the derived
//! impls produce (the tests pin it), and a human-readable format gets the
//! derived output itself (the public functions decide; the wrappers below
//! are only ever written in a binary format).

use alloy_primitives::{Address, B256, Bytes, Signature, U256};
use serde::ser::{SerializeSeq, SerializeStruct, SerializeTuple};
use serde::{Serialize, Serializer};

use crate::{Allocation, Asset, SignedState, State};

/// A `U256` as its 32 big-endian bytes (the derived binary form).
struct Word<'a>(&'a U256);

impl Serialize for Word<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0.to_be_bytes::<32>())
    }
}

/// A signature as the tuple `(r, s, y_parity as U64)` alloy writes.
struct Sig<'a>(&'a Signature);

impl Serialize for Sig<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(3)?;
        t.serialize_element(&Word(&self.0.r()))?;
        t.serialize_element(&Word(&self.0.s()))?;
        t.serialize_element(&Parity(u64::from(self.0.v())))?;
        t.end()
    }
}

/// A signature's `y_parity` as the `U64` alloy writes: 8 big-endian bytes.
struct Parity(u64);

impl Serialize for Parity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0.to_be_bytes())
    }
}

/// A sequence of `T`s, each written through `F`.
struct Seq<'a, T, F>(&'a [T], F);

impl<'a, T, F, W> Serialize for Seq<'a, T, F>
where
    F: Fn(&'a T) -> W,
    W: Serialize,
{
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for x in self.0 {
            seq.serialize_element(&(self.1)(x))?;
        }
        seq.end()
    }
}

struct AssetSer<'a>(&'a Asset);

impl Serialize for AssetSer<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Asset", 2)?;
        st.serialize_field("chainId", &Word(&self.0.chainId))?;
        st.serialize_field::<Address>("holder", &self.0.holder)?;
        st.end()
    }
}

struct AllocationSer<'a>(&'a Allocation);

impl<'a> Serialize for AllocationSer<'a> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Allocation", 2)?;
        st.serialize_field("assets", &Seq(&self.0.assets, AssetSer))?;
        let row = |r: &'a Vec<U256>| Seq(r.as_slice(), Word);
        st.serialize_field("balances", &Seq(&self.0.balances, row))?;
        st.end()
    }
}

struct StateSer<'a>(&'a State);

impl Serialize for StateSer<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let st = self.0;
        let mut out = s.serialize_struct("State", 5)?;
        out.serialize_field::<B256>("channelId", &st.channelId)?;
        out.serialize_field("version", &st.version)?;
        out.serialize_field("outcome", &AllocationSer(&st.outcome))?;
        out.serialize_field::<Bytes>("appData", &st.appData)?;
        out.serialize_field("isFinal", &st.isFinal)?;
        out.end()
    }
}

struct SignedSer<'a>(&'a SignedState);

impl<'a> Serialize for SignedSer<'a> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut out = s.serialize_struct("SignedState", 2)?;
        out.serialize_field("state", &StateSer(&self.0.state))?;
        let sig = |x: &'a Option<Signature>| x.as_ref().map(Sig);
        out.serialize_field("sigs", &Seq(&self.0.sigs, sig))?;
        out.end()
    }
}

macro_rules! human_or {
    ($s:ident, $v:ident, $binary:expr) => {
        if $s.is_human_readable() {
            $v.serialize($s)
        } else {
            $binary.serialize($s)
        }
    };
}

/// A [`State`], as its derived `Serialize` writes it.
pub fn state<S: Serializer>(v: &State, s: S) -> Result<S::Ok, S::Error> {
    human_or!(s, v, StateSer(v))
}

/// An [`Allocation`], as its derived `Serialize` writes it.
pub fn allocation<S: Serializer>(v: &Allocation, s: S) -> Result<S::Ok, S::Error> {
    human_or!(s, v, AllocationSer(v))
}

/// A [`SignedState`], as its derived `Serialize` writes it.
pub fn signed<S: Serializer>(v: &SignedState, s: S) -> Result<S::Ok, S::Error> {
    human_or!(s, v, SignedSer(v))
}

/// An optional [`SignedState`], as its derived `Serialize` writes it.
pub fn opt_signed<S: Serializer>(v: &Option<SignedState>, s: S) -> Result<S::Ok, S::Error> {
    human_or!(s, v, v.as_ref().map(SignedSer))
}

/// A [`Signature`], as alloy's `Serialize` writes it.
pub fn signature<S: Serializer>(v: &Signature, s: S) -> Result<S::Ok, S::Error> {
    human_or!(s, v, Sig(v))
}

/// Signatures, as the derived `Serialize` of a `Vec<Signature>` writes them.
pub fn signatures<S: Serializer>(v: &[Signature], s: S) -> Result<S::Ok, S::Error> {
    human_or!(s, v, Seq(v, Sig))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Domain, Params};
    use perun_wallet::{Account, LocalAccount};
    use proptest::prelude::*;

    #[derive(Serialize)]
    struct Fast {
        #[serde(serialize_with = "state")]
        state: State,
        #[serde(serialize_with = "allocation")]
        alloc: Allocation,
        #[serde(serialize_with = "signed")]
        signed: SignedState,
        #[serde(serialize_with = "opt_signed")]
        opt: Option<SignedState>,
        #[serde(serialize_with = "signature")]
        sig: Signature,
        #[serde(serialize_with = "signatures")]
        sigs: Vec<Signature>,
    }

    #[derive(Serialize)]
    struct Derived {
        state: State,
        alloc: Allocation,
        signed: SignedState,
        opt: Option<SignedState>,
        sig: Signature,
        sigs: Vec<Signature>,
    }

    fn signed_state(words: &[[u8; 32]], version: u64, app: &[u8], signers: usize) -> SignedState {
        let w = |i: usize| U256::from_be_bytes(words[i % words.len()]);
        let parts: Vec<LocalAccount> = (0..signers.max(1))
            .map(|_| LocalAccount::random())
            .collect();
        let domain = Domain {
            chain_id: w(0),
            adjudicator: Address::repeat_byte(0xad),
        };
        let funding = vec![parts.iter().enumerate().map(|(i, _)| w(i + 1)).collect()];
        let params = Params::payment(
            domain,
            60,
            w(2),
            parts.iter().map(Account::address).collect(),
            funding.clone(),
        );
        let assets = vec![Asset {
            chainId: w(3),
            holder: Address::repeat_byte(0xaa),
        }];
        let mut st = State::initial(&params, Allocation::new(assets, funding));
        st.version = version;
        st.appData = Bytes::copy_from_slice(app);
        st.isFinal = version % 2 == 1;
        let mut signed = SignedState::new(st);
        for (i, p) in parts.iter().enumerate().skip(1) {
            signed.sign(&params, i, p).expect("sign");
        }
        signed
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Byte for byte what the derived impls write, in postcard (the
        /// codecs' format) and in JSON (human-readable: the derived impls).
        #[test]
        fn writes_what_the_derived_impls_write(
            words in proptest::collection::vec(any::<[u8; 32]>(), 1..6),
            version in any::<u64>(),
            app in proptest::collection::vec(any::<u8>(), 0..40),
            signers in 1usize..4,
            staged in any::<bool>(),
            assets in 0usize..4,
            parts in 0usize..4,
        ) {
            let signed = signed_state(&words, version, &app, signers);
            let opt = staged.then(|| signed.clone());
            let sig = signed.sigs.iter().flatten().next().copied()
                .unwrap_or_else(|| Signature::new(U256::from(1), U256::MAX, true));
            let sigs = vec![sig, Signature::new(U256::MAX, U256::from(7), false)];
            // Several assets and rows of any length, unlike a payment state.
            let w = |i: usize| U256::from_be_bytes(words[i % words.len()]);
            let wide = Allocation {
                assets: (0..assets)
                    .map(|i| Asset { chainId: w(i), holder: Address::repeat_byte(i as u8) })
                    .collect(),
                balances: (0..assets).map(|a| (0..a + parts).map(|p| w(a + p)).collect()).collect(),
            };
            let fast = Fast {
                state: signed.state.clone(), alloc: wide.clone(),
                signed: signed.clone(), opt: opt.clone(), sig, sigs: sigs.clone(),
            };
            let derived = Derived {
                state: signed.state.clone(), alloc: wide,
                signed, opt, sig, sigs,
            };
            prop_assert_eq!(
                postcard::to_allocvec(&fast).expect("fast"),
                postcard::to_allocvec(&derived).expect("derived")
            );
            prop_assert_eq!(
                serde_json::to_string(&fast).expect("fast"),
                serde_json::to_string(&derived).expect("derived")
            );
        }
    }
}
