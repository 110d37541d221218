//! Replay's entry points: `join/4` starts a subscriber catching up on a topic's history,
//! `replay/2` sends it the next chunk and, once it has caught up, adds it to the
//! registry; and what a dispatch records in the history ([`record`]). The history
//! itself (bounds, cuts, joiners) is `history`'s; a message as kept is `kept`'s.

use super::atoms;
use super::dispatch::INLINE_SLICE;
use super::dispatcher::{release_monitor, Dispatcher};
use super::kept::{Kept, Scratch};
use super::subscriptions::subscribe_in;
use super::term::{pid_to_raw, send_from};
use super::timeslice::Timeslice;
use crate::history::{Entry, Evicted, History, JoinRefused, NotJoining, Take, Track};
use crate::registry::{ClosedError, Snapshot};
use crate::sync::lock;
use rustler::{Atom, Binary, Encoder, Env, LocalPid, Monitor, ResourceArc, Term};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

/// Most messages one `replay/2` call takes from the caller's history, and most bytes
/// past the first message (less with a small `replay_memory`, see
/// `History::chunk_bytes`): what it does not send in its timeslice it sends next call.
const REPLAY_CHUNK: usize = 64;
const REPLAY_CHUNK_BYTES: usize = 1 << 20;

/// What a subscriber catching up on a topic's history carries until it enters the
/// registry: the monitor that removes it if it dies meanwhile (handed to the
/// registry or released then), and whether it goes to the direct partition.
pub(super) struct Joining {
    pub(super) monitor: Monitor,
    pub(super) direct: bool,
}

/// Starts subscribing the caller to `topic` with the `n` most recent messages kept
/// for it: `:ok`, and the caller calls `replay/2` until it answers `:ok`. `:plain`
/// when no history is kept (the caller subscribes as usual), `:not_alive` when the
/// caller is exiting, `:closed` once the dispatcher is closed. Badarg when the caller
/// is already joining `topic`.
#[rustler::nif]
fn join<'a>(
    env: Env<'a>,
    dispatcher: ResourceArc<Dispatcher>,
    topic: Binary<'a>,
    n: usize,
    direct: bool,
) -> rustler::NifResult<Atom> {
    let Some(history) = &dispatcher.history else {
        return Ok(atoms::plain());
    };
    let pid = env.pid();
    let Some(monitor) = dispatcher.monitor(Some(env), &pid) else {
        return Ok(atoms::not_alive());
    };
    dispatcher.joiner_monitors.fetch_add(1, Ordering::Relaxed);
    let joined = lock(history).join(
        topic.as_slice(),
        pid_to_raw(&pid),
        n,
        Joining { monitor, direct },
    );
    let (joining, answer) = match joined {
        Ok(freed) => {
            drop(freed);
            return Ok(atoms::ok());
        }
        Err(JoinRefused::Closed(joining)) => (joining, Ok(atoms::closed())),
        Err(JoinRefused::AlreadyJoining(joining)) => (joining, Err(rustler::Error::BadArg)),
    };
    let counter = &dispatcher.joiner_monitors;
    release_monitor(env, &dispatcher, &joining.monitor, counter);
    answer
}

/// Goes on with the caller's `join/4` to `topic`: sends the caller the next messages
/// of its history, oldest first, for one timeslice at most, and answers `:more`
/// (`{:gap, missed}` when it first sent the caller
/// `{:ex_atlas_fly_gap, topic, missed}`: it fell so far behind that `missed`
/// dispatches were not kept for it). Once there are none left, adds the caller to the
/// registry (atomically with respect to every dispatch, see `history`) and answers
/// `:ok`. Between two calls the caller fetches what it sent itself, so that it is in
/// its queue before anything sent live. `:removed` when the caller's join was removed
/// (`unsubscribe_pid/3` while it caught up), `:closed` once the dispatcher is
/// closed, `:not_alive` and `:too_many_topics` as `subscribe/3`.
#[rustler::nif]
fn replay<'a>(env: Env<'a>, dispatcher: ResourceArc<Dispatcher>, topic: Binary<'a>) -> Term<'a> {
    match replay_chunk(env, &dispatcher, topic, REPLAY_CHUNK) {
        Ok(Chunk {
            told: true, missed, ..
        }) => (atoms::gap(), missed).encode(env),
        Ok(_) => atoms::more().encode(env),
        Err(answer) => answer,
    }
}

/// `replay/2` sending at most `max` messages (at least 1, at most a chunk): `{:more, sent}`
/// or `{:gap, missed, sent}`, and otherwise as `replay/2`. For `catch_up/2` with `:max`.
#[rustler::nif]
fn replay_up_to<'a>(
    env: Env<'a>,
    dispatcher: ResourceArc<Dispatcher>,
    topic: Binary<'a>,
    max: usize,
) -> Term<'a> {
    match replay_chunk(env, &dispatcher, topic, max.clamp(1, REPLAY_CHUNK)) {
        Ok(Chunk {
            told: true,
            missed,
            sent,
        }) => (atoms::gap(), missed, sent).encode(env),
        Ok(Chunk { sent, .. }) => (atoms::more(), sent).encode(env),
        Err(answer) => answer,
    }
}

/// What one call of `replay/2` sent: `sent` messages, after a gap notice of `missed`
/// when `told`.
struct Chunk {
    missed: u64,
    sent: usize,
    told: bool,
}

