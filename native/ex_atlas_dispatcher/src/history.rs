//! Replay: each topic's most recent dispatches, and the subscribers catching up on them.
//!
//! Plain Rust, generic over the kept message `M` (the NIF keeps the encoded term) and
//! over what a joiner carries `J` (the NIF: its monitor and partition). One `History`
//! sits behind one lock, which a dispatch takes to record its message and take its
//! registry snapshot, and a joiner takes to move into the registry: every dispatch is
//! therefore either recorded before the joiner entered the registry (and reaches the
//! joiner from the history) or snapshot after (and reaches it live), never both.
//!
//! Each topic's log is a run of slots numbered in dispatch order. The history proper is
//! the newest slots, from `live` on. A joiner is a position in that run (`next`), not a
//! copy of it: joining costs the same whatever `n`, and a message kept for several
//! joiners is held once. A slot evicted from the history while a joiner still has to
//! deliver it stays, *retained*, until no joiner needs it.
//!
//! The bound, in bytes as accounted by the caller (`Entry::bytes`, what the message
//! really allocates) plus what the history itself allocates for it (`SLOT_BYTES`, and
//! the per-topic, per-joiner and per-departure overheads): kept + retained + overhead
//! stays within `limit`. Past it the oldest kept message goes first, whatever the topic.
//! Retained slots are what joiners cost, and they are capped twice: one joiner may hold
//! at most `limit / 16` bytes of retained slots, and all joiners together `limit / 4`.
//! A joiner that would go past either is *cut*: the slots it has not delivered and that
//! the history no longer keeps are skipped, and it is told how many it missed before its
//! next message (`missed`). A joiner that falls [`JOIN_SLACK`] dispatches further behind
//! than it was when it joined is cut too, to the end of the log: one slower than its
//! topic's producers would otherwise never catch up. So nobody ever waits for a joiner.
//!
//! Here: the front, which records dispatches and evicts within the bounds. A topic's
//! slots, joiners and departures are its `log`; how a joiner joins, takes its chunks and
//! leaves is in `joiners`.

mod joiners;
mod log;
mod parked;

use joiners::Joiner;
use log::{Log, Slot};
pub use parked::{InFlight, Track, Unpark};
use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::mem::size_of;
use std::sync::Arc;

/// A process, as the registry names it.
pub type Pid = u64;

/// Dispatches a joiner may fall behind, beyond what it had to deliver when it joined,
/// before it is cut: a joiner slower than its topic's producers would otherwise never
/// catch up.
pub const JOIN_SLACK: u64 = 256;

/// Below this many stale entries the global order is not compacted.
const COMPACT_FLOOR: usize = 1_024;

/// One kept message and its size as accounted: what the message allocates.
pub struct Entry<M> {
    pub bytes: usize,
    pub message: M,
}

/// About what the system allocator takes for a block of `n` bytes: 8 bytes of header,
/// rounded up to 16, at least 32 (glibc's malloc; others take about as much).
const fn heap_block(n: usize) -> usize {
    let with_header = n + 8;
    let rounded = with_header.div_ceil(16) * 16;
    if rounded < 32 {
        32
    } else {
        rounded
    }
}

/// Messages the caller drops once its lock is released (dropping a kept message frees
/// its memory).
pub type Evicted<M> = Vec<Arc<Entry<M>>>;

/// The history is closed: the dispatcher closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

/// The process is not joining the topic (any more): removed (`remove`, `leave`), or the
/// history was cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotJoining;

/// Why `join` refused; the joiner's data comes back.
#[derive(Debug)]
pub enum JoinRefused<J> {
    /// The caller is already joining the topic.
    AlreadyJoining(J),
    Closed(J),
}

/// The answer to [`History::take`].
pub enum Take<M, J> {
    /// The next messages for the joiner to deliver to itself, oldest first, after a gap
    /// notice of `missed` when above 0; give back what was delivered with
    /// [`History::give_back`].
    Chunk {
        missed: u64,
        entries: Vec<Arc<Entry<M>>>,
    },
    /// It has caught up and is no longer a joiner: the caller must add it to the
    /// registry before releasing the lock. `freed`: to drop after the lock.
    CaughtUp { data: J, freed: Evicted<M> },
    /// It is not joining the topic (any more): removed (`remove`, `leave`), or the
    /// history was cleared.
    Removed,
    /// It is parked (`park`): it takes nothing until it unparks.
    Parked,
}

/// Figures for `stats`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Messages kept (the history proper).
    pub messages: usize,
    /// Bytes accounted against the limit: kept, retained and overhead.
    pub bytes: usize,
    /// Bytes of slots retained for joiners only.
    pub retained: usize,
    pub joiners: usize,
    /// Gaps opened in joiners' streams (one notice each, unless a joiner is cut again
    /// before it has been told), and the dispatches they skipped.
    pub cuts: u64,
    pub missed: u64,
    /// Joiners parked (`on_slow: :catch_up`) now.
    pub parked: usize,
}

/// Everything `clear` took out: the joiners' data (to release) and the messages (to free
/// outside the lock).
pub struct Cleared<M, J> {
    pub joiners: Vec<(Pid, J)>,
    pub entries: Evicted<M>,
}

pub struct History<M, J> {
    keep: usize,
    limit: usize,
    /// Most bytes of retained slots over all joiners, and for one joiner.
    share: usize,
    cap: usize,
    next: u64,
    topics: FxHashMap<Arc<[u8]>, Log<M, J>>,
    /// Every kept message as `(global, topic)`, oldest first; entries already evicted
    /// by the per-topic bound stay until they reach the front or a compaction.
    order: VecDeque<(u64, Arc<[u8]>)>,
    stale: usize,
    kept: usize,
    kept_bytes: usize,
    retained_bytes: usize,
    overhead: usize,
    /// The topics each joining process is joining.
    joining: FxHashMap<Pid, Vec<Arc<[u8]>>>,
    cuts: u64,
    missed: u64,
    closed: bool,
}

