//! A watchtower keeps an offline user's money. Alice, Bob and a
//! `perun-watchtower` process on a local anvil: Bob pays Alice a few times
//! while Alice's client hands each new state to the tower (encrypted: the
//! tower cannot read it or tell which channel it is for). Alice's process
//! then stops for good. Bob registers an old state in which he had more;
//! the tower sees the dispute, opens Alice's appointment, refutes with the
//! latest state and, after the challenge period, concludes, so both are paid
//! on-chain. Alice starts again later and finds her channel withdrawn with
//! the right balance. Events and balances are printed.
//!
//! Run it with `cargo xtask demo watchtower` (it builds the
//! `perun-watchtower` binary first; `PERUN_TOWER_BIN` names another one).
//! Alice runs as a child process of this program (`watchtower alice ...`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use perun::adjudicator::testing::{Anvil, CHAIN_ID};
use perun::adjudicator::{
    Adjudicator, AdjudicatorEvent, Deployment, EthAdjudicator, EthConfig, EthFunder, FeedItem,
    SignedChannel, deploy,
};
use perun::channel::{Address, Allocation, Asset, ChannelId, Phase, U256};
use perun::client::{
    AcceptPaymentsToMe, AcceptWithin, ChannelProposal, Client, Opened, Participant, Timeouts,
    TowerConfig,
};
use perun::persistence::RedbPersister;
use perun::wallet::keystore::{self, ScryptParams};
use perun::wallet::{Account, LocalAccount};
use perun::wire::{Multiaddr, PeerId};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The challenge period (short: anvil's clock is moved forward).
const CHALLENGE: u64 = 60;
/// Bob's payments to Alice.
const PAYMENTS: usize = 5;

fn eth(wei: U256) -> String {
    let milli = wei / U256::from(1_000_000_000_000_000u64);
    format!(
        "{}.{:0>3} ETH",
        milli / U256::from(1000),
        milli % U256::from(1000)
    )
}

fn signed_eth(before: U256, after: U256) -> String {
    if after >= before {
        format!("+{}", eth(after - before))
    } else {
        format!("-{}", eth(before - after))
    }
}

fn one_eth() -> U256 {
    U256::from(10u64).pow(U256::from(18))
}

fn eth_asset(holder: Address) -> Asset {
    Asset {
        chainId: U256::from(CHAIN_ID),
        holder,
    }
}

/// A client on the real chain with a redb store in `dir`, guarded by `towers`.
async fn client(
    ws: &str,
    config: &EthConfig,
    eth_holder: Address,
    account: &LocalAccount,
    db: &Path,
    towers: &[TowerConfig],
) -> Res<(Client, Opened)> {
    // Up to 2 ETH of our own per channel; the short challenge suits a local
    // anvil only (the default minimum is a day).
    let (accept, opened) = AcceptWithin::new([(eth_asset(eth_holder), U256::from(2) * one_eth())]);
    let accept = accept.min_challenge(Duration::from_secs(CHALLENGE));
    let mut builder = Client::builder()
        .account(Arc::new(account.clone()))
        .funder(Arc::new(
            EthFunder::connect(ws, account, config.clone()).await?,
        ))
        .adjudicator(Arc::new(
            EthAdjudicator::connect(ws, account, config.clone()).await?,
        ))
        .persister(Arc::new(RedbPersister::open(db).await?))
        .proposal_handler(Arc::new(accept))
        .update_handler(Arc::new(AcceptPaymentsToMe))
        .timeouts(Timeouts {
            dispute_poll: Duration::from_millis(200),
            ..Default::default()
        });
    for t in towers {
        builder = builder.watchtower(t.clone());
    }
    Ok((builder.build().await?, opened))
}

// ---------------------------------------------------------------- Alice --

/// What the story hands Alice's process on its command line.
struct AliceArgs {
    ws: String,
    deployment: Deployment,
    key: [u8; 32],
    db: PathBuf,
    tower: TowerConfig,
    bob: Option<(PeerId, Multiaddr, Address)>,
    restart: Option<ChannelId>,
}

fn parse_alice(args: &[String]) -> Res<AliceArgs> {
    let get = |name: &str| -> Res<&str> {
        let i = args
            .iter()
            .position(|a| a == name)
            .ok_or_else(|| format!("alice: missing {name}"))?;
        Ok(args
            .get(i + 1)
            .ok_or_else(|| format!("alice: {name} needs a value"))?)
    };
    let opt = |name: &str| get(name).ok();
    let key: [u8; 32] = hex::decode(get("--key")?)?
        .try_into()
        .map_err(|_| "alice: --key is 32 bytes")?;
    Ok(AliceArgs {
        ws: get("--ws")?.to_string(),
        deployment: Deployment {
            adjudicator: get("--adjudicator")?.parse()?,
            eth_holder: get("--eth-holder")?.parse()?,
            token: get("--token")?.parse()?,
            erc20_holder: get("--erc20-holder")?.parse()?,
            block: get("--block")?.parse()?,
        },
        key,
        db: PathBuf::from(get("--db")?),
        tower: TowerConfig::new(get("--tower-url")?, get("--tower")?.parse()?),
        bob: match (opt("--bob-peer"), opt("--bob-addr"), opt("--bob")) {
            (Some(p), Some(a), Some(b)) => Some((p.parse()?, a.parse()?, b.parse()?)),
            _ => None,
        },
        restart: opt("--restart").map(str::parse).transpose()?,
    })
}

/// Alice's process: opens the channel with Bob, takes his payments until
/// the tower holds a receipt for the latest state, then stops for good
/// (`exit`, no shutdown). With `--restart <channel>`: starts from her store
/// and waits until the channel is withdrawn.
async fn alice_main(args: &[String]) -> Res<()> {
    let a = parse_alice(args)?;
    let account = LocalAccount::from_bytes(&a.key)?;
    let config = EthConfig::from_deployment(&a.deployment);
    let (alice, _) = client(
        &a.ws,
        &config,
        a.deployment.eth_holder,
        &account,
        &a.db,
        std::slice::from_ref(&a.tower),
    )
    .await?;
    if let Some(id) = a.restart {
        let ch = alice
            .channel(&id)
            .ok_or("alice: the channel is not in her store")?;
        println!(
            "back online; her store says the channel is {:?}",
            ch.phase()
        );
        let phase = ch
            .wait_for_phase(Phase::Withdrawn, Duration::from_secs(60))
            .await;
        println!("the channel is {:?}", phase.map(|_| ch.phase())?);
        alice.shutdown().await;
        return Ok(());
    }
    let (bob_peer, bob_addr, bob) = a.bob.ok_or("alice: --bob-peer, --bob-addr and --bob")?;
    alice.add_peer(bob_peer, bob_addr).await?;
    let proposal = ChannelProposal::payment(
        vec![
            Participant {
                address: alice.address(),
                peer: alice.peer_id(),
            },
            Participant {
                address: bob,
                peer: bob_peer,
            },
        ],
        Allocation::new(
            vec![eth_asset(a.deployment.eth_holder)],
            vec![vec![one_eth(), one_eth()]],
        ),
        CHALLENGE,
    );
    let ch = alice.propose_channel(proposal).await?;
    println!("OPEN {}", ch.id());
    let want = PAYMENTS as u64;
    let latest = ch.wait_for_version(want, Duration::from_secs(60)).await?;
    let version = latest.state.version;
    // The tower's receipt for the latest state, checked and stored.
    for _ in 0..600 {
        if ch
            .tower_status()
            .iter()
            .any(|s| s.latest && s.version == Some(version))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = ch.tower_status();
    let receipt = status
        .iter()
        .find(|s| s.latest)
        .ok_or("alice: no tower receipt for the latest state")?;
    println!(
        "the tower {} holds her latest state (version {}); receipt stored",
        receipt.tower, version
    );
    println!("COVERED {version}");
    // Gone for good: no shutdown, no goodbye.
    std::process::exit(0);
}

// ---------------------------------------------------------------- tower --

/// The tower process; killed on drop.
struct TowerProcess {
    child: Child,
    listen: SocketAddr,
    log: PathBuf,
}

impl Drop for TowerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tower_bin() -> PathBuf {
    std::env::var_os("PERUN_TOWER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debug/perun-watchtower")
        })
}

