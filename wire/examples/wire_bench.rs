//! Round-trip latency (p50/p99) and messages/s of a small request between two
//! endpoints over 127.0.0.1: an `Update` of a two-party state (~200 bytes)
//! answered with an `UpdateAccept`, the exchange the client runs per update.
//!
//! ```text
//! cargo run --release -p perun-wire --example wire_bench -- [sequential] [total] [in_flight]
//! ```
//! Defaults: 20000 sequential round trips, then 100000 with 64 in flight.

use std::time::{Duration, Instant};

use perun_channel::{Address, Allocation, Asset, B256, Bytes, State, U256};
use perun_wallet::Signature;
use perun_wire::{Config, Message, Node, Update, UpdateAccept, generate_key};

fn arg(i: usize, default: usize) -> usize {
    std::env::args()
        .nth(i)
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn update(version: u64) -> Message {
    Message::Update(Update {
        channel_id: B256::repeat_byte(1),
        state: State {
            channelId: B256::repeat_byte(1),
            version,
            outcome: Allocation::new(
                vec![Asset {
                    chainId: U256::from(1),
                    holder: Address::repeat_byte(2),
                }],
                vec![vec![U256::from(1_000_000u64), U256::from(2_000_000u64)]],
            ),
            appData: Bytes::new(),
            isFinal: false,
        },
        actor: 0,
    })
}

fn report(name: &str, mut lat: Vec<Duration>, wall: Duration) {
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "{name}: {} round trips in {:.2?}: p50 {:.1?}  p99 {:.1?}  max {:.1?}  {:.0} msgs/s",
        lat.len(),
        wall,
        pct(0.50),
        pct(0.99),
        lat[lat.len() - 1],
        lat.len() as f64 / wall.as_secs_f64()
    );
}

#[tokio::main]
async fn main() -> perun_wire::Result<()> {
    let sequential = arg(1, 20_000);
    let total = arg(2, 100_000);
    let in_flight = arg(3, 64).max(1);

    let (a, _a_in) = Node::start(Config::new(generate_key())).await?;
    let (b, mut b_in) = Node::start(Config::new(generate_key())).await?;
    let b_id = b.local_peer_id();
    a.dial(b_id, Some(b.listen_addrs().await?[0].clone()))
        .await?;
    tokio::spawn(async move {
        let sig = Signature::new(U256::from(7), U256::from(9), true);
        while let Some(req) = b_in.next().await {
            let (_, msg, responder) = req.into_parts();
            if let Message::Update(u) = msg {
                let _ = responder.reply(Message::UpdateAccept(UpdateAccept {
                    channel_id: u.channel_id,
                    version: u.state.version,
                    index: 1,
                    signature: sig,
                }));
            }
        }
    });

    let frame = perun_wire::encode_frame(&update(1), usize::MAX)?;
    println!("request frame: {} bytes", frame.len());

    // Warm-up, then one request at a time.
    for v in 0..1_000 {
        a.send(b_id, &update(v)).await?;
    }
    let mut lat = Vec::with_capacity(sequential);
    let start = Instant::now();
    for v in 0..sequential as u64 {
        let t = Instant::now();
        a.send(b_id, &update(v)).await?;
        lat.push(t.elapsed());
    }
    report("sequential (1 in flight)", lat, start.elapsed());

    // Many in flight.
    let per_task = total / in_flight;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..in_flight {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_task);
            for v in 0..per_task as u64 {
                let t = Instant::now();
                a.send(b_id, &update(v)).await?;
                lat.push(t.elapsed());
            }
            Ok::<_, perun_wire::Error>(lat)
        }));
    }
    let mut lat = Vec::with_capacity(total);
    for t in tasks {
        lat.extend(
            t.await
                .map_err(|e| perun_wire::Error::Transport(e.to_string()))??,
        );
    }
    report(
        &format!("concurrent ({in_flight} in flight)"),
        lat,
        start.elapsed(),
    );
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}
