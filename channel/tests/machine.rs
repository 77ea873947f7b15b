//! The channel machine: phases, signing, double-sign protection, and that a
//! failed operation leaves the machine unchanged.

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

#[allow(dead_code, unreachable_pub, missing_docs)]
mod support {
    pub mod fixtures;
}

use perun_channel::{Error, Machine, PaymentApp, Phase, Presigned, SignedState, U256};
use perun_wallet::{Account, Signature};
use support::fixtures::fixture;

/// Two machines (one per participant) that have signed version 0 and are `Active`.
fn active_pair() -> (Machine, Machine, Vec<perun_wallet::LocalAccount>) {
    let (params, init, accs) = fixture(2, 1, 100);
    let mut a = Machine::new(params.clone(), 0, init.clone()).unwrap();
    let mut b = Machine::new(params, 1, init).unwrap();
    for m in [&mut a, &mut b] {
        m.set_phase(Phase::Signing0).unwrap();
    }
    let sa = a.sign_staged(&accs[0]).unwrap();
    let sb = b.sign_staged(&accs[1]).unwrap();
    a.add_signature(1, sb).unwrap();
    b.add_signature(0, sa).unwrap();
    for m in [&mut a, &mut b] {
        m.commit_staged().unwrap();
        assert_eq!(m.phase(), Phase::Funding);
        m.set_phase(Phase::Active).unwrap();
    }
    (a, b, accs)
}

fn pay(m: &Machine, from: usize, to: usize, amount: u64) -> perun_channel::State {
    let mut next = m.current().unwrap().state.next();
    next.outcome.balances[0][from] -= U256::from(amount);
    next.outcome.balances[0][to] += U256::from(amount);
    next
}

#[test]
fn update_round_trip() {
    let (mut a, mut b, accs) = active_pair();
    let next = pay(&a, 0, 1, 10);
    a.stage_update(next.clone(), 0, &PaymentApp).unwrap();
    assert_eq!(a.phase(), Phase::Updating);
    let sa = a.sign_staged(&accs[0]).unwrap();
    b.stage_update(next, 0, &PaymentApp).unwrap();
    b.add_signature(0, sa).unwrap();
    let sb = b.sign_staged(&accs[1]).unwrap();
    a.add_signature(1, sb).unwrap();
    let ca = a.commit_staged().unwrap().clone();
    let cb = b.commit_staged().unwrap().clone();
    assert_eq!(ca, cb);
    assert_eq!(ca.state.version, 1);
    ca.verify_all(a.params()).unwrap();
    assert_eq!(a.phase(), Phase::Active);
}

#[test]
fn one_update_in_flight() {
    let (mut a, _, _) = active_pair();
    a.stage_update(pay(&a, 0, 1, 1), 0, &PaymentApp).unwrap();
    let snapshot = a.clone();
    assert_eq!(
        a.stage_update(pay(&a, 0, 1, 2), 0, &PaymentApp),
        Err(Error::Busy)
    );
    assert_eq!(a, snapshot);
}

#[test]
fn invalid_update_changes_nothing() {
    let (mut a, _, accs) = active_pair();
    let snapshot = a.clone();
    let mut bad = pay(&a, 1, 0, 10); // actor 0 takes participant 1's funds
    assert!(matches!(
        a.stage_update(bad.clone(), 0, &PaymentApp),
        Err(Error::TakesOthersFunds { .. })
    ));
    bad.version += 1;
    assert!(a.stage_update(bad, 0, &PaymentApp).is_err());
    assert!(matches!(
        a.add_signature(1, accs[1].sign_hash(Default::default()).unwrap()),
        Err(Error::WrongPhase { .. })
    ));
    assert!(matches!(a.commit_staged(), Err(Error::WrongPhase { .. })));
    assert!(matches!(
        a.set_phase(Phase::Withdrawn),
        Err(Error::IllegalTransition { .. })
    ));
    assert_eq!(a, snapshot);
}

