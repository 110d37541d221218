//! Subscriptions: `subscribe/3`, `unsubscribe/2`, `unsubscribe_pid/3`, and, in cluster
//! mode, the hints the relay gets about the topics this node gains or loses
//! (`set_relay/2`). The registry itself is `registry`'s.

use super::atoms;
use super::dispatcher::{release_monitor, Dispatcher};
use super::term::{binary_term, decode_or_undefined, pid_to_raw, Outgoing};
use crate::registry::{ClosedError, Sharded, SubscribeError};
use crate::sync::lock;
use rustler::{Atom, Binary, Encoder, Env, LocalPid, Monitor, ResourceArc, Term};
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Dispatcher {
    /// Tells the relay (cluster mode) about each topic that `pid`'s last change (to
    /// `topic`, or to all its topics for `None`) created or emptied in its shard, with
    /// `{:"$ex_atlas_interest", topic}`: a hint, which the relay checks against
    /// `wanted/2`, so hints from several processes may arrive in any order.
    pub(super) fn tell_relay(&self, env: Env<'_>, pid: u64, topic: Option<&[u8]>) {
        self.tell_relay_and::<&[u8]>(env, pid, topic, &[]);
    }

    /// `tell_relay`, and a hint for each of `joined` too: topics where `pid` stopped
    /// catching up or being parked. The registry did not change for those (it was not
    /// in it there), but the node may want them no more (`wanted/2`).
    pub(super) fn tell_relay_and<T: AsRef<[u8]>>(
        &self,
        env: Env<'_>,
        pid: u64,
        topic: Option<&[u8]>,
        joined: &[T],
    ) {
        let relay = self.relay.load(Ordering::Acquire);
        if relay == 0 {
            return;
        }
        let mut topics: Vec<Arc<[u8]>> = self.registry.take_changed(pid, topic);
        for topic in joined.iter().map(AsRef::as_ref) {
            if !topics.iter().any(|changed| &**changed == topic) {
                topics.push(Arc::from(topic));
            }
        }
        for topic in topics {
            let hint = Outgoing::build(|menv| {
                (atoms::ex_atlas_interest(), binary_term(menv, &topic)).encode(menv)
            });
            // A dead relay is being restarted; the new one reads every topic.
            let _ = hint.send(env, relay);
        }
    }
}

/// Adds one subscription of `pid` to `topic` (to the direct partition when `direct`),
/// and answers as `subscribe/3` does. `monitor` is called when `pid` needs one, as
/// `Sharded::subscribe` does.
pub(super) fn subscribe_in(
    registry: &Sharded<Monitor>,
    topic: &[u8],
    pid: u64,
    direct: bool,
    monitor: impl FnOnce() -> Option<Monitor>,
) -> Atom {
    let result = if direct {
        registry.subscribe_direct(topic, pid, monitor)
    } else {
        registry.subscribe(topic, pid, monitor)
    };
    match result {
        Ok(Ok(())) => atoms::ok(),
        Ok(Err(SubscribeError::NotAlive)) => atoms::not_alive(),
        Ok(Err(SubscribeError::TooManyTopics)) => atoms::too_many_topics(),
        Err(ClosedError) => atoms::closed(),
    }
}

/// Subscribes the caller to `topic`. `direct`: every dispatching process sends to it
/// itself, never through a sender (see `dispatch_to`); the caller says so when its
/// message queue is off-heap.
#[rustler::nif]
fn subscribe(
    env: Env<'_>,
    dispatcher: ResourceArc<Dispatcher>,
    topic: Binary<'_>,
    direct: bool,
) -> Atom {
    let pid = env.pid();
    let monitor = || {
        let monitor = dispatcher.monitor(Some(env), &pid)?;
        dispatcher
            .subscriber_monitors
            .fetch_add(1, Ordering::Relaxed);
        Some(monitor)
    };
    let raw = pid_to_raw(&pid);
    let answer = subscribe_in(&dispatcher.registry, topic.as_slice(), raw, direct, monitor);
    dispatcher.tell_relay(env, raw, Some(topic.as_slice()));
    answer
}

/// Removes every subscription of `pid` to `topic`, and its join of `topic` if it is
/// catching up on it; returns how many went. With replay, under the history lock, so
/// that the history knows exactly which dispatches went to the subscription: a later
/// replay to `pid` starts after them, as some may still be on their way to it.
fn remove(
    env: Env<'_>,
    dispatcher: &ResourceArc<Dispatcher>,
    topic: &[u8],
    pid: &LocalPid,
) -> usize {
    let raw = pid_to_raw(pid);
    let mut joining = None;
    let removed = match &dispatcher.history {
        None => dispatcher.registry.unsubscribe(topic, raw),
        Some(history) => {
            let mut history = lock(history);
            let removed = dispatcher.registry.unsubscribe(topic, raw);
            if removed.count > 0 {
                history.depart(topic, raw);
            }
            let (data, freed) = history.remove(topic, raw);
            drop(history);
            drop(freed);
            joining = data;
            removed
        }
    };
    for monitor in &removed.released {
        release_monitor(env, dispatcher, monitor, &dispatcher.subscriber_monitors);
    }
    if let Some(joining) = &joining {
        release_monitor(
            env,
            dispatcher,
            &joining.monitor,
            &dispatcher.joiner_monitors,
        );
    }
    let joined: &[&[u8]] = if joining.is_some() { &[topic] } else { &[] };
    dispatcher.tell_relay_and(env, raw, Some(topic), joined);
    removed.count + usize::from(joining.is_some())
}

#[rustler::nif]
fn unsubscribe(env: Env<'_>, dispatcher: ResourceArc<Dispatcher>, topic: Binary<'_>) -> Atom {
    remove(env, &dispatcher, topic.as_slice(), &env.pid());
    atoms::ok()
}

#[rustler::nif]
fn unsubscribe_pid(
    env: Env<'_>,
    dispatcher: ResourceArc<Dispatcher>,
    topic: Binary<'_>,
    pid: LocalPid,
) -> usize {
    remove(env, &dispatcher, topic.as_slice(), &pid)
}

/// Cluster mode: `relay` hears about every topic this node gains or loses (see
/// `Dispatcher::tell_relay`); `:undefined` stops that.
#[rustler::nif]
fn set_relay(dispatcher: ResourceArc<Dispatcher>, relay: Term<'_>) -> rustler::NifResult<Atom> {
    let raw = decode_or_undefined::<LocalPid>(relay)?.map_or(0, |pid| pid_to_raw(&pid));
    dispatcher.registry.set_tracking(raw != 0);
    dispatcher.relay.store(raw, Ordering::Release);
    Ok(atoms::ok())
}
