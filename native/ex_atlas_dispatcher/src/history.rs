//! Replay: each topic's most recent dispatches, and the subscribers catching up on them.
//!
//! Plain Rust, generic over the kept message `M` (the NIF keeps a frozen copy of the
//! term) and over what a joiner carries `J` (the NIF: its monitor and partition). One
//! `History` sits behind one lock, which a dispatch takes to record its message and take
//! its registry snapshot, and a joiner takes to move into the registry: every dispatch is
//! therefore either recorded before the joiner entered the registry (and reaches the
//! joiner through its inbox) or snapshot after (and reaches it live), never both, never
//! neither.
//!
//! Bounds:
//! - per topic, the `keep` most recent messages;
//! - over all topics, `limit` bytes: past it the oldest kept messages go first, whichever
//!   topic they belong to;
//! - a joiner's inbox holds what it was given at `join` plus at most [`JOIN_SLACK`]
//!   messages dispatched since. Once it reaches that, dispatches to the topic wait (are
//!   gated) until the joiner has caught up and left the history for the registry, as a
//!   dispatch to a full lane waits for room.
//!
//! A joiner's inbox holds shared handles (`Arc`) to the messages, so what it has yet to
//! deliver stays valid whatever is evicted meanwhile: eviction never opens a gap in a
//! replay under way.

use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::sync::Arc;

/// A process, as the registry names it.
pub type Pid = u64;

/// Messages a joiner may fall behind the dispatches to its topic, beyond what it was
/// given when it joined, before a dispatch to the topic waits for it.
pub const JOIN_SLACK: usize = 256;

/// Below this many stale entries the global order is not compacted.
const COMPACT_FLOOR: usize = 1_024;

/// One kept message and its size as accounted.
pub struct Entry<M> {
    pub bytes: usize,
    pub message: M,
}

struct Kept<M> {
    /// Position in the order of all dispatches recorded, over all topics.
    global: u64,
    entry: Arc<Entry<M>>,
}

struct Joiner<M, J> {
    pid: Pid,
    inbox: VecDeque<Arc<Entry<M>>>,
    /// Inbox length at which dispatches to the topic wait.
    limit: usize,
    /// Set once the inbox reached `limit`: from then on dispatches to the topic wait
    /// until this joiner has caught up completely. Letting them go as soon as it is
    /// below the limit again would let producers faster than the joiner keep it from
    /// ever catching up.
    gating: bool,
    data: J,
}

struct Log<M, J> {
    entries: VecDeque<Kept<M>>,
    joiners: Vec<Joiner<M, J>>,
    /// Producers whose dispatch waits for a joiner: `(pid, token)`.
    waiting: Vec<(Pid, u64)>,
}

impl<M, J> Log<M, J> {
    fn new() -> Self {
        Log {
            entries: VecDeque::new(),
            joiners: Vec::new(),
            waiting: Vec::new(),
        }
    }

    fn is_idle(&self) -> bool {
        self.entries.is_empty() && self.joiners.is_empty() && self.waiting.is_empty()
    }

    fn is_gated(&self) -> bool {
        self.joiners.iter().any(|j| j.gating)
    }
}

/// What `record` took out of the history: dropped by the caller once its lock is
/// released (dropping a frozen message frees its environment).
pub type Evicted<M> = Vec<Arc<Entry<M>>>;

/// The answer to [`History::take`].
pub enum Take<M, J> {
    /// The next messages for the joiner to deliver to itself, oldest first.
    Chunk(Vec<Arc<Entry<M>>>),
    /// It has caught up and is no longer a joiner: the caller must add it to the
    /// registry before releasing the lock. `woken`: producers to wake.
    CaughtUp { data: J, woken: Vec<(Pid, u64)> },
    /// No such joiner (it was removed: its process died, or the history was cleared).
    Unknown,
}

/// Figures for `stats`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub messages: usize,
    pub bytes: usize,
    pub joiners: usize,
}

/// Everything `clear` took out: the joiners' data (to release), the producers to wake,
/// and the messages (to free outside the lock).
pub struct Cleared<M, J> {
    pub joiners: Vec<(Pid, J)>,
    pub woken: Vec<(Pid, u64)>,
    pub entries: Evicted<M>,
}

