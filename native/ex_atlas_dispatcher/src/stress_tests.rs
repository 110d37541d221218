//! Concurrency stress tests of the plain-Rust core, the way the NIF uses it: one sharded
//! registry shared by many threads that subscribe, unsubscribe, remove whole subscribers
//! and take snapshots, and bounded `Lanes` fed by several producers and
//! drained by one sender per lane that delivers batches in slices.
//!
//! Sizes scale with `EX_ATLAS_STRESS_PERCENT` (default 100), so the same tests run under
//! valgrind (`scripts/valgrind.sh` uses 10).

use crate::fanout::{Lanes, Refused, Reservation};
use crate::registry::{partition_of, Part, Pid, Sharded, Snapshot};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier, Mutex, MutexGuard};
use std::thread;

const PARTITIONS: usize = 3;
const TOPICS: u64 = 5;

fn scaled(n: usize) -> usize {
    let percent = std::env::var("EX_ATLAS_STRESS_PERCENT")
        .ok()
        .and_then(|value| value.parse::<usize>().ok())
        .unwrap_or(100);
    (n * percent / 100).max(1)
}

/// xorshift64: deterministic per thread, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

fn topic(index: u64) -> Vec<u8> {
    format!("topic:{index}").into_bytes()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The monitor a subscriber gets: derived from the pid, so a test can tell whose it is.
fn monitor_of(pid: Pid) -> u64 {
    pid * 10 + 7
}

/// Mutators each own a disjoint range of pids and keep an exact model of them, so their
/// checks hold whatever the other threads do; snapshot threads keep snapshots across later
/// mutations and check they never change; a checker verifies every internal invariant.
#[test]
fn concurrent_mutation_and_snapshots_keep_the_registry_exact() {
    const MUTATORS: u64 = 4;
    const PIDS_PER_MUTATOR: u64 = 300;
    let ops = scaled(20_000);
    // The outer lock makes a snapshot and a count one atomic read, so the snapshot loop
    // can check one against the other; the shards' routing and invariants are the NIF's.
    let registry = Arc::new(Mutex::new(Sharded::<u64>::new(PARTITIONS)));
    let running = Arc::new(AtomicBool::new(true));
    let start = Arc::new(Barrier::new(MUTATORS as usize + 3));

    let mutators: Vec<_> = (0..MUTATORS)
        .map(|m| {
            let registry = registry.clone();
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                mutate(&registry, m, m * 1_000_000, PIDS_PER_MUTATOR, ops)
            })
        })
        .collect();

    let snapshotters: Vec<_> = (0..2u64)
        .map(|s| {
            let registry = registry.clone();
            let running = running.clone();
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                snapshot_loop(&registry, &running, s)
            })
        })
        .collect();

    let checker = {
        let registry = registry.clone();
        let running = running.clone();
        let start = start.clone();
        thread::spawn(move || {
            start.wait();
            let mut checks = 0usize;
            while running.load(Ordering::Acquire) {
                lock(&registry)
                    .check_invariants()
                    .unwrap_or_else(|error| panic!("invariant broken: {error}"));
                checks += 1;
                thread::yield_now();
            }
            checks
        })
    };

    let mut models = Vec::new();
    for mutator in mutators {
        models.push(mutator.join().expect("mutator panicked"));
    }
    running.store(false, Ordering::Release);
    let snapshots: usize = snapshotters
        .into_iter()
        .map(|s| s.join().expect("snapshotter panicked"))
        .sum();
    let checks = checker.join().expect("checker panicked");
    assert!(snapshots > 0 && checks > 0);

    // The registry holds exactly the union of the models.
    let registry = lock(&registry);
    registry.check_invariants().unwrap();
    for t in 0..TOPICS {
        let name = topic(t);
        let mut want: Vec<Pid> = models
            .iter()
            .flat_map(|model| model.iter())
            .filter(|((_, topic), _)| *topic == t)
            .flat_map(|((pid, _), n)| std::iter::repeat_n(*pid, *n))
            .collect();
        want.sort_unstable();
        let mut got: Vec<Pid> = registry
            .snapshot(&name)
            .expect("registry closed")
            .iter()
            .flat_map(|(_, part)| part.pids())
            .collect();
        got.sort_unstable();
        assert_eq!(got, want, "topic {t}");
        assert_eq!(registry.count(&name), want.len());
    }

    // Draining hands back exactly one monitor per live subscriber.
    let mut live: Vec<u64> = models
        .iter()
        .flat_map(|model| model.keys().map(|(pid, _)| monitor_of(*pid)))
        .collect();
    live.sort_unstable();
    live.dedup();
    let mut drained: Vec<u64> = registry.close().into_iter().map(|(_, m)| m).collect();
    drained.sort_unstable();
    assert_eq!(drained, live);
    assert_eq!(registry.stats(), Default::default());
}

