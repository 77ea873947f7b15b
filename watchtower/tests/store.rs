//! The redb store: slots, replacement, the locator index, the cursor, and
//! that everything survives reopening.

use alloy_primitives::{Address, B256};
use perun_watchtower::Error;
use perun_watchtower::store::{NewAppointment, Status, Store};

fn sign(_: &B256, block: u64, _: &[u8]) -> perun_watchtower::Result<Vec<u8>> {
    Ok(block.to_be_bytes().to_vec())
}

fn new(user: Address, locator: B256, seq: u64, blob: Vec<u8>, sig: Vec<u8>) -> NewAppointment {
    NewAppointment {
        user,
        locator,
        seq,
        blob,
        user_signature: sig,
    }
}

#[test]
fn slots_replacement_index_and_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tower.redb");
    let (alice, bob) = (Address::repeat_byte(1), Address::repeat_byte(2));
    let (l1, l2, l3) = (
        B256::repeat_byte(1),
        B256::repeat_byte(2),
        B256::repeat_byte(3),
    );
    {
        let store = Store::open(&path).expect("open");
        assert!(matches!(
            store.add_appointment(new(alice, l1, 1, vec![1], vec![]), 0, sign),
            Err(Error::UnknownUser(a)) if a == alice
        ));
        let sub = store.register(alice, 2, 100).expect("register");
        assert_eq!((sub.slots_total, sub.slots_used, sub.expiry), (2, 0, 100));
        store.register(bob, 1, 100).expect("register");
        store.set_cursor(41).expect("cursor");

        let a = store
            .add_appointment(new(alice, l1, 1, vec![1], vec![9]), 10, sign)
            .expect("add");
        assert!(!a.replaced);
        assert_eq!(a.receipt.start_block, 41);
        assert_eq!(a.subscription.slots_used, 1);
        // Same locator again: replaces, no slot.
        let a = store
            .add_appointment(new(alice, l1, 2, vec![2], vec![9]), 10, sign)
            .expect("replace");
        assert!(a.replaced);
        assert_eq!(a.subscription.slots_used, 1);
        store
            .add_appointment(new(alice, l2, 3, vec![3], vec![9]), 10, sign)
            .expect("add");
        assert!(matches!(
            store.add_appointment(new(alice, l3, 4, vec![4], vec![9]), 10, sign),
            Err(Error::NoFreeSlot { slots: 2, .. })
        ));
        // Older or equal sequence numbers are refused, the same request is idempotent.
        assert!(matches!(
            store.add_appointment(new(alice, l1, 1, vec![7], vec![9]), 10, sign),
            Err(Error::Stale {
                seq: 1,
                stored: 2,
                ..
            })
        ));
        let again = store
            .add_appointment(new(alice, l1, 2, vec![2], vec![9]), 10, sign)
            .expect("retry");
        assert!(again.replaced);
        assert_eq!(
            store
                .appointment(alice, l1)
                .expect("get")
                .expect("present")
                .blob,
            vec![2]
        );
        // A replacement still works with every slot taken.
        store
            .add_appointment(new(alice, l2, 5, vec![5], vec![9]), 10, sign)
            .expect("replace when full");
        assert!(matches!(
            store.add_appointment(new(bob, l1, 6, vec![6], vec![9]), 101, sign),
            Err(Error::Expired { expiry: 100, .. })
        ));
        store
            .add_appointment(new(bob, l1, 6, vec![6], vec![9]), 100, sign)
            .expect("bob");
        assert!(
            store
                .set_status(bob, l1, Status::DisputeTriggered)
                .expect("status")
        );
        assert!(!store.set_status(bob, l3, Status::Resolved).expect("status"));
    }
    let store = Store::open(&path).expect("reopen");
    assert_eq!(store.cursor().expect("cursor"), 41);
    assert_eq!(store.counts().expect("counts"), (2, 3));
    let mut users = store.users_for(l1).expect("index");
    users.sort();
    assert_eq!(users, vec![alice, bob]);
    assert_eq!(store.users_for(l2).expect("index"), vec![alice]);
    assert!(store.users_for(l3).expect("index").is_empty());
    let a = store.appointment(alice, l1).expect("get").expect("present");
    assert_eq!(a.blob, vec![2]);
    assert_eq!(a.status, Status::BeingWatched);
    assert_eq!(
        store
            .appointment(bob, l1)
            .expect("get")
            .expect("present")
            .status,
        Status::DisputeTriggered
    );
    assert_eq!(
        store
            .subscription(alice)
            .expect("sub")
            .expect("present")
            .slots_used,
        2
    );
    // Renewal adds slots and never shortens the expiry.
    let sub = store.register(alice, 3, 50).expect("renew");
    assert_eq!((sub.slots_total, sub.slots_used, sub.expiry), (5, 2, 100));
}

