//! Joiners: subscribers catching up on a topic's history, each a position in the topic's
//! log, and what the history does for them: join, take a chunk, give it back, leave.
//!
//! What a joiner delivers, it delivers from a chunk it has *taken*: the chunk's slots are
//! pinned (retained, and counted, until it gives the chunk back), so that what is being
//! sent is never freed underneath it and never uncounted; a cut meanwhile skips what
//! follows the chunk, never the chunk itself.

use super::{Evicted, History, JoinRefused, NotJoining, Pid, Take, JOIN_SLACK};
use std::sync::Arc;

/// What [`History::leave`] answers for each topic a gone process was joining: the
/// topic, and the joiner's data.
pub type Left<J> = (Arc<[u8]>, J);

/// A chunk a joiner took and is delivering: slots `start..end`, after a gap notice of
/// `told` when above 0. `cut`: the joiner was cut while it delivered.
#[derive(Clone, Copy)]
struct Taken {
    start: u64,
    end: u64,
    told: u64,
    cut: bool,
}

/// A subscriber catching up on one topic.
pub(super) struct Joiner<J> {
    pub(super) pid: Pid,
    /// The slot it delivers next.
    pub(super) next: u64,
    /// Dispatches skipped just before `next`, not yet told.
    pub(super) missed: u64,
    /// Most slots it may have left to deliver: past it, it is cut to the end, and
    /// `closing` from then on.
    pub(super) lag: u64,
    /// It was cut for falling behind: from now on, whenever it takes, it skips to the
    /// end first, so that it catches up as soon as it takes between two dispatches.
    pub(super) closing: bool,
    taken: Option<Taken>,
    /// Parked (`on_slow: :catch_up`) since the topic's dispatch of this number: it takes
    /// nothing until it unparks (see `parked`).
    pub(super) parked: Option<u64>,
    pub(super) data: J,
}

impl<J> Joiner<J> {
    /// The first slot it may still deliver (retained for it until then).
    pub(super) fn needs(&self) -> u64 {
        self.taken.map_or(self.next, |t| t.start)
    }

    /// Skips everything up to slot `to` that it has not taken, and `extra` dispatches
    /// that were never kept.
    pub(super) fn cut(&mut self, to: u64, extra: u64) -> Cut {
        let skipped = to.saturating_sub(self.next) + extra;
        // A new gap, rather than a longer one it has not yet been told of: each such cut
        // is one gap notice.
        let fresh = skipped > 0 && self.missed == self.taken.map_or(0, |t| t.told);
        self.next = self.next.max(to);
        self.missed += skipped;
        if let Some(taken) = &mut self.taken {
            taken.cut = true;
        }
        Cut { skipped, fresh }
    }
}

/// What one cut did: how many dispatches it skipped, and whether it opened a new gap.
pub(super) struct Cut {
    pub(super) skipped: u64,
    pub(super) fresh: bool,
}

impl<M, J> History<M, J> {
    /// Counts a cut in the stats.
    pub(super) fn count_cut(&mut self, cut: Cut) {
        self.missed += cut.skipped;
        self.cuts += u64::from(cut.fresh);
    }
}

impl<M, J> History<M, J> {
    /// `pid` starts catching up on `topic`, from the topic's `n` most recent kept
    /// messages (fewer if fewer are kept, or if some were dispatched while `pid` was
    /// last subscribed: those may still be on their way to it). From now on, until
    /// `take` answers `CaughtUp`, it delivers every dispatch to the topic itself.
    pub fn join(
        &mut self,
        topic: &[u8],
        pid: Pid,
        n: usize,
        data: J,
    ) -> Result<Evicted<M>, JoinRefused<J>> {
        if self.closed {
            return Err(JoinRefused::Closed(data));
        }
        let name = self.name_of(topic);
        let Some(log) = self.topics.get_mut(topic) else {
            return Err(JoinRefused::Closed(data));
        };
        if log.joiners.iter().any(|j| j.pid == pid) {
            return Err(JoinRefused::AlreadyJoining(data));
        }
        let end = log.end();
        let mut next = end.saturating_sub(n as u64).max(log.live);
        if let Some(&departed) = log.departed.get(&pid) {
            next = next.max(departed);
        }
        log.joiners.push(Joiner {
            pid,
            next,
            missed: 0,
            lag: end - next + JOIN_SLACK,
            closing: false,
            taken: None,
            parked: None,
            data,
        });
        self.overhead += Self::JOINER_BYTES;
        self.joining.entry(pid).or_default().push(name);
        let mut out = Vec::new();
        self.enforce(&mut out);
        Ok(out)
    }

