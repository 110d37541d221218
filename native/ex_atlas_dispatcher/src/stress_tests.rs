//! Concurrency stress tests of the plain-Rust core, the way the NIF uses it: one sharded
//! registry shared by many threads that subscribe, unsubscribe, remove whole subscribers,
//! take snapshots and close it, with no lock of the tests' own around it; and dispatches
//! split by `route`, handed over through `Lanes` and `Handoff` or sent by their producer,
//! delivered by one sender per lane in slices.
//!
//! Sizes scale with `EX_ATLAS_STRESS_PERCENT` (default 100), so the same tests run under
//! valgrind (`scripts/valgrind.sh` uses 10).

use crate::fanout::{Lanes, Refused, Reservation};
use crate::handoff::{self, Handed, Handoff, Tracked};
use crate::registry::{partition_of, Part, Pid, Sharded, Snapshot};
use crate::route;
use crate::sync::AtomicBool;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier, Mutex, MutexGuard, RwLock};
use std::thread;
use std::time::Duration;

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

const MUTATORS: usize = 4;
/// Each mutator's pids are `MUTATOR_PIDS * m + 0..PIDS_PER_MUTATOR`.
const MUTATOR_PIDS: Pid = 1_000_000;
const PIDS_PER_MUTATOR: u64 = 300;

/// Where a subscription lives: its lane (`partition_of`), or the direct partition, whose
/// index is `PARTITIONS` (`Sharded::direct`).
fn partition(pid: Pid, direct: bool) -> usize {
    if direct {
        PARTITIONS
    } else {
        partition_of(pid, PARTITIONS)
    }
}

/// A multiset of pids in one partition of one topic, as a sum of pseudo-random weights and
/// a count: two different multisets of a few hundred pids practically never agree.
type Digest = (u64, u32);

/// One mutator's pids in every topic and partition.
type Digests = [[Digest; PARTITIONS + 1]; TOPICS as usize];