pub struct History<M, J> {
    keep: usize,
    limit: usize,
    next: u64,
    topics: FxHashMap<Arc<[u8]>, Log<M, J>>,
    /// Every kept message as `(global, topic)`, oldest first; entries already evicted
    /// by the per-topic bound stay until they reach the front or a compaction.
    order: VecDeque<(u64, Arc<[u8]>)>,
    stale: usize,
    bytes: usize,
    messages: usize,
    /// The topics each joining process is joining.
    joining: FxHashMap<Pid, Vec<Arc<[u8]>>>,
}

impl<M, J> History<M, J> {
    /// Keeps at most `keep` messages per topic (at least 1) and `limit` bytes in all.
    pub fn new(keep: usize, limit: usize) -> Self {
        History {
            keep: keep.max(1),
            limit,
            next: 0,
            topics: FxHashMap::default(),
            order: VecDeque::new(),
            stale: 0,
            bytes: 0,
            messages: 0,
            joining: FxHashMap::default(),
        }
    }

    pub fn stats(&self) -> Stats {
        Stats {
            messages: self.messages,
            bytes: self.bytes,
            joiners: self.joining.values().map(Vec::len).sum(),
        }
    }

    /// True when a dispatch to `topic` must wait for a joiner to catch up first.
    pub fn is_gated(&self, topic: &[u8]) -> bool {
        self.topics.get(topic).is_some_and(Log::is_gated)
    }

    /// Records that `pid` waits, with `token`, for `topic`'s joiners; it is woken with
    /// the token once none of them gates the topic any more (each caught up or left),
    /// or by `clear`.
    pub fn wait(&mut self, topic: &[u8], pid: Pid, token: u64) {
        if let Some(log) = self.topics.get_mut(topic) {
            log.waiting.push((pid, token));
        }
    }

    /// Records one dispatch of `message` to `topic`: every joiner of the topic gets it in
    /// its inbox, and it is kept, evicting what the bounds require.
    pub fn record(&mut self, topic: &[u8], message: M, bytes: usize) -> Evicted<M> {
        let entry = Arc::new(Entry { bytes, message });
        let global = self.next;
        self.next += 1;
        let name = self.name_of(topic);
        let mut evicted = Vec::new();
        let Some(log) = self.topics.get_mut(topic) else {
            return evicted;
        };
        for joiner in &mut log.joiners {
            joiner.inbox.push_back(entry.clone());
            joiner.gating |= joiner.inbox.len() >= joiner.limit;
        }
        if bytes > self.limit {
            // Keeping it would evict everything else and then itself.
            if log.is_idle() {
                self.topics.remove(topic);
            }
            evicted.push(entry);
            return evicted;
        }
        log.entries.push_back(Kept { global, entry });
        self.bytes += bytes;
        self.messages += 1;
        if log.entries.len() > self.keep {
            if let Some(old) = log.entries.pop_front() {
                self.bytes -= old.entry.bytes;
                self.messages -= 1;
                self.stale += 1;
                evicted.push(old.entry);
            }
        }
        self.order.push_back((global, name));
        while self.bytes > self.limit {
            match self.evict_oldest() {
                Some(entry) => evicted.push(entry),
                None => break,
            }
        }
        self.compact();
        evicted
    }

    /// The shared name of `topic`, whose log is created if it has none.
    fn name_of(&mut self, topic: &[u8]) -> Arc<[u8]> {
        if let Some((name, _)) = self.topics.get_key_value(topic) {
            return name.clone();
        }
        let name: Arc<[u8]> = Arc::from(topic);
        self.topics.insert(name.clone(), Log::new());
        name
    }

    /// Removes the oldest kept message of all topics.
    fn evict_oldest(&mut self) -> Option<Arc<Entry<M>>> {
        while let Some((global, name)) = self.order.pop_front() {
            let Some(log) = self.topics.get_mut(&name) else {
                self.stale -= 1;
                continue;
            };
            if log.entries.front().is_none_or(|kept| kept.global != global) {
                self.stale -= 1;
                continue;
            }
            let kept = log.entries.pop_front()?;
            self.bytes -= kept.entry.bytes;
            self.messages -= 1;
            if log.is_idle() {
                self.topics.remove(&name);
            }
            return Some(kept.entry);
        }
        None
    }

