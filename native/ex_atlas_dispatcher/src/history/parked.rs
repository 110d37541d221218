//! `on_slow: :catch_up`: subscribers *parked* on a topic while they are behind, and the
//! dispatches to such a topic still on their way to subscribers.
//!
//! Parking a subscriber takes it out of the registry and makes it a joiner at the end of
//! the topic's log, under the history lock: every dispatch recorded before it reaches the
//! subscriber live (it was in that dispatch's snapshot), every dispatch recorded after
//! waits in the history for it, within the joiners' bounds (past them it is cut, and
//! told). While parked it is never cut for falling behind, since it is not delivering.
//!
//! It may not deliver to itself from the history before every dispatch recorded before
//! it was parked has finished its sends: one of those, still in a lane or in a
//! producer's send loop, would otherwise reach it after later dispatches of the same
//! producer. So a topic with a `:catch_up` watch counts its dispatches and keeps the
//! numbers of those under way ([`InFlight`]): each holds a [`Track`], dropped when its
//! last send is done (or will never be), and [`History::unpark`] answers `Wait` while one
//! numbered below the parking point is still out. Topics without such a watch track
//! nothing.

use super::joiners::Joiner;
use super::{Evicted, History, JoinRefused, Pid, JOIN_SLACK};
use crate::sync::{lock, Mutex};
use std::collections::BTreeSet;
use std::sync::Arc;

/// The numbers of one topic's dispatches still being delivered (tracked ones only).
#[derive(Default)]
pub struct InFlight {
    numbers: Mutex<BTreeSet<u64>>,
}

impl InFlight {
    /// The lowest number still out.
    fn lowest(&self) -> Option<u64> {
        lock(&self.numbers).first().copied()
    }

    /// How many are out ([`History::in_flight`]).
    fn len(&self) -> usize {
        lock(&self.numbers).len()
    }
}

/// One dispatch under way to a topic with a `:catch_up` watch; dropping its last handle
/// says that the dispatch has sent (or given up) everything. Dropping it takes only its
/// topic's small lock, never the history's.
pub struct Track {
    inflight: Arc<InFlight>,
    number: u64,
}

impl Drop for Track {
    fn drop(&mut self) {
        lock(&self.inflight.numbers).remove(&self.number);
    }
}

/// The answer to [`History::unpark`].
#[derive(Debug, PartialEq, Eq)]
pub enum Unpark {
    /// It is an ordinary joiner again: it delivers its history to itself (`take`).
    Ready,
    /// Dispatches recorded before it was parked are still being sent: ask again later.
    Wait,
    /// It is not parked on the topic (never was, or it was unsubscribed meanwhile).
    NotParked,
}

impl<M, J> History<M, J> {
    /// What a topic's tracking allocates: its set, and one tree node per dispatch out.
    pub(super) const INFLIGHT_BYTES: usize =
        super::heap_block(std::mem::size_of::<InFlight>() + 16);

    /// One more (`true`) or one fewer `:catch_up` watch on `topic`. While it has any, its
    /// dispatches are tracked ([`History::track`]). A watch must be added before its
    /// subscription is, so that every dispatch that reaches the subscription is tracked.
    pub fn watch(&mut self, topic: &[u8], more: bool) {
        if self.closed {
            return;
        }
        self.name_of(topic);
        let Some(log) = self.topics.get_mut(topic) else {
            return;
        };
        if more {
            log.watchers += 1;
            if log.inflight.is_none() {
                log.inflight = Some(Arc::new(InFlight::default()));
                self.overhead += Self::INFLIGHT_BYTES;
            }
        } else {
            log.watchers = log.watchers.saturating_sub(1);
            if log.watchers == 0 && log.inflight.take().is_some() {
                self.overhead -= Self::INFLIGHT_BYTES;
            }
        }
        let mut out = Vec::new();
        self.trim(topic, &mut out);
        drop(out);
    }

    /// Numbers the dispatch to `topic` just recorded (or skipped); while the topic has a
    /// `:catch_up` watch, a handle the dispatch holds until its sends are done.
    pub fn track(&mut self, topic: &[u8]) -> Option<Track> {
        let log = self.topics.get_mut(topic)?;
        let number = log.dispatched;
        log.dispatched += 1;
        let inflight = log.inflight.as_ref()?;
        lock(&inflight.numbers).insert(number);
        Some(Track {
            inflight: inflight.clone(),
            number,
        })
    }

