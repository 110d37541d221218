//! Bounded fan-out lanes: how many dispatches each sender may have in flight, and who
//! waits for room when a lane is full.
//!
//! Plain Rust with no rustler types. A dispatch is split by subscriber partition into one
//! batch per lane; each lane is served by one sender process that delivers its batches in
//! the order it received them, which is what keeps per-dispatcher order. This module only
//! does the bookkeeping that keeps memory bounded, and it never blocks a thread:
//!
//! * a batch takes one credit of its lane before it is handed to the sender and gives it
//!   back once delivered ([`Lanes::release`]) or lost ([`Lanes::give_back`]), so no lane
//!   ever holds more than `capacity` batches;
//! * a producer that finds its lane full joins the lane's queue of waiters
//!   ([`Lanes::reserve_or_queue`]) and returns; a credit that comes back is handed
//!   straight to the first waiter through the caller's `grant` function (in the NIF: a
//!   message that wakes the producer's plain `receive`). Waiters are served first in,
//!   first out, and nobody jumps the queue while it is non-empty;
//! * a waiter that cannot take its grant (in the NIF: the process is dead) is skipped,
//!   and the credit goes to the next one;
//! * after [`Lanes::close`], every reservation is refused and the waiters are handed back
//!   so the caller can tell them.

use crate::sync::{lock, AtomicBool, AtomicU64, AtomicUsize, Mutex, MutexGuard, Ordering};
use std::collections::VecDeque;

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The lane has `capacity` batches in flight, or producers are already waiting.
    Full,
    /// The lanes were closed.
    Closed,
}

/// What [`Lanes::reserve_or_queue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// A credit was taken; the waiter was not needed.
    Taken,
    /// The waiter joined the lane's queue; a credit reaches it through `grant`, possibly
    /// before this call returns.
    Queued,
}

struct Lane<W> {
    in_flight: AtomicUsize,
    peak: AtomicUsize,
    /// Length of `waiters`, readable without the lock.
    queued: AtomicUsize,
    delivered: AtomicU64,
    lost_batches: AtomicU64,
    lost_deliveries: AtomicU64,
    waiters: Mutex<VecDeque<W>>,
}

impl<W> Default for Lane<W> {
    fn default() -> Self {
        Lane {
            in_flight: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            delivered: AtomicU64::new(0),
            lost_batches: AtomicU64::new(0),
            lost_deliveries: AtomicU64::new(0),
            waiters: Mutex::new(VecDeque::new()),
        }
    }
}

/// One credit counter and one queue of waiters per lane, with a common bound.
pub struct Lanes<W> {
    lanes: Box<[Lane<W>]>,
    capacity: usize,
    closed: AtomicBool,
}

/// Point-in-time figures about the lanes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaneStats {
    /// Number of lanes (= senders).
    pub lanes: usize,
    /// Bound of each lane, in batches.
    pub capacity: usize,
    /// Batches in flight over all lanes (credits taken, granted ones included).
    pub in_flight: usize,
    /// Most batches in flight in any lane now.
    pub max_in_flight: usize,
    /// Most batches ever in flight in one lane.
    pub peak: usize,
    /// Batches delivered to the end since start.
    pub delivered: u64,
    /// Producers waiting for room now.
    pub waiting: usize,
    /// Batches dropped before they were fully delivered (their sender died).
    pub lost_batches: u64,
    /// Deliveries those batches had not made.
    pub lost_deliveries: u64,
}

impl<W> Lanes<W> {
    /// `lanes` lanes (at least one) of `capacity` batches each (at least one).
    pub fn new(lanes: usize, capacity: usize) -> Self {
        Lanes {
            lanes: (0..lanes.max(1)).map(|_| Lane::default()).collect(),
            capacity: capacity.max(1),
            closed: AtomicBool::new(false),
        }
    }

    /// Number of lanes.
    pub fn len(&self) -> usize {
        self.lanes.len()
    }

    /// Always false: there is at least one lane.
    pub fn is_empty(&self) -> bool {
        self.lanes.is_empty()
    }