/// Jobs: a new one marks its appointments, a second event for it changes
/// only the registered state (when newer), a finished one reopens; the
/// phase written before a transaction survives reopening; the cursor only
/// moves back on a rewind.
#[test]
fn jobs_survive_reopen_and_mark_their_appointments() {
    use perun_channel::{Allocation, Asset, Domain, Params, State, U256};
    use perun_watchtower::store::{Job, JobPhase, JobStart};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tower.redb");
    let alice = Address::repeat_byte(1);
    let locator = B256::repeat_byte(7);
    let domain = Domain {
        chain_id: U256::from(1),
        adjudicator: Address::repeat_byte(0xad),
    };
    let params = Params::payment(
        domain,
        60,
        U256::from(9),
        vec![alice, Address::repeat_byte(2)],
        vec![vec![U256::from(1); 2]],
    );
    let asset = Asset {
        chainId: U256::from(1),
        holder: Address::repeat_byte(0xee),
    };
    let state = |v: u64| {
        let mut s = State::initial(
            &params,
            Allocation::new(vec![asset.clone()], vec![vec![U256::from(1); 2]]),
        );
        s.version = v;
        s
    };
    let job = |v: u64| Job {
        channel: params.channel_id(),
        nonce: params.nonce,
        locator,
        phase: JobPhase::Triggered,
        registered: Some(state(v)),
        refuted: None,
        concluded: false,
        refused: Vec::new(),
    };
    let id = params.channel_id();
    {
        let store = Store::open(&path).expect("open");
        store.register(alice, 1, 100).expect("register");
        store
            .add_appointment(new(alice, locator, 1, vec![1], vec![]), 0, sign)
            .expect("add");
        assert_eq!(
            store.start_job(&job(2), &[alice]).expect("start"),
            JobStart::New
        );
        let status = |s: &Store| {
            s.appointment(alice, locator)
                .expect("read")
                .expect("some")
                .status
        };
        assert_eq!(status(&store), Status::DisputeTriggered);
        assert_eq!(
            store.start_job(&job(1), &[alice]).expect("again"),
            JobStart::Running
        );
        assert_eq!(
            store.job(id).expect("job").expect("some").registered,
            Some(state(2))
        );
        assert_eq!(
            store.start_job(&job(3), &[alice]).expect("newer"),
            JobStart::Running
        );
        store
            .update_job(id, |j| j.phase = JobPhase::Refuting { version: 5 })
            .expect("phase");
        store.set_cursor(10).expect("cursor");
        store.rewind_cursor(12).expect("no rewind upwards");
        assert_eq!(store.cursor().expect("cursor"), 10);
        store.rewind_cursor(6).expect("rewind");
    }
    let store = Store::open(&path).expect("reopen");
    assert_eq!(store.cursor().expect("cursor"), 6);
    let unfinished = store.unfinished_jobs().expect("jobs");
    assert_eq!(unfinished.len(), 1);
    assert_eq!(unfinished[0].phase, JobPhase::Refuting { version: 5 });
    assert_eq!(unfinished[0].registered, Some(state(3)));
    store
        .finish_job(id, &[alice], Status::Resolved, |j| j.concluded = true)
        .expect("finish");
    assert!(store.unfinished_jobs().expect("jobs").is_empty());
    let a = store
        .appointment(alice, locator)
        .expect("read")
        .expect("some");
    assert_eq!(a.status, Status::Resolved);
    assert_eq!(
        store.start_job(&job(3), &[alice]).expect("reopen"),
        JobStart::Reopened
    );
    assert_eq!(
        store.unfinished_jobs().expect("jobs")[0].phase,
        JobPhase::Triggered
    );
}

