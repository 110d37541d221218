//! The duplicate-key subscriber registry: topic → subscribers, subscriber → subscriptions.
//!
//! Plain Rust with no rustler types, so `cargo test` exercises it without a VM. A
//! subscriber is an opaque `u64` (the glue stores the raw term of a local pid there) and
//! `M` is whatever the glue needs to undo its process monitor.
//!
//! Layout, chosen so that no operation scales with the size of a topic:
//!
//! * [`Sharded`] gives each fan-out lane its own [`Registry`]s. A subscriber's lane is
//!   picked by a hash of its pid, so one sender always serves the same subscriber (that
//!   keeps per-sender order while several senders share one dispatch). One more
//!   partition, the *direct* one, holds the subscriptions that every dispatching process
//!   sends to itself, never through a sender (the NIF puts off-heap subscribers there:
//!   OTP orders their messages per sending process only). Within a lane, a
//!   topic lives in one of [`STRIPES`] registries, picked by a hash of its name, so
//!   concurrent subscribers rarely take the same lock, even in one lane, and a dispatch
//!   still takes one lock per lane.
//! * Within a registry, a topic's subscribers are a [`Part`]: a list of fixed-size chunks shared copy-on-write with dispatch snapshots:
//!   a snapshot is one `Arc` clone per part, and a later change copies at most one chunk
//!   and the (short) chunk index, never the whole subscriber list.
//! * Every subscription knows its slot (topic, chunk, slot) through its subscriber's
//!   entry, so removal is a swap-remove with the part's last slot plus one fix-up of the
//!   subscription that moved.

use rustc_hash::FxHashMap;
use smallvec::SmallVec;
use std::collections::HashSet;
use std::hash::Hasher;
use std::sync::{Arc, Mutex, MutexGuard};

/// An opaque subscriber id (the raw term of a local pid in the NIF).
pub type Pid = u64;

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
}