#[test]
fn bad_signatures_are_rejected_and_commit_needs_all() {
    let (mut a, _, accs) = active_pair();
    let next = pay(&a, 0, 1, 5);
    a.stage_update(next.clone(), 0, &PaymentApp).unwrap();
    a.sign_staged(&accs[0]).unwrap();
    // Participant 0's signature offered as participant 1's.
    let wrong = accs[0].sign_hash(next.hash()).unwrap();
    assert!(matches!(
        a.add_signature(1, wrong),
        Err(Error::BadSignature { index: 1, .. })
    ));
    // A signature over another state.
    let other = accs[1].sign_hash(pay(&a, 0, 1, 6).hash()).unwrap();
    assert!(a.add_signature(1, other).is_err());
    // The malleable twin of a valid signature.
    let good = accs[1].sign_hash(next.hash()).unwrap();
    let n = U256::from_str_radix(
        "fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141",
        16,
    )
    .unwrap();
    let twin = Signature::new(good.r(), n - good.s(), !good.v());
    assert!(matches!(
        a.add_signature(1, twin),
        Err(Error::BadSignature { index: 1, .. })
    ));
    assert_eq!(a.commit_staged().err(), Some(Error::MissingSignature(1)));
    a.add_signature(1, good).unwrap();
    a.commit_staged().unwrap();
}

#[test]
fn never_signs_two_states_with_one_version() {
    let (mut a, _, accs) = active_pair();
    a.stage_update(pay(&a, 0, 1, 10), 0, &PaymentApp).unwrap();
    a.sign_staged(&accs[0]).unwrap();
    a.discard_staged().unwrap();
    // A different version-1 state is refused before it can be signed.
    assert_eq!(
        a.stage_update(pay(&a, 0, 1, 1), 0, &PaymentApp),
        Err(Error::DoubleSign(1))
    );
    assert_eq!(a.phase(), Phase::Active);
    // The same state again is fine.
    a.stage_update(pay(&a, 0, 1, 10), 0, &PaymentApp).unwrap();
    a.sign_staged(&accs[0]).unwrap();
}

/// The attack of issue 13: B signs A's final v1, A aborts it and pays B in
/// v2. Had B signed v2, A could conclude v1 on-chain and undo the payment.
/// After a final state, B signs nothing else, also after a restart; the
/// final state itself may still be signed again (a retried settle).
#[test]
fn nothing_is_signed_after_a_final_state() {
    let (a, mut b, accs) = active_pair();
    let mut fin = a.current().unwrap().state.next();
    fin.isFinal = true;
    b.stage_update(fin.clone(), 0, &PaymentApp).unwrap();
    b.sign_staged(&accs[1]).unwrap();
    assert!(b.signed_final());
    let restored = Machine::restore(
        b.params().clone(),
        1,
        Phase::Active,
        b.current().cloned(),
        b.staged().cloned(),
    )
    .unwrap();
    for mut m in [b, restored] {
        m.discard_staged().unwrap();
        let mut v2 = pay(&m, 0, 1, 3);
        v2.version = 2;
        assert_eq!(
            m.stage_update(v2, 0, &PaymentApp),
            Err(Error::SignedFinal {
                version: 1,
                hash: fin.hash()
            })
        );
        assert_eq!(m.phase(), Phase::Active);
        let mut fin2 = fin.clone();
        fin2.version = 2;
        assert!(matches!(
            m.stage_update(fin2, 1, &PaymentApp),
            Err(Error::SignedFinal { version: 1, .. })
        ));
        m.stage_update(fin.clone(), 0, &PaymentApp).unwrap();
        m.sign_staged(&accs[1]).unwrap();
    }
}