/// A batch (group commit) gives each appointment its own result: refusals
/// change nothing, later ones see earlier ones (slots run out inside the
/// batch, the same locator twice is a replacement), and all of it survives
/// reopening.
#[test]
fn a_batch_gives_each_appointment_its_own_result() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tower.redb");
    let (alice, stranger) = (Address::repeat_byte(1), Address::repeat_byte(9));
    let l = |b: u8| B256::repeat_byte(b);
    {
        let store = Store::open(&path).expect("open");
        store.register(alice, 2, 100).expect("register");
        let results = store
            .add_appointments(
                vec![
                    new(alice, l(1), 1, vec![1], vec![]),
                    new(stranger, l(2), 1, vec![2], vec![]),
                    new(alice, l(1), 2, vec![3], vec![]),
                    new(alice, l(1), 1, vec![4], vec![]),
                    new(alice, l(3), 1, vec![5], vec![]),
                    new(alice, l(4), 1, vec![6], vec![]),
                ],
                10,
                sign,
            )
            .expect("batch");
        assert_eq!(results.len(), 6);
        assert!(!results[0].as_ref().expect("first").replaced);
        assert!(matches!(results[1], Err(Error::UnknownUser(u)) if u == stranger));
        assert!(results[2].as_ref().expect("replacement").replaced);
        assert!(matches!(
            results[3],
            Err(Error::Stale {
                seq: 1,
                stored: 2,
                ..
            })
        ));
        assert_eq!(
            results[4]
                .as_ref()
                .expect("second slot")
                .subscription
                .slots_used,
            2
        );
        assert!(matches!(
            results[5],
            Err(Error::NoFreeSlot { slots: 2, .. })
        ));
    }
    let store = Store::open(&path).expect("reopen");
    let a = store
        .appointment(alice, l(1))
        .expect("read")
        .expect("stored");
    assert_eq!((a.seq, a.blob), (2, vec![3]));
    assert!(store.appointment(alice, l(3)).expect("read").is_some());
    assert!(store.appointment(alice, l(4)).expect("read").is_none());
    assert!(store.appointment(stranger, l(2)).expect("read").is_none());
    assert_eq!(
        store
            .subscription(alice)
            .expect("read")
            .expect("user")
            .slots_used,
        2
    );
}

/// The in-memory locator set answers for every stored appointment, also
/// after reopening, and for nothing else.
#[test]
fn the_locator_set_mirrors_the_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tower.redb");
    let alice = Address::repeat_byte(1);
    let l = |b: u8| B256::repeat_byte(b);
    {
        let store = Store::open(&path).expect("open");
        store.register(alice, 2, 100).expect("register");
        store
            .add_appointment(new(alice, l(1), 1, vec![1], vec![]), 10, sign)
            .expect("add");
        assert!(store.watches(&l(1)));
        assert!(!store.watches(&l(2)));
        // Refused (no free slot after one more): not watched.
        store
            .add_appointment(new(alice, l(2), 1, vec![2], vec![]), 10, sign)
            .expect("add");
        assert!(
            store
                .add_appointment(new(alice, l(3), 1, vec![3], vec![]), 10, sign)
                .is_err()
        );
        assert!(!store.watches(&l(3)));
    }
    let store = Store::open(&path).expect("reopen");
    assert!(store.watches(&l(1)) && store.watches(&l(2)));
    assert!(!store.watches(&l(3)));
}

/// The store is bounded: no new user or appointment past the limits (a
/// replacement still works), and renewals stop adding slots at the cap.
#[test]
fn limits_bound_users_appointments_and_slots() {
    use perun_watchtower::store::StoreLimits;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path().join("tower.redb"))
        .expect("open")
        .with_limits(StoreLimits {
            max_users: 2,
            max_appointments: 3,
            max_slots_per_user: 5,
            ..StoreLimits::default()
        });
    let (a, b, c) = (
        Address::repeat_byte(1),
        Address::repeat_byte(2),
        Address::repeat_byte(3),
    );
    assert_eq!(store.register(a, 4, 100).expect("a").slots_total, 4);
    assert_eq!(store.register(a, 4, 100).expect("renew").slots_total, 5);
    store.register(b, 10, 100).expect("b");
    assert!(matches!(
        store.register(c, 1, 100),
        Err(Error::TowerFull {
            what: "users",
            max: 2
        })
    ));
    let l = |x: u8| B256::repeat_byte(x);
    for (i, who) in [a, a, b].into_iter().enumerate() {
        store
            .add_appointment(new(who, l(i as u8), 1, vec![1], vec![]), 10, sign)
            .expect("under the limit");
    }
    assert!(matches!(
        store.add_appointment(new(b, l(9), 1, vec![1], vec![]), 10, sign),
        Err(Error::TowerFull {
            what: "appointments",
            max: 3
        })
    ));
    store
        .add_appointment(new(a, l(0), 2, vec![2], vec![]), 10, sign)
        .expect("a replacement takes no new room");
}