impl<M, J> History<M, J> {
    /// What the history allocates per kept message besides the message: its shared
    /// handle, its slot and its place in the global order (those two in growable
    /// queues, which may hold up to twice what they use).
    pub const SLOT_BYTES: usize = heap_block(2 * size_of::<usize>() + size_of::<Entry<M>>())
        + 2 * size_of::<Slot<M>>()
        + 2 * size_of::<(u64, Arc<[u8]>)>();
    /// Per topic, besides its name: its log in the map (at most half full), and the
    /// name's shared allocation.
    const TOPIC_BYTES: usize = 2 * (size_of::<(Arc<[u8]>, Log<M, J>)>() + 1) + heap_block(16);
    /// Per joiner: its record, and its place in `joining`.
    const JOINER_BYTES: usize = 2 * size_of::<Joiner<J>>()
        + 2 * (size_of::<(Pid, Vec<Arc<[u8]>>)>() + 1)
        + heap_block(size_of::<Arc<[u8]>>());
    /// Per departure: its place in the map and in the queue.
    const DEPARTURE_BYTES: usize = 2 * (size_of::<(Pid, u64)>() + 1) + 2 * size_of::<(u64, Pid)>();

    /// Keeps at most `keep` messages per topic (at least 1) and `limit` bytes in all.
    pub fn new(keep: usize, limit: usize) -> Self {
        History {
            keep: keep.max(1),
            limit,
            share: limit / 4,
            cap: limit / 16,
            next: 0,
            topics: FxHashMap::default(),
            order: VecDeque::new(),
            stale: 0,
            kept: 0,
            kept_bytes: 0,
            retained_bytes: 0,
            overhead: 0,
            joining: FxHashMap::default(),
            cuts: 0,
            missed: 0,
            closed: false,
        }
    }

    /// Bytes accounted against the limit.
    fn used(&self) -> usize {
        self.kept_bytes + self.retained_bytes + self.overhead
    }

    pub fn stats(&self) -> Stats {
        Stats {
            messages: self.kept,
            bytes: self.used(),
            retained: self.retained_bytes,
            joiners: self.joining.values().map(Vec::len).sum(),
            cuts: self.cuts,
            missed: self.missed,
            parked: self.parked(),
        }
    }

    /// The largest chunk in bytes a joiner should take at once: its slots are pinned
    /// while it delivers them, so a few joiners delivering at once stay well within the
    /// joiners' share.
    pub fn chunk_bytes(&self) -> usize {
        (self.limit / 64).max(1)
    }

    /// Records one dispatch of `message` (`bytes` as allocated) to `topic`, and evicts
    /// what the bounds require. A message too big to keep within the limit at all is not
    /// kept: the topic's joiners are cut past it. The caller drops what comes back
    /// outside its lock.
    pub fn record(&mut self, topic: &[u8], message: M, bytes: usize) -> Result<Evicted<M>, Closed> {
        if self.closed {
            return Err(Closed);
        }
        let entry = Arc::new(Entry { bytes, message });
        let charge = bytes.saturating_add(Self::SLOT_BYTES);
        if charge > self.limit {
            let mut out = self.skip(topic)?;
            out.push(entry);
            return Ok(out);
        }
        let global = self.next;
        self.next += 1;
        let name = self.name_of(topic);
        let mut out = Vec::new();
        if let Some(log) = self.topics.get_mut(topic) {
            log.slots.push_back(Slot {
                global,
                before: log.charged,
                charge,
                entry,
            });
            log.charged += charge as u64;
            let end = log.end();
            let mut cut = false;
            for joiner in &mut log.joiners {
                if !joiner.closing && end - joiner.next > joiner.lag {
                    let done = joiner.cut(end, 0);
                    self.missed += done.skipped;
                    self.cuts += u64::from(done.fresh);
                    joiner.closing = true;
                    cut = true;
                }
            }
            self.kept += 1;
            self.kept_bytes += charge;
            self.order.push_back((global, name.clone()));
            if log.live_len() > self.keep {
                // The topic's oldest kept leaves the history; its place in the order
                // goes stale.
                self.stale += 1;
                self.evict_front(&name, &mut out);
            } else if cut {
                self.trim(&name, &mut out);
            }
        }
        self.enforce(&mut out);
        self.compact();
        Ok(out)
    }

    /// Counts one dispatch to `topic` that cannot be kept (too big, or not encodable):
    /// each joiner of the topic is cut past it.
    pub fn skip(&mut self, topic: &[u8]) -> Result<Evicted<M>, Closed> {
        if self.closed {
            return Err(Closed);
        }
        let mut out = Vec::new();
        if let Some(log) = self.topics.get_mut(topic) {
            let end = log.end();
            for joiner in &mut log.joiners {
                let cut = joiner.cut(end, 1);
                self.missed += cut.skipped;
                self.cuts += u64::from(cut.fresh);
            }
            // What they skipped is needed no more.
            self.trim(topic, &mut out);
        }
        Ok(out)
    }

    /// Evicts the oldest kept messages, whatever their topic, until within the limit.
    fn enforce(&mut self, out: &mut Evicted<M>) {
        while self.used() > self.limit {
            let Some(name) = self.oldest() else { break };
            self.evict_front(&name, out);
        }
    }

