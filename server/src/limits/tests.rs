//! Unit tests of the pure limit rules.

use super::*;

#[test]
fn busy_answers_spread_a_burst_at_the_rate_the_node_admits() {
    let mut w = BusyWindow::default();
    // No admissions measured yet: 1,000/s is assumed, so the 3,000th refusal of a
    // second is spread over up to 3 s.
    for _ in 0..2_999 {
        w.refuse(10, 0.5);
    }
    assert_eq!(w.refuse(10, 0.0), BUSY_MIN_AFTER_MS);
    assert_eq!(w.refuse(10, 1.0), BUSY_MIN_AFTER_MS + 3_001);
    // A node that admitted 5,000 in the last second spreads the same wave over 0.6 s.
    let mut w = BusyWindow::default();
    for _ in 0..5_000 {
        w.admitted(100);
    }
    for _ in 0..2_999 {
        w.refuse(1_100, 0.5);
    }
    assert_eq!(w.refuse(1_100, 0.999_999), BUSY_MIN_AFTER_MS + 599);
    // A quiet second forgets the measured rate; the answer is never over the cap.
    assert_eq!(w.refuse(5_000, 1.0), BUSY_MIN_AFTER_MS + 1);
    let mut w = BusyWindow::default();
    for _ in 0..1_000_000 {
        w.refuse(0, 1.0);
    }
    assert_eq!(w.refuse(0, 1.0), BUSY_MAX_AFTER_MS);
}

fn publication(bytes: usize) -> Publication {
    Publication {
        offset: 1,
        epoch: "e".into(),
        data: "x".repeat(bytes).into(),
        from: None,
    }
}

#[test]
fn recovery_is_all_or_nothing() {
    let mut b = RecoveryBudget::new(100);
    assert!(b.take(&[publication(30), publication(30)]));
    assert_eq!(b.left(), 40);
    assert!(!b.take(&[publication(30), publication(30)]), "60 > 40");
    assert_eq!(b.left(), 40, "a refused channel takes nothing");
    assert!(b.take(&[publication(40)]));
    assert!(b.take(&[]), "nothing to recover always fits");
    assert!(!b.take(&[publication(1)]));
}

#[test]
fn pending_refuses_young_and_evicts_old() {
    let t0 = Instant::now();
    let mut q = PendingQueue::new(2, Duration::from_secs(1));
    assert_eq!(q.admit(t0, "a"), PendingAdmit::Admitted(0));
    assert_eq!(q.admit(t0, "b"), PendingAdmit::Admitted(1));
    // Full, and everyone is young: the newcomer is refused.
    assert_eq!(
        q.admit(t0 + Duration::from_millis(500), "c"),
        PendingAdmit::Refused
    );
    // A second later the oldest makes room.
    assert_eq!(
        q.admit(t0 + Duration::from_secs(1), "d"),
        PendingAdmit::Evicted(2, "a")
    );
    assert_eq!(q.len(), 2);
    assert_eq!(q.remove(0), None, "evicted already");
    assert_eq!(q.remove(1), Some("b"));
    assert_eq!(q.admit(t0, "e"), PendingAdmit::Admitted(3));
    assert_eq!(q.len(), 2);
}

#[test]
fn pending_can_prefer_whom_it_evicts() {
    let t0 = Instant::now();
    let second = Duration::from_secs(1);
    let silent = |s: &&str| s.starts_with("silent");
    let mut q = PendingQueue::new(3, second);
    q.admit(t0, "busy a");
    q.admit(t0, "silent b");
    q.admit(t0 + second, "silent c");
    // Only a and b are old: b, the oldest preferred one, goes.
    assert_eq!(
        q.admit_preferring(t0 + second, "d", silent),
        PendingAdmit::Evicted(3, "silent b")
    );
    // No old preferred one (c is silent but young): the oldest old one goes.
    assert_eq!(
        q.admit_preferring(t0 + second, "e", silent),
        PendingAdmit::Evicted(4, "busy a")
    );
    // All young: refused.
    assert_eq!(
        q.admit_preferring(t0 + second, "f", silent),
        PendingAdmit::Refused
    );
    assert_eq!(q.len(), 3);
}

