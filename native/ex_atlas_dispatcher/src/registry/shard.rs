//! One shard of the registry: topic → subscribers, subscriber → subscriptions, with
//! Elixir `Registry`'s `keys: :duplicate` semantics, behind the one lock its
//! [`Sharded`](super::Sharded) front gives it.
//!
//! * A topic's subscribers are a [`Part`]: a list of fixed-size chunks shared
//!   copy-on-write with dispatch snapshots: a snapshot is one `Arc` clone per part, and a
//!   later change copies at most one chunk and the (short) chunk index, never the whole
//!   subscriber list.
//! * Every subscription knows its slot (topic, chunk, slot) through its subscriber's
//!   entry, so removal is a swap-remove with the part's last slot plus one fix-up of the
//!   subscription that moved.

use super::tracking::Changes;
use super::Pid;
use rustc_hash::FxHashMap;
use smallvec::SmallVec;
use std::sync::Arc;

/// Subscribers per chunk. Large enough that the chunk index of a 100 000-subscriber topic
/// stays short (a few hundred pointers), small enough that a copy-on-write of one chunk
/// is a few microseconds.
pub const CHUNK: usize = 512;

type Chunk = Arc<Vec<Pid>>;

/// A topic's subscribers within one registry (one shard), cheap to clone (shared chunks).
#[derive(Clone, Default)]
pub struct Part {
    chunks: Arc<Vec<Chunk>>,
    len: usize,
    /// [`topic_key`] of the topic's name, fixed when the topic is created.
    topic: u64,
    /// Which dispatch this snapshot is of ([`Part::mark`]); 0 for the registry's own copy.
    serial: u64,
}

/// The key of a topic's name in the skip table (`crate::skip`): a 64-bit hash, kept in
/// each [`Part`] so that a send loop knows its topic without the name.
pub fn topic_key(name: &[u8]) -> u64 {
    let mut hasher = rustc_hash::FxHasher::default();
    std::hash::Hasher::write(&mut hasher, name);
    std::hash::Hasher::finish(&hasher)
}

impl Part {
    /// [`topic_key`] of this part's topic.
    pub fn topic(&self) -> u64 {
        self.topic
    }

    /// The dispatch this snapshot is of, as set by [`Part::mark`].
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// Tags this snapshot with its dispatch's serial, so that the skip table counts a
    /// subscriber with several subscriptions once per dispatch.
    pub fn mark(&mut self, serial: u64) {
        self.serial = serial;
    }

    /// Number of subscriptions in this part.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the part holds no subscription.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The chunks, in order; together they hold `len()` pids.
    pub fn chunks(&self) -> impl Iterator<Item = &[Pid]> {
        self.chunks.iter().map(|chunk| chunk.as_slice())
    }

