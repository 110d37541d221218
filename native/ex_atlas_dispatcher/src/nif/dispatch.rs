//! A producer's side of a dispatch: `dispatch/3`, the host's `dispatch/2` to the
//! published dispatcher (registered by hand), and `resume/2` for what is left of a
//! dispatch that met a full lane or ran out of time ([`Pending`]). Which process sends
//! which part is `route`'s; the credits are `fanout`'s; the hand-over to a lane's
//! sender is in `lanes`.

use super::atoms;
use super::dispatcher::Dispatcher;
use super::lanes::hand_over;
use super::replay::record;
use super::skip::{gate, refused};
use super::term::{decode_or_undefined, pid_to_raw, Outgoing};
use super::timeslice::{send_within, Timeslice, TIMESLICE};
use crate::fanout::{Refused, Reservation};
use crate::history::Track;
use crate::route::{self, Work};
use crate::sync::lock;
use rustler::{Atom, Binary, Encoder, Env, Resource, ResourceArc, Term};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// A dispatch to at most this many subscriptions in the lanes is sent by the caller
/// itself, to each lane where the caller has nothing of its own still on its way.
const INLINE_DISPATCH: usize = 16;
/// Longest one NIF call of the caller sends inline before it returns `{:more, _}`
/// and lets the VM preempt it (see `Timeslice`).
pub(super) const INLINE_SLICE: Duration = TIMESLICE;

/// A producer process waiting for room in a full lane, with the rest of its dispatch.
pub(super) struct Waiter {
    pid: u64,
    pending: ResourceArc<Pending>,
}

/// What is left of one dispatch that met a full lane or ran out of time: the parts
/// still to hand over, in lane order, and the parts the caller sends itself, each
/// with its first position not done. Only its producer touches `work`; a credit
/// granted to it is owned here until used, so a producer killed while waiting gives
/// it back through the destructor.
pub(super) struct Pending {
    dispatcher: ResourceArc<Dispatcher>,
    work: Mutex<Work>,
    /// 1 + the lane of a credit granted and not used yet; 0 when none.
    granted: AtomicUsize,
    /// The dispatch's handle while its topic has a `:catch_up` watch, let go once the
    /// caller has handed over and sent everything (see `history::parked`).
    track: Mutex<Option<Arc<Track>>>,
}

/// How far a dispatch got.
enum Progress {
    /// Everything handed over or sent.
    Done,
    /// A lane had no credit to take (`dispatch`: it is full; `resume`: the caller
    /// was queued for the next one).
    NoRoom,
    /// Out of time with inline sends left: the caller yields, then resumes.
    OutOfTime,
    /// The dispatcher is closed.
    Closed,
}

#[rustler::resource_impl]
impl Resource for Pending {
    const IMPLEMENTS_DESTRUCTOR: bool = true;

    fn destructor(self, env: Env<'_>) {
        let granted = self.granted.swap(0, Ordering::AcqRel);
        if let Some(lane) = granted.checked_sub(1) {
            self.dispatcher
                .lanes
                .give_back(lane, 0, granting(env, lane));
        }
    }
}

/// `{:"$ex_atlas_room", pending}` to the producer waiting with `pending`.
pub(super) fn wake(env: Env<'_>, waiter: &Waiter) -> bool {
    Outgoing::build(|menv| (atoms::ex_atlas_room(), waiter.pending.clone()).encode(menv))
        .send(env, waiter.pid)
        .is_ok()
}

/// How a credit of `lane` reaches a waiting producer: the credit is recorded in its
/// `Pending` and the producer is woken. False when the producer is dead; the lanes
/// then offer the credit to the next waiter.
pub(super) fn granting(env: Env<'_>, lane: usize) -> impl FnMut(&Waiter) -> bool + '_ {
    move |waiter| {
        waiter.pending.granted.store(lane + 1, Ordering::Release);
        let woken = wake(env, waiter);
        if !woken {
            waiter.pending.granted.store(0, Ordering::Release);
        }
        woken
    }
}

/// The dispatcher of the running registry, set by its server (`publish/1`). It
/// outlives the server, as the server's restart adopts it, and `dispatch/2` reaches
/// it without a lookup in Elixir: for a small topic, that lookup and the decoding of
/// a resource argument are a fair share of the whole call.
static PUBLISHED: RwLock<Option<ResourceArc<Dispatcher>>> = RwLock::new(None);

fn published_dispatcher() -> Option<ResourceArc<Dispatcher>> {
    // Held only to clone or replace one handle, so it never waits for long; a
    // poisoned lock still holds a valid `Option`.
    PUBLISHED
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
}

/// Publishes `dispatcher` (`:undefined`: none) for `dispatch/2`.
#[rustler::nif]
fn publish(dispatcher: Term<'_>) -> rustler::NifResult<Atom> {
    set_published(decode_or_undefined(dispatcher)?);
    Ok(atoms::ok())
}

/// Publishes nothing: `dispatch/2` answers `:closed` until the next `publish/1`.
pub(crate) fn unpublish() {
    set_published(None);
}

fn set_published(dispatcher: Option<ResourceArc<Dispatcher>>) {
    let old = std::mem::replace(
        &mut *PUBLISHED
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
        dispatcher,
    );
    // Released after the lock: the last handle's destructor does real work.
    drop(old);
}

/// `dispatch/3` to the published dispatcher; `:closed` when none is published.
fn dispatch_published<'a>(env: Env<'a>, topic: Binary<'a>, message: Term<'a>) -> Term<'a> {
    match published_dispatcher() {
        Some(dispatcher) => dispatch_to(env, &dispatcher, topic.as_slice(), message),
        None => atoms::closed().encode(env),
    }
}

