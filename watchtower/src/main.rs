//! `perun-watchtower`: serves the tower's API (the library's `api` module)
//! and runs its responder (`responder`) against an Ethereum node.
//!
//! The responder uses an `EthAdjudicator` (the client's backend and
//! transaction queue) sending from the keystore's account. The API serves
//! even while the node cannot be reached: the responder reconnects with
//! backoff and `/health` says `connecting` meanwhile.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use alloy_primitives::Address;
use clap::Parser;
use perun_adjudicator::EthConfig;
use perun_watchtower::api::Config as ApiConfig;
use perun_watchtower::responder::Config as ResponderConfig;
use perun_watchtower::service::{Service, ServiceConfig};
use perun_watchtower::{Error, Result};
use serde::Deserialize;
use tracing::{error, info, warn};

/// Environment variable holding the keystore password, if no `--password-file` is given.
const PASSWORD_ENV: &str = "PERUN_TOWER_KEYSTORE_PASSWORD";

/// A watchtower for perun state channels: keeps encrypted appointments for
/// offline clients and answers disputes for them (refutes a stale state
/// with the newest appointment, concludes after the timeout).
///
/// Every flag may also come from `--config`; a flag given on the command
/// line wins.
#[derive(Debug, Parser)]
#[command(name = "perun-watchtower", version)]
struct Cli {
    /// WebSocket URL of the Ethereum node the responder watches (ws:// or wss://).
    #[arg(long, value_name = "WS_URL")]
    rpc: Option<String>,
    /// Address of the adjudicator contract whose disputes the tower answers.
    #[arg(long, value_name = "ADDRESS")]
    adjudicator: Option<Address>,
    /// Encrypted JSON keystore (Web3 secret storage) of the tower's key: it
    /// signs subscriptions and receipts (and pays the responder's gas).
    #[arg(long, value_name = "FILE")]
    keystore: Option<PathBuf>,
    /// File whose first line is the keystore password; without it the
    /// password is read from the environment variable PERUN_TOWER_KEYSTORE_PASSWORD.
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// The tower's redb database file (created if missing).
    #[arg(long, value_name = "PATH")]
    db: Option<PathBuf>,
    /// Address and port the HTTP API listens on, e.g. 127.0.0.1:9814.
    #[arg(long, value_name = "IP:PORT")]
    listen: Option<SocketAddr>,
    /// The block the adjudicator was deployed in: where a tower with no
    /// stored cursor starts scanning for disputes (default 0; set it on a
    /// real chain). A stored cursor wins.
    #[arg(long, value_name = "BLOCK")]
    from_block: Option<u64>,
    /// A TOML (.toml) or JSON (any other extension) file with the same keys
    /// as the flags (rpc, adjudicator, keystore, password_file, db, listen,
    /// from_block), an optional [api] table: slots_per_registration,
    /// subscription_secs, max_body, ip_rate / user_rate {burst, per_second},
    /// max_buckets, max_connections, header_timeout_secs, request_timeout_secs
    /// (default 10: a body that does not arrive in time gets 408),
    /// reclaim_after_secs (default 90 days; 0: never) and
    /// reclaim_interval_secs (default 3600: users expired that long ago are
    /// dropped with their appointments, once per interval), [api.store]
    /// {max_users, max_appointments, max_slots_per_user} (defaults 1,000,000,
    /// 1,000,000, 100,000: new users and appointments past them get
    /// tower_full) and max_open_disputes (100,000 running disputes kept for
    /// appointments that arrive during them); and an optional [responder] table: poll_ms (how often a
    /// running dispute is read again, default 5000), retry_min_ms,
    /// retry_max_ms, resume_grace_ms (after a restart, how long to wait for
    /// a transaction that may be in flight, default 30000).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// The config file's contents.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    rpc: Option<String>,
    adjudicator: Option<Address>,
    keystore: Option<PathBuf>,
    password_file: Option<PathBuf>,
    db: Option<PathBuf>,
    listen: Option<SocketAddr>,
    from_block: Option<u64>,
    #[serde(default)]
    api: ApiConfig,
    #[serde(default)]
    responder: ResponderConfig,
}

/// Everything the tower needs, merged from the flags and the file.
#[derive(Debug)]
struct Settings {
    rpc: String,
    adjudicator: Address,
    keystore: PathBuf,
    password_file: Option<PathBuf>,
    db: PathBuf,
    listen: SocketAddr,
    from_block: u64,
    api: ApiConfig,
    responder: ResponderConfig,
}

fn read_config(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)?;
    let bad = |e: String| Error::Config(format!("{}: {e}", path.display()));
    if path.extension().is_some_and(|e| e == "toml") {
        toml::from_str(&text).map_err(|e| bad(e.to_string()))
    } else {
        serde_json::from_str(&text).map_err(|e| bad(e.to_string()))
    }
}

fn settings(cli: Cli) -> Result<Settings> {
    let file = match &cli.config {
        Some(p) => read_config(p)?,
        None => FileConfig::default(),
    };
    let missing = |flag: &str| Error::Config(format!("--{flag} is required (flag or config file)"));
    let rpc = cli.rpc.or(file.rpc).ok_or_else(|| missing("rpc"))?;
    if !(rpc.starts_with("ws://") || rpc.starts_with("wss://")) {
        return Err(Error::Config(format!(
            "--rpc {rpc}: expected a ws:// or wss:// URL"
        )));
    }
    Ok(Settings {
        rpc,
        adjudicator: cli
            .adjudicator
            .or(file.adjudicator)
            .ok_or_else(|| missing("adjudicator"))?,
        keystore: cli
            .keystore
            .or(file.keystore)
            .ok_or_else(|| missing("keystore"))?,
        password_file: cli.password_file.or(file.password_file),
        db: cli.db.or(file.db).ok_or_else(|| missing("db"))?,
        listen: cli
            .listen
            .or(file.listen)
            .ok_or_else(|| missing("listen"))?,
        from_block: cli.from_block.or(file.from_block).unwrap_or(0),
        api: file.api,
        responder: file.responder,
    })
}

fn password(s: &Settings) -> Result<String> {
    match &s.password_file {
        Some(p) => {
            let text = std::fs::read_to_string(p)?;
            Ok(text.lines().next().unwrap_or("").to_string())
        }
        None => std::env::var(PASSWORD_ENV).map_err(|_| {
            Error::Config(format!("no --password-file and {PASSWORD_ENV} is not set"))
        }),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    info!("shutting down");
}

async fn run(cli: Cli) -> Result<()> {
    let s = settings(cli)?;
    let account = Arc::new(perun_wallet::keystore::load(&s.keystore, password(&s)?)?);
    let listener = tokio::net::TcpListener::bind(s.listen).await?;
    let service = Service::start(
        account,
        &s.db,
        listener,
        ServiceConfig {
            rpc: s.rpc.clone(),
            chain: EthConfig::new(s.adjudicator, s.from_block, []),
            api: s.api.clone(),
            responder: s.responder,
        },
    )
    .await?;
    info!(
        tower = %service.tower().address(),
        listen = %service.addr(),
        db = %s.db.display(),
        rpc = %s.rpc,
        adjudicator = %s.adjudicator,
        "serving the watchtower API and answering disputes"
    );
    shutdown_signal().await;
    service.stop().await
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "perun-watchtower failed");
            std::process::ExitCode::FAILURE
        }
    }
}