#[test]
fn reclaim_drops_long_expired_users_and_gives_their_room_back() {
    use perun_watchtower::store::StoreLimits;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path().join("tower.redb"))
        .expect("open")
        .with_limits(StoreLimits {
            max_users: 3,
            max_appointments: 4,
            max_slots_per_user: 10,
            ..StoreLimits::default()
        });
    let (a, b, c, d) = (
        Address::repeat_byte(1),
        Address::repeat_byte(2),
        Address::repeat_byte(3),
        Address::repeat_byte(4),
    );
    let l = |x: u8| B256::repeat_byte(x);
    store.register(a, 5, 100).expect("a");
    store.register(b, 5, 100).expect("b");
    store.register(c, 5, 1_000).expect("c");
    for (who, at) in [(a, 1), (a, 2), (b, 2), (c, 3)] {
        store
            .add_appointment(new(who, l(at), 1, vec![at], vec![]), 10, sign)
            .expect("stored");
    }
    // B's appointment is in a running dispute: B stays, expired or not.
    store
        .set_status(b, l(2), Status::DisputeTriggered)
        .expect("status");
    assert!(matches!(
        store.register(d, 5, 1_000),
        Err(Error::TowerFull { what: "users", .. })
    ));

    // One user per transaction, in address order, until the pass is complete.
    let (mut users, mut appointments, mut after, mut rounds) = (0, 0, None, 0);
    loop {
        let r = store.reclaim(500, after, 1, 1_000).expect("reclaim");
        users += r.users;
        appointments += r.appointments;
        rounds += 1;
        after = r.next;
        if r.done {
            break;
        }
    }
    assert_eq!((users, appointments), (1, 2), "only A went");
    assert!(
        rounds >= 3,
        "{rounds} transactions for 3 users in batches of 1"
    );
    assert_eq!(store.subscription(a).expect("read"), None);
    assert_eq!(store.appointment(a, l(1)).expect("read"), None);
    assert_eq!(store.users_for(l(2)).expect("index"), vec![b]);
    assert!(store.users_for(l(1)).expect("index").is_empty());
    assert!(store.subscription(b).expect("read").is_some());
    assert!(store.appointment(c, l(3)).expect("read").is_some());
    assert_eq!(store.counts().expect("counts"), (2, 2));

    // The room is back: a new user and its appointments fit again.
    store.register(d, 5, 1_000).expect("d fits");
    store
        .add_appointment(new(d, l(4), 1, vec![4], vec![]), 10, sign)
        .expect("d's appointment fits");
    // Nothing is old enough now; a pass drops nothing.
    let r = store.reclaim(100, None, 1_000, 1_000).expect("reclaim");
    assert_eq!((r.users, r.appointments, r.done), (0, 0, true));
}