/// One HTTP/1.1 GET on 127.0.0.1 (the demo needs no HTTP client crate).
async fn http_get(addr: SocketAddr, path: &str) -> Res<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: tower\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).await?;
    Ok(raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

async fn start_tower(
    anvil: &Anvil,
    d: &Deployment,
    account: &LocalAccount,
    dir: &Path,
) -> Res<TowerProcess> {
    keystore::save(account, dir.join("tower.json"), "demo", ScryptParams::LIGHT)?;
    std::fs::write(dir.join("tower.pw"), "demo\n")?;
    std::fs::write(
        dir.join("tower.toml"),
        "[responder]\npoll_ms = 200\nretry_min_ms = 100\nretry_max_ms = 1000\n",
    )?;
    let listen: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let log = dir.join("tower.log");
    let bin = tower_bin();
    let child = Command::new(&bin)
        .args(["--rpc", &anvil.ws_url()])
        .args(["--adjudicator", &d.adjudicator.to_string()])
        .args(["--from-block", &d.block.to_string()])
        .arg("--keystore")
        .arg(dir.join("tower.json"))
        .arg("--password-file")
        .arg(dir.join("tower.pw"))
        .arg("--db")
        .arg(dir.join("tower.redb"))
        .args(["--listen", &listen.to_string()])
        .arg("--config")
        .arg(dir.join("tower.toml"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .map_err(|e| {
            format!(
                "cannot start {} ({e}); run `cargo xtask demo watchtower`, which builds it",
                bin.display()
            )
        })?;
    let tower = TowerProcess { child, listen, log };
    for _ in 0..300 {
        if let Ok(h) = http_get(listen, "/health").await
            && h.contains("\"ok\"")
            && !h.contains("starting")
        {
            return Ok(tower);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "the tower did not become ready; its log:\n{}",
        std::fs::read_to_string(&tower.log).unwrap_or_default()
    )
    .into())
}

/// A line of the tower's `/metrics`, without the comments.
async fn tower_metric(addr: SocketAddr, name: &str) -> String {
    http_get(addr, "/metrics")
        .await
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with(name)).map(str::to_string))
        .unwrap_or_else(|| format!("{name} ?"))
}

// ---------------------------------------------------------------- story --

/// Starts Alice's process with `extra` arguments; her lines are printed
/// with a prefix and the ones in upper case sent on `lines`.
fn spawn_alice(
    base: &[String],
    extra: &[String],
) -> Res<(
    tokio::process::Child,
    tokio::sync::mpsc::UnboundedReceiver<String>,
)> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("alice")
        .args(base)
        .args(extra)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let out = child.stdout.take().ok_or("alice's stdout")?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(out).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            if l.split_whitespace()
                .next()
                .is_some_and(|w| w.chars().all(|c| c.is_ascii_uppercase()))
            {
                let _ = tx.send(l);
            } else {
                println!("  [alice]   {l}");
            }
        }
    });
    Ok((child, rx))
}