#[test]
fn double_sign_guard_survives_restore() {
    let (mut a, _, accs) = active_pair();
    a.stage_update(pay(&a, 0, 1, 10), 0, &PaymentApp).unwrap();
    a.sign_staged(&accs[0]).unwrap();
    let mut r = Machine::restore(
        a.params().clone(),
        0,
        a.phase(),
        a.current().cloned(),
        a.staged().cloned(),
    )
    .unwrap();
    assert_eq!(r.last_signed(), a.last_signed());
    r.discard_staged().unwrap();
    assert_eq!(
        r.stage_update(pay(&r, 0, 1, 3), 0, &PaymentApp),
        Err(Error::DoubleSign(1))
    );
}

#[test]
fn a_burnt_version_is_skipped_and_restore_resumes_updating() {
    let (mut a, _, accs) = active_pair();
    a.stage_update(pay(&a, 0, 1, 10), 0, &PaymentApp).unwrap();
    a.sign_staged(&accs[0]).unwrap();
    // The store keeps `Active` while an update is staged.
    let mut r = Machine::restore(
        a.params().clone(),
        0,
        Phase::Active,
        a.current().cloned(),
        a.staged().cloned(),
    )
    .unwrap();
    assert_eq!(r.phase(), Phase::Updating);
    r.discard_staged().unwrap();
    // Version 1 is burnt; version 2 (a different state) may be signed.
    let mut skip = pay(&r, 0, 1, 3);
    skip.version = 2;
    r.stage_update(skip, 0, &PaymentApp).unwrap();
    r.sign_staged(&accs[0]).unwrap();
    assert_eq!(r.last_signed().map(|(v, _)| v), Some(2));
}

#[test]
fn restore_rejects_tampered_records() {
    let (a, _, _) = active_pair();
    let mut cur = a.current().cloned().unwrap();
    cur.state.outcome.balances[0][0] += U256::from(1);
    assert!(Machine::restore(a.params().clone(), 0, Phase::Active, Some(cur), None).is_err());
    assert!(
        Machine::restore(
            a.params().clone(),
            5,
            Phase::Active,
            a.current().cloned(),
            None
        )
        .is_err()
    );
}

#[test]
fn final_update_moves_to_final_and_then_only_dispute_or_conclude() {
    let (mut a, mut b, accs) = active_pair();
    let mut next = pay(&a, 0, 1, 0);
    next.isFinal = true;
    a.stage_update(next.clone(), 0, &PaymentApp).unwrap();
    b.stage_update(next, 0, &PaymentApp).unwrap();
    let sa = a.sign_staged(&accs[0]).unwrap();
    let sb = b.sign_staged(&accs[1]).unwrap();
    a.add_signature(1, sb).unwrap();
    a.commit_staged().unwrap();
    assert_eq!(a.phase(), Phase::Final);
    assert!(a.stage_update(pay(&a, 0, 1, 1), 0, &PaymentApp).is_err());
    a.set_phase(Phase::Concluded).unwrap();
    a.set_phase(Phase::Withdrawn).unwrap();
    let _ = sa;
}

#[test]
fn adopt_takes_only_newer_fully_signed_states() {
    let (mut a, mut b, accs) = active_pair();
    // b learns of a version-1 state that both signed (e.g. from a Sync).
    let mut st = SignedState::new(pay(&a, 0, 1, 10));
    st.sign(a.params(), 0, &accs[0]).unwrap();
    assert!(matches!(
        b.adopt(st.clone()),
        Err(Error::MissingSignature(1) | Error::SignatureCount { .. })
    ));
    st.sign(a.params(), 1, &accs[1]).unwrap();
    b.adopt(st.clone()).unwrap();
    assert_eq!(b.current().unwrap().state.version, 1);
    assert!(b.adopt(st.clone()).is_err(), "not newer");
    a.adopt(st).unwrap();
    assert_eq!(a.current(), b.current());
}