/// Takes the caller's next chunk of at most `max` messages and sends it; `Err` with the
/// answer when there was none to take (caught up and entered, removed, parked, closed).
fn replay_chunk<'a>(
    env: Env<'a>,
    dispatcher: &ResourceArc<Dispatcher>,
    topic: Binary<'a>,
    max: usize,
) -> Result<Chunk, Term<'a>> {
    let Some(history) = &dispatcher.history else {
        return Err(atoms::removed().encode(env));
    };
    let name = topic.as_slice();
    let pid = env.pid();
    let raw = pid_to_raw(&pid);
    let mut locked = lock(history);
    let chunk_bytes = locked.chunk_bytes().min(REPLAY_CHUNK_BYTES);
    let (missed, entries) = match locked.take(name, raw, max, chunk_bytes) {
        Take::Removed => return Err(removed(dispatcher).encode(env)),
        Take::Parked => return Err(atoms::parked().encode(env)),
        Take::CaughtUp { data, freed } => {
            return Err(enter(env, dispatcher, locked, name, raw, data, freed).encode(env));
        }
        Take::Chunk { missed, entries } => (missed, entries),
    };
    drop(locked);
    let (sent, told) = send_chunk(env, topic, &pid, missed, &entries);
    drop(entries);
    let given = lock(history).give_back(name, raw, sent, told);
    match given {
        Ok(freed) => drop(freed),
        Err(NotJoining) => return Err(removed(dispatcher).encode(env)),
    }
    Ok(Chunk { missed, sent, told })
}

/// What `replay/2` answers a caller that is not joining (any more): `:closed` once
/// the dispatcher is closed, else `:removed`.
fn removed(dispatcher: &Dispatcher) -> Atom {
    if dispatcher.registry.is_closed() {
        atoms::closed()
    } else {
        atoms::removed()
    }
}

/// Adds the caught-up joiner `raw` (its `data`, and what its leaving `freed`) to the
/// registry for `topic`, still under the history lock `locked`: no dispatch to
/// `topic` runs between the last message replayed and the first live one. Its
/// joiner's monitor becomes its subscription's, or is released when the registry needs
/// none (it holds one already) or refuses.
fn enter(
    env: Env<'_>,
    dispatcher: &ResourceArc<Dispatcher>,
    locked: MutexGuard<'_, History<Kept, Joining>>,
    topic: &[u8],
    raw: u64,
    data: Joining,
    freed: Evicted<Kept>,
) -> Atom {
    let mut handed = false;
    let monitor = || {
        handed = true;
        Some(data.monitor)
    };
    let answer = subscribe_in(&dispatcher.registry, topic, raw, data.direct, monitor);
    drop(locked);
    drop(freed);
    if handed {
        dispatcher.joiner_monitors.fetch_sub(1, Ordering::Relaxed);
        dispatcher
            .subscriber_monitors
            .fetch_add(1, Ordering::Relaxed);
    } else {
        release_monitor(env, dispatcher, &data.monitor, &dispatcher.joiner_monitors);
    }
    dispatcher.tell_relay(env, raw, Some(topic));
    answer
}

/// Sends the caller `pid` the gap notice of `missed` (when above 0), then `entries`
/// in order, until they run out or its timeslice is used up: `(messages sent,
/// whether the notice was)`.
fn send_chunk(
    env: Env<'_>,
    topic: Binary<'_>,
    pid: &LocalPid,
    missed: u64,
    entries: &[Arc<Entry<Kept>>],
) -> (usize, bool) {
    let raw = pid_to_raw(pid);
    let mut slice = Timeslice::new(env);
    // Timed from the start: the first decode is charged too, whatever its size.
    slice.start();
    let told = missed > 0;
    if told {
        let notice = (atoms::ex_atlas_fly_gap(), topic, missed).encode(env);
        send_from(env, raw, notice);
    }
    let scratch = Scratch::new();
    let mut sent = 0;
    for entry in entries {
        if (told || sent > 0) && slice.used_up(INLINE_SLICE) {
            break;
        }
        // Sending to itself cannot fail while it runs. A kept term the VM cannot
        // decode again (it encoded it itself: never seen) is told as a gap of one.
        if !entry.message.send(env, &scratch, pid) {
            let notice = (atoms::ex_atlas_fly_gap(), topic, 1u64).encode(env);
            send_from(env, raw, notice);
        }
        sent += 1;
    }
    slice.finish();
    (sent, told)
}

/// Keeps `message` in `topic`'s history and takes the topic's snapshot, both under
/// the history lock (see `history`); the message is encoded before, its time charged
/// to the caller's timeslice. Never waits for anyone: a subscriber catching up that
/// falls too far behind is cut (and told), not waited for.
pub(super) fn record(
    env: Env<'_>,
    dispatcher: &Dispatcher,
    history: &Mutex<History<Kept, Joining>>,
    topic: &[u8],
    message: Term<'_>,
    slice: &mut Timeslice<'_>,
) -> Result<(Snapshot, Option<Track>), ClosedError> {
    slice.start();
    let kept = Kept::of(env, message);
    let mut history = lock(history);
    let recorded = match kept {
        Some((kept, bytes)) => history.record(topic, kept, bytes),
        None => history.skip(topic),
    };
    let Ok(evicted) = recorded else {
        // Closed while this dispatch was under way.
        return Err(ClosedError);
    };
    let track = history.track(topic);
    let snapshot = dispatcher.registry.snapshot(topic);
    drop(history);
    // Freed after the lock.
    drop(evicted);
    Ok((snapshot?, track))
}