type Model = HashMap<(Pid, u64), usize>;

fn mutate(registry: &Mutex<Sharded<u64>>, seed: u64, base: Pid, pids: u64, ops: usize) -> Model {
    let mut rng = Rng::new(seed + 1);
    let mut model: Model = HashMap::new();
    // Subscriptions per pid, all topics together.
    let mut held_by: HashMap<Pid, usize> = HashMap::new();
    for _ in 0..ops {
        let pid = base + rng.below(pids);
        let t = rng.below(TOPICS);
        let name = topic(t);
        let held = held_by.get(&pid).copied().unwrap_or(0);
        match rng.below(10) {
            0..=4 => {
                let monitored = AtomicBool::new(false);
                lock(registry)
                    .subscribe(&name, pid, || {
                        monitored.store(true, Ordering::Relaxed);
                        Some(monitor_of(pid))
                    })
                    .expect("registry closed")
                    .expect("subscribe refused");
                // A monitor is made only for a subscriber with no subscription yet.
                assert_eq!(monitored.load(Ordering::Relaxed), held == 0, "pid {pid}");
                *model.entry((pid, t)).or_default() += 1;
                *held_by.entry(pid).or_default() += 1;
            }
            5..=7 => {
                let removed = lock(registry).unsubscribe(&name, pid);
                let expected = model.remove(&(pid, t)).unwrap_or(0);
                assert_eq!(removed.count, expected, "unsubscribe pid {pid} topic {t}");
                let last = expected > 0 && expected == held;
                assert_eq!(removed.released, last.then(|| monitor_of(pid)));
                held_by.insert(pid, held - expected);
            }
            8 => {
                // The process went down.
                let removed = lock(registry).remove_subscriber(pid);
                model.retain(|(p, _), _| *p != pid);
                held_by.remove(&pid);
                assert_eq!(removed.count, held);
                let want: Vec<u64> = (held > 0).then(|| monitor_of(pid)).into_iter().collect();
                assert_eq!(removed.released, want);
            }
            _ => {
                let mut topics: Vec<Vec<u8>> = lock(registry)
                    .topics_of(pid)
                    .iter()
                    .map(|name| name.to_vec())
                    .collect();
                topics.sort_unstable();
                let mut want: Vec<Vec<u8>> = model
                    .keys()
                    .filter(|(p, _)| *p == pid)
                    .map(|(_, t)| topic(*t))
                    .collect();
                want.sort_unstable();
                assert_eq!(topics, want, "topics_of pid {pid}");
            }
        }
    }
    model
}

