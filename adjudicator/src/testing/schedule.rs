//! The seeded schedule behind [`RpcProxy`](super::RpcProxy) and
//! [`FaultyChain`](super::FaultyChain): every decision is a draw that is a
//! pure function of the seed and the decision's key (which call or message,
//! which kind of fault), so a seed replays the same plan. No RNG state is
//! kept, which is what lets concurrent callers share a schedule through one
//! counter.

use std::time::Duration;

/// SplitMix64's output function: a cheap bijective mixer with good avalanche.
const fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform draw in `[0, 1)` for `key` under `seed`.
pub(crate) fn draw(seed: u64, key: &[u64]) -> f64 {
    let h = key
        .iter()
        .fold(splitmix64(seed), |acc, k| splitmix64(acc ^ splitmix64(*k)));
    // The top 53 bits fill an f64's mantissa exactly.
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Whether a draw hits a rate: never for `rate <= 0` (or NaN), always for `rate >= 1`.
pub(crate) fn hits(rate: f64, draw: f64) -> bool {
    draw < rate
}

/// A delay of up to `max`, from a draw.
pub(crate) fn delay(max: Duration, draw: f64) -> Duration {
    max.mul_f64(draw.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_pure_and_spread() {
        assert_eq!(draw(7, &[1, 2, 3]), draw(7, &[1, 2, 3]));
        assert_ne!(draw(7, &[1, 2, 3]), draw(8, &[1, 2, 3]));
        assert_ne!(draw(7, &[1, 2, 3]), draw(7, &[1, 3, 2]));
        let n = 10_000;
        let below = (0..n).filter(|i| draw(42, &[*i]) < 0.25).count();
        assert!((2_200..2_800).contains(&below), "{below} of {n} below 0.25");
        assert!((0..n).all(|i| (0.0..1.0).contains(&draw(1, &[i]))));
    }

    #[test]
    fn rates_at_the_edges_are_exact() {
        assert!((0..1_000).all(|i| hits(1.0, draw(3, &[i]))));
        assert!((0..1_000).all(|i| !hits(0.0, draw(3, &[i]))));
        assert!(!hits(f64::NAN, 0.0));
        assert_eq!(delay(Duration::from_secs(2), 0.5), Duration::from_secs(1));
    }
}
