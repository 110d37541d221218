//! Loom models of the lane state machines: `fanout::Lanes` (credits and waiting
//! producers) and `handoff::Handoff` (senders, in-flight and parked batches, the inline
//! rule), together, the way the glue (`nif::dispatch`, `nif::lanes`, `nif::dispatcher`)
//! drives them; and of `on_slow: :catch_up`'s parking (`history::parked`: the history,
//! its in-flight set and the dispatches' `Track`s). Loom runs each model under every interleaving of its threads'
//! synchronisation steps, up to a preemption bound, so a property that holds here holds
//! for every order those steps can take, not only the ones a stress test happened to meet.
//!
//! Each model has a seeded bug (`--cfg loom_seed="name"`, named in its documentation) that
//! makes it fail: `bash scripts/loom.sh --seeds` builds each seed and expects the failure.
//! Run the models with `bash scripts/loom.sh` (RUSTFLAGS="--cfg loom", release build).

use crate::fanout::{Lanes, Reservation};
use crate::handoff::{Handed, Handoff, Installed, Tracked};
use crate::sync::{lock, AtomicBool, AtomicUsize, Mutex, Ordering};
use loom::sync::Arc;
use loom::thread;
use std::collections::VecDeque;
// The world around the state machines (processes, mailboxes, what subscribers received,
// the test's own tallies) uses std's atomics, invisible to loom: they add no
// interleavings of their own. Loom runs a model's threads one at a time on one OS thread,
// so they read what was last written, in the order loom scheduled the steps. Every step
// that stands for something another process may race with starts with a loom lock, where
// loom may switch threads.
use std::sync::atomic::{AtomicBool as StdBool, AtomicUsize as StdCount};

/// Runs `f` under every interleaving with at most `preemptions` preemptions
/// (`LOOM_MAX_PREEMPTIONS` overrides it), and says how many it ran (`--nocapture`).
fn model(preemptions: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    // Bugs of this kind show within a few preemptions (every seed fails within 3); each
    // model's bound is the highest that keeps it to a few seconds, for CI.
    builder.preemption_bound = Some(preemptions);
    if let Some(bound) = std::env::var("LOOM_MAX_PREEMPTIONS")
        .ok()
        .and_then(|bound| bound.parse().ok())
    {
        builder.preemption_bound = Some(bound);
    }
    let runs = std::sync::Arc::new(StdCount::new(0));
    let counted = runs.clone();
    builder.check(move || {
        counted.fetch_add(1, Ordering::Relaxed);
        f();
    });
    eprintln!(
        "{} interleavings (preemption bound {:?})",
        load(&runs),
        builder.preemption_bound
    );
}

/// A waiting producer: the grants it got (each must be exactly one).
struct Waiter {
    id: usize,
    grants: Arc<AtomicUsize>,
    order: Arc<Mutex<Vec<usize>>>,
}

fn grant(waiter: &Waiter) -> bool {
    waiter.grants.fetch_add(1, Ordering::SeqCst);
    lock(&waiter.order).push(waiter.id);
    true
}

fn waiter(id: usize, order: &Arc<Mutex<Vec<usize>>>) -> (Waiter, Arc<AtomicUsize>) {
    let grants = Arc::new(AtomicUsize::new(0));
    let waiter = Waiter {
        id,
        grants: grants.clone(),
        order: order.clone(),
    };
    (waiter, grants)
}

