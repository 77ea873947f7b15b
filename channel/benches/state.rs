//! The channel-side CPU cost of one update: hashing, validation, signature
//! checks and one pass through the `Machine`.
//!
//! Shapes: 2 parties × 1 asset (the common channel), 16 × 4, and for hashing
//! the limit 16 × 16 (`MAX_PARTICIPANTS` × `MAX_ASSETS`).
//!
//! Run: `cargo bench -p perun-channel --bench state`.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use perun_channel::limits::{MAX_ASSETS, MAX_PARTICIPANTS};
use perun_channel::{
    Address, Allocation, Asset, Machine, Params, PaymentApp, Phase, SignedState, State, U256,
};
use perun_wallet::{Account, LocalAccount, Signature};

/// A payment channel of `parties` × `assets`, every balance 1000.
struct Fixture {
    params: Params,
    state: State,
    accounts: Vec<LocalAccount>,
}

impl Fixture {
    fn new(parties: usize, assets: usize) -> Self {
        let accounts: Vec<LocalAccount> = (0..parties)
            .map(|i| LocalAccount::from_bytes(&[i as u8 + 1; 32]).expect("valid key"))
            .collect();
        let domain = perun_channel::Domain {
            chain_id: U256::from(31337),
            adjudicator: Address::repeat_byte(0xad),
        };
        let params = Params::payment(
            domain,
            60,
            U256::from(1),
            accounts.iter().map(Account::address).collect(),
            vec![vec![U256::from(1000); parties]; assets],
        );
        let alloc = Allocation::new(
            (0..assets)
                .map(|a| Asset {
                    chainId: U256::from(31337),
                    holder: Address::repeat_byte(a as u8 + 1),
                })
                .collect(),
            vec![vec![U256::from(1000); parties]; assets],
        );
        let state = State::initial(&params, alloc);
        Self {
            params,
            state,
            accounts,
        }
    }

    /// `from` pays 1 of every asset to `to`, one version up.
    fn pay(&self, cur: &State, from: usize, to: usize) -> State {
        let mut next = cur.next();
        for row in &mut next.outcome.balances {
            row[from] -= U256::from(1);
            row[to] += U256::from(1);
        }
        next
    }

    fn fully_signed(&self, state: &State) -> SignedState {
        let mut signed = SignedState::new(state.clone());
        for (i, acc) in self.accounts.iter().enumerate() {
            signed.sign(&self.params, i, acc).expect("sign");
        }
        signed
    }

    /// Participant 0's machine, version 0 fully signed, `Active`.
    fn active_machine(&self) -> Machine {
        let mut m = Machine::new(self.params.clone(), 0, self.state.clone()).expect("machine");
        m.set_phase(Phase::Signing0).expect("phase");
        m.sign_staged(&self.accounts[0]).expect("sign");
        let hash = self.state.hash();
        for (i, acc) in self.accounts.iter().enumerate().skip(1) {
            m.add_signature(i, acc.sign_hash(hash).expect("sign"))
                .expect("add");
        }
        m.commit_staged().expect("commit");
        m.set_phase(Phase::Active).expect("phase");
        m
    }
}

fn hashing(c: &mut Criterion) {
    let mut g = c.benchmark_group("state_hash");
    for (parties, assets) in [(2, 1), (16, 4), (MAX_PARTICIPANTS, MAX_ASSETS)] {
        let f = Fixture::new(parties, assets);
        g.bench_function(format!("{parties}p_{assets}a"), |b| {
            b.iter(|| black_box(&f.state).hash())
        });
    }
    g.bench_function("channel_id_2p", |b| {
        let f = Fixture::new(2, 1);
        b.iter(|| black_box(&f.params).channel_id())
    });
    g.finish();
}

fn validation(c: &mut Criterion) {
    let mut g = c.benchmark_group("validate");
    for (parties, assets) in [(2, 1), (16, 4)] {
        let f = Fixture::new(parties, assets);
        let next = f.pay(&f.state, 0, 1);
        g.bench_function(format!("state_{parties}p_{assets}a"), |b| {
            b.iter(|| {
                black_box(&next)
                    .validate(black_box(&f.params))
                    .expect("valid")
            })
        });
        g.bench_function(format!("transition_payment_{parties}p_{assets}a"), |b| {
            b.iter(|| {
                black_box(&f.state)
                    .validate_transition(&f.params, black_box(&next), 0, &PaymentApp)
                    .expect("valid")
            })
        });
    }
    g.finish();
}

fn signatures(c: &mut Criterion) {
    let mut g = c.benchmark_group("signed_state");
    for (parties, assets) in [(2, 1), (16, 4)] {
        let f = Fixture::new(parties, assets);
        let signed = f.fully_signed(&f.state);
        // Cold: the signatures are new to the checker (as a peer's are).
        g.bench_function(format!("verify_all_{parties}p_{assets}a"), |b| {
            b.iter_batched(
                perun_wallet::memo::clear,
                |()| black_box(&signed).verify_all(&f.params).expect("valid"),
                BatchSize::PerIteration,
            )
        });
        // Remembered: checked before (the store re-checks what it writes).
        g.bench_function(format!("verify_all_remembered_{parties}p_{assets}a"), |b| {
            b.iter(|| black_box(&signed).verify_all(&f.params).expect("valid"))
        });
    }
    g.finish();
}

/// One participant's whole share of one update: check the proposed state,
/// sign it, verify and add every peer's signature, commit.
fn machine(c: &mut Criterion) {
    let mut g = c.benchmark_group("machine_update");
    for (parties, assets) in [(2, 1), (16, 4)] {
        let f = Fixture::new(parties, assets);
        let active = f.active_machine();
        let next = f.pay(&f.state, 0, 1);
        let hash = next.hash();
        let peer_sigs: Vec<(usize, Signature)> = f
            .accounts
            .iter()
            .enumerate()
            .skip(1)
            .map(|(i, acc)| (i, acc.sign_hash(hash).expect("sign")))
            .collect();
        g.bench_function(format!("cycle_{parties}p_{assets}a"), |b| {
            b.iter_batched(
                || {
                    // The peers' signatures are new to us in a real update.
                    perun_wallet::memo::clear();
                    (active.clone(), next.clone())
                },
                |(mut m, next)| {
                    m.stage_update(next, 0, &PaymentApp).expect("stage");
                    m.sign_staged(&f.accounts[0]).expect("sign");
                    for (i, sig) in &peer_sigs {
                        m.add_signature(*i, *sig).expect("add");
                    }
                    m.commit_staged().expect("commit");
                    m
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, hashing, validation, signatures, machine);
criterion_main!(benches);