impl Part {
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

/// The parts of one topic that had subscribers in each shard when the snapshot was taken,
/// each with its shard index.
pub type Snapshot = SmallVec<[(usize, Part); 4]>;

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

/// What [`Sharded::remove_subscriber`] undid: the subscriptions that went, and the
/// monitors to release.
#[derive(Debug, PartialEq, Eq)]
pub struct Cleared<M> {
    /// How many subscriptions went.
    pub count: usize,
    /// The monitors released; one for a subscriber that went, none when it had none.
    pub released: Vec<M>,
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
    /// Topics created or emptied since the last [`Registry::take_changed`], recorded only
    /// while `tracking` (cluster mode: the node's interest in a topic may have changed).
    changed: Vec<Arc<[u8]>>,
    tracking: bool,
}

/// The partition that serves `pid`, from every bit of it.
///
/// On OTP 25 (64-bit) the raw term of a local pid holds the process number from bit 4 and
/// its process-table slot from bit 35, so two processes spawned one after the other
/// differ by `16 + (1 << 35)`. A single multiply and a shift cancelled exactly that step
/// for two partitions (and for any power of two up to 64): runs of about 22 processes
/// spawned in a row shared a partition, so two processes started together always took
/// the same lock. [`mix`] lets every input bit reach every output bit.
pub fn partition_of(pid: Pid, partitions: usize) -> usize {
    (mix(pid) % partitions.max(1) as u64) as usize
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
            changed: Vec::new(),
            tracking: false,
        }
    }

    /// Starts or stops recording the topics that are created or emptied.
    pub fn set_tracking(&mut self, tracking: bool) {
        self.tracking = tracking;
        if !tracking {
            self.changed = Vec::new();
        }
    }

    /// The topics created or emptied since the last call (while tracking), in order; a
    /// topic may appear more than once.
    pub fn take_changed(&mut self) -> Vec<Arc<[u8]>> {
        std::mem::take(&mut self.changed)
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
            part: Part::default(),
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
        if self.tracking {
            self.changed.push(name.clone());
        }
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
            if self.tracking {
                self.changed.push(name);
            }
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

/// Why a sharded call was refused.
#[derive(Debug, PartialEq, Eq)]
pub struct ClosedError;

struct Shard {
    /// Topics and subscriptions; a subscriber's record here carries no monitor, which
    /// lives in the lane's [`Watch`] table, one per subscriber however many stripes hold
    /// its subscriptions.
    registry: Registry<()>,
    closed: bool,
}

/// A subscriber's monitor, with the number of stripes that hold a record of it.
struct Watch<M> {
    monitor: M,
    stripes: u32,
}

/// One watch table: subscriber → its monitor and the stripes that record it.
type Watches<M> = FxHashMap<Pid, Watch<M>>;

/// Registries a lane's subscriptions are spread over, by topic.
pub const STRIPES: usize = 8;

/// One [`Registry`] per lane and stripe, each behind its own lock, and one monitor per
/// subscriber.
///
/// A subscriber's lane comes from its pid ([`partition_of`]), or is the direct partition
/// ([`Sharded::direct`]) for a subscription made with [`Sharded::subscribe_direct`];
/// within the partition, each topic lives in one stripe, picked from its name
/// ([`Sharded::stripe_of`]). Two processes
/// subscribing at once take the same lock only when they share a lane and their topics
/// share a stripe, and a dispatch still takes one lock per lane, briefly, for its
/// snapshot.
///
/// A subscriber's monitor is kept in one of as many watch tables, picked from its pid,
/// with the number of stripes that hold its subscriptions: made when the first stripe
/// records it, released when the last one lets it go. A watch table is only ever locked
/// inside a shard's lock, never the other way round.
pub struct Sharded<M> {
    shards: Box<[Padded<Mutex<Shard>>]>,
    watches: Box<[Padded<Mutex<Watches<M>>>]>,
    lanes: usize,
    stripes: usize,
}

/// Keeps each lock and its data off its neighbours' cache lines.
#[repr(align(128))]
struct Padded<T>(T);

/// A 64-bit finaliser: two multiply-xorshift rounds, so that every input bit reaches
/// every output bit.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    x = x.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    x ^ (x >> 33)
}

impl<T> Padded<Mutex<T>> {
    fn lock(&self) -> MutexGuard<'_, T> {
        // Every critical section leaves its data consistent before anything that could
        // panic, so a poisoned lock is still safe to use.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<M> Sharded<M> {
    /// `lanes` lanes (at least one) of [`STRIPES`] stripes.
    pub fn new(lanes: usize) -> Self {
        Sharded::with_stripes(lanes, STRIPES)
    }

    /// `lanes` lanes of `stripes` stripes (at least one of each).
    pub fn with_stripes(lanes: usize, stripes: usize) -> Self {
        let (lanes, stripes) = (lanes.max(1), stripes.max(1));
        Sharded {
            // One partition per lane, and the direct partition last.
            shards: (0..(lanes + 1) * stripes)
                .map(|_| {
                    Padded(Mutex::new(Shard {
                        registry: Registry::new(),
                        closed: false,
                    }))
                })
                .collect(),
            watches: (0..lanes * stripes)
                .map(|_| Padded(Mutex::new(FxHashMap::default())))
                .collect(),
            lanes,
            stripes,
        }
    }

    /// Number of lanes (= partitions of the pids served by senders).
    pub fn lanes(&self) -> usize {
        self.lanes
    }

    /// The index that [`Sharded::snapshot`] gives the direct partition: one past the
    /// last lane.
    pub fn direct(&self) -> usize {
        self.lanes
    }

    /// The stripe that holds `topic` in every lane.
    pub fn stripe_of(&self, topic: &[u8]) -> usize {
        if self.stripes == 1 {
            return 0;
        }
        let mut hasher = rustc_hash::FxHasher::default();
        hasher.write(topic);
        // Mixed first: the maps inside a stripe hash the same names with FxHash, and
        // must not find only one stripe's share of its bits in use.
        (mix(hasher.finish()) % self.stripes as u64) as usize
    }

