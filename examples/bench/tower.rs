//! The watchtower's figures: durable appointments per second through its
//! HTTP API (each answered with a signed receipt only after its commit).
//!
//! The tower runs in this process on 127.0.0.1 with its redb store in the
//! bench's scratch directory; `connections` keep-alive HTTP/1.1 connections
//! (one user each) send pre-signed `add_appointment` requests, so the
//! figure is the tower's work (parse, recover the user, commit, sign the
//! receipt), not the clients' signing.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use perun::channel::B256;
use perun::wallet::{Account, LocalAccount, signature_bytes};
use perun_watchtower::api::{self, Config, RateLimit, Tower};
use perun_watchtower::messages;
use perun_watchtower::store::Store;
use rand::RngCore;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::Res;

/// The size of a sealed two-party, one-asset payment channel's blob.
const BLOB_LEN: usize = 700;

/// A tower serving on 127.0.0.1 until dropped.
pub(crate) struct Running {
    pub(crate) addr: SocketAddr,
    pub(crate) tower: Arc<Tower>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts a tower on a fresh store at `db` with limits that do not throttle
/// a benchmark.
pub(crate) async fn start(db: &Path) -> Res<Running> {
    let _ = std::fs::remove_file(db);
    let store = Store::open(db)?;
    let unlimited = RateLimit {
        burst: u32::MAX,
        per_second: 1e9,
    };
    let config = Config {
        slots_per_registration: 1_000_000,
        ip_rate: unlimited,
        user_rate: unlimited,
        ..Config::default()
    };
    let tower = Arc::new(Tower::new(
        store,
        Arc::new(LocalAccount::random()),
        config,
        api::system_clock(),
    )?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = Arc::clone(&tower);
    tokio::spawn(async move {
        let _ = api::serve(listener, serving, async {
            let _ = stopped.await;
        })
        .await;
    });
    Ok(Running {
        addr,
        tower,
        stop: Some(stop),
    })
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    stream: BufReader<TcpStream>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Res<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream: BufReader::new(stream),
        })
    }

    /// POSTs `body` to `path`; the reply's status and body.
    async fn post(&mut self, path: &str, body: &str) -> Res<(u16, Vec<u8>)> {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: tower\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let s = self.stream.get_mut();
        s.write_all(head.as_bytes()).await?;
        s.write_all(body.as_bytes()).await?;
        let mut line = String::new();
        self.stream.read_line(&mut line).await?;
        let status: u16 = line.split_whitespace().nth(1).ok_or("no status")?.parse()?;
        let mut len = 0usize;
        loop {
            line.clear();
            self.stream.read_line(&mut line).await?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse()?;
            }
        }
        let mut body = vec![0; len];
        self.stream.read_exact(&mut body).await?;
        Ok((status, body))
    }
}

fn hex0x(b: &[u8]) -> String {
    format!("0x{}", hex::encode(b))
}

/// Registers `user` at the tower over `conn`.
async fn register(conn: &mut Conn, tower: &Tower, user: &LocalAccount) -> Res<()> {
    let sig = user.sign_hash(messages::register_hash(tower.address(), user.address()))?;
    let body = json!({ "user": user.address(), "signature": hex0x(&signature_bytes(&sig)) });
    let (status, reply) = conn.post("/register", &body.to_string()).await?;
    if status != 200 {
        return Err(format!("register: {status} {}", String::from_utf8_lossy(&reply)).into());
    }
    Ok(())
}

/// `add_appointment` bodies of `n` fresh locators, signed by `user`.
fn appointments(user: &LocalAccount, n: usize) -> Res<Vec<String>> {
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| {
            let mut locator = B256::ZERO;
            rng.fill_bytes(locator.as_mut_slice());
            let mut blob = vec![0u8; BLOB_LEN];
            rng.fill_bytes(&mut blob);
            let sig = user.sign_hash(messages::appointment_hash(&locator, 1, &blob))?;
            Ok(json!({
                "locator": locator,
                "seq": 1,
                "blob": hex0x(&blob),
                "signature": hex0x(&signature_bytes(&sig)),
            })
            .to_string())
        })
        .collect()
}