    /// Every pid of this part (duplicates included).
    pub fn pids(&self) -> impl Iterator<Item = Pid> + '_ {
        self.chunks().flat_map(|chunk| chunk.iter().copied())
    }

    /// The pids from position `start` on, in the order of `pids()`. Constant time to
    /// start: every chunk but the last is full.
    pub fn pids_from(&self, start: usize) -> impl Iterator<Item = Pid> + '_ {
        let first_chunk = start / CHUNK;
        let skip = start % CHUNK;
        self.chunks
            .iter()
            .skip(first_chunk)
            .enumerate()
            .flat_map(move |(i, chunk)| {
                chunk[if i == 0 { skip.min(chunk.len()) } else { 0 }..]
                    .iter()
                    .copied()
            })
    }

    fn push(&mut self, pid: Pid) -> Slot {
        let chunks = Arc::make_mut(&mut self.chunks);
        if chunks.last().is_none_or(|chunk| chunk.len() >= CHUNK) {
            chunks.push(Arc::new(Vec::new()));
        }
        let chunk_index = chunks.len() - 1;
        let chunk = Arc::make_mut(&mut chunks[chunk_index]);
        chunk.push(pid);
        self.len += 1;
        Slot {
            chunk: chunk_index as u32,
            slot: (chunk.len() - 1) as u32,
        }
    }

    /// Removes the pid at `at` by moving the part's last pid into its place. Returns the
    /// pid that moved and where it came from, if one moved.
    fn swap_remove(&mut self, at: Slot) -> Option<(Pid, Slot)> {
        let chunks = Arc::make_mut(&mut self.chunks);
        let last_index = chunks.len().checked_sub(1)?;
        let last_chunk = Arc::make_mut(&mut chunks[last_index]);
        let last_pid = last_chunk.pop()?;
        let last_slot = Slot {
            chunk: last_index as u32,
            slot: last_chunk.len() as u32,
        };
        if last_chunk.is_empty() {
            chunks.pop();
        }
        self.len -= 1;
        if last_slot == at {
            return None;
        }
        let target = chunks.get_mut(at.chunk as usize)?;
        let target = Arc::make_mut(target);
        *target.get_mut(at.slot as usize)? = last_pid;
        Some((last_pid, last_slot))
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Slot {
    chunk: u32,
    slot: u32,
}

#[derive(Clone, Copy, Debug)]
struct Subscription {
    topic: u32,
    at: Slot,
}

struct Subscriber<M> {
    monitor: M,
    subscriptions: SmallVec<[Subscription; 1]>,
}

struct Topic {
    name: Arc<[u8]>,
    part: Part,
}

/// Counters describing the registry's contents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Topics with at least one subscription.
    pub topics: usize,
    /// Subscriptions, duplicates counted.
    pub subscriptions: usize,
    /// Distinct subscribers, each holding exactly one monitor.
    pub subscribers: usize,
}

/// What the caller must undo after removing subscriptions.
#[derive(Debug, PartialEq, Eq)]
pub struct Removed<M> {
    /// How many subscriptions went.
    pub count: usize,
    /// The monitor of a subscriber whose last subscription went; release it.
    pub released: Option<M>,
}

/// Why a subscription was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum SubscribeError {
    /// The monitor could not be set up: the process is not alive.
    NotAlive,
    /// Topic ids are `u32`; more than that many live topics is refused.
    TooManyTopics,
}

/// Topic → subscribers with `Registry`'s `keys: :duplicate` semantics.
pub struct Registry<M> {
    by_name: FxHashMap<Arc<[u8]>, u32>,
    topics: Vec<Option<Topic>>,
    free_ids: Vec<u32>,
    subscribers: FxHashMap<Pid, Subscriber<M>>,
    subscriptions: usize,
    /// Topics created or emptied, for the cluster (see `tracking`).
    pub(super) changes: Changes,
}

impl<M> Default for Registry<M> {
    fn default() -> Self {
        Registry::new()
    }
}

impl<M> Registry<M> {
    /// An empty registry.
    pub fn new() -> Self {
        Registry {
            by_name: FxHashMap::default(),
            topics: Vec::new(),
            free_ids: Vec::new(),
            subscribers: FxHashMap::default(),
            subscriptions: 0,
            changes: Changes::default(),
        }
    }

    /// Adds one subscription of `pid` to `topic`. `monitor` is called only when `pid` has
    /// no subscription yet; it returns `None` when the process is already dead, and then
    /// nothing is added.
    pub fn subscribe(
        &mut self,
        topic: &[u8],
        pid: Pid,
        monitor: impl FnOnce() -> Option<M>,
    ) -> Result<(), SubscribeError> {
        if !self.subscribers.contains_key(&pid) {
            // Check the topic limit before creating a monitor we would have to undo.
            if !self.by_name.contains_key(topic)
                && self.free_ids.is_empty()
                && self.topics.len() >= u32::MAX as usize
            {
                return Err(SubscribeError::TooManyTopics);
            }
            let monitor = monitor().ok_or(SubscribeError::NotAlive)?;
            self.subscribers.insert(
                pid,
                Subscriber {
                    monitor,
                    subscriptions: SmallVec::new(),
                },
            );
        }
        let topic_id = match self.topic_id_or_create(topic) {
            Some(id) => id,
            None => {
                self.forget_if_idle(pid);
                return Err(SubscribeError::TooManyTopics);
            }
        };
        let Some(Some(entry)) = self.topics.get_mut(topic_id as usize) else {
            return Err(SubscribeError::TooManyTopics);
        };
        let at = entry.part.push(pid);
        self.subscriptions += 1;
        if let Some(subscriber) = self.subscribers.get_mut(&pid) {
            subscriber.subscriptions.push(Subscription {
                topic: topic_id,
                at,
            });
        }
        Ok(())
    }

