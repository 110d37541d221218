//! What a dispatcher did since it started, for `stats/1`: dispatches made and messages
//! sent to subscribers, counted on every path (a producer sending a small topic itself,
//! a lane's sender on a normal or a dirty scheduler).
//!
//! These are bumped on the hot path by every scheduler at once, so one shared counter
//! would bounce its cache line between cores on every dispatch. Instead each OS thread
//! adds to a slot of its own (picked once per thread, round robin), each slot alone on
//! its cache lines, and a read sums the slots. The VM's scheduler threads are fixed, so
//! with fewer threads than slots no two share one; when they do, the adds stay exact
//! (atomic), only slower. A read is a sum of relaxed loads: exact once the counting
//! calls have returned, for a reader that heard of them (after `sync/0`, say).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Slots per dispatcher: more than the scheduler threads (normal and dirty CPU) of the
/// machines we run on; 64 of 128 bytes is 8 KiB per dispatcher.
const SLOTS: usize = 64;

/// One thread's counters, on two cache lines of its own (128 bytes: the pair adjacent
/// lines some CPUs prefetch together).
#[repr(align(128))]
#[derive(Default)]
struct Slot {
    dispatches: AtomicU64,
    deliveries: AtomicU64,
}

/// The counters of one dispatcher.
pub struct Activity {
    slots: Box<[Slot]>,
}

/// The sums of [`Activity`]'s counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub dispatches: u64,
    pub deliveries: u64,
}

static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// The calling thread's slot, picked on its first count.
fn slot_index() -> usize {
    SLOT.with(|slot| match slot.get() {
        usize::MAX => {
            let index = NEXT_SLOT.fetch_add(1, Ordering::Relaxed) % SLOTS;
            slot.set(index);
            index
        }
        index => index,
    })
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    pub fn new() -> Self {
        Activity {
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
        }
    }

    fn slot(&self) -> &Slot {
        &self.slots[slot_index()]
    }

    /// One dispatch made (to a topic with or without subscribers).
    pub fn dispatched(&self) {
        self.slot().dispatches.fetch_add(1, Ordering::Relaxed);
    }

    /// `sent` messages sent to subscribers.
    pub fn delivered(&self, sent: usize) {
        if sent > 0 {
            self.slot()
                .deliveries
                .fetch_add(sent as u64, Ordering::Relaxed);
        }
    }

    /// The counts so far, summed over the slots.
    pub fn totals(&self) -> Totals {
        self.slots
            .iter()
            .fold(Totals::default(), |sum, slot| Totals {
                dispatches: sum.dispatches + slot.dispatches.load(Ordering::Relaxed),
                deliveries: sum.deliveries + slot.deliveries.load(Ordering::Relaxed),
            })
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn counts_from_many_threads_are_exact() {
        let activity = Arc::new(Activity::new());
        // More threads than slots: some share one, and the sums stay exact.
        let threads: Vec<_> = (0..SLOTS + 8)
            .map(|i| {
                let activity = Arc::clone(&activity);
                std::thread::spawn(move || {
                    for _ in 0..1_000 {
                        activity.dispatched();
                        activity.delivered(i);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let n = (SLOTS + 8) as u64;
        assert_eq!(
            activity.totals(),
            Totals {
                dispatches: n * 1_000,
                deliveries: 1_000 * n * (n - 1) / 2,
            }
        );
    }

    #[test]
    fn slots_do_not_share_cache_lines() {
        assert_eq!(std::mem::align_of::<Slot>(), 128);
        assert_eq!(std::mem::size_of::<Slot>(), 128);
    }

    #[test]
    fn each_dispatcher_counts_its_own() {
        let (a, b) = (Activity::new(), Activity::new());
        a.dispatched();
        a.delivered(3);
        b.delivered(0);
        assert_eq!(
            a.totals(),
            Totals {
                dispatches: 1,
                deliveries: 3
            }
        );
        assert_eq!(b.totals(), Totals::default());
    }
}