    /// Drops the order's stale entries once they are the majority, so that the order
    /// stays proportional to what is kept.
    fn compact(&mut self) {
        if self.stale < COMPACT_FLOOR || self.stale * 2 < self.order.len() {
            return;
        }
        let topics = &mut self.topics;
        topics.retain(|_, log| !log.is_idle());
        self.order.retain(|(global, name)| {
            topics
                .get(name)
                .and_then(|log| log.entries.front())
                .is_some_and(|front| front.global <= *global)
        });
        self.stale = 0;
    }

    /// `pid` starts catching up on `topic`: its inbox gets the topic's `n` most recent
    /// kept messages (fewer if fewer are kept). From now on, until `take` answers
    /// `CaughtUp`, every dispatch to the topic goes to its inbox too. Refused (`Err`
    /// gives `data` back) when `pid` is already joining `topic`.
    pub fn join(&mut self, topic: &[u8], pid: Pid, n: usize, data: J) -> Result<usize, J> {
        let name = self.name_of(topic);
        let Some(log) = self.topics.get_mut(topic) else {
            return Err(data);
        };
        if log.joiners.iter().any(|j| j.pid == pid) {
            return Err(data);
        }
        let skip = log.entries.len().saturating_sub(n);
        let inbox: VecDeque<_> = log
            .entries
            .iter()
            .skip(skip)
            .map(|k| k.entry.clone())
            .collect();
        let given = inbox.len();
        log.joiners.push(Joiner {
            pid,
            inbox,
            limit: given + JOIN_SLACK,
            gating: false,
            data,
        });
        self.joining.entry(pid).or_default().push(name);
        Ok(given)
    }

    /// The next messages of `pid`'s inbox for `topic`: up to `max` messages and, past the
    /// first, `max_bytes` bytes. When the inbox is empty the joiner is done (see `Take`).
    pub fn take(&mut self, topic: &[u8], pid: Pid, max: usize, max_bytes: usize) -> Take<M, J> {
        let Some(log) = self.topics.get_mut(topic) else {
            return Take::Unknown;
        };
        let Some(at) = log.joiners.iter().position(|j| j.pid == pid) else {
            return Take::Unknown;
        };
        let joiner = &mut log.joiners[at];
        if joiner.inbox.is_empty() {
            let joiner = log.joiners.swap_remove(at);
            let woken = if log.is_gated() {
                Vec::new()
            } else {
                std::mem::take(&mut log.waiting)
            };
            if log.is_idle() {
                self.topics.remove(topic);
            }
            self.unlist(pid, topic);
            return Take::CaughtUp {
                data: joiner.data,
                woken,
            };
        }
        let mut chunk = Vec::new();
        let mut bytes = 0;
        while chunk.len() < max.max(1) {
            let Some(next) = joiner.inbox.front() else {
                break;
            };
            if !chunk.is_empty() && bytes + next.bytes > max_bytes {
                break;
            }
            bytes += next.bytes;
            chunk.extend(joiner.inbox.pop_front());
        }
        Take::Chunk(chunk)
    }

    /// Puts messages a joiner took but did not deliver back at the front of its inbox.
    pub fn put_back(&mut self, topic: &[u8], pid: Pid, rest: Vec<Arc<Entry<M>>>) {
        let joiner = self
            .topics
            .get_mut(topic)
            .and_then(|log| log.joiners.iter_mut().find(|j| j.pid == pid));
        if let Some(joiner) = joiner {
            for entry in rest.into_iter().rev() {
                joiner.inbox.push_front(entry);
            }
        }
    }

