//! NIF glue for `ExAtlas.Fly.Dispatcher.Native`: decodes terms, calls the plain-Rust core
//! (`registry`, `fanout`) and encodes results. No registry or queue logic lives here.

// Every unsafe operation is marked as such, with its SAFETY comment, even inside an
// `unsafe fn`.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod etf;
pub mod fanout;
pub mod handoff;
pub mod history;
#[cfg(not(test))]
mod kept;
#[cfg(all(test, loom))]
mod loom_tests;
pub mod memory;
pub mod registry;
pub mod route;
#[cfg(all(test, not(loom)))]
mod stress_tests;
pub mod sync;

#[cfg(feature = "alloc-stats")]
#[global_allocator]
static ALLOCATOR: memory::CountingAllocator = memory::CountingAllocator;

// The glue references `enif_*` symbols that only the VM provides, so a test binary could
// not link it; `cargo test` covers the core modules above without a VM.
#[cfg(not(test))]
mod nif {
    use crate::history::{History, JoinRefused, Take};
    use crate::kept::{Kept, Scratch};
    use crate::sync::lock;
    use crate::{fanout, handoff, memory, registry, route};

    use fanout::{Lanes, Refused, Reservation};
    use handoff::{Handed, Handoff, Installed, Tracked};
    use registry::{ClosedError, Part, Sharded, SubscribeError};
    use route::Work;
    use rustler::sys::ErlNifPid;
    use rustler::types::binary::NewBinary;
    use rustler::{Atom, Binary, Encoder, Env, LocalPid, Monitor, Resource, ResourceArc, Term};
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    use std::sync::{Mutex, RwLock};
    use std::time::{Duration, Instant};

    /// The time our NIF calls count as one whole timeslice of the calling process: the
    /// time one spends is reported to the VM as this share (`enif_consume_timeslice`), so
    /// a process that called us yields once this much has passed. A plain send loop's
    /// slice is 4 000 reductions, and `send/2` charges one per 64 words copied: about
    /// 0.5 ms for log batches of 200 KiB on this project's 2-core machine, shorter
    /// than the 1 ms often quoted for a timeslice. We yield no later than such a loop.
    const TIMESLICE: Duration = Duration::from_micros(500);
    /// Longest a `deliver` call sends before it returns and lets the sender be preempted:
    /// one timeslice, whatever the message size.
    const DELIVER_SLICE: Duration = TIMESLICE;
    /// A dispatch to at most this many subscriptions in the lanes is sent by the caller
    /// itself, to each lane where the caller has nothing of its own still on its way.
    const INLINE_DISPATCH: usize = 16;
    /// Longest one NIF call of the caller sends inline before it returns `{:more, _}`
    /// and lets the VM preempt it (see `Timeslice`).
    const INLINE_SLICE: Duration = TIMESLICE;
    /// Pids delivered per dirty NIF call before handing control back to the sender
    /// process, so a huge topic never holds a dirty scheduler for long.
    const DIRTY_SLICE: usize = 16_384;
    /// Most messages one `replay/2` call takes from the caller's history, and most bytes
    /// past the first message (less with a small `replay_memory`, see
    /// `History::chunk_bytes`): what it does not send in its timeslice it sends next call.
    const REPLAY_CHUNK: usize = 64;
    const REPLAY_CHUNK_BYTES: usize = 1 << 20;
    /// Most lanes `new/2` accepts, as `config :ex_atlas, :fly, lanes:` does.
    /// Checked here too: a huge count made the allocation abort the whole VM.
    const MAX_LANES: usize = 1_024;

    mod atoms {
        rustler::atoms! {
            ok,
            forward,
            full,
            wait,
            closed,
            more,
            not_alive,
            too_many_topics,
            undefined,
            nif_panicked,
            topics,
            subscriptions,
            subscribers,
            monitors,
            lanes,
            queue_capacity,
            in_flight,
            max_in_flight,
            peak_in_flight,
            delivered_batches,
            waiting,
            lost_batches,
            lost_deliveries,
            allocated_bytes,
            ex_atlas_deliver = "$ex_atlas_deliver",
            ex_atlas_drain = "$ex_atlas_drain",
            done,
            ex_atlas_room = "$ex_atlas_room",
            ex_atlas_interest = "$ex_atlas_interest",
            plain,
            removed,
            gap,
            ex_atlas_fly_gap,
            replay_messages,
            replay_bytes,
            replay_joiners,
            replay_retained_bytes,
            replay_cuts,
            replay_missed,
            replay_monitors,
        }
    }

