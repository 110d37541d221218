//! The timeslice of the calling process: how our NIF calls report the time they spend
//! to the VM (`enif_consume_timeslice`), so that a process calling us is preempted on
//! time, as a plain `send/2` loop would be, whatever the message size.

use super::skip::Gate;
use super::term::send_from;
use rustler::{Env, Term};
use std::time::{Duration, Instant};

/// The time our NIF calls count as one whole timeslice of the calling process: the
/// time one spends is reported to the VM as this share (`enif_consume_timeslice`), so
/// a process that called us yields once this much has passed. A plain send loop's
/// slice is 4 000 reductions, and `send/2` charges one per 64 words copied: about
/// 0.5 ms for log batches of 200 KiB on this project's 2-core machine, shorter
/// than the 1 ms often quoted for a timeslice. We yield no later than such a loop.
pub(super) const TIMESLICE: Duration = Duration::from_micros(500);

/// The share of the calling process's timeslice spent so far, told to the VM as it
/// grows, so that the process is preempted on time like any send loop.
///
/// `enif_send` itself charges the caller one reduction per 64 words copied, as
/// `send/2` does, so a big message uses up the timeslice by its size alone; what it
/// does not charge is time, which is what bounds many small sends. The clock (about
/// 25 ns a reading) is therefore started only before a call's second send: the first
/// send is accounted by `enif_send`, and a call that sends once (most small
/// dispatches) never reads the clock.
pub(super) struct Timeslice<'a> {
    env: Env<'a>,
    started: Option<Instant>,
    /// Time from `started` to the last reading.
    elapsed: Duration,
    reported: i32,
    /// Sends so far in this call, over every `send_within` of it.
    sent: usize,
    /// The send before which `send_within` reads the clock next.
    next_look: usize,
    /// `sent` and `elapsed` at the last reading.
    last: (usize, Duration),
}

impl<'a> Timeslice<'a> {
    pub(super) fn new(env: Env<'a>) -> Self {
        Timeslice {
            env,
            started: None,
            elapsed: Duration::ZERO,
            reported: 0,
            sent: 0,
            next_look: 1,
            last: (0, Duration::ZERO),
        }
    }

    /// Starts the clock now, so that work before the first send (a replay's copy of
    /// the message, whatever its size) is charged too.
    pub(super) fn start(&mut self) {
        if self.started.is_none() {
            self.started = Some(Instant::now());
            self.reported = 1;
            rustler::schedule::consume_timeslice(self.env, 1);
        }
    }

    /// True when the caller should stop: the timeslice is used up or `budget` has
    /// passed. The first check starts the clock, reports 1% and learns from the VM
    /// whether what was sent so far already used the timeslice up.
    pub(super) fn used_up(&mut self, budget: Duration) -> bool {
        let Some(started) = self.started else {
            self.started = Some(Instant::now());
            self.reported = 1;
            return rustler::schedule::consume_timeslice(self.env, 1);
        };
        self.elapsed = started.elapsed();
        let percent = (self.elapsed.as_micros() * 100 / TIMESLICE.as_micros()).min(100) as i32;
        let exhausted = percent > self.reported
            && rustler::schedule::consume_timeslice(self.env, percent - self.reported);
        self.reported = self.reported.max(percent);
        exhausted || self.elapsed >= budget
    }

    /// Reports the time spent since the last report, and at least 1% in all, so even
    /// a tiny call is accounted for.
    pub(super) fn finish(mut self) {
        if self.started.is_some() {
            self.used_up(Duration::MAX);
        }
        if self.reported == 0 {
            rustler::schedule::consume_timeslice(self.env, 1);
        }
    }
}

/// Sends `message` to `pids` in order from the calling process's env until they run
/// out or `slice` says to stop; returns how many were sent. `slice` is asked before
/// every send of the NIF call but its first: at once before the second, then once
/// about 20 us worth of sends have passed, judged by the sends since the last reading
/// (so a slowdown within the call, such as copies into fresh memory, is seen at
/// once), and at least every 16 sends. The count runs over the whole call, so a
/// small dispatch split over two lanes reads the clock no more often than one on a
/// single lane. Never after the call's last send, which `Timeslice::finish` accounts
/// for. `gate` (while some subscription is skipped) says which sends to skip.
pub(super) fn send_within(
    env: Env<'_>,
    pids: impl Iterator<Item = u64>,
    message: Term<'_>,
    slice: &mut Timeslice<'_>,
    budget: Duration,
    gate: Option<&Gate<'_>>,
) -> usize {
    let mut sent_here = 0;
    for pid in pids {
        if slice.sent == slice.next_look {
            let first = slice.started.is_none();
            if slice.used_up(budget) {
                break;
            }
            slice.next_look = if first {
                // Nothing measured yet: time the next send alone.
                slice.sent + 1
            } else {
                let (sent_then, elapsed_then) = slice.last;
                let per_send = (slice.elapsed - elapsed_then).as_nanos() as usize
                    / (slice.sent - sent_then)
                    + 1;
                slice.sent + (20_000 / per_send).clamp(1, 16)
            };
            slice.last = (slice.sent, slice.elapsed);
        }
        // A dead receiver is not an error: its monitor removes it shortly.
        if gate.is_none_or(|gate| gate.admit(env, pid)) {
            let _ = send_from(env, pid, message);
        }
        slice.sent += 1;
        sent_here += 1;
    }
    sent_here
}
