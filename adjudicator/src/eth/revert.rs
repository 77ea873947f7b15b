//! Revert data of our contracts decoded into the crate's errors, with their
//! arguments, so a revert on Ethereum reads like the same broken rule on
//! [`SimLedger`](crate::SimLedger).
//!
//! The errors with a variant of their own (`VersionTooLow { registered, got }`,
//! `HoldingsChanged { .. }`, ...) are mapped one by one; any other custom
//! error of the contracts (or of the token and OpenZeppelin code they call)
//! is named and its arguments rendered from the contracts' ABI, so nothing
//! arrives as an opaque byte string unless no contract declares it.

use std::sync::LazyLock;

use alloy::dyn_abi::{DynSolValue, JsonAbiExt};
use alloy::json_abi;
use alloy::primitives::{B256, Bytes};
use alloy::sol_types::{Panic, Revert, SolError, SolInterface};
use tracing::warn;

use crate::bindings::{
    Adjudicator as Adj, AssetHolderERC20 as Erc20Holder, AssetHolderETH as EthHolder,
    TestToken as Token, TicTacToeApp as Ttt,
};
use crate::{AppRevert, Error, RevertReason};

/// Every custom error the contracts (and the code they call) declare.
static ERRORS: LazyLock<Vec<json_abi::Error>> = LazyLock::new(|| {
    let mut all: Vec<json_abi::Error> = [
        Adj::abi::errors(),
        EthHolder::abi::errors(),
        Erc20Holder::abi::errors(),
        Token::abi::errors(),
        Ttt::abi::errors(),
    ]
    .into_iter()
    .flat_map(|m| m.into_values().flatten())
    .collect();
    all.sort_by_key(|e| e.selector());
    all.dedup_by_key(|e| e.selector());
    all
});

/// The error a revert of `op` (in `tx`, if mined) with `data` stands for.
pub(super) fn decode(op: &'static str, tx: Option<B256>, data: &[u8]) -> Error {
    let err = typed(data).unwrap_or_else(|| {
        if op == PROGRESS && Adj::AdjudicatorErrors::abi_decode(data).is_err() {
            // The adjudicator passes the app's revert on unchanged.
            return app_rejected(data);
        }
        Error::Reverted {
            op,
            tx,
            reason: reason(data),
        }
    });
    warn!(op, ?tx, %err, "reverted");
    err
}

/// The errors that have a variant of their own.
fn typed(data: &[u8]) -> Option<Error> {
    use Adj::AdjudicatorErrors as A;
    use EthHolder::AssetHolderETHErrors as H;
    use Token::TestTokenErrors as T;
    if let Ok(e) = A::abi_decode(data) {
        return match e {
            A::AlreadyConcluded(_) => Some(Error::AlreadyConcluded),
            A::TimeoutPassed(_) => Some(Error::TimeoutPassed),
            A::VersionTooLow(e) => Some(Error::VersionTooLow {
                registered: e.registered,
                got: e.got,
            }),
            A::VersionStep(e) => Some(Error::VersionStep {
                registered: e.registered,
                got: e.got,
            }),
            A::NotRegistered(_) => Some(Error::NotRegistered),
            A::AppRejected(e) => Some(app_rejected(&e.reason)),
            A::TimeoutNotPassed(e) => Some(Error::TimeoutNotPassed {
                timeout: e.timeout,
                now: e.now,
            }),
            A::WrongState(_) => Some(Error::WrongState),
            A::NotFinal(_) => Some(Error::NotFinal),
            A::WrongSigner(e) => usize::try_from(e.index)
                .ok()
                .map(|index| Error::BadSignature { index }),
            A::WrongDomain(e) => Some(Error::WrongDomain {
                chain_id: e.chainId,
                adjudicator: e.adjudicator,
            }),
            A::DuplicateParticipant(e) => usize::try_from(e.index)
                .ok()
                .map(|index| Error::DuplicateParticipant { index }),
            A::ChallengeDuration(e) => Some(Error::ChallengeDuration(e.got)),
            A::ForeignAsset(e) => usize::try_from(e.index)
                .ok()
                .map(|index| Error::ForeignAsset {
                    index,
                    chain_id: e.chainId,
                }),
            A::Dimensions(_) => Some(Error::Dimensions),
            A::NoApp(_) => Some(Error::NoApp),
            A::AlreadyProgressed(_) => Some(Error::AlreadyProgressed),
            A::FinalState(_) => Some(Error::Channel(perun_channel::Error::Final)),
            A::BadActor(e) => usize::try_from(e.actor)
                .ok()
                .map(|a| Error::Channel(perun_channel::Error::Index(a))),
            A::AssetsChanged(_) => Some(Error::Channel(perun_channel::Error::AssetsChanged)),
            A::SumChanged(e) => usize::try_from(e.index)
                .ok()
                .map(|i| Error::Channel(perun_channel::Error::SumChanged(i))),
            _ => None,
        };
    }
    // Both holders share their base contract's errors (the ERC20 holder's own have no variant).
    if let Ok(e) = H::abi_decode(data) {
        return match e {
            H::NotSettled(_) => Some(Error::NotConcluded),
            H::WrongSigner(_)
            | H::ECDSAInvalidSignature(_)
            | H::ECDSAInvalidSignatureS(_)
            | H::ECDSAInvalidSignatureLength(_) => Some(Error::BadAuthorization),
            H::PaymentFailed(e) => Some(Error::PaymentFailed(e.to)),
            H::HoldingsChanged(e) => Some(Error::HoldingsChanged {
                funding_id: e.fundingId,
                expected: e.expected,
                found: Some(e.held),
            }),
            H::Overflow(_) => Some(Error::Overflow),
            H::WrongNonce(e) => Some(Error::WrongNonce {
                expected: e.expected,
                got: e.got,
            }),
            _ => None,
        };
    }
    if let Ok(T::ERC20InsufficientBalance(e)) = T::abi_decode(data) {
        return Some(Error::InsufficientFunds {
            need: e.needed,
            have: e.balance,
        });
    }
    None
}