/// Two producers race for the one credit of a full lane while its batch is delivered.
/// A producer that takes a credit delivers its batch at once; one that is queued must be
/// granted exactly one credit by the time every other credit came back (no lost
/// wake-up), and once its batch is delivered too the lane is idle again (no credit
/// leaked or doubled).
///
/// Seed `put_back_checks_queue_early`: a returned credit looks for waiters before it
/// takes the queue's lock, and misses a producer that queues in between.
#[test]
fn credits_are_neither_lost_nor_doubled_and_every_waiter_is_woken() {
    model(5, || {
        let lanes: Arc<Lanes<Waiter>> = Arc::new(Lanes::new(1, 1));
        let order = Arc::new(Mutex::new(Vec::new()));
        lanes.try_reserve(0).expect("a fresh lane has room");
        let producers: Vec<_> = (1..=2)
            .map(|id| {
                let lanes = lanes.clone();
                let (w, grants) = waiter(id, &order);
                thread::spawn(move || match lanes.reserve_or_queue(0, w, grant) {
                    Ok(Reservation::Taken) => {
                        lanes.release(0, grant);
                        None
                    }
                    Ok(Reservation::Queued) => Some(grants),
                    Err(refused) => panic!("refused: {refused:?}"),
                })
            })
            .collect();
        // The batch that filled the lane is delivered.
        lanes.release(0, grant);
        let mut queued: Vec<_> = producers
            .into_iter()
            .filter_map(|p| p.join().expect("producer"))
            .collect();
        // Every credit not held by a queued producer came back, so one of them holds a
        // grant; its batch is delivered, which must wake the next, and so on.
        while !queued.is_empty() {
            let Some(at) = queued.iter().position(|g| g.load(Ordering::SeqCst) > 0) else {
                panic!("a waiter was never woken");
            };
            assert_eq!(queued.remove(at).load(Ordering::SeqCst), 1, "granted twice");
            lanes.release(0, grant);
        }
        let stats = lanes.stats();
        assert_eq!(stats.in_flight, 0, "a credit leaked");
        assert_eq!(stats.waiting, 0);
        assert_eq!(stats.delivered, 3);
        assert!(lanes.is_idle(0));
    });
}

/// Waiters queued in order are served in that order, whichever thread gives the
/// credits back and however those threads interleave; nobody jumps the queue.
///
/// Seed `try_reserve_ignores_queue`: `try_reserve` takes a free credit without looking
/// at the queue, so a newcomer takes the credit a release was about to grant.
#[test]
fn waiters_are_served_first_come_first_served() {
    model(5, || {
        let lanes: Arc<Lanes<Waiter>> = Arc::new(Lanes::new(1, 2));
        let order = Arc::new(Mutex::new(Vec::new()));
        lanes.try_reserve(0).expect("room");
        lanes.try_reserve(0).expect("room");
        let mut counters = Vec::new();
        for id in 1..=2 {
            let (w, grants) = waiter(id, &order);
            let queued = lanes.reserve_or_queue(0, w, grant);
            assert_eq!(queued, Ok(Reservation::Queued));
            counters.push(grants);
        }
        let releasers: Vec<_> = (0..2)
            .map(|_| {
                let lanes = lanes.clone();
                thread::spawn(move || lanes.release(0, grant))
            })
            .collect();
        // A newcomer racing the releases must not overtake the queue.
        let newcomer = lanes.try_reserve(0);
        for releaser in releasers {
            releaser.join().expect("releaser");
        }
        assert!(newcomer.is_err(), "a newcomer jumped the queue");
        assert_eq!(*lock(&order), vec![1, 2]);
        assert!(counters.iter().all(|g| g.load(Ordering::SeqCst) == 1));
        assert_eq!(lanes.stats().in_flight, 2);
    });
}

/// The one lane of the models below.
const LANE: usize = 0;
/// The lane's sender processes: the first one, and the one that replaces it (pid 0 is
/// "no sender" to `Handoff`).
const FIRST: u64 = 1;
const SECOND: u64 = 2;

/// One lane's share of one dispatch, as `nif::lanes::Batch`: who dispatched it, its
/// number among that producer's dispatches, the subscribers it goes to (in order), how
/// far its sender got, and whether it is finished.
struct Batch {
    producer: u64,
    seq: usize,
    part: Vec<usize>,
    cursor: AtomicUsize,
    done: AtomicBool,
}

/// The key a producer's batches are recorded under in the hand-over (its pid).
fn key(producer: u64) -> u64 {
    // Seed `shared_producer_key`: every producer under one key, as in the old model,
    // whose `producer()` was always 1. A single producer cannot tell the difference.
    if cfg!(loom_seed = "shared_producer_key") {
        return 1;
    }
    producer
}

impl Tracked for Batch {
    fn producer(&self) -> u64 {
        key(self.producer)
    }

    fn done(&self) -> &AtomicBool {
        &self.done
    }
}

