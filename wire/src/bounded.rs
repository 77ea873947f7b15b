//! Deserializers that refuse oversized sequences *while* decoding.
//!
//! A derived `Deserialize` for `Vec<T>` believes the length prefix and keeps
//! pushing; an empty inner `Vec` costs one byte on the wire but 24 in memory,
//! so a 1 MiB frame could make us allocate tens of MiB. These mirrors of the
//! channel types cap every sequence at the channel limits, so memory stays
//! proportional to what a valid message can hold. The field order mirrors the
//! `sol!` structs exactly; the codec's round-trip tests pin that.

use std::marker::PhantomData;

use alloy_primitives::{B256, Bytes, Signature, U256};
use perun_channel::limits::{MAX_ASSETS, MAX_PARTICIPANTS};
use perun_channel::{Allocation, Asset, SignedState, State};
use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};

use crate::message::Participant;

/// A `Vec` of at most `N` elements.
struct Capped<T, const N: usize>(Vec<T>);

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for Capped<T, N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T, const N: usize>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for V<T, N> {
            type Value = Capped<T, N>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "a sequence of at most {N} elements")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let hint = seq.size_hint().unwrap_or(0);
                if hint > N {
                    return Err(de::Error::invalid_length(hint, &self));
                }
                let mut out = Vec::with_capacity(hint);
                while let Some(x) = seq.next_element()? {
                    if out.len() == N {
                        return Err(de::Error::invalid_length(N + 1, &self));
                    }
                    out.push(x);
                }
                Ok(Capped(out))
            }
        }
        d.deserialize_seq(V::<T, N>(PhantomData))
    }
}

#[derive(Deserialize)]
struct AllocationDe {
    assets: Capped<Asset, MAX_ASSETS>,
    balances: Capped<Capped<U256, MAX_PARTICIPANTS>, MAX_ASSETS>,
}

impl From<AllocationDe> for Allocation {
    fn from(a: AllocationDe) -> Self {
        Allocation {
            assets: a.assets.0,
            balances: a.balances.0.into_iter().map(|r| r.0).collect(),
        }
    }
}

#[derive(Deserialize)]
struct StateDe {
    channel_id: B256,
    version: u64,
    outcome: AllocationDe,
    app_data: Bytes,
    is_final: bool,
}

impl From<StateDe> for State {
    fn from(s: StateDe) -> Self {
        State {
            channelId: s.channel_id,
            version: s.version,
            outcome: s.outcome.into(),
            appData: s.app_data,
            isFinal: s.is_final,
        }
    }
}

#[derive(Deserialize)]
struct SignedStateDe {
    state: StateDe,
    sigs: Capped<Option<Signature>, MAX_PARTICIPANTS>,
}

impl From<SignedStateDe> for SignedState {
    fn from(s: SignedStateDe) -> Self {
        SignedState {
            state: s.state.into(),
            sigs: s.sigs.0,
        }
    }
}

pub(crate) fn participants<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Participant>, D::Error> {
    Ok(Capped::<Participant, MAX_PARTICIPANTS>::deserialize(d)?.0)
}

pub(crate) fn shares<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<B256>, D::Error> {
    Ok(Capped::<B256, MAX_PARTICIPANTS>::deserialize(d)?.0)
}

pub(crate) fn signatures<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Signature>, D::Error> {
    Ok(Capped::<Signature, MAX_PARTICIPANTS>::deserialize(d)?.0)
}

pub(crate) fn allocation<'de, D: Deserializer<'de>>(d: D) -> Result<Allocation, D::Error> {
    Ok(AllocationDe::deserialize(d)?.into())
}

pub(crate) fn state<'de, D: Deserializer<'de>>(d: D) -> Result<State, D::Error> {
    Ok(StateDe::deserialize(d)?.into())
}

pub(crate) fn signed<'de, D: Deserializer<'de>>(d: D) -> Result<SignedState, D::Error> {
    Ok(SignedStateDe::deserialize(d)?.into())
}

pub(crate) fn opt_signed<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SignedState>, D::Error> {
    Ok(Option::<SignedStateDe>::deserialize(d)?.map(Into::into))
}