    /// One dispatcher: the registry (one shard per lane), the bounds of its fan-out lanes
    /// and the lanes' sender processes. Held by the Elixir side as a resource; process
    /// monitors belong to it, so subscriptions outlive any one process of ours.
    pub struct Dispatcher {
        registry: Sharded<Monitor>,
        lanes: Lanes<Waiter>,
        /// Each lane's sender process and its batches on their way; see `handoff`.
        senders: Box<[Handoff<ResourceArc<Batch>, Outgoing>]>,
        /// Process monitors of subscriptions currently set, counted where they are set
        /// and undone; those of joiners apart (`replay_monitors`).
        monitors: AtomicUsize,
        joiner_monitors: AtomicUsize,
        /// Raw pid of the cluster relay told about topics this node gains or loses; 0
        /// when not in cluster mode.
        relay: AtomicU64,
        /// The senders this resource monitors (a `down` for one of them reclaims its
        /// batches; any other `down` is a subscriber's).
        sender_monitors: Mutex<Vec<u64>>,
        /// Replay: each topic's most recent dispatches and the subscribers catching up
        /// on them (see `history`); `None` when no message is kept (`replay: 0`), and
        /// then a dispatch takes no lock of it at all.
        history: Option<Mutex<History<Kept, Joining>>>,
    }

    /// What a subscriber catching up on a topic's history carries until it enters the
    /// registry: the monitor that removes it if it dies meanwhile (handed to the
    /// registry or released then), and whether it goes to the direct partition.
    struct Joining {
        monitor: Monitor,
        direct: bool,
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
        fn clear_for(&self, lane: usize, producer: u64) -> bool {
            self.lanes.is_idle(lane) || self.senders[lane].clear_for(producer)
        }

        /// Tells the relay (cluster mode) about each topic that `pid`'s last change (to
        /// `topic`, or to all its topics for `None`) created or emptied in its shard, with
        /// `{:"$ex_atlas_interest", topic}`: a hint, which the relay checks against
        /// `count/2`, so hints from several processes may arrive in any order.
        fn tell_relay(&self, env: Env<'_>, pid: u64, topic: Option<&[u8]>) {
            let relay = self.relay.load(Ordering::Acquire);
            if relay == 0 {
                return;
            }
            for topic in self.registry.take_changed(pid, topic) {
                let hint = Outgoing::build(|menv| {
                    (atoms::ex_atlas_interest(), binary_term(menv, &topic)).encode(menv)
                });
                // A dead relay is being restarted; the new one reads every topic.
                let _ = hint.send(env, relay);
            }
        }
    }

    /// A producer process waiting for room in a full lane, with the rest of its dispatch.
    struct Waiter {
        pid: u64,
        pending: ResourceArc<Pending>,
    }

    #[rustler::resource_impl]
    impl Resource for Dispatcher {
        const IMPLEMENTS_DOWN: bool = true;