/// What the world counts on the side, to check the lanes' own figures against.
#[derive(Default)]
struct Tally {
    /// Batches handed over, and the deliveries they were to make.
    batches: StdCount,
    positions: StdCount,
    /// Deliveries a producer made itself.
    inline: StdCount,
    /// Batches that a kill took with it (in a sender's mailbox or hands), and the
    /// deliveries they had not made: the only losses allowed.
    died: StdCount,
    died_positions: StdCount,
    /// Batches a producer sent to a new sender before it had pulled what was parked:
    /// its mailbox would mix them with the parked ones, whose order against a
    /// producer's own OTP does not keep (docs/design.md, "Who sends to whom").
    mixed: StdCount,
}

fn add(counter: &StdCount, n: usize) {
    counter.fetch_add(n, Ordering::SeqCst);
}

fn load(counter: &StdCount) -> usize {
    counter.load(Ordering::SeqCst)
}

/// A lane's credits never run out in these models: `grant` is never called.
fn no_waiter(_: &()) -> bool {
    unreachable!("nobody waits in this model")
}

/// The world around one lane, as the glue sees it: the lane's credits (`Lanes`) and
/// hand-over (`Handoff`), two sender processes with mailboxes, and two subscribers whose
/// queues record, in arrival order, each message as (producer, seq).
struct World {
    lanes: Lanes<()>,
    lane: Handoff<Arc<Batch>, ()>,
    /// Each sender's mailbox, by pid. A sender holds its mailbox's lock through each NIF
    /// call on a normal scheduler, and a kill takes it: a process is killed between two
    /// calls, never inside one. A dirty call runs without it (see `deliver_dirty`).
    mailboxes: [Mutex<VecDeque<Arc<Batch>>>; 3],
    /// False once the process is killed: written under its mailbox lock, read under
    /// the loom lock of the step that depends on it (a send to it, or a send of its).
    alive: [StdBool; 3],
    /// True once the sender has pulled every batch parked for it (`replace`).
    drained: [StdBool; 3],
    /// One lock for all subscribers: each send is one step, as the VM makes it.
    queues: Mutex<[Vec<(u64, usize)>; 2]>,
    tally: Tally,
}

impl World {
    fn new(capacity: usize) -> Self {
        World {
            lanes: Lanes::new(1, capacity),
            lane: Handoff::new(),
            mailboxes: [
                Mutex::new(VecDeque::new()),
                Mutex::new(VecDeque::new()),
                Mutex::new(VecDeque::new()),
            ],
            alive: [StdBool::new(false), StdBool::new(true), StdBool::new(true)],
            // The first sender is installed before anything is parked.
            drained: [StdBool::new(false), StdBool::new(true), StdBool::new(false)],
            queues: Mutex::new([Vec::new(), Vec::new()]),
            tally: Tally::default(),
        }
    }

    fn alive(&self, pid: u64) -> bool {
        self.alive[pid as usize].load(Ordering::SeqCst)
    }

    /// `Dispatcher::clear_for`: the rule a producer follows to send a small dispatch to
    /// a lane itself.
    fn clear_for(&self, producer: u64) -> bool {
        self.lanes.is_idle(LANE) || self.lane.clear_for(key(producer))
    }

    /// `dispatch_to` for one lane: a small dispatch the producer sends itself when it is
    /// clear of the lane; anything else takes a credit and is handed over
    /// (`nif::lanes::hand_over`).
    fn dispatch(&self, producer: u64, seq: usize, part: &[usize], small: bool) {
        if small && self.clear_for(producer) {
            for &subscriber in part {
                lock(&self.queues)[subscriber].push((producer, seq));
                add(&self.tally.inline, 1);
            }
            return;
        }
        self.lanes
            .try_reserve(LANE)
            .expect("the models' lanes never fill");
        add(&self.tally.batches, 1);
        add(&self.tally.positions, part.len());
        let batch = Arc::new(Batch {
            producer,
            seq,
            part: part.to_vec(),
            cursor: AtomicUsize::new(0),
            done: AtomicBool::new(false),
        });
        let handed = self
            .lane
            .hand(batch.clone(), |pid, b| self.send_batch(pid, b), |_| ());
        match handed {
            Handed::Lost => self.give_back_undelivered(&batch),
            // Seed `credit_back_on_park`: a parked batch gives its credit back, as if
            // it were lost, so the lane looks idle while it waits for a sender.
            Handed::Parked if cfg!(loom_seed = "credit_back_on_park") => {
                self.lanes.give_back(LANE, 0, no_waiter)
            }
            _ => {}
        }
    }