/// One reclaim transaction drops at most its budget of appointments, so a
/// few users holding many cannot hold the tower's only writer long (a
/// review's finding: the batch counted users only); a user holding more
/// goes over several transactions, and one in a running dispute keeps
/// that appointment, and so itself, while the rest of its room goes.
#[test]
fn reclaim_drops_many_appointments_over_short_transactions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path().join("tower.redb")).expect("open");
    let (a, b) = (Address::repeat_byte(1), Address::repeat_byte(2));
    let l = |u: u8, i: u8| {
        let mut x = [0u8; 32];
        x[0] = u;
        x[31] = i;
        B256::from(x)
    };
    for who in [a, b] {
        store.register(who, 100, 100).expect("register");
        for i in 0..25 {
            store
                .add_appointment(new(who, l(who.0[0], i), 1, vec![i; 64], vec![]), 10, sign)
                .expect("stored");
        }
    }
    store
        .set_status(b, l(2, 24), Status::DisputeTriggered)
        .expect("status");
    let (mut after, mut dropped, mut users) = (None, Vec::new(), 0);
    for _ in 0..100 {
        let r = store.reclaim(500, after, 1_000, 10).expect("reclaim");
        assert!(
            r.appointments <= 10,
            "{} in one transaction",
            r.appointments
        );
        dropped.push(r.appointments);
        users += r.users;
        after = r.next;
        if r.done {
            break;
        }
    }
    assert_eq!(
        dropped.iter().sum::<u64>(),
        49,
        "all but the disputed one: {dropped:?}"
    );
    assert!(dropped.len() >= 5, "{dropped:?}");
    assert_eq!(users, 1, "A went; B stays with its disputed appointment");
    assert_eq!(store.subscription(a).expect("read"), None);
    let b_sub = store.subscription(b).expect("read").expect("B stays");
    assert_eq!(b_sub.slots_used, 1, "the slots of what went are given back");
    assert!(store.appointment(b, l(2, 24)).expect("read").is_some());
    assert_eq!(store.users_for(l(2, 24)).expect("index"), vec![b]);
    assert_eq!(store.counts().expect("counts"), (1, 1));
}

/// A running dispute the chain showed is kept with the cursor mark, over a
/// reopen: an appointment stored at its locator then starts its job in the
/// same transaction (new, or reopened after ending), and so does a mark
/// that finds appointments stored after the event was handled. `Concluded`
/// drops it; so does the hourly check a day after its timeout.
#[test]
fn running_disputes_are_kept_until_they_end_and_start_late_jobs() {
    use perun_channel::{Allocation, Asset, Domain, Params, State, U256};
    use perun_watchtower::scheme::ChannelSecret;
    use perun_watchtower::store::{JobPhase, KEPT_AFTER_TIMEOUT, OpenDispute, Seen};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tower.redb");
    let alice = Address::repeat_byte(1);
    let domain = Domain {
        chain_id: U256::from(1),
        adjudicator: Address::repeat_byte(0xad),
    };
    let params = |nonce: u64| {
        Params::payment(
            domain,
            60,
            U256::from(nonce),
            vec![alice, Address::repeat_byte(2)],
            vec![vec![U256::from(1); 2]],
        )
    };
    let open = |p: &Params, v: u64, timeout: u64| {
        let asset = Asset {
            chainId: U256::from(1),
            holder: Address::repeat_byte(0xee),
        };
        let mut s = State::initial(
            p,
            Allocation::new(vec![asset], vec![vec![U256::from(1); 2]]),
        );
        s.version = v;
        OpenDispute {
            timeout,
            channel: p.channel_id(),
            version: v,
            nonce: p.nonce,
            registered: Some(s),
        }
    };
    let (p1, p2, p3, p4) = (params(1), params(2), params(3), params(4));
    let loc = |p: &Params| ChannelSecret::of(p).locator();
    let now = 1_000_000;
    {
        let store = Store::open(&path).expect("open");
        store.register(alice, 10, u64::MAX).expect("register");
        // p2's appointment is stored before the mark that brings its event,
        // which was handled when the locator had none (`false`).
        store
            .add_appointment(new(alice, loc(&p2), 1, vec![2], vec![]), 0, sign)
            .expect("add");
        let seen = Seen {
            registered: vec![
                open(&p1, 2, now + 60),
                open(&p2, 2, now + 60),
                open(&p3, 1, now + 60),
                // Over for more than a day (a history read from far back).
                open(&p4, 1, now - KEPT_AFTER_TIMEOUT - 1),
            ],
            concluded: vec![],
        };
        let marked = store.mark_scanned(50, &seen, now).expect("mark");
        assert_eq!(marked.started, vec![p2.channel_id()]);
        assert_eq!(store.cursor().expect("cursor"), 50);
        assert!(store.open_dispute(loc(&p4)).expect("read").is_none());
        let job = store.job(p2.channel_id()).expect("job").expect("started");
        assert_eq!(job.registered.map(|s| s.version), Some(2));
        assert_eq!(
            store
                .appointment(alice, loc(&p2))
                .expect("read")
                .expect("kept")
                .status,
            Status::DisputeTriggered
        );
        // A refutation of p1 seen twice, and out of order: the newer stays.
        let seen = Seen {
            registered: vec![open(&p1, 4, now + 60), open(&p1, 3, now + 60)],
            concluded: vec![],
        };
        assert!(
            store
                .mark_scanned(51, &seen, now)
                .expect("mark")
                .started
                .is_empty()
        );
        // p3 concludes: dropped.
        let seen = Seen {
            registered: vec![],
            concluded: vec![p3.channel_id()],
        };
        store.mark_scanned(52, &seen, now).expect("mark");
        assert!(store.open_dispute(loc(&p3)).expect("read").is_none());
        assert!(store.job(p1.channel_id()).expect("job").is_none());
    }
    {
        let store = Store::open(&path).expect("reopen");
        let kept = store.open_dispute(loc(&p1)).expect("read").expect("kept");
        assert_eq!(kept.registered.map(|s| s.version), Some(4));
        // An appointment at p1's locator starts its job in its own transaction.
        store
            .add_appointment(new(alice, loc(&p1), 1, vec![1], vec![]), 0, sign)
            .expect("add");
        let job = store.job(p1.channel_id()).expect("job").expect("started");
        assert_eq!(job.phase, JobPhase::Triggered);
        assert_eq!(job.registered.map(|s| s.version), Some(4));
        assert_eq!(
            store
                .appointment(alice, loc(&p1))
                .expect("read")
                .expect("kept")
                .status,
            Status::DisputeTriggered
        );
        // A job that ended (no valid blob) starts again with a replacement.
        store
            .finish_job(p1.channel_id(), &[alice], Status::Resolved, |_| {})
            .expect("finish");
        store
            .add_appointment(new(alice, loc(&p1), 2, vec![9], vec![]), 0, sign)
            .expect("replace");
        assert_eq!(
            store.job(p1.channel_id()).expect("job").expect("job").phase,
            JobPhase::Triggered
        );
        // p3 concluded: an appointment there starts nothing.
        store
            .add_appointment(new(alice, loc(&p3), 1, vec![3], vec![]), 0, sign)
            .expect("add");
        assert!(store.job(p3.channel_id()).expect("job").is_none());
        // A day after the timeout, the hourly check drops what is left.
        let later = now + 60 + KEPT_AFTER_TIMEOUT + 1;
        let marked = store
            .mark_scanned(53, &Seen::default(), later)
            .expect("mark");
        assert_eq!(marked.pruned, 2);
        assert!(store.open_dispute(loc(&p1)).expect("read").is_none());
    }
}