    /// The next messages `pid` is to deliver to itself for `topic`: up to `max`
    /// messages and, past the first, `max_bytes` bytes, after a gap notice if it missed
    /// any. When there is nothing left, the joiner is done (see `Take`).
    pub fn take(&mut self, topic: &[u8], pid: Pid, max: usize, max_bytes: usize) -> Take<M, J> {
        let Some(log) = self.topics.get_mut(topic) else {
            return Take::Removed;
        };
        let Some(at) = log.joiners.iter().position(|j| j.pid == pid) else {
            return Take::Removed;
        };
        let end = log.end();
        let joiner = &mut log.joiners[at];
        if joiner.parked.is_some() {
            return Take::Parked;
        }
        if joiner.closing && joiner.taken.is_none() && joiner.next < end {
            let cut = joiner.cut(end, 0);
            self.count_cut(cut);
            let mut freed = Vec::new();
            self.trim(topic, &mut freed);
            drop(freed);
            return self.take(topic, pid, max, max_bytes);
        }
        if joiner.taken.is_none() && joiner.next >= end && joiner.missed == 0 {
            let joiner = log.joiners.swap_remove(at);
            self.overhead -= Self::JOINER_BYTES;
            self.unlist(pid, topic);
            let mut freed = Vec::new();
            self.trim(topic, &mut freed);
            return Take::CaughtUp {
                data: joiner.data,
                freed,
            };
        }
        let start = joiner.next;
        let mut entries = Vec::new();
        let mut bytes = 0;
        let mut seq = start;
        while seq < end && entries.len() < max.max(1) {
            let entry = &log.slot(seq).entry;
            if !entries.is_empty() && bytes + entry.bytes > max_bytes {
                break;
            }
            bytes += entry.bytes;
            entries.push(entry.clone());
            seq += 1;
        }
        let joiner = &mut log.joiners[at];
        let missed = joiner.missed;
        joiner.taken = Some(Taken {
            start,
            end: seq,
            told: missed,
            cut: false,
        });
        joiner.next = seq;
        Take::Chunk { missed, entries }
    }

    /// `pid` delivered the first `sent` messages of the chunk it took for `topic`, and
    /// its gap notice if `told`. What it did not deliver it delivers later, unless it was
    /// cut meanwhile: then that is part of the gap it is told next. `Err` when it is no
    /// longer joining.
    pub fn give_back(
        &mut self,
        topic: &[u8],
        pid: Pid,
        sent: usize,
        told: bool,
    ) -> Result<Evicted<M>, NotJoining> {
        let joiner = self
            .topics
            .get_mut(topic)
            .and_then(|log| log.joiners.iter_mut().find(|j| j.pid == pid));
        let Some(joiner) = joiner else {
            return Err(NotJoining);
        };
        let Some(taken) = joiner.taken.take() else {
            return Ok(Vec::new());
        };
        let delivered = (taken.start + sent as u64).min(taken.end);
        if taken.cut {
            let unsent = taken.end - delivered;
            joiner.missed += unsent;
            self.missed += unsent;
        } else {
            joiner.next = delivered;
        }
        if told {
            joiner.missed -= taken.told;
        }
        let mut out = Vec::new();
        self.trim(topic, &mut out);
        Ok(out)
    }

    /// `pid` stops joining `topic` (its subscription is removed while it catches up):
    /// its data, if it was joining.
    pub fn remove(&mut self, topic: &[u8], pid: Pid) -> (Option<J>, Evicted<M>) {
        let mut out = Vec::new();
        let Some(log) = self.topics.get_mut(topic) else {
            return (None, out);
        };
        let Some(at) = log.joiners.iter().position(|j| j.pid == pid) else {
            return (None, out);
        };
        let joiner = log.joiners.swap_remove(at);
        self.overhead -= Self::JOINER_BYTES;
        self.unlist(pid, topic);
        self.trim(topic, &mut out);
        (Some(joiner.data), out)
    }

    /// `pid` unsubscribed from `topic`: a later replay to it starts after what was
    /// dispatched to its subscription, some of which may still be on its way.
    pub fn depart(&mut self, topic: &[u8], pid: Pid) {
        let Some(log) = self.topics.get_mut(topic) else {
            return;
        };
        let end = log.end();
        if end <= log.live {
            return;
        }
        log.departed.insert(pid, end);
        log.departures.push_back((end, pid));
        self.overhead += Self::DEPARTURE_BYTES;
        let mut out = Vec::new();
        self.enforce(&mut out);
        // Nothing of `out` can be large enough to matter here, and departing runs
        // rarely: dropped under the caller's lock.
        drop(out);
    }

    /// `pid` is gone: it stops joining every topic. Returns its joiners' topics and
    /// data, and what no one needs any more.
    pub fn leave(&mut self, pid: Pid) -> (Vec<Left<J>>, Evicted<M>) {
        let mut data = Vec::new();
        let mut out = Vec::new();
        let Some(names) = self.joining.remove(&pid) else {
            return (data, out);
        };
        for name in names {
            let Some(log) = self.topics.get_mut(&name) else {
                continue;
            };
            while let Some(at) = log.joiners.iter().position(|j| j.pid == pid) {
                data.push((name.clone(), log.joiners.swap_remove(at).data));
                self.overhead -= Self::JOINER_BYTES;
            }
            self.trim(&name, &mut out);
        }
        (data, out)
    }

    fn unlist(&mut self, pid: Pid, topic: &[u8]) {
        if let Some(names) = self.joining.get_mut(&pid) {
            if let Some(at) = names.iter().position(|n| &**n == topic) {
                names.swap_remove(at);
            }
            if names.is_empty() {
                self.joining.remove(&pid);
            }
        }
    }
}