    /// `send/2` of a batch to a sender: false when it is dead.
    fn send_batch(&self, pid: u64, batch: &Arc<Batch>) -> bool {
        let mut mailbox = lock(&self.mailboxes[pid as usize]);
        if !self.alive(pid) {
            return false;
        }
        if !self.drained[pid as usize].load(Ordering::SeqCst) {
            add(&self.tally.mixed, 1);
        }
        mailbox.push_back(batch.clone());
        true
    }

    /// `Batch::give_back_undelivered`: what it had not delivered is lost, and its credit
    /// goes back.
    fn give_back_undelivered(&self, batch: &Batch) {
        let lost = batch
            .part
            .len()
            .saturating_sub(batch.cursor.load(Ordering::Acquire));
        // Seed `lost_ignores_cursor`: a batch reclaimed part-way counts all its
        // deliveries lost, the ones made before its sender died too.
        let lost = if cfg!(loom_seed = "lost_ignores_cursor") {
            batch.part.len()
        } else {
            lost
        };
        self.lanes.give_back(LANE, lost, no_waiter);
    }

    /// `nif::lanes::advance`: records how far the batch got; once at its end, it is
    /// finished (unless a reclaim got there first): it leaves the hand-over, and its
    /// credit goes back.
    fn advance(&self, batch: &Arc<Batch>, next: usize) -> bool {
        batch.cursor.store(next, Ordering::Release);
        let done = next >= batch.part.len();
        // Seed `release_at_first_slice`: the credit goes back once the sender has
        // started the batch (its first slice), not when it is done, so the lane looks
        // idle while the batch is half-way.
        let early = cfg!(loom_seed = "release_at_first_slice");
        if done && !batch.done.swap(true, Ordering::AcqRel) {
            self.lane.finish(batch);
            if !early {
                self.lanes.release(LANE, no_waiter);
            }
        }
        if early && next == 1 {
            self.lanes.release(LANE, no_waiter);
        }
        done
    }

    /// One `deliver/2` call: one more subscriber of `batch` (the time slice of the
    /// models), then `advance`.
    fn deliver_slice(&self, batch: &Arc<Batch>) -> bool {
        let start = batch.cursor.load(Ordering::Acquire);
        if let Some(&subscriber) = batch.part.get(start) {
            lock(&self.queues)[subscriber].push((batch.producer, batch.seq));
        }
        self.advance(batch, start + 1)
    }

    /// One `deliver_dirty/2` call by the sender `pid`, on a dirty scheduler: the process
    /// may be killed at any point of it, its monitor fires while the call runs on, and
    /// from then on every send it makes is dropped (`enif_send` from a dead process).
    fn deliver_dirty(&self, pid: u64, batch: &Arc<Batch>) -> bool {
        let start = batch.cursor.load(Ordering::Acquire);
        let mut sent = 0;
        for &subscriber in &batch.part[start..] {
            let delivered = {
                let mut queues = lock(&self.queues);
                let alive = self.alive(pid);
                if alive {
                    queues[subscriber].push((batch.producer, batch.seq));
                }
                alive
            };
            // Seed `dirty_counts_failed_sends`: what a killed sender could no longer send
            // passes for delivered.
            if !delivered && !self.alive(pid) && !cfg!(loom_seed = "dirty_counts_failed_sends") {
                break;
            }
            sent += 1;
        }
        self.advance(batch, start + sent)
    }

    /// The sender `pid` takes the oldest message in its mailbox and delivers it, one
    /// `deliver/2` call after another, with the mailbox unlocked between two calls (the
    /// process can be killed there, with the batch in its hands). False when it is dead
    /// or has nothing to do.
    fn serve(&self, pid: u64) -> bool {
        let Some(batch) = self.receive(pid) else {
            return false;
        };
        loop {
            let mailbox = lock(&self.mailboxes[pid as usize]);
            if !self.alive(pid) {
                // Killed between two calls: the batch dies in its hands.
                add(&self.tally.died, 1);
                add(
                    &self.tally.died_positions,
                    batch.part.len() - batch.cursor.load(Ordering::Acquire),
                );
                return true;
            }
            let done = self.deliver_slice(&batch);
            drop(mailbox);
            if done {
                return true;
            }
        }
    }

