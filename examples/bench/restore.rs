//! `restore_10k_channels_ms` and `rss_bytes_per_channel_10k`.
//!
//! Opening 10,000 channels on chain would take hours, so the parent writes
//! 10,000 valid records straight into Alice's redb file through the
//! `Persister` API: `Active`, version 0 signed by both parties' real keys,
//! realistic params (two participants, one ether asset of the deployed
//! holder, 60 s challenge), both peers' real `PeerId`s. Then a child process
//! (this binary with [`CHILD_FLAG`]) connects Alice's chain backends to the
//! same anvil, reads its RSS, opens the store and builds the client (which
//! loads, re-verifies and registers every channel, then starts each one's
//! watcher and `Sync`), and stops the clock once every channel is protected
//! (`Client::wait_protected`: each watcher subscribed and read the channel's
//! history from the chain). It reads its RSS again five seconds later and
//! prints the figures as one JSON line.
//!
//! Bob is not running: his `PeerId` has no known address, and the child's
//! client has a zero `Sync` timeout, so each channel's `Sync` fails at once
//! (as after a restart while the peer is away) instead of retrying for a
//! minute. The child runs without a log subscriber.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use perun::adjudicator::{Deployment, EthAdjudicator, EthConfig, EthFunder};
use perun::channel::{Allocation, Params, Phase, SignedState, State, U256};
use perun::client::{Client, Timeouts};
use perun::persistence::{ChannelRecord, Persister, RedbPersister};
use perun::wallet::{Account, LocalAccount};
use perun::wire::{Keypair, PeerId, generate_key, load_key, save_key};
use serde_json::{Value, json};

use crate::Res;
use crate::peer::wait_or_kill;
use crate::setup::{Chain, deployment_args, deposit, eth_asset, parse_deployment};
use crate::stats::rss_bytes;

/// The first argument that makes this binary the restore child.
pub(crate) const CHILD_FLAG: &str = "--restore-child";
/// Prefix of the child's result line on stdout.
const RESULT_PREFIX: &str = "RESTORE_RESULT ";
/// How long the child waits after restore before reading its RSS again.
const SETTLE: Duration = Duration::from_secs(5);
/// How long the child waits for every restored channel to be protected.
const PROTECT_LIMIT: Duration = Duration::from_secs(120);

/// What the child measured.
#[derive(Debug)]
pub(crate) struct Restored {
    /// The child's whole result line.
    pub(crate) json: Value,
}

/// Writes `n` records for Alice into `dir/alice.redb`, then measures their
/// restore in a child process, giving it `time_box` to finish.
pub(crate) async fn measure(
    chain: &Chain,
    dir: &Path,
    n: usize,
    time_box: Duration,
) -> Res<Restored> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    let t = Instant::now();
    write_records(chain, dir, n).await?;
    let written_ms = t.elapsed().as_secs_f64() * 1e3;
    println!(
        "  wrote {n} channel records in {written_ms:.0} ms; restoring them in a child process ..."
    );
    let mut args = vec![
        CHILD_FLAG.to_string(),
        dir.display().to_string(),
        chain.anvil.ws_url(),
    ];
    args.extend(deployment_args(&chain.deployment));
    let mut json =
        tokio::task::spawn_blocking(move || run_child(&args, time_box, RESULT_PREFIX)).await??;
    // A restore that left channels out (a record refused) would be quicker
    // and still report a time: the figure is of all `n`, protected.
    for key in ["channels", "watching"] {
        let got = json[key].as_u64();
        if got != Some(n as u64) {
            return Err(format!("restored {key}: {got:?} of {n}").into());
        }
    }
    if let Some(fields) = json.as_object_mut() {
        fields.insert("records_written_ms".into(), json!(written_ms));
    }
    Ok(Restored { json })
}

/// Alice's and Bob's keys, saved for the child.
struct Keys {
    alice: LocalAccount,
    bob: LocalAccount,
    alice_net: Keypair,
    bob_peer: PeerId,
}

fn new_keys(dir: &Path) -> Res<Keys> {
    let alice = LocalAccount::random();
    let alice_net = generate_key();
    std::fs::write(dir.join("alice.secret"), hex_encode(&alice.secret_bytes()))?;
    save_key(&alice_net, &dir.join("alice.key"))?;
    Ok(Keys {
        alice,
        bob: LocalAccount::random(),
        alice_net,
        bob_peer: generate_key().public().to_peer_id(),
    })
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(s: &str) -> Res<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return Err("odd hex length".into());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(Into::into))
        .collect()
}

