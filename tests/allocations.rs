//! Heap allocations per update (issue 17): counted, both sides together,
//! over a burst of payments between two clients in this process (real
//! libp2p on 127.0.0.1, the simulated ledger). The allocator is a
//! measurable part of an update's CPU (about 7 µs of 0.2 ms at 100
//! channels, `BENCHMARKS.md`); each budget below is the count measured
//! when it was set (82 and 112, the same in debug and release builds and
//! under load) plus about 5 % for scheduling (which chores run, how often
//! a connection is polled), so a change that copies a state twice more
//! per update fails here, not only in a benchmark run. Lower a budget
//! when a change lowers the count.
//!
//! Run `cargo test --test allocations -- --nocapture` to see the counts.

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

mod common;

use std::time::Duration;

use common::{Ledger, Options, open, parties};
use perun::channel::U256;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

const WARM_UP: usize = 50;
const COUNTED: usize = 400;

/// Allocations per update, both clients, with the in-memory store.
const MEMORY_BUDGET: u64 = 86;
/// The same with redb (the write-ahead log and the database behind it).
const REDB_BUDGET: u64 = 116;

fn u(x: u64) -> U256 {
    U256::from(x)
}

/// Pays `COUNTED` times in a row after a warm-up, waits until the peer
/// holds the last state, and returns the allocations per update.
async fn allocations_per_update(redb: bool) -> u64 {
    let opts = Options {
        redb,
        ..Options::default()
    };
    let ledger = Ledger::sim().await;
    let mut ps = parties(&ledger, 2, u(1_000_000), &opts).await;
    let chans = open(&ledger, &mut ps, u(10_000)).await;
    let settle = |chans: &[perun::client::Channel]| {
        let last = chans[0].state().state.version;
        let bob = chans[1].clone();
        async move {
            bob.wait_for_version(last, Duration::from_secs(10))
                .await
                .unwrap();
            // Let the last commit's chores run out.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    for _ in 0..WARM_UP {
        chans[0].pay(1, 0, u(1)).await.unwrap();
    }
    settle(&chans).await;
    let region = Region::new(GLOBAL);
    for _ in 0..COUNTED {
        chans[0].pay(1, 0, u(1)).await.unwrap();
    }
    settle(&chans).await;
    let c = region.change();
    let per_update = ((c.allocations + c.reallocations) / COUNTED) as u64;
    println!(
        "redb {redb}: {} allocations, {} reallocations, {} bytes per update",
        c.allocations / COUNTED,
        c.reallocations / COUNTED,
        c.bytes_allocated / COUNTED
    );
    for p in &ps {
        p.client.shutdown().await;
    }
    per_update
}

// One test for both stores: the counter is the whole process's, so no
// other test may run beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_update_stays_within_its_allocations() {
    let memory = allocations_per_update(false).await;
    let redb = allocations_per_update(true).await;
    println!("allocations per update: memory store {memory}, redb {redb}");
    assert!(memory <= MEMORY_BUDGET, "memory store: {memory} per update");
    assert!(redb <= REDB_BUDGET, "redb: {redb} per update");
}
