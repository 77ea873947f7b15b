//! The payments layer's cost: `Payments::reserve` + `send` against raw
//! `Channel::pay` on the same durable channel, in the same run.
//!
//! Batches of the two alternate (raw, layer, raw, layer, ...), so a drift of
//! the disk or the machine during the run hits both alike. Each figure is
//! its payments over the time spent in them. Both clients run a `Payments`
//! (Bob's signs through its `PaymentsHandler` and books what arrives), for
//! the raw batches too: the difference is what the layer adds to a payer.

use std::time::{Duration, Instant};

use perun::channel::U256;
use perun::client::payments::Payments;
use serde_json::{Value, json};

use crate::setup::{Chain, Pair, Store};
use crate::{Options, Res};

/// Payments per batch.
const BATCH: usize = 100;

/// Runs `batches` pairs of batches after a warm-up of each kind.
pub(crate) async fn measure(chain: &Chain, opts: &Options, batches: usize) -> Res<Value> {
    let mut pair = Pair::start(chain, Store::Durable, &opts.work.join("payments")).await?;
    let ch = pair.open(chain.asset()).await?;
    let payer = Payments::new(&pair.alice)?;
    let bob = pair.local_bob().ok_or("Bob runs in this process here")?;
    let _payee = Payments::new(bob)?;
    let (bob, eth, one) = (bob.peer_id(), chain.asset(), U256::from(1));
    let mut raw = Duration::ZERO;
    let mut layer = Duration::ZERO;
    for round in 0..=batches {
        let t = Instant::now();
        for _ in 0..BATCH {
            ch.pay(1, 0, one).await?;
        }
        let raw_took = t.elapsed();
        let t = Instant::now();
        for _ in 0..BATCH {
            let r = payer.reserve(bob, &eth, one).await?;
            payer.send(r, one).await?;
        }
        let layer_took = t.elapsed();
        // Round 0 warms both paths up.
        if round > 0 {
            raw += raw_took;
            layer += layer_took;
        }
    }
    payer.audit()?;
    let n = (batches * BATCH) as f64;
    let (raw_per_s, layer_per_s) = (n / raw.as_secs_f64(), n / layer.as_secs_f64());
    println!(
        "    payments: {layer_per_s:.0}/s through reserve + send, {raw_per_s:.0}/s raw pay ({:.3})",
        layer_per_s / raw_per_s
    );
    drop(ch);
    pair.shutdown().await?;
    Ok(json!({
        "payments_per_s": layer_per_s,
        "payments_raw_pay_per_s": raw_per_s,
        "payments_ratio": layer_per_s / raw_per_s,
        "payments_measured": n,
    }))
}