/// One active channel as Alice's client stores it after opening.
fn record(keys: &Keys, holder: &Deployment, nonce: U256) -> Res<ChannelRecord> {
    let domain = perun::channel::Domain {
        chain_id: U256::from(perun::adjudicator::testing::CHAIN_ID),
        adjudicator: holder.adjudicator,
    };
    let params = Params::payment(
        domain,
        60,
        nonce,
        vec![keys.alice.address(), keys.bob.address()],
        vec![vec![deposit(), deposit()]],
    );
    let alloc = Allocation::new(vec![eth_asset(holder)], vec![vec![deposit(), deposit()]]);
    let mut v0 = SignedState::new(State::initial(&params, alloc));
    v0.sign(&params, 0, &keys.alice)?;
    v0.sign(&params, 1, &keys.bob)?;
    Ok(ChannelRecord {
        params,
        index: 0,
        phase: Phase::Active,
        current: Some(v0),
        staged: None,
        peers: vec![
            keys.alice_net.public().to_peer_id().to_bytes(),
            keys.bob_peer.to_bytes(),
        ],
        metadata: Vec::new(),
        burnt: 0,
    })
}

/// Writes the records in concurrent batches, so the store's group commit
/// folds them into few transactions.
async fn write_records(chain: &Chain, dir: &Path, n: usize) -> Res<()> {
    const BATCH: usize = 1_000;
    let keys = new_keys(dir)?;
    let store = Arc::new(RedbPersister::open(dir.join("alice.redb")).await?);
    let base = U256::from(rand_nonce());
    for start in (0..n).step_by(BATCH) {
        let mut writes = tokio::task::JoinSet::new();
        for i in start..(start + BATCH).min(n) {
            let rec = record(&keys, &chain.deployment, base + U256::from(i))?;
            let store = store.clone();
            writes.spawn(async move { store.channel_created(&rec).await });
        }
        while let Some(done) = writes.join_next().await {
            done??;
        }
    }
    drop(store);
    Ok(())
}

/// A nonce base that differs between runs.
fn rand_nonce() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

/// Runs this binary with `args`, killed after `time_box`; the JSON of its
/// stdout line that starts with `prefix`.
pub(crate) fn run_child(args: &[String], time_box: Duration, prefix: &str) -> Res<Value> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let Some(status) = wait_or_kill(&mut child, time_box)? else {
        return Err(format!("the child {args:?} took longer than {time_box:?}; killed").into());
    };
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        std::io::Read::read_to_string(&mut stdout, &mut out)?;
    }
    if !status.success() {
        return Err(format!("the child {args:?} failed with {status}: {out}").into());
    }
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .ok_or("the child printed no result")?;
    Ok(serde_json::from_str(line)?)
}

/// The child's arguments.
struct ChildArgs {
    dir: PathBuf,
    ws_url: String,
    deployment: Deployment,
}

fn child_args(args: &[String]) -> Res<ChildArgs> {
    let [dir, url, deployment @ ..] = args else {
        return Err(
            "usage: --restore-child DIR WS_URL ADJUDICATOR ETH_HOLDER TOKEN ERC20_HOLDER BLOCK"
                .into(),
        );
    };
    Ok(ChildArgs {
        dir: PathBuf::from(dir),
        ws_url: url.clone(),
        deployment: parse_deployment(deployment)?,
    })
}

/// The child: restores Alice's client from `dir` and prints its figures.
pub(crate) async fn child(args: &[String]) -> Res<()> {
    let a = child_args(args)?;
    let secret = hex_decode(&std::fs::read_to_string(a.dir.join("alice.secret"))?)?;
    let account = LocalAccount::from_slice(&secret)?;
    let net = load_key(&a.dir.join("alice.key"))?;
    let config = EthConfig::from_deployment(&a.deployment);
    let funder = EthFunder::connect(&a.ws_url, &account, config.clone()).await?;
    let adjudicator = EthAdjudicator::connect(&a.ws_url, &account, config).await?;

    let rss_before = rss_bytes()?;
    let started = Instant::now();
    let store = RedbPersister::open(a.dir.join("alice.redb")).await?;
    let opened_ms = started.elapsed().as_secs_f64() * 1e3;
    let client = Client::builder()
        .account(Arc::new(account))
        .network_key(net)
        .funder(Arc::new(funder))
        .adjudicator(Arc::new(adjudicator))
        .persister(Arc::new(store))
        .timeouts(Timeouts {
            sync: Duration::ZERO,
            ..Timeouts::default()
        })
        .build()
        .await?;
    let built_ms = started.elapsed().as_secs_f64() * 1e3;
    // Restored means protected: every channel's watcher subscribed and read
    // the chain (its history), with every peer offline.
    client.wait_protected(PROTECT_LIMIT).await?;
    let restore_ms = started.elapsed().as_secs_f64() * 1e3;
    let channels = client.channels().len();
    let watching = client.watching();
    let rss_restored = rss_bytes()?;
    tokio::time::sleep(SETTLE).await;
    let rss_after = rss_bytes()?;
    let result = json!({
        "channels": channels,
        "store_open_ms": opened_ms,
        "restore_ms": restore_ms,
        "built_ms": built_ms,
        "watching": watching,
        "rss_before_bytes": rss_before,
        "rss_restored_bytes": rss_restored,
        "rss_after_settle_bytes": rss_after,
    });
    println!("{RESULT_PREFIX}{result}");
    client.shutdown().await;
    Ok(())
}