    /// Removes every subscription of `pid` to `topic`.
    pub fn unsubscribe(&mut self, topic: &[u8], pid: Pid) -> Removed<M> {
        match self.by_name.get(topic) {
            Some(&topic_id) => self.remove_where(pid, |sub| sub.topic == topic_id),
            None => Removed {
                count: 0,
                released: None,
            },
        }
    }

    /// Removes every subscription of `pid` (its process went down).
    pub fn remove_subscriber(&mut self, pid: Pid) -> Removed<M> {
        self.remove_where(pid, |_| true)
    }

    /// The monitor `pid` holds here, if it has subscriptions here.
    pub fn monitor_of(&self, pid: Pid) -> Option<&M> {
        self.subscribers.get(&pid).map(|s| &s.monitor)
    }

    /// Subscriptions to `topic`, duplicates counted.
    pub fn count(&self, topic: &[u8]) -> usize {
        self.topic(topic).map_or(0, |entry| entry.part.len())
    }

    /// The subscribers of `topic`, shared with the registry (no pid is copied); `None`
    /// when it has none.
    pub fn snapshot(&self, topic: &[u8]) -> Option<Part> {
        self.topic(topic).map(|entry| entry.part.clone())
    }

    /// Topics `pid` is subscribed to, once each.
    pub fn topics_of(&self, pid: Pid) -> Vec<Arc<[u8]>> {
        let mut ids: Vec<u32> = self
            .subscribers
            .get(&pid)
            .map(|s| s.subscriptions.iter().map(|sub| sub.topic).collect())
            .unwrap_or_default();
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter()
            .filter_map(|id| self.topics.get(id as usize)?.as_ref())
            .map(|entry| entry.name.clone())
            .collect()
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        Stats {
            topics: self.by_name.len(),
            subscriptions: self.subscriptions,
            subscribers: self.subscribers.len(),
        }
    }

    /// The name of every topic with a subscription.
    pub fn names(&self) -> impl Iterator<Item = &Arc<[u8]>> {
        self.by_name.keys()
    }