    /// `pid` is gone: it stops joining every topic. Returns its joiners' data and the
    /// producers that waited for it.
    pub fn leave(&mut self, pid: Pid) -> (Vec<J>, Vec<(Pid, u64)>) {
        let mut data = Vec::new();
        let mut woken = Vec::new();
        let Some(names) = self.joining.remove(&pid) else {
            return (data, woken);
        };
        for name in names {
            let Some(log) = self.topics.get_mut(&name) else {
                continue;
            };
            while let Some(at) = log.joiners.iter().position(|j| j.pid == pid) {
                data.push(log.joiners.swap_remove(at).data);
            }
            if !log.is_gated() {
                woken.append(&mut log.waiting);
            }
            if log.is_idle() {
                self.topics.remove(&name);
            }
        }
        (data, woken)
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

    /// Empties the history for good (the dispatcher closes).
    pub fn clear(&mut self) -> Cleared<M, J> {
        let mut cleared = Cleared {
            joiners: Vec::new(),
            woken: Vec::new(),
            entries: Vec::new(),
        };
        for (_, log) in self.topics.drain() {
            cleared.woken.extend(log.waiting);
            cleared
                .joiners
                .extend(log.joiners.into_iter().map(|j| (j.pid, j.data)));
            cleared
                .entries
                .extend(log.entries.into_iter().map(|k| k.entry));
        }
        self.order.clear();
        self.joining.clear();
        self.stale = 0;
        self.bytes = 0;
        self.messages = 0;
        cleared
    }

    /// Checks the bookkeeping against the contents (tests).
    pub fn check_invariants(&self) -> Result<(), String> {
        let messages: usize = self.topics.values().map(|l| l.entries.len()).sum();
        let bytes: usize = self
            .topics
            .values()
            .flat_map(|l| l.entries.iter())
            .map(|k| k.entry.bytes)
            .sum();
        if messages != self.messages || bytes != self.bytes {
            return Err(format!(
                "counted {}/{} B, hold {messages}/{bytes} B",
                self.messages, self.bytes
            ));
        }
        if self.bytes > self.limit {
            return Err(format!("{} B over the limit {}", self.bytes, self.limit));
        }
        if let Some((name, log)) = self
            .topics
            .iter()
            .find(|(_, l)| l.entries.len() > self.keep)
        {
            return Err(format!(
                "{name:?} keeps {} > {}",
                log.entries.len(),
                self.keep
            ));
        }
        if self.order.len() != self.messages + self.stale {
            return Err(format!(
                "order {} != {} kept + {} stale",
                self.order.len(),
                self.messages,
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

    fn drain(h: &mut H, topic: &[u8], pid: Pid) -> (Vec<u32>, Option<&'static str>) {
        let mut got = Vec::new();
        loop {
            match h.take(topic, pid, 3, usize::MAX) {
                Take::Chunk(chunk) => got.extend(chunk.iter().map(|e| e.message)),
                Take::CaughtUp { data, .. } => return (got, Some(data)),
                Take::Unknown => return (got, None),
            }
        }
    }

    #[test]
    fn keeps_the_most_recent_per_topic() {
        let mut h = H::new(3, usize::MAX);
        for m in 0..10 {
            h.record(b"a", m, 10);
        }
        h.check_invariants().unwrap();
        assert_eq!(h.stats().messages, 3);
        assert_eq!(h.stats().bytes, 30);
        h.join(b"a", 1, 2, "j").unwrap();
        assert_eq!(drain(&mut h, b"a", 1), (vec![8, 9], Some("j")));
        h.join(b"a", 1, 100, "j").unwrap();
        assert_eq!(drain(&mut h, b"a", 1).0, vec![7, 8, 9]);
    }

    #[test]
    fn over_the_byte_limit_the_oldest_go_first_whatever_the_topic() {
        let mut h = H::new(100, 50);
        h.record(b"a", 1, 20);
        h.record(b"b", 2, 20);
        h.record(b"a", 3, 20);
        h.check_invariants().unwrap();
        assert_eq!(
            h.stats(),
            Stats {
                messages: 2,
                bytes: 40,
                joiners: 0
            }
        );
        h.join(b"a", 7, 10, "").unwrap();
        assert_eq!(drain(&mut h, b"a", 7).0, vec![3]);
        h.join(b"b", 7, 10, "").unwrap();
        assert_eq!(drain(&mut h, b"b", 7).0, vec![2]);
    }

    #[test]
    fn a_message_over_the_limit_alone_is_not_kept_and_evicts_nothing() {
        let mut h = H::new(100, 50);
        h.record(b"a", 1, 20);
        h.join(b"b", 9, 10, "").unwrap();
        let evicted = h.record(b"b", 2, 51);
        assert_eq!(evicted.len(), 1);
        h.check_invariants().unwrap();
        assert_eq!(h.stats().messages, 1);
        // A joiner still gets it: it was dispatched during its join.
        assert_eq!(drain(&mut h, b"b", 9).0, vec![2]);
    }

    #[test]
    fn dispatches_during_a_join_reach_the_inbox_once_and_in_order() {
        let mut h = H::new(4, usize::MAX);
        for m in 0..4 {
            h.record(b"t", m, 1);
        }
        h.join(b"t", 5, 2, "d").unwrap();
        let Take::Chunk(first) = h.take(b"t", 5, 1, usize::MAX) else {
            panic!()
        };
        assert_eq!(first[0].message, 2);
        // Evicting everything kept does not touch the inbox.
        for m in 4..10 {
            h.record(b"t", m, 1);
        }
        assert_eq!(drain(&mut h, b"t", 5), ((3..10).collect(), Some("d")));
        // Caught up: no longer fed.
        h.record(b"t", 10, 1);
        assert!(matches!(h.take(b"t", 5, 1, 1), Take::Unknown));
        h.check_invariants().unwrap();
    }

    #[test]
    fn put_back_restores_the_order() {
        let mut h = H::new(10, usize::MAX);
        for m in 0..5 {
            h.record(b"t", m, 1);
        }
        h.join(b"t", 1, 5, "").unwrap();
        let Take::Chunk(chunk) = h.take(b"t", 1, 4, usize::MAX) else {
            panic!()
        };
        h.put_back(b"t", 1, chunk[2..].to_vec());
        assert_eq!(drain(&mut h, b"t", 1).0, vec![2, 3, 4]);
    }

    #[test]
    fn chunks_are_bounded_by_bytes_but_never_empty() {
        let mut h = H::new(10, usize::MAX);
        h.record(b"t", 1, 100);
        h.record(b"t", 2, 100);
        h.join(b"t", 1, 5, "").unwrap();
        let Take::Chunk(chunk) = h.take(b"t", 1, 10, 50) else {
            panic!()
        };
        assert_eq!(chunk.len(), 1);
    }

    #[test]
    fn a_joiner_far_behind_gates_the_topic_until_it_catches_up() {
        let mut h = H::new(1, usize::MAX);
        h.join(b"t", 1, 0, "").unwrap();
        for m in 0..JOIN_SLACK as u32 {
            assert!(!h.is_gated(b"t"));
            h.record(b"t", m, 1);
        }
        assert!(h.is_gated(b"t"));
        assert!(!h.is_gated(b"other"));
        h.wait(b"t", 42, 7);
        let Take::Chunk(_) = h.take(b"t", 1, 1, usize::MAX) else {
            panic!()
        };
        // Below the limit again, but not caught up: still waiting, and nobody woken
        // before `CaughtUp` (only it and `leave` hand out the waiting producers).
        assert!(h.is_gated(b"t"));
        let woken = loop {
            match h.take(b"t", 1, 64, usize::MAX) {
                Take::Chunk(_) => assert!(h.is_gated(b"t")),
                Take::CaughtUp { woken, .. } => break woken,
                Take::Unknown => panic!("joiner lost"),
            }
        };
        assert_eq!(woken, vec![(42, 7)]);
        assert!(!h.is_gated(b"t"));
    }

    #[test]
    fn a_joiner_that_leaves_wakes_the_producers_and_frees_its_inbox() {
        let mut h = H::new(1, usize::MAX);
        h.join(b"t", 1, 0, "data").unwrap();
        for m in 0..JOIN_SLACK as u32 {
            h.record(b"t", m, 1);
        }
        h.wait(b"t", 42, 7);
        let (data, woken) = h.leave(1);
        assert_eq!(data, vec!["data"]);
        assert_eq!(woken, vec![(42, 7)]);
        assert_eq!(h.stats().joiners, 0);
        assert!(matches!(h.take(b"t", 1, 1, 1), Take::Unknown));
        assert_eq!(h.leave(1).0.len(), 0);
    }

    #[test]
    fn joining_twice_is_refused() {
        let mut h = H::new(1, usize::MAX);
        assert!(h.join(b"t", 1, 0, "a").is_ok());
        assert_eq!(h.join(b"t", 1, 0, "b"), Err("b"));
        assert!(h.join(b"u", 1, 0, "c").is_ok());
        assert_eq!(h.stats().joiners, 2);
    }

    #[test]
    fn the_order_stays_proportional_to_what_is_kept() {
        let mut h = H::new(1, usize::MAX);
        h.record(b"old", 0, 1);
        for m in 0..100_000 {
            h.record(b"hot", m, 1);
        }
        h.check_invariants().unwrap();
        assert!(h.order.len() <= 2 * COMPACT_FLOOR + 2, "{}", h.order.len());
    }

    #[test]
    fn clear_returns_everything() {
        let mut h = H::new(5, usize::MAX);
        h.record(b"t", 1, 3);
        h.join(b"u", 9, 1, "j").unwrap();
        h.wait(b"u", 4, 2);
        let cleared = h.clear();
        assert_eq!(cleared.entries.len(), 1);
        assert_eq!(cleared.joiners, vec![(9, "j")]);
        assert_eq!(cleared.woken, vec![(4, 2)]);
        assert_eq!(h.stats(), Stats::default());
        h.check_invariants().unwrap();
    }

    /// Random dispatches, joins and takes against a model: each joiner gets exactly the
    /// last min(n, kept) messages at its join, then every later one, in order.
    #[test]
    fn joiners_see_every_message_exactly_once_against_a_model() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |bound: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % bound
        };
        let topics: [&[u8]; 3] = [b"a", b"b", b"c"];
        let mut h = H::new(8, 400);
        // Per topic, every message recorded; per joiner, what it expects and got.
        let mut sent: Vec<Vec<u32>> = vec![Vec::new(); 3];
        let mut joiners: Vec<(Pid, usize, Vec<u32>, Vec<u32>)> = Vec::new();
        let mut counter = 0u32;
        for step in 0..20_000u64 {
            match next(10) {
                0..=5 => {
                    let t = next(3) as usize;
                    counter += 1;
                    drop(h.record(topics[t], counter, 1 + next(60) as usize));
                    sent[t].push(counter);
                    for (_, jt, expected, _) in joiners.iter_mut() {
                        if *jt == t {
                            expected.push(counter);
                        }
                    }
                }
                6 if joiners.len() < 4 => {
                    let t = next(3) as usize;
                    let n = next(12) as usize;
                    let pid = 1_000 + step;
                    // What is kept now: the model asks the history through a probe.
                    h.join(topics[t], pid, n, "").unwrap();
                    let probe: Vec<u32> = match h.take(topics[t], pid, usize::MAX, usize::MAX) {
                        Take::Chunk(c) => {
                            let probe = c.iter().map(|e| e.message).collect();
                            h.put_back(topics[t], pid, c);
                            probe
                        }
                        // Nothing kept (or n = 0): caught up at once.
                        Take::CaughtUp { .. } => continue,
                        Take::Unknown => panic!("joiner lost at once"),
                    };
                    // The probe must be a suffix of what was sent, no longer than n.
                    assert!(probe.len() <= n);
                    assert!(sent[t].ends_with(&probe), "{probe:?} not a suffix");
                    joiners.push((pid, t, probe, Vec::new()));
                }
                _ if !joiners.is_empty() => {
                    let at = next(joiners.len() as u64) as usize;
                    let (pid, t, _, got) = &mut joiners[at];
                    match h.take(topics[*t], *pid, 1 + next(4) as usize, 100) {
                        Take::Chunk(c) => got.extend(c.iter().map(|e| e.message)),
                        Take::CaughtUp { .. } => {
                            let (_, _, expected, got) = joiners.swap_remove(at);
                            assert_eq!(expected, got);
                        }
                        Take::Unknown => panic!("joiner lost"),
                    }
                }
                _ => {}
            }
            h.check_invariants().unwrap();
        }
    }
}
