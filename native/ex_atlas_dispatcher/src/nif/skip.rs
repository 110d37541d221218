//! `on_slow: :skip`: the watchdog's calls that set and clear a subscription's skipping
//! (`skip_start/3`, `skip_stop/3`, `skip_clear/3`, `skip_stats/1`), and the [`Gate`]
//! the send loops ask before each send while some subscription is skipped. The state
//! and its rules are `crate::skip`'s.

use super::atoms;
use super::dispatcher::Dispatcher;
use super::term::{binary_term, pid_to_raw, send_from};
use crate::registry::{topic_key, Part};
use crate::skip::{Admit, Skips};
use rustler::{Atom, Binary, Encoder, Env, LocalPid, ResourceArc};
use std::cell::Cell;

/// The skip table as one send loop of one part sees it.
pub(super) struct Gate<'a> {
    skips: &'a Skips,
    topic: u64,
    serial: u64,
    /// Sends this gate refused, so that `deliveries` in `stats/0` counts only real sends.
    refused: Cell<usize>,
}

/// The gate for sending `part`, or `None` (the fast path: one atomic load while no
/// subscription is skipped or owes a notice, two while none of `part`'s topic's bucket
/// is).
#[inline]
pub(super) fn gate<'a>(dispatcher: &'a Dispatcher, part: &Part) -> Option<Gate<'a>> {
    dispatcher.skips.any_for(part.topic()).then(|| Gate {
        skips: &dispatcher.skips,
        topic: part.topic(),
        serial: part.serial(),
        refused: Cell::new(0),
    })
}

/// The sends `gate` refused so far (0 on the fast path).
#[inline]
pub(super) fn refused(gate: &Option<Gate<'_>>) -> usize {
    gate.as_ref().map_or(0, |gate| gate.refused.get())
}

impl Gate<'_> {
    /// True when the caller should send to `pid`. False when the send is skipped (and
    /// counted). When `pid` owes a gap notice, the notice is sent first, from the
    /// caller's env, so it arrives before the message the caller sends next.
    pub(super) fn admit(&self, env: Env<'_>, pid: u64) -> bool {
        let admitted = self
            .skips
            .admit(self.topic, self.serial, pid, |topic, missed| {
                let notice = (atoms::ex_atlas_fly_gap(), binary_term(env, topic), missed);
                let _ = send_from(env, pid, notice.encode(env));
            });
        let send = admitted == Admit::Send;
        if !send {
            self.refused.set(self.refused.get() + 1);
        }
        send
    }
}

/// Starts skipping `pid`'s dispatches on `topic` (idempotent).
#[rustler::nif]
fn skip_start(dispatcher: ResourceArc<Dispatcher>, topic: Binary<'_>, pid: LocalPid) -> Atom {
    let name = topic.as_slice();
    dispatcher
        .skips
        .start(name, topic_key(name), pid_to_raw(&pid));
    atoms::ok()
}

/// Stops skipping `pid` on `topic`; returns the dispatches skipped in the episode, which
/// the next send to `pid` on `topic` announces with `{:ex_atlas_fly_gap, topic, n}`.
#[rustler::nif]
fn skip_stop(dispatcher: ResourceArc<Dispatcher>, topic: Binary<'_>, pid: LocalPid) -> u64 {
    dispatcher
        .skips
        .stop(topic_key(topic.as_slice()), pid_to_raw(&pid))
}

/// Forgets `pid` on `topic` (unsubscribed or dead), owed notice included.
#[rustler::nif]
fn skip_clear(dispatcher: ResourceArc<Dispatcher>, topic: Binary<'_>, pid: LocalPid) -> Atom {
    dispatcher
        .skips
        .clear(topic_key(topic.as_slice()), pid_to_raw(&pid));
    atoms::ok()
}

/// `{skipping_now, skipped_in_all, entries}`: entries include those owing a notice.
#[rustler::nif]
fn skip_stats(dispatcher: ResourceArc<Dispatcher>) -> (usize, u64, usize) {
    let stats = dispatcher.skips.stats();
    (stats.skipping, stats.skipped, stats.entries)
}