/// Stores `per_conn × connections` appointments through the API, each
/// answered with a signed receipt; returns appointments per second.
pub(crate) async fn appointments_per_s(
    work: &Path,
    connections: usize,
    per_conn: usize,
) -> Res<f64> {
    let running = start(&work.join("tower-appointments.redb")).await?;
    let mut jobs = Vec::new();
    for _ in 0..connections {
        let user = LocalAccount::random();
        let mut conn = Conn::open(running.addr).await?;
        register(&mut conn, &running.tower, &user).await?;
        let bodies = appointments(&user, per_conn)?;
        jobs.push((conn, bodies));
    }
    let start = Instant::now();
    let tasks: Vec<_> = jobs
        .into_iter()
        .map(|(mut conn, bodies)| {
            tokio::spawn(async move {
                for body in bodies {
                    let (status, reply) = conn.post("/add_appointment", &body).await?;
                    if status != 200 {
                        return Err::<(), Box<dyn std::error::Error + Send + Sync>>(
                            format!(
                                "add_appointment: {status} {}",
                                String::from_utf8_lossy(&reply)
                            )
                            .into(),
                        );
                    }
                }
                Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    let (_, stored) = running.tower.store().counts()?;
    let want = (connections * per_conn) as u64;
    if stored != want {
        return Err(format!("stored {stored} appointments, sent {want}").into());
    }
    Ok(want as f64 / secs)
}

/// Runs a tower child with `--tower-child`.
pub(crate) const CHILD_FLAG: &str = "--tower-child";
/// Prefix of the child's result line on stdout.
const RESULT_PREFIX: &str = "TOWER_RESULT ";

/// Fills a tower store at `db` with `n` appointments (random locators and
/// blobs, 1,000 users), in batches of 1,000 like the API's group commit.
fn fill_store(db: &Path, n: usize) -> Res<()> {
    let _ = std::fs::remove_file(db);
    let store = Store::open(db)?;
    let users: Vec<_> = (0..1_000u32)
        .map(|i| {
            let mut a = [0u8; 20];
            a[..4].copy_from_slice(&i.to_be_bytes());
            perun::channel::Address::from(a)
        })
        .collect();
    for u in &users {
        store.register(*u, u32::MAX, u64::MAX)?;
    }
    let mut rng = rand::thread_rng();
    let mut left = n;
    while left > 0 {
        let batch: Vec<_> = (0..left.min(1_000))
            .map(|i| {
                let mut locator = B256::ZERO;
                rng.fill_bytes(locator.as_mut_slice());
                let mut blob = vec![0u8; BLOB_LEN];
                rng.fill_bytes(&mut blob);
                perun_watchtower::store::NewAppointment {
                    user: users[i % users.len()],
                    locator,
                    seq: 1,
                    blob,
                    user_signature: vec![0; 65],
                }
            })
            .collect();
        left -= batch.len();
        for r in store.add_appointments(batch, 0, |_, _, _| Ok(vec![0; 65]))? {
            r?;
        }
    }
    Ok(())
}

/// Mines `n` blocks, each with one dispute (`Registered`) of a channel no
/// appointment is for; returns the first and the last of those blocks.
async fn disputes(chain: &crate::setup::Chain, n: usize) -> Res<(u64, u64)> {
    use perun::adjudicator::testing::empty_channel;
    use perun::adjudicator::{AdjudicatorEvent, EthAdjudicator, FeedItem, SignedChannel};
    use perun::channel::SignedState;
    let payer = chain.anvil.funded_account().await?;
    let adj = EthAdjudicator::connect(&chain.anvil.ws_url(), &payer, chain.config.clone()).await?;
    let (a, b) = (LocalAccount::random(), LocalAccount::random());
    for _ in 0..n {
        let (params, state) = empty_channel(
            chain.deployment.adjudicator,
            vec![a.address(), b.address()],
            chain.deployment.eth_holder,
        );
        let mut signed = SignedState::new(state);
        signed.sign(&params, 0, &a)?;
        signed.sign(&params, 1, &b)?;
        perun::adjudicator::Adjudicator::register(
            &adj,
            &SignedChannel {
                params,
                state: signed,
            },
        )
        .await?;
    }
    // Their blocks, from the feed a tower would read.
    let mut feed = adj.registrations(chain.deployment.block);
    let (mut first, mut last, mut seen) = (u64::MAX, 0, 0);
    while seen < n {
        if let FeedItem::Event {
            block,
            event: AdjudicatorEvent::Registered { .. },
        } = feed.next().await
        {
            first = first.min(block);
            last = last.max(block);
            seen += 1;
        }
    }
    Ok((first, last))
}

/// The responder's cost of following the chain and the tower's memory,
/// with an empty store and with `stored` appointments: a child process
/// per store runs the tower ([`perun_watchtower::service::Service`]) from
/// the first of `blocks` blocks with one dispute each (none of them for
/// a stored appointment) and reports how long it took to scan them once
/// its responder was up, and its resident memory then.
pub(crate) async fn watch_cost(
    chain: &crate::setup::Chain,
    work: &Path,
    stored: usize,
    blocks: usize,
) -> Res<serde_json::Value> {
    let (from, until) = disputes(chain, blocks).await?;
    let mut out = serde_json::Map::new();
    for (name, n) in [("empty", 0), ("full", stored)] {
        let db = work.join(format!("tower-watch-{name}.redb"));
        let t = Instant::now();
        let path = db.clone();
        tokio::task::spawn_blocking(move || fill_store(&path, n)).await??;
        println!(
            "    {n} appointments stored in {:.1} s; the tower scans blocks {from}..={until} in a child process",
            t.elapsed().as_secs_f64()
        );
        let args = vec![
            CHILD_FLAG.to_string(),
            db.display().to_string(),
            chain.anvil.ws_url(),
            chain.deployment.adjudicator.to_string(),
            from.to_string(),
            until.to_string(),
        ];
        let r = tokio::task::spawn_blocking(move || {
            crate::restore::run_child(&args, std::time::Duration::from_secs(300), RESULT_PREFIX)
        })
        .await??;
        out.insert(name.into(), r);
    }
    Ok(serde_json::Value::Object(out))
}

/// The child: runs a tower on `db` against the chain until its responder
/// has scanned `until`, then prints its figures.
pub(crate) async fn child(args: &[String]) -> Res<()> {
    let [db, ws, adjudicator, from, until] = args else {
        return Err(format!("{CHILD_FLAG} <db> <ws> <adjudicator> <from> <until>").into());
    };
    let (from, until): (u64, u64) = (from.parse()?, until.parse()?);
    let rss_before = crate::stats::rss_bytes()?;
    let t = Instant::now();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let service = perun_watchtower::service::Service::start(
        Arc::new(LocalAccount::random()),
        Path::new(db),
        listener,
        perun_watchtower::service::ServiceConfig::new(
            ws.clone(),
            perun::adjudicator::EthConfig::new(adjudicator.parse()?, from, []),
        ),
    )
    .await?;
    let stats = Arc::clone(service.stats());
    let up = loop {
        if stats.health().name() == "ok" {
            break Instant::now();
        }
        if t.elapsed().as_secs() > 120 {
            return Err("the responder never came up".into());
        }
        tokio::time::sleep(std::time::Duration::from_micros(200)).await;
    };
    while stats.cursor.load(std::sync::atomic::Ordering::Relaxed) < until {
        if t.elapsed().as_secs() > 240 {
            return Err("the responder never caught up".into());
        }
        tokio::time::sleep(std::time::Duration::from_micros(200)).await;
    }
    let scan = up.elapsed().as_secs_f64();
    let blocks = until - from + 1;
    let (_, appointments) = service.tower().store().counts()?;
    let rss = crate::stats::rss_bytes()?;
    let result = json!({
        "appointments": appointments,
        "blocks": blocks,
        "disputes": blocks,
        "start_ms": (up - t).as_secs_f64() * 1e3,
        "scan_ms": scan * 1e3,
        "block_cost_us": scan * 1e6 / blocks as f64,
        "rss_bytes": rss,
        "rss_bytes_at_start": rss_before,
        "refutations": stats.refutations.load(std::sync::atomic::Ordering::Relaxed),
    });
    println!("{RESULT_PREFIX}{result}");
    service.stop().await?;
    Ok(())
}