// `dispatch/2`, the host's hot path, registered by hand: rustler's generated wrapper
// first collects the arguments into a `Vec`, an allocation and a free on every call
// that cost a small topic's dispatch about a tenth of its time. Otherwise it does
// what that wrapper does: badarg on an argument of the wrong type, a panic contained
// and raised as `nif_panicked`.
rustler::codegen_runtime::inventory::submit!(rustler::Nif {
    name: c"dispatch".as_ptr(),
    arity: 2,
    flags: 0,
    raw_func: dispatch_published_raw,
});

unsafe extern "C" fn dispatch_published_raw(
    env: *mut rustler::sys::ErlNifEnv,
    argc: std::ffi::c_int,
    argv: *const rustler::sys::ErlNifTerm,
) -> rustler::sys::ErlNifTerm {
    let lifetime = ();
    // SAFETY: the VM calls this with the calling process's env, valid for this call,
    // and `argc` (2, the registered arity) terms of that env in `argv`.
    let (env, args) = unsafe {
        (
            Env::new(&lifetime, env),
            std::slice::from_raw_parts(argv, argc as usize),
        )
    };
    let result = catch_unwind(AssertUnwindSafe(|| {
        let [topic, message] = args else {
            return None;
        };
        // SAFETY: both are terms of `env` (see above).
        let (topic, message) = unsafe { (Term::new(env, *topic), Term::new(env, *message)) };
        let topic: Binary<'_> = topic.decode().ok()?;
        Some(dispatch_published(env, topic, message).as_c_arg())
    }));
    // SAFETY: `env` is the calling process's env, as both functions require.
    unsafe {
        match result {
            Ok(Some(term)) => term,
            Ok(None) => rustler::sys::enif_make_badarg(env.as_c_arg()),
            Err(_) => {
                rustler::sys::enif_raise_exception(env.as_c_arg(), atoms::nif_panicked().as_c_arg())
            }
        }
    }
}

/// Hands each lane its share of the topic's subscribers with `message`. Returns `:ok`,
/// `:closed`, or `{:full, pending}` when a lane is full: the caller then calls
/// `resume/2` with `pending` until it answers `:ok`, waiting for
/// `{:"$ex_atlas_room", pending}` after each `:wait`.
#[rustler::nif]
fn dispatch<'a>(
    env: Env<'a>,
    dispatcher: ResourceArc<Dispatcher>,
    topic: Binary<'a>,
    message: Term<'a>,
) -> Term<'a> {
    dispatch_to(env, &dispatcher, topic.as_slice(), message)
}

/// Dispatches `message` to `topic`'s subscribers, split by `route::route` (which
/// process sends which part, and why) into the parts the caller sends itself and the
/// batches handed to the lanes' senders.
///
/// What the caller sends itself, it always finishes itself: when its time is up it
/// gets `{:more, pending}`, yields, and goes on with `resume/2`. Nothing sent inline
/// is ever passed to a sender half-way.
fn dispatch_to<'a>(
    env: Env<'a>,
    dispatcher: &ResourceArc<Dispatcher>,
    topic: &[u8],
    message: Term<'a>,
) -> Term<'a> {
    let mut slice = Timeslice::new(env);
    let recorded = match &dispatcher.history {
        None => dispatcher.registry.snapshot(topic).map(|s| (s, None)),
        Some(history) => record(env, dispatcher, history, topic, message, &mut slice),
    };
    let Ok((snapshot, track)) = recorded else {
        return atoms::closed().encode(env);
    };
    let track = track.map(Arc::new);
    dispatcher.activity.dispatched();
    let mut producer = None;
    let mut work = route::route(
        snapshot,
        dispatcher.registry.direct(),
        INLINE_DISPATCH,
        |lane| {
            let producer = *producer.get_or_insert_with(|| pid_to_raw(&env.pid()));
            dispatcher.clear_for(lane, producer)
        },
    );
    let progress = proceed(
        env,
        dispatcher,
        &mut work,
        message,
        track.as_ref(),
        &mut slice,
        |lane| match dispatcher.lanes.try_reserve(lane) {
            Ok(()) => Ok(true),
            Err(Refused::Full) => Ok(false),
            Err(Refused::Closed) => Err(()),
        },
    );
    slice.finish();
    let tag = match progress {
        Progress::Done => return delivered(dispatcher).encode(env),
        Progress::Closed => return atoms::closed().encode(env),
        Progress::NoRoom => atoms::full(),
        Progress::OutOfTime => atoms::more(),
    };
    let pending = ResourceArc::new(Pending {
        dispatcher: dispatcher.clone(),
        work: Mutex::new(work),
        granted: AtomicUsize::new(0),
        track: Mutex::new(track),
    });
    (tag, pending).encode(env)
}

