//! Bounded fan-out lanes: how many dispatches each sender may have in flight.
//!
//! Plain Rust with no rustler types. A dispatch is split by subscriber partition into one
//! batch per lane; each lane is served by one sender (in the NIF: a sender process that
//! delivers its batches from dirty-scheduler NIF calls, in the order it received them,
//! which is what keeps per-dispatcher order). This module only does the bookkeeping that
//! keeps memory bounded:
//!
//! * a batch takes one credit of its lane before it is handed to the sender and gives it
//!   back once delivered, so no lane ever holds more than `capacity` batches;
//! * `try_reserve` never waits (normal schedulers); `reserve` waits for room (dirty I/O
//!   schedulers and tests only) and is woken by `release` or `close`;
//! * after `close`, every reservation is refused and every waiter returns.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The lane has `capacity` batches in flight.
    Full,
    /// The lanes were closed.
    Closed,
}

#[derive(Default)]
struct Lane {
    in_flight: AtomicUsize,
    peak: AtomicUsize,
    waiters: AtomicUsize,
    delivered: AtomicU64,
    lock: Mutex<()>,
    room: Condvar,
}

/// One credit counter per lane, with a common bound.
pub struct Lanes {
    lanes: Box<[Lane]>,
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
    /// Batches in flight over all lanes.
    pub in_flight: usize,
    /// Most batches in flight in any lane now.
    pub max_in_flight: usize,
    /// Most batches ever in flight in one lane.
    pub peak: usize,
    /// Batches delivered since start.
    pub delivered: u64,
    /// Callers waiting for room now.
    pub waiting: usize,
}

/// Longest a waiter sleeps before looking again; only a safety net, `release` wakes it.
const RECHECK: Duration = Duration::from_millis(50);

impl Lanes {
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

