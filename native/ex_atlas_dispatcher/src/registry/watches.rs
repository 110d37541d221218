//! Who owns which monitor: one process monitor per subscriber, however many shards hold
//! its subscriptions.
//!
//! A subscriber's monitor is kept in one of several watch tables, picked from its pid,
//! with the number of stripes that hold a record of it: made when the first stripe
//! records it, released when the last one lets it go. A watch table is only ever locked
//! inside a shard's lock, never the other way round.

use super::sharded::{mix, Padded};
use super::Pid;
use rustc_hash::FxHashMap;
use std::sync::{Mutex, MutexGuard};

/// A subscriber's monitor, with the number of stripes that hold a record of it.
struct Watch<M> {
    monitor: M,
    stripes: u32,
}

/// One watch table: subscriber → its monitor and the stripes that record it.
type Table<M> = FxHashMap<Pid, Watch<M>>;

/// Every subscriber's monitor, over `tables` locks.
pub(super) struct Watches<M> {
    tables: Box<[Padded<Mutex<Table<M>>>]>,
}

impl<M> Watches<M> {
    /// `tables` tables (at least one).
    pub(super) fn new(tables: usize) -> Self {
        Watches {
            tables: (0..tables.max(1))
                .map(|_| Padded(Mutex::new(FxHashMap::default())))
                .collect(),
        }
    }

    /// The table of `pid` (taken inside a shard's lock only).
    fn table_of(&self, pid: Pid) -> MutexGuard<'_, Table<M>> {
        // The high half of the mix: the low half picks the lane.
        self.tables[((mix(pid) >> 32) % self.tables.len() as u64) as usize].lock()
    }

    /// One more stripe records `pid`: `monitor` is called when none did. False when it
    /// answers `None` (the process is not alive).
    pub(super) fn watch(&self, pid: Pid, monitor: impl FnOnce() -> Option<M>) -> bool {
        let mut table = self.table_of(pid);
        if let Some(watch) = table.get_mut(&pid) {
            watch.stripes += 1;
            return true;
        }
        match monitor() {
            Some(monitor) => {
                table.insert(
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
    pub(super) fn unwatch(&self, pid: Pid) -> Option<M> {
        let mut table = self.table_of(pid);
        let watch = table.get_mut(&pid)?;
        watch.stripes -= 1;
        if watch.stripes > 0 {
            return None;
        }
        table.remove(&pid).map(|watch| watch.monitor)
    }

    /// Subscribers watched: one monitor each.
    pub(super) fn len(&self) -> usize {
        self.tables.iter().map(|table| table.lock().len()).sum()
    }

    /// Every subscriber with its monitor, once each; the tables are left empty. Only
    /// once no shard takes a table's lock any more (closing).
    pub(super) fn drain(&self) -> Vec<(Pid, M)> {
        self.gather(|table| {
            table
                .drain()
                .map(|(pid, watch)| (pid, watch.monitor))
                .collect()
        })
    }

    /// Each subscriber watched, with the number of stripes its watch counts; for
    /// invariant checks.
    pub(super) fn stripes(&self) -> Vec<(Pid, u32)> {
        self.gather(|table| {
            table
                .iter()
                .map(|(&pid, watch)| (pid, watch.stripes))
                .collect()
        })
    }

    /// What `take` makes of each table in turn, locked one at a time.
    fn gather<T>(&self, mut take: impl FnMut(&mut Table<M>) -> Vec<T>) -> Vec<T> {
        self.tables
            .iter()
            .flat_map(|table| take(&mut table.lock()))
            .collect()
    }
}
