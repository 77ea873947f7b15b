//! Properties of hashing and of the transition rule.

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

#[allow(dead_code, unreachable_pub, missing_docs)]
mod support {
    pub mod fixtures;
}

use perun_channel::limits::MAX_VERSION_STEP;
use perun_channel::{Address, Error, PaymentApp, Phase, U256};
use proptest::prelude::*;
use support::fixtures::{fixture, params, params_and_state};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn hashing_is_deterministic((params, state) in params_and_state()) {
        prop_assert_eq!(params.channel_id(), params.clone().channel_id());
        prop_assert_eq!(state.hash(), state.clone().hash());
        state.validate(&params).unwrap();
    }

    #[test]
    fn any_param_field_changes_the_id(p in params(), which in 0usize..9, bump in 1u64..1000) {
        let mut q = p.clone();
        match which {
            0 => q.challengeDuration = q.challengeDuration.wrapping_add(bump).max(1),
            1 => q.nonce = q.nonce.wrapping_add(U256::from(bump)),
            2 => q.participants[0] = Address::repeat_byte(q.participants[0][0].wrapping_add(1)),
            3 => q.app = Address::repeat_byte(q.app[0].wrapping_add(1)),
            4 => q.participants.push(Address::repeat_byte(0xee)),
            5 => q.chainId = q.chainId.wrapping_add(U256::from(bump)),
            6 => q.adjudicator = Address::repeat_byte(q.adjudicator[0].wrapping_add(1)),
            7 => q.funding[0][0] += U256::from(bump),
            _ => q.participants.swap(0, 1),
        }
        prop_assume!(q != p);
        prop_assert_ne!(p.channel_id(), q.channel_id());
    }

    #[test]
    fn any_state_field_changes_the_hash((_p, s) in params_and_state(), which in 0usize..8, bump in 1u64..1000) {
        let mut t = s.clone();
        match which {
            0 => t.channelId.0[0] ^= 1,
            1 => t.version = t.version.wrapping_add(bump),
            2 => t.outcome.assets[0].chainId += U256::from(bump),
            3 => t.outcome.assets[0].holder.0[19] ^= 1,
            4 => t.outcome.balances[0][1] += U256::from(bump),
            5 => t.appData = [t.appData.as_ref(), &[1u8]].concat().into(),
            6 => t.isFinal = !t.isFinal,
            _ => t.outcome.assets.push(t.outcome.assets[0].clone()),
        }
        prop_assert_ne!(s.hash(), t.hash());
    }

    #[test]
    fn paying_within_the_sum_is_valid(amount in 0u64..=100, actor in 0usize..3, to in 0usize..3) {
        let (params, cur, _) = fixture(3, 2, 100);
        let mut next = cur.next();
        next.outcome.balances[1][actor] -= U256::from(amount);
        next.outcome.balances[1][to] += U256::from(amount);
        cur.validate_transition(&params, &next, actor, &PaymentApp).unwrap();
    }

    #[test]
    fn creating_value_is_rejected(asset in 0usize..2, who in 0usize..3, amount in 1u64..1000) {
        let (params, cur, _) = fixture(3, 2, 100);
        let mut next = cur.next();
        next.outcome.balances[asset][who] += U256::from(amount);
        prop_assert_eq!(
            cur.validate_transition(&params, &next, who, &PaymentApp),
            Err(Error::SumChanged(asset))
        );
    }

    #[test]
    fn wrong_versions_are_rejected(
        delta in prop_oneof![Just(0u64), MAX_VERSION_STEP + 1..u64::MAX / 2],
    ) {
        let (params, cur, _) = fixture(2, 1, 100);
        let mut next = cur.clone();
        next.version = cur.version + delta;
        let res = cur.validate_transition(&params, &next, 0, &PaymentApp);
        prop_assert!(matches!(res, Err(Error::Version { .. })), "{:?}", res);
    }

    #[test]
    fn versions_may_skip_burnt_ones(delta in 1u64..=MAX_VERSION_STEP) {
        let (params, cur, _) = fixture(2, 1, 100);
        let mut next = cur.clone();
        next.version = cur.version + delta;
        prop_assert_eq!(cur.validate_transition(&params, &next, 0, &PaymentApp), Ok(()));
    }

    #[test]
    fn taking_others_funds_is_rejected(actor in 0usize..3, victim in 0usize..3, amount in 1u64..=100) {
        prop_assume!(actor != victim);
        let (params, cur, _) = fixture(3, 1, 100);
        let mut next = cur.next();
        next.outcome.balances[0][victim] -= U256::from(amount);
        next.outcome.balances[0][actor] += U256::from(amount);
        prop_assert_eq!(
            cur.validate_transition(&params, &next, actor, &PaymentApp),
            Err(Error::TakesOthersFunds { actor, participant: victim, asset: 0 })
        );
    }
}

