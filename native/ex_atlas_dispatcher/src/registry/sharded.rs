//! The sharded front of the registry: partitions (one per lane, and the direct one) of
//! stripes, each stripe one [`Registry`] behind its own lock; each subscriber's monitor
//! is in the [`Watches`], not in the shards.

use super::shard::{Registry, Stats, SubscribeError};
use super::watches::Watches;
use super::{Part, Pid};
use rustc_hash::FxHashMap;
use smallvec::SmallVec;
use std::collections::HashSet;
use std::hash::Hasher;
use std::sync::{Arc, Mutex, MutexGuard};

/// The parts of one topic that had subscribers in each shard when the snapshot was taken,
/// each with its shard index.
pub type Snapshot = SmallVec<[(usize, Part); 4]>;

/// What [`Sharded::unsubscribe`] or [`Sharded::remove_subscriber`] undid: the
/// subscriptions that went, and the monitors to release.
#[derive(Debug, PartialEq, Eq)]
pub struct Cleared<M> {
    /// How many subscriptions went.
    pub count: usize,
    /// The monitors released; one for a subscriber that went, none when it had none.
    pub released: Vec<M>,
}

/// The partition that serves `pid`, from every bit of it.
///
/// On OTP 25 (64-bit) the raw term of a local pid holds the process number from bit 4 and
/// its process-table slot from bit 35, so two processes spawned one after the other
/// differ by `16 + (1 << 35)`. A single multiply and a shift cancelled exactly that step
/// for two partitions (and for any power of two up to 64): runs of about 22 processes
/// spawned in a row shared a partition, so two processes started together always took
/// the same lock. `mix` lets every input bit reach every output bit.
pub fn partition_of(pid: Pid, partitions: usize) -> usize {
    (mix(pid) % partitions.max(1) as u64) as usize
}

/// Why a sharded call was refused.
#[derive(Debug, PartialEq, Eq)]
pub struct ClosedError;

pub(super) struct Shard {
    /// Topics and subscriptions; a subscriber's record here carries no monitor, which
    /// lives in the [`Watches`], one per subscriber however many stripes hold its
    /// subscriptions.
    pub(super) registry: Registry<()>,
    closed: bool,
}

/// Registries a lane's subscriptions are spread over, by topic.
pub const STRIPES: usize = 8;

/// One [`Registry`] per lane and stripe, each behind its own lock, and one monitor per
/// subscriber.
///
/// A subscriber's lane comes from its pid ([`partition_of`]), or is the direct partition
/// ([`Sharded::direct`]) for a subscription made with [`Sharded::subscribe_direct`];
/// within the partition, each topic lives in one stripe, picked from its name
/// ([`Sharded::stripe_of`]). Two processes subscribing at once take the same lock only
/// when they share a lane and their topics share a stripe, and a dispatch still takes
/// one lock per lane, briefly, for its snapshot.
///
/// A subscriber's monitor is kept in one of as many watch tables (see `watches`), with
/// the number of stripes that hold its subscriptions. A watch table is only ever locked
/// inside a shard's lock, never the other way round.
pub struct Sharded<M> {
    pub(super) shards: Box<[Padded<Mutex<Shard>>]>,
    watches: Watches<M>,
    lanes: usize,
    stripes: usize,
}

/// Keeps each lock and its data off its neighbours' cache lines.
#[repr(align(128))]
pub(super) struct Padded<T>(pub(super) T);

/// A serial for one snapshot, unique over the process's life and never 0: each thread
/// counts its own (no shared counter on the dispatch path), its index in the low bits.
fn dispatch_serial() -> u64 {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicU64, Ordering};
    static THREADS: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static NEXT: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    }
    NEXT.with(|next| {
        let (mut thread, count) = next.get();
        if thread == 0 {
            thread = THREADS.fetch_add(1, Ordering::Relaxed) & 0xFFFF;
        }
        next.set((thread, count + 1));
        ((count + 1) << 16) | thread
    })
}

/// A 64-bit finaliser: two multiply-xorshift rounds, so that every input bit reaches
/// every output bit.
pub(super) fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    x = x.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    x ^ (x >> 33)
}

impl<T> Padded<Mutex<T>> {
    pub(super) fn lock(&self) -> MutexGuard<'_, T> {
        // Every critical section leaves its data consistent before anything that could
        // panic, so a poisoned lock is still safe to use.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<M> Sharded<M> {
    /// `lanes` lanes (at least one) of [`STRIPES`] stripes.
    pub fn new(lanes: usize) -> Self {
        Sharded::with_stripes(lanes, STRIPES)
    }