/// Takes snapshots, keeps up to 16 of them while the mutators go on, and re-reads each
/// before dropping it: a snapshot must read the same forever, hold `count` pids in total,
/// and put every pid in its own partition. Dropping happens here, on another thread than
/// the one that made the registry change (shared chunks are reference counted).
fn snapshot_loop(registry: &Mutex<Sharded<u64>>, running: &AtomicBool, seed: u64) -> usize {
    let mut rng = Rng::new(seed + 100);
    let mut kept: Vec<(Snapshot, SnapshotRead)> = Vec::new();
    let mut taken = 0;
    while running.load(Ordering::Acquire) {
        let name = topic(rng.below(TOPICS));
        let (snapshot, count) = {
            let registry = lock(registry);
            let snapshot = registry.snapshot(&name).expect("registry closed");
            (snapshot, registry.count(&name))
        };
        taken += 1;
        let read = read_snapshot(&snapshot);
        let total: usize = read.iter().map(|(_, pids)| pids.len()).sum();
        assert_eq!(total, count, "snapshot total vs count");
        for (partition, pids) in &read {
            assert!(pids
                .iter()
                .all(|pid| partition_of(*pid, PARTITIONS) == *partition));
        }
        kept.push((snapshot, read));
        if kept.len() > 16 {
            let (old, first_read) = kept.remove(rng.below(kept.len() as u64) as usize);
            assert_eq!(read_snapshot(&old), first_read, "a kept snapshot changed");
        }
    }
    for (old, first_read) in kept {
        assert_eq!(read_snapshot(&old), first_read, "a kept snapshot changed");
    }
    taken
}

/// A snapshot's pids, partition by partition.
type SnapshotRead = Vec<(usize, Vec<Pid>)>;

fn read_snapshot(snapshot: &Snapshot) -> SnapshotRead {
    snapshot
        .iter()
        .map(|(partition, part)| {
            let pids: Vec<Pid> = part.pids().collect();
            assert_eq!(pids.len(), part.len());
            (*partition, pids)
        })
        .collect()
}

/// One lane's batch: who dispatched it, its sequence number, and the subscribers.
struct Batch {
    producer: usize,
    seq: usize,
    part: Part,
}