#[test]
fn pending_with_no_budget_admits_nobody() {
    let mut q = PendingQueue::new(0, Duration::ZERO);
    assert_eq!(q.admit(Instant::now(), ()), PendingAdmit::Refused);
    assert!(q.is_empty());
}

fn budgets(connect: (f32, u32), subscribe: (f32, u32), capacity: usize) -> UserBudgets {
    UserBudgets::new(
        BucketRule::new(connect.0, connect.1),
        BucketRule::new(subscribe.0, subscribe.1),
        capacity,
        Instant::now(),
    )
}

#[test]
fn a_user_budget_is_shared_and_refills_at_its_rate() {
    let mut b = budgets((1.0, 3), (10.0, 5), 100);
    let t0 = b.epoch;
    let alice: Arc<str> = "alice".into();
    let bob: Arc<str> = "bob".into();
    let took = (0..10)
        .filter(|_| b.take(&alice, UserLimit::Connect, t0))
        .count();
    assert_eq!(took, 3, "the burst, whoever asks for it");
    assert!(
        b.take(&bob, UserLimit::Connect, t0),
        "another user is not affected"
    );
    assert!(
        b.take(&alice, UserLimit::Subscribe, t0),
        "the other budget is apart"
    );
    assert!(!b.take(&alice, UserLimit::Connect, t0 + Duration::from_millis(900)));
    assert!(b.take(&alice, UserLimit::Connect, t0 + Duration::from_millis(1000)));
    assert!(!b.take(&alice, UserLimit::Connect, t0 + Duration::from_millis(1500)));
    // Over 10 s at most 3 + 10 connects, however often it asks.
    let mut took = 0;
    for ms in (2000..12_000).step_by(10) {
        took += b.take(&alice, UserLimit::Connect, t0 + Duration::from_millis(ms)) as u32;
    }
    assert!(took <= 11, "{took}");
}

#[test]
fn without_a_limit_nothing_is_kept() {
    let mut none = budgets((0.0, 2), (0.0, 10), 100);
    let alice: Arc<str> = "alice".into();
    let t0 = none.epoch;
    assert!((0..1000).all(|_| none.take(&alice, UserLimit::Connect, t0)));
    assert!((0..1000).all(|_| none.take(&alice, UserLimit::Subscribe, t0)));
    assert!(none.is_empty());
}

#[test]
fn the_table_is_bounded() {
    let mut b = budgets((1.0, 4), (10.0, 10), 8);
    let t0 = b.epoch;
    let users: Vec<Arc<str>> = (0..100).map(|i| format!("u{i}").into()).collect();
    for (i, u) in users.iter().enumerate() {
        let now = t0 + Duration::from_millis(i as u64);
        assert!(b.take(u, UserLimit::Connect, now));
        assert!(b.len() <= 8, "{}", b.len());
    }
    assert_eq!(b.len(), 8);
    // A user who spent more is kept over one nearer to full: u99 has spent 4.
    let heavy = &users[99];
    for _ in 0..3 {
        b.take(heavy, UserLimit::Connect, t0 + Duration::from_millis(100));
    }
    let newcomer: Arc<str> = "new".into();
    assert!(b.take(
        &newcomer,
        UserLimit::Connect,
        t0 + Duration::from_millis(100)
    ));
    assert!(!b.take(heavy, UserLimit::Connect, t0 + Duration::from_millis(100)));
    // Once everyone has refilled, a newcomer sweeps them all out.
    let late = t0 + Duration::from_secs(60);
    let last: Arc<str> = "last".into();
    assert!(b.take(&last, UserLimit::Connect, late));
    assert_eq!(b.len(), 1);
}
