//! Signing and signature checks: the per-signature cost of a channel update.
//!
//! `recover` is the cost of a first check (libsecp256k1 through alloy);
//! `verify_remembered` a repeated check of the same signature, which the
//! memo in `perun_wallet::memo` answers; `verify_cold` clears the memo first.
//!
//! Run: `cargo bench -p perun-wallet --bench signing`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use perun_wallet::{
    Account, B256, LocalAccount, eip191_digest, memo, parse_signature, recover, signature_bytes,
    verify,
};

fn signing(c: &mut Criterion) {
    let alice = LocalAccount::from_bytes(&[7u8; 32]).expect("valid key");
    let hash = B256::repeat_byte(0x42);
    let sig = alice.sign_hash(hash).expect("sign");
    let bytes = signature_bytes(&sig);
    let address = alice.address();

    let mut g = c.benchmark_group("wallet");
    g.bench_function("eip191_digest", |b| {
        b.iter(|| eip191_digest(black_box(hash)))
    });
    g.bench_function("sign_hash", |b| {
        b.iter(|| alice.sign_hash(black_box(hash)).expect("sign"))
    });
    g.bench_function("parse_signature_65b", |b| {
        b.iter(|| parse_signature(black_box(&bytes)).expect("parse"))
    });
    g.bench_function("recover", |b| {
        b.iter(|| recover(black_box(hash), black_box(&sig)).expect("recover"))
    });
    g.bench_function("verify_cold", |b| {
        b.iter(|| {
            memo::clear();
            verify(black_box(hash), black_box(&sig), black_box(address)).expect("verify")
        })
    });
    g.bench_function("verify_remembered", |b| {
        b.iter(|| verify(black_box(hash), black_box(&sig), black_box(address)).expect("verify"))
    });
    g.finish();
}

criterion_group!(benches, signing);
criterion_main!(benches);
