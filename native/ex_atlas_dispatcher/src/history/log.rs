//! One topic's log: its kept messages as a run of slots numbered in dispatch order, the
//! joiners catching up on it, and the processes that left it (see `history`).

use super::joiners::Joiner;
use super::parked::InFlight;
use super::{Entry, Pid};
use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::sync::Arc;

/// One kept message in its topic's log.
pub(super) struct Slot<M> {
    /// Position in the order of all dispatches recorded, over all topics.
    pub(super) global: u64,
    /// Bytes charged to the topic's slots before this one, ever: the bytes of a run of
    /// slots is the difference of two of these.
    pub(super) before: u64,
    /// Bytes charged for this slot: its entry and the history's own share.
    pub(super) charge: usize,
    pub(super) entry: Arc<Entry<M>>,
}

/// One topic's slots, joiners and departures.
pub(super) struct Log<M, J> {
    pub(super) slots: VecDeque<Slot<M>>,
    /// The number of `slots[0]`.
    pub(super) base: u64,
    /// The first slot of the history; `base..live` are retained for joiners only.
    pub(super) live: u64,
    /// Bytes charged to every slot ever pushed.
    pub(super) charged: u64,
    pub(super) joiners: Vec<Joiner<J>>,
    /// Processes that unsubscribed, and the first slot they may be replayed: what was
    /// dispatched before may still be on its way to them from their subscription.
    pub(super) departed: FxHashMap<Pid, u64>,
    pub(super) departures: VecDeque<(u64, Pid)>,
    /// Dispatches recorded or skipped, ever: the next one's number (see `parked`).
    pub(super) dispatched: u64,
    /// `:catch_up` watches on the topic; while any, its dispatches are tracked in
    /// `inflight`.
    pub(super) watchers: usize,
    pub(super) inflight: Option<Arc<InFlight>>,
}

impl<M, J> Log<M, J> {
    pub(super) fn new() -> Self {
        Log {
            slots: VecDeque::new(),
            base: 0,
            live: 0,
            charged: 0,
            joiners: Vec::new(),
            departed: FxHashMap::default(),
            departures: VecDeque::new(),
            dispatched: 0,
            watchers: 0,
            inflight: None,
        }
    }

    /// The number the next slot gets.
    pub(super) fn end(&self) -> u64 {
        self.base + self.slots.len() as u64
    }

    pub(super) fn slot(&self, seq: u64) -> &Slot<M> {
        &self.slots[(seq - self.base) as usize]
    }

    pub(super) fn before(&self, seq: u64) -> u64 {
        if seq == self.end() {
            self.charged
        } else {
            self.slot(seq).before
        }
    }

    /// Bytes charged to slots `from..to`.
    pub(super) fn bytes_between(&self, from: u64, to: u64) -> u64 {
        self.before(to) - self.before(from)
    }

    pub(super) fn live_len(&self) -> usize {
        (self.end() - self.live) as usize
    }

    /// The first slot anybody needs: the history's first, or an earlier one a joiner
    /// has yet to deliver.
    pub(super) fn needed(&self) -> u64 {
        self.joiners
            .iter()
            .map(Joiner::needs)
            .fold(self.live, u64::min)
    }

    pub(super) fn is_idle(&self) -> bool {
        self.slots.is_empty()
            && self.joiners.is_empty()
            && self.departed.is_empty()
            && self.watchers == 0
    }
}