/// A signature made ahead (the proposer signs while its peers' answers are
/// on the way, issue 17) is used only for the state it was made over, and
/// counts as signed only once adopted: one made over a proposal that was
/// then dropped leaves the version free for another state.
#[test]
fn a_signature_made_ahead_counts_only_once_adopted_and_only_for_its_state() {
    let (mut a, _b, accs) = active_pair();
    let first = pay(&a, 0, 1, 10);
    a.stage_update(first.clone(), 0, &PaymentApp).unwrap();
    let hash = a.staged_hash().unwrap();
    let made = Presigned::new(&accs[0], hash).unwrap();
    // Dropped before adoption: nothing counts as signed.
    a.discard_staged().unwrap();
    assert_eq!(a.last_signed().map(|(v, _)| v), Some(0));

    // Another state of the same version: the old signature does not fit
    // it, so it is signed afresh, and the new signature is over this state.
    let second = pay(&a, 0, 1, 20);
    assert_eq!(second.version, first.version);
    a.stage_update(second.clone(), 0, &PaymentApp).unwrap();
    let sig = a.sign_staged_with(&accs[0], Some(made)).unwrap();
    assert_ne!(
        sig,
        made.signature(),
        "a signature over another state is not used"
    );
    assert_eq!(sig, accs[0].sign_hash(second.hash()).unwrap());
    assert_eq!(a.last_signed(), Some((second.version, second.hash())));

    // Adopted for its own state, it counts as signed: the version is taken.
    let (mut c, _d, accs) = active_pair();
    let next = pay(&c, 0, 1, 10);
    c.stage_update(next.clone(), 0, &PaymentApp).unwrap();
    let hash = c.staged_hash().unwrap();
    // Another account's signature over the same state is not taken.
    let theirs = Presigned::new(&accs[1], hash).unwrap();
    let mut other_key = c.clone();
    assert_ne!(
        other_key.sign_staged_with(&accs[0], Some(theirs)).unwrap(),
        theirs.signature()
    );
    let made = Presigned::new(&accs[0], hash).unwrap();
    assert_eq!(
        c.sign_staged_with(&accs[0], Some(made)).unwrap(),
        made.signature()
    );
    assert_eq!(c.last_signed(), Some((next.version, hash)));
    c.discard_staged().unwrap();
    let other = pay(&c, 0, 1, 30);
    assert!(matches!(
        c.stage_update(other, 0, &PaymentApp),
        Err(Error::DoubleSign(v)) if v == next.version
    ));
}

/// Only a key in this process lets the client sign ahead; any other
/// account (a remote signer, a hardware wallet) keeps the default.
#[test]
fn only_local_keys_sign_ahead() {
    #[derive(Debug)]
    struct Remote(perun_wallet::LocalAccount);
    impl Account for Remote {
        fn address(&self) -> perun_wallet::Address {
            self.0.address()
        }
        fn sign_hash(&self, hash: perun_wallet::B256) -> perun_wallet::Result<Signature> {
            self.0.sign_hash(hash)
        }
    }
    let (_, _, accs) = fixture(2, 1, 100);
    assert!(accs[0].signs_in_process());
    assert!(!Remote(accs[0].clone()).signs_in_process());
}

/// Three machines, one per participant, `Active` on a fully signed version 0.
fn active_three() -> (Vec<Machine>, Vec<perun_wallet::LocalAccount>) {
    let (params, init, accs) = fixture(3, 1, 100);
    let mut ms: Vec<Machine> = (0..3)
        .map(|i| Machine::new(params.clone(), i, init.clone()).unwrap())
        .collect();
    let sigs: Vec<Signature> = ms
        .iter_mut()
        .zip(&accs)
        .map(|(m, acc)| {
            m.set_phase(Phase::Signing0).unwrap();
            m.sign_staged(acc).unwrap()
        })
        .collect();
    for m in &mut ms {
        m.complete_staged(&sigs).unwrap();
        m.set_phase(Phase::Active).unwrap();
    }
    (ms, accs)
}