    /// Takes one credit of `lane` (modulo the number of lanes) without waiting.
    pub fn try_reserve(&self, lane: usize) -> Result<(), Refused> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Refused::Closed);
        }
        let lane = self.lane(lane);
        let mut current = lane.in_flight.load(Ordering::SeqCst);
        loop {
            if current >= self.capacity {
                return Err(Refused::Full);
            }
            match lane.in_flight.compare_exchange_weak(
                current,
                current + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => {
                    lane.peak.fetch_max(current + 1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// Takes one credit of `lane`, waiting for room. Only where blocking is allowed.
    pub fn reserve(&self, lane_index: usize) -> Result<(), Refused> {
        match self.try_reserve(lane_index) {
            Err(Refused::Full) => {}
            other => return other,
        }
        let lane = self.lane(lane_index);
        let mut guard = lane.lock.lock().unwrap_or_else(|p| p.into_inner());
        // Registered before looking again, so a `release` that lands after our look
        // sees us and wakes us (both sides use SeqCst).
        lane.waiters.fetch_add(1, Ordering::SeqCst);
        let result = loop {
            match self.try_reserve(lane_index) {
                Err(Refused::Full) => {
                    guard = match lane.room.wait_timeout(guard, RECHECK) {
                        Ok((guard, _)) => guard,
                        Err(poisoned) => poisoned.into_inner().0,
                    };
                }
                other => break other,
            }
        };
        lane.waiters.fetch_sub(1, Ordering::SeqCst);
        result
    }

    /// True when `lane` has no batch in flight: everything handed to it was delivered.
    pub fn is_idle(&self, lane: usize) -> bool {
        self.lane(lane).in_flight.load(Ordering::SeqCst) == 0
    }

    /// Gives back one credit of `lane` after its batch was delivered.
    pub fn release(&self, lane: usize) {
        let lane = self.lane(lane);
        let previous = lane.in_flight.fetch_sub(1, Ordering::SeqCst);
        debug_assert!(previous > 0, "release without reserve");
        if previous == 0 {
            // Never reached by correct callers; undo instead of wrapping around.
            lane.in_flight.fetch_add(1, Ordering::SeqCst);
            return;
        }
        lane.delivered.fetch_add(1, Ordering::Relaxed);
        if lane.waiters.load(Ordering::SeqCst) > 0 {
            let _guard = lane.lock.lock().unwrap_or_else(|p| p.into_inner());
            lane.room.notify_all();
        }
    }

    /// Refuses every later reservation and wakes every waiter.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for lane in self.lanes.iter() {
            let _guard = lane.lock.lock().unwrap_or_else(|p| p.into_inner());
            lane.room.notify_all();
        }
    }

    /// True once `close` ran.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Current figures.
    pub fn stats(&self) -> LaneStats {
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
            delivered: self
                .lanes
                .iter()
                .map(|l| l.delivered.load(Ordering::Relaxed))
                .sum(),
            waiting: self
                .lanes
                .iter()
                .map(|l| l.waiters.load(Ordering::Relaxed))
                .sum(),
        }
    }

    fn lane(&self, index: usize) -> &Lane {
        &self.lanes[index % self.lanes.len()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;
    use std::time::Instant;

    fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_lane_holds_at_most_capacity_batches() {
        let lanes = Lanes::new(2, 3);
        assert!(lanes.is_idle(0) && lanes.is_idle(1));
        for _ in 0..3 {
            lanes.try_reserve(0).unwrap();
        }
        assert_eq!(lanes.try_reserve(0), Err(Refused::Full));
        assert_eq!(lanes.try_reserve(1), Ok(()), "lanes are independent");
        assert!(!lanes.is_idle(0));
        assert!(!lanes.is_idle(1));
        lanes.release(0);
        assert_eq!(lanes.try_reserve(0), Ok(()));
        let stats = lanes.stats();
        assert_eq!(stats.in_flight, 4);
        assert_eq!(stats.max_in_flight, 3);
        assert_eq!(stats.peak, 3);
        assert_eq!(stats.delivered, 1);
    }

    #[test]
    fn reserve_waits_until_a_release() {
        let lanes = Arc::new(Lanes::new(1, 1));
        lanes.try_reserve(0).unwrap();
        let waiter = {
            let lanes = lanes.clone();
            thread::spawn(move || lanes.reserve(0))
        };
        wait_until("the waiter to register", || lanes.stats().waiting == 1);
        assert!(
            !waiter.is_finished(),
            "reserve returned while the lane was full"
        );
        lanes.release(0);
        assert_eq!(waiter.join().unwrap(), Ok(()));
        assert_eq!(lanes.stats().in_flight, 1);
    }

    #[test]
    fn close_refuses_reservations_and_wakes_waiters() {
        let lanes = Arc::new(Lanes::new(1, 1));
        lanes.try_reserve(0).unwrap();
        let waiter = {
            let lanes = lanes.clone();
            thread::spawn(move || lanes.reserve(0))
        };
        wait_until("the waiter to register", || lanes.stats().waiting == 1);
        lanes.close();
        assert_eq!(waiter.join().unwrap(), Err(Refused::Closed));
        assert_eq!(lanes.try_reserve(0), Err(Refused::Closed));
        assert!(lanes.is_closed());
    }

    #[test]
    fn many_producers_never_exceed_the_bound_and_lose_no_credit() {
        const CAPACITY: usize = 4;
        let lanes = Arc::new(Lanes::new(2, CAPACITY));
        let (tx, rx) = std::sync::mpsc::channel::<usize>();
        let consumer = {
            let lanes = lanes.clone();
            thread::spawn(move || {
                let mut seen = 0;
                for lane in rx {
                    assert!(lanes.stats().max_in_flight <= CAPACITY);
                    lanes.release(lane);
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
                    for i in 0..5_000usize {
                        let lane = (p + i) % 2;
                        lanes.reserve(lane).unwrap();
                        tx.send(lane).unwrap();
                    }
                })
            })
            .collect();
        drop(tx);
        for p in producers {
            p.join().unwrap();
        }
        assert_eq!(consumer.join().unwrap(), 20_000);
        let stats = lanes.stats();
        assert_eq!(stats.in_flight, 0);
        assert!(stats.peak <= CAPACITY);
        assert_eq!(stats.delivered, 20_000);
    }
}