    /// `lanes` lanes of `stripes` stripes (at least one of each).
    pub fn with_stripes(lanes: usize, stripes: usize) -> Self {
        let (lanes, stripes) = (lanes.max(1), stripes.max(1));
        Sharded {
            // One partition per lane, and the direct partition last.
            shards: (0..(lanes + 1) * stripes)
                .map(|_| {
                    Padded(Mutex::new(Shard {
                        registry: Registry::new(),
                        closed: false,
                    }))
                })
                .collect(),
            watches: Watches::new(lanes * stripes),
            lanes,
            stripes,
        }
    }

    /// Number of lanes (= partitions of the pids served by senders).
    pub fn lanes(&self) -> usize {
        self.lanes
    }

    /// The index that [`Sharded::snapshot`] gives the direct partition: one past the
    /// last lane.
    pub fn direct(&self) -> usize {
        self.lanes
    }

    /// The stripe that holds `topic` in every lane.
    pub fn stripe_of(&self, topic: &[u8]) -> usize {
        if self.stripes == 1 {
            return 0;
        }
        let mut hasher = rustc_hash::FxHasher::default();
        hasher.write(topic);
        // Mixed first: the maps inside a stripe hash the same names with FxHash, and
        // must not find only one stripe's share of its bits in use.
        (mix(hasher.finish()) % self.stripes as u64) as usize
    }