/// Several producers dispatch (snapshot under the lock, one credit per lane, hand the
/// batch to the lane's sender) while churners subscribe and unsubscribe; one sender per
/// lane delivers each batch in slices from a cursor, as the NIF's sender processes do,
/// and gives the credit back. Every subscriber must see each producer's messages in
/// order, stable subscribers every one of them exactly once, and no lane may ever hold
/// more than its capacity.
#[test]
fn fanout_with_several_producers_keeps_order_bound_and_credits() {
    const PRODUCERS: usize = 4;
    const CAPACITY: usize = 3;
    const STABLE: u64 = 600;
    let dispatches = scaled(3_000);
    let name = topic(0);
    let registry = Arc::new(Sharded::<u64>::new(PARTITIONS));
    let lanes = Arc::new(Lanes::new(PARTITIONS, CAPACITY));
    let over_bound = Arc::new(AtomicUsize::new(0));

    // Stable subscribers, there from the start to the end; one of them twice.
    for pid in 0..STABLE {
        registry
            .subscribe(&name, pid, || Some(pid))
            .unwrap()
            .unwrap();
    }
    registry.subscribe(&name, 0, || Some(0)).unwrap().unwrap();

    let mut senders = Vec::new();
    let mut inboxes = Vec::new();
    for lane in 0..PARTITIONS {
        let (tx, rx) = mpsc::channel::<Batch>();
        inboxes.push(tx);
        let lanes = lanes.clone();
        let over_bound = over_bound.clone();
        senders.push(thread::spawn(move || {
            deliver_loop(lane, rx, &lanes, CAPACITY, &over_bound)
        }));
    }

    // Churners change the topic once per dispatch taken, so that they run for the whole
    // test without starving the producers: a change to a part a batch still holds copies
    // it, and under valgrind, which runs one thread at a time, two churners spinning
    // freely left the producers almost no turns.
    let running = Arc::new(AtomicBool::new(true));
    let taken = Arc::new(AtomicUsize::new(0));
    let churners: Vec<_> = (0..2u64)
        .map(|c| {
            let registry = registry.clone();
            let running = running.clone();
            let taken = taken.clone();
            let name = name.clone();
            thread::spawn(move || {
                let mut rng = Rng::new(c + 500);
                let base = 1_000_000 * (c + 1);
                let (mut last, mut changes) = (0, 0_usize);
                while running.load(Ordering::Acquire) {
                    let now = taken.load(Ordering::Acquire);
                    if now == last {
                        thread::yield_now();
                        continue;
                    }
                    last = now;
                    let pid = base + rng.below(200);
                    if rng.below(2) == 0 {
                        registry
                            .subscribe(&name, pid, || Some(pid))
                            .unwrap()
                            .unwrap();
                    } else {
                        registry.remove_subscriber(pid);
                    }
                    changes += 1;
                }
                changes
            })
        })
        .collect();

    let producers: Vec<_> = (0..PRODUCERS)
        .map(|producer| {
            let registry = registry.clone();
            let lanes = lanes.clone();
            let inboxes = inboxes.clone();
            let taken = taken.clone();
            let name = name.clone();
            thread::spawn(move || {
                for seq in 0..dispatches {
                    let snapshot = registry.snapshot(&name).expect("registry closed");
                    taken.fetch_add(1, Ordering::Release);
                    for (lane, part) in snapshot {
                        // As the NIF: try without waiting, then queue and wait to be woken.
                        match lanes.try_reserve(lane) {
                            Ok(()) => {}
                            Err(Refused::Full) => reserve_waiting(&lanes, lane).expect("closed"),
                            Err(Refused::Closed) => panic!("lanes closed"),
                        }
                        let batch = Batch {
                            producer,
                            seq,
                            part,
                        };
                        inboxes[lane].send(batch).expect("sender gone");
                    }
                }
            })
        })
        .collect();

    for producer in producers {
        producer.join().expect("producer panicked");
    }
    running.store(false, Ordering::Release);
    let changes: Vec<usize> = churners
        .into_iter()
        .map(|churner| churner.join().expect("churner panicked"))
        .collect();
    eprintln!(
        "churn: {changes:?} changes during {} dispatches",
        PRODUCERS * dispatches
    );
    assert!(
        changes.iter().all(|&n| n > 0),
        "a churner never ran beside the producers: {changes:?}"
    );
    drop(inboxes);
    let mut seen: HashMap<Pid, Vec<(usize, usize)>> = HashMap::new();
    for sender in senders {
        seen.extend(sender.join().expect("sender panicked"));
    }

    assert_eq!(
        over_bound.load(Ordering::Relaxed),
        0,
        "a lane went over its bound"
    );
    let stats = lanes.stats();
    assert_eq!(stats.in_flight, 0, "credits not all given back");
    assert!(stats.peak <= CAPACITY);
    assert_eq!(stats.waiting, 0);

    for (pid, messages) in &seen {
        for producer in 0..PRODUCERS {
            let seqs: Vec<usize> = messages
                .iter()
                .filter(|(p, _)| *p == producer)
                .map(|(_, s)| *s)
                .collect();
            if *pid == 0 {
                // Subscribed twice: every message twice, back to back.
                let want: Vec<usize> = (0..dispatches).flat_map(|s| [s, s]).collect();
                assert_eq!(seqs, want, "pid 0, producer {producer}");
            } else if *pid < STABLE {
                assert_eq!(seqs, (0..dispatches).collect::<Vec<_>>(), "pid {pid}");
            } else {
                // Churned: any subset, in order; a pid the churner subscribed more than once
                // gets a message once per subscription, back to back.
                assert!(
                    seqs.windows(2).all(|w| w[0] <= w[1]),
                    "pid {pid} producer {producer} out of order: {seqs:?}"
                );
            }
        }
    }
    for pid in 0..STABLE {
        assert!(seen.contains_key(&pid), "stable pid {pid} got nothing");
    }
}

