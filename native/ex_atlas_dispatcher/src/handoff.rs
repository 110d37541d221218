//! The hand-over of batches to one lane's sender process, and the order rules built on it.
//!
//! Plain Rust with no rustler types: the glue (`nif::lanes`) supplies how a batch is sent
//! to a process and how it is kept while no process can take it. A [`Handoff`] holds,
//! under one short lock:
//!
//! * the lane's sender (a pid; 0 before the first one) and whether it is *open*, that is,
//!   takes batches straight from producers;
//! * `in_flight`: every batch sent to a sender and not finished, with that sender's pid,
//!   so that a sender's death reclaims exactly the batches it held ([`Handoff::reclaim`]);
//! * `parked`: batches handed to the lane while it was closed (its sender dead or not yet
//!   drained), in order. A new sender is not opened until it has *pulled* every parked
//!   batch itself ([`Handoff::take_parked`]), so nothing a producer hands over later can
//!   reach it first: the sender's own mailbox never mixes batches from two origins, whatever
//!   OTP does to the order of signals from different processes;
//! * `last`: the most recent batch each producer handed to the lane while it is not
//!   finished. A producer whose last batch here is finished has had every message of its
//!   earlier dispatches through this lane sent ([`Handoff::clear_for`]), so it may send
//!   the next one itself without overtaking them. Entries go when their batch finishes
//!   ([`Handoff::finish`]), so the map never holds more than the batches in flight.
//!
//! Sending happens outside the lock: a copy of a big message takes milliseconds, and other
//! producers must not wait for it. The price is that a sender may die between the look-up
//! and the send. A batch is therefore recorded as *sending* first: a reclaim of its sender
//! meanwhile only marks it orphaned. If the send then fails, nothing reached anyone, and
//! the batch is parked for the next sender; if it succeeded, it died in the sender's
//! mailbox, and the producer counts it lost ([`Handed::Lost`]).

use crate::sync::{lock, AtomicBool, Mutex, Ordering};
use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::ops::Deref;

/// A process id as the glue stores it (0: none).
pub type Pid = u64;

/// What a batch must tell the hand-over.
pub trait Tracked {
    /// The process that dispatched it.
    fn producer(&self) -> Pid;
    /// Set once the batch will send nothing more: delivered to the end, or reclaimed.
    fn done(&self) -> &AtomicBool;
}

/// What [`Handoff::hand`] did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handed {
    /// Sent to the lane's sender.
    Sent,
    /// Kept until a sender pulls it.
    Parked,
    /// Not sent: found done already (whoever marked it done accounts for it), with
    /// the lane closed; nothing is left for the caller to do.
    AlreadyDone,
    /// Sent to a sender that died before it could take it, or handed to a closed lane:
    /// now marked done, and the caller counts what it had not delivered as lost and gives
    /// its credit back.
    Lost,
}

/// Where a batch in flight stands with its sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leg {
    /// A producer is sending it, outside the lock.
    Sending,
    /// In the sender's mailbox or hands.
    Sent,
    /// Its sender was reclaimed while it was being sent (see [`Handoff::hand`]).
    Orphaned,
}

/// What [`Handoff::install`] asks the glue to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// The new sender is open: producers send to it directly.
    Open,
    /// Batches are parked: tell the new sender to pull them (`take_parked`).
    MustDrain,
}

struct State<H, O> {
    pid: Pid,
    open: bool,
    /// Set by [`Handoff::clear`]: nothing is sent or parked any more.
    closed: bool,
    in_flight: VecDeque<(Pid, H, Leg)>,
    parked: VecDeque<(H, O)>,
    last: FxHashMap<Pid, H>,
}

/// One lane's sender and its batches on their way; see the module documentation.
pub struct Handoff<H, O> {
    state: Mutex<State<H, O>>,
}

impl<H, O> Default for Handoff<H, O> {
    fn default() -> Self {
        Handoff {
            state: Mutex::new(State {
                pid: 0,
                open: false,
                closed: false,
                in_flight: VecDeque::new(),
                parked: VecDeque::new(),
                last: FxHashMap::default(),
            }),
        }
    }
}

fn is_done<H: Deref<Target = B>, B: Tracked + ?Sized>(batch: &H) -> bool {
    batch.done().load(Ordering::Acquire)
}

fn same<H: Deref<Target = B>, B: ?Sized>(a: &H, b: &H) -> bool {
    std::ptr::addr_eq(&**a as *const B, &**b as *const B)
}