    /// Parks `pid` on `topic`: a joiner at the end of the topic's log, kept waiting for
    /// it until it unparks. The caller has just taken it out of the registry, under the
    /// same lock. Refused, as `join` refuses, when it is already a joiner of the topic
    /// (parked, or catching up on a replay) or the history is closed.
    pub fn park(&mut self, topic: &[u8], pid: Pid, data: J) -> Result<Evicted<M>, JoinRefused<J>> {
        let freed = self.join(topic, pid, 0, data)?;
        if let Some(log) = self.topics.get_mut(topic) {
            let at = log.dispatched;
            if let Some(joiner) = log.joiners.iter_mut().find(|j| j.pid == pid) {
                joiner.parked = Some(at);
                joiner.lag = u64::MAX;
            }
        }
        Ok(freed)
    }

    /// `pid` asks to catch up on `topic`, where it is parked: once nothing dispatched
    /// before it was parked is still being sent, it becomes an ordinary joiner, cut if it
    /// then falls [`JOIN_SLACK`] further behind.
    pub fn unpark(&mut self, topic: &[u8], pid: Pid) -> Unpark {
        let Some(log) = self.topics.get_mut(topic) else {
            return Unpark::NotParked;
        };
        let end = log.end();
        let lowest = log.inflight.as_ref().and_then(|inflight| inflight.lowest());
        let Some(joiner) = log.joiners.iter_mut().find(|j| j.pid == pid) else {
            return Unpark::NotParked;
        };
        let Some(at) = joiner.parked else {
            return Unpark::NotParked;
        };
        if lowest.is_some_and(|lowest| lowest < at) && !cfg!(loom_seed = "unpark_ignores_inflight")
        {
            return Unpark::Wait;
        }
        joiner.parked = None;
        joiner.lag = end.saturating_sub(joiner.next) + JOIN_SLACK;
        // A new start: one cut while it caught up before does not make it skip to the
        // end now.
        joiner.closing = false;
        Unpark::Ready
    }

    /// `pid`, catching up on `topic` after `unpark`, stops for now where it is (it took
    /// as much as it wanted): parked again, kept waiting for, until it unparks. False
    /// when it is not catching up on `topic` (it was removed, or never joined).
    pub fn repark(&mut self, topic: &[u8], pid: Pid) -> bool {
        let joiner = self
            .topics
            .get_mut(topic)
            .and_then(|log| log.joiners.iter_mut().find(|j| j.pid == pid));
        let Some(joiner) = joiner else {
            return false;
        };
        if joiner.parked.is_some() {
            // Parked still (never unparked): its wait for earlier dispatches stands.
            return true;
        }
        // Nothing of its subscription's can still be on its way (it left the registry
        // when it was first parked): no dispatch to wait for when it unparks.
        joiner.parked = Some(0);
        joiner.lag = u64::MAX;
        true
    }

    /// True when `pid` is parked on `topic`.
    pub fn is_parked(&self, topic: &[u8], pid: Pid) -> bool {
        self.topics.get(topic).is_some_and(|log| {
            log.joiners
                .iter()
                .any(|j| j.pid == pid && j.parked.is_some())
        })
    }

    /// True when a subscriber is catching up on `topic` or parked on it: in cluster mode
    /// the node still wants the topic's dispatches, though the registry may hold none.
    pub fn has_joiners(&self, topic: &[u8]) -> bool {
        self.topics
            .get(topic)
            .is_some_and(|log| !log.joiners.is_empty())
    }

