//! Encoding and decoding the frames of one update: the `Update` request, the
//! `UpdateAccept` reply carrying a signature, and the `UpdateCommit` request.
//!
//! Decoding includes everything a receiver runs before looking at a message:
//! the length check, strict postcard decoding with capped sequences, and
//! `Message::check_limits`.
//!
//! Run: `cargo bench -p perun-wire --bench codec`.

use std::hint::black_box;

use alloy_primitives::{Address, U256};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use perun_channel::{Allocation, Asset, Params, State};
use perun_wallet::{Account, LocalAccount, Signature};
use perun_wire::frame::{PREFIX_LEN, Reply, decode_reply};
use perun_wire::{
    DEFAULT_MAX_FRAME, Message, Update, UpdateAccept, UpdateCommit, decode_frame, encode_frame,
};

/// Version 1 of a `parties` × `assets` payment channel.
fn state(parties: usize, assets: usize) -> State {
    let domain = perun_channel::Domain {
        chain_id: U256::from(31337),
        adjudicator: Address::repeat_byte(0xad),
    };
    let params = Params::payment(
        domain,
        60,
        U256::from(1),
        (0..parties)
            .map(|i| Address::repeat_byte(i as u8 + 1))
            .collect(),
        vec![vec![U256::from(1_000_000_000_000_000_000u128); parties]; assets],
    );
    let alloc = Allocation::new(
        (0..assets)
            .map(|a| Asset {
                chainId: U256::from(31337),
                holder: Address::repeat_byte(0xa0 + a as u8),
            })
            .collect(),
        vec![vec![U256::from(1_000_000_000_000_000_000u128); parties]; assets],
    );
    State::initial(&params, alloc).next()
}

fn signature(state: &State) -> Signature {
    LocalAccount::from_bytes(&[3u8; 32])
        .expect("valid key")
        .sign_hash(state.hash())
        .expect("sign")
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire");
    for (parties, assets) in [(2, 1), (16, 4)] {
        let st = state(parties, assets);
        let update = Message::Update(Update {
            channel_id: st.channelId,
            state: st.clone(),
            actor: 0,
        });
        let frame = encode_frame(&update, DEFAULT_MAX_FRAME).expect("encode");
        g.throughput(Throughput::Bytes(frame.len() as u64));
        g.bench_function(format!("update_encode_{parties}p_{assets}a"), |b| {
            b.iter(|| encode_frame(black_box(&update), DEFAULT_MAX_FRAME).expect("encode"))
        });
        g.bench_function(format!("update_decode_{parties}p_{assets}a"), |b| {
            b.iter(|| decode_frame(black_box(&frame), DEFAULT_MAX_FRAME).expect("decode"))
        });
    }

    let st = state(2, 1);
    let sig = signature(&st);
    let accept: Reply = Ok(Message::UpdateAccept(UpdateAccept {
        channel_id: st.channelId,
        version: st.version,
        index: 1,
        signature: sig,
    }));
    let frame = encode_frame(&accept, DEFAULT_MAX_FRAME).expect("encode");
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("update_accept_encode", |b| {
        b.iter(|| encode_frame(black_box(&accept), DEFAULT_MAX_FRAME).expect("encode"))
    });
    g.bench_function("update_accept_decode", |b| {
        b.iter(|| decode_reply(black_box(&frame[PREFIX_LEN..])).expect("decode"))
    });

    let commit = Message::UpdateCommit(UpdateCommit {
        channel_id: st.channelId,
        version: st.version,
        index: 0,
        signatures: vec![sig, sig],
    });
    let frame = encode_frame(&commit, DEFAULT_MAX_FRAME).expect("encode");
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("update_commit_encode_2p", |b| {
        b.iter(|| encode_frame(black_box(&commit), DEFAULT_MAX_FRAME).expect("encode"))
    });
    g.bench_function("update_commit_decode_2p", |b| {
        b.iter(|| decode_frame(black_box(&frame), DEFAULT_MAX_FRAME).expect("decode"))
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
