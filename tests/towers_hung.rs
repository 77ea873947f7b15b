//! The client side of the towers, from an adversarial review (both tests
//! failed before their fixes): one slow tower must not hold up the others
//! (DESIGN §12: "the other towers are not held up").

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{Ledger, Options, Party, introduce, open, party};
use perun::channel::U256;
use perun::client::{Channel, TowerConfig};
use perun::wallet::{Account, LocalAccount};
use perun::watchtower::api::{self, Config, Tower};
use perun::watchtower::scheme::{ChannelSecret, open as open_blob};
use perun::watchtower::store::Store;
use tokio::net::TcpListener;

fn u(x: u64) -> U256 {
    U256::from(x)
}

struct TowerProc {
    addr: SocketAddr,
    tower: Arc<Tower>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for TowerProc {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn start_tower(key: &LocalAccount) -> TowerProc {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("tower.redb")).unwrap();
    let account = LocalAccount::from_bytes(&key.secret_bytes()).unwrap();
    let tower = Arc::new(
        Tower::new(
            store,
            Arc::new(account),
            Config::default(),
            api::system_clock(),
        )
        .unwrap(),
    );
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(api::serve(listener, tower.clone(), async {
        let _ = stopped.await;
    }));
    TowerProc {
        addr,
        tower,
        stop: Some(stop),
        _dir: dir,
    }
}

async fn alice_and_bob(ledger: &Ledger, opts: &Options) -> (Vec<Party>, Vec<Channel>) {
    let alice = party(ledger, u(1_000_000), opts).await;
    let bob = party(ledger, u(1_000_000), &Options::default()).await;
    let mut ps = vec![alice, bob];
    introduce(&ps).await;
    let chans = open(ledger, &mut ps, u(1000)).await;
    (ps, chans)
}

/// The version of the state the tower holds for the channel, if any.
fn held_version(ch: &Channel, tower: &Tower) -> Option<u64> {
    let user = ch.tower_status()[0].user?;
    let secret = ChannelSecret::of(ch.params());
    let stored = tower.store().appointment(user, secret.locator()).unwrap()?;
    let (_, state) = open_blob(&secret, &stored.blob).ok()?;
    Some(state.state.version)
}

/// Alice keeps appointments with a good tower and with one that accepts
/// connections and never answers (a hung or overloaded tower; 5 s timeout
/// per call here, 10 s by default). She pays twice, 300 ms apart. The good
/// tower answers in milliseconds, but `client/src/tower.rs` `round` sends
/// one appointment to every due tower with `join_all` and only then looks
/// at the channel again: the second payment's state reaches the good tower
/// only after the hung tower's call times out. For those seconds (and
/// again each time the hung tower's backoff runs out) the only tower that
/// works holds a stale state: if Alice goes offline then, Bob registers
/// that state and the tower cannot refute it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_tower_does_not_hold_up_the_good_one() {
    let ledger = Ledger::sim().await;
    let good_key = LocalAccount::random();
    let good = start_tower(&good_key).await;
    let hung = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_addr = hung.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hung.accept().await {
            held.push(s);
        }
    });
    let timeout = Duration::from_secs(5);
    let opts = Options {
        towers: vec![
            TowerConfig {
                timeout,
                ..TowerConfig::new(format!("http://{}", good.addr), good_key.address())
            },
            TowerConfig {
                timeout,
                ..TowerConfig::new(
                    format!("http://{hung_addr}"),
                    LocalAccount::random().address(),
                )
            },
        ],
        ..Options::default()
    };
    let (_ps, chans) = alice_and_bob(&ledger, &opts).await;
    let ch = &chans[0];
    ch.pay(1, 0, u(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    ch.pay(1, 0, u(1)).await.unwrap();
    let latest = ch.state().state.version;
    let t = std::time::Instant::now();
    let mut held = None;
    while t.elapsed() < Duration::from_secs(2) {
        held = held_version(ch, &good.tower);
        if held == Some(latest) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if held != Some(latest) {
        // How long it really took.
        while t.elapsed() < Duration::from_secs(15) && held_version(ch, &good.tower) != Some(latest)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "2 s after the payment the good tower held version {held:?}, not the latest {latest}; \
             it got it after {:?} (the hung tower's timeout is {timeout:?})",
            t.elapsed()
        );
    }
}

/// Worse with more channels: `Link::ensure_registered` holds the tower's
/// `subs` mutex across the `/register` call, so every channel's
/// registration with the hung tower waits for the one before it to time
/// out, and each of those rounds (holding one of the 32 round permits)
/// keeps its good-tower appointment waiting. With four channels and a 2 s
/// timeout, the fourth channel's newest state reaches the good tower after
/// about 4 × 2 s; with 32+ channels and the default 10 s timeout, minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_tower_does_not_serialise_every_channel() {
    let ledger = Ledger::sim().await;
    let good_key = LocalAccount::random();
    let good = start_tower(&good_key).await;
    let hung = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_addr = hung.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hung.accept().await {
            held.push(s);
        }
    });
    let timeout = Duration::from_secs(2);
    let opts = Options {
        towers: vec![
            TowerConfig {
                timeout,
                ..TowerConfig::new(format!("http://{}", good.addr), good_key.address())
            },
            TowerConfig {
                timeout,
                ..TowerConfig::new(
                    format!("http://{hung_addr}"),
                    LocalAccount::random().address(),
                )
            },
        ],
        ..Options::default()
    };
    let alice = party(&ledger, u(1_000_000), &opts).await;
    let bob = party(&ledger, u(1_000_000), &Options::default()).await;
    let mut ps = vec![alice, bob];
    introduce(&ps).await;
    let mut chans = Vec::new();
    for _ in 0..4 {
        chans.push(open(&ledger, &mut ps, u(1000)).await.remove(0));
    }
    futures::future::join_all(chans.iter().map(|c| c.pay(1, 0, u(1))))
        .await
        .into_iter()
        .for_each(|r| {
            r.unwrap();
        });
    tokio::time::sleep(Duration::from_millis(300)).await;
    futures::future::join_all(chans.iter().map(|c| c.pay(1, 0, u(1))))
        .await
        .into_iter()
        .for_each(|r| {
            r.unwrap();
        });
    let t = std::time::Instant::now();
    let all_latest = || {
        chans
            .iter()
            .all(|c| held_version(c, &good.tower) == Some(c.state().state.version))
    };
    while t.elapsed() < Duration::from_secs(20) && !all_latest() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = t.elapsed();
    assert!(
        took < 2 * timeout,
        "the good tower held every channel's latest state only after {took:?} \
         (hung tower's timeout {timeout:?}, 4 channels)"
    );
}