/// At `max_open_disputes`, a dispute ending sooner takes the place of the
/// one ending last (disputes registered with year-long challenge periods
/// cannot hold the room); one ending later is not kept, and counted.
#[test]
fn a_full_set_of_kept_disputes_gives_way_to_one_ending_sooner() {
    use perun_channel::{ChannelId, U256};
    use perun_watchtower::scheme::ChannelSecret;
    use perun_watchtower::store::{OpenDispute, Seen, StoreLimits};
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path().join("tower.redb"))
        .expect("open")
        .with_limits(StoreLimits {
            max_open_disputes: 3,
            ..StoreLimits::default()
        });
    let now = 1_000_000;
    let open = |n: u8, timeout: u64| OpenDispute {
        timeout,
        channel: ChannelId::repeat_byte(n),
        version: 1,
        nonce: U256::from(n),
        registered: None,
    };
    let loc = |d: &OpenDispute| {
        ChannelSecret {
            channel_id: d.channel,
            nonce: d.nonce,
        }
        .locator()
    };
    let year = now + 365 * 86_400;
    let kept = [open(1, year), open(2, year + 1), open(3, now + 60)];
    let seen = Seen {
        registered: kept.to_vec(),
        concluded: vec![],
    };
    assert_eq!(store.mark_scanned(1, &seen, now).expect("mark").not_kept, 0);
    let sooner = open(4, now + 120);
    let later = open(5, year + 2);
    let seen = Seen {
        registered: vec![sooner.clone(), later.clone()],
        concluded: vec![],
    };
    assert_eq!(store.mark_scanned(2, &seen, now).expect("mark").not_kept, 1);
    let is_kept = |d: &OpenDispute| store.open_dispute(loc(d)).expect("read").is_some();
    assert!(is_kept(&sooner), "the sooner one is kept");
    assert!(!is_kept(&kept[1]), "in place of the one ending last");
    assert!(is_kept(&kept[0]) && is_kept(&kept[2]));
    assert!(!is_kept(&later), "one ending later than all is not kept");
}