    fn shard(&self, lane: usize, stripe: usize) -> MutexGuard<'_, Shard> {
        self.shards[lane * self.stripes + stripe].lock()
    }

    /// The two partitions that may hold `pid`'s subscriptions: its lane, then the direct
    /// one.
    fn partitions_of(&self, pid: Pid) -> [usize; 2] {
        [partition_of(pid, self.lanes), self.lanes]
    }

    /// The shard that holds `pid`'s subscriptions to `topic` in `partition`.
    fn shard_in(&self, partition: usize, topic: &[u8]) -> MutexGuard<'_, Shard> {
        self.shard(partition, self.stripe_of(topic))
    }

    /// Every shard that may hold `pid`'s subscriptions, one after the other.
    fn shards_of(&self, pid: Pid) -> impl Iterator<Item = MutexGuard<'_, Shard>> {
        self.partitions_of(pid)
            .into_iter()
            .flat_map(move |partition| {
                (0..self.stripes).map(move |stripe| self.shard(partition, stripe))
            })
    }

    /// The watch table of `pid` (taken inside a shard's lock only).
    fn watches_of(&self, pid: Pid) -> MutexGuard<'_, Watches<M>> {
        // The high half of the mix: the low half picks the lane.
        self.watches[((mix(pid) >> 32) % self.watches.len() as u64) as usize].lock()
    }

    /// One more stripe records `pid`: `monitor` is called when none did. False when it
    /// answers `None` (the process is not alive).
    fn watch(&self, pid: Pid, monitor: impl FnOnce() -> Option<M>) -> bool {
        let mut watches = self.watches_of(pid);
        if let Some(watch) = watches.get_mut(&pid) {
            watch.stripes += 1;
            return true;
        }
        match monitor() {
            Some(monitor) => {
                watches.insert(
                    pid,
                    Watch {
                        monitor,
                        stripes: 1,
                    },
                );
                true
            }
            None => false,
        }
    }

    /// One stripe less records `pid`: its monitor, to release, when it was the last.
    fn unwatch(&self, pid: Pid) -> Option<M> {
        let mut watches = self.watches_of(pid);
        let watch = watches.get_mut(&pid)?;
        watch.stripes -= 1;
        if watch.stripes > 0 {
            return None;
        }
        watches.remove(&pid).map(|watch| watch.monitor)
    }

    /// Adds one subscription of `pid` to `topic`, in `pid`'s lane; refused once
    /// [`Sharded::close`] ran. `monitor` is called only when `pid` has no subscription
    /// yet, as [`Registry::subscribe`] does.
    pub fn subscribe(
        &self,
        topic: &[u8],
        pid: Pid,
        monitor: impl FnOnce() -> Option<M>,
    ) -> Result<Result<(), SubscribeError>, ClosedError> {
        self.subscribe_in(partition_of(pid, self.lanes), topic, pid, monitor)
    }

    /// As [`Sharded::subscribe`], in the direct partition.
    pub fn subscribe_direct(
        &self,
        topic: &[u8],
        pid: Pid,
        monitor: impl FnOnce() -> Option<M>,
    ) -> Result<Result<(), SubscribeError>, ClosedError> {
        self.subscribe_in(self.lanes, topic, pid, monitor)
    }

    fn subscribe_in(
        &self,
        partition: usize,
        topic: &[u8],
        pid: Pid,
        monitor: impl FnOnce() -> Option<M>,
    ) -> Result<Result<(), SubscribeError>, ClosedError> {
        let mut shard = self.shard_in(partition, topic);
        if shard.closed {
            return Err(ClosedError);
        }
        let mut recorded = false;
        let result = shard.registry.subscribe(topic, pid, || {
            recorded = self.watch(pid, monitor);
            recorded.then_some(())
        });
        if recorded && result.is_err() && shard.registry.monitor_of(pid).is_none() {
            // Refused after the stripe recorded it (too many topics): undo the count. A
            // monitor made for this call alone goes with it, as it always did: its `down`
            // finds nothing to remove.
            drop(self.unwatch(pid));
        }
        Ok(result)
    }

    /// Removes every subscription of `pid` to `topic`; `released` is `pid`'s monitor when
    /// that was its last subscription.
    pub fn unsubscribe(&self, topic: &[u8], pid: Pid) -> Removed<M> {
        let mut total = Removed {
            count: 0,
            released: None,
        };
        for partition in self.partitions_of(pid) {
            let mut shard = self.shard_in(partition, topic);
            let removed = shard.registry.unsubscribe(topic, pid);
            total.count += removed.count;
            if removed.released.is_some() {
                // At most one shard lets the last record go; the watch hands the monitor
                // back only then.
                if let Some(monitor) = self.unwatch(pid) {
                    total.released = Some(monitor);
                }
            }
        }
        total
    }

    /// Removes every subscription of `pid` (its process went down), stripe by stripe.
    /// `released` holds its monitor, or more than one if `pid` subscribed again behind
    /// the walk and let go again: the stripes are not locked all at once, and nothing
    /// may be lost.
    pub fn remove_subscriber(&self, pid: Pid) -> Cleared<M> {
        let mut cleared = Cleared {
            count: 0,
            released: Vec::new(),
        };
        for mut shard in self.shards_of(pid) {
            let removed = shard.registry.remove_subscriber(pid);
            cleared.count += removed.count;
            // Every stripe that let it go counts down; the last one hands back the monitor.
            if removed.released.is_some() {
                cleared.released.extend(self.unwatch(pid));
            }
        }
        cleared
    }

    /// Subscriptions to `topic` over all partitions.
    pub fn count(&self, topic: &[u8]) -> usize {
        let stripe = self.stripe_of(topic);
        (0..=self.lanes)
            .map(|lane| self.shard(lane, stripe).registry.count(topic))
            .sum()
    }

    /// The non-empty parts of `topic`, each with its lane, in lane order; the direct
    /// partition's part, if any, comes last, with the index [`Sharded::direct`].
    pub fn snapshot(&self, topic: &[u8]) -> Result<Snapshot, ClosedError> {
        let stripe = self.stripe_of(topic);
        let mut snapshot = Snapshot::new();
        for lane in 0..=self.lanes {
            let shard = self.shard(lane, stripe);
            if shard.closed {
                return Err(ClosedError);
            }
            if let Some(part) = shard.registry.snapshot(topic) {
                snapshot.push((lane, part));
            }
        }
        Ok(snapshot)
    }

    /// True once [`Sharded::close`] ran (or while it runs): it closes the first shard
    /// first, so that one shard tells.
    pub fn is_closed(&self) -> bool {
        self.shards.first().is_some_and(|shard| shard.lock().closed)
    }

    /// [`Registry::set_tracking`] in every shard.
    pub fn set_tracking(&self, tracking: bool) {
        for shard in self.shards.iter() {
            shard.lock().registry.set_tracking(tracking);
        }
    }

    /// [`Registry::take_changed`] where `pid`'s last change happened: the shards of
    /// `topic` in its partitions, or every shard of them for `None` (all its
    /// subscriptions went).
    pub fn take_changed(&self, pid: Pid, topic: Option<&[u8]>) -> Vec<Arc<[u8]>> {
        match topic {
            Some(topic) => self
                .partitions_of(pid)
                .into_iter()
                .flat_map(|partition| self.shard_in(partition, topic).registry.take_changed())
                .collect(),
            None => self
                .shards_of(pid)
                .flat_map(|mut shard| shard.registry.take_changed())
                .collect(),
        }
    }

    /// [`Registry::topics_of`] over the shards that may hold `pid`'s subscriptions; a
    /// topic it holds in both its lane and the direct partition is named once.
    pub fn topics_of(&self, pid: Pid) -> Vec<Arc<[u8]>> {
        let mut seen: HashSet<Arc<[u8]>> = HashSet::new();
        self.shards_of(pid)
            .flat_map(|shard| shard.registry.topics_of(pid))
            .filter(|name| seen.insert(name.clone()))
            .collect()
    }

    /// Every topic with a subscription, once each. Walks every topic name.
    pub fn topic_names(&self) -> Vec<Arc<[u8]>> {
        let mut names: HashSet<Arc<[u8]>> = HashSet::new();
        for shard in self.shards.iter() {
            names.extend(shard.lock().registry.by_name.keys().cloned());
        }
        names.into_iter().collect()
    }

    /// Counters over all shards; a topic present in several lanes counts once. Walks
    /// every topic name: for diagnostics, not for hot paths.
    pub fn stats(&self) -> Stats {
        let mut names: HashSet<Arc<[u8]>> = HashSet::new();
        let mut stats = Stats::default();
        for shard in self.shards.iter() {
            let shard = shard.lock();
            stats.subscriptions += shard.registry.stats().subscriptions;
            names.extend(shard.registry.by_name.keys().cloned());
        }
        stats.topics = names.len();
        stats.subscribers = self.watches.iter().map(|w| w.lock().len()).sum();
        stats
    }

    /// Refuses every later subscription and snapshot, empties every shard and hands back
    /// every subscriber with its monitor, once each.
    pub fn close(&self) -> Vec<(Pid, M)> {
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            shard.closed = true;
            shard.registry.drain_subscribers();
        }
        // No shard takes a watch table's lock any more.
        self.watches
            .iter()
            .flat_map(|watches| {
                let drained: Vec<_> = watches
                    .lock()
                    .drain()
                    .map(|(pid, watch)| (pid, watch.monitor))
                    .collect();
                drained
            })
            .collect()
    }

    /// Checks every shard's invariants, that each pid sits in its own lane and each topic
    /// in its own stripe, and that each subscriber's watch counts the stripes that record
    /// it; for tests.
    #[doc(hidden)]
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut recorded: FxHashMap<Pid, u32> = FxHashMap::default();
        for (index, shard) in self.shards.iter().enumerate() {
            let (lane, stripe) = (index / self.stripes, index % self.stripes);
            let shard = shard.lock();
            shard.registry.check_invariants()?;
            for &pid in shard.registry.subscribers.keys() {
                if partition_of(pid, self.lanes) != lane && lane != self.lanes {
                    return Err(format!("pid {pid} in lane {lane}"));
                }
                *recorded.entry(pid).or_default() += 1;
            }
            if let Some(name) = shard
                .registry
                .by_name
                .keys()
                .find(|name| self.stripe_of(name) != stripe)
            {
                return Err(format!("topic {name:?} in stripe {stripe}"));
            }
        }
        let mut watched = 0;
        for watches in self.watches.iter() {
            for (pid, watch) in watches.lock().iter() {
                if recorded.get(pid) != Some(&watch.stripes) {
                    return Err(format!(
                        "pid {pid}: watch counts {} stripes, {:?} record it",
                        watch.stripes,
                        recorded.get(pid)
                    ));
                }
                watched += 1;
            }
        }
        if watched != recorded.len() {
            return Err(format!(
                "{} pids recorded, {watched} watched",
                recorded.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn ok_monitor(pid: Pid) -> impl FnOnce() -> Option<u64> {
        move || Some(pid * 10)
    }

    fn sorted(mut v: Vec<Pid>) -> Vec<Pid> {
        v.sort_unstable();
        v
    }

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

    /// The raw term of the `n`th local pid on OTP 25, 64-bit: the process number from
    /// bit 4 and the process-table slot from bit 35 (read off a running VM).
    fn vm_pid(n: u64) -> Pid {
        (n << 35) | (n << 4) | 3
    }

    #[test]
    fn processes_spawned_in_a_row_spread_over_the_partitions() {
        const SPAWNED: u64 = 10_000;
        for partitions in [2, 3, 4, 8, 64] {
            let lanes: Vec<usize> = (200..200 + SPAWNED)
                .map(|n| partition_of(vm_pid(n), partitions))
                .collect();
            let mut held = vec![0usize; partitions];
            for &lane in &lanes {
                held[lane] += 1;
            }
            // Within four standard deviations of what independent picks would give.
            let within =
                |n: usize, mean: usize| (n.abs_diff(mean) as f64) < 4.0 * (mean as f64).sqrt();
            let even = SPAWNED as usize / partitions;
            assert!(
                held.iter().all(|&n| within(n, even)),
                "{partitions} partitions hold {held:?}"
            );
            // Neighbours share a partition about as often as two random pids would
            // (1 / partitions); the old multiply-and-shift put 95% of them together.
            let together = lanes.windows(2).filter(|w| w[0] == w[1]).count();
            let random = (SPAWNED as usize - 1) / partitions;
            assert!(
                within(together, random),
                "{partitions} partitions: {together} neighbours together, about {random} expected"
            );
        }
    }

    #[test]
    fn shards_hold_only_their_pids() {
        let reg = Sharded::new(4);
        for pid in 0..1_000 {
            reg.subscribe(b"t", pid * 16 + 3, ok_monitor(pid))
                .unwrap()
                .unwrap();
        }
        let snap = reg.snapshot(b"t").unwrap();
        assert_eq!(snap.len(), 4, "1 000 pids should touch every shard");
        for (index, part) in &snap {
            assert!(part.pids().all(|pid| partition_of(pid, 4) == *index));
        }
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
    fn direct_subscriptions_have_a_partition_of_their_own() {
        let reg: Sharded<u64> = Sharded::new(2);
        assert_eq!(reg.direct(), 2);
        // Pid 1 in its lane and, after switching its queue, in the direct partition too.
        reg.subscribe(b"t", 1, ok_monitor(1)).unwrap().unwrap();
        reg.subscribe_direct(b"t", 1, || panic!("monitored twice"))
            .unwrap()
            .unwrap();
        reg.subscribe_direct(b"t", 2, ok_monitor(2))
            .unwrap()
            .unwrap();
        reg.subscribe_direct(b"u", 2, || panic!("monitored twice"))
            .unwrap()
            .unwrap();
        reg.check_invariants().unwrap();
        assert_eq!(reg.count(b"t"), 3);
        let snapshot = reg.snapshot(b"t").unwrap();
        let (last, direct) = snapshot.last().unwrap();
        assert_eq!(*last, reg.direct(), "the direct part comes last");
        assert_eq!(sorted(direct.pids().collect()), vec![1, 2]);
        assert_eq!(
            reg.topics_of(1).len(),
            1,
            "a topic held twice is named once"
        );
        assert_eq!(reg.stats().subscribers, 2, "one monitor per subscriber");

        // Unsubscribing removes the subscriber's subscriptions in both partitions, and
        // hands its monitor back once, when the last one goes.
        let removed = reg.unsubscribe(b"t", 1);
        assert_eq!((removed.count, removed.released), (2, Some(10)));
        let cleared = reg.remove_subscriber(2);
        assert_eq!((cleared.count, cleared.released), (2, vec![20]));
        assert_eq!(reg.count(b"t") + reg.count(b"u"), 0);
        reg.check_invariants().unwrap();
    }

    #[test]
    fn sharded_registry_keeps_pids_in_their_lane_and_topics_in_their_stripe() {
        let reg: Sharded<u64> = Sharded::new(3);
        let a = b"a".to_vec();
        let names: Vec<Vec<u8>> = (0..100).map(|i| format!("t{i}").into_bytes()).collect();
        let near = names.iter().find(|n| reg.stripe_of(n) == reg.stripe_of(&a));
        let far = names.iter().find(|n| reg.stripe_of(n) != reg.stripe_of(&a));
        let (near, far) = (near.unwrap(), far.unwrap());
        for pid in 0..300u64 {
            reg.subscribe(&a, pid, || Some(pid)).unwrap().unwrap();
            if pid % 2 == 0 {
                // One monitor per subscriber, whichever stripes hold its subscriptions.
                for topic in [near, far] {
                    reg.subscribe(topic, pid, || panic!("monitored twice"))
                        .unwrap()
                        .unwrap();
                }
            }
        }
        reg.check_invariants().unwrap();
        assert_eq!(reg.count(&a), 300);
        assert_eq!(reg.count(near), 150);
        assert_eq!(reg.count(far), 150);
        assert_eq!(
            reg.stats(),
            Stats {
                topics: 3,
                subscriptions: 600,
                subscribers: 300
            }
        );
        let snapshot = reg.snapshot(&a).unwrap();
        assert_eq!(snapshot.len(), 3, "300 pids touch every lane");
        for (lane, part) in &snapshot {
            assert!(part.pids().all(|pid| partition_of(pid, 3) == *lane));
        }
        let removed = |count, released| Removed { count, released };
        // The monitor goes with the last subscription, whichever stripe that is in.
        assert_eq!(reg.unsubscribe(&a, 4), removed(1, None));
        assert_eq!(reg.unsubscribe(far, 4), removed(1, None));
        assert_eq!(reg.unsubscribe(near, 4), removed(1, Some(4)));
        let cleared = |count, released| Cleared { count, released };
        assert_eq!(reg.remove_subscriber(6), cleared(3, vec![6]));
        assert_eq!(reg.remove_subscriber(6), cleared(0, vec![]));
        let mut topics = reg.topics_of(8);
        topics.sort_unstable();
        let mut want: Vec<Arc<[u8]>> = [&a[..], near, far].map(Arc::from).to_vec();
        want.sort_unstable();
        assert_eq!(topics, want);
        reg.check_invariants().unwrap();
        let mut monitors: Vec<u64> = reg.close().into_iter().map(|(_, m)| m).collect();
        monitors.sort_unstable();
        assert_eq!(
            monitors,
            (0..300)
                .filter(|&pid| pid != 4 && pid != 6)
                .collect::<Vec<_>>()
        );
        assert_eq!(reg.subscribe(&a, 1, || Some(1)), Err(ClosedError));
        assert!(reg.snapshot(&a).is_err());
        assert_eq!(reg.stats(), Stats::default());
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
    fn tracking_records_topics_created_and_emptied() {
        let mut reg = Registry::new();
        reg.subscribe(b"quiet", 1, ok_monitor(1)).unwrap();
        assert!(
            reg.take_changed().is_empty(),
            "nothing recorded while not tracking"
        );

        reg.set_tracking(true);
        reg.subscribe(b"a", 1, ok_monitor(1)).unwrap();
        reg.subscribe(b"a", 2, ok_monitor(2)).unwrap();
        reg.subscribe(b"b", 2, ok_monitor(2)).unwrap();
        let names = |v: Vec<Arc<[u8]>>| v.iter().map(|n| n.to_vec()).collect::<Vec<_>>();
        assert_eq!(
            names(reg.take_changed()),
            vec![b"a".to_vec(), b"b".to_vec()]
        );
        assert!(reg.take_changed().is_empty());

        reg.unsubscribe(b"a", 1);
        assert!(reg.take_changed().is_empty(), "a still has a subscriber");
        reg.remove_subscriber(2);
        let mut emptied = names(reg.take_changed());
        emptied.sort();
        assert_eq!(emptied, vec![b"a".to_vec(), b"b".to_vec()]);

        reg.set_tracking(false);
        reg.subscribe(b"c", 3, ok_monitor(3)).unwrap();
        assert!(reg.take_changed().is_empty());
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