impl<H, O, B> Handoff<H, O>
where
    H: Clone + Deref<Target = B>,
    B: Tracked + ?Sized,
{
    /// A hand-over with no sender yet: batches park until [`Handoff::install`].
    pub fn new() -> Self {
        Self::default()
    }

    /// True when `producer` has nothing of its own still to be sent through this lane:
    /// its last batch here, if any, is finished.
    pub fn clear_for(&self, producer: Pid) -> bool {
        let state = lock(&self.state);
        state.last.get(&producer).is_none_or(is_done)
    }

    /// Hands `batch` (whose credit is taken) to the lane: `send(pid, batch)` to an open
    /// sender, answering false when that process is gone; otherwise, or after such a
    /// failure, parked with the message `park(batch)` builds, behind what is parked.
    pub fn hand(
        &self,
        batch: H,
        mut send: impl FnMut(Pid, &H) -> bool,
        park: impl FnOnce(&H) -> O,
    ) -> Handed {
        // The handles this call takes out of the state (the producer's batch it
        // replaces, the records it removes) are declared before the guard, so dropped
        // after it, when the call returns: dropping a handle may free the batch, and
        // freeing one may come back here. `_replaced` is only held for that: a plain
        // `_` pattern would drop it at once.
        let _replaced;
        let mut removed = Vec::new();
        let mut state = lock(&self.state);
        _replaced = state.last.insert(batch.producer(), batch.clone());
        loop {
            if state.closed {
                // Closed while this producer was on its way: nobody will take it.
                if batch.done().swap(true, Ordering::AcqRel) {
                    return Handed::AlreadyDone;
                }
                removed.extend(forget(&mut state, &batch).map(|b| (0, b, Leg::Sent)));
                return Handed::Lost;
            }
            if !state.open || state.pid == 0 {
                let out = park(&batch);
                state.parked.push_back((batch, out));
                return Handed::Parked;
            }
            let pid = state.pid;
            // Recorded before the send: once sent, the sender may die at any moment, and
            // its reclaim must find the batch.
            state
                .in_flight
                .push_back((pid, batch.clone(), Leg::Sending));
            drop(state);
            let sent = send(pid, &batch);
            state = lock(&self.state);
            let at = state.in_flight.iter().rposition(|(to, b, _)| {
                // Seed of the loom model `two_producers_hand_over_across_a_sender_kill`.
                *to == pid && (same(b, &batch) || cfg!(loom_seed = "hand_finds_any_record"))
            });
            let leg = at.map(|at| state.in_flight[at].2);
            if sent {
                match (at, leg) {
                    (Some(at), Some(Leg::Orphaned)) => {
                        // Its sender died with it in the mailbox.
                        removed.extend(state.in_flight.remove(at));
                        if batch.done().swap(true, Ordering::AcqRel) {
                            return Handed::Sent;
                        }
                        removed.extend(forget(&mut state, &batch).map(|b| (pid, b, Leg::Sent)));
                        return Handed::Lost;
                    }
                    (Some(at), _) => state.in_flight[at].2 = Leg::Sent,
                    // Delivered and finished already.
                    (None, _) => {}
                }
                return Handed::Sent;
            }
            // Nothing reached anyone: take the record back, and park or try the new
            // sender.
            if let Some(at) = at {
                removed.extend(state.in_flight.remove(at));
            }
            if state.pid == pid {
                // Gone before its monitor told us: close the lane until a new sender has
                // pulled what is parked.
                state.open = false;
            }
        }
    }

    /// Installs `pid` as the lane's sender. With nothing parked it is open at once;
    /// otherwise the glue must tell it to pull the parked batches first.
    pub fn install(&self, pid: Pid) -> Installed {
        let mut state = lock(&self.state);
        state.pid = pid;
        state.open = state.parked.is_empty();
        if state.open {
            Installed::Open
        } else {
            Installed::MustDrain
        }
    }

    /// For the sender `pid`: the oldest parked batch, now recorded as in flight to it,
    /// with its message. When nothing is parked, opens the lane and answers `None`; a
    /// stale sender (replaced) gets `None` and changes nothing.
    pub fn take_parked(&self, pid: Pid) -> Option<(H, O)> {
        let mut state = lock(&self.state);
        if state.pid != pid || pid == 0 {
            return None;
        }
        match state.parked.pop_front() {
            Some((batch, out)) => {
                state.in_flight.push_back((pid, batch.clone(), Leg::Sent));
                // Seed of the loom model `a_producers_order_holds_across_a_sender_...`.
                #[cfg(loom_seed = "take_parked_opens_early")]
                {
                    state.open = true;
                }
                Some((batch, out))
            }
            None => {
                state.open = true;
                None
            }
        }
    }

    /// The sender `pid` is dead: the lane closes if it was the current one, and the
    /// unfinished batches it held are taken out, marked done so that nothing else counts
    /// them again; the caller counts them as lost and gives their credits back. A batch
    /// still being sent to it is left to its producer, marked orphaned.
    pub fn reclaim(&self, pid: Pid) -> Vec<H> {
        let mut released = Vec::new();
        let mut state = lock(&self.state);
        if state.pid == pid {
            state.open = false;
        }
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(state.in_flight.len());
        for (to, batch, leg) in state.in_flight.drain(..) {
            if to != pid {
                kept.push_back((to, batch, leg));
            } else if leg == Leg::Sending
                && !is_done(&batch)
                // Seed of the loom model `a_producers_order_holds_across_a_sender_...`.
                && !cfg!(loom_seed = "reclaim_takes_sending")
            {
                kept.push_back((to, batch, Leg::Orphaned));
            } else if !batch.done().swap(true, Ordering::AcqRel) {
                taken.push(batch);
            } else {
                released.push(batch);
            }
        }
        state.in_flight = kept;
        for batch in &taken {
            released.extend(forget(&mut state, batch));
        }
        drop(state);
        drop(released);
        taken
    }

    /// `batch` finished (delivered or dropped): it leaves the producer's record, and
    /// finished batches leave the front of the in-flight list.
    pub fn finish(&self, batch: &H) {
        let mut released = Vec::new();
        let mut state = lock(&self.state);
        released.extend(forget(&mut state, batch));
        while state.in_flight.front().is_some_and(|(_, b, _)| is_done(b)) {
            released.extend(state.in_flight.pop_front().map(|(_, b, _)| b));
        }
        drop(state);
        drop(released);
    }

    /// The current sender (0: none yet).
    pub fn sender(&self) -> Pid {
        lock(&self.state).pid
    }

    /// Batches currently parked.
    pub fn parked(&self) -> usize {
        lock(&self.state).parked.len()
    }

    /// Producers with an unfinished batch recorded here (for tests and stats).
    pub fn producers(&self) -> usize {
        lock(&self.state).last.len()
    }

    /// Empties everything, for the caller to drop after unlocking (closing).
    pub fn clear(&self) -> (Vec<H>, Vec<(H, O)>) {
        let mut state = lock(&self.state);
        state.open = false;
        state.closed = true;
        state.last.clear();
        let in_flight = state.in_flight.drain(..).map(|(_, b, _)| b).collect();
        let parked = state.parked.drain(..).collect();
        (in_flight, parked)
    }
}

