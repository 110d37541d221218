//! The lanes' side of a dispatch: a [`Batch`] (one lane's share of one dispatch) handed
//! to the lane's sender process, delivered by it (`deliver/2`, `deliver_dirty/2`), and
//! the senders installed (`set_senders/2`), drained (`take_parked/2`) and listed
//! (`senders/1`). The hand-over's rules are `handoff`'s, the credits `fanout`'s.

use super::atoms;
use super::dispatch::granting;
use super::dispatcher::Dispatcher;
use super::skip::{gate, refused};
use super::term::{current_process_alive, pid_from_raw, pid_to_raw, send_from, Outgoing};
use super::timeslice::{send_within, Timeslice, TIMESLICE};
use crate::handoff::{Handed, Installed, Tracked};
use crate::history::Track;
use crate::registry::Part;
use crate::sync::lock;
use rustler::{Atom, Encoder, Env, LocalPid, Resource, ResourceArc, Term};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Longest a `deliver` call sends before it returns and lets the sender be preempted:
/// one timeslice, whatever the message size.
const DELIVER_SLICE: Duration = TIMESLICE;
/// Pids delivered per dirty NIF call before handing control back to the sender
/// process, so a huge topic never holds a dirty scheduler for long.
const DIRTY_SLICE: usize = 16_384;

/// One lane's share of one dispatch: a snapshot of the subscribers in that lane's
/// shard, travelling to the lane's sender process with the message. It holds one
/// credit of its lane until it is delivered. If its sender dies first, the sender's
/// monitor reclaims it (`Dispatcher::reclaim`); if it is dropped undelivered any other
/// way, its destructor does the same: what it had not delivered is counted as lost and
/// the credit goes back.
pub(super) struct Batch {
    dispatcher: ResourceArc<Dispatcher>,
    part: Part,
    lane: usize,
    /// The process that dispatched it.
    producer: u64,
    cursor: AtomicUsize,
    done: AtomicBool,
    /// Its dispatch's handle while the topic has a `:catch_up` watch: let go once the
    /// batch will send nothing more (see `history::parked`).
    track: Mutex<Option<Arc<Track>>>,
}

impl Tracked for Batch {
    fn producer(&self) -> u64 {
        self.producer
    }

    fn done(&self) -> &AtomicBool {
        &self.done
    }
}

#[rustler::resource_impl]
impl Resource for Batch {
    const IMPLEMENTS_DESTRUCTOR: bool = true;

    fn destructor(self, env: Env<'_>) {
        if !self.done.swap(true, Ordering::AcqRel) {
            self.give_back_undelivered(env);
        }
    }
}

impl Batch {
    /// For a batch that will deliver nothing more (whoever set `done` owns this
    /// step): counts the deliveries it had not made as lost and gives its credit back,
    /// to the first waiting producer if any.
    pub(super) fn give_back_undelivered(&self, env: Env<'_>) {
        self.let_go();
        let lost = self
            .part
            .len()
            .saturating_sub(self.cursor.load(Ordering::Acquire));
        let grant = granting(env, self.lane);
        self.dispatcher.lanes.give_back(self.lane, lost, grant);
    }
}

impl Batch {
    /// It will send nothing more: its dispatch no longer waits for it.
    fn let_go(&self) {
        let track = lock(&self.track).take();
        drop(track);
    }
}

/// Sends `batch` with `message` to the sender `pid` from the caller's env, so the VM
/// copies the message once and keeps its literals shared; false when `pid` is gone.
fn send_batch<'a>(env: Env<'a>, pid: u64, batch: &ResourceArc<Batch>, message: Term<'a>) -> bool {
    let deliver = (atoms::ex_atlas_deliver(), batch.clone(), message);
    send_from(env, pid, deliver.encode(env))
}

/// The `{:"$ex_atlas_deliver", batch, message}` of a batch kept for a sender that is
/// not there yet, in an env of its own (a copy that does not keep literals shared,
/// unlike a send from the caller; only while the lane has no live sender).
fn parked_message(batch: &ResourceArc<Batch>, message: Term<'_>) -> Outgoing {
    Outgoing::build(|menv| {
        (
            atoms::ex_atlas_deliver(),
            batch.clone(),
            message.in_env(menv),
        )
            .encode(menv)
    })
}

/// Hands one batch, from position `start`, to its lane's sender (or parks it until the
/// lane has a live one). The credit is taken.
pub(super) fn hand_over<'a>(
    env: Env<'a>,
    dispatcher: &ResourceArc<Dispatcher>,
    lane: usize,
    part: Part,
    start: usize,
    message: Term<'a>,
    track: Option<&Arc<Track>>,
) {
    let batch = ResourceArc::new(Batch {
        dispatcher: dispatcher.clone(),
        part,
        lane,
        producer: pid_to_raw(&env.pid()),
        cursor: AtomicUsize::new(start),
        done: AtomicBool::new(false),
        track: Mutex::new(track.cloned()),
    });
    let handed = dispatcher.senders[lane].hand(
        batch.clone(),
        |pid, batch| send_batch(env, pid, batch, message),
        |batch| parked_message(batch, message),
    );
    if handed == Handed::Lost {
        batch.give_back_undelivered(env);
    }
}

