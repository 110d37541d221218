//! `on_slow: :skip`: the subscriptions whose dispatches are skipped while their
//! subscriber is behind, what each skipped, and the gap notice each owes.
//!
//! The watchdog sets the state ([`Skips::start`]) and clears it ([`Skips::stop`]); the
//! send loops only ask [`Skips::admit`] before each send, and only while
//! [`Skips::any`] says that some entry exists, so a dispatch while nobody skips costs
//! one atomic load per send loop. An entry is keyed by (topic key, pid): the topic key
//! is the `Part`'s (`registry::topic_key`), so a loop needs no topic name.
//!
//! An entry is `Skipping` (each dispatch to the pid on the topic is counted, not sent)
//! or `Owed` (the subscriber caught up: the next process that sends it a message on the
//! topic first sends the gap notice, under the entry's lock, then its message). The
//! notice is sent under the lock so that every later send on the topic, by any process,
//! starts after it.

use crate::sync::{lock, AtomicU64, AtomicUsize, Mutex, Ordering};
use rustc_hash::FxHashMap;
use std::sync::Arc;

/// Locks of the table; an entry's is chosen by its pid and topic.
const SHARDS: usize = 16;
/// Dispatch serials remembered per entry, so that a subscriber with several
/// subscriptions to the topic (several sends per dispatch) is counted once per dispatch
/// even while that many dispatches interleave their sends to it.
const RECENT: usize = 8;
/// Counters of entries by topic key: a send loop on a topic whose counter is zero skips
/// the look-ups even while other topics have entries.
const TOPIC_BUCKETS: usize = 256;

/// What a send loop does with one send.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Send it.
    Send,
    /// Do not send it: it was counted.
    Skip,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum State {
    Skipping,
    Owed,
}

/// One lock's share of the table, by (topic key, pid).
type Shard = Mutex<FxHashMap<(u64, u64), Entry>>;

struct Entry {
    topic: Arc<[u8]>,
    state: State,
    missed: u64,
    recent: [u64; RECENT],
    next: usize,
}

/// Counters of [`Skips::stats`].
#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
pub struct Stats {
    /// Subscriptions being skipped now.
    pub skipping: usize,
    /// Dispatches skipped since the table was made.
    pub skipped: u64,
    /// Entries, skipping or owing their notice.
    pub entries: usize,
}

/// The skip table of one dispatcher.
pub struct Skips {
    /// Entries in the table, `Skipping` or `Owed`: zero lets the send loops skip the look-up.
    entries: AtomicUsize,
    /// Entries per bucket of topic keys (see `bucket`).
    buckets: Box<[AtomicUsize]>,
    skipping: AtomicUsize,
    skipped: AtomicU64,
    shards: Box<[Shard]>,
}

impl Default for Skips {
    fn default() -> Self {
        Self::new()
    }
}

