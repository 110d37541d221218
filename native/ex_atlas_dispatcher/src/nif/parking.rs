//! `on_slow: :catch_up`'s entry points: the watchdog counts the topic's `:catch_up`
//! watches (`watch_parking/3`) and parks a subscriber that is behind (`park/4`); the
//! subscriber unparks itself (`unpark/2`) and then catches up as a joiner does
//! (`replay/2`). What parking means is `history::parked`'s.

use super::atoms;
use super::dispatcher::{release_monitor, Dispatcher};
use super::term::pid_to_raw;
use crate::history::{JoinRefused, Unpark};
use crate::sync::lock;
use rustler::{Atom, Binary, Env, LocalPid, ResourceArc};
use std::sync::atomic::Ordering;

/// One more (`more`) or one fewer `:catch_up` watch on `topic`: while it has any, its
/// dispatches are tracked until their sends are done. `:plain` when no history is kept.
#[rustler::nif]
fn watch_parking(dispatcher: ResourceArc<Dispatcher>, topic: Binary<'_>, more: bool) -> Atom {
    let Some(history) = &dispatcher.history else {
        return atoms::plain();
    };
    lock(history).watch(topic.as_slice(), more);
    atoms::ok()
}

/// Parks `pid` on `topic`: takes every subscription of `pid` to `topic` out of the
/// registry and keeps the topic's later dispatches for it in the history, under the
/// history lock (so each dispatch either reached the subscription or is kept for it).
/// `:ok`; `:parked` when it is parked on `topic` already; `:not_subscribed` when it had
/// no subscription to `topic`; `:joining` when it is catching up on `topic` (a replay, or
/// `catch_up/1`: it is not in the registry yet); `:plain` when no history is kept;
/// `:not_alive` when `pid` is gone; `:closed` once the dispatcher is closed.
#[rustler::nif]
fn park(
    env: Env<'_>,
    dispatcher: ResourceArc<Dispatcher>,
    topic: Binary<'_>,
    pid: LocalPid,
    direct: bool,
) -> Atom {
    let Some(history) = &dispatcher.history else {
        return atoms::plain();
    };
    let Some(monitor) = dispatcher.monitor(Some(env), &pid) else {
        return atoms::not_alive();
    };
    dispatcher.joiner_monitors.fetch_add(1, Ordering::Relaxed);
    let topic = topic.as_slice();
    let raw = pid_to_raw(&pid);
    let joining = super::replay::Joining { monitor, direct };
    let mut locked = lock(history);
    let (answer, unused, removed, freed) = match locked.park(topic, raw, joining) {
        Ok(freed) => {
            let removed = dispatcher.registry.unsubscribe(topic, raw);
            if removed.count > 0 {
                (atoms::ok(), None, removed.released, freed)
            } else {
                let (data, more) = locked.remove(topic, raw);
                let mut freed = freed;
                freed.extend(more);
                (atoms::not_subscribed(), data, removed.released, freed)
            }
        }
        Err(JoinRefused::Closed(joining)) => {
            (atoms::closed(), Some(joining), Vec::new(), Vec::new())
        }
        Err(JoinRefused::AlreadyJoining(joining)) => {
            let answer = if locked.is_parked(topic, raw) {
                atoms::parked()
            } else {
                atoms::joining()
            };
            (answer, Some(joining), Vec::new(), Vec::new())
        }
    };
    drop(locked);
    drop(freed);
    for monitor in &removed {
        release_monitor(env, &dispatcher, monitor, &dispatcher.subscriber_monitors);
    }
    if let Some(joining) = unused {
        release_monitor(
            env,
            &dispatcher,
            &joining.monitor,
            &dispatcher.joiner_monitors,
        );
    }
    // In cluster mode the relay checks the topic again: a parked subscriber still wants
    // it (`wanted/2`), though the registry may hold no subscription to it any more.
    dispatcher.tell_relay(env, raw, Some(topic));
    answer
}

/// Whether `pid` is parked on `topic` now. Only the watchdog parks a subscriber (and the
/// subscriber itself, in `catch_up/2` with `:max`, which then tells itself), so a
/// restarted watchdog asks this before it tells a subscriber to catch up.
#[rustler::nif]
fn is_parked(dispatcher: ResourceArc<Dispatcher>, topic: Binary<'_>, pid: LocalPid) -> bool {
    dispatcher
        .history
        .as_ref()
        .is_some_and(|history| lock(history).is_parked(topic.as_slice(), pid_to_raw(&pid)))
}

/// The caller, parked on `topic`, asks to catch up: `:ok` when it may now take its
/// history with `replay/2` (until that answers `:ok`: it is back in the registry);
/// `:wait` while dispatches from before it was parked are still being sent to it (ask
/// again shortly); `:not_parked` when it is not parked on `topic`.
#[rustler::nif]
fn unpark(env: Env<'_>, dispatcher: ResourceArc<Dispatcher>, topic: Binary<'_>) -> Atom {
    let Some(history) = &dispatcher.history else {
        return atoms::not_parked();
    };
    let raw = pid_to_raw(&env.pid());
    match lock(history).unpark(topic.as_slice(), raw) {
        Unpark::Ready => atoms::ok(),
        Unpark::Wait => atoms::wait(),
        Unpark::NotParked => atoms::not_parked(),
    }
}

/// The caller, catching up on `topic` after `unpark/2`, stops for now (`catch_up/2` with
/// `:max`): parked again where it is, until its next `unpark/2`. `:ok`, or
/// `:not_joining` when it is not catching up on `topic`.
#[rustler::nif]
fn repark(env: Env<'_>, dispatcher: ResourceArc<Dispatcher>, topic: Binary<'_>) -> Atom {
    let Some(history) = &dispatcher.history else {
        return atoms::not_joining();
    };
    let raw = pid_to_raw(&env.pid());
    if lock(history).repark(topic.as_slice(), raw) {
        atoms::ok()
    } else {
        atoms::not_joining()
    }
}