/// A lane's sender: delivers each batch in slices of varying size from a cursor, the way
/// the NIF resumes a batch across calls, then gives the lane its credit back.
fn deliver_loop(
    lane: usize,
    inbox: mpsc::Receiver<Batch>,
    lanes: &Lanes<Wake>,
    capacity: usize,
    over_bound: &AtomicUsize,
) -> HashMap<Pid, Vec<(usize, usize)>> {
    let mut rng = Rng::new(lane as u64 + 900);
    let mut seen: HashMap<Pid, Vec<(usize, usize)>> = HashMap::new();
    for batch in inbox {
        if lanes.stats().max_in_flight > capacity {
            over_bound.fetch_add(1, Ordering::Relaxed);
        }
        let mut cursor = 0;
        let mut delivered = Vec::with_capacity(batch.part.len());
        while cursor < batch.part.len() {
            let slice = 1 + rng.below(700) as usize;
            let before = delivered.len();
            delivered.extend(batch.part.pids_from(cursor).take(slice));
            cursor += delivered.len() - before;
        }
        assert_eq!(
            delivered,
            batch.part.pids().collect::<Vec<_>>(),
            "slices differ"
        );
        for pid in delivered {
            assert_eq!(partition_of(pid, PARTITIONS), lane, "pid in the wrong lane");
            seen.entry(pid)
                .or_default()
                .push((batch.producer, batch.seq));
        }
        lanes.release(lane, wake);
    }
    seen
}

/// A waiting producer thread: woken by a message on its channel, as a producer process is
/// woken by a message in its mailbox.
type Wake = mpsc::Sender<()>;

fn wake(waiter: &Wake) -> bool {
    waiter.send(()).is_ok()
}

/// Takes a credit of `lane`, queueing and waiting for a grant when it is full.
fn reserve_waiting(lanes: &Lanes<Wake>, lane: usize) -> Result<(), Refused> {
    let (me, woken) = mpsc::channel();
    match lanes.reserve_or_queue(lane, me, wake)? {
        Reservation::Taken => Ok(()),
        // A closed channel: `close` dropped the waiter without a grant.
        Reservation::Queued => woken.recv().map_err(|_| Refused::Closed),
    }
}

/// Many producers wait for room in full lanes; closing wakes every one of them with
/// `Closed`, and no credit is taken after that.
#[test]
fn close_wakes_every_waiting_producer() {
    const WAITERS: usize = 16;
    let rounds = scaled(20);
    for _ in 0..rounds {
        let lanes = Arc::new(Lanes::new(2, 1));
        lanes.try_reserve(0).unwrap();
        lanes.try_reserve(1).unwrap();
        let waiters: Vec<_> = (0..WAITERS)
            .map(|w| {
                let lanes = lanes.clone();
                thread::spawn(move || reserve_waiting(&lanes, w % 2))
            })
            .collect();
        while lanes.stats().waiting < WAITERS {
            thread::yield_now();
        }
        // Dropping the waiters it hands back is what tells their threads here.
        drop(lanes.close());
        for waiter in waiters {
            assert_eq!(waiter.join().unwrap(), Err(Refused::Closed));
        }
        assert_eq!(lanes.stats().in_flight, 2);
        assert_eq!(lanes.try_reserve(0), Err(Refused::Closed));
    }
}