/// At the cap, disputes whose challenge period is over (kept a day past
/// it, for clock skew) go first: a review found them holding the room
/// against a live one, since they always end sooner (the chain allows
/// 1-second challenge periods, so throwaway disputes could turn the
/// protection off for everyone).
#[test]
fn disputes_already_over_do_not_crowd_out_a_running_one() {
    use perun_channel::{ChannelId, U256};
    use perun_watchtower::scheme::ChannelSecret;
    use perun_watchtower::store::{OpenDispute, Seen, StoreLimits};
    let now_secs = || 1_000_000u64;
    let dir = tempfile::tempdir().expect("store");
    let store = Store::open(dir.path().join("tower.redb"))
        .expect("store")
        .with_limits(StoreLimits {
            max_open_disputes: 3,
            ..StoreLimits::default()
        });
    let now = now_secs();
    let open = |n: u8, timeout: u64| OpenDispute {
        timeout,
        channel: ChannelId::repeat_byte(n),
        version: 1,
        nonce: U256::from(n),
        registered: None,
    };
    // Three throwaway disputes with 1 s challenge periods, over minutes ago.
    let over = [open(1, now - 600), open(2, now - 300), open(3, now - 60)];
    let seen = Seen {
        registered: over.to_vec(),
        concluded: vec![],
    };
    store.mark_scanned(1, &seen, now).expect("store");
    // A real dispute, its challenge period running for an hour.
    let live = open(9, now + 3600);
    let seen = Seen {
        registered: vec![live.clone()],
        concluded: vec![],
    };
    let marked = store.mark_scanned(2, &seen, now).expect("store");
    let loc = ChannelSecret {
        channel_id: live.channel,
        nonce: live.nonce,
    }
    .locator();
    assert!(
        store.open_dispute(loc).expect("store").is_some(),
        "a running dispute was not kept (not_kept {}) while three disputes whose challenge period \
         is over hold the room: an appointment arriving during it will start nothing",
        marked.not_kept
    );
}

/// A kept dispute that does not decode (here b466c5f's layout, before
/// `version`) must not keep the tower from starting, nor stop a mark: it
/// failed `Store::open` once.
#[test]
fn a_store_with_disputes_kept_by_b466c5f_still_opens() {
    use perun_channel::{ChannelId, State, U256};
    use perun_watchtower::scheme::ChannelSecret;
    use perun_watchtower::store::Seen;
    let now_secs = || 1_000_000u64;
    let dir = tempfile::tempdir().expect("store");
    let path = dir.path().join("tower.redb");
    drop(Store::open(&path).expect("store"));
    {
        let db = redb::Database::create(&path).expect("store");
        let txn = db.begin_write().expect("store");
        {
            let def: redb::TableDefinition<&[u8; 32], &[u8]> =
                redb::TableDefinition::new("tower_open_disputes");
            let mut t = txn.open_table(def).expect("store");
            let (channel, nonce) = (ChannelId::repeat_byte(7), U256::from(7u64));
            // b466c5f's layout: timeout, channel, nonce, registered.
            let old: (u64, ChannelId, U256, Option<State>) =
                (now_secs() + 60, channel, nonce, None);
            let bytes = postcard::to_extend(&old, vec![1u8]).expect("store");
            let loc = ChannelSecret {
                channel_id: channel,
                nonce,
            }
            .locator();
            t.insert(&loc.0, bytes.as_slice()).expect("store");
        }
        txn.commit().expect("store");
    }
    let opened = Store::open(&path);
    assert!(
        opened.is_ok(),
        "a store that kept a dispute under b466c5f does not open: {:?}",
        opened.err()
    );
    let store = opened.expect("open");
    store
        .mark_scanned(1, &Seen::default(), now_secs())
        .expect("a mark goes on");
}