async fn story() -> Res<()> {
    println!("starting anvil and deploying the contracts ...");
    let anvil = Anvil::spawn().await?;
    let deployer = anvil.funded_account().await?;
    let d = deploy(&anvil.provider(&deployer).await?).await?;
    let config = EthConfig::from_deployment(&d);
    let (alice_acc, bob_acc, tower_acc) = (
        anvil.funded_account().await?,
        anvil.funded_account().await?,
        anvil.funded_account().await?,
    );
    let before = (
        anvil.eth_balance(alice_acc.address()).await?,
        anvil.eth_balance(bob_acc.address()).await?,
    );
    let dir = tempfile::tempdir()?;

    let tower = start_tower(&anvil, &d, &tower_acc, dir.path()).await?;
    println!(
        "watchtower {} serving on http://{} (its own process and account)",
        tower_acc.address(),
        tower.listen
    );
    let tower_cfg = TowerConfig::new(format!("http://{}", tower.listen), tower_acc.address());

    // Chain events of every channel, as the tower sees them.
    let feed_chain = EthAdjudicator::connect(&anvil.ws_url(), &deployer, config.clone()).await?;
    let mut feed = feed_chain.registrations(d.block);
    let printer = tokio::spawn(async move {
        loop {
            match feed.next().await {
                FeedItem::Event {
                    block,
                    event: AdjudicatorEvent::Registered { version, state, .. },
                } => println!(
                    "  [chain]   block {block}: Registered version {version} (Alice {}, Bob {})",
                    eth(state.outcome.balances[0][0]),
                    eth(state.outcome.balances[0][1])
                ),
                FeedItem::Event {
                    block,
                    event: AdjudicatorEvent::Concluded { version, .. },
                } => println!(
                    "  [chain]   block {block}: Concluded at version {version}; payouts pushed"
                ),
                _ => {}
            }
        }
    });

    let (bob, mut bob_opened) = client(
        &anvil.ws_url(),
        &config,
        d.eth_holder,
        &bob_acc,
        &dir.path().join("bob.redb"),
        &[],
    )
    .await?;
    let bob_addr = bob
        .listen_addrs()
        .await?
        .into_iter()
        .next()
        .ok_or("bob listens nowhere")?;
    let base: Vec<String> = vec![
        "--ws".into(),
        anvil.ws_url(),
        "--adjudicator".into(),
        d.adjudicator.to_string(),
        "--eth-holder".into(),
        d.eth_holder.to_string(),
        "--token".into(),
        d.token.to_string(),
        "--erc20-holder".into(),
        d.erc20_holder.to_string(),
        "--block".into(),
        d.block.to_string(),
        "--key".into(),
        hex::encode(alice_acc.secret_bytes()),
        "--db".into(),
        dir.path().join("alice.redb").to_string_lossy().into_owned(),
        "--tower-url".into(),
        tower_cfg.url.clone(),
        "--tower".into(),
        tower_cfg.address.to_string(),
    ];
    println!("\nAlice starts (a separate process) and opens a channel with Bob, 1 ETH each ...");
    let (mut alice, mut said) = spawn_alice(
        &base,
        &[
            "--bob-peer".into(),
            bob.peer_id().to_string(),
            "--bob-addr".into(),
            bob_addr.to_string(),
            "--bob".into(),
            bob.address().to_string(),
        ],
    )?;
    let bob_ch = bob_opened.recv().await.ok_or("bob's handler stopped")??;
    let id = bob_ch.id();
    // Alice's "OPEN <id>" line.
    said.recv().await.ok_or("alice stopped")?;
    println!("channel {id} open");

    let tenth = one_eth() / U256::from(10);
    bob_ch.pay(0, 0, tenth).await?;
    let old = bob_ch.state();
    println!(
        "Bob pays Alice 0.1 ETH (version {}); Bob keeps a copy of this state",
        old.state.version
    );
    for _ in 1..PAYMENTS {
        bob_ch.pay(0, 0, tenth).await?;
    }
    let latest = bob_ch.state();
    println!(
        "Bob pays Alice 0.4 ETH more; latest version {}: Alice {}, Bob {}",
        latest.state.version,
        eth(latest.state.outcome.balances[0][0]),
        eth(latest.state.outcome.balances[0][1])
    );
    let covered = said
        .recv()
        .await
        .ok_or("alice stopped before the tower had her state")?;
    alice.wait().await?;
    println!("Alice's process has stopped for good ({covered})");
    println!(
        "  [tower]   {}",
        tower_metric(tower.listen, "perun_tower_appointments ").await
    );

    println!("\nBob registers his old state on-chain, with Alice offline ...");
    let params = bob_ch.params().clone();
    bob.shutdown().await;
    let cheat = EthAdjudicator::connect(&anvil.ws_url(), &bob_acc, config.clone()).await?;
    cheat
        .register(&SignedChannel {
            params: params.clone(),
            state: old,
        })
        .await?;
    // The tower refutes on its own; wait until the chain holds Alice's state.
    wait_until(Duration::from_secs(60), || async {
        Ok(cheat
            .dispute(id)
            .await?
            .is_some_and(|d| d.version == latest.state.version))
    })
    .await?;
    println!("the tower refuted with version {}", latest.state.version);
    println!("\n... {CHALLENGE} s of chain time pass ...");
    anvil.increase_time(CHALLENGE + 1).await?;
    wait_until(Duration::from_secs(60), || async {
        Ok(cheat.dispute(id).await?.is_some_and(|d| d.concluded))
    })
    .await?;
    println!("the tower concluded the dispute: both are paid on-chain");
    for m in [
        "perun_tower_disputes_seen_total",
        "perun_tower_refutations_total",
        "perun_tower_conclusions_total",
    ] {
        println!("  [tower]   {}", tower_metric(tower.listen, m).await);
    }

    println!("\nAlice starts again, days later ...");
    let (mut again, _) = spawn_alice(&base, &["--restart".into(), id.to_string()])?;
    let status = again.wait().await?;
    if !status.success() {
        return Err(format!("alice's second run failed: {status}").into());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    printer.abort();

    let after = (
        anvil.eth_balance(alice_acc.address()).await?,
        anvil.eth_balance(bob_acc.address()).await?,
    );
    println!("\nbalances on-chain (each deposited 1 ETH; gas included):");
    println!(
        "  Alice {} -> {} ({})",
        eth(before.0),
        eth(after.0),
        signed_eth(before.0, after.0)
    );
    println!(
        "  Bob   {} -> {} ({})",
        eth(before.1),
        eth(after.1),
        signed_eth(before.1, after.1)
    );
    let half = one_eth() / U256::from(2);
    let gas_slack = one_eth() / U256::from(100);
    if after.0 + gas_slack < before.0 + half || after.0 > before.0 + half {
        return Err("Alice did not get the latest state's balance".into());
    }
    println!("Alice got the 0.5 ETH of the latest state; Bob's cheat gained him nothing");
    drop(tower);
    Ok(())
}

async fn wait_until<F, Fut>(limit: Duration, mut check: F) -> Res<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Res<bool>>,
{
    let end = tokio::time::Instant::now() + limit;
    while !check().await? {
        if tokio::time::Instant::now() > end {
            return Err(format!("nothing happened within {limit:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Res<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("warn,alloy_pubsub=off,alloy_transport_ws=off")
            }),
        )
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("alice") {
        return alice_main(&args[1..]).await;
    }
    story().await
}