    fn shard(&self, lane: usize, stripe: usize) -> MutexGuard<'_, Shard> {
        self.shards[lane * self.stripes + stripe].lock()
    }

    /// The two partitions that may hold `pid`'s subscriptions: its lane, then the direct
    /// one.
    pub(super) fn partitions_of(&self, pid: Pid) -> [usize; 2] {
        [partition_of(pid, self.lanes), self.lanes]
    }

    /// The shard that holds `pid`'s subscriptions to `topic` in `partition`.
    pub(super) fn shard_in(&self, partition: usize, topic: &[u8]) -> MutexGuard<'_, Shard> {
        self.shard(partition, self.stripe_of(topic))
    }

    /// Every shard that may hold `pid`'s subscriptions, one after the other.
    pub(super) fn shards_of(&self, pid: Pid) -> impl Iterator<Item = MutexGuard<'_, Shard>> {
        self.partitions_of(pid)
            .into_iter()
            .flat_map(move |partition| {
                (0..self.stripes).map(move |stripe| self.shard(partition, stripe))
            })
    }

    /// Adds one subscription of `pid` to `topic`, in `pid`'s lane; refused once
    /// [`Sharded::close`] ran. `monitor` is called only when `pid` has no subscription
    /// yet, as [`Registry::subscribe`] does.
    pub fn subscribe(
        &self,
        topic: &[u8],
        pid: Pid,
        monitor: impl FnOnce() -> Option<M>,
    ) -> Result<Result<(), SubscribeError>, ClosedError> {
        self.subscribe_in(partition_of(pid, self.lanes), topic, pid, monitor)
    }

    /// As [`Sharded::subscribe`], in the direct partition.
    pub fn subscribe_direct(
        &self,
        topic: &[u8],
        pid: Pid,
        monitor: impl FnOnce() -> Option<M>,
    ) -> Result<Result<(), SubscribeError>, ClosedError> {
        self.subscribe_in(self.lanes, topic, pid, monitor)
    }

    fn subscribe_in(
        &self,
        partition: usize,
        topic: &[u8],
        pid: Pid,
        monitor: impl FnOnce() -> Option<M>,
    ) -> Result<Result<(), SubscribeError>, ClosedError> {
        let mut shard = self.shard_in(partition, topic);
        if shard.closed {
            return Err(ClosedError);
        }
        let mut recorded = false;
        let result = shard.registry.subscribe(topic, pid, || {
            recorded = self.watches.watch(pid, monitor);
            recorded.then_some(())
        });
        if recorded && result.is_err() && shard.registry.monitor_of(pid).is_none() {
            // Refused after the stripe recorded it (too many topics): undo the count. A
            // monitor made for this call alone goes with it, as it always did: its `down`
            // finds nothing to remove.
            drop(self.watches.unwatch(pid));
        }
        Ok(result)
    }

    /// Removes every subscription of `pid` to `topic`; `released` holds `pid`'s monitor
    /// when that was its last subscription, or two: the partitions are visited one at a
    /// time, so another caller may subscribe `pid` again behind the walk (a new monitor)
    /// and this walk then takes that subscription too. Nothing may be lost.
    pub fn unsubscribe(&self, topic: &[u8], pid: Pid) -> Cleared<M> {
        let mut total = Cleared {
            count: 0,
            released: Vec::new(),
        };
        for partition in self.partitions_of(pid) {
            let mut shard = self.shard_in(partition, topic);
            let removed = shard.registry.unsubscribe(topic, pid);
            total.count += removed.count;
            if removed.released.is_some() {
                // At most one shard lets the last record go; the watch hands the monitor
                // back only then.
                total.released.extend(self.watches.unwatch(pid));
            }
        }
        total
    }

    /// Removes every subscription of `pid` (its process went down), stripe by stripe.
    /// `released` holds its monitor, or more than one if `pid` subscribed again behind
    /// the walk and let go again: the stripes are not locked all at once, and nothing
    /// may be lost.
    pub fn remove_subscriber(&self, pid: Pid) -> Cleared<M> {
        let mut cleared = Cleared {
            count: 0,
            released: Vec::new(),
        };
        for mut shard in self.shards_of(pid) {
            let removed = shard.registry.remove_subscriber(pid);
            cleared.count += removed.count;
            // Every stripe that let it go counts down; the last one hands back the monitor.
            if removed.released.is_some() {
                cleared.released.extend(self.watches.unwatch(pid));
            }
        }
        cleared
    }

    /// Subscriptions to `topic` over all partitions.
    pub fn count(&self, topic: &[u8]) -> usize {
        let stripe = self.stripe_of(topic);
        (0..=self.lanes)
            .map(|lane| self.shard(lane, stripe).registry.count(topic))
            .sum()
    }

    /// The non-empty parts of `topic`, each with its lane, in lane order; the direct
    /// partition's part, if any, comes last, with the index [`Sharded::direct`].
    pub fn snapshot(&self, topic: &[u8]) -> Result<Snapshot, ClosedError> {
        let stripe = self.stripe_of(topic);
        let mut snapshot = Snapshot::new();
        let mut serial = None;
        for lane in 0..=self.lanes {
            let shard = self.shard(lane, stripe);
            if shard.closed {
                return Err(ClosedError);
            }
            if let Some(mut part) = shard.registry.snapshot(topic) {
                serial = serial.or_else(|| Some(dispatch_serial()));
                part.mark(serial.unwrap_or_default());
                snapshot.push((lane, part));
            }
        }
        Ok(snapshot)
    }

    /// True once [`Sharded::close`] ran (or while it runs): it closes the first shard
    /// first, so that one shard tells.
    pub fn is_closed(&self) -> bool {
        self.shards.first().is_some_and(|shard| shard.lock().closed)
    }

    /// [`Registry::topics_of`] over the shards that may hold `pid`'s subscriptions; a
    /// topic it holds in both its lane and the direct partition is named once.
    pub fn topics_of(&self, pid: Pid) -> Vec<Arc<[u8]>> {
        let mut seen: HashSet<Arc<[u8]>> = HashSet::new();
        self.shards_of(pid)
            .flat_map(|shard| shard.registry.topics_of(pid))
            .filter(|name| seen.insert(name.clone()))
            .collect()
    }

    /// Every topic with a subscription, once each. Walks every topic name.
    pub fn topic_names(&self) -> Vec<Arc<[u8]>> {
        let mut names: HashSet<Arc<[u8]>> = HashSet::new();
        for shard in self.shards.iter() {
            names.extend(shard.lock().registry.names().cloned());
        }
        names.into_iter().collect()
    }

    /// Counters over all shards; a topic present in several lanes counts once. Walks
    /// every topic name: for diagnostics, not for hot paths.
    pub fn stats(&self) -> Stats {
        let mut names: HashSet<Arc<[u8]>> = HashSet::new();
        let mut stats = Stats::default();
        for shard in self.shards.iter() {
            let shard = shard.lock();
            stats.subscriptions += shard.registry.stats().subscriptions;
            names.extend(shard.registry.names().cloned());
        }
        stats.topics = names.len();
        stats.subscribers = self.watches.len();
        stats
    }

    /// Refuses every later subscription and snapshot, empties every shard and hands back
    /// every subscriber with its monitor, once each.
    pub fn close(&self) -> Vec<(Pid, M)> {
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            shard.closed = true;
            shard.registry.drain_subscribers();
        }
        // No shard takes a watch table's lock any more.
        self.watches.drain()
    }

    /// Checks every shard's invariants, that each pid sits in its own lane and each topic
    /// in its own stripe, and that each subscriber's watch counts the stripes that record
    /// it; for tests.
    #[doc(hidden)]
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut recorded: FxHashMap<Pid, u32> = FxHashMap::default();
        for (index, shard) in self.shards.iter().enumerate() {
            let (lane, stripe) = (index / self.stripes, index % self.stripes);
            let shard = shard.lock();
            shard.registry.check_invariants()?;
            for pid in shard.registry.pids() {
                if partition_of(pid, self.lanes) != lane && lane != self.lanes {
                    return Err(format!("pid {pid} in lane {lane}"));
                }
                *recorded.entry(pid).or_default() += 1;
            }
            let mut names = shard.registry.names();
            if let Some(name) = names.find(|name| self.stripe_of(name) != stripe) {
                return Err(format!("topic {name:?} in stripe {stripe}"));
            }
        }
        let mut watched = 0;
        for (pid, stripes) in self.watches.stripes() {
            if recorded.get(&pid) != Some(&stripes) {
                return Err(format!(
                    "pid {pid}: watch counts {stripes} stripes, {:?} record it",
                    recorded.get(&pid)
                ));
            }
            watched += 1;
        }
        if watched != recorded.len() {
            return Err(format!(
                "{} pids recorded, {watched} watched",
                recorded.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{ok_monitor, sorted};
    use super::*;

    /// The raw term of the `n`th local pid on OTP 25, 64-bit: the process number from
    /// bit 4 and the process-table slot from bit 35 (read off a running VM).
    fn vm_pid(n: u64) -> Pid {
        (n << 35) | (n << 4) | 3
    }

    #[test]
    fn processes_spawned_in_a_row_spread_over_the_partitions() {
        const SPAWNED: u64 = 10_000;
        for partitions in [2, 3, 4, 8, 64] {
            let lanes: Vec<usize> = (200..200 + SPAWNED)
                .map(|n| partition_of(vm_pid(n), partitions))
                .collect();
            let mut held = vec![0usize; partitions];
            for &lane in &lanes {
                held[lane] += 1;
            }
            // Within four standard deviations of what independent picks would give.
            let within =
                |n: usize, mean: usize| (n.abs_diff(mean) as f64) < 4.0 * (mean as f64).sqrt();
            let even = SPAWNED as usize / partitions;
            assert!(
                held.iter().all(|&n| within(n, even)),
                "{partitions} partitions hold {held:?}"
            );
            // Neighbours share a partition about as often as two random pids would
            // (1 / partitions); the old multiply-and-shift put 95% of them together.
            let together = lanes.windows(2).filter(|w| w[0] == w[1]).count();
            let random = (SPAWNED as usize - 1) / partitions;
            assert!(
                within(together, random),
                "{partitions} partitions: {together} neighbours together, about {random} expected"
            );
        }
    }

    #[test]
    fn a_registry_has_at_least_one_lane_and_tells_when_it_is_closed() {
        let reg: Sharded<u64> = Sharded::new(3);
        assert_eq!((reg.lanes(), reg.direct()), (3, 3));
        assert!(!reg.is_closed());
        reg.subscribe(b"t", 1, ok_monitor(1)).unwrap().unwrap();
        assert_eq!(reg.close().len(), 1);
        assert!(reg.topic_names().is_empty());
        assert!(reg.is_closed());
        let reg: Sharded<u64> = Sharded::with_stripes(0, 0);
        assert_eq!((reg.lanes(), reg.direct()), (1, 1));
    }

    #[test]
    fn topic_names_names_each_topic_once_whichever_partitions_hold_it() {
        let reg: Sharded<u64> = Sharded::new(2);
        for pid in 0..64 {
            reg.subscribe(b"lanes", pid * 16 + 3, ok_monitor(pid))
                .unwrap()
                .unwrap();
        }
        reg.subscribe_direct(b"lanes", 5_000, ok_monitor(5_000))
            .unwrap()
            .unwrap();
        reg.subscribe_direct(b"direct", 5_000, ok_monitor(5_000))
            .unwrap()
            .unwrap();
        let mut names: Vec<Vec<u8>> = reg.topic_names().iter().map(|n| n.to_vec()).collect();
        names.sort_unstable();
        assert_eq!(names, vec![b"direct".to_vec(), b"lanes".to_vec()]);
    }

    #[test]
    fn shards_hold_only_their_pids() {
        let reg = Sharded::new(4);
        for pid in 0..1_000 {
            reg.subscribe(b"t", pid * 16 + 3, ok_monitor(pid))
                .unwrap()
                .unwrap();
        }
        let snap = reg.snapshot(b"t").unwrap();
        assert_eq!(snap.len(), 4, "1 000 pids should touch every shard");
        for (index, part) in &snap {
            assert!(part.pids().all(|pid| partition_of(pid, 4) == *index));
        }
    }

    #[test]
    fn direct_subscriptions_have_a_partition_of_their_own() {
        let reg: Sharded<u64> = Sharded::new(2);
        assert_eq!(reg.direct(), 2);
        // Pid 1 in its lane and, after switching its queue, in the direct partition too.
        reg.subscribe(b"t", 1, ok_monitor(1)).unwrap().unwrap();
        reg.subscribe_direct(b"t", 1, || panic!("monitored twice"))
            .unwrap()
            .unwrap();
        reg.subscribe_direct(b"t", 2, ok_monitor(2))
            .unwrap()
            .unwrap();
        reg.subscribe_direct(b"u", 2, || panic!("monitored twice"))
            .unwrap()
            .unwrap();
        reg.check_invariants().unwrap();
        assert_eq!(reg.count(b"t"), 3);
        let snapshot = reg.snapshot(b"t").unwrap();
        let (last, direct) = snapshot.last().unwrap();
        assert_eq!(*last, reg.direct(), "the direct part comes last");
        assert_eq!(sorted(direct.pids().collect()), vec![1, 2]);
        assert_eq!(
            reg.topics_of(1).len(),
            1,
            "a topic held twice is named once"
        );
        assert_eq!(reg.stats().subscribers, 2, "one monitor per subscriber");

        // Unsubscribing removes the subscriber's subscriptions in both partitions, and
        // hands its monitor back once, when the last one goes.
        let removed = reg.unsubscribe(b"t", 1);
        assert_eq!((removed.count, removed.released), (2, vec![10]));
        let cleared = reg.remove_subscriber(2);
        assert_eq!((cleared.count, cleared.released), (2, vec![20]));
        assert_eq!(reg.count(b"t") + reg.count(b"u"), 0);
        reg.check_invariants().unwrap();
    }

    #[test]
    fn sharded_registry_keeps_pids_in_their_lane_and_topics_in_their_stripe() {
        let reg: Sharded<u64> = Sharded::new(3);
        let a = b"a".to_vec();
        let names: Vec<Vec<u8>> = (0..100).map(|i| format!("t{i}").into_bytes()).collect();
        let near = names.iter().find(|n| reg.stripe_of(n) == reg.stripe_of(&a));
        let far = names.iter().find(|n| reg.stripe_of(n) != reg.stripe_of(&a));
        let (near, far) = (near.unwrap(), far.unwrap());
        for pid in 0..300u64 {
            reg.subscribe(&a, pid, || Some(pid)).unwrap().unwrap();
            if pid % 2 == 0 {
                // One monitor per subscriber, whichever stripes hold its subscriptions.
                for topic in [near, far] {
                    reg.subscribe(topic, pid, || panic!("monitored twice"))
                        .unwrap()
                        .unwrap();
                }
            }
        }
        reg.check_invariants().unwrap();
        assert_eq!(reg.count(&a), 300);
        assert_eq!(reg.count(near), 150);
        assert_eq!(reg.count(far), 150);
        assert_eq!(
            reg.stats(),
            Stats {
                topics: 3,
                subscriptions: 600,
                subscribers: 300
            }
        );
        let snapshot = reg.snapshot(&a).unwrap();
        assert_eq!(snapshot.len(), 3, "300 pids touch every lane");
        for (lane, part) in &snapshot {
            assert!(part.pids().all(|pid| partition_of(pid, 3) == *lane));
        }
        let cleared = |count, released| Cleared { count, released };
        // The monitor goes with the last subscription, whichever stripe that is in.
        assert_eq!(reg.unsubscribe(&a, 4), cleared(1, vec![]));
        assert_eq!(reg.unsubscribe(far, 4), cleared(1, vec![]));
        assert_eq!(reg.unsubscribe(near, 4), cleared(1, vec![4]));
        assert_eq!(reg.remove_subscriber(6), cleared(3, vec![6]));
        assert_eq!(reg.remove_subscriber(6), cleared(0, vec![]));
        let mut topics = reg.topics_of(8);
        topics.sort_unstable();
        let mut want: Vec<Arc<[u8]>> = [&a[..], near, far].map(Arc::from).to_vec();
        want.sort_unstable();
        assert_eq!(topics, want);
        reg.check_invariants().unwrap();
        let mut monitors: Vec<u64> = reg.close().into_iter().map(|(_, m)| m).collect();
        monitors.sort_unstable();
        assert_eq!(
            monitors,
            (0..300)
                .filter(|&pid| pid != 4 && pid != 6)
                .collect::<Vec<_>>()
        );
        assert_eq!(reg.subscribe(&a, 1, || Some(1)), Err(ClosedError));
        assert!(reg.snapshot(&a).is_err());
        assert_eq!(reg.stats(), Stats::default());
    }
}