impl Skips {
    pub fn new() -> Self {
        Skips {
            entries: AtomicUsize::new(0),
            buckets: (0..TOPIC_BUCKETS).map(|_| AtomicUsize::new(0)).collect(),
            skipping: AtomicUsize::new(0),
            skipped: AtomicU64::new(0),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(FxHashMap::default()))
                .collect(),
        }
    }

    fn shard(&self, key: (u64, u64)) -> &Shard {
        let mixed = (key.0 ^ key.1.rotate_left(17)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        &self.shards[(mixed >> 60) as usize % SHARDS]
    }

    /// True when some entry exists.
    #[inline]
    pub fn any(&self) -> bool {
        self.entries.load(Ordering::Acquire) != 0
    }

    /// True when an entry may exist for `topic_key`: only then need a send loop on that
    /// topic ask [`Skips::admit`]. While nothing is skipped anywhere, one atomic load.
    #[inline]
    pub fn any_for(&self, topic_key: u64) -> bool {
        self.any() && self.bucket(topic_key).load(Ordering::Acquire) != 0
    }

    fn bucket(&self, topic_key: u64) -> &AtomicUsize {
        // Topic keys are hashes already; the top bits of a multiplicative mix spread
        // keys that differ only in their low bits too.
        let mixed = topic_key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56;
        &self.buckets[mixed as usize % TOPIC_BUCKETS]
    }

    /// One entry more (`true`) or fewer for `topic_key`, in both counts.
    fn count_entry(&self, topic_key: u64, more: bool) {
        if more {
            self.bucket(topic_key).fetch_add(1, Ordering::Release);
            self.entries.fetch_add(1, Ordering::Release);
        } else {
            self.entries.fetch_sub(1, Ordering::Release);
            self.bucket(topic_key).fetch_sub(1, Ordering::Release);
        }
    }

    /// Starts (or goes on) skipping `pid` on `topic` (`topic_key` its key). An entry
    /// that owed its notice goes back to skipping and counts on: one notice per episode.
    pub fn start(&self, topic: &[u8], topic_key: u64, pid: u64) {
        let mut shard = lock(self.shard((topic_key, pid)));
        match shard.get_mut(&(topic_key, pid)) {
            Some(entry) => {
                if entry.state == State::Owed {
                    entry.state = State::Skipping;
                    self.skipping.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => {
                let entry = Entry {
                    topic: Arc::from(topic),
                    state: State::Skipping,
                    missed: 0,
                    recent: [0; RECENT],
                    next: 0,
                };
                shard.insert((topic_key, pid), entry);
                self.skipping.fetch_add(1, Ordering::Relaxed);
                self.count_entry(topic_key, true);
            }
        }
    }

    /// Ends the skipping of `pid` on `topic_key`; returns the dispatches skipped in this
    /// episode. With none, the entry goes; otherwise it owes its notice to the next send.
    pub fn stop(&self, topic_key: u64, pid: u64) -> u64 {
        let key = (topic_key, pid);
        let mut shard = lock(self.shard(key));
        let Some(entry) = shard.get_mut(&key) else {
            return 0;
        };
        if entry.state == State::Skipping {
            entry.state = State::Owed;
            self.skipping.fetch_sub(1, Ordering::Relaxed);
        }
        let missed = entry.missed;
        if missed == 0 {
            shard.remove(&key);
            self.count_entry(topic_key, false);
        }
        missed
    }

    /// Forgets `pid` on `topic_key` (it unsubscribed or died): nothing is owed any more.
    pub fn clear(&self, topic_key: u64, pid: u64) {
        let key = (topic_key, pid);
        let mut shard = lock(self.shard(key));
        if let Some(entry) = shard.remove(&key) {
            if entry.state == State::Skipping {
                self.skipping.fetch_sub(1, Ordering::Relaxed);
            }
            self.count_entry(topic_key, false);
        }
    }

    /// Asked before a send to `pid` of dispatch `serial` on `topic_key`, once [`Skips::any`]
    /// said so. Skipping: counts the dispatch (once per serial) and answers
    /// [`Admit::Skip`]. Owed: calls `notify(topic, missed)` under the entry's lock, drops
    /// the entry and answers [`Admit::Send`]. Otherwise [`Admit::Send`].
    pub fn admit(
        &self,
        topic_key: u64,
        serial: u64,
        pid: u64,
        notify: impl FnOnce(&[u8], u64),
    ) -> Admit {
        let key = (topic_key, pid);
        let mut shard = lock(self.shard(key));
        let Some(entry) = shard.get_mut(&key) else {
            return Admit::Send;
        };
        match entry.state {
            State::Skipping => {
                // Serial 0 is a snapshot no dispatch took (never sent): count each send.
                if serial == 0 || !entry.recent.contains(&serial) {
                    entry.recent[entry.next] = serial;
                    entry.next = (entry.next + 1) % RECENT;
                    entry.missed += 1;
                    self.skipped.fetch_add(1, Ordering::Relaxed);
                }
                Admit::Skip
            }
            State::Owed => {
                notify(&entry.topic, entry.missed);
                shard.remove(&key);
                self.count_entry(topic_key, false);
                Admit::Send
            }
        }
    }

    /// Subscriptions skipping now, and dispatches skipped in all.
    pub fn stats(&self) -> Stats {
        Stats {
            skipping: self.skipping.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            entries: self.entries.load(Ordering::Relaxed),
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn admit(skips: &Skips, serial: u64, pid: u64, notices: &mut Vec<(Vec<u8>, u64)>) -> Admit {
        skips.admit(7, serial, pid, |topic, missed| {
            notices.push((topic.to_vec(), missed))
        })
    }

    #[test]
    fn only_the_topics_of_a_bucket_with_entries_ask() {
        let skips = Skips::new();
        // A key whose bucket differs from key 7's.
        let other = (8..)
            .find(|&k| !std::ptr::eq(skips.bucket(k), skips.bucket(7)))
            .unwrap();
        assert!(!skips.any_for(7) && !skips.any_for(other));
        skips.start(b"t", 7, 5);
        assert!(skips.any_for(7), "the skipped topic asks");
        assert!(!skips.any_for(other), "another bucket's topic does not");
        let mut notices = vec![];
        assert_eq!(admit(&skips, 1, 5, &mut notices), Admit::Skip);
        assert_eq!(skips.stop(7, 5), 1);
        assert!(skips.any_for(7), "a notice is owed: still asks");
        assert_eq!(admit(&skips, 2, 5, &mut notices), Admit::Send);
        assert_eq!(notices, vec![(b"t".to_vec(), 1)]);
        assert!(!skips.any_for(7) && !skips.any());
        skips.start(b"t", 7, 6);
        skips.clear(7, 6);
        assert!(!skips.any_for(7) && !skips.any());
    }

    #[test]
    fn nothing_skipped_until_started() {
        let skips = Skips::new();
        let mut notices = vec![];
        assert!(!skips.any());
        assert_eq!(admit(&skips, 1, 5, &mut notices), Admit::Send);
        assert!(notices.is_empty());
    }

    #[test]
    fn an_episode_counts_each_dispatch_and_owes_one_notice() {
        let skips = Skips::new();
        let mut notices = vec![];
        skips.start(b"t", 7, 5);
        assert!(skips.any());
        for serial in 1..=10 {
            assert_eq!(admit(&skips, serial, 5, &mut notices), Admit::Skip);
        }
        // Another pid, and the same pid on another topic, are sent to.
        assert_eq!(admit(&skips, 11, 6, &mut notices), Admit::Send);
        assert_eq!(
            skips.admit(8, 11, 5, |_, _| panic!("no notice")),
            Admit::Send
        );
        assert_eq!(
            skips.stats(),
            Stats {
                skipping: 1,
                skipped: 10,
                entries: 1
            }
        );
        assert_eq!(skips.stop(7, 5), 10);
        assert_eq!(skips.stats().skipping, 0);
        assert_eq!(admit(&skips, 12, 5, &mut notices), Admit::Send);
        assert_eq!(admit(&skips, 13, 5, &mut notices), Admit::Send);
        assert_eq!(notices, vec![(b"t".to_vec(), 10)]);
        assert!(!skips.any());
    }

    #[test]
    fn several_subscriptions_count_once_per_dispatch_even_interleaved() {
        let skips = Skips::new();
        let mut notices = vec![];
        skips.start(b"t", 7, 5);
        // Two subscriptions each, three dispatches interleaving their sends.
        for serial in [1, 2, 1, 3, 2, 3] {
            assert_eq!(admit(&skips, serial, 5, &mut notices), Admit::Skip);
        }
        assert_eq!(skips.stop(7, 5), 3);
    }

    #[test]
    fn an_episode_with_nothing_skipped_owes_nothing() {
        let skips = Skips::new();
        let mut notices = vec![];
        skips.start(b"t", 7, 5);
        assert_eq!(skips.stop(7, 5), 0);
        assert!(!skips.any());
        assert_eq!(admit(&skips, 1, 5, &mut notices), Admit::Send);
        assert!(notices.is_empty());
    }

    #[test]
    fn behind_again_before_the_notice_is_one_episode() {
        let skips = Skips::new();
        let mut notices = vec![];
        skips.start(b"t", 7, 5);
        admit(&skips, 1, 5, &mut notices);
        assert_eq!(skips.stop(7, 5), 1);
        skips.start(b"t", 7, 5);
        skips.start(b"t", 7, 5);
        assert_eq!(skips.stats().skipping, 1);
        admit(&skips, 2, 5, &mut notices);
        assert_eq!(skips.stop(7, 5), 2);
        assert_eq!(admit(&skips, 3, 5, &mut notices), Admit::Send);
        assert_eq!(notices, vec![(b"t".to_vec(), 2)]);
    }

    #[test]
    fn clearing_leaves_nothing_behind() {
        let skips = Skips::new();
        let mut notices = vec![];
        skips.start(b"t", 7, 5);
        skips.start(b"u", 9, 5);
        admit(&skips, 1, 5, &mut notices);
        skips.clear(7, 5);
        assert_eq!(skips.stop(9, 5), 0);
        skips.clear(9, 5);
        skips.clear(9, 5);
        assert!(!skips.any());
        assert_eq!(skips.stats().skipping, 0);
        assert_eq!(skips.stats().skipped, 1);
        // An owed notice is dropped with its entry.
        skips.start(b"t", 7, 5);
        admit(&skips, 2, 5, &mut notices);
        skips.stop(7, 5);
        skips.clear(7, 5);
        assert!(!skips.any());
        assert_eq!(admit(&skips, 3, 5, &mut notices), Admit::Send);
        assert!(notices.is_empty());
    }
}
