//! Loom models of the lane state machines: `fanout::Lanes` (credits and waiting
//! producers) and `handoff::Handoff` (senders, in-flight and parked batches, the inline
//! rule). Loom runs each model under every interleaving of its threads' synchronisation
//! steps, up to a preemption bound, so a property that holds here holds for every order
//! those steps can take, not only the ones a stress test happened to meet.
//!
//! Run with `bash scripts/loom.sh` (RUSTFLAGS="--cfg loom", release build).

use crate::fanout::{Lanes, Reservation};
use crate::handoff::{Handed, Handoff, Installed, Tracked};
use crate::sync::{lock, AtomicBool, AtomicUsize, Mutex, Ordering};
use loom::sync::Arc;
use loom::thread;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    // Bugs of this kind show within a few preemptions; the bound keeps CI's run short.
    builder.preemption_bound = Some(3);
    builder.check(f);
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
#[test]
fn credits_are_neither_lost_nor_doubled_and_every_waiter_is_woken() {
    model(|| {
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
#[test]
fn waiters_are_served_first_come_first_served() {
    model(|| {
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

/// A batch of the model: who dispatched it, its sequence number, whether it is done.
struct Batch {
    seq: usize,
    done: AtomicBool,
}

impl Tracked for Batch {
    fn producer(&self) -> u64 {
        1
    }

    fn done(&self) -> &AtomicBool {
        &self.done
    }
}

/// The world around one lane: two sender processes (pids 1 and 2) with mailboxes, and
/// one subscriber whose queue records what reached it, in order.
struct World {
    lane: Handoff<Arc<Batch>, usize>,
    alive: [AtomicBool; 3],
    mailboxes: [Mutex<Vec<Arc<Batch>>>; 3],
    subscriber: Mutex<Vec<usize>>,
    /// Batches finished by a sender (delivered) and by a reclaim (lost).
    delivered: AtomicUsize,
    lost: AtomicUsize,
    /// Batches handed over, and dispatches the producer sent itself.
    handed: AtomicUsize,
    inline: AtomicUsize,
    /// Batches that died in a killed sender's mailbox: the only ones that may be lost.
    died: AtomicUsize,
    producer_done: AtomicBool,
}

impl World {
    fn new() -> Self {
        World {
            lane: Handoff::new(),
            alive: [
                AtomicBool::new(false),
                AtomicBool::new(true),
                AtomicBool::new(true),
            ],
            mailboxes: [
                Mutex::new(Vec::new()),
                Mutex::new(Vec::new()),
                Mutex::new(Vec::new()),
            ],
            subscriber: Mutex::new(Vec::new()),
            delivered: AtomicUsize::new(0),
            lost: AtomicUsize::new(0),
            handed: AtomicUsize::new(0),
            inline: AtomicUsize::new(0),
            died: AtomicUsize::new(0),
            producer_done: AtomicBool::new(false),
        }
    }

    /// `send/2` to a sender: false when it is dead. The mailbox lock stands for the
    /// VM's: a process is killed between two messages, never inside a send.
    fn send(&self, pid: u64, batch: &Arc<Batch>) -> bool {
        let mut mailbox = lock(&self.mailboxes[pid as usize]);
        if !self.alive[pid as usize].load(Ordering::SeqCst) {
            return false;
        }
        mailbox.push(batch.clone());
        true
    }

    /// What a sender does with one batch: sends to the subscriber, then marks the batch
    /// done (unless a reclaim got there first) and finishes it, as `advance` does.
    fn deliver(&self, batch: &Arc<Batch>) {
        lock(&self.subscriber).push(batch.seq);
        if !batch.done.swap(true, Ordering::AcqRel) {
            self.lane.finish(batch);
            self.delivered.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Sender `pid` handles the oldest message in its mailbox, if it is alive. The
    /// mailbox stays locked throughout: a kill takes effect between two messages (a
    /// NIF call is never interrupted), and the monitor's reclaim comes after the kill.
    fn step(&self, pid: u64) -> bool {
        let mut mailbox = lock(&self.mailboxes[pid as usize]);
        if !self.alive[pid as usize].load(Ordering::SeqCst) || mailbox.is_empty() {
            return false;
        }
        let batch = mailbox.remove(0);
        self.deliver(&batch);
        drop(mailbox);
        true
    }

    /// Kills sender `pid` between two messages; what its mailbox held is gone with it.
    fn kill(&self, pid: u64) {
        let mut mailbox = lock(&self.mailboxes[pid as usize]);
        self.alive[pid as usize].store(false, Ordering::SeqCst);
        self.died.fetch_add(mailbox.len(), Ordering::SeqCst);
        mailbox.clear();
    }

    /// The producer's dispatch of `seq`: to the subscriber itself when it is clear of the
    /// lane, else handed over.
    fn dispatch(&self, seq: usize, inline_allowed: bool) {
        if inline_allowed && self.lane.clear_for(1) {
            lock(&self.subscriber).push(seq);
            self.inline.fetch_add(1, Ordering::SeqCst);
            return;
        }
        self.handed.fetch_add(1, Ordering::SeqCst);
        let batch = Arc::new(Batch {
            seq,
            done: AtomicBool::new(false),
        });
        let handed = self.lane.hand(batch, |pid, b| self.send(pid, b), |b| b.seq);
        if handed == Handed::Lost {
            // Sent into the mailbox of a sender that died with it.
            self.lost.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// One producer dispatches three times (a batch, then batches or inline sends) while
/// the lane's sender is killed, its monitor reclaims its batches, and a new sender is
/// installed and drains what was parked. Whatever the interleaving:
///
/// * the subscriber gets the producer's messages in dispatch order (gaps are losses);
/// * every batch is finished exactly once: delivered, or reclaimed and counted lost;
/// * nothing stays parked or in flight: the new sender gets everything not lost.
#[test]
fn a_producers_order_holds_across_a_sender_replacement() {
    model(|| {
        let world = Arc::new(World::new());
        assert_eq!(world.lane.install(1), Installed::Open);

        let producer = {
            let world = world.clone();
            thread::spawn(move || {
                world.dispatch(1, false);
                world.dispatch(2, true);
                world.dispatch(3, true);
                world.producer_done.store(true, Ordering::SeqCst);
            })
        };
        let first_sender = {
            let world = world.clone();
            thread::spawn(move || {
                world.step(1);
            })
        };
        // The server: the sender dies, its monitor reclaims, a new one is installed and
        // pulls what was parked before it takes anything sent to it.
        world.kill(1);
        let lost = world.lane.reclaim(1);
        world.lost.fetch_add(lost.len(), Ordering::SeqCst);
        if world.lane.install(2) == Installed::MustDrain {
            while let Some((batch, _)) = world.lane.take_parked(2) {
                world.deliver(&batch);
            }
        }
        first_sender.join().expect("first sender");
        producer.join().expect("producer");
        // The new sender handles what producers sent it once it was open.
        while world.step(2) {}

        let seen = lock(&world.subscriber).clone();
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "out of order or twice: {seen:?}"
        );
        assert_eq!(world.lane.parked(), 0, "a batch stayed parked");
        assert_eq!(
            world.lane.producers(),
            0,
            "a finished batch stayed recorded"
        );
        let load = |n: &AtomicUsize| n.load(Ordering::SeqCst);
        assert_eq!(
            load(&world.delivered) + load(&world.lost),
            load(&world.handed),
            "a batch was neither delivered nor counted lost, or both"
        );
        assert_eq!(seen.len(), load(&world.delivered) + load(&world.inline));
        assert_eq!(
            load(&world.lost),
            load(&world.died),
            "a batch that reached no sender was counted lost instead of parked"
        );
    });
}

/// The inline rule on its own: a producer may send a dispatch itself only once its
/// earlier batch in the lane has reached the subscriber, whatever the sender's timing.
#[test]
fn an_inline_send_never_overtakes_the_producers_own_batch() {
    model(|| {
        let world = Arc::new(World::new());
        world.lane.install(1);
        let sender = {
            let world = world.clone();
            thread::spawn(move || {
                while !world.step(1) {
                    if world.producer_done.load(Ordering::SeqCst)
                        && lock(&world.mailboxes[1]).is_empty()
                    {
                        return;
                    }
                    thread::yield_now();
                }
                while world.step(1) {}
            })
        };
        world.dispatch(1, false);
        world.dispatch(2, true);
        world.producer_done.store(true, Ordering::SeqCst);
        sender.join().expect("sender");
        while world.step(1) {}
        let seen = lock(&world.subscriber).clone();
        assert_eq!(seen, vec![1, 2]);
    });
}