    /// The `receive` of the sender `pid`: its oldest message, if it is alive.
    fn receive(&self, pid: u64) -> Option<Arc<Batch>> {
        let mut mailbox = lock(&self.mailboxes[pid as usize]);
        if !self.alive(pid) {
            return None;
        }
        mailbox.pop_front()
    }

    /// Kills the sender `pid` between two of its calls: what its mailbox held dies with
    /// it (a batch in its hands is counted by `serve`).
    fn kill(&self, pid: u64) {
        let mut mailbox = lock(&self.mailboxes[pid as usize]);
        self.alive[pid as usize].store(false, Ordering::SeqCst);
        add(&self.tally.died, mailbox.len());
        for batch in mailbox.drain(..) {
            add(
                &self.tally.died_positions,
                batch.part.len() - batch.cursor.load(Ordering::Acquire),
            );
        }
    }

    /// The dead sender's monitor fires (`Dispatcher::reclaim`): its unfinished batches
    /// are counted lost, their credits given back.
    fn reclaim(&self, pid: u64) {
        for batch in self.lane.reclaim(pid) {
            self.give_back_undelivered(&batch);
        }
    }

    /// The server replaces the dead sender: `set_senders/2`, then the new sender pulls
    /// what was parked (`take_parked/2`) and delivers it before the lane opens.
    fn replace(&self, pid: u64) {
        if self.lane.install(pid) == Installed::MustDrain {
            while let Some((batch, ())) = self.lane.take_parked(pid) {
                while !self.deliver_slice(&batch) {}
            }
        }
        // Set before this thread's next loom step, so before any other thread can see
        // the lane open.
        self.drained[pid as usize].store(true, Ordering::SeqCst);
    }

    /// Every subscriber's messages, each producer's in the order it dispatched them.
    fn assert_in_order(&self) -> [Vec<(u64, usize)>; 2] {
        let queues = lock(&self.queues).clone();
        for (subscriber, queue) in queues.iter().enumerate() {
            for producer in [1, 2] {
                let seqs: Vec<usize> = queue
                    .iter()
                    .filter(|(p, _)| *p == producer)
                    .map(|(_, seq)| *seq)
                    .collect();
                assert!(
                    seqs.windows(2).all(|w| w[0] < w[1]),
                    "subscriber {subscriber} got producer {producer}'s messages out of order \
                     or twice: {queue:?}"
                );
            }
        }
        queues
    }

    /// Checks, once every thread is done, what holds whatever the interleaving:
    ///
    /// * each producer's messages reached each subscriber in dispatch order;
    /// * every batch finished exactly once: delivered, or reclaimed and counted lost;
    /// * each delivery was made or counted lost, never both, and only batches that a
    ///   kill took with it were lost;
    /// * nothing stays parked, recorded or in flight.
    fn assert_exact(&self) {
        let queues = self.assert_in_order();
        let stats = self.lanes.stats();
        let t = &self.tally;
        let received: usize = queues.iter().map(Vec::len).sum();
        let delivered = received - load(&t.inline);
        assert_eq!(
            stats.delivered + stats.lost_batches,
            load(&t.batches) as u64,
            "a batch was neither delivered nor counted lost, or both"
        );
        assert_eq!(
            delivered as u64 + stats.lost_deliveries,
            load(&t.positions) as u64,
            "a delivery was neither made nor counted lost, or both: {queues:?}"
        );
        assert_eq!(
            (stats.lost_batches, stats.lost_deliveries),
            (load(&t.died) as u64, load(&t.died_positions) as u64),
            "lost what no kill took (a batch that reached no sender must park)"
        );
        self.assert_settled();
    }

    fn assert_settled(&self) {
        assert_eq!(
            load(&self.tally.mixed),
            0,
            "a producer sent to a new sender before it had pulled what was parked"
        );
        assert_eq!(self.lanes.stats().in_flight, 0, "a credit leaked");
        assert_eq!(self.lane.parked(), 0, "a batch stayed parked");
        assert_eq!(self.lane.producers(), 0, "a finished batch stayed recorded");
    }
}

