//! The dispatcher resource and its life: `new/4`, `close/1`, and its `down` callback.
//!
//! The resources sit with what they serve. The [`Dispatcher`] is here, apart, because
//! every concern holds it and its `down` reaches them all: a dead sender's batches (the
//! lanes), a dead joiner (replay), a dead subscriber's subscriptions and the relay's
//! hint (subscriptions). A `Batch` lives in `lanes`, as its destructor gives its lane's
//! credit back; a `Pending` in `dispatch`, as it is what is left of one producer's
//! dispatch; a `Joining` in `replay`.

use super::dispatch::{wake, Waiter};
use super::kept::Kept;
use super::lanes::Batch;
use super::replay::Joining;
use super::term::{pid_from_raw, pid_to_raw, Outgoing};
use crate::fanout::Lanes;
use crate::handoff::Handoff;
use crate::history::History;
use crate::registry::Sharded;
use crate::skip::Skips;
use crate::sync::lock;
use rustler::{Env, LocalPid, Monitor, Resource, ResourceArc};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Most lanes `new/4` accepts, as `config :ex_atlas, :fly, lanes:` does.
/// Checked here too: a huge count made the allocation abort the whole VM.
const MAX_LANES: usize = 1_024;

/// One dispatcher: the registry (one shard per lane), the bounds of its fan-out lanes
/// and the lanes' sender processes. Held by the Elixir side as a resource; process
/// monitors belong to it, so subscriptions outlive any one process of ours.
pub(super) struct Dispatcher {
    pub(super) registry: Sharded<Monitor>,
    pub(super) lanes: Lanes<Waiter>,
    /// Each lane's sender process and its batches on their way; see `handoff`.
    pub(super) senders: Box<[Handoff<ResourceArc<Batch>, Outgoing>]>,
    /// Process monitors of subscriptions currently set, counted where they are set
    /// and undone; those of joiners apart (`replay_monitors`).
    pub(super) subscriber_monitors: AtomicUsize,
    pub(super) joiner_monitors: AtomicUsize,
    /// Raw pid of the cluster relay told about topics this node gains or loses; 0
    /// when not in cluster mode.
    pub(super) relay: AtomicU64,
    /// The senders this resource monitors (a `down` for one of them reclaims its
    /// batches; any other `down` is a subscriber's).
    pub(super) monitored_senders: Mutex<Vec<u64>>,
    /// Replay: each topic's most recent dispatches and the subscribers catching up
    /// on them (see `history`); `None` when no message is kept (`replay: 0`), and
    /// then a dispatch takes no lock of it at all.
    pub(super) history: Option<Mutex<History<Kept, Joining>>>,
    /// Dispatches and deliveries so far, for `stats/1`.
    pub(super) activity: crate::activity::Activity,
    /// `on_slow: :skip`'s subscriptions being skipped or owing their gap notice.
    pub(super) skips: Skips,
}

impl Dispatcher {
    /// The batches the dead sender `pid` had not delivered: counted as lost, their
    /// credits given back (to waiting producers first).
    fn reclaim(&self, env: Env<'_>, pid: u64) {
        for slot in self.senders.iter() {
            for batch in slot.reclaim(pid) {
                batch.give_back_undelivered(env);
            }
        }
    }

    /// True when the caller `producer` may send to `lane`'s subscribers itself without
    /// overtaking anything it handed to that lane before: the lane is idle, or the
    /// caller's own last batch there is finished.
    pub(super) fn clear_for(&self, lane: usize, producer: u64) -> bool {
        self.lanes.is_idle(lane) || self.senders[lane].clear_for(producer)
    }
}

#[rustler::resource_impl]
impl Resource for Dispatcher {
    const IMPLEMENTS_DOWN: bool = true;