/// The op name of the adjudicator's `progress`, whose reverts may be the app's.
pub(super) const PROGRESS: &str = "progress";

/// An app's revert as [`Error::AppRejected`], keeping its data: the tic-tac-toe app's errors
/// decode into the Rust app's reasons (the same type the sim reports), any other revert is an
/// [`AppRevert`].
pub(crate) fn app_rejected(data: &[u8]) -> Error {
    let rejection = match tictactoe_reason(data) {
        Some(illegal) => perun_channel::AppRejection::new(illegal),
        None => perun_channel::AppRejection::new(AppRevert {
            reason: reason(data),
        }),
    };
    Error::AppRejected {
        rejection,
        data: Some(Bytes::copy_from_slice(data)),
    }
}

/// A revert of the tic-tac-toe app as the Rust app's reason; `None` for anything else.
pub fn tictactoe_reason(data: &[u8]) -> Option<perun_channel::tictactoe::Illegal> {
    use Ttt::TicTacToeAppErrors as E;
    use perun_channel::tictactoe::Illegal;
    let small = |v: alloy::primitives::U256| usize::try_from(v).ok();
    Some(match E::abi_decode(data).ok()? {
        E::Participants(e) => Illegal::Participants(small(e.n)?),
        E::BadData(e) => Illegal::BadData(u8::try_from(e.which).ok()?),
        E::GameOver(_) => Illegal::GameOver,
        E::NotYourTurn(e) => Illegal::NotYourTurn {
            expected: small(e.expected)?,
            actor: small(e.actor)?,
        },
        E::Occupied(e) => Illegal::Occupied(small(e.cell)?),
        E::NoMove(_) => Illegal::NoMove,
        E::SeveralMoves(_) => Illegal::SeveralMoves,
        E::WrongMark(e) => Illegal::WrongMark(small(e.cell)?),
        E::WrongNextActor(_) => Illegal::WrongNextActor,
        E::WrongOutcome(e) => Illegal::WrongOutcome(small(e.asset)?),
        E::WrongFinal(_) => Illegal::WrongFinal,
    })
}

/// A revert without a variant of its own, named and with its arguments.
pub(super) fn reason(data: &[u8]) -> RevertReason {
    if data.is_empty() {
        return RevertReason::Empty;
    }
    if let Ok(r) = Revert::abi_decode(data) {
        return RevertReason::Message(r.reason);
    }
    if let Ok(p) = Panic::abi_decode(data) {
        return RevertReason::Panic(p.code);
    }
    let custom = data.get(..4).and_then(|selector| {
        let e = ERRORS
            .iter()
            .find(|e| e.selector().as_slice() == selector)?;
        let args = e.abi_decode_input(&data[4..]).ok()?;
        Some(RevertReason::Custom {
            name: e.name.as_str(),
            args: args.iter().map(render).collect(),
        })
    });
    custom.unwrap_or_else(|| RevertReason::Unknown(Bytes::copy_from_slice(data)))
}

/// One argument as Solidity would print it.
fn render(v: &DynSolValue) -> String {
    match v {
        DynSolValue::Address(a) => a.to_string(),
        DynSolValue::Uint(u, _) => u.to_string(),
        DynSolValue::Int(i, _) => i.to_string(),
        DynSolValue::Bool(b) => b.to_string(),
        DynSolValue::FixedBytes(w, n) => Bytes::copy_from_slice(&w[..(*n).min(32)]).to_string(),
        DynSolValue::Bytes(b) => Bytes::copy_from_slice(b).to_string(),
        DynSolValue::String(s) => format!("{s:?}"),
        other => format!("{other:?}"),
    }
}