#[test]
fn changing_assets_is_rejected() {
    let (params, cur, _) = fixture(2, 2, 100);
    let mut swapped = cur.next();
    swapped.outcome.assets.swap(0, 1);
    assert_eq!(
        cur.validate_transition(&params, &swapped, 0, &PaymentApp),
        Err(Error::AssetsChanged)
    );
    let mut moved = cur.next();
    moved.outcome.assets[1].chainId = U256::from(1);
    assert_eq!(
        cur.validate_transition(&params, &moved, 0, &PaymentApp),
        Err(Error::AssetsChanged)
    );
}

#[test]
fn nothing_follows_a_final_state() {
    let (params, mut cur, _) = fixture(2, 1, 100);
    cur.isFinal = true;
    assert_eq!(
        cur.validate_transition(&params, &cur.next(), 0, &PaymentApp),
        Err(Error::Final)
    );
}

#[test]
fn other_channel_and_bad_actor_are_rejected() {
    let (params, cur, _) = fixture(2, 1, 100);
    let mut other = cur.next();
    other.channelId.0[0] ^= 1;
    assert!(matches!(
        cur.validate_transition(&params, &other, 0, &PaymentApp),
        Err(Error::ChannelIdMismatch { .. })
    ));
    assert_eq!(
        cur.validate_transition(&params, &cur.next(), 2, &PaymentApp),
        Err(Error::Index(2))
    );
}

#[test]
fn payment_channels_reject_app_data_and_apps_decide() {
    let (params, cur, _) = fixture(2, 1, 100);
    let mut next = cur.next();
    next.appData = vec![1u8].into();
    assert_eq!(
        cur.validate_transition(&params, &next, 0, &PaymentApp),
        Err(Error::PaymentAppData)
    );

    #[derive(Debug)]
    struct NoWay;
    #[derive(Debug, thiserror::Error)]
    #[error("game over")]
    struct GameOver;
    impl perun_channel::App for NoWay {
        fn valid_transition(
            &self,
            _: &perun_channel::Params,
            _: &perun_channel::State,
            _: &perun_channel::State,
            _: usize,
        ) -> Result<(), perun_channel::AppRejection> {
            Err(GameOver.into())
        }
    }
    let mut app_params = params.clone();
    app_params.app = Address::repeat_byte(9);
    let mut cur = cur.clone();
    cur.channelId = app_params.channel_id();
    match cur.validate_transition(&app_params, &cur.next(), 0, &NoWay) {
        Err(Error::App(reason)) => assert!(reason.downcast_ref::<GameOver>().is_some()),
        other => panic!("expected the app's reason, got {other:?}"),
    }
}