    fn down<'a>(&'a self, env: Env<'a>, pid: LocalPid, monitor: Monitor) {
        // rustler catches panics here too, but do not rely on the version for that.
        let _ = catch_unwind(AssertUnwindSafe(|| {
            let raw = pid_to_raw(&pid);
            let mut senders = lock(&self.monitored_senders);
            if let Some(at) = senders.iter().position(|&s| s == raw) {
                senders.swap_remove(at);
                drop(senders);
                self.reclaim(env, raw);
                return;
            }
            drop(senders);
            // A process that died catching up: it is a joiner no more. Each of its
            // monitors (a joiner's, its subscriptions') fires and counts itself.
            let mut joiner = false;
            let mut joined = Vec::new();
            if let Some(history) = &self.history {
                let (left, freed) = lock(history).leave(raw);
                joiner = left.iter().any(|(_, j)| j.monitor == monitor);
                joined = left.into_iter().map(|(topic, _)| topic).collect();
                drop(freed);
            }
            let counter = if joiner {
                &self.joiner_monitors
            } else {
                &self.subscriber_monitors
            };
            counter.fetch_sub(1, Ordering::Relaxed);
            self.registry.remove_subscriber(raw);
            self.tell_relay_and(env, raw, None, &joined);
        }));
    }
}

/// Undoes a monitor of ours and counts it in `counter`; one that already fired is
/// left to its `down`, which does the counting.
pub(super) fn release_monitor(
    env: Env<'_>,
    dispatcher: &ResourceArc<Dispatcher>,
    monitor: &Monitor,
    counter: &AtomicUsize,
) {
    if dispatcher.demonitor(Some(env), monitor) {
        counter.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A dispatcher with `lanes` lanes of `queue_capacity` batches each, keeping the
/// `replay` most recent dispatches of each topic within `replay_memory` bytes in all
/// (`replay: 0` keeps none).
#[rustler::nif]
fn new(
    lanes: usize,
    queue_capacity: usize,
    replay: usize,
    replay_memory: usize,
) -> rustler::NifResult<ResourceArc<Dispatcher>> {
    if !(1..=MAX_LANES).contains(&lanes) {
        return Err(rustler::Error::BadArg);
    }
    let lanes = Lanes::new(lanes, queue_capacity);
    Ok(ResourceArc::new(Dispatcher {
        registry: Sharded::new(lanes.len()),
        senders: (0..lanes.len()).map(|_| Handoff::new()).collect(),
        lanes,
        subscriber_monitors: AtomicUsize::new(0),
        joiner_monitors: AtomicUsize::new(0),
        relay: AtomicU64::new(0),
        monitored_senders: Mutex::new(Vec::new()),
        history: (replay > 0).then(|| Mutex::new(History::new(replay, replay_memory))),
        activity: crate::activity::Activity::new(),
        skips: Skips::new(),
    }))
}

/// Closes the dispatcher for good: every later call answers `:closed`, every monitor
/// is released, every waiting producer is woken (its `resume/2` answers `:closed`).
/// Returns the subscribers it held, one pid each, so the caller can tell them: those
/// in the registry, and those parked (`on_slow: :catch_up`), which are not in the
/// registry but whose subscription ends too. (One catching up on a replay learns it
/// from its next `replay/2`, which answers `:closed`: its `subscribe/2` raises.)
#[rustler::nif(schedule = "DirtyCpu")]
fn close(env: Env<'_>, dispatcher: ResourceArc<Dispatcher>) -> Vec<LocalPid> {
    let mut subscribers: Vec<u64> = Vec::new();
    for (pid, monitor) in &dispatcher.registry.close() {
        release_monitor(env, &dispatcher, monitor, &dispatcher.subscriber_monitors);
        subscribers.push(*pid);
    }
    if let Some(history) = &dispatcher.history {
        let mut locked = lock(history);
        subscribers.extend(locked.parked_pids());
        let cleared = locked.clear();
        drop(locked);
        for (_, joining) in &cleared.joiners {
            release_monitor(
                env,
                &dispatcher,
                &joining.monitor,
                &dispatcher.joiner_monitors,
            );
        }
        drop(cleared);
        subscribers.sort_unstable();
        subscribers.dedup();
    }
    let waiters = dispatcher.lanes.close();
    for waiter in &waiters {
        wake(env, waiter);
    }
    drop(waiters);
    // Batches parked for a sender that never came, and the record of those in
    // flight: dropped (an undelivered one is counted as lost when freed).
    let cleared: Vec<_> = dispatcher.senders.iter().map(|slot| slot.clear()).collect();
    drop(cleared);
    subscribers.into_iter().map(pid_from_raw).collect()
}