/// Two producers hand batches to one lane and then dispatch small messages, which each
/// sends itself only when clear of the lane (`is_idle || clear_for`), while the lane's
/// sender delivers. One producer's finished batch must never clear the other: each
/// subscriber gets each producer's messages in order, and everything is delivered.
///
/// Seed `shared_producer_key`: both producers' last batches recorded under one key. The
/// second producer's batch, sent while the first was still sending its own outside the
/// lock, finishes first and clears the first producer too early.
#[test]
fn two_producers_last_batches_are_never_mixed_up() {
    model(3, || {
        let world = Arc::new(World::new(4));
        assert_eq!(world.lane.install(FIRST), Installed::Open);
        let producers: Vec<_> = [1, 2]
            .into_iter()
            .map(|producer| {
                let world = world.clone();
                thread::spawn(move || {
                    world.dispatch(producer, 1, &[0], false);
                    world.dispatch(producer, 2, &[0], true);
                })
            })
            .collect();
        // The sender delivers whatever has reached it meanwhile.
        world.serve(FIRST);
        world.serve(FIRST);
        for producer in producers {
            producer.join().expect("producer");
        }
        while world.serve(FIRST) {}
        world.assert_exact();
        let [queue, _] = world.assert_in_order();
        assert_eq!(queue.len(), 4, "a message was lost: {queue:?}");
    });
}

/// Two producers each hand a batch to the lane's sender, and then dispatch a small
/// message, while that sender is killed before it took anything, its monitor reclaims
/// what it held and a new sender takes over. Each producer's send happens outside the
/// hand-over's lock and must find its own record again afterwards, whatever the other
/// producer recorded meanwhile: every batch that died in the mailbox is counted lost
/// once and gives its credit back, the others reach the new sender, in order.
///
/// Seed `hand_finds_any_record`: after its send, a producer looks up its record by the
/// sender's pid alone, and marks the other producer's batch as sent instead of its own.
#[test]
fn two_producers_hand_over_across_a_sender_kill() {
    model(3, || {
        let world = Arc::new(World::new(4));
        world.lane.install(FIRST);
        let producers: Vec<_> = [1, 2]
            .into_iter()
            .map(|producer| {
                let world = world.clone();
                thread::spawn(move || {
                    world.dispatch(producer, 1, &[0], false);
                    world.dispatch(producer, 2, &[0], true);
                })
            })
            .collect();
        world.kill(FIRST);
        world.reclaim(FIRST);
        world.replace(SECOND);
        for producer in producers {
            producer.join().expect("producer");
        }
        while world.serve(SECOND) {}
        world.assert_exact();
    });
}

/// A producer hands a batch and then dispatches twice more (small: sent itself when
/// clear of the lane) while the lane's sender is killed, its monitor reclaims its
/// batches, and a new sender is installed and pulls what was parked. Whatever the
/// interleaving, each message reaches the subscriber in order or is counted lost, and
/// only batches that died with the killed sender are lost (a send that failed parks).
///
/// Seeds: `credit_back_on_park` (a parked batch holds no credit, so the lane looks idle
/// and a small dispatch overtakes it), `reclaim_takes_sending` (a reclaim takes the
/// batch a producer is still sending, which then parks and is delivered as well as
/// counted lost), and `take_parked_opens_early` (the lane opens to producers when the
/// new sender has pulled one parked batch, not all).
#[test]
fn a_producers_order_holds_across_a_sender_replacement() {
    model(4, || {
        let world = Arc::new(World::new(3));
        world.lane.install(FIRST);
        let producer = {
            let world = world.clone();
            thread::spawn(move || {
                world.dispatch(1, 1, &[0], false);
                world.dispatch(1, 2, &[0], true);
                world.dispatch(1, 3, &[0], true);
            })
        };
        let first_sender = {
            let world = world.clone();
            thread::spawn(move || {
                world.serve(FIRST);
            })
        };
        // The server: the sender dies, its monitor reclaims, a new one takes over.
        world.kill(FIRST);
        world.reclaim(FIRST);
        world.replace(SECOND);
        first_sender.join().expect("first sender");
        producer.join().expect("producer");
        while world.serve(SECOND) {}
        world.assert_exact();
    });
}