    /// Takes one credit of `lane` (modulo the number of lanes) if one is free and nobody
    /// waits for it. Never blocks.
    pub fn try_reserve(&self, lane: usize) -> Result<(), Refused> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Refused::Closed);
        }
        let lane = self.lane(lane);
        // Seed of the loom model `waiters_are_served_first_come_first_served`.
        let waiting = lane.queued.load(Ordering::SeqCst) > 0
            && !cfg!(loom_seed = "try_reserve_ignores_queue");
        if waiting || !self.take_credit(lane) {
            return Err(Refused::Full);
        }
        Ok(())
    }

    /// Takes one credit of `lane`, or queues `waiter` for the next free one. A queued
    /// waiter gets its credit through `grant` (called with the lane's queue locked; it
    /// returns false when the waiter cannot take it, and the credit goes on). Never blocks
    /// beyond the queue's short critical section.
    pub fn reserve_or_queue(
        &self,
        lane_index: usize,
        waiter: W,
        grant: impl FnMut(&W) -> bool,
    ) -> Result<Reservation, Refused> {
        let lane = self.lane(lane_index);
        let mut waiters = lock(&lane.waiters);
        if self.closed.load(Ordering::SeqCst) {
            return Err(Refused::Closed);
        }
        if waiters.is_empty() && self.take_credit(lane) {
            return Ok(Reservation::Taken);
        }
        waiters.push_back(waiter);
        // Published before looking for a free credit again (in `pump`): a `release` that
        // lands after that look sees the waiter and pumps (both sides use SeqCst).
        lane.queued.store(waiters.len(), Ordering::SeqCst);
        let served = self.pump(lane, &mut waiters, grant);
        drop(waiters);
        // Dropped outside the lock: dropping a waiter may run code that gives credits back.
        drop(served);
        Ok(Reservation::Queued)
    }

    /// True when `lane` has no batch in flight: everything handed to it was delivered.
    pub fn is_idle(&self, lane: usize) -> bool {
        self.lane(lane).in_flight.load(Ordering::SeqCst) == 0
    }

    /// Gives back one credit of `lane` after its batch was delivered; the credit goes to
    /// the first waiter that takes it through `grant`.
    pub fn release(&self, lane_index: usize, grant: impl FnMut(&W) -> bool) {
        let lane = self.lane(lane_index);
        lane.delivered.fetch_add(1, Ordering::Relaxed);
        self.put_back(lane, grant);
    }

    /// Gives back one credit of `lane` that delivered nothing more: a batch that was
    /// dropped (`lost` deliveries it had not made, counted) or a grant never used (0).
    pub fn give_back(&self, lane_index: usize, lost: usize, grant: impl FnMut(&W) -> bool) {
        let lane = self.lane(lane_index);
        if lost > 0 {
            lane.lost_batches.fetch_add(1, Ordering::Relaxed);
            lane.lost_deliveries
                .fetch_add(lost as u64, Ordering::Relaxed);
        }
        self.put_back(lane, grant);
    }

    /// Refuses every later reservation, empties every queue and hands back the waiters
    /// that were in them, so the caller can tell each one.
    pub fn close(&self) -> Vec<W> {
        self.closed.store(true, Ordering::SeqCst);
        let mut all = Vec::new();
        for lane in self.lanes.iter() {
            let mut waiters = lock(&lane.waiters);
            all.extend(waiters.drain(..));
            lane.queued.store(0, Ordering::SeqCst);
        }
        all
    }

    /// True once `close` ran.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Batches lost and the deliveries they had not made, over all lanes. Constant work
    /// per lane, for polling.
    pub fn lost(&self) -> (u64, u64) {
        self.lanes.iter().fold((0, 0), |(batches, deliveries), l| {
            (
                batches + l.lost_batches.load(Ordering::Relaxed),
                deliveries + l.lost_deliveries.load(Ordering::Relaxed),
            )
        })
    }

    /// Current figures.
    pub fn stats(&self) -> LaneStats {
        let (lost_batches, lost_deliveries) = self.lost();
        let sum = |f: fn(&Lane<W>) -> u64| self.lanes.iter().map(f).sum::<u64>();
        let in_flight = self
            .lanes
            .iter()
            .map(|l| l.in_flight.load(Ordering::Relaxed));
        LaneStats {
            lanes: self.lanes.len(),
            capacity: self.capacity,
            in_flight: in_flight.clone().sum(),
            max_in_flight: in_flight.max().unwrap_or(0),
            peak: self
                .lanes
                .iter()
                .map(|l| l.peak.load(Ordering::Relaxed))
                .max()
                .unwrap_or(0),
            delivered: sum(|l| l.delivered.load(Ordering::Relaxed)),
            waiting: sum(|l| l.queued.load(Ordering::Relaxed) as u64) as usize,
            lost_batches,
            lost_deliveries,
        }
    }

    fn put_back(&self, lane: &Lane<W>, grant: impl FnMut(&W) -> bool) {
        // Under the queue's lock, so that a producer queueing at the same moment either
        // finds this credit free or is found in the queue here: a check of `queued`
        // without the lock would rest on sequentially consistent atomics alone, which
        // loom (our model checker) cannot confirm. A batch gives back one credit, so
        // this is one short, rarely contended lock per batch.
        // Seed of the loom model `credits_are_neither_lost_nor_doubled_...`: the queue
        // looked at before its lock is taken.
        #[cfg(loom_seed = "put_back_checks_queue_early")]
        let nobody_waited = lock(&lane.waiters).is_empty();
        let mut waiters = lock(&lane.waiters);
        #[cfg(not(loom_seed = "put_back_checks_queue_early"))]
        let nobody_waited = waiters.is_empty();
        let previous = lane.in_flight.fetch_sub(1, Ordering::SeqCst);
        debug_assert!(previous > 0, "credit given back without a reservation");
        if previous == 0 {
            // Never reached by correct callers; undo instead of wrapping around.
            lane.in_flight.fetch_add(1, Ordering::SeqCst);
            return;
        }
        let served = if nobody_waited {
            Vec::new()
        } else {
            self.pump(lane, &mut waiters, grant)
        };
        drop(waiters);
        drop(served);
    }

    /// Hands free credits to the waiters at the head of the queue, in order. Returns the
    /// waiters it took off the queue, for the caller to drop after unlocking.
    fn pump(
        &self,
        lane: &Lane<W>,
        waiters: &mut MutexGuard<'_, VecDeque<W>>,
        mut grant: impl FnMut(&W) -> bool,
    ) -> Vec<W> {
        let mut served = Vec::new();
        while !waiters.is_empty() && !self.closed.load(Ordering::SeqCst) {
            if !self.take_credit(lane) {
                break;
            }
            let Some(waiter) = waiters.pop_front() else {
                break;
            };
            lane.queued.store(waiters.len(), Ordering::SeqCst);
            if !grant(&waiter) {
                // It cannot take the credit (gone): the next one may.
                lane.in_flight.fetch_sub(1, Ordering::SeqCst);
            }
            served.push(waiter);
        }
        served
    }

    fn take_credit(&self, lane: &Lane<W>) -> bool {
        let mut current = lane.in_flight.load(Ordering::SeqCst);
        loop {
            if current >= self.capacity {
                return false;
            }
            match lane.in_flight.compare_exchange_weak(
                current,
                current + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => {
                    lane.peak.fetch_max(current + 1, Ordering::Relaxed);
                    return true;
                }
                Err(actual) => current = actual,
            }
        }
    }

    fn lane(&self, index: usize) -> &Lane<W> {
        &self.lanes[index % self.lanes.len()]
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::sync::Arc;
    use std::thread;

    /// A waiter that records its grant; `alive: false` refuses it.
    #[derive(Debug)]
    struct Probe {
        id: usize,
        alive: bool,
        granted: Arc<Mutex<Vec<usize>>>,
    }

    fn grant(probe: &Probe) -> bool {
        if probe.alive {
            probe.granted.lock().unwrap().push(probe.id);
        }
        probe.alive
    }

    fn probe(id: usize, alive: bool, granted: &Arc<Mutex<Vec<usize>>>) -> Probe {
        Probe {
            id,
            alive,
            granted: granted.clone(),
        }
    }

    #[test]
    fn a_lane_holds_at_most_capacity_batches() {
        let lanes: Lanes<Probe> = Lanes::new(2, 3);
        assert!(lanes.is_idle(0) && lanes.is_idle(1));
        for _ in 0..3 {
            lanes.try_reserve(0).unwrap();
        }
        assert_eq!(lanes.try_reserve(0), Err(Refused::Full));
        assert_eq!(lanes.try_reserve(1), Ok(()), "lanes are independent");
        assert!(!lanes.is_idle(0) && !lanes.is_idle(1));
        lanes.release(0, grant);
        assert_eq!(lanes.try_reserve(0), Ok(()));
        let stats = lanes.stats();
        assert_eq!(stats.in_flight, 4);
        assert_eq!(stats.max_in_flight, 3);
        assert_eq!(stats.peak, 3);
        assert_eq!(stats.delivered, 1);
    }

    #[test]
    fn a_full_lane_queues_waiters_and_hands_credits_over_in_order() {
        let granted = Arc::new(Mutex::new(Vec::new()));
        let lanes = Lanes::new(1, 2);
        for id in 0..2 {
            let taken = lanes.reserve_or_queue(0, probe(id, true, &granted), grant);
            assert_eq!(taken, Ok(Reservation::Taken));
        }
        for id in 2..5 {
            let queued = lanes.reserve_or_queue(0, probe(id, true, &granted), grant);
            assert_eq!(queued, Ok(Reservation::Queued));
        }
        assert_eq!(lanes.stats().waiting, 3);
        assert!(granted.lock().unwrap().is_empty());

        lanes.release(0, grant);
        assert_eq!(*granted.lock().unwrap(), vec![2], "first in, first served");
        assert_eq!(
            lanes.stats().in_flight,
            2,
            "the credit passed on, not freed"
        );
        lanes.give_back(0, 0, grant);
        lanes.release(0, grant);
        assert_eq!(*granted.lock().unwrap(), vec![2, 3, 4]);
        assert_eq!(lanes.stats().waiting, 0);
        assert_eq!(lanes.stats().in_flight, 2);
        assert_eq!(
            lanes.stats().delivered,
            2,
            "a credit given back is no delivery"
        );
    }

    #[test]
    fn nobody_jumps_the_queue() {
        let granted = Arc::new(Mutex::new(Vec::new()));
        let lanes = Lanes::new(1, 1);
        lanes.try_reserve(0).unwrap();
        let queued = lanes.reserve_or_queue(0, probe(1, true, &granted), grant);
        assert_eq!(queued, Ok(Reservation::Queued));
        lanes.release(0, grant);
        assert_eq!(*granted.lock().unwrap(), vec![1]);
        lanes.give_back(0, 0, grant);
        // Free again, with nobody waiting: a newcomer takes the credit at once.
        assert_eq!(lanes.try_reserve(0), Ok(()));
        // Full, with a waiter queued: a newcomer may not overtake it once a credit frees.
        let queued = lanes.reserve_or_queue(0, probe(2, true, &granted), grant);
        assert_eq!(queued, Ok(Reservation::Queued));
        assert_eq!(lanes.try_reserve(0), Err(Refused::Full));
    }

    #[test]
    fn a_waiter_that_cannot_take_its_credit_is_skipped() {
        let granted = Arc::new(Mutex::new(Vec::new()));
        let lanes = Lanes::new(1, 1);
        lanes.try_reserve(0).unwrap();
        for (id, alive) in [(1, false), (2, false), (3, true)] {
            let queued = lanes.reserve_or_queue(0, probe(id, alive, &granted), grant);
            assert_eq!(queued, Ok(Reservation::Queued));
        }
        lanes.release(0, grant);
        assert_eq!(*granted.lock().unwrap(), vec![3]);
        assert_eq!(lanes.stats().in_flight, 1);
        assert_eq!(lanes.stats().waiting, 0);

        // Only dead waiters: the credit returns to the lane.
        let queued = lanes.reserve_or_queue(0, probe(4, false, &granted), grant);
        assert_eq!(queued, Ok(Reservation::Queued));
        lanes.give_back(0, 0, grant);
        assert_eq!(lanes.stats().in_flight, 0);
        assert!(lanes.is_idle(0));
    }

    #[test]
    fn there_is_at_least_one_lane_of_at_least_one_credit() {
        let lanes: Lanes<Probe> = Lanes::new(3, 2);
        assert_eq!((lanes.len(), lanes.is_empty()), (3, false));
        assert_eq!(lanes.stats().capacity, 2);
        let lanes: Lanes<Probe> = Lanes::new(0, 0);
        assert_eq!((lanes.len(), lanes.is_empty()), (1, false));
        assert_eq!(lanes.try_reserve(7), Ok(()), "lane 7 of 1 is lane 0");
        assert_eq!(lanes.try_reserve(0), Err(Refused::Full), "one credit");
    }

    #[test]
    fn a_credit_given_back_unused_counts_no_loss() {
        let lanes: Lanes<Probe> = Lanes::new(1, 1);
        lanes.try_reserve(0).unwrap();
        lanes.give_back(0, 0, grant);
        let stats = lanes.stats();
        assert_eq!((stats.lost_batches, stats.lost_deliveries), (0, 0));
        assert_eq!((stats.in_flight, stats.delivered), (0, 0));
    }

    #[test]
    fn a_lost_batch_is_counted_and_returns_its_credit() {
        let lanes: Lanes<Probe> = Lanes::new(2, 1);
        lanes.try_reserve(1).unwrap();
        lanes.give_back(1, 700, grant);
        let stats = lanes.stats();
        assert_eq!((stats.lost_batches, stats.lost_deliveries), (1, 700));
        assert_eq!(lanes.lost(), (1, 700));
        assert_eq!(stats.in_flight, 0);
        assert_eq!(stats.delivered, 0);
    }

    #[test]
    fn close_refuses_reservations_and_hands_back_the_waiters() {
        let granted = Arc::new(Mutex::new(Vec::new()));
        let lanes = Lanes::new(2, 1);
        lanes.try_reserve(0).unwrap();
        lanes.try_reserve(1).unwrap();
        for id in 0..4 {
            let queued = lanes.reserve_or_queue(id % 2, probe(id, true, &granted), grant);
            assert_eq!(queued, Ok(Reservation::Queued));
        }
        assert!(!lanes.is_closed());
        let mut waiters: Vec<usize> = lanes.close().into_iter().map(|p| p.id).collect();
        waiters.sort_unstable();
        assert_eq!(waiters, vec![0, 1, 2, 3]);
        assert!(lanes.is_closed());
        assert_eq!(lanes.try_reserve(0), Err(Refused::Closed));
        let refused = lanes.reserve_or_queue(0, probe(9, true, &granted), grant);
        assert_eq!(refused, Err(Refused::Closed));
        // Credits still come back after close, and nobody is granted one.
        lanes.release(0, grant);
        assert!(granted.lock().unwrap().is_empty());
        assert_eq!(lanes.stats().waiting, 0);
    }

    /// Producer threads stand in for producer processes: a grant is a message on the
    /// producer's channel, and waiting is a `recv` (allowed on a thread of our own).
    #[test]
    fn many_producers_never_exceed_the_bound_and_lose_no_credit() {
        const CAPACITY: usize = 4;
        const PER_PRODUCER: usize = 5_000;
        let lanes: Arc<Lanes<mpsc::Sender<()>>> = Arc::new(Lanes::new(2, CAPACITY));
        let wake = |waiter: &mpsc::Sender<()>| waiter.send(()).is_ok();
        let (tx, rx) = mpsc::channel::<usize>();
        let consumer = {
            let lanes = lanes.clone();
            thread::spawn(move || {
                let mut seen = 0;
                for lane in rx {
                    assert!(lanes.stats().max_in_flight <= CAPACITY);
                    lanes.release(lane, wake);
                    seen += 1;
                }
                seen
            })
        };
        let producers: Vec<_> = (0..4)
            .map(|p| {
                let lanes = lanes.clone();
                let tx = tx.clone();
                thread::spawn(move || {
                    let (me, woken) = mpsc::channel();
                    for i in 0..PER_PRODUCER {
                        let lane = (p + i) % 2;
                        match lanes.reserve_or_queue(lane, me.clone(), wake) {
                            Ok(Reservation::Taken) => {}
                            Ok(Reservation::Queued) => woken.recv().unwrap(),
                            Err(refused) => panic!("refused: {refused:?}"),
                        }
                        tx.send(lane).unwrap();
                    }
                })
            })
            .collect();
        drop(tx);
        for p in producers {
            p.join().unwrap();
        }
        assert_eq!(consumer.join().unwrap(), 4 * PER_PRODUCER);
        let stats = lanes.stats();
        assert_eq!(stats.in_flight, 0);
        assert_eq!(stats.waiting, 0);
        assert!(stats.peak <= CAPACITY);
        assert_eq!(stats.delivered, (4 * PER_PRODUCER) as u64);
    }
}
