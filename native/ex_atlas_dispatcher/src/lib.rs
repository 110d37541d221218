//! NIF glue for `ExAtlas.Fly.Dispatcher.Native`: decodes terms, calls the plain-Rust core
//! (`registry`, `fanout`) and encodes results. No registry or queue logic lives here.

pub mod fanout;
pub mod memory;
pub mod registry;
#[cfg(test)]
mod stress_tests;

#[cfg(feature = "alloc-stats")]
#[global_allocator]
static ALLOCATOR: memory::CountingAllocator = memory::CountingAllocator;

// The glue references `enif_*` symbols that only the VM provides, so a test binary could
// not link it; `cargo test` covers the core modules above without a VM.
#[cfg(not(test))]
mod nif {
    use crate::{fanout, memory, registry};

    use fanout::{Lanes, Refused, Reservation};
    use registry::{ClosedError, Part, Sharded, SubscribeError};
    use rustler::sys::ErlNifPid;
    use rustler::types::binary::NewBinary;
    use rustler::{Atom, Binary, Encoder, Env, LocalPid, Monitor, Resource, ResourceArc, Term};
    use std::collections::VecDeque;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    use std::sync::{Mutex, MutexGuard, RwLock};
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
    /// A dispatch to at most this many subscriptions is sent by the caller itself when
    /// the lanes involved have nothing in flight.
    const INLINE_DISPATCH: usize = 16;
    /// Longest the caller sends inline; what is left goes to the lanes' senders. A few
    /// small messages take microseconds; this only bounds big ones.
    const INLINE_SLICE: Duration = Duration::from_micros(500);
    /// Pids delivered per dirty NIF call before handing control back to the sender
    /// process, so a huge topic never holds a dirty scheduler for long.
    const DIRTY_SLICE: usize = 16_384;
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
            ex_atlas_room = "$ex_atlas_room",
            ex_atlas_interest = "$ex_atlas_interest",
        }
    }

    /// One dispatcher: the registry (one shard per lane), the bounds of its fan-out lanes
    /// and the lanes' sender processes. Held by the Elixir side as a resource; process
    /// monitors belong to it, so subscriptions outlive any one process of ours.
    pub struct Dispatcher {
        registry: Sharded<Monitor>,
        lanes: Lanes<Waiter>,
        /// Each lane's sender process; replaced when a sender is restarted.
        senders: Box<[SenderSlot]>,
        /// Process monitors currently set, counted where they are set and undone.
        monitors: AtomicUsize,
        /// Raw pid of the cluster relay told about topics this node gains or loses; 0
        /// when not in cluster mode.
        relay: AtomicU64,
        /// The senders this resource monitors (a `down` for one of them reclaims its
        /// batches; any other `down` is a subscriber's).
        sender_monitors: Mutex<Vec<u64>>,
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

        fn down<'a>(&'a self, env: Env<'a>, pid: LocalPid, _monitor: Monitor) {
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
                self.monitors.fetch_sub(1, Ordering::Relaxed);
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
        cursor: AtomicUsize,
        done: AtomicBool,
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

    /// The batches of one dispatch that did not fit in a full lane, in lane order, each
    /// with its first undelivered position. Only its producer touches `batches`; a
    /// credit granted to it is owned here until used, so a producer killed while waiting
    /// gives it back through the destructor.
    pub struct Pending {
        dispatcher: ResourceArc<Dispatcher>,
        batches: Mutex<VecDeque<(usize, Part, usize)>>,
        /// 1 + the lane of a credit granted and not used yet; 0 when none.
        granted: AtomicUsize,
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

    fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
        mutex
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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

    /// One lane's sender process and the lane's batches on their way:
    ///
    /// * `in_flight`: each batch handed to a sender, with that sender's pid, until it is
    ///   delivered. The dispatcher monitors its senders; when one dies, the batches it
    ///   held are reclaimed from here (counted as lost, credits given back) at once, even
    ///   while another process still holds a stale reference to them;
    /// * `parked`: batches handed to the lane while it had no live sender (between a
    ///   sender's death and its replacement), in order, each holding its credit: the next
    ///   sender gets them first, so nothing dispatched meanwhile is lost.
    struct SenderSlot {
        pid: AtomicU64,
        in_flight: Mutex<InFlight>,
        parked: Mutex<Parked>,
        parked_len: AtomicUsize,
    }

    /// Batches sent, each with the pid of the sender it went to, oldest first.
    type InFlight = VecDeque<(u64, ResourceArc<Batch>)>;
    /// Batches waiting for a live sender, in order, each with its message.
    type Parked = Vec<(ResourceArc<Batch>, Outgoing)>;

    impl SenderSlot {
        fn new() -> Self {
            SenderSlot {
                pid: AtomicU64::new(0),
                in_flight: Mutex::new(VecDeque::new()),
                parked: Mutex::new(Vec::new()),
                parked_len: AtomicUsize::new(0),
            }
        }

        /// Sends `batch` with `message` to the lane's sender, or parks it behind the
        /// batches parked before it. Checking the parked count first keeps a caller's
        /// later batch from overtaking its earlier, parked one.
        fn hand<'a>(&self, env: Env<'a>, batch: ResourceArc<Batch>, message: Term<'a>) {
            if self.parked_len.load(Ordering::SeqCst) == 0 && self.send(env, &batch, message) {
                return;
            }
            let mut parked = lock(&self.parked);
            if parked.is_empty() && self.send(env, &batch, message) {
                return;
            }
            // Reclaimed meanwhile (its dead sender's monitor fired): already counted.
            if batch.done.load(Ordering::Acquire) {
                return;
            }
            // Only while the lane has no live sender: the message gets an env of its own
            // (a copy that does not keep literals shared, unlike a send from the caller).
            let out = Outgoing::build(|menv| {
                (
                    atoms::ex_atlas_deliver(),
                    batch.clone(),
                    message.in_env(menv),
                )
                    .encode(menv)
            });
            parked.push((batch, out));
            self.parked_len.store(parked.len(), Ordering::SeqCst);
        }

        /// Sends from the caller's env, so the VM copies the message once and keeps its
        /// literals shared. The batch is recorded as in flight first: once sent, its
        /// sender may die at any moment, and its monitor must find it.
        fn send<'a>(&self, env: Env<'a>, batch: &ResourceArc<Batch>, message: Term<'a>) -> bool {
            let pid = self.pid.load(Ordering::SeqCst);
            if pid == 0 {
                return false;
            }
            self.record(pid, batch.clone());
            let deliver = (atoms::ex_atlas_deliver(), batch.clone(), message);
            if send_from(env, pid, deliver.encode(env)) {
                return true;
            }
            let mut in_flight = lock(&self.in_flight);
            if let Some(at) = in_flight.iter().rposition(|(_, b)| same(b, batch)) {
                in_flight.remove(at);
            }
            false
        }

        /// Adds `batch` as sent to `pid`, dropping delivered batches from the front.
        fn record(&self, pid: u64, batch: ResourceArc<Batch>) {
            let mut in_flight = lock(&self.in_flight);
            while in_flight
                .front()
                .is_some_and(|(_, b)| b.done.load(Ordering::Acquire))
            {
                in_flight.pop_front();
            }
            in_flight.push_back((pid, batch));
        }

        /// Takes out the undelivered batches sent to `pid`, marked done so that nothing
        /// else counts or releases them again.
        fn reclaim(&self, pid: u64) -> Vec<ResourceArc<Batch>> {
            let mut in_flight = lock(&self.in_flight);
            let mut taken = Vec::new();
            in_flight.retain(|(to, batch)| {
                if *to != pid {
                    return true;
                }
                if !batch.done.swap(true, Ordering::AcqRel) {
                    taken.push(batch.clone());
                }
                false
            });
            taken
        }

        /// Installs `pid` and hands it what was parked, in order; what it does not take
        /// (it died already) stays parked for the next one.
        fn install(&self, env: Env<'_>, pid: u64) {
            let mut parked = lock(&self.parked);
            self.pid.store(pid, Ordering::SeqCst);
            let mut queue = std::mem::take(&mut *parked).into_iter();
            for (batch, out) in queue.by_ref() {
                // Recorded first, as in `send`; taken back if the new sender is gone too.
                self.record(pid, batch.clone());
                if let Err(unsent) = out.send(env, pid) {
                    let mut in_flight = lock(&self.in_flight);
                    if let Some(at) = in_flight.iter().rposition(|(_, b)| same(b, &batch)) {
                        in_flight.remove(at);
                    }
                    drop(in_flight);
                    parked.push((batch, unsent));
                    break;
                }
            }
            parked.extend(queue);
            self.parked_len.store(parked.len(), Ordering::SeqCst);
        }

        /// Empties both lists, for the caller to drop after unlocking (closing).
        fn clear(&self) -> (InFlight, Parked) {
            let in_flight = std::mem::take(&mut *lock(&self.in_flight));
            let mut parked = lock(&self.parked);
            self.parked_len.store(0, Ordering::SeqCst);
            (in_flight, std::mem::take(&mut *parked))
        }
    }

    /// Whether two handles name the same batch.
    fn same(a: &ResourceArc<Batch>, b: &ResourceArc<Batch>) -> bool {
        std::ptr::eq::<Batch>(&**a, &**b)
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
            cursor: AtomicUsize::new(start),
            done: AtomicBool::new(false),
        });
        dispatcher.senders[lane].hand(env, batch, message);
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

    #[rustler::nif]
    fn new(lanes: usize, queue_capacity: usize) -> rustler::NifResult<ResourceArc<Dispatcher>> {
        if !(1..=MAX_LANES).contains(&lanes) {
            return Err(rustler::Error::BadArg);
        }
        let lanes = Lanes::new(lanes, queue_capacity);
        Ok(ResourceArc::new(Dispatcher {
            registry: Sharded::new(lanes.len()),
            senders: (0..lanes.len()).map(|_| SenderSlot::new()).collect(),
            lanes,
            monitors: AtomicUsize::new(0),
            relay: AtomicU64::new(0),
            sender_monitors: Mutex::new(Vec::new()),
        }))
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
        for (slot, pid) in dispatcher.senders.iter().zip(&senders) {
            let raw = pid_to_raw(pid);
            let mut monitored = lock(&dispatcher.sender_monitors);
            if !monitored.contains(&raw) && dispatcher.monitor(Some(env), pid).is_some() {
                monitored.push(raw);
            }
            drop(monitored);
            slot.install(env, raw);
        }
        Ok(atoms::ok())
    }

    /// The sender of each lane, in lane order (`:undefined` before `set_senders/2`).
    #[rustler::nif]
    fn senders(env: Env<'_>, dispatcher: ResourceArc<Dispatcher>) -> Vec<Term<'_>> {
        dispatcher
            .senders
            .iter()
            .map(|slot| match slot.pid.load(Ordering::Acquire) {
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

    #[rustler::nif]
    fn subscribe(env: Env<'_>, dispatcher: ResourceArc<Dispatcher>, topic: Binary<'_>) -> Atom {
        let pid = env.pid();
        let result = dispatcher
            .registry
            .subscribe(topic.as_slice(), pid_to_raw(&pid), || {
                let monitor = dispatcher.monitor(Some(env), &pid)?;
                dispatcher.monitors.fetch_add(1, Ordering::Relaxed);
                Some(monitor)
            });
        dispatcher.tell_relay(env, pid_to_raw(&pid), Some(topic.as_slice()));
        match result {
            Ok(Ok(())) => atoms::ok(),
            Ok(Err(SubscribeError::NotAlive)) => atoms::not_alive(),
            Ok(Err(SubscribeError::TooManyTopics)) => atoms::too_many_topics(),
            Err(ClosedError) => atoms::closed(),
        }
    }

    /// Removes every subscription of `pid` to `topic`; returns how many went.
    fn remove(
        env: Env<'_>,
        dispatcher: &ResourceArc<Dispatcher>,
        topic: &[u8],
        pid: &LocalPid,
    ) -> usize {
        let removed = dispatcher.registry.unsubscribe(topic, pid_to_raw(pid));
        if let Some(monitor) = removed.released {
            // False when the monitor already fired: its `down` does the counting.
            if dispatcher.demonitor(Some(env), &monitor) {
                dispatcher.monitors.fetch_sub(1, Ordering::Relaxed);
            }
        }
        dispatcher.tell_relay(env, pid_to_raw(pid), Some(topic));
        removed.count
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

    fn dispatch_to<'a>(
        env: Env<'a>,
        dispatcher: &ResourceArc<Dispatcher>,
        topic: &[u8],
        message: Term<'a>,
    ) -> Term<'a> {
        let mut slice = Timeslice::new(env);
        let Ok(snapshot) = dispatcher.registry.snapshot(topic) else {
            return atoms::closed().encode(env);
        };
        let small = snapshot.iter().map(|(_, part)| part.len()).sum::<usize>() <= INLINE_DISPATCH;
        let mut out_of_time = false;
        let mut batches = snapshot.into_iter();
        let result = loop {
            let Some((lane, part)) = batches.next() else {
                break delivered(dispatcher).encode(env);
            };
            let mut start = 0;
            // A lane with nothing in flight has delivered everything this caller handed
            // it before, so sending a small batch right here keeps per-caller order and
            // saves the hop through the sender process.
            if small && !out_of_time && dispatcher.lanes.is_idle(lane) {
                start = send_within(env, part.pids(), message, &mut slice, INLINE_SLICE);
                if start == part.len() {
                    continue;
                }
                out_of_time = true;
            }
            match dispatcher.lanes.try_reserve(lane) {
                Ok(()) => hand_over(env, dispatcher, lane, part, start, message),
                Err(Refused::Closed) => break atoms::closed().encode(env),
                Err(Refused::Full) => {
                    let rest = std::iter::once((lane, part, start))
                        .chain(batches.map(|(lane, part)| (lane, part, 0)))
                        .collect();
                    let pending = ResourceArc::new(Pending {
                        dispatcher: dispatcher.clone(),
                        batches: Mutex::new(rest),
                        granted: AtomicUsize::new(0),
                    });
                    break (atoms::full(), pending).encode(env);
                }
            }
        };
        slice.finish();
        result
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

    /// Hands over what is left of a dispatch that met a full lane, in lane order, with
    /// the credit granted to it first. Never waits: `:wait` means the caller was queued
    /// for the next free credit of a full lane and will get `{:"$ex_atlas_room",
    /// pending}`; `:closed` that the dispatcher was closed; `:ok` that all is handed over.
    #[rustler::nif]
    fn resume<'a>(env: Env<'a>, pending: ResourceArc<Pending>, message: Term<'a>) -> Atom {
        let dispatcher = &pending.dispatcher;
        let mut batches = lock(&pending.batches);
        while let Some(&(lane, _, _)) = batches.front() {
            let granted = pending
                .granted
                .compare_exchange(lane + 1, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
            if !granted {
                let waiter = Waiter {
                    pid: pid_to_raw(&env.pid()),
                    pending: pending.clone(),
                };
                match dispatcher
                    .lanes
                    .reserve_or_queue(lane, waiter, granting(env, lane))
                {
                    Ok(Reservation::Taken) => {}
                    Ok(Reservation::Queued) => return atoms::wait(),
                    Err(_) => return atoms::closed(),
                }
            }
            if let Some((lane, part, start)) = batches.pop_front() {
                hand_over(env, dispatcher, lane, part, start, message);
            }
        }
        atoms::ok()
    }

    /// Marks `batch` delivered up to `next` and, when it is done, gives its credit back
    /// (to the first waiting producer, if any). Returns true when done.
    fn advance(env: Env<'_>, batch: &Batch, next: usize) -> bool {
        batch.cursor.store(next, Ordering::Release);
        let done = next >= batch.part.len();
        if done && !batch.done.swap(true, Ordering::AcqRel) {
            batch
                .dispatcher
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
            let _ = send_from(env, pid, message);
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
            if dispatcher.demonitor(Some(env), monitor) {
                dispatcher.monitors.fetch_sub(1, Ordering::Relaxed);
            }
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