#[test]
fn several_signatures_are_taken_all_or_none() {
    let (mut ms, accs) = active_three();
    let a = &mut ms[0];
    let next = pay(a, 0, 1, 5);
    a.stage_update(next.clone(), 0, &PaymentApp).unwrap();
    a.sign_staged(&accs[0]).unwrap();
    let s1 = accs[1].sign_hash(next.hash()).unwrap();
    let s2 = accs[2].sign_hash(next.hash()).unwrap();
    let snapshot = a.clone();
    // The second one is participant 1's, offered as participant 2's.
    assert!(matches!(
        a.add_signatures(&[(1, s1), (2, s1)]),
        Err(Error::BadSignature { index: 2, .. })
    ));
    assert_eq!(*a, snapshot, "the good signature was not taken alone");
    assert!(a.add_signatures(&[(7, s1)]).is_err());
    assert_eq!(*a, snapshot);
    a.add_signatures(&[(1, s1), (2, s2)]).unwrap();
    assert_eq!(a.committed_phase(), Ok(Phase::Active));
    assert_eq!(a.commit_staged().unwrap().state.version, next.version);
}

#[test]
fn a_commit_completes_the_staged_state_or_changes_nothing() {
    let (mut ms, accs) = active_three();
    let next = pay(&ms[0], 0, 1, 5);
    let sigs: Vec<Signature> = accs
        .iter()
        .map(|acc| acc.sign_hash(next.hash()).unwrap())
        .collect();
    let b = &mut ms[1];
    // Nothing staged: nothing to complete.
    assert_eq!(b.complete_staged(&sigs).err(), Some(Error::NothingStaged));
    b.stage_update(next.clone(), 0, &PaymentApp).unwrap();
    let own = b.sign_staged(&accs[1]).unwrap();
    let snapshot = b.clone();
    // A bad signature, a short set, a signature over another state.
    let other = accs[2].sign_hash(pay(b, 0, 1, 6).hash()).unwrap();
    for bad in [
        vec![sigs[0], sigs[1], sigs[0]],
        vec![sigs[0], sigs[1]],
        vec![sigs[0], sigs[1], other],
    ] {
        assert!(b.complete_staged(&bad).is_err());
        assert_eq!(*b, snapshot);
    }
    // Our own slot is kept, whatever the commit carries in it.
    let full = b
        .complete_staged(&[sigs[0], sigs[0], sigs[2]])
        .unwrap()
        .clone();
    assert_eq!(full.sigs[1], Some(own));
    full.verify_all(b.params()).unwrap();
    assert_eq!(b.phase(), Phase::Active);
    // A repeated commit finds nothing staged.
    assert!(b.complete_staged(&sigs).is_err());
}

#[test]
fn a_signed_copy_changes_nothing_until_the_machine_takes_its_signature() {
    let (mut a, _, accs) = active_pair();
    let mut last = pay(&a, 0, 1, 5);
    last.isFinal = true;
    a.stage_update(last.clone(), 0, &PaymentApp).unwrap();
    let snapshot = a.clone();
    let (copy, signed) = a.sign_staged_copy(&accs[0], None).unwrap();
    assert_eq!(a, snapshot, "nothing counts as signed yet");
    assert_eq!(a.last_signed(), snapshot.last_signed());
    assert!(!a.signed_final());
    assert_eq!(copy.sigs[0], Some(signed.signature()));
    assert_eq!(copy.state, last);
    // The wrong account signs nothing.
    assert!(a.sign_staged_copy(&accs[1], None).is_err());
    assert_eq!(a, snapshot);
    // Taken: the same signature, no new one; now it counts.
    assert_eq!(
        a.sign_staged_with(&accs[0], Some(signed)).unwrap(),
        signed.signature()
    );
    assert_eq!(a.staged(), Some(&copy));
    assert!(a.signed_final());
    // A second state of that version is refused, on a copy as in place.
    a.discard_staged().unwrap();
    let other = pay(&a, 0, 1, 6);
    assert!(a.stage_update(other, 0, &PaymentApp).is_err());
}