/// Marks `batch` delivered up to `next` and, when it is done, gives its credit back
/// (to the first waiting producer, if any). Returns true when done.
fn advance(env: Env<'_>, batch: &ResourceArc<Batch>, next: usize) -> bool {
    batch.cursor.store(next, Ordering::Release);
    let done = next >= batch.part.len();
    if done && !batch.done.swap(true, Ordering::AcqRel) {
        batch.let_go();
        let dispatcher = &batch.dispatcher;
        dispatcher.senders[batch.lane].finish(batch);
        dispatcher
            .lanes
            .release(batch.lane, granting(env, batch.lane));
    }
    done
}

/// Sends `message` to more pids of `batch`, for about one timeslice (1 ms) at most
/// whatever the message size, reporting the time as it goes. `:more` when some are
/// left; the sender calls again after the VM had the chance to preempt it.
#[rustler::nif]
fn deliver<'a>(env: Env<'a>, batch: ResourceArc<Batch>, message: Term<'a>) -> Atom {
    let mut slice = Timeslice::new(env);
    let start = batch.cursor.load(Ordering::Acquire);
    let gate = gate(&batch.dispatcher, &batch.part);
    let sent = send_within(
        env,
        batch.part.pids_from(start),
        message,
        &mut slice,
        DELIVER_SLICE,
        gate.as_ref(),
    );
    slice.finish();
    batch.dispatcher.activity.delivered(sent - refused(&gate));
    if advance(env, &batch, start + sent) {
        atoms::ok()
    } else {
        atoms::more()
    }
}

#[rustler::nif(schedule = "DirtyCpu")]
fn deliver_dirty<'a>(env: Env<'a>, batch: ResourceArc<Batch>, message: Term<'a>) -> Atom {
    let start = batch.cursor.load(Ordering::Acquire);
    let mut sent = 0;
    let gate = gate(&batch.dispatcher, &batch.part);
    for pid in batch.part.pids_from(start).take(DIRTY_SLICE) {
        if gate.as_ref().is_some_and(|gate| !gate.admit(env, pid)) {
            sent += 1;
            continue;
        }
        // A failed send is normally a subscriber that is gone. But a sender killed
        // while on a dirty scheduler runs on to the end of the call, and what it can
        // no longer send must not pass for delivered: stop, and its monitor counts
        // the rest as lost.
        if !send_from(env, pid, message) && !current_process_alive(env) {
            break;
        }
        sent += 1;
    }
    batch.dispatcher.activity.delivered(sent - refused(&gate));
    if advance(env, &batch, start + sent) {
        atoms::ok()
    } else {
        atoms::more()
    }
}

/// Installs one sender process per lane, replacing any earlier ones (a restarted
/// sender or server), and hands each the batches parked for its lane meanwhile.
/// Badarg unless it is a proper list of exactly one pid per lane.
#[rustler::nif]
fn set_senders(
    env: Env<'_>,
    dispatcher: ResourceArc<Dispatcher>,
    senders: Term<'_>,
) -> rustler::NifResult<Atom> {
    // rustler's list decoder panics at an improper tail; enif_get_list_length refuses
    // one with badarg instead.
    senders.list_length()?;
    let senders: Vec<LocalPid> = senders.decode()?;
    if senders.len() != dispatcher.senders.len() {
        return Err(rustler::Error::BadArg);
    }
    for (lane, (slot, pid)) in dispatcher.senders.iter().zip(&senders).enumerate() {
        let raw = pid_to_raw(pid);
        let mut monitored = lock(&dispatcher.monitored_senders);
        if !monitored.contains(&raw) && dispatcher.monitor(Some(env), pid).is_some() {
            monitored.push(raw);
        }
        drop(monitored);
        if slot.install(raw) == Installed::MustDrain {
            // Batches were parked while the lane had no sender: it pulls them
            // itself (`take_parked/2`) before anyone sends to it directly. A sender
            // already dead is replaced in turn, and told again.
            let drain = Outgoing::build(|menv| {
                (atoms::ex_atlas_drain(), dispatcher.clone(), lane).encode(menv)
            });
            let _ = drain.send(env, raw);
        }
    }
    Ok(atoms::ok())
}

/// For a lane's sender: the oldest batch parked for its lane, as the
/// `{:"$ex_atlas_deliver", batch, message}` it would have been sent, or `:done` once
/// none is left (the lane is then open to producers). Call until `:done`, delivering
/// each before taking the next.
#[rustler::nif]
fn take_parked<'a>(
    env: Env<'a>,
    dispatcher: ResourceArc<Dispatcher>,
    lane: usize,
) -> rustler::NifResult<Term<'a>> {
    let slot = dispatcher.senders.get(lane).ok_or(rustler::Error::BadArg)?;
    Ok(match slot.take_parked(pid_to_raw(&env.pid())) {
        Some((_batch, out)) => out.copy_to(env),
        None => atoms::done().encode(env),
    })
}

/// The sender of each lane, in lane order (`:undefined` before `set_senders/2`).
#[rustler::nif]
fn senders(env: Env<'_>, dispatcher: ResourceArc<Dispatcher>) -> Vec<Term<'_>> {
    dispatcher
        .senders
        .iter()
        .map(|slot| match slot.sender() {
            0 => atoms::undefined().encode(env),
            raw => pid_from_raw(raw).encode(env),
        })
        .collect()
}
