//! The app rules this client knows, by app contract address (shared core:
//! the proposal, update, sync and watcher protocols look rules up here).

use std::collections::HashMap;
use std::sync::Arc;

use perun_channel::{Address, App, Params, PaymentApp};

/// App contract address → its Rust rules. Payment channels (`app == 0`)
/// always use [`PaymentApp`]; a channel whose app is not listed is refused
/// when proposed, because none of its states could be checked.
#[derive(Debug, Clone, Default)]
pub(crate) struct Apps {
    by_address: HashMap<Address, Arc<dyn App>>,
}

impl Apps {
    /// Adds (or replaces) the rules of the app contract at `address`.
    pub(crate) fn insert(&mut self, address: Address, app: Arc<dyn App>) {
        self.by_address.insert(address, app);
    }

    /// The rules of the channel `params` describes.
    pub(crate) fn rules(&self, params: &Params) -> perun_channel::Result<&dyn App> {
        if params.is_payment() {
            return Ok(&PaymentApp);
        }
        self.by_address
            .get(&params.app)
            .map(|a| a.as_ref())
            .ok_or(perun_channel::Error::UnknownApp(params.app))
    }
}