/// Removes `batch` from its producer's record; the handle removed, to drop unlocked.
fn forget<H, O, B>(state: &mut State<H, O>, batch: &H) -> Option<H>
where
    H: Clone + Deref<Target = B>,
    B: Tracked + ?Sized,
{
    let producer = batch.producer();
    if state.last.get(&producer).is_some_and(|b| same(b, batch)) {
        return state.last.remove(&producer);
    }
    None
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::sync::Arc;

    struct Batch {
        producer: Pid,
        id: usize,
        done: AtomicBool,
    }

    impl Tracked for Batch {
        fn producer(&self) -> Pid {
            self.producer
        }
        fn done(&self) -> &AtomicBool {
            &self.done
        }
    }

    fn batch(producer: Pid, id: usize) -> Arc<Batch> {
        Arc::new(Batch {
            producer,
            id,
            done: AtomicBool::new(false),
        })
    }

    type Lane = Handoff<Arc<Batch>, usize>;

    fn finish(lane: &Lane, b: &Arc<Batch>) {
        b.done.store(true, Ordering::Release);
        lane.finish(b);
    }

    #[test]
    fn a_producer_is_clear_once_its_last_batch_is_finished() {
        let lane = Lane::new();
        assert_eq!(lane.install(7), Installed::Open);
        assert!(lane.clear_for(1));
        let (a, b) = (batch(1, 0), batch(1, 1));
        assert_eq!(lane.hand(a.clone(), |_, _| true, |b| b.id), Handed::Sent);
        assert_eq!(lane.hand(b.clone(), |_, _| true, |b| b.id), Handed::Sent);
        assert!(!lane.clear_for(1));
        assert!(
            lane.clear_for(2),
            "another producer's batches do not hold it"
        );
        finish(&lane, &a);
        assert!(!lane.clear_for(1), "its later batch is still on its way");
        finish(&lane, &b);
        assert!(lane.clear_for(1));
        assert_eq!(lane.producers(), 0, "finished batches leave no record");
    }

    #[test]
    fn batches_park_until_the_new_sender_pulls_them_and_only_then_it_opens() {
        let lane = Lane::new();
        let sent = RefCell::new(Vec::new());
        let send = |pid: Pid, b: &Arc<Batch>| {
            sent.borrow_mut().push((pid, b.id));
            pid != 7 // 7 died
        };
        assert_eq!(lane.install(7), Installed::Open);
        assert_eq!(lane.hand(batch(1, 0), send, |b| b.id), Handed::Parked);
        assert_eq!(lane.hand(batch(2, 1), send, |b| b.id), Handed::Parked);
        assert_eq!(
            *sent.borrow(),
            vec![(7, 0)],
            "the lane closed at the first failure"
        );
        assert_eq!(lane.install(8), Installed::MustDrain);
        assert_eq!(lane.hand(batch(1, 2), send, |b| b.id), Handed::Parked);
        assert!(
            lane.take_parked(9).is_none(),
            "a stale sender takes nothing"
        );
        let pulled: Vec<usize> = std::iter::from_fn(|| lane.take_parked(8))
            .map(|(_, id)| id)
            .collect();
        assert_eq!(pulled, vec![0, 1, 2], "in the order handed");
        assert_eq!(lane.hand(batch(1, 3), send, |b| b.id), Handed::Sent);
        assert_eq!(sent.borrow().last(), Some(&(8, 3)));
    }

    #[test]
    fn a_dead_senders_batches_are_reclaimed_once() {
        let lane = Lane::new();
        lane.install(7);
        let (a, b) = (batch(1, 0), batch(2, 1));
        lane.hand(a.clone(), |_, _| true, |b| b.id);
        lane.hand(b.clone(), |_, _| true, |b| b.id);
        finish(&lane, &a);
        let taken: Vec<usize> = lane.reclaim(7).iter().map(|b| b.id).collect();
        assert_eq!(taken, vec![1], "only the unfinished one");
        assert!(lane.reclaim(7).is_empty());
        assert!(lane.clear_for(2), "a reclaimed batch holds nobody");
        assert_eq!(
            lane.hand(batch(3, 2), |_, _| true, |b| b.id),
            Handed::Parked
        );
        assert_eq!(lane.parked(), 1);
    }

    #[test]
    fn the_lane_reports_its_sender_parked_batches_and_producers() {
        let lane = Lane::new();
        assert_eq!((lane.sender(), lane.parked(), lane.producers()), (0, 0, 0));
        lane.hand(batch(1, 0), |_, _| true, |b| b.id);
        lane.hand(batch(2, 1), |_, _| true, |b| b.id);
        lane.hand(batch(2, 2), |_, _| true, |b| b.id);
        assert_eq!(
            (lane.sender(), lane.parked(), lane.producers()),
            (0, 3, 2),
            "no sender yet: all parked, two producers recorded"
        );
        assert_eq!(lane.install(7), Installed::MustDrain);
        assert_eq!(lane.sender(), 7);
        while lane.take_parked(7).is_some() {}
        assert_eq!((lane.parked(), lane.producers()), (0, 2));
    }

    /// `finish` answers for what is done, and so does a batch's own flag: a batch marked
    /// done (delivered, or reclaimed) clears its producer and is let go even before (or
    /// without) its `finish`.
    #[test]
    fn a_batch_marked_done_holds_nobody_and_is_let_go() {
        let lane = Lane::new();
        lane.install(7);
        let (a, b) = (batch(1, 0), batch(1, 1));
        lane.hand(a.clone(), |_, _| true, |b| b.id);
        lane.hand(b.clone(), |_, _| true, |b| b.id);
        b.done.store(true, Ordering::Release);
        assert!(lane.clear_for(1), "its last batch is done");
        // `a` finishes: it leaves the in-flight list, and `b` behind it, done, goes too.
        finish(&lane, &a);
        assert_eq!(Arc::strong_count(&a), 1, "the lane holds no finished batch");
        assert_eq!(Arc::strong_count(&b), 2, "b is still its producer's last");
        lane.finish(&b);
        assert_eq!(Arc::strong_count(&b), 1);
        assert!(
            lane.reclaim(7).is_empty(),
            "nothing of 7's is left to reclaim"
        );
    }

    /// The lock is not held while a batch is sent: another producer may hand a batch to
    /// the same sender meanwhile (here: from inside `send`). Each send then settles its
    /// own batch's record, not the newest one to that sender.
    #[test]
    fn a_send_settles_its_own_batch_when_another_one_was_handed_meanwhile() {
        let lane = Lane::new();
        lane.install(7);
        let (a, b) = (batch(1, 0), batch(2, 1));
        let handed = lane.hand(
            a.clone(),
            |_, _| {
                assert_eq!(lane.hand(b.clone(), |_, _| true, |b| b.id), Handed::Sent);
                true
            },
            |b| b.id,
        );
        assert_eq!(handed, Handed::Sent);
        // Both are in 7's hands: its death reclaims both (a still marked as being sent
        // would be left to a producer that has already gone).
        let mut taken: Vec<usize> = lane.reclaim(7).iter().map(|b| b.id).collect();
        taken.sort_unstable();
        assert_eq!(taken, vec![0, 1]);
        assert!(a.done.load(Ordering::Acquire) && b.done.load(Ordering::Acquire));
    }

    /// The sender dies while a producer sends to it, outside the lock: its reclaim leaves
    /// that batch to the producer. When the send failed, nothing reached anyone: the
    /// batch is parked for the next sender, not counted lost.
    #[test]
    fn a_batch_whose_send_failed_as_its_sender_died_is_parked_not_lost() {
        let lane = Lane::new();
        lane.install(7);
        let a = batch(1, 0);
        let mut reclaimed = Vec::new();
        let handed = lane.hand(
            a.clone(),
            |pid, _| {
                reclaimed = lane.reclaim(pid);
                false
            },
            |b| b.id,
        );
        assert!(reclaimed.is_empty(), "a batch being sent is its producer's");
        assert_eq!(handed, Handed::Parked);
        assert!(!a.done.load(Ordering::Acquire), "still to be delivered");
        assert_eq!(lane.install(8), Installed::MustDrain);
        assert_eq!(lane.take_parked(8).map(|(b, _)| b.id), Some(0));
    }

    /// The same, but the send succeeded: the batch died in the dead sender's mailbox, and
    /// its producer (not the reclaim) counts it lost, once.
    #[test]
    fn a_batch_sent_to_a_sender_that_died_meanwhile_is_lost_once() {
        let lane = Lane::new();
        lane.install(7);
        let a = batch(1, 0);
        let mut reclaimed = Vec::new();
        let handed = lane.hand(
            a.clone(),
            |pid, _| {
                reclaimed = lane.reclaim(pid);
                true
            },
            |b| b.id,
        );
        assert!(reclaimed.is_empty());
        assert_eq!(handed, Handed::Lost);
        assert!(a.done.load(Ordering::Acquire));
        assert!(lane.clear_for(1));
        assert_eq!(lane.producers(), 0);
        assert!(lane.reclaim(7).is_empty(), "counted once");
    }

    #[test]
    fn clear_hands_back_everything_and_closes_the_lane() {
        let lane = Lane::new();
        lane.install(7);
        let (a, b) = (batch(1, 0), batch(2, 1));
        lane.hand(a.clone(), |_, _| true, |b| b.id);
        lane.hand(b.clone(), |_, _| false, |b| b.id);
        assert_eq!(lane.parked(), 1);
        let (in_flight, parked) = lane.clear();
        assert_eq!(in_flight.iter().map(|b| b.id).collect::<Vec<_>>(), vec![0]);
        assert_eq!(
            parked.iter().map(|(_, id)| *id).collect::<Vec<_>>(),
            vec![1]
        );
        assert_eq!((lane.parked(), lane.producers()), (0, 0));
        // Closed: a batch handed now is lost (or already done), never sent nor parked.
        let c = batch(3, 2);
        let handed = lane.hand(c.clone(), |_, _| panic!("sent after clear"), |b| b.id);
        assert_eq!(handed, Handed::Lost);
        assert!(c.done.load(Ordering::Acquire));
        let d = batch(3, 3);
        d.done.store(true, Ordering::Release);
        assert_eq!(
            lane.hand(d, |_, _| panic!("sent after clear"), |b| b.id),
            Handed::AlreadyDone
        );
        assert_eq!(lane.install(8), Installed::Open);
        assert_eq!(
            lane.hand(batch(4, 4), |_, _| panic!("sent after clear"), |b| b.id),
            Handed::Lost,
            "a new sender does not reopen a cleared lane"
        );
    }
}