    /// Every subscriber, once each.
    pub fn pids(&self) -> impl Iterator<Item = Pid> + '_ {
        self.subscribers.keys().copied()
    }

    /// Empties the registry and hands back every subscriber with its monitor, so the
    /// caller can release the monitors and tell the subscribers.
    pub fn drain_subscribers(&mut self) -> Vec<(Pid, M)> {
        let subscribers = self
            .subscribers
            .drain()
            .map(|(pid, subscriber)| (pid, subscriber.monitor))
            .collect();
        self.by_name.clear();
        self.topics.clear();
        self.free_ids.clear();
        self.subscriptions = 0;
        subscribers
    }

    fn topic(&self, topic: &[u8]) -> Option<&Topic> {
        let id = *self.by_name.get(topic)?;
        self.topics.get(id as usize)?.as_ref()
    }

    fn topic_id_or_create(&mut self, topic: &[u8]) -> Option<u32> {
        if let Some(&id) = self.by_name.get(topic) {
            return Some(id);
        }
        let name: Arc<[u8]> = Arc::from(topic);
        let entry = Topic {
            name: name.clone(),
            part: Part {
                topic: topic_key(topic),
                ..Part::default()
            },
        };
        let id = match self.free_ids.pop() {
            Some(id) => {
                self.topics[id as usize] = Some(entry);
                id
            }
            None => {
                let id = u32::try_from(self.topics.len()).ok()?;
                self.topics.push(Some(entry));
                id
            }
        };
        self.changes.note(&name);
        self.by_name.insert(name, id);
        Some(id)
    }

    fn forget_if_idle(&mut self, pid: Pid) -> Option<M> {
        let idle = self
            .subscribers
            .get(&pid)
            .is_some_and(|s| s.subscriptions.is_empty());
        if idle {
            self.subscribers.remove(&pid).map(|s| s.monitor)
        } else {
            None
        }
    }

    fn remove_where(&mut self, pid: Pid, matches: impl Fn(&Subscription) -> bool) -> Removed<M> {
        let mut count = 0;
        // Re-read the entry each round: removing one subscription can move another of the
        // same pid (duplicates) and rewrite its slot.
        while let Some(subscriber) = self.subscribers.get_mut(&pid) {
            let Some(index) = subscriber.subscriptions.iter().position(&matches) else {
                break;
            };
            let sub = subscriber.subscriptions.swap_remove(index);
            self.remove_slot(sub);
            count += 1;
        }
        Removed {
            count,
            released: self.forget_if_idle(pid),
        }
    }

    fn remove_slot(&mut self, sub: Subscription) {
        let Some(Some(entry)) = self.topics.get_mut(sub.topic as usize) else {
            debug_assert!(false, "subscription points at a missing topic");
            return;
        };
        let moved = entry.part.swap_remove(sub.at);
        self.subscriptions -= 1;
        if let Some((moved_pid, from)) = moved {
            if let Some(owner) = self.subscribers.get_mut(&moved_pid) {
                if let Some(record) = owner
                    .subscriptions
                    .iter_mut()
                    .find(|s| s.topic == sub.topic && s.at == from)
                {
                    record.at = sub.at;
                }
            }
        }
        if entry.part.is_empty() {
            let name = entry.name.clone();
            self.topics[sub.topic as usize] = None;
            self.by_name.remove(&name);
            self.free_ids.push(sub.topic);
            self.changes.note(&name);
        }
    }

    /// Checks every internal invariant; for tests.
    #[doc(hidden)]
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut seen = 0;
        for (pid, subscriber) in &self.subscribers {
            if subscriber.subscriptions.is_empty() {
                return Err(format!("subscriber {pid} kept with no subscription"));
            }
            for sub in &subscriber.subscriptions {
                let entry = self
                    .topics
                    .get(sub.topic as usize)
                    .and_then(Option::as_ref)
                    .ok_or_else(|| format!("pid {pid} points at dead topic {}", sub.topic))?;
                let found = entry
                    .part
                    .chunks
                    .get(sub.at.chunk as usize)
                    .and_then(|c| c.get(sub.at.slot as usize));
                if found != Some(pid) {
                    return Err(format!("pid {pid} slot {:?} holds {found:?}", sub.at));
                }
                seen += 1;
            }
        }
        if seen != self.subscriptions {
            return Err(format!("{seen} records vs {} counted", self.subscriptions));
        }
        let mut total = 0;
        for (name, &id) in &self.by_name {
            let entry = self.topics[id as usize]
                .as_ref()
                .ok_or_else(|| format!("name {name:?} maps to empty id {id}"))?;
            let part = &entry.part;
            let stored = part.pids().count();
            if stored != part.len() || part.is_empty() {
                return Err(format!(
                    "topic {name:?}: len {} stored {stored}",
                    part.len()
                ));
            }
            let chunks = part.chunks.len();
            for (i, chunk) in part.chunks.iter().enumerate() {
                if chunk.is_empty() || (i + 1 < chunks && chunk.len() != CHUNK) {
                    return Err(format!("topic {name:?}: chunk {i} has {}", chunk.len()));
                }
            }
            total += part.len();
        }
        if total != self.subscriptions {
            return Err(format!(
                "topics hold {total}, counted {}",
                self.subscriptions
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{ok_monitor, sorted};
    use super::*;
    use std::collections::HashMap;

    fn all(reg: &Registry<u64>, topic: &[u8]) -> Vec<Pid> {
        sorted(
            reg.snapshot(topic)
                .map(|part| part.pids().collect())
                .unwrap_or_default(),
        )
    }

    #[test]
    fn duplicate_subscriptions_are_kept_and_removed_together() {
        let mut reg = Registry::new();
        reg.subscribe(b"t", 1, ok_monitor(1)).unwrap();
        reg.subscribe(b"t", 1, || panic!("monitored twice"))
            .unwrap();
        reg.subscribe(b"t", 2, ok_monitor(2)).unwrap();
        assert_eq!(reg.count(b"t"), 3);
        assert_eq!(all(&reg, b"t"), vec![1, 1, 2]);
        let removed = reg.unsubscribe(b"t", 1);
        assert_eq!(
            removed,
            Removed {
                count: 2,
                released: Some(10)
            }
        );
        assert_eq!(all(&reg, b"t"), vec![2]);
        reg.check_invariants().unwrap();
    }

    #[test]
    fn unknown_topic_and_unknown_pid_are_no_ops() {
        let mut reg: Registry<u64> = Registry::new();
        assert_eq!(
            reg.unsubscribe(b"nope", 7),
            Removed {
                count: 0,
                released: None
            }
        );
        reg.subscribe(b"t", 1, ok_monitor(1)).unwrap();
        assert_eq!(reg.unsubscribe(b"t", 2).count, 0);
        assert_eq!(
            reg.unsubscribe(b"other", 1),
            Removed {
                count: 0,
                released: None
            }
        );
        assert_eq!(reg.count(b"t"), 1);
    }

    #[test]
    fn dead_process_is_not_added() {
        let mut reg: Registry<u64> = Registry::new();
        assert_eq!(
            reg.subscribe(b"t", 1, || None),
            Err(SubscribeError::NotAlive)
        );
        assert_eq!(reg.stats(), Stats::default());
        assert_eq!(reg.count(b"t"), 0);
    }

    #[test]
    fn removing_a_subscriber_clears_every_topic_and_frees_topics() {
        let mut reg = Registry::new();
        for topic in [&b"a"[..], b"b", b"c"] {
            reg.subscribe(topic, 5, ok_monitor(5)).unwrap();
            reg.subscribe(topic, 5, ok_monitor(5)).unwrap();
        }
        reg.subscribe(b"b", 6, ok_monitor(6)).unwrap();
        assert_eq!(reg.topics_of(5).len(), 3);
        let removed = reg.remove_subscriber(5);
        assert_eq!(
            removed,
            Removed {
                count: 6,
                released: Some(50)
            }
        );
        assert_eq!(
            reg.stats(),
            Stats {
                topics: 1,
                subscriptions: 1,
                subscribers: 1
            }
        );
        assert_eq!(reg.count(b"a"), 0);
        assert_eq!(all(&reg, b"b"), vec![6]);
        reg.check_invariants().unwrap();
    }

    #[test]
    fn snapshot_is_unchanged_by_later_mutation() {
        let mut reg = Registry::new();
        for pid in 0..2_000 {
            reg.subscribe(b"t", pid, ok_monitor(pid)).unwrap();
        }
        let before = reg.snapshot(b"t");
        for pid in (0..2_000).step_by(3) {
            reg.remove_subscriber(pid);
        }
        reg.subscribe(b"t", 99_999, ok_monitor(1)).unwrap();
        let old: Vec<Pid> = sorted(before.iter().flat_map(|p| p.pids()).collect());
        assert_eq!(old, (0..2_000).collect::<Vec<_>>());
        assert_eq!(reg.count(b"t"), 2_000 - 667 + 1);
        reg.check_invariants().unwrap();
    }

    /// A deterministic pseudo-random walk checked against a naive model, with the
    /// invariants verified after every step.
    #[test]
    fn random_operations_match_a_naive_model() {
        let mut seed: u64 = 0x1234_5678;
        let mut next = move |bound: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % bound
        };
        {
            let mut reg = Registry::new();
            let mut model: HashMap<(u64, u64), usize> = HashMap::new();
            for _ in 0..20_000 {
                let pid = next(40);
                let topic = next(6);
                let name = [b't', topic as u8];
                match next(10) {
                    0..=5 => {
                        reg.subscribe(&name, pid, ok_monitor(pid)).unwrap();
                        *model.entry((pid, topic)).or_default() += 1;
                    }
                    6..=7 => {
                        let removed = reg.unsubscribe(&name, pid);
                        assert_eq!(removed.count, model.remove(&(pid, topic)).unwrap_or(0));
                    }
                    _ => {
                        let expected: usize = model
                            .iter()
                            .filter(|((p, _), _)| *p == pid)
                            .map(|(_, n)| *n)
                            .sum();
                        model.retain(|(p, _), _| *p != pid);
                        assert_eq!(reg.remove_subscriber(pid).count, expected);
                    }
                }
                let live_pids = model
                    .keys()
                    .map(|(p, _)| *p)
                    .collect::<std::collections::HashSet<_>>();
                let released_all = !live_pids.contains(&pid);
                assert_eq!(released_all, !reg.subscribers.contains_key(&pid));
                let want: Vec<Pid> = sorted(
                    model
                        .iter()
                        .filter(|((_, t), _)| *t == topic)
                        .flat_map(|((p, _), n)| std::iter::repeat_n(*p, *n))
                        .collect(),
                );
                assert_eq!(all(&reg, &name), want);
                assert_eq!(reg.count(&name), want.len());
                reg.check_invariants().unwrap();
            }
        }
    }

    #[test]
    fn pids_from_resumes_anywhere() {
        let mut reg = Registry::new();
        let n = CHUNK as u64 * 2 + 17;
        for pid in 0..n {
            reg.subscribe(b"t", pid, ok_monitor(pid)).unwrap();
        }
        let part = reg.snapshot(b"t").unwrap();
        let all: Vec<Pid> = part.pids().collect();
        for start in [
            0,
            1,
            CHUNK - 1,
            CHUNK,
            CHUNK + 5,
            2 * CHUNK,
            n as usize - 1,
            n as usize,
            n as usize + 3,
        ] {
            let rest: Vec<Pid> = part.pids_from(start).collect();
            assert_eq!(rest, all[start.min(all.len())..].to_vec(), "start {start}");
        }
    }

    #[test]
    fn large_topic_removal_touches_one_chunk() {
        let mut reg = Registry::new();
        for pid in 0..(CHUNK as u64 * 4) {
            reg.subscribe(b"big", pid, ok_monitor(pid)).unwrap();
        }
        let snap = reg.snapshot(b"big").unwrap();
        reg.remove_subscriber(0);
        let after = reg.snapshot(b"big").unwrap();
        let shared = snap
            .chunks
            .iter()
            .zip(after.chunks.iter())
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count();
        // Chunk 0 (the hole) and chunk 3 (the last slot) were copied; the rest are shared.
        assert_eq!(shared, 2);
        reg.check_invariants().unwrap();
    }

    #[test]
    fn drain_returns_every_subscriber_and_monitor_once() {
        let mut reg = Registry::new();
        for pid in 0..100 {
            reg.subscribe(b"x", pid, ok_monitor(pid)).unwrap();
            reg.subscribe(b"y", pid, ok_monitor(pid)).unwrap();
        }
        let mut drained = reg.drain_subscribers();
        drained.sort_unstable();
        assert_eq!(drained, (0..100).map(|p| (p, p * 10)).collect::<Vec<_>>());
        assert_eq!(reg.stats(), Stats::default());
        assert_eq!(reg.count(b"x"), 0);
    }
}