/// A batch to two subscribers is delivered in two `deliver/2` calls, the sender's lock
/// released between them, while the producer dispatches a small message to both and the
/// sender may be killed between the two calls (its monitor reclaims the batch part-way,
/// and a new sender takes over). The small message waits for the whole batch, and a
/// batch reclaimed half-way counts only the deliveries it had not made.
///
/// Seeds: `release_at_first_slice` (the credit goes back after the first call, the lane
/// looks idle, and the small message overtakes the second half), and `lost_ignores_cursor` (the
/// reclaim counts the first half lost though it was delivered).
#[test]
fn a_batch_in_two_slices_keeps_order_and_counts_exactly() {
    model(4, || {
        let world = Arc::new(World::new(3));
        world.lane.install(FIRST);
        world.dispatch(1, 1, &[0, 1], false);
        let producer = {
            let world = world.clone();
            thread::spawn(move || world.dispatch(1, 2, &[0, 1], true))
        };
        let first_sender = {
            let world = world.clone();
            thread::spawn(move || {
                world.serve(FIRST);
            })
        };
        world.kill(FIRST);
        world.reclaim(FIRST);
        world.replace(SECOND);
        first_sender.join().expect("first sender");
        producer.join().expect("producer");
        while world.serve(SECOND) {}
        world.assert_exact();
    });
}

/// The dirty-scheduler path: the sender is killed in the middle of a `deliver_dirty/2`
/// call, and its monitor reclaims the batch while the call runs on (its sends fail from
/// then on), as the producer dispatches a small message to the same subscribers. Each
/// subscriber still gets the producer's messages in order, and no delivery that was not
/// made goes uncounted.
///
/// The figures are not exact on this path (see the checks below): a reclaim during the
/// call may count deliveries it made as lost, and a batch as neither delivered nor lost.
///
/// Seed `dirty_counts_failed_sends`: the call does not stop at a failed send of its
/// killed process, so the sends it could not make pass for delivered.
#[test]
fn a_reclaim_part_way_through_a_dirty_delivery() {
    model(4, || {
        let world = Arc::new(World::new(3));
        world.lane.install(FIRST);
        world.dispatch(1, 1, &[0, 1], false);
        let first_sender = {
            let world = world.clone();
            thread::spawn(move || {
                if let Some(batch) = world.receive(FIRST) {
                    world.deliver_dirty(FIRST, &batch);
                }
            })
        };
        let producer = {
            let world = world.clone();
            thread::spawn(move || world.dispatch(1, 2, &[0, 1], true))
        };
        world.kill(FIRST);
        world.reclaim(FIRST);
        world.replace(SECOND);
        first_sender.join().expect("first sender");
        producer.join().expect("producer");
        while world.serve(SECOND) {}

        let queues = world.assert_in_order();
        let stats = world.lanes.stats();
        let t = &world.tally;
        let received: usize = queues.iter().map(Vec::len).sum();
        let delivered = (received - load(&t.inline)) as u64;
        let (batches, positions) = (load(&t.batches) as u64, load(&t.positions) as u64);
        assert!(
            delivered + stats.lost_deliveries >= positions,
            "a delivery not made was not counted lost: {queues:?}, {stats:?}"
        );
        // Not exact on this path, and loom reaches both: the reclaim reads the cursor
        // the call has not stored yet, so the sends of the call in progress (at most the
        // whole batch) are counted lost though they were made; and a reclaim between the
        // call's last `advance` store and its `done` swap finds nothing left to count,
        // so that batch counts neither as delivered nor as lost.
        assert!(
            delivered + stats.lost_deliveries <= positions + 2,
            "counted lost beyond the batch in the killed call: {queues:?}, {stats:?}"
        );
        assert!(
            (batches - 1..=batches).contains(&(stats.delivered + stats.lost_batches)),
            "a batch finished twice, or more than the killed call's went uncounted: {stats:?}"
        );
        world.assert_settled();
    });
}