fn weight(pid: Pid) -> u64 {
    // splitmix64's finaliser.
    let mut x = pid.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn count_in(digest: &mut Digest, pid: Pid, times: usize) {
    digest.0 = digest
        .0
        .wrapping_add(weight(pid).wrapping_mul(times as u64));
    digest.1 += times as u32;
}

fn count_out(digest: &mut Digest, pid: Pid, times: usize) {
    digest.0 = digest
        .0
        .wrapping_sub(weight(pid).wrapping_mul(times as u64));
    digest.1 -= times as u32;
}

/// A snapshot as a snapshot thread saw it: its topic, each mutator's progress (calls
/// finished) just before and just after it was taken, and each mutator's pids in it.
struct Observation {
    topic: usize,
    before: [usize; MUTATORS],
    after: [usize; MUTATORS],
    seen: [[Digest; PARTITIONS + 1]; MUTATORS],
}

/// Mutators each own a disjoint range of pids and keep an exact model of them, so their
/// checks hold whatever the other threads do. Nothing of the test's own stands between
/// them and the registry: they race each other for the shards' and the watch tables'
/// locks, and the snapshot threads race them all. Checked:
///
/// * every call's answer (counts, monitors made and handed back, topics) is exact;
/// * every snapshot, partition by partition (it takes the lanes one after the other),
///   holds what that partition held at some moment while it was taken: each mutator's
///   pids in it are those of a state between the calls it had finished before and the
///   call it was making after. A subscription half-made, lost, or seen twice fails;
/// * a snapshot never changes afterwards (copy-on-write), and puts every pid in its own
///   partition;
/// * every internal invariant, at rest: the cross-shard ones (a subscriber's watch counts
///   the stripes that hold it) are not atomic, so a checker now and then takes a gate
///   that every mutator call holds shared, waits for the calls in progress, and checks;
/// * at the end, the registry holds exactly the union of the models, and `close` hands
///   back one monitor per live subscriber.
#[test]
fn concurrent_mutation_and_snapshots_keep_the_registry_exact() {
    let ops = scaled(20_000);
    let registry = Arc::new(Sharded::<u64>::new(PARTITIONS));
    let progress: Arc<[AtomicUsize; MUTATORS]> = Arc::new(Default::default());
    let gate = Arc::new(RwLock::new(()));
    let running = Arc::new(AtomicBool::new(true));
    let start = Arc::new(Barrier::new(MUTATORS + 3));

    let mutators: Vec<_> = (0..MUTATORS)
        .map(|m| {
            let (registry, progress, gate, start) = (
                registry.clone(),
                progress.clone(),
                gate.clone(),
                start.clone(),
            );
            thread::spawn(move || {
                start.wait();
                mutate(&registry, &gate, &progress[m], m, ops)
            })
        })
        .collect();

    let snapshotters: Vec<_> = (0..2u64)
        .map(|s| {
            let (registry, progress, running, start) = (
                registry.clone(),
                progress.clone(),
                running.clone(),
                start.clone(),
            );
            thread::spawn(move || {
                start.wait();
                snapshot_loop(&registry, &progress, &running, s)
            })
        })
        .collect();

    let checker = {
        let (registry, gate, running, start) = (
            registry.clone(),
            gate.clone(),
            running.clone(),
            start.clone(),
        );
        thread::spawn(move || {
            start.wait();
            let mut checks = 0usize;
            while running.load(Ordering::Acquire) {
                {
                    let _alone = gate.write().unwrap_or_else(|p| p.into_inner());
                    registry
                        .check_invariants()
                        .unwrap_or_else(|error| panic!("invariant broken: {error}"));
                }
                checks += 1;
                thread::sleep(Duration::from_millis(1));
            }
            checks
        })
    };

    let mut models = Vec::new();
    let mut histories = Vec::new();
    for mutator in mutators {
        let (model, history) = mutator.join().expect("mutator panicked");
        models.push(model);
        histories.push(history);
    }
    running.store(false, Ordering::Release);
    let observations: Vec<Observation> = snapshotters
        .into_iter()
        .flat_map(|s| s.join().expect("snapshotter panicked"))
        .collect();
    let checks = checker.join().expect("checker panicked");
    assert!(checks > 0, "the checker never ran");
    let raced = observations.iter().filter(|o| o.before != o.after).count();
    eprintln!(
        "{} snapshots checked, {raced} of them taken while a mutator made calls; {checks} \
         invariant checks",
        observations.len()
    );
    assert!(raced > 0, "no snapshot overlapped a mutation");

    for (n, observation) in observations.iter().enumerate() {
        for (m, history) in histories.iter().enumerate() {
            let from = observation.before[m];
            let to = (observation.after[m] + 1).min(history.len() - 1);
            for (p, &seen) in observation.seen[m].iter().enumerate() {
                let held = (from..=to).any(|v| history[v][observation.topic][p] == seen);
                assert!(
                    held,
                    "snapshot {n} of topic {} holds in partition {p} mutator {m}'s pids as \
                     {seen:?}, a state it never had between its calls {from} and {to}: {:?}",
                    observation.topic,
                    (from..=to)
                        .map(|v| history[v][observation.topic][p])
                        .collect::<Vec<_>>()
                );
            }
        }
    }

    // The registry holds exactly the union of the models.
    registry.check_invariants().unwrap();
    for t in 0..TOPICS {
        let name = topic(t);
        let mut want: Vec<(usize, Pid)> = models
            .iter()
            .flat_map(|model| model.iter())
            .filter(|((_, topic, _), _)| *topic == t)
            .flat_map(|((pid, _, direct), n)| {
                std::iter::repeat_n((partition(*pid, *direct), *pid), *n)
            })
            .collect();
        want.sort_unstable();
        let mut got: Vec<(usize, Pid)> = registry
            .snapshot(&name)
            .expect("registry closed")
            .iter()
            .flat_map(|(partition, part)| part.pids().map(move |pid| (*partition, pid)))
            .collect();
        got.sort_unstable();
        assert_eq!(got, want, "topic {t}");
        assert_eq!(registry.count(&name), want.len());
    }

    // Draining hands back exactly one monitor per live subscriber.
    let mut live: Vec<u64> = models
        .iter()
        .flat_map(|model| model.keys().map(|(pid, _, _)| monitor_of(*pid)))
        .collect();
    live.sort_unstable();
    live.dedup();
    let mut drained: Vec<u64> = registry.close().into_iter().map(|(_, m)| m).collect();
    drained.sort_unstable();
    assert_eq!(drained, live);
    assert_eq!(registry.stats(), Default::default());
}

/// Subscriptions of each (pid, topic, direct partition or not).
type Model = HashMap<(Pid, u64, bool), usize>;

/// Mutator `m`'s calls on its own pids, each checked against its model. Returns the model
/// and the history of its pids in the registry: entry `v` is what they were once `v`
/// calls were finished (`progress` says how many are).
fn mutate(
    registry: &Sharded<u64>,
    gate: &RwLock<()>,
    progress: &AtomicUsize,
    m: usize,
    ops: usize,
) -> (Model, Vec<Digests>) {
    let mut rng = Rng::new(m as u64 + 1);
    let base = MUTATOR_PIDS * m as u64;
    let mut model: Model = HashMap::new();
    // Subscriptions per pid, all topics and partitions together.
    let mut held_by: HashMap<Pid, usize> = HashMap::new();
    let mut digests: Digests = Default::default();
    let mut history = Vec::with_capacity(ops + 1);
    history.push(digests);
    for done in 1..=ops {
        let pid = base + rng.below(PIDS_PER_MUTATOR);
        let t = rng.below(TOPICS);
        let name = topic(t);
        let held = held_by.get(&pid).copied().unwrap_or(0);
        let _open = gate.read().unwrap_or_else(|p| p.into_inner());
        match rng.below(10) {
            choice @ 0..=4 => {
                // One in five in the direct partition, as an off-heap subscriber.
                let direct = choice == 4;
                let monitored = AtomicBool::new(false);
                let monitor = || {
                    monitored.store(true, Ordering::Relaxed);
                    Some(monitor_of(pid))
                };
                let subscribed = if direct {
                    registry.subscribe_direct(&name, pid, monitor)
                } else {
                    registry.subscribe(&name, pid, monitor)
                };
                subscribed
                    .expect("registry closed")
                    .expect("subscribe refused");
                // A monitor is made only for a subscriber with no subscription yet.
                assert_eq!(monitored.load(Ordering::Relaxed), held == 0, "pid {pid}");
                *model.entry((pid, t, direct)).or_default() += 1;
                *held_by.entry(pid).or_default() += 1;
                count_in(&mut digests[t as usize][partition(pid, direct)], pid, 1);
            }
            5..=7 => {
                let removed = registry.unsubscribe(&name, pid);
                let mut expected = 0;
                for direct in [false, true] {
                    let n = model.remove(&(pid, t, direct)).unwrap_or(0);
                    count_out(&mut digests[t as usize][partition(pid, direct)], pid, n);
                    expected += n;
                }
                assert_eq!(removed.count, expected, "unsubscribe pid {pid} topic {t}");
                let last = expected > 0 && expected == held;
                let want: Vec<u64> = last.then(|| monitor_of(pid)).into_iter().collect();
                assert_eq!(removed.released, want);
                held_by.insert(pid, held - expected);
            }
            8 => {
                // The process went down.
                let removed = registry.remove_subscriber(pid);
                model.retain(|&(p, t, direct), n| {
                    if p == pid {
                        count_out(&mut digests[t as usize][partition(pid, direct)], pid, *n);
                    }
                    p != pid
                });
                held_by.remove(&pid);
                assert_eq!(removed.count, held);
                let want: Vec<u64> = (held > 0).then(|| monitor_of(pid)).into_iter().collect();
                assert_eq!(removed.released, want);
            }
            _ => {
                let mut topics: Vec<Vec<u8>> = registry
                    .topics_of(pid)
                    .iter()
                    .map(|name| name.to_vec())
                    .collect();
                topics.sort_unstable();
                let mut want: Vec<Vec<u8>> = model
                    .keys()
                    .filter(|(p, _, _)| *p == pid)
                    .map(|(_, t, _)| topic(*t))
                    .collect();
                want.sort_unstable();
                want.dedup();
                assert_eq!(topics, want, "topics_of pid {pid}");
            }
        }
        history.push(digests);
        progress.store(done, Ordering::Release);
    }
    (model, history)
}

/// Most observations a snapshot thread keeps for the final check (about 300 bytes each).
const OBSERVATIONS: usize = 50_000;

/// Takes snapshots, each between two reads of the mutators' progress, keeps up to 16 of
/// them while the mutators go on, and re-reads each before dropping it: a snapshot must
/// read the same forever and put every pid in its own partition. Dropping happens here,
/// on another thread than the one that made the registry change (shared chunks are
/// reference counted).
fn snapshot_loop(
    registry: &Sharded<u64>,
    progress: &[AtomicUsize; MUTATORS],
    running: &AtomicBool,
    seed: u64,
) -> Vec<Observation> {
    let mut rng = Rng::new(seed + 100);
    let mut kept: Vec<(Snapshot, SnapshotRead)> = Vec::new();
    let mut observations = Vec::new();
    let finished = || progress.each_ref().map(|p| p.load(Ordering::Acquire));
    while running.load(Ordering::Acquire) {
        let t = rng.below(TOPICS);
        let before = finished();
        let snapshot = registry.snapshot(&topic(t)).expect("registry closed");
        let after = finished();
        let read = read_snapshot(&snapshot);
        let mut seen = [[Digest::default(); PARTITIONS + 1]; MUTATORS];
        for (partition, pids) in &read {
            for &pid in pids {
                assert!(
                    *partition == PARTITIONS || partition_of(pid, PARTITIONS) == *partition,
                    "pid {pid} in partition {partition}"
                );
                count_in(&mut seen[(pid / MUTATOR_PIDS) as usize][*partition], pid, 1);
            }
        }
        if observations.len() < OBSERVATIONS {
            observations.push(Observation {
                topic: t as usize,
                before,
                after,
                seen,
            });
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
    observations
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

/// One lane's share of one dispatch on its way, as the NIF's `nif::lanes::Batch`: who
/// dispatched it, its number among that producer's dispatches, its subscribers, how far
/// its sender got, whether it is finished.
struct Batch {
    producer: usize,
    seq: usize,
    part: Part,
    cursor: AtomicUsize,
    done: AtomicBool,
}

impl Tracked for Batch {
    fn producer(&self) -> handoff::Pid {
        // As the NIF's: the producer's pid (0 is "nobody" to the hand-over).
        self.producer as handoff::Pid + 1
    }

    fn done(&self) -> &AtomicBool {
        &self.done
    }
}

/// The messages each subscriber received, in arrival order, as (producer, seq): a queue
/// per pid, filled by whichever thread sends, as an on-heap message queue takes each
/// message at the moment it is sent.
struct Inboxes(HashMap<Pid, Mutex<Vec<(usize, usize)>>>);

impl Inboxes {
    fn send(&self, pid: Pid, producer: usize, seq: usize) {
        let inbox = self.0.get(&pid).expect("a pid of the test");
        lock(inbox).push((producer, seq));
    }
}

/// Producers dispatch to a big topic and a small one the way `dispatch_to` does: the
/// snapshot is split by `route::route`, the parts for the lanes are handed over
/// (`Lanes` credit, then `Handoff::hand` to the lane's sender), and the rest the producer
/// sends itself: the direct partition always, and a small dispatch's lane parts where it
/// is clear of the lane (`lanes.is_idle(lane) || handoff.clear_for(producer)`, as
/// `Dispatcher::clear_for`). One sender thread per lane delivers each batch in slices
/// from its cursor and finishes it as `advance` does (`finish`, then `release`), while
/// churners subscribe and unsubscribe. The small topic's subscribers are also the big
/// one's, so a producer's small dispatch often finds its big one still on its way.
///
/// Every subscriber must get each producer's messages in dispatch order (stable
/// subscribers exactly the dispatches to their topics, whoever sent them), no lane may
/// hold more than its capacity, and at the end no credit, parked batch or record is left.
/// The senders' mailboxes are `mpsc` channels, as Erlang orders messages from one
/// process to another; what is tested is which thread sends what, and when.
#[test]
fn producers_order_holds_through_route_handoff_and_lanes() {
    const PRODUCERS: usize = 3;
    const CAPACITY: usize = 3;
    const STABLE: u64 = 300;
    /// Stable subscribers of the small topic too (it stays within `INLINE` on the lanes
    /// but for the churners' few).
    const SMALL: u64 = 10;
    const INLINE: usize = 16;
    /// An off-heap subscriber, in the direct partition, of both topics.
    const DIRECT: Pid = 10_000;
    let dispatches = scaled(2_000);
    let (big, small) = (b"fanout:big".to_vec(), b"fanout:small".to_vec());
    let registry = Arc::new(Sharded::<u64>::new(PARTITIONS));
    let lanes: Arc<Lanes<Wake>> = Arc::new(Lanes::new(PARTITIONS, CAPACITY));
    let handoffs: Arc<Vec<Handoff<Arc<Batch>, ()>>> =
        Arc::new((0..PARTITIONS).map(|_| Handoff::new()).collect());
    let over_bound = Arc::new(AtomicUsize::new(0));

    let churned = |c: u64, k: u64| MUTATOR_PIDS * (c + 1) + k;
    let mut inboxes = HashMap::new();
    for pid in (0..STABLE)
        .chain([DIRECT])
        .chain((0..2).flat_map(|c| (0..200).map(move |k| churned(c, k))))
    {
        inboxes.insert(pid, Mutex::new(Vec::new()));
    }
    let inboxes = Arc::new(Inboxes(inboxes));
    for pid in 0..STABLE {
        registry
            .subscribe(&big, pid, || Some(pid))
            .unwrap()
            .unwrap();
        if pid < SMALL {
            registry
                .subscribe(&small, pid, || Some(pid))
                .unwrap()
                .unwrap();
        }
    }
    for name in [&big, &small] {
        registry
            .subscribe_direct(name, DIRECT, || Some(DIRECT))
            .unwrap()
            .unwrap();
    }

    let mut mailboxes = Vec::new();
    let mut senders = Vec::new();
    for lane in 0..PARTITIONS {
        let (tx, rx) = mpsc::channel::<Arc<Batch>>();
        mailboxes.push(tx);
        // Sender pids: lane + 1.
        handoffs[lane].install(lane as handoff::Pid + 1);
        let (lanes, handoffs, inboxes, over_bound) = (
            lanes.clone(),
            handoffs.clone(),
            inboxes.clone(),
            over_bound.clone(),
        );
        senders.push(thread::spawn(move || {
            let mut rng = Rng::new(lane as u64 + 900);
            for batch in rx {
                if lanes.stats().max_in_flight > CAPACITY {
                    over_bound.fetch_add(1, Ordering::Relaxed);
                }
                // One `deliver/2` call per slice, then `advance`.
                loop {
                    let start = batch.cursor.load(Ordering::Acquire);
                    let slice = 1 + rng.below(150) as usize;
                    let mut sent = 0;
                    for pid in batch.part.pids_from(start).take(slice) {
                        assert_eq!(partition_of(pid, PARTITIONS), lane, "pid in the wrong lane");
                        inboxes.send(pid, batch.producer, batch.seq);
                        sent += 1;
                    }
                    let next = start + sent;
                    batch.cursor.store(next, Ordering::Release);
                    if next >= batch.part.len() {
                        if !batch.done.swap(true, Ordering::AcqRel) {
                            handoffs[lane].finish(&batch);
                            lanes.release(lane, wake);
                        }
                        break;
                    }
                }
            }
        }));
    }

    // Churners change the topics once per dispatch taken, so that they run for the whole
    // test without starving the producers: a change to a part a batch still holds copies
    // it, and under valgrind, which runs one thread at a time, two churners spinning
    // freely left the producers almost no turns. The small topic gets two pids of each.
    let running = Arc::new(AtomicBool::new(true));
    let taken = Arc::new(AtomicUsize::new(0));
    let churners: Vec<_> = (0..2u64)
        .map(|c| {
            let (registry, running, taken) = (registry.clone(), running.clone(), taken.clone());
            let (big, small) = (big.clone(), small.clone());
            thread::spawn(move || {
                let mut rng = Rng::new(c + 500);
                let (mut last, mut changes) = (0, 0_usize);
                while running.load(Ordering::Acquire) {
                    let now = taken.load(Ordering::Acquire);
                    if now == last {
                        thread::yield_now();
                        continue;
                    }
                    last = now;
                    let (name, pid) = match rng.below(4) {
                        0 => (&small, churned(c, rng.below(2))),
                        _ => (&big, churned(c, rng.below(200))),
                    };
                    if rng.below(2) == 0 {
                        registry
                            .subscribe(name, pid, || Some(pid))
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
            let (registry, lanes, handoffs, inboxes, taken) = (
                registry.clone(),
                lanes.clone(),
                handoffs.clone(),
                inboxes.clone(),
                taken.clone(),
            );
            let mailboxes = mailboxes.clone();
            let (big, small) = (big.clone(), small.clone());
            thread::spawn(move || {
                let mut rng = Rng::new(producer as u64 + 700);
                let me = producer as handoff::Pid + 1;
                let mut to_big = Vec::with_capacity(dispatches);
                let (mut inline_parts, mut handed) = (0_usize, 0_usize);
                for seq in 0..dispatches {
                    let is_big = rng.below(3) == 0;
                    to_big.push(is_big);
                    let name = if is_big { &big } else { &small };
                    let snapshot = registry.snapshot(name).expect("registry closed");
                    taken.fetch_add(1, Ordering::Release);
                    let work = route::route(snapshot, registry.direct(), INLINE, |lane| {
                        lanes.is_idle(lane) || handoffs[lane].clear_for(me)
                    });
                    // Hand-overs first, as `proceed`.
                    for (lane, part, start) in work.hand_over {
                        match lanes.try_reserve(lane) {
                            Ok(()) => {}
                            Err(Refused::Full) => reserve_waiting(&lanes, lane).expect("closed"),
                            Err(Refused::Closed) => panic!("lanes closed"),
                        }
                        let batch = Arc::new(Batch {
                            producer,
                            seq,
                            part,
                            cursor: AtomicUsize::new(start),
                            done: AtomicBool::new(false),
                        });
                        let handed_to = handoffs[lane].hand(
                            batch,
                            |pid, batch| mailboxes[pid as usize - 1].send(batch.clone()).is_ok(),
                            |_| (),
                        );
                        assert_eq!(handed_to, Handed::Sent, "no sender dies here");
                        handed += 1;
                    }
                    for (part, start) in work.inline {
                        for pid in part.pids_from(start) {
                            inboxes.send(pid, producer, seq);
                        }
                        inline_parts += 1;
                    }
                }
                (to_big, inline_parts, handed)
            })
        })
        .collect();

    let mut to_big = Vec::new();
    let (mut inline_parts, mut handed) = (0, 0);
    for producer in producers {
        let (topics, inline, batches) = producer.join().expect("producer panicked");
        to_big.push(topics);
        inline_parts += inline;
        handed += batches;
    }
    running.store(false, Ordering::Release);
    let changes: Vec<usize> = churners
        .into_iter()
        .map(|churner| churner.join().expect("churner panicked"))
        .collect();
    drop(mailboxes);
    for sender in senders {
        sender.join().expect("sender panicked");
    }
    eprintln!(
        "churn: {changes:?} changes; {handed} batches handed over, {inline_parts} parts sent \
         by their producer, in {} dispatches",
        PRODUCERS * dispatches
    );
    assert!(
        changes.iter().all(|&n| n > 0),
        "a churner never ran beside the producers: {changes:?}"
    );
    // Both routes were taken, for lanes too (the direct part alone is one inline part
    // per dispatch).
    assert!(handed > 0 && inline_parts > PRODUCERS * dispatches);

    assert_eq!(
        over_bound.load(Ordering::Relaxed),
        0,
        "a lane went over its bound"
    );
    let stats = lanes.stats();
    assert_eq!(stats.in_flight, 0, "credits not all given back");
    assert!(stats.peak <= CAPACITY);
    assert_eq!(stats.waiting, 0);
    assert_eq!(stats.delivered, handed as u64);
    for handoff in handoffs.iter() {
        assert_eq!(handoff.parked(), 0);
        assert_eq!(handoff.producers(), 0, "a finished batch stayed recorded");
    }

    for (pid, inbox) in &inboxes.0 {
        let messages = lock(inbox);
        for (producer, to_big) in to_big.iter().enumerate() {
            let seqs: Vec<usize> = messages
                .iter()
                .filter(|(p, _)| *p == producer)
                .map(|(_, s)| *s)
                .collect();
            let subscribed_to_small = *pid == DIRECT || *pid < SMALL;
            if *pid == DIRECT || *pid < STABLE {
                let want: Vec<usize> = (0..dispatches)
                    .filter(|&s| to_big[s] || subscribed_to_small)
                    .collect();
                if seqs != want {
                    let at = seqs.iter().zip(&want).take_while(|(a, b)| a == b).count();
                    let around =
                        |v: &[usize]| v[at.saturating_sub(3)..(at + 5).min(v.len())].to_vec();
                    panic!(
                        "pid {pid} got producer {producer}'s dispatches {:?} from position {at} \
                         on, where it was sent {:?} (of {} and {})",
                        around(&seqs),
                        around(&want),
                        seqs.len(),
                        want.len()
                    );
                }
            } else {
                // Churned: any subset, in order; a pid the churner subscribed more than
                // once gets a message once per subscription, back to back.
                assert!(
                    seqs.windows(2).all(|w| w[0] <= w[1]),
                    "pid {pid} producer {producer} out of order: {seqs:?}"
                );
            }
        }
    }
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

/// Subscribers come and go while the registry closes under them: every monitor made is
/// handed back exactly once, by the call that removed the subscriber's last subscription
/// or by `close`, and nothing subscribes once `close` returned. `close` closes the shards
/// one by one, then empties the watch tables; a subscription made meanwhile, in a shard
/// not yet closed, must still reach `close`'s answer.
#[test]
fn close_under_concurrent_subscriptions_hands_back_every_monitor_once() {
    const WORKERS: u64 = 3;
    const PIDS: u64 = 24;
    let rounds = scaled(300);
    let topics: Vec<Vec<u8>> = (0..16)
        .map(|t| format!("closing:{t}").into_bytes())
        .collect();
    let (mut made_total, mut closed_with) = (0, 0);
    for round in 0..rounds {
        let registry = Arc::new(Sharded::<u64>::new(2));
        let next_monitor = Arc::new(AtomicU64::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let (registry, next_monitor, calls) =
                    (registry.clone(), next_monitor.clone(), calls.clone());
                let topics = topics.clone();
                thread::spawn(move || {
                    let mut rng = Rng::new(round as u64 * WORKERS + w + 7);
                    let (mut made, mut released) = (Vec::new(), Vec::new());
                    loop {
                        let pid = rng.below(PIDS) * 16 + 3;
                        let topic = &topics[rng.below(topics.len() as u64) as usize];
                        calls.fetch_add(1, Ordering::Relaxed);
                        match rng.below(10) {
                            choice @ 0..=5 => {
                                let monitor = || {
                                    let monitor = next_monitor.fetch_add(1, Ordering::Relaxed);
                                    made.push(monitor);
                                    Some(monitor)
                                };
                                let subscribed = if choice == 5 {
                                    registry.subscribe_direct(topic, pid, monitor)
                                } else {
                                    registry.subscribe(topic, pid, monitor)
                                };
                                match subscribed {
                                    Ok(result) => result.expect("subscribe refused"),
                                    // Closed: from now on nothing subscribes.
                                    Err(_) => break,
                                }
                            }
                            6..=8 => released.extend(registry.unsubscribe(topic, pid).released),
                            _ => released.extend(registry.remove_subscriber(pid).released),
                        }
                    }
                    (made, released)
                })
            })
            .collect();
        // Close at a different moment each round, once the workers are under way.
        let wait = 50 + (round * 37) % 400;
        while calls.load(Ordering::Relaxed) < wait {
            thread::yield_now();
        }
        let drained = registry.close();
        let (mut made, mut released) = (Vec::new(), Vec::new());
        for worker in workers {
            let (m, r) = worker.join().expect("worker panicked");
            made.extend(m);
            released.extend(r);
        }
        closed_with += drained.len();
        released.extend(drained.into_iter().map(|(_, monitor)| monitor));
        made.sort_unstable();
        released.sort_unstable();
        let (kept, twice) = (
            made.iter()
                .filter(|m| !released.contains(m))
                .collect::<Vec<_>>(),
            released.windows(2).filter(|w| w[0] == w[1]).count(),
        );
        assert!(
            released == made,
            "round {round}: {} monitors made, {} handed back; never handed back: {kept:?}, \
             handed back twice: {twice}",
            made.len(),
            released.len()
        );
        made_total += made.len();
        assert_eq!(registry.stats(), Default::default());
        assert!(registry.subscribe(&topics[0], 3, || Some(0)).is_err());
    }
    assert!(
        closed_with > 0,
        "close never found a live subscriber ({made_total} monitors made)"
    );
}
