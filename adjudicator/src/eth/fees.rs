//! EIP-1559 fees under a cap: what a transaction offers first, and what its
//! replacement offers when it is stuck.
//!
//! The tip follows the node's suggestion but never above the tip cap, so a
//! cheater who fills blocks with huge tips (and so raises the suggestion)
//! cannot make us pay more than the cap. The max fee leaves room for the base
//! fee to double (`2 * base + tip`), never above the fee cap.

/// The two fee fields of an EIP-1559 transaction, in wei per gas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fees {
    /// `maxFeePerGas`.
    pub(super) max_fee: u128,
    /// `maxPriorityFeePerGas`.
    pub(super) tip: u128,
}

/// The caps from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Caps {
    /// `EthConfig::max_fee_per_gas`.
    pub(super) max_fee: u128,
    /// `EthConfig::max_priority_fee_per_gas`.
    pub(super) tip: u128,
}

/// The first offer: tip `min(suggested, cap)`, max fee `min(2 * base + tip, cap)`.
/// `Err(base)` if even the base fee is above the cap: nothing sent could land.
pub(super) fn initial(base: u128, suggested: u128, caps: Caps) -> Result<Fees, u128> {
    if base > caps.max_fee {
        return Err(base);
    }
    let tip = suggested.min(caps.tip);
    let max_fee = base.saturating_mul(2).saturating_add(tip).min(caps.max_fee);
    Ok(Fees {
        max_fee,
        tip: tip.min(max_fee),
    })
}

/// A replacement's offer: both fields up by at least 1/8 (geth wants 1/10
/// more of each to replace a pending transaction), and at least what a new
/// transaction would offer now, within the caps. `None` if the caps leave no
/// room to raise either.
pub(super) fn bump(old: Fees, base: u128, suggested: u128, caps: Caps) -> Option<Fees> {
    let up = |x: u128| x.saturating_add(x.div_ceil(8)).max(x.saturating_add(1));
    let tip = up(old.tip).max(suggested.min(caps.tip)).min(caps.tip);
    let max_fee = up(old.max_fee)
        .max(base.saturating_mul(2).saturating_add(tip))
        .min(caps.max_fee);
    let new = Fees {
        max_fee,
        tip: tip.min(max_fee),
    };
    (new.max_fee > old.max_fee || new.tip > old.tip).then_some(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GWEI: u128 = 1_000_000_000;
    const CAPS: Caps = Caps {
        max_fee: 100 * GWEI,
        tip: 2 * GWEI,
    };

    #[test]
    fn initial_follows_the_market_under_the_caps() {
        assert_eq!(
            initial(10 * GWEI, GWEI, CAPS),
            Ok(Fees {
                max_fee: 21 * GWEI,
                tip: GWEI
            })
        );
        // A cheater's tips raise the suggestion; the cap holds.
        assert_eq!(
            initial(10 * GWEI, 1_000 * GWEI, CAPS).map(|f| f.tip),
            Ok(2 * GWEI)
        );
        // Near the cap the max fee is the cap.
        assert_eq!(
            initial(60 * GWEI, GWEI, CAPS).map(|f| f.max_fee),
            Ok(100 * GWEI)
        );
        // Above it nothing is offered.
        assert_eq!(initial(101 * GWEI, GWEI, CAPS), Err(101 * GWEI));
    }

    #[test]
    fn bump_raises_both_by_an_eighth_within_the_caps() {
        let old = Fees {
            max_fee: 8 * GWEI,
            tip: GWEI,
        };
        let new = bump(old, GWEI, GWEI, CAPS).unwrap_or(old);
        assert!(new.max_fee * 8 >= old.max_fee * 9, "{new:?}");
        assert!(new.tip * 8 >= old.tip * 9, "{new:?}");
        // A base fee that rose is followed.
        let high = bump(old, 20 * GWEI, GWEI, CAPS).unwrap_or(old);
        assert!(high.max_fee >= 40 * GWEI, "{high:?}");
        // At the caps nothing is left to offer.
        let capped = Fees {
            max_fee: CAPS.max_fee,
            tip: CAPS.tip,
        };
        assert_eq!(bump(capped, GWEI, GWEI, CAPS), None);
    }
}