/// `on_slow: :catch_up`'s parking (`history::parked`), driven as `nif::dispatch`,
/// `nif::parking` and `nif::replay` drive it. Under the history lock a dispatch records
/// its message, takes its `Track` and reads whether the subscriber is in the registry;
/// it then hands the message to its lane, whose sender sends it (to the subscriber, if
/// it was in) and drops the `Track` (taking only the topic's small lock). Meanwhile the
/// watchdog parks the subscriber (out of the registry, under the history lock), and the
/// subscriber, told so, unparks (asking again on `Wait`), sends itself what was kept for
/// it a message at a time outside the lock, and re-enters the registry when it has
/// caught up, under the lock. It must end with each dispatch once, in order, whichever
/// way it came: live, or from the history.
///
/// Seed `unpark_ignores_inflight`: `unpark` answers `Ready` while a dispatch from before
/// the park is still in the lane; the subscriber then sends itself the later dispatch
/// from the history before the sender's send of the earlier one.
#[test]
fn a_parked_subscriber_catches_up_in_order_while_a_dispatch_is_out() {
    use crate::history::{History, Take, Track, Unpark};

    const TOPIC: &[u8] = b"t";
    const PID: u64 = 1;

    /// What the history lock guards: the history, and (standing for the registry, which
    /// parking and a dispatch's snapshot use under that lock) whether the subscriber is in.
    struct Locked {
        history: History<u32, ()>,
        subscribed: bool,
    }

    /// Sends a dispatch as its lane's sender does: to the subscriber if it was in the
    /// dispatch's snapshot; then its `Track` goes.
    fn send(mailbox: &Mutex<Vec<u32>>, (seq, live, track): (u32, bool, Option<Track>)) {
        if live {
            lock(mailbox).push(seq);
        }
        drop(track);
    }

    model(5, || {
        let mut history = History::new(100, 1 << 20);
        history.watch(TOPIC, true);
        let state = Arc::new(Mutex::new(Locked {
            history,
            subscribed: true,
        }));
        let mailbox = Arc::new(Mutex::new(Vec::new()));

        let record = |state: &Mutex<Locked>, seq: u32| {
            let mut locked = lock(state);
            drop(locked.history.record(TOPIC, seq, 8).expect("open"));
            (seq, locked.subscribed, locked.history.track(TOPIC))
        };
        // The producer's first dispatch goes to a sender, which sends it while the
        // producer goes on; the second, recorded meanwhile, is sent after it (a lane
        // keeps one producer's order).
        let producer = {
            let (state, mailbox) = (state.clone(), mailbox.clone());
            thread::spawn(move || {
                let first = record(&state, 1);
                let sender = {
                    let mailbox = mailbox.clone();
                    thread::spawn(move || send(&mailbox, first))
                };
                let second = record(&state, 2);
                sender.join().expect("sender");
                send(&mailbox, second);
            })
        };
        let watchdog = {
            let state = state.clone();
            thread::spawn(move || {
                let mut locked = lock(&state);
                let parked = locked.history.park(TOPIC, PID, ());
                assert!(parked.is_ok(), "a subscriber in the registry can be parked");
                drop(parked);
                locked.subscribed = false;
            })
        };

        // The subscriber: catch_up/1 once it is told (after the park).
        watchdog.join().expect("watchdog");
        loop {
            match lock(&state).history.unpark(TOPIC, PID) {
                Unpark::Ready => break,
                Unpark::Wait => thread::yield_now(),
                Unpark::NotParked => panic!("parked, and nobody else unparks it"),
            }
        }
        loop {
            let mut locked = lock(&state);
            match locked.history.take(TOPIC, PID, 1, usize::MAX) {
                Take::Chunk { missed, entries } => {
                    drop(locked);
                    assert_eq!(missed, 0, "nothing is cut in this model");
                    let sent = entries.len();
                    lock(&mailbox).extend(entries.iter().map(|entry| entry.message));
                    drop(entries);
                    let mut locked = lock(&state);
                    drop(locked.history.give_back(TOPIC, PID, sent, false).ok());
                }
                Take::CaughtUp { .. } => {
                    // Back in the registry, under the same lock (`nif::replay::enter`).
                    locked.subscribed = true;
                    break;
                }
                Take::Removed | Take::Parked => panic!("a joiner that may take"),
            }
        }
        producer.join().expect("producer");
        assert_eq!(*lock(&mailbox), vec![1, 2], "lost, doubled or out of order");
    });
}
