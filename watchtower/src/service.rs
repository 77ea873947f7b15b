//! The whole tower in one call: the HTTP API and the supervised responder
//! over one store, as the `perun-watchtower` binary runs them. Tests,
//! benchmarks and applications that embed a tower start it here.
//!
//! ```no_run
//! # async fn run() -> perun_watchtower::Result<()> {
//! use std::sync::Arc;
//! use perun_adjudicator::EthConfig;
//! use perun_watchtower::service::{Service, ServiceConfig};
//!
//! let account = Arc::new(perun_wallet::LocalAccount::random());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9814").await?;
//! let adjudicator = "0x5FbDB2315678afecb367f032d93F642f64180aa3".parse().expect("address");
//! let tower = Service::start(
//!     account,
//!     std::path::Path::new("tower.redb"),
//!     listener,
//!     ServiceConfig::new("ws://127.0.0.1:8545", EthConfig::new(adjudicator, 0, [])),
//! )
//! .await?;
//! println!("tower {} on http://{}", tower.tower().address(), tower.addr());
//! tower.stop().await?;
//! # Ok(())
//! # }
//! ```

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use perun_adjudicator::{EthAdjudicator, EthConfig};
use perun_wallet::LocalAccount;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::api::{self, Tower};
use crate::responder::{self, Health, Responder, Stats};
use crate::store::Store;
use crate::{Error, Result};

/// What a tower service is built from.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// WebSocket URL of the node the responder watches.
    pub rpc: String,
    /// The adjudicator, the block to scan from when no cursor is stored,
    /// and the backend's transaction settings.
    pub chain: EthConfig,
    /// The API's limits.
    pub api: api::Config,
    /// The responder's timings.
    pub responder: responder::Config,
}

impl ServiceConfig {
    /// Default API limits and responder timings.
    pub fn new(rpc: impl Into<String>, chain: EthConfig) -> Self {
        Self {
            rpc: rpc.into(),
            chain,
            api: api::Config::default(),
            responder: responder::Config::default(),
        }
    }
}

/// A running tower: the API on its listener and the responder.
#[derive(Debug)]
pub struct Service {
    addr: SocketAddr,
    tower: Arc<Tower>,
    stats: Arc<Stats>,
    stop: watch::Sender<bool>,
    api: Option<JoinHandle<Result<()>>>,
    responder: Option<JoinHandle<()>>,
}

impl Service {
    /// Opens the store at `db`, serves the API on `listener` and starts the
    /// responder, which signs and pays gas with `account` (as do receipts).
    /// The API serves even while the node cannot be reached: the responder
    /// reconnects with backoff and `/health` says `connecting` meanwhile.
    pub async fn start(
        account: Arc<LocalAccount>,
        db: &Path,
        listener: tokio::net::TcpListener,
        config: ServiceConfig,
    ) -> Result<Self> {
        let db = db.to_path_buf();
        let store = tokio::task::spawn_blocking(move || Store::open(db))
            .await??
            // The responder's copy too (it keeps the running disputes).
            .with_limits(config.api.store);
        let tower = Arc::new(Tower::new(
            store.clone(),
            Arc::clone(&account),
            config.api.clone(),
            api::system_clock(),
        )?);
        let stats = Arc::new(Stats::default());
        tower.set_responder(Arc::clone(&stats));
        let addr = listener.local_addr()?;
        let (stop, stopped_rx) = watch::channel(false);
        let responder = tokio::spawn(supervise_responder(
            Arc::new(config),
            account,
            store,
            Arc::clone(&stats),
            stopped_rx.clone(),
        ));
        let api = tokio::spawn(api::serve(
            listener,
            Arc::clone(&tower),
            stopped(stopped_rx),
        ));
        Ok(Self {
            addr,
            tower,
            stats,
            stop,
            api: Some(api),
            responder: Some(responder),
        })
    }

    /// Where the API listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The API's state (address, store).
    pub fn tower(&self) -> &Arc<Tower> {
        &self.tower
    }

    /// The responder's counters and health.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Stops accepting requests, lets open ones finish (up to 5 s), stops
    /// the responder (up to 10 s) and closes the store.
    pub async fn stop(mut self) -> Result<()> {
        let _ = self.stop.send(true);
        let served = match self.api.take() {
            Some(api) => api.await.map_err(Error::from).and_then(|r| r),
            None => Ok(()),
        };
        if let Some(responder) = self.responder.take()
            && tokio::time::timeout(Duration::from_secs(10), responder)
                .await
                .is_err()
        {
            warn!("the responder did not stop within 10 s");
        }
        served
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // Dropped without `stop`: end the tasks anyway.
        let _ = self.stop.send(true);
    }
}

/// Resolves once `stop` turns true.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Connects the responder's backend (retrying with backoff) and runs the
/// responder until shutdown; restarts it if it ever panics.
async fn supervise_responder(
    config: Arc<ServiceConfig>,
    account: Arc<LocalAccount>,
    store: Store,
    stats: Arc<Stats>,
    stop: watch::Receiver<bool>,
) {
    let mut attempt = 0u32;
    loop {
        if *stop.borrow() {
            return;
        }
        let run = tokio::spawn(run_responder(
            Arc::clone(&config),
            Arc::clone(&account),
            store.clone(),
            Arc::clone(&stats),
            stop.clone(),
        ));
        match run.await {
            Ok(()) => return,
            Err(e) => {
                attempt += 1;
                let pause = config.responder.backoff(attempt);
                error!(error = %e, attempt, ?pause, "the responder failed; restarting it");
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = stopped(stop.clone()) => return,
                }
            }
        }
    }
}

async fn run_responder(
    config: Arc<ServiceConfig>,
    account: Arc<LocalAccount>,
    store: Store,
    stats: Arc<Stats>,
    stop: watch::Receiver<bool>,
) {
    let mut attempt = 0u32;
    let adjudicator = loop {
        let connect = EthAdjudicator::connect(&config.rpc, &account, config.chain.clone());
        let res = tokio::select! {
            r = connect => r,
            () = stopped(stop.clone()) => return,
        };
        match res {
            Ok(a) => break a,
            Err(e) => {
                attempt += 1;
                let pause = config.responder.backoff(attempt);
                warn!(error = %e, rpc = %config.rpc, attempt, ?pause, "cannot reach the node; retrying");
                stats.set_health(Health::Connecting(Arc::new(e)));
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = stopped(stop.clone()) => return,
                }
            }
        }
    };
    info!(chain = %adjudicator.chain_id(), "responder connected");
    stats.set_health(Health::Starting);
    let feed = adjudicator.clone();
    let r = Responder::new(
        store,
        Arc::new(adjudicator) as Arc<dyn perun_adjudicator::Adjudicator>,
        config.responder,
        stats,
    );
    r.run(move |from| feed.registrations(from), stopped(stop))
        .await;
}