#[test]
fn limits_are_enforced() {
    let (params, state, _) = fixture(2, 1, 1);
    let mut p = params.clone();
    p.participants = vec![p.participants[0]];
    assert_eq!(p.validate(), Err(Error::Participants(1)));
    p.participants = (1..=17).map(Address::repeat_byte).collect();
    assert_eq!(p.validate(), Err(Error::Participants(17)));
    let mut p = params.clone();
    p.participants[1] = p.participants[0];
    assert!(matches!(p.validate(), Err(Error::BadParticipant(_))));
    let mut p = params.clone();
    p.challengeDuration = 0;
    assert_eq!(p.validate(), Err(Error::ChallengeDuration(0)));

    let mut s = state.clone();
    s.outcome.assets.clear();
    s.outcome.balances.clear();
    assert_eq!(s.check_limits(), Err(Error::Assets(0)));
    let mut s = state.clone();
    s.outcome.assets = vec![s.outcome.assets[0].clone(); 17];
    s.outcome.balances = vec![s.outcome.balances[0].clone(); 17];
    assert_eq!(s.check_limits(), Err(Error::Assets(17)));
    let mut s = state.clone();
    s.appData = vec![0u8; 64 * 1024 + 1].into();
    assert_eq!(s.check_limits(), Err(Error::AppDataTooLarge(64 * 1024 + 1)));
    let mut s = state.clone();
    s.outcome.balances[0].push(U256::ZERO);
    assert!(matches!(s.validate(&params), Err(Error::Dimensions { .. })));
    let mut s = state.clone();
    s.outcome.balances[0] = vec![U256::MAX, U256::from(1)];
    assert_eq!(s.validate(&params), Err(Error::Overflow(0)));
    let mut s = state.clone();
    s.outcome.assets.push(s.outcome.assets[0].clone());
    s.outcome.balances.push(s.outcome.balances[0].clone());
    // One funding row per asset, or the adjudicator reverts with `Dimensions`.
    assert_eq!(
        s.validate(&params),
        Err(Error::FundingDimensions {
            assets: 2,
            participants: 2
        })
    );
    let mut p2 = params.clone();
    p2.funding.push(p2.funding[0].clone());
    s.channelId = p2.channel_id();
    assert_eq!(s.validate(&p2), Err(Error::DuplicateAsset(1)));
}

/// The adjudicator's bounds: at most 365 days of challenge, and one funding entry per
/// participant in every row.
#[test]
fn challenge_and_funding_bounds() {
    let (params, _, _) = fixture(2, 1, 1);
    let mut p = params.clone();
    p.challengeDuration = perun_channel::limits::MAX_CHALLENGE_DURATION;
    assert_eq!(p.validate(), Ok(()));
    p.challengeDuration += 1;
    assert_eq!(
        p.validate(),
        Err(Error::ChallengeDuration(365 * 24 * 3600 + 1))
    );
    let mut p = params.clone();
    p.funding[0].pop();
    assert_eq!(
        p.validate(),
        Err(Error::FundingDimensions {
            assets: 1,
            participants: 2
        })
    );
    let mut p = params;
    p.funding.clear();
    assert!(matches!(
        p.validate(),
        Err(Error::FundingDimensions { assets: 0, .. })
    ));
}

#[test]
fn phase_table_is_closed() {
    use Phase::*;
    let all = [
        Proposing, Signing0, Funding, Active, Updating, Final, Registered, Concluded, Withdrawn,
    ];
    let legal: Vec<(Phase, Phase)> = all
        .iter()
        .flat_map(|a| all.iter().map(move |b| (*a, *b)))
        .filter(|(a, b)| a.can_transition_to(*b))
        .collect();
    let expected = vec![
        (Proposing, Signing0),
        (Signing0, Funding),
        (Funding, Active),
        (Funding, Registered),
        (Funding, Concluded),
        (Active, Updating),
        (Active, Final),
        (Active, Registered),
        (Active, Concluded),
        (Updating, Active),
        (Updating, Final),
        (Updating, Registered),
        (Updating, Concluded),
        (Final, Registered),
        (Final, Concluded),
        (Registered, Registered),
        (Registered, Concluded),
        (Concluded, Withdrawn),
    ];
    assert_eq!(legal, expected);
    assert!(!Withdrawn.can_transition_to(Active));
    assert!(!Active.can_transition_to(Proposing));
    assert!(!Concluded.can_transition_to(Registered));
}
