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