    /// The topics with a joiner (see `has_joiners`).
    pub fn joined_topics(&self) -> Vec<Arc<[u8]>> {
        self.topics
            .iter()
            .filter(|(_, log)| !log.joiners.is_empty())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The processes parked on some topic, once each.
    pub fn parked_pids(&self) -> Vec<Pid> {
        let mut pids: Vec<Pid> = self
            .topics
            .values()
            .flat_map(|log| &log.joiners)
            .filter(|joiner| joiner.parked.is_some())
            .map(|joiner| joiner.pid)
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Subscribers parked now, over all topics.
    pub(super) fn parked(&self) -> usize {
        self.topics
            .values()
            .flat_map(|log| &log.joiners)
            .filter(|joiner: &&Joiner<J>| joiner.parked.is_some())
            .count()
    }

    /// Dispatches tracked and still out on `topic` (tests).
    pub fn in_flight(&self, topic: &[u8]) -> usize {
        self.topics
            .get(topic)
            .and_then(|log| log.inflight.as_ref())
            .map_or(0, |inflight| inflight.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Take;

    type H = History<u32, &'static str>;

    /// Records `n` messages numbered from `from` to topic `t`, each tracked as a dispatch
    /// would be; returns the handles of the tracked ones.
    fn dispatch(h: &mut H, from: u32, n: u32) -> Vec<Track> {
        (from..from + n)
            .filter_map(|i| {
                drop(h.record(b"t", i, 8).unwrap());
                h.track(b"t")
            })
            .collect()
    }

    /// Takes everything `pid` has to deliver, as `replay/2` would: messages, and the
    /// total it was told it missed.
    fn deliver(h: &mut H, pid: Pid) -> (Vec<u32>, u64) {
        let (mut got, mut missed) = (Vec::new(), 0);
        loop {
            match h.take(b"t", pid, 3, usize::MAX) {
                Take::Chunk { missed: m, entries } => {
                    missed += m;
                    got.extend(entries.iter().map(|e| e.message));
                    let sent = entries.len();
                    drop(entries);
                    drop(h.give_back(b"t", pid, sent, m > 0).unwrap());
                }
                Take::CaughtUp { .. } => return (got, missed),
                Take::Removed | Take::Parked => panic!("not a joiner that can take"),
            }
        }
    }

    #[test]
    fn a_parked_subscriber_gets_exactly_what_was_dispatched_after_it_was_parked() {
        let mut h = H::new(10_000, 1 << 20);
        h.watch(b"t", true);
        drop(dispatch(&mut h, 0, 5));
        drop(h.park(b"t", 1, "p").unwrap());
        drop(dispatch(&mut h, 5, 20));
        assert!(matches!(h.take(b"t", 1, 3, usize::MAX), Take::Parked));
        assert_eq!(h.stats().parked, 1);
        assert!(h.is_parked(b"t", 1) && !h.is_parked(b"t", 2));
        assert!(h.has_joiners(b"t") && !h.has_joiners(b"u"));
        assert_eq!(h.parked_pids(), vec![1]);
        assert_eq!(h.joined_topics(), vec![Arc::<[u8]>::from(&b"t"[..])]);
        assert_eq!(h.unpark(b"t", 1), Unpark::Ready);
        assert!(!h.is_parked(b"t", 1), "a joiner catching up is not parked");
        assert_eq!(h.stats().parked, 0);
        assert_eq!(deliver(&mut h, 1), ((5..25).collect(), 0));
        h.check_invariants().unwrap();
    }

    #[test]
    fn unpark_waits_while_a_dispatch_from_before_the_park_is_out() {
        let mut h = H::new(100, 1 << 20);
        h.watch(b"t", true);
        let mut before = dispatch(&mut h, 0, 3);
        assert_eq!(h.in_flight(b"t"), 3);
        drop(h.park(b"t", 1, "p").unwrap());
        // Dispatches after the park never hold it up.
        let after = dispatch(&mut h, 3, 2);
        drop(before.remove(0));
        drop(before.remove(1));
        assert_eq!(h.unpark(b"t", 1), Unpark::Wait);
        drop(before);
        assert_eq!(h.unpark(b"t", 1), Unpark::Ready);
        assert_eq!(h.unpark(b"t", 1), Unpark::NotParked, "unparked already");
        drop(after);
        assert_eq!(h.in_flight(b"t"), 0);
        assert_eq!(deliver(&mut h, 1), (vec![3, 4], 0));
    }

    #[test]
    fn without_a_watch_nothing_is_tracked_and_a_last_unwatch_frees_the_tracking() {
        let mut h = H::new(100, 1 << 20);
        assert!(dispatch(&mut h, 0, 3).is_empty());
        h.watch(b"t", true);
        h.watch(b"t", true);
        let out = dispatch(&mut h, 3, 1);
        assert_eq!(out.len(), 1);
        h.watch(b"t", false);
        assert_eq!(dispatch(&mut h, 4, 1).len(), 1, "one watch is left");
        h.watch(b"t", false);
        assert!(dispatch(&mut h, 5, 1).is_empty());
        h.check_invariants().unwrap();
        // A handle that outlives its topic's tracking drops harmlessly.
        drop(out);
        h.check_invariants().unwrap();
    }

    #[test]
    fn a_watched_topic_outlives_its_messages_and_goes_with_its_last_watch() {
        let mut h = H::new(1, 1 << 20);
        let empty = h.stats().bytes;
        h.watch(b"t", true);
        assert!(h.stats().bytes > empty);
        h.watch(b"t", false);
        assert_eq!(h.stats().bytes, empty, "log and tracking freed");
        h.check_invariants().unwrap();
    }

    #[test]
    fn parked_it_is_never_cut_for_falling_behind_but_unparked_it_is() {
        let mut h = H::new(100_000, 1 << 30);
        drop(h.park(b"t", 1, "p").unwrap());
        drop(dispatch(&mut h, 0, 3 * JOIN_SLACK as u32));
        assert_eq!(h.stats().cuts, 0, "parked: kept waiting, however long");
        assert_eq!(h.unpark(b"t", 1), Unpark::Ready);
        drop(dispatch(&mut h, 1_000_000, JOIN_SLACK as u32 + 1));
        assert_eq!(
            h.stats().cuts,
            1,
            "unparked: cut once it falls JOIN_SLACK further behind"
        );
        let (got, missed) = deliver(&mut h, 1);
        let dispatched = 3 * JOIN_SLACK + JOIN_SLACK + 1;
        assert_eq!(
            got.len() as u64 + missed,
            dispatched,
            "each dispatch delivered or told"
        );
    }

    #[test]
    fn what_the_bounds_take_from_a_parked_subscriber_is_told_exactly() {
        // Keeps 4 per topic, and a tiny limit: the joiners' caps cut it.
        let mut h = H::new(4, 2_000);
        drop(h.park(b"t", 1, "p").unwrap());
        drop(dispatch(&mut h, 0, 200));
        assert!(h.stats().cuts >= 1);
        assert_eq!(h.unpark(b"t", 1), Unpark::Ready);
        let (got, missed) = deliver(&mut h, 1);
        assert_eq!(got.len() as u64 + missed, 200);
        assert!(got.windows(2).all(|w| w[0] < w[1]), "in order: {got:?}");
        assert_eq!(got.last(), Some(&199), "the newest are still kept");
        h.check_invariants().unwrap();
    }

    #[test]
    fn reparked_part_way_it_goes_on_later_from_where_it_stopped() {
        let mut h = H::new(10_000, 1 << 20);
        h.watch(b"t", true);
        drop(dispatch(&mut h, 0, 2));
        drop(h.park(b"t", 1, "p").unwrap());
        drop(dispatch(&mut h, 2, 10));
        assert_eq!(h.unpark(b"t", 1), Unpark::Ready);
        let Take::Chunk { entries, .. } = h.take(b"t", 1, 4, usize::MAX) else {
            panic!("a chunk")
        };
        let first: Vec<u32> = entries.iter().map(|e| e.message).collect();
        drop(entries);
        drop(h.give_back(b"t", 1, 4, false).unwrap());
        assert!(h.repark(b"t", 1));
        assert!(h.is_parked(b"t", 1));
        // Dispatches go on meanwhile; a tracked one out does not hold the next unpark.
        let out = dispatch(&mut h, 12, 3);
        assert_eq!(h.unpark(b"t", 1), Unpark::Ready);
        let (rest, missed) = deliver(&mut h, 1);
        assert_eq!(missed, 0);
        assert_eq!([first, rest].concat(), (2..15).collect::<Vec<_>>());
        drop(out);
        assert!(!h.repark(b"t", 1), "caught up: no longer a joiner");
    }

    #[test]
    fn parking_a_joiner_is_refused_and_its_data_comes_back() {
        let mut h = H::new(100, 1 << 20);
        drop(h.park(b"t", 1, "first").unwrap());
        match h.park(b"t", 1, "second") {
            Err(JoinRefused::AlreadyJoining(data)) => assert_eq!(data, "second"),
            _ => panic!("a second park must be refused"),
        }
        assert_eq!(h.remove(b"t", 1).0, Some("first"));
        assert_eq!(h.unpark(b"t", 1), Unpark::NotParked, "removed while parked");
        h.check_invariants().unwrap();
    }
}