    /// The topic of the oldest message kept, its place in the order taken.
    fn oldest(&mut self) -> Option<Arc<[u8]>> {
        while let Some((global, name)) = self.order.pop_front() {
            let current = self
                .topics
                .get(&name)
                .filter(|log| log.live < log.end())
                .is_some_and(|log| log.slot(log.live).global == global);
            if current {
                return Some(name);
            }
            self.stale -= 1;
        }
        None
    }

    /// Takes the first kept message of `name` out of the history. A joiner that has yet
    /// to deliver it keeps it retained, unless that puts it past its cap or all joiners
    /// past their share: then it is cut to the history's new start.
    fn evict_front(&mut self, name: &[u8], out: &mut Evicted<M>) {
        let Some(log) = self.topics.get_mut(name) else {
            return;
        };
        if log.live == log.end() {
            return;
        }
        let seq = log.live;
        let charge = log.slot(seq).charge;
        log.live += 1;
        self.kept -= 1;
        self.kept_bytes -= charge;
        self.retained_bytes += charge;
        let over_share = self.retained_bytes > self.share;
        let live = log.live;
        for at in 0..log.joiners.len() {
            let needs = log.joiners[at].needs();
            if needs > seq {
                continue;
            }
            let held = log.bytes_between(needs, live);
            if over_share || held > self.cap as u64 {
                let cut = log.joiners[at].cut(live, 0);
                self.missed += cut.skipped;
                self.cuts += u64::from(cut.fresh);
            }
        }
        self.trim(name, out);
    }

    /// Frees the slots of `name` that nobody needs any more, the departures that no
    /// longer matter, and the log itself once it holds nothing.
    fn trim(&mut self, name: &[u8], out: &mut Evicted<M>) {
        let Some(log) = self.topics.get_mut(name) else {
            return;
        };
        let needed = log.needed();
        while log.base < needed {
            let Some(slot) = log.slots.pop_front() else {
                break;
            };
            log.base += 1;
            self.retained_bytes -= slot.charge;
            out.push(slot.entry);
        }
        while let Some(&(seq, pid)) = log.departures.front() {
            if seq > log.live {
                break;
            }
            log.departures.pop_front();
            self.overhead -= Self::DEPARTURE_BYTES;
            if log.departed.get(&pid) == Some(&seq) {
                log.departed.remove(&pid);
            }
        }
        if log.is_idle() {
            self.topics.remove(name);
            self.overhead -= Self::TOPIC_BYTES + name.len();
        }
    }

    /// The shared name of `topic`, whose log is created if it has none.
    fn name_of(&mut self, topic: &[u8]) -> Arc<[u8]> {
        if let Some((name, _)) = self.topics.get_key_value(topic) {
            return name.clone();
        }
        let name: Arc<[u8]> = Arc::from(topic);
        self.topics.insert(name.clone(), Log::new());
        self.overhead += Self::TOPIC_BYTES + topic.len();
        name
    }

    /// Drops the order's stale entries once they are the majority, so that the order
    /// stays proportional to what is kept.
    fn compact(&mut self) {
        if self.stale < COMPACT_FLOOR || self.stale * 2 < self.order.len() {
            return;
        }
        let topics = &self.topics;
        self.order.retain(|(global, name)| {
            topics
                .get(name)
                .filter(|log| log.live < log.end())
                .is_some_and(|log| log.slot(log.live).global <= *global)
        });
        self.stale = 0;
    }

    /// Empties the history for good (the dispatcher closes): later records and joins
    /// are refused.
    pub fn clear(&mut self) -> Cleared<M, J> {
        self.closed = true;
        let mut cleared = Cleared {
            joiners: Vec::new(),
            entries: Vec::new(),
        };
        for (_, log) in self.topics.drain() {
            cleared
                .joiners
                .extend(log.joiners.into_iter().map(|j| (j.pid, j.data)));
            cleared
                .entries
                .extend(log.slots.into_iter().map(|s| s.entry));
        }
        self.order.clear();
        self.joining.clear();
        self.stale = 0;
        self.kept = 0;
        self.kept_bytes = 0;
        self.retained_bytes = 0;
        self.overhead = 0;
        cleared
    }

    /// How many messages `topic` keeps (tests).
    pub fn kept_of(&self, topic: &[u8]) -> usize {
        self.topics.get(topic).map_or(0, Log::live_len)
    }

