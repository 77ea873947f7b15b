//! Application rules: what an app channel's states may do beyond the
//! generic rule, checked off-chain before every signature and, by the app's
//! contract, on-chain when a dispute is progressed (DESIGN §3, §6).

use std::fmt;
use std::sync::Arc;

use crate::{Params, State};

/// Why an app refused a state: the app's own typed reason, kept whole.
///
/// Apps return their own error enums (see [`tictactoe::Illegal`](crate::tictactoe::Illegal));
/// callers that know the app get the reason back with [`downcast_ref`](Self::downcast_ref).
#[derive(Clone)]
pub struct AppRejection(Arc<dyn std::error::Error + Send + Sync>);

impl AppRejection {
    /// Wraps an app's reason.
    pub fn new(reason: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(Arc::new(reason))
    }

    /// The app's reason as its own type, if it is a `T`.
    pub fn downcast_ref<T: std::error::Error + 'static>(&self) -> Option<&T> {
        self.0.downcast_ref::<T>()
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for AppRejection {
    fn from(reason: E) -> Self {
        Self::new(reason)
    }
}

impl fmt::Debug for AppRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for AppRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

/// Rejections compare by what they say: the channel's errors are `Eq`.
impl PartialEq for AppRejection {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}

impl Eq for AppRejection {}

/// Application rules on top of the generic transition rule.
///
/// The generic rule (channel, versions, assets, per-asset sums, a final
/// state ends the channel) is always checked first; an `App` decides only
/// what the generic rule leaves open. The same rules must hold in the app's
/// contract (`IApp.validTransition`), which the adjudicator calls when a
/// dispute is progressed: a state the Rust app accepts and the contract
/// refuses could be signed off-chain but not enforced.
pub trait App: Send + Sync + fmt::Debug {
    /// Checks version 0 (its app data and outcome) of a proposed channel.
    fn valid_init(&self, params: &Params, state: &State) -> Result<(), AppRejection> {
        let _ = (params, state);
        Ok(())
    }

    /// Whether participant `actor` may move the channel from `from` to `to`.
    fn valid_transition(
        &self,
        params: &Params,
        from: &State,
        to: &State,
        actor: usize,
    ) -> Result<(), AppRejection>;

    /// Whose move it is in `state`, for apps with turns; `None` if nobody's
    /// (the game is over) or the app has no turns. The client progresses a
    /// dispute on-chain only when it is its move.
    fn next_actor(&self, params: &Params, state: &State) -> Option<usize> {
        let _ = (params, state);
        None
    }
}

/// The rule of payment channels: only the actor's balances may decrease and
/// `appData` stays empty. Payment channels (`app == 0`) use it without being
/// asked; it is an `App` so that code holding an `Arc<dyn App>` can name it.
#[derive(Debug, Default, Clone, Copy)]
pub struct PaymentApp;

impl App for PaymentApp {
    fn valid_transition(
        &self,
        _params: &Params,
        from: &State,
        to: &State,
        actor: usize,
    ) -> Result<(), AppRejection> {
        crate::rules::check_payment(from, to, actor).map_err(AppRejection::new)
    }
}