        fn down<'a>(&'a self, env: Env<'a>, pid: LocalPid, monitor: Monitor) {
            // rustler catches panics here too, but do not rely on the version for that.
            let _ = catch_unwind(AssertUnwindSafe(|| {
                let raw = pid_to_raw(&pid);
                let mut senders = lock(&self.sender_monitors);
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
                if let Some(history) = &self.history {
                    let (left, freed) = lock(history).leave(raw);
                    joiner = left.iter().any(|j| j.monitor == monitor);
                    drop((left, freed));
                }
                let counter = if joiner {
                    &self.joiner_monitors
                } else {
                    &self.monitors
                };
                counter.fetch_sub(1, Ordering::Relaxed);
                self.registry.remove_subscriber(raw);
                self.tell_relay(env, raw, None);
            }));
        }
    }

    /// One lane's share of one dispatch: a snapshot of the subscribers in that lane's
    /// shard, travelling to the lane's sender process with the message. It holds one
    /// credit of its lane until it is delivered. If its sender dies first, the sender's
    /// monitor reclaims it (`Dispatcher::reclaim`); if it is dropped undelivered any other
    /// way, its destructor does the same: what it had not delivered is counted as lost and
    /// the credit goes back.
    pub struct Batch {
        dispatcher: ResourceArc<Dispatcher>,
        part: Part,
        lane: usize,
        /// The process that dispatched it.
        producer: u64,
        cursor: AtomicUsize,
        done: AtomicBool,
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
        fn give_back_undelivered(&self, env: Env<'_>) {
            let lost = self
                .part
                .len()
                .saturating_sub(self.cursor.load(Ordering::Acquire));
            let grant = granting(env, self.lane);
            self.dispatcher.lanes.give_back(self.lane, lost, grant);
        }
    }

    /// What is left of one dispatch that met a full lane or ran out of time: the parts
    /// still to hand over, in lane order, and the parts the caller sends itself, each
    /// with its first position not done. Only its producer touches `work`; a credit
    /// granted to it is owned here until used, so a producer killed while waiting gives
    /// it back through the destructor.
    pub struct Pending {
        dispatcher: ResourceArc<Dispatcher>,
        work: Mutex<Work>,
        /// 1 + the lane of a credit granted and not used yet; 0 when none.
        granted: AtomicUsize,
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

    fn pid_to_raw(pid: &LocalPid) -> u64 {
        // SAFETY: `ErlNifPid` is `#[repr(C)]` around a single `ERL_NIF_TERM` (a u64), so
        // the two have the same size and layout and every bit pattern of either is valid.
        unsafe { std::mem::transmute::<ErlNifPid, u64>(*pid.as_c_arg()) }
    }

    /// Sends `message` from the calling process's env to the local pid `raw`, as
    /// `enif_send` does; `false` when the receiver is gone. Rustler's `Env::send` would ask
    /// the VM which kind of thread this is on every send (a thread-local read), which is
    /// a measurable share of a small dispatch.
    fn send_from(env: Env<'_>, raw: u64, message: Term<'_>) -> bool {
        let pid = pid_from_raw(raw);
        // SAFETY: callers run inside a NIF called by a process (on a normal or a dirty
        // scheduler), so `env` is that process's env, valid for this call, as
        // `enif_send` requires of a non-NULL env; `message` is a term of `env`, and a NULL
        // message env makes the VM copy it; `pid` is a local pid (see `pid_from_raw`).
        unsafe {
            rustler::sys::enif_send(
                env.as_c_arg(),
                pid.as_c_arg(),
                std::ptr::null_mut(),
                message.as_c_arg(),
            ) != 0
        }
    }

    /// Whether the calling process is still alive (it may have been killed during a
    /// dirty NIF call, which runs on regardless).
    fn current_process_alive(env: Env<'_>) -> bool {
        // SAFETY: `env` is the calling process's env, valid for this call.
        unsafe { rustler::sys::enif_is_current_process_alive(env.as_c_arg()) != 0 }
    }

    fn pid_from_raw(raw: u64) -> LocalPid {
        // SAFETY: see `pid_to_raw`; `raw` always comes from `pid_to_raw` of a local pid,
        // an immediate term that stays valid for the life of the VM.
        LocalPid::from_c_arg(unsafe { std::mem::transmute::<u64, ErlNifPid>(raw) })
    }

    /// A topic name as a binary term of `env`.
    fn binary_term<'a>(env: Env<'a>, bytes: &[u8]) -> Term<'a> {
        let mut binary = NewBinary::new(env, bytes.len());
        binary.as_mut_slice().copy_from_slice(bytes);
        Term::from(binary)
    }

    /// A message built in an environment of its own, which a send moves to the receiver
    /// whole. Every message that carries a resource of ours goes this way: a message
    /// built in the caller's environment stays on the caller's heap until its next
    /// garbage collection, and an idle sender or a waiting producer may not collect for a
    /// long time, keeping a dead process's `Batch` or `Pending` alive, and its lane
    /// credit with it. Dropping an unsent one frees its terms.
    struct Outgoing {
        env: *mut rustler::sys::ErlNifEnv,
        term: rustler::sys::ErlNifTerm,
    }

    // SAFETY: a process-independent environment is not tied to a thread; an `Outgoing` is
    // only ever used by whoever holds it (under the parking lock when parked).
    unsafe impl Send for Outgoing {}

    impl Outgoing {
        fn build(build: impl for<'m> FnOnce(Env<'m>) -> Term<'m>) -> Self {
            // SAFETY: the environment is allocated here and owned by the `Outgoing` (freed
            // in `drop`); the `Env` made on it does not escape `build`, and the term is
            // made in it, as enif_send requires of a message environment.
            unsafe {
                let env = rustler::sys::enif_alloc_env();
                let marker = ();
                let term = build(Env::new(&marker, env)).as_c_arg();
                Outgoing { env, term }
            }
        }

        /// Sends it to `pid`; gives it back unsent when `pid` is not alive.
        fn send(self, caller: Env<'_>, pid: u64) -> Result<(), Outgoing> {
            // Callbacks (destructors) may run off the scheduler threads; enif_send then
            // takes no caller environment.
            let caller = if rustler::thread::is_scheduler_thread() {
                caller.as_c_arg()
            } else {
                std::ptr::null_mut()
            };
            let pid = pid_from_raw(pid);
            // SAFETY: `self.term` lives in `self.env`, a process-independent environment.
            // A successful send empties the environment, and `drop` then frees it; a
            // failed one leaves both valid, and we keep them.
            let sent = unsafe {
                rustler::sys::enif_send(caller, pid.as_c_arg(), self.env, self.term) != 0
            };
            if sent {
                Ok(())
            } else {
                Err(self)
            }
        }
    }

    impl Drop for Outgoing {
        fn drop(&mut self) {
            // SAFETY: allocated in `build`, freed exactly once here.
            unsafe { rustler::sys::enif_free_env(self.env) }
        }
    }

    /// Sends `batch` with `message` to the sender `pid` from the caller's env, so the VM
    /// copies the message once and keeps its literals shared; false when `pid` is gone.
    fn send_batch<'a>(
        env: Env<'a>,
        pid: u64,
        batch: &ResourceArc<Batch>,
        message: Term<'a>,
    ) -> bool {
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

    /// `{:"$ex_atlas_room", pending}` to the producer waiting with `pending`.
    fn wake(env: Env<'_>, waiter: &Waiter) -> bool {
        Outgoing::build(|menv| (atoms::ex_atlas_room(), waiter.pending.clone()).encode(menv))
            .send(env, waiter.pid)
            .is_ok()
    }

    /// How a credit of `lane` reaches a waiting producer: the credit is recorded in its
    /// `Pending` and the producer is woken. False when the producer is dead; the lanes
    /// then offer the credit to the next waiter.
    fn granting(env: Env<'_>, lane: usize) -> impl FnMut(&Waiter) -> bool + '_ {
        move |waiter| {
            waiter.pending.granted.store(lane + 1, Ordering::Release);
            let woken = wake(env, waiter);
            if !woken {
                waiter.pending.granted.store(0, Ordering::Release);
            }
            woken
        }
    }

    /// Hands one batch, from position `start`, to its lane's sender (or parks it until the
    /// lane has a live one). The credit is taken.
    fn hand_over<'a>(
        env: Env<'a>,
        dispatcher: &ResourceArc<Dispatcher>,
        lane: usize,
        part: Part,
        start: usize,
        message: Term<'a>,
    ) {
        let batch = ResourceArc::new(Batch {
            dispatcher: dispatcher.clone(),
            part,
            lane,
            producer: pid_to_raw(&env.pid()),
            cursor: AtomicUsize::new(start),
            done: AtomicBool::new(false),
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

    /// The share of the calling process's timeslice spent so far, told to the VM as it
    /// grows, so that the process is preempted on time like any send loop.
    ///
    /// `enif_send` itself charges the caller one reduction per 64 words copied, as
    /// `send/2` does, so a big message uses up the timeslice by its size alone; what it
    /// does not charge is time, which is what bounds many small sends. The clock (about
    /// 25 ns a reading) is therefore started only before a call's second send: the first
    /// send is accounted by `enif_send`, and a call that sends once (most small
    /// dispatches) never reads the clock.
    struct Timeslice<'a> {
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
        fn new(env: Env<'a>) -> Self {
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
        fn start(&mut self) {
            if self.started.is_none() {
                self.started = Some(Instant::now());
                self.reported = 1;
                rustler::schedule::consume_timeslice(self.env, 1);
            }
        }

        /// True when the caller should stop: the timeslice is used up or `budget` has
        /// passed. The first check starts the clock, reports 1% and learns from the VM
        /// whether what was sent so far already used the timeslice up.
        fn used_up(&mut self, budget: Duration) -> bool {
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
        fn finish(mut self) {
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
    /// for.
    fn send_within(
        env: Env<'_>,
        pids: impl Iterator<Item = u64>,
        message: Term<'_>,
        slice: &mut Timeslice<'_>,
        budget: Duration,
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
            let _ = send_from(env, pid, message);
            slice.sent += 1;
            sent_here += 1;
        }
        sent_here
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
            monitors: AtomicUsize::new(0),
            joiner_monitors: AtomicUsize::new(0),
            relay: AtomicU64::new(0),
            sender_monitors: Mutex::new(Vec::new()),
            history: (replay > 0).then(|| Mutex::new(History::new(replay, replay_memory))),
        }))
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
            Err(JoinRefused::Joining(joining)) => (joining, Err(rustler::Error::BadArg)),
        };
        let counter = &dispatcher.joiner_monitors;
        release_monitor(env, &dispatcher, &joining.monitor, counter);
        answer
    }

    /// Undoes a monitor of ours and counts it in `counter`; one that already fired is
    /// left to its `down`, which does the counting.
    fn release_monitor(
        env: Env<'_>,
        dispatcher: &ResourceArc<Dispatcher>,
        monitor: &Monitor,
        counter: &AtomicUsize,
    ) {
        if dispatcher.demonitor(Some(env), monitor) {
            counter.fetch_sub(1, Ordering::Relaxed);
        }
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
    fn replay<'a>(
        env: Env<'a>,
        dispatcher: ResourceArc<Dispatcher>,
        topic: Binary<'a>,
    ) -> Term<'a> {
        let Some(history) = &dispatcher.history else {
            return atoms::removed().encode(env);
        };
        let removed = || {
            if dispatcher.registry.is_closed() {
                atoms::closed().encode(env)
            } else {
                atoms::removed().encode(env)
            }
        };
        let name = topic.as_slice();
        let pid = env.pid();
        let raw = pid_to_raw(&pid);
        let mut kept = lock(history);
        let chunk_bytes = kept.chunk_bytes().min(REPLAY_CHUNK_BYTES);
        let (missed, entries) = match kept.take(name, raw, REPLAY_CHUNK, chunk_bytes) {
            Take::Removed => return removed(),
            Take::CaughtUp { data, freed } => {
                // Still under the history lock: no dispatch to `topic` runs between the
                // last message replayed and the first live one.
                let mut handed = false;
                let monitor = || {
                    handed = true;
                    Some(data.monitor)
                };
                let registry = &dispatcher.registry;
                let result = if data.direct {
                    registry.subscribe_direct(name, raw, monitor)
                } else {
                    registry.subscribe(name, raw, monitor)
                };
                drop(kept);
                drop(freed);
                if handed {
                    dispatcher.joiner_monitors.fetch_sub(1, Ordering::Relaxed);
                    dispatcher.monitors.fetch_add(1, Ordering::Relaxed);
                } else {
                    release_monitor(env, &dispatcher, &data.monitor, &dispatcher.joiner_monitors);
                }
                dispatcher.tell_relay(env, raw, Some(name));
                return match result {
                    Ok(Ok(())) => atoms::ok(),
                    Ok(Err(SubscribeError::NotAlive)) => atoms::not_alive(),
                    Ok(Err(SubscribeError::TooManyTopics)) => atoms::too_many_topics(),
                    Err(ClosedError) => atoms::closed(),
                }
                .encode(env);
            }
            Take::Chunk { missed, entries } => (missed, entries),
        };
        drop(kept);
        let mut slice = Timeslice::new(env);
        let told = missed > 0;
        if told {
            let notice = (atoms::ex_atlas_fly_gap(), topic, missed).encode(env);
            send_from(env, raw, notice);
        }
        let scratch = Scratch::new();
        let mut sent = 0;
        for entry in &entries {
            if (told || sent > 0) && slice.used_up(INLINE_SLICE) {
                break;
            }
            // Sending to itself cannot fail while it runs. A kept term the VM cannot
            // decode again (it encoded it itself: never seen) is told as a gap of one.
            if !entry.message.send(env, &scratch, &pid) {
                let notice = (atoms::ex_atlas_fly_gap(), topic, 1u64).encode(env);
                send_from(env, raw, notice);
            }
            sent += 1;
        }
        slice.finish();
        drop(scratch);
        drop(entries);
        let given = lock(history).give_back(name, raw, sent, told);
        match given {
            Ok(freed) => drop(freed),
            Err(_) => return removed(),
        }
        if told {
            (atoms::gap(), missed).encode(env)
        } else {
            atoms::more().encode(env)
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
            let mut monitored = lock(&dispatcher.sender_monitors);
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
            // SAFETY: `out.term` lives in `out.env`, alive until `out` drops at the end
            // of this arm; the copy is made in the caller's env.
            Some((_batch, out)) => unsafe {
                Term::new(env, rustler::sys::enif_make_copy(env.as_c_arg(), out.term))
            },
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

    /// Cluster mode: `relay` hears about every topic this node gains or loses (see
    /// `Dispatcher::tell_relay`); `:undefined` stops that.
    #[rustler::nif]
    fn set_relay(dispatcher: ResourceArc<Dispatcher>, relay: Term<'_>) -> rustler::NifResult<Atom> {
        let raw = match relay.decode::<LocalPid>() {
            Ok(pid) => pid_to_raw(&pid),
            Err(_) if relay == atoms::undefined().to_term(relay.get_env()) => 0,
            Err(_) => return Err(rustler::Error::BadArg),
        };
        dispatcher.registry.set_tracking(raw != 0);
        dispatcher.relay.store(raw, Ordering::Release);
        Ok(atoms::ok())
    }

    /// Every topic with a local subscription, once each.
    #[rustler::nif(schedule = "DirtyCpu")]
    fn topics<'a>(env: Env<'a>, dispatcher: ResourceArc<Dispatcher>) -> Vec<Term<'a>> {
        dispatcher
            .registry
            .topic_names()
            .iter()
            .map(|name| binary_term(env, name))
            .collect()
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
            dispatcher.monitors.fetch_add(1, Ordering::Relaxed);
            Some(monitor)
        };
        let registry = &dispatcher.registry;
        let result = if direct {
            registry.subscribe_direct(topic.as_slice(), pid_to_raw(&pid), monitor)
        } else {
            registry.subscribe(topic.as_slice(), pid_to_raw(&pid), monitor)
        };
        dispatcher.tell_relay(env, pid_to_raw(&pid), Some(topic.as_slice()));
        match result {
            Ok(Ok(())) => atoms::ok(),
            Ok(Err(SubscribeError::NotAlive)) => atoms::not_alive(),
            Ok(Err(SubscribeError::TooManyTopics)) => atoms::too_many_topics(),
            Err(ClosedError) => atoms::closed(),
        }
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
                let mut kept = lock(history);
                let removed = dispatcher.registry.unsubscribe(topic, raw);
                if removed.count > 0 {
                    kept.depart(topic, raw);
                }
                let (data, freed) = kept.remove(topic, raw);
                drop(kept);
                drop(freed);
                joining = data;
                removed
            }
        };
        if let Some(monitor) = removed.released {
            release_monitor(env, dispatcher, &monitor, &dispatcher.monitors);
        }
        if let Some(joining) = &joining {
            release_monitor(
                env,
                dispatcher,
                &joining.monitor,
                &dispatcher.joiner_monitors,
            );
        }
        dispatcher.tell_relay(env, raw, Some(topic));
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
        let dispatcher = match dispatcher.decode::<ResourceArc<Dispatcher>>() {
            Ok(dispatcher) => Some(dispatcher),
            Err(_) if dispatcher == atoms::undefined().to_term(dispatcher.get_env()) => None,
            Err(_) => return Err(rustler::Error::BadArg),
        };
        set_published(dispatcher);
        Ok(atoms::ok())
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
                Err(_) => rustler::sys::enif_raise_exception(
                    env.as_c_arg(),
                    atoms::nif_panicked().as_c_arg(),
                ),
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
        let snapshot = match &dispatcher.history {
            None => dispatcher.registry.snapshot(topic),
            Some(history) => record(env, dispatcher, history, topic, message, &mut slice),
        };
        let Ok(snapshot) = snapshot else {
            return atoms::closed().encode(env);
        };
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
        let progress =
            proceed(
                env,
                dispatcher,
                &mut work,
                message,
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
        });
        (tag, pending).encode(env)
    }

    /// Keeps `message` in `topic`'s history and takes the topic's snapshot, both under
    /// the history lock (see `history`); the message is encoded before, its time charged
    /// to the caller's timeslice. Never waits for anyone: a subscriber catching up that
    /// falls too far behind is cut (and told), not waited for.
    fn record(
        env: Env<'_>,
        dispatcher: &Dispatcher,
        history: &Mutex<History<Kept, Joining>>,
        topic: &[u8],
        message: Term<'_>,
        slice: &mut Timeslice<'_>,
    ) -> Result<registry::Snapshot, ClosedError> {
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
        let snapshot = dispatcher.registry.snapshot(topic);
        drop(history);
        // Freed after the lock.
        drop(evicted);
        snapshot
    }

    /// Hands over, then sends, what is left in `work`. `reserve(lane)` takes a credit of
    /// `lane`: `Ok(true)` taken, `Ok(false)` not now (full, or the caller was queued),
    /// `Err` closed.
    fn proceed<'a>(
        env: Env<'a>,
        dispatcher: &ResourceArc<Dispatcher>,
        work: &mut Work,
        message: Term<'a>,
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
            hand_over(env, dispatcher, lane, part, start, message);
        }
        while let Some((part, start)) = work.inline.first_mut() {
            let sent = send_within(env, part.pids_from(*start), message, slice, INLINE_SLICE);
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
        let progress = proceed(env, dispatcher, &mut work, message, &mut slice, |lane| {
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
        });
        drop(work);
        slice.finish();
        match progress {
            Progress::Done => atoms::ok(),
            Progress::NoRoom => atoms::wait(),
            Progress::OutOfTime => atoms::more(),
            Progress::Closed => atoms::closed(),
        }
    }

    /// Marks `batch` delivered up to `next` and, when it is done, gives its credit back
    /// (to the first waiting producer, if any). Returns true when done.
    fn advance(env: Env<'_>, batch: &ResourceArc<Batch>, next: usize) -> bool {
        batch.cursor.store(next, Ordering::Release);
        let done = next >= batch.part.len();
        if done && !batch.done.swap(true, Ordering::AcqRel) {
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
        let sent = send_within(
            env,
            batch.part.pids_from(start),
            message,
            &mut slice,
            DELIVER_SLICE,
        );
        slice.finish();
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
        for pid in batch.part.pids_from(start).take(DIRTY_SLICE) {
            // A failed send is normally a subscriber that is gone. But a sender killed
            // while on a dirty scheduler runs on to the end of the call, and what it can
            // no longer send must not pass for delivered: stop, and its monitor counts
            // the rest as lost.
            if !send_from(env, pid, message) && !current_process_alive(env) {
                break;
            }
            sent += 1;
        }
        if advance(env, &batch, start + sent) {
            atoms::ok()
        } else {
            atoms::more()
        }
    }

    #[rustler::nif]
    fn count(dispatcher: ResourceArc<Dispatcher>, topic: Binary<'_>) -> usize {
        dispatcher.registry.count(topic.as_slice())
    }

    #[rustler::nif(schedule = "DirtyCpu")]
    fn subscribers(dispatcher: ResourceArc<Dispatcher>, topic: Binary<'_>) -> Vec<LocalPid> {
        let snapshot = dispatcher
            .registry
            .snapshot(topic.as_slice())
            .unwrap_or_default();
        snapshot
            .iter()
            .flat_map(|(_, part)| part.pids())
            .map(pid_from_raw)
            .collect()
    }

    #[rustler::nif(schedule = "DirtyCpu")]
    fn topics_of<'a>(
        env: Env<'a>,
        dispatcher: ResourceArc<Dispatcher>,
        pid: LocalPid,
    ) -> Vec<Term<'a>> {
        let names = dispatcher.registry.topics_of(pid_to_raw(&pid));
        names.iter().map(|name| binary_term(env, name)).collect()
    }

    // Counting distinct topics walks every topic name: dirty, like any O(topics) call.
    #[rustler::nif(schedule = "DirtyCpu")]
    fn stats(dispatcher: ResourceArc<Dispatcher>) -> Vec<(Atom, u64)> {
        let registry = dispatcher.registry.stats();
        let lanes = dispatcher.lanes.stats();
        let mut stats = vec![
            (atoms::topics(), registry.topics as u64),
            (atoms::subscriptions(), registry.subscriptions as u64),
            (atoms::subscribers(), registry.subscribers as u64),
            (
                atoms::monitors(),
                dispatcher.monitors.load(Ordering::Relaxed) as u64,
            ),
            (atoms::lanes(), lanes.lanes as u64),
            (atoms::queue_capacity(), lanes.capacity as u64),
            (atoms::in_flight(), lanes.in_flight as u64),
            (atoms::max_in_flight(), lanes.max_in_flight as u64),
            (atoms::peak_in_flight(), lanes.peak as u64),
            (atoms::delivered_batches(), lanes.delivered),
            (atoms::waiting(), lanes.waiting as u64),
            (atoms::lost_batches(), lanes.lost_batches),
            (atoms::lost_deliveries(), lanes.lost_deliveries),
        ];
        let kept = dispatcher
            .history
            .as_ref()
            .map(|history| lock(history).stats())
            .unwrap_or_default();
        stats.push((atoms::replay_messages(), kept.messages as u64));
        stats.push((atoms::replay_bytes(), kept.bytes as u64));
        stats.push((atoms::replay_joiners(), kept.joiners as u64));
        stats.push((atoms::replay_retained_bytes(), kept.retained as u64));
        stats.push((atoms::replay_cuts(), kept.cuts));
        stats.push((atoms::replay_missed(), kept.missed));
        stats.push((
            atoms::replay_monitors(),
            dispatcher.joiner_monitors.load(Ordering::Relaxed) as u64,
        ));
        if let Some(bytes) = memory::live_bytes() {
            stats.push((atoms::allocated_bytes(), bytes as u64));
        }
        stats
    }

    /// `{lost_batches, lost_deliveries}`: constant work per lane, for polling.
    #[rustler::nif]
    fn lost(dispatcher: ResourceArc<Dispatcher>) -> (u64, u64) {
        dispatcher.lanes.lost()
    }

    /// Closes the dispatcher for good: every later call answers `:closed`, every monitor
    /// is released, every waiting producer is woken (its `resume/2` answers `:closed`).
    /// Returns the subscribers it held, one pid each, so the caller can tell them.
    #[rustler::nif(schedule = "DirtyCpu")]
    fn close(env: Env<'_>, dispatcher: ResourceArc<Dispatcher>) -> Vec<LocalPid> {
        let subscribers = dispatcher.registry.close();
        for (_, monitor) in &subscribers {
            release_monitor(env, &dispatcher, monitor, &dispatcher.monitors);
        }
        if let Some(history) = &dispatcher.history {
            let cleared = lock(history).clear();
            for (_, joining) in &cleared.joiners {
                release_monitor(
                    env,
                    &dispatcher,
                    &joining.monitor,
                    &dispatcher.joiner_monitors,
                );
            }
            drop(cleared);
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
        subscribers
            .into_iter()
            .map(|(pid, _)| pid_from_raw(pid))
            .collect()
    }

    fn load(_env: Env, _info: Term) -> bool {
        pin_library();
        // A fresh load after the module was purged maps this same library again (it is
        // pinned), statics and all. What the old copy published is a resource of the old
        // copy's type, which none of this copy's other functions accept: publish nothing
        // until a server of this copy starts, so that every call agrees.
        set_published(None);
        true
    }

    /// Keeps this library mapped for the life of the VM: a batch may still be in a
    /// sender's hands when the module is purged, and rustler has no `unload` callback.
    /// `dladdr` and `RTLD_NODELETE` are POSIX/glibc/BSD/macOS extensions that `libc`
    /// exposes on every Unix we build for (checked for Linux, macOS and FreeBSD).
    #[cfg(unix)]
    fn pin_library() {
        // SAFETY: `dladdr` only reads the address of one of our own functions and fills
        // `info`; `dlopen` with RTLD_NOLOAD opens nothing new, it only takes another
        // reference to the already loaded library (the path `dladdr` returned) and marks
        // it RTLD_NODELETE. The handle is deliberately never closed.
        unsafe {
            let mut info: libc::Dl_info = std::mem::zeroed();
            let here = pin_library as *const () as *const libc::c_void;
            if libc::dladdr(here, &mut info) != 0 && !info.dli_fname.is_null() {
                libc::dlopen(
                    info.dli_fname,
                    libc::RTLD_NOW | libc::RTLD_NOLOAD | libc::RTLD_NODELETE,
                );
            }
        }
    }

    // Without pinning, purging the module could unmap code a sender is still running;
    // Windows is not supported (the Mix compiler refuses it too), so fail loudly here
    // rather than build a library that is unsafe to unload.
    #[cfg(not(unix))]
    compile_error!("ex_atlas_dispatcher supports Unix only (Linux, macOS, the BSDs)");

    rustler::init!("Elixir.ExAtlas.Fly.Dispatcher.Native", load = load);
}