/// Hands over, then sends, what is left in `work`. `reserve(lane)` takes a credit of
/// `lane`: `Ok(true)` taken, `Ok(false)` not now (full, or the caller was queued),
/// `Err` closed.
fn proceed<'a>(
    env: Env<'a>,
    dispatcher: &ResourceArc<Dispatcher>,
    work: &mut Work,
    message: Term<'a>,
    track: Option<&Arc<Track>>,
    slice: &mut Timeslice<'a>,
    mut reserve: impl FnMut(usize) -> Result<bool, ()>,
) -> Progress {
    // Hand-overs first: each is quick, and its sender starts at once.
    while let Some(&(lane, _, _)) = work.hand_over.first() {
        match reserve(lane) {
            Ok(true) => {}
            Ok(false) => return Progress::NoRoom,
            Err(()) => return Progress::Closed,
        }
        // At most one entry per lane: the shift is a few words.
        let (lane, part, start) = work.hand_over.remove(0);
        hand_over(env, dispatcher, lane, part, start, message, track);
    }
    while let Some((part, start)) = work.inline.first_mut() {
        let gate = gate(dispatcher, part);
        let sent = send_within(
            env,
            part.pids_from(*start),
            message,
            slice,
            INLINE_SLICE,
            gate.as_ref(),
        );
        dispatcher.activity.delivered(sent - refused(&gate));
        *start += sent;
        if *start < part.len() {
            return Progress::OutOfTime;
        }
        work.inline.remove(0);
    }
    Progress::Done
}

/// What `dispatch` answers once everything is handed over or sent: `:forward` in
/// cluster mode (a relay is set), so the caller forwards to the other nodes without
/// a lookup of its own, else `:ok`.
fn delivered(dispatcher: &Dispatcher) -> Atom {
    if dispatcher.relay.load(Ordering::Relaxed) == 0 {
        atoms::ok()
    } else {
        atoms::forward()
    }
}

/// Goes on with what is left of a dispatch (`{:full, pending}` or `{:more, pending}`):
/// hands over the rest in lane order, the credit granted to it first, then sends
/// what the caller sends itself. Never waits: `:wait` means the caller was queued for
/// the next free credit of a full lane and will get `{:"$ex_atlas_room", pending}`;
/// `:more` that its time is up and it should call again; `:closed` that the
/// dispatcher was closed; `:ok` that all is done.
#[rustler::nif]
fn resume<'a>(env: Env<'a>, pending: ResourceArc<Pending>, message: Term<'a>) -> Atom {
    let dispatcher = &pending.dispatcher;
    let mut slice = Timeslice::new(env);
    let mut work = lock(&pending.work);
    let track = lock(&pending.track).clone();
    let progress = proceed(
        env,
        dispatcher,
        &mut work,
        message,
        track.as_ref(),
        &mut slice,
        |lane| {
            let granted = pending
                .granted
                .compare_exchange(lane + 1, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
            if granted {
                return Ok(true);
            }
            let waiter = Waiter {
                pid: pid_to_raw(&env.pid()),
                pending: pending.clone(),
            };
            match dispatcher
                .lanes
                .reserve_or_queue(lane, waiter, granting(env, lane))
            {
                Ok(Reservation::Taken) => Ok(true),
                Ok(Reservation::Queued) => Ok(false),
                Err(_) => Err(()),
            }
        },
    );
    drop(work);
    slice.finish();
    if matches!(progress, Progress::Done | Progress::Closed) {
        // Nothing more will be sent for it: let go now, not when the caller's heap
        // drops `pending`.
        let released = lock(&pending.track).take();
        drop((track, released));
    }
    match progress {
        Progress::Done => atoms::ok(),
        Progress::NoRoom => atoms::wait(),
        Progress::OutOfTime => atoms::more(),
        Progress::Closed => atoms::closed(),
    }
}