    /// Checks the bookkeeping against the contents (tests).
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut kept = 0;
        let mut kept_bytes = 0;
        let mut retained = 0;
        let mut overhead = 0;
        for (name, log) in &self.topics {
            overhead += Self::TOPIC_BYTES + name.len();
            overhead += log.joiners.len() * Self::JOINER_BYTES;
            overhead += log.departures.len() * Self::DEPARTURE_BYTES;
            if log.inflight.is_some() {
                overhead += Self::INFLIGHT_BYTES;
            }
            if log.live < log.base || log.live > log.end() {
                return Err(format!("{name:?}: live {} outside the log", log.live));
            }
            if log.live_len() > self.keep {
                return Err(format!("{name:?} keeps {} > {}", log.live_len(), self.keep));
            }
            for (i, slot) in log.slots.iter().enumerate() {
                if (log.base + i as u64) < log.live {
                    retained += slot.charge;
                } else {
                    kept += 1;
                    kept_bytes += slot.charge;
                }
            }
            if log.needed() != log.base && !log.slots.is_empty() && log.needed() < log.live {
                return Err(format!("{name:?}: slots before {} not freed", log.needed()));
            }
            for joiner in &log.joiners {
                if joiner.needs() < log.base || joiner.next > log.end() {
                    return Err(format!(
                        "{name:?}: joiner at {} out of the log",
                        joiner.next
                    ));
                }
            }
        }
        if (kept, kept_bytes, retained, overhead)
            != (
                self.kept,
                self.kept_bytes,
                self.retained_bytes,
                self.overhead,
            )
        {
            return Err(format!(
                "counted {}/{}/{}/{} B, hold {kept}/{kept_bytes}/{retained}/{overhead}",
                self.kept, self.kept_bytes, self.retained_bytes, self.overhead
            ));
        }
        if self.used() > self.limit && self.kept > 0 {
            return Err(format!("{} B over the limit {}", self.used(), self.limit));
        }
        if self.order.len() != self.kept + self.stale {
            return Err(format!(
                "order {} != {} kept + {} stale",
                self.order.len(),
                self.kept,
                self.stale
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type H = History<u32, &'static str>;

    /// What a joiner delivered to itself: messages, and gap notices.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Got {
        Message(u32),
        Gap(u64),
    }

    #[test]
    fn a_heap_block_is_its_size_and_a_header_rounded_up_to_16_at_least_32() {
        assert_eq!(heap_block(0), 32);
        assert_eq!(heap_block(24), 32, "24 + 8 is exactly 32");
        assert_eq!(heap_block(25), 48);
        assert_eq!(heap_block(40), 48);
        assert_eq!(heap_block(41), 64);
        assert_eq!(heap_block(1_000), 1_008);
    }

    /// Takes and delivers everything until caught up (or removed).
    fn drain(h: &mut H, topic: &[u8], pid: Pid) -> (Vec<Got>, Option<&'static str>) {
        let mut got = Vec::new();
        loop {
            match h.take(topic, pid, 3, usize::MAX) {
                Take::Chunk { missed, entries } => {
                    if missed > 0 {
                        got.push(Got::Gap(missed));
                    }
                    got.extend(entries.iter().map(|e| Got::Message(e.message)));
                    h.give_back(topic, pid, entries.len(), missed > 0).unwrap();
                }
                Take::CaughtUp { data, .. } => return (got, Some(data)),
                Take::Removed | Take::Parked => return (got, None),
            }
            h.check_invariants().unwrap();
        }
    }

    fn messages(range: std::ops::Range<u32>) -> Vec<Got> {
        range.map(Got::Message).collect()
    }

    /// Room for `n` messages of `bytes` each on one topic, and no more.
    fn room(n: usize, bytes: usize) -> usize {
        n * (bytes + H::SLOT_BYTES) + H::TOPIC_BYTES + 1 + H::JOINER_BYTES
    }

    #[test]
    fn keeps_the_most_recent_per_topic() {
        let mut h = H::new(3, usize::MAX);
        for m in 0..10 {
            h.record(b"a", m, 10).unwrap();
        }
        h.check_invariants().unwrap();
        assert_eq!(h.stats().messages, 3);
        assert_eq!(
            h.stats().bytes,
            3 * (10 + H::SLOT_BYTES) + H::TOPIC_BYTES + 1
        );
        h.join(b"a", 1, 2, "j").unwrap();
        assert_eq!(drain(&mut h, b"a", 1), (messages(8..10), Some("j")));
        h.join(b"a", 1, 100, "j").unwrap();
        assert_eq!(drain(&mut h, b"a", 1).0, messages(7..10));
    }

    #[test]
    fn over_the_byte_limit_the_oldest_go_first_whatever_the_topic() {
        // Two topics, each with its name, and a joiner: room for two messages, not three.
        let bytes = H::JOINER_BYTES;
        let limit = 2 * (bytes + H::SLOT_BYTES) + 2 * (H::TOPIC_BYTES + 1) + H::JOINER_BYTES;
        let mut h = H::new(100, limit);
        h.record(b"a", 1, bytes).unwrap();
        h.record(b"b", 2, bytes).unwrap();
        h.record(b"a", 3, bytes).unwrap();
        h.check_invariants().unwrap();
        assert_eq!(h.stats().messages, 2);
        h.join(b"a", 7, 10, "").unwrap();
        assert_eq!(drain(&mut h, b"a", 7).0, messages(3..4));
        h.join(b"b", 7, 10, "").unwrap();
        assert_eq!(drain(&mut h, b"b", 7).0, messages(2..3));
    }

    #[test]
    fn a_message_too_big_to_keep_evicts_nothing_and_cuts_the_joiners_past_it() {
        let limit = room(4, 20) + H::TOPIC_BYTES + 1;
        let mut h = H::new(100, limit);
        h.record(b"a", 1, 20).unwrap();
        h.record(b"b", 2, 20).unwrap();
        h.join(b"b", 9, 10, "").unwrap();
        let not_kept = h.record(b"b", 3, limit).unwrap();
        assert_eq!(not_kept.len(), 1);
        h.record(b"b", 4, 20).unwrap();
        h.check_invariants().unwrap();
        assert_eq!(h.stats().messages, 3);
        // The joiner had 2 to deliver; it is told of 2 and the big one, then gets 4.
        assert_eq!(drain(&mut h, b"b", 9).0, vec![Got::Gap(2), Got::Message(4)]);
        assert_eq!((h.stats().cuts, h.stats().missed), (1, 2));
    }

    #[test]
    fn dispatches_during_a_join_reach_the_joiner_once_and_in_order() {
        let mut h = H::new(4, usize::MAX);
        for m in 0..4 {
            h.record(b"t", m, 1).unwrap();
        }
        h.join(b"t", 5, 2, "d").unwrap();
        let Take::Chunk { missed: 0, entries } = h.take(b"t", 5, 1, usize::MAX) else {
            panic!()
        };
        assert_eq!(entries[0].message, 2);
        h.give_back(b"t", 5, 1, false).unwrap();
        // The history turns over; what the joiner has yet to deliver stays for it.
        for m in 4..10 {
            h.record(b"t", m, 1).unwrap();
        }
        h.check_invariants().unwrap();
        assert!(h.stats().retained > 0);
        assert_eq!(drain(&mut h, b"t", 5), (messages(3..10), Some("d")));
        assert_eq!(h.stats().retained, 0);
        // Caught up: no longer a joiner.
        h.record(b"t", 10, 1).unwrap();
        assert!(matches!(h.take(b"t", 5, 1, 1), Take::Removed));
        h.check_invariants().unwrap();
    }

    #[test]
    fn what_a_joiner_does_not_deliver_it_delivers_next_time() {
        let mut h = H::new(10, usize::MAX);
        for m in 0..6 {
            h.record(b"t", m, 1).unwrap();
        }
        h.join(b"t", 1, 6, "").unwrap();
        let Take::Chunk { entries, .. } = h.take(b"t", 1, 4, usize::MAX) else {
            panic!()
        };
        assert_eq!(entries.len(), 4);
        h.give_back(b"t", 1, 1, false).unwrap();
        assert_eq!(drain(&mut h, b"t", 1).0, messages(1..6));
    }

    #[test]
    fn chunks_are_bounded_by_bytes_but_never_empty() {
        let mut h = H::new(10, usize::MAX);
        for m in 0..3 {
            h.record(b"t", m, 100).unwrap();
        }
        h.join(b"t", 1, 3, "").unwrap();
        let Take::Chunk { entries, .. } = h.take(b"t", 1, 10, 150) else {
            panic!()
        };
        assert_eq!(entries.len(), 1);
        h.give_back(b"t", 1, 1, false).unwrap();
        let Take::Chunk { entries, .. } = h.take(b"t", 1, 10, 250) else {
            panic!()
        };
        assert_eq!(entries.len(), 2);
    }

    /// A joiner that delivers nothing (suspended) holds no producer: dispatches go on,
    /// it is cut once what it holds beyond the history passes its cap, and it is told
    /// exactly what it missed when it goes on. The history of other topics keeps at
    /// least what the joiners' share leaves it.
    #[test]
    fn a_stalled_joiner_is_cut_and_told_never_waited_for() {
        let limit = 64 * 1024;
        let mut h = H::new(10, limit);
        for m in 0..10 {
            h.record(b"other", m, 100).unwrap();
        }
        for m in 0..10 {
            h.record(b"t", 100 + m, 100).unwrap();
        }
        h.join(b"t", 1, 10, "").unwrap();
        let mut kept_other = usize::MAX;
        for m in 10..2_000 {
            h.record(b"t", 100 + m, 100).unwrap();
            h.check_invariants().unwrap();
            assert!(h.stats().retained <= limit / 16 + 100 + H::SLOT_BYTES);
            kept_other = kept_other.min(h.kept_of(b"other"));
        }
        assert!(h.stats().cuts > 0);
        assert_eq!(kept_other, 10);
        let (got, _) = drain(&mut h, b"t", 1);
        // Whatever it got: the gap and the messages account for every dispatch since
        // its start, 100.
        let mut at = 100;
        for item in &got {
            match *item {
                Got::Gap(k) => at += k as u32,
                Got::Message(m) => {
                    assert_eq!(m, at);
                    at += 1;
                }
            }
        }
        assert_eq!(at, 2_100);
        // It had delivered nothing when it was first cut: told first.
        assert!(matches!(got[0], Got::Gap(_)), "{:?}", &got[..3]);
        assert_eq!(h.stats().retained, 0);
    }

    /// A joiner that delivers more slowly than its topic is dispatched to would never
    /// catch up: once it is JOIN_SLACK further behind than at its join, it is cut to the
    /// end, and from then on skips to the end whenever it takes, so that it catches up as
    /// soon as it takes twice without a dispatch between.
    #[test]
    fn a_joiner_slower_than_its_producers_is_cut_to_the_end() {
        let mut h = H::new(10_000, usize::MAX);
        for m in 0..10 {
            h.record(b"t", m, 1).unwrap();
        }
        h.join(b"t", 1, 10, "").unwrap();
        let mut got = Vec::new();
        let mut m = 10;
        let deliver = |h: &mut H, got: &mut Vec<Got>| match h.take(b"t", 1, 1, usize::MAX) {
            Take::Chunk { missed, entries } => {
                if missed > 0 {
                    got.push(Got::Gap(missed));
                }
                got.extend(entries.iter().map(|e| Got::Message(e.message)));
                h.give_back(b"t", 1, entries.len(), missed > 0).unwrap();
                false
            }
            Take::CaughtUp { .. } => true,
            Take::Removed | Take::Parked => panic!(),
        };
        // Two dispatches for each message it delivers, for a while.
        for _ in 0..1_000 {
            for _ in 0..2 {
                h.record(b"t", m, 1).unwrap();
                m += 1;
            }
            assert!(!deliver(&mut h, &mut got));
        }
        // One notice per cut: from the first on, it skipped to the end at every take.
        let notices = got.iter().filter(|g| matches!(g, Got::Gap(_))).count() as u64;
        assert!(notices > 1);
        assert_eq!(h.stats().cuts, notices);
        // A pause: it catches up at its next take, or the one after if it had a gap to
        // tell first.
        assert!(deliver(&mut h, &mut got) || deliver(&mut h, &mut got));
        let mut at = 0;
        for item in &got {
            match *item {
                Got::Gap(k) => at += k as u32,
                Got::Message(n) => {
                    assert_eq!(n, at);
                    at += 1;
                }
            }
        }
        assert_eq!(at, m);
        assert_eq!(
            h.stats().missed,
            m as u64 - got.iter().filter(|g| matches!(g, Got::Message(_))).count() as u64
        );
        assert_eq!(h.stats().retained, 0);
        h.check_invariants().unwrap();
    }

    /// A chunk being delivered is pinned: a cut meanwhile skips what follows it, and the
    /// part of it not delivered joins the gap.
    #[test]
    fn a_cut_during_a_chunk_skips_after_it_and_counts_what_it_did_not_send() {
        let limit = room(6, 1_000) + 6 * 1_100;
        let mut h = H::new(6, limit);
        for m in 0..6 {
            h.record(b"t", m, 1_000).unwrap();
        }
        h.join(b"t", 1, 6, "").unwrap();
        let Take::Chunk { entries, .. } = h.take(b"t", 1, 3, usize::MAX) else {
            panic!()
        };
        assert_eq!(entries.len(), 3);
        for m in 6..40 {
            h.record(b"t", m, 1_000).unwrap();
            h.check_invariants().unwrap();
        }
        assert!(h.stats().cuts > 0);
        // It delivered 2 of its 3.
        h.give_back(b"t", 1, 2, false).unwrap();
        let (got, _) = drain(&mut h, b"t", 1);
        let Got::Gap(k) = got[0] else {
            panic!("{got:?}")
        };
        assert_eq!(got[1..], messages(2 + k as u32..40)[..]);
        assert_eq!(h.stats().retained, 0);
    }

    #[test]
    fn a_rejoin_starts_after_what_was_dispatched_to_the_earlier_subscription() {
        let mut h = H::new(10, usize::MAX);
        for m in 0..3 {
            h.record(b"t", m, 1).unwrap();
        }
        h.depart(b"t", 7);
        for m in 3..5 {
            h.record(b"t", m, 1).unwrap();
        }
        h.join(b"t", 7, 10, "").unwrap();
        assert_eq!(drain(&mut h, b"t", 7).0, messages(3..5));
        // Anyone else gets everything kept.
        h.join(b"t", 8, 10, "").unwrap();
        assert_eq!(drain(&mut h, b"t", 8).0, messages(0..5));
        h.check_invariants().unwrap();
    }

    #[test]
    fn departures_go_once_the_history_has_passed_them() {
        let mut h = H::new(2, usize::MAX);
        h.record(b"t", 0, 1).unwrap();
        for pid in 0..100 {
            h.depart(b"t", pid);
        }
        let with = h.stats().bytes;
        for m in 1..4 {
            h.record(b"t", m, 1).unwrap();
        }
        h.check_invariants().unwrap();
        assert!(h.stats().bytes < with);
    }

    #[test]
    fn a_joiner_removed_while_catching_up_is_told_so_and_frees_what_it_held() {
        let mut h = H::new(2, usize::MAX);
        h.record(b"t", 0, 1).unwrap();
        h.join(b"t", 1, 2, "d").unwrap();
        for m in 1..5 {
            h.record(b"t", m, 1).unwrap();
        }
        assert!(h.stats().retained > 0);
        assert_eq!(h.remove(b"t", 1).0, Some("d"));
        assert!(matches!(h.take(b"t", 1, 1, 1), Take::Removed));
        assert_eq!(h.stats().retained, 0);
        assert_eq!(h.stats().joiners, 0);
        h.check_invariants().unwrap();
    }

    #[test]
    fn a_joiner_that_leaves_frees_what_it_held() {
        let mut h = H::new(2, usize::MAX);
        h.join(b"t", 1, 2, "d").unwrap();
        h.join(b"u", 1, 2, "e").unwrap();
        for m in 0..5 {
            h.record(b"t", m, 1).unwrap();
        }
        let (left, _) = h.leave(1);
        let mut topics: Vec<&[u8]> = left.iter().map(|(topic, _)| &**topic).collect();
        topics.sort_unstable();
        assert_eq!(topics, [&b"t"[..], &b"u"[..]]);
        assert_eq!(h.stats().joiners, 0);
        assert_eq!(h.stats().retained, 0);
        h.check_invariants().unwrap();
    }

    #[test]
    fn joining_twice_is_refused() {
        let mut h = H::new(2, usize::MAX);
        h.join(b"t", 1, 2, "a").unwrap();
        assert!(matches!(
            h.join(b"t", 1, 2, "b"),
            Err(JoinRefused::AlreadyJoining("b"))
        ));
        h.join(b"u", 1, 2, "c").unwrap();
    }

    #[test]
    fn a_closed_history_keeps_nothing_more() {
        let mut h = H::new(4, usize::MAX);
        h.record(b"t", 0, 1).unwrap();
        h.join(b"t", 1, 4, "d").unwrap();
        let cleared = h.clear();
        assert_eq!(cleared.joiners.len(), 1);
        assert_eq!(cleared.entries.len(), 1);
        // A dispatch already under way when the dispatcher closed.
        assert!(matches!(h.record(b"t", 1, 1), Err(Closed)));
        assert!(matches!(
            h.join(b"t", 2, 4, "e"),
            Err(JoinRefused::Closed("e"))
        ));
        assert!(matches!(h.take(b"t", 1, 1, 1), Take::Removed));
        assert_eq!(h.stats().bytes, 0);
        assert_eq!(h.stats().messages, 0);
        h.check_invariants().unwrap();
    }

    #[test]
    fn the_order_stays_proportional_to_what_is_kept() {
        let mut h = H::new(1, usize::MAX);
        for m in 0..10_000 {
            h.record(b"t", m, 1).unwrap();
        }
        h.check_invariants().unwrap();
        assert!(h.order.len() < 2 * COMPACT_FLOOR + 2);
    }

    #[test]
    fn a_joiners_chunk_is_a_64th_of_the_limit_and_at_least_a_byte() {
        assert_eq!(H::new(1, 64_000).chunk_bytes(), 1_000);
        assert_eq!(H::new(1, 10).chunk_bytes(), 1);
    }

    /// The slack is exact: a joiner that had 2 to deliver at its join may have
    /// `2 + JOIN_SLACK` left, and is cut at one more.
    #[test]
    fn a_joiner_may_fall_join_slack_further_behind_and_no_more() {
        let mut h = H::new(10_000, usize::MAX);
        for m in 0..5 {
            h.record(b"t", m, 1).unwrap();
        }
        h.join(b"t", 1, 2, "").unwrap();
        let slack = JOIN_SLACK as u32;
        for m in 5..5 + slack {
            h.record(b"t", m, 1).unwrap();
        }
        assert_eq!(h.stats().cuts, 0, "exactly JOIN_SLACK further behind");
        h.record(b"t", 5 + slack, 1).unwrap();
        assert_eq!(h.stats().cuts, 1);
        assert_eq!(h.stats().missed, 2 + JOIN_SLACK + 1, "cut to the end");
    }

    /// A joiner's cap is a sixteenth of the limit: one slot of more than that, evicted
    /// while the joiner still needs it, is not held for it; it is cut past it, once.
    #[test]
    fn a_joiner_that_cannot_hold_the_slot_it_needs_is_cut_when_it_is_evicted() {
        let mut h = H::new(2, 100_000);
        h.record(b"t", 0, 10_000).unwrap();
        h.record(b"t", 1, 10_000).unwrap();
        h.join(b"t", 1, 2, "").unwrap();
        h.record(b"t", 2, 10_000).unwrap();
        assert_eq!((h.stats().cuts, h.stats().missed), (1, 1));
        assert_eq!(h.stats().retained, 0, "nothing held past the cap");
        let (got, _) = drain(&mut h, b"t", 1);
        assert_eq!(got, vec![Got::Gap(1), Got::Message(1), Got::Message(2)]);
        h.check_invariants().unwrap();
    }

    /// A cut that skips nothing (what it would skip is in the chunk the joiner is
    /// delivering) opens no gap: no notice, and no cut counted.
    #[test]
    fn a_cut_inside_the_chunk_being_delivered_counts_no_gap() {
        let mut h = H::new(3, 100_000);
        for m in 0..3 {
            h.record(b"t", m, 10_000).unwrap();
        }
        h.join(b"t", 1, 3, "").unwrap();
        let Take::Chunk { missed: 0, entries } = h.take(b"t", 1, 3, usize::MAX) else {
            panic!()
        };
        assert_eq!(entries.len(), 3);
        // Evicts slot 0, pinned by the chunk and more than the joiner's cap.
        h.record(b"t", 3, 10_000).unwrap();
        h.give_back(b"t", 1, 3, false).unwrap();
        assert_eq!((h.stats().cuts, h.stats().missed), (0, 0));
        assert_eq!(drain(&mut h, b"t", 1).0, vec![Got::Message(3)]);
    }

    /// What a joiner cut while delivering a chunk did not send of it is part of its
    /// gap, and counted in `missed` as the gaps it is told are, no more, no less.
    #[test]
    fn what_a_cut_joiner_did_not_send_of_its_chunk_is_counted_missed() {
        let limit = room(6, 1_000) + 6 * 1_100;
        let mut h = H::new(6, limit);
        for m in 0..6 {
            h.record(b"t", m, 1_000).unwrap();
        }
        h.join(b"t", 1, 6, "").unwrap();
        let Take::Chunk { entries, .. } = h.take(b"t", 1, 3, usize::MAX) else {
            panic!()
        };
        assert_eq!(entries.len(), 3);
        for m in 6..40 {
            h.record(b"t", m, 1_000).unwrap();
        }
        assert!(h.stats().cuts > 0);
        // It sent 2 of its 3: the third is missed too.
        h.give_back(b"t", 1, 2, false).unwrap();
        let (got, _) = drain(&mut h, b"t", 1);
        let told: u64 = got
            .iter()
            .map(|g| if let Got::Gap(k) = g { *k } else { 0 })
            .sum();
        let delivered = got.iter().filter(|g| matches!(g, Got::Message(_))).count() as u64;
        assert_eq!(
            2 + delivered + told,
            40,
            "every dispatch from its start, once"
        );
        assert_eq!(h.stats().missed, told);
    }

    /// Twin histories with the same dispatches, one with a departure at 3: the
    /// departure is accounted until the history starts at 3, not a dispatch longer, and
    /// then leaves nothing behind (the topic goes once nothing else holds it).
    #[test]
    fn a_departure_is_let_go_as_soon_as_the_history_has_passed_it() {
        let limit = 3 * (1_000 + H::SLOT_BYTES) + 2 * (H::TOPIC_BYTES + 1);
        let (mut a, mut b) = (H::new(3, limit), H::new(3, limit));
        let record = |a: &mut H, b: &mut H, topic: &[u8], m: u32| {
            a.record(topic, m, 1_000).unwrap();
            b.record(topic, m, 1_000).unwrap();
        };
        for m in 0..3 {
            record(&mut a, &mut b, b"t", m);
        }
        a.depart(b"t", 7);
        for m in 3..5 {
            record(&mut a, &mut b, b"t", m);
            assert!(a.stats().bytes > b.stats().bytes, "still ahead at {m}");
        }
        // The history now starts at 3.
        record(&mut a, &mut b, b"t", 5);
        assert_eq!(a.stats().bytes, b.stats().bytes);
        // Another topic takes all the room: "t" goes, in both.
        for m in 0..3 {
            record(&mut a, &mut b, b"u", m);
        }
        assert_eq!((a.kept_of(b"t"), b.kept_of(b"t")), (0, 0));
        assert_eq!(a.stats().bytes, b.stats().bytes);
        a.check_invariants().unwrap();
    }

    /// Compaction keeps the order proportional to what is kept when much is kept too:
    /// here 3 001 messages, while one topic is dispatched to 10 000 times.
    #[test]
    fn the_order_is_compacted_however_much_else_is_kept() {
        let mut h = H::new(1, usize::MAX);
        for t in 0..3_000u32 {
            h.record(format!("k{t}").as_bytes(), t, 1).unwrap();
        }
        for m in 0..10_000 {
            h.record(b"t", m, 1).unwrap();
        }
        h.check_invariants().unwrap();
        assert!(h.order.len() <= 2 * 3_001 + 2, "{}", h.order.len());
    }

    /// After a compaction the byte limit still evicts the oldest message of all first.
    #[test]
    fn after_the_order_is_compacted_the_oldest_still_goes_first() {
        let limit = 2 * (1 + H::SLOT_BYTES) + 3 * (H::TOPIC_BYTES + 1);
        let mut h = H::new(1, limit);
        h.record(b"a", 0, 1).unwrap();
        for m in 0..2 * COMPACT_FLOOR as u32 {
            h.record(b"t", m, 1).unwrap();
        }
        h.record(b"b", 0, 1).unwrap();
        assert_eq!(
            (h.kept_of(b"a"), h.kept_of(b"t"), h.kept_of(b"b")),
            (0, 1, 1)
        );
        h.check_invariants().unwrap();
    }

    /// Random dispatches, joins and partial deliveries (with dispatches, and so cuts,
    /// while a chunk is out) under a tight limit. The expected answers come from a plain
    /// list of everything dispatched, not from the history: each joiner starts at
    /// `min(n, kept)` before the end at its join, and what it delivers, gaps counted,
    /// covers every dispatch from there to its catching up exactly once, in order.
    #[test]
    fn joiners_see_every_dispatch_once_or_are_told_against_a_model() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |bound: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % bound
        };
        let topics: [&[u8]; 3] = [b"a", b"b", b"c"];
        let mut h = H::new(8, room(24, 60));
        let mut sent: Vec<Vec<u32>> = vec![Vec::new(); 3];
        struct Model {
            pid: Pid,
            topic: usize,
            /// Where it is in `sent[topic]`.
            at: usize,
            out: Option<(u64, Vec<u32>)>,
        }
        let mut joiners: Vec<Model> = Vec::new();
        let (mut caught_up, mut told) = (0, 0);
        let mut counter = 0u32;
        for step in 0..60_000u64 {
            match next(12) {
                0..=5 => {
                    let t = next(3) as usize;
                    counter += 1;
                    let bytes = if next(50) == 0 {
                        usize::MAX / 2
                    } else {
                        1 + next(60) as usize
                    };
                    drop(h.record(topics[t], counter, bytes).unwrap());
                    sent[t].push(counter);
                }
                6 if joiners.len() < 5 => {
                    let t = next(3) as usize;
                    let n = next(12) as usize;
                    let pid = 1_000 + step;
                    let kept = h.kept_of(topics[t]);
                    h.join(topics[t], pid, n, "").unwrap();
                    let at = sent[t].len() - n.min(kept);
                    joiners.push(Model {
                        pid,
                        topic: t,
                        at,
                        out: None,
                    });
                }
                7..=8 if !joiners.is_empty() => {
                    // Takes a chunk, and holds it for a while.
                    let j = next(joiners.len() as u64) as usize;
                    let Model {
                        pid, topic, out, ..
                    } = &mut joiners[j];
                    if out.is_some() {
                        continue;
                    }
                    match h.take(topics[*topic], *pid, 1 + next(4) as usize, 100) {
                        Take::Chunk { missed, entries } => {
                            *out = Some((missed, entries.iter().map(|e| e.message).collect()));
                        }
                        Take::CaughtUp { .. } => {
                            let m = joiners.swap_remove(j);
                            assert_eq!(m.at, sent[m.topic].len(), "caught up short");
                            caught_up += 1;
                        }
                        Take::Removed | Take::Parked => panic!("joiner lost"),
                    }
                }
                9..=11 if !joiners.is_empty() => {
                    // Delivers part of its chunk.
                    let j = next(joiners.len() as u64) as usize;
                    let m = &mut joiners[j];
                    let Some((missed, chunk)) = m.out.take() else {
                        continue;
                    };
                    let sending = missed > 0 || !chunk.is_empty();
                    let sent_now = if sending {
                        next(chunk.len() as u64 + 1) as usize
                    } else {
                        0
                    };
                    if missed > 0 {
                        m.at += missed as usize;
                        told += 1;
                    }
                    for &message in &chunk[..sent_now] {
                        assert_eq!(sent[m.topic][m.at], message, "out of place");
                        m.at += 1;
                    }
                    h.give_back(topics[m.topic], m.pid, sent_now, missed > 0)
                        .unwrap();
                }
                _ => {}
            }
            h.check_invariants().unwrap();
        }
        assert!(caught_up > 40, "{caught_up} caught up");
        assert!(told > 10, "{told} gaps told");
        assert!(h.stats().cuts > 10);
    }
}