/// Releases from several threads while producers reserve: every credit taken comes back,
/// and no lane ever reports more than its capacity in flight.
#[test]
fn credits_balance_under_concurrent_reserve_and_release() {
    const CAPACITY: usize = 2;
    let per_producer = scaled(20_000);
    let lanes = Arc::new(Lanes::new(2, CAPACITY));
    let (tx, rx) = mpsc::sync_channel::<usize>(64);
    let rx = Arc::new(Mutex::new(rx));
    let releasers: Vec<_> = (0..3)
        .map(|_| {
            let lanes = lanes.clone();
            let rx = rx.clone();
            thread::spawn(move || {
                let mut released = 0usize;
                loop {
                    let lane = match lock(&rx).recv() {
                        Ok(lane) => lane,
                        Err(_) => break released,
                    };
                    assert!(lanes.stats().max_in_flight <= CAPACITY);
                    lanes.release(lane, wake);
                    released += 1;
                }
            })
        })
        .collect();
    let producers: Vec<_> = (0..4)
        .map(|p| {
            let lanes = lanes.clone();
            let tx = tx.clone();
            thread::spawn(move || {
                for i in 0..per_producer {
                    let lane = (p + i) % 2;
                    reserve_waiting(&lanes, lane).unwrap();
                    tx.send(lane).unwrap();
                }
            })
        })
        .collect();
    for producer in producers {
        producer.join().unwrap();
    }
    drop(tx);
    let released: usize = releasers.into_iter().map(|r| r.join().unwrap()).sum();
    assert_eq!(released, 4 * per_producer);
    let stats = lanes.stats();
    assert_eq!(stats.in_flight, 0);
    assert_eq!(stats.delivered, (4 * per_producer) as u64);
    assert!(stats.peak <= CAPACITY);
}

/// Threads that share their pids subscribe, unsubscribe and remove them over topics in
/// every stripe at once, as a process, the watchdog evicting it and its monitor's `down`
/// may: every monitor made is handed back exactly once, by the call that removed the
/// pid's last subscription or by `close`, and each watch counts the stripes recording it.
#[test]
fn one_monitor_per_subscriber_across_stripes_under_contention() {
    const THREADS: u64 = 4;
    const PIDS: u64 = 40;
    let ops = scaled(40_000);
    let registry = Arc::new(Sharded::<u64>::new(2));
    let topics: Vec<Vec<u8>> = (0..32)
        .map(|t| format!("spread:{t}").into_bytes())
        .collect();
    let stripes: HashSet<usize> = topics.iter().map(|t| registry.stripe_of(t)).collect();
    assert!(
        stripes.len() > 4,
        "the topics cover {} stripes",
        stripes.len()
    );
    let next_monitor = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(THREADS as usize));

    let workers: Vec<_> = (0..THREADS)
        .map(|w| {
            let (registry, next_monitor, start) =
                (registry.clone(), next_monitor.clone(), start.clone());
            let topics = topics.clone();
            thread::spawn(move || {
                let mut rng = Rng::new(w + 900);
                let (mut made, mut released) = (Vec::new(), Vec::new());
                start.wait();
                for _ in 0..ops {
                    let pid = rng.below(PIDS) * 16 + 3;
                    let topic = &topics[rng.below(topics.len() as u64) as usize];
                    match rng.below(10) {
                        0..=5 => {
                            registry
                                .subscribe(topic, pid, || {
                                    let monitor = next_monitor.fetch_add(1, Ordering::Relaxed);
                                    made.push(monitor);
                                    Some(monitor)
                                })
                                .unwrap()
                                .unwrap();
                        }
                        6..=8 => released.extend(registry.unsubscribe(topic, pid).released),
                        _ => released.extend(registry.remove_subscriber(pid).released),
                    }
                }
                (made, released)
            })
        })
        .collect();

    let (mut made, mut released) = (Vec::new(), Vec::new());
    for worker in workers {
        let (m, r) = worker.join().expect("worker panicked");
        made.extend(m);
        released.extend(r);
    }
    registry.check_invariants().unwrap();
    let watched = registry.stats().subscribers;
    released.extend(registry.close().into_iter().map(|(_, monitor)| monitor));
    made.sort_unstable();
    released.sort_unstable();
    assert!(
        made.len() > PIDS as usize,
        "only {} monitors made",
        made.len()
    );
    // Every monitor handed back exactly once; on failure, name the first that was not
    // (the lists run to tens of thousands).
    let mismatch = made.iter().zip(&released).find(|(m, r)| m != r);
    assert!(
        released == made,
        "{} monitors made, {} handed back; first difference (made, handed back): {mismatch:?}",
        made.len(),
        released.len()
    );
    assert!(watched <= PIDS as usize);
}
