//! NIF glue for `ExAtlas.Fly.Dispatcher.Native`: decodes terms, calls the plain-Rust core
//! (`registry`, `fanout`) and encodes results. No registry or queue logic lives here.

pub mod fanout;
pub mod memory;
pub mod registry;
#[cfg(test)]
mod stress_tests;

#[global_allocator]
static ALLOCATOR: memory::CountingAllocator = memory::CountingAllocator;

// The glue references `enif_*` symbols that only the VM provides, so a test binary could
// not link it; `cargo test` covers the core modules above without a VM.
#[cfg(not(test))]
mod nif {
    use crate::{fanout, memory, registry};

    use fanout::{Lanes, Refused};
    use registry::{ClosedError, Part, Sharded, SubscribeError};
    use rustler::sys::ErlNifPid;
    use rustler::types::binary::NewBinary;
    use rustler::{Atom, Binary, Encoder, Env, LocalPid, Monitor, Resource, ResourceArc, Term};
    use smallvec::SmallVec;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Mutex, OnceLock};
    use std::time::Instant;

    /// Most pids one normal-scheduler `deliver` call sends: a bounded cost (a few
    /// hundred microseconds at worst) that keeps every call far under 1 ms.
    const MAX_SCHEDULER_SLICE: usize = 256;
    /// A dispatch to at most this many subscriptions is sent by the caller itself (a few
    /// microseconds) when the lanes involved have nothing in flight.
    const INLINE_DISPATCH: usize = 16;
    /// Pids delivered per dirty NIF call before handing control back to the sender
    /// process, so a huge topic never holds a dirty scheduler for long.
    const DIRTY_SLICE: usize = 16_384;

    mod atoms {
        rustler::atoms! {
            ok,
            full,
            closed,
            more,
            not_alive,
            too_many_topics,
            already_set,
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
            allocated_bytes,
            ex_atlas_deliver = "$ex_atlas_deliver",
        }
    }

    /// One dispatcher: the registry (one shard per lane) plus the bounds of its fan-out
    /// lanes and the lanes' sender processes. Held by the Elixir side as a resource;
    /// process monitors belong to it.
    pub struct Dispatcher {
        registry: Sharded<Monitor>,
        lanes: Lanes,
        senders: OnceLock<SmallVec<[LocalPid; 4]>>,
    }

    impl Dispatcher {
        fn senders(&self) -> &[LocalPid] {
            self.senders.get().map_or(&[], |senders| senders.as_slice())
        }
    }

    #[rustler::resource_impl]
    impl Resource for Dispatcher {
        const IMPLEMENTS_DOWN: bool = true;

        fn down<'a>(&'a self, _env: Env<'a>, pid: LocalPid, _monitor: Monitor) {
            // rustler catches panics here too, but do not rely on the version for that.
            let _ = catch_unwind(AssertUnwindSafe(|| {
                self.registry.remove_subscriber(pid_to_raw(&pid));
            }));
        }
    }

    /// One lane's share of one dispatch: a snapshot of the subscribers in that lane's
    /// partition, travelling to the lane's sender process with the message.
    pub struct Batch {
        part: Part,
        lane: usize,
        cursor: AtomicUsize,
        released: AtomicBool,
    }

    #[rustler::resource_impl]
    impl Resource for Batch {}

    /// The batches of one dispatch that did not fit, in lane order, for
    /// `push_pending/3` to hand over from a dirty I/O scheduler.
    pub struct Pending {
        batches: Mutex<Vec<(usize, Part)>>,
    }

    #[rustler::resource_impl]
    impl Resource for Pending {}

    fn pid_to_raw(pid: &LocalPid) -> u64 {
        // SAFETY: `ErlNifPid` is `#[repr(C)]` around a single `ERL_NIF_TERM` (a u64), so
        // the two have the same size and layout and every bit pattern of either is valid.
        unsafe { std::mem::transmute::<ErlNifPid, u64>(*pid.as_c_arg()) }
    }

    fn pid_from_raw(raw: u64) -> LocalPid {
        // SAFETY: see `pid_to_raw`; `raw` always comes from `pid_to_raw` of a local pid,
        // an immediate term that stays valid for the life of the VM.
        LocalPid::from_c_arg(unsafe { std::mem::transmute::<u64, ErlNifPid>(raw) })
    }

    /// Hands one batch to its lane's sender process. The credit is already taken.
    fn hand_over<'a>(
        env: Env<'a>,
        dispatcher: &Dispatcher,
        senders: &[LocalPid],
        lane: usize,
        part: Part,
        message: Term<'a>,
    ) -> bool {
        let batch = ResourceArc::new(Batch {
            part,
            lane,
            cursor: AtomicUsize::new(0),
            released: AtomicBool::new(false),
        });
        let sent = senders
            .get(lane)
            .map(|sender| {
                env.send(sender, (atoms::ex_atlas_deliver(), batch, message))
                    .is_ok()
            })
            .unwrap_or(false);
        if !sent {
            dispatcher.lanes.release(lane);
        }
        sent
    }

    /// Most lanes `new/2` accepts, as `config :ex_atlas, :fly, sender_threads:` does.
    /// Checked here too: a huge count made the allocation abort the whole VM.
    const MAX_LANES: usize = 1_024;

    #[rustler::nif]
    fn new(lanes: usize, queue_capacity: usize) -> rustler::NifResult<ResourceArc<Dispatcher>> {
        if !(1..=MAX_LANES).contains(&lanes) {
            return Err(rustler::Error::BadArg);
        }
        let lanes = Lanes::new(lanes, queue_capacity);
        Ok(ResourceArc::new(Dispatcher {
            registry: Sharded::new(lanes.len()),
            lanes,
            senders: OnceLock::new(),
        }))
    }

    #[rustler::nif]
    fn set_senders(
        dispatcher: ResourceArc<Dispatcher>,
        senders: Term<'_>,
    ) -> rustler::NifResult<Atom> {
        // rustler's list decoder panics at an improper tail; enif_get_list_length refuses
        // one with badarg instead.
        senders.list_length()?;
        let senders: Vec<LocalPid> = senders.decode()?;
        if senders.len() != dispatcher.lanes.len() {
            return Ok(atoms::already_set());
        }
        match dispatcher.senders.set(senders.into_iter().collect()) {
            Ok(()) => Ok(atoms::ok()),
            Err(_) => Ok(atoms::already_set()),
        }
    }

    #[rustler::nif]
    fn subscribe(env: Env<'_>, dispatcher: ResourceArc<Dispatcher>, topic: Binary<'_>) -> Atom {
        let pid = env.pid();
        let result = dispatcher
            .registry
            .subscribe(topic.as_slice(), pid_to_raw(&pid), || {
                dispatcher.monitor(Some(env), &pid)
            });
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
            dispatcher.demonitor(Some(env), &monitor);
        }
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

    #[rustler::nif]
    fn dispatch<'a>(
        env: Env<'a>,
        dispatcher: ResourceArc<Dispatcher>,
        topic: Binary<'a>,
        message: Term<'a>,
    ) -> Term<'a> {
        let Ok(snapshot) = dispatcher.registry.snapshot(topic.as_slice()) else {
            return atoms::closed().encode(env);
        };
        let senders = dispatcher.senders();
        let small = snapshot.iter().map(|(_, part)| part.len()).sum::<usize>() <= INLINE_DISPATCH;
        let mut batches = snapshot.into_iter();
        while let Some((lane, part)) = batches.next() {
            // A lane with nothing in flight has delivered everything this caller handed
            // it before, so sending a small batch right here keeps per-caller order and
            // saves the hop through the sender process.
            if small && dispatcher.lanes.is_idle(lane) {
                send_each(env, part.pids(), message);
                continue;
            }
            match dispatcher.lanes.try_reserve(lane) {
                Ok(()) => {
                    if !hand_over(env, &dispatcher, senders, lane, part, message) {
                        return atoms::closed().encode(env);
                    }
                }
                Err(Refused::Closed) => return atoms::closed().encode(env),
                Err(Refused::Full) => {
                    let mut rest = vec![(lane, part)];
                    rest.extend(batches);
                    let pending = ResourceArc::new(Pending {
                        batches: Mutex::new(rest),
                    });
                    return (atoms::full(), pending).encode(env);
                }
            }
        }
        atoms::ok().encode(env)
    }

    #[rustler::nif(schedule = "DirtyIo")]
    fn push_pending<'a>(
        env: Env<'a>,
        dispatcher: ResourceArc<Dispatcher>,
        pending: ResourceArc<Pending>,
        message: Term<'a>,
    ) -> Atom {
        let batches =
            std::mem::take(&mut *pending.batches.lock().unwrap_or_else(|p| p.into_inner()));
        let senders = dispatcher.senders();
        for (lane, part) in batches {
            if dispatcher.lanes.reserve(lane).is_err()
                || !hand_over(env, &dispatcher, senders, lane, part, message)
            {
                return atoms::closed();
            }
        }
        atoms::ok()
    }

    /// Sends `message` to every pid from the calling process's env; returns how many.
    fn send_each(env: Env<'_>, pids: impl Iterator<Item = u64>, message: Term<'_>) -> usize {
        let mut sent = 0;
        for pid in pids {
            // A dead receiver is not an error: its monitor removes it shortly.
            let _ = env.send(&pid_from_raw(pid), message);
            sent += 1;
        }
        sent
    }

    /// Sends `message` to up to `limit` pids of `batch` from its cursor; gives the lane
    /// its credit back when the batch is done. Returns true when done.
    fn deliver_some(
        env: Env<'_>,
        dispatcher: &Dispatcher,
        batch: &Batch,
        message: Term<'_>,
        limit: usize,
    ) -> bool {
        let start = batch.cursor.load(Ordering::Acquire);
        let next = start + send_each(env, batch.part.pids_from(start).take(limit), message);
        batch.cursor.store(next, Ordering::Release);
        let done = next >= batch.part.len();
        if done && !batch.released.swap(true, Ordering::AcqRel) {
            dispatcher.lanes.release(batch.lane);
        }
        done
    }

    /// Sends `message` to up to `limit` (at most 256) more pids of `batch`.
    #[rustler::nif]
    fn deliver<'a>(
        env: Env<'a>,
        dispatcher: ResourceArc<Dispatcher>,
        batch: ResourceArc<Batch>,
        message: Term<'a>,
        limit: usize,
    ) -> Atom {
        let limit = limit.clamp(1, MAX_SCHEDULER_SLICE);
        let started = Instant::now();
        let done = deliver_some(env, &dispatcher, &batch, message, limit);
        // Tell the VM how much of the ~1 ms timeslice this took, so the sender is
        // preempted on time even when the message is too small to cost reductions.
        let percent = (started.elapsed().as_micros() / 10).clamp(1, 100) as i32;
        rustler::schedule::consume_timeslice(env, percent);
        if done {
            atoms::ok()
        } else {
            atoms::more()
        }
    }

    #[rustler::nif(schedule = "DirtyCpu")]
    fn deliver_dirty<'a>(
        env: Env<'a>,
        dispatcher: ResourceArc<Dispatcher>,
        batch: ResourceArc<Batch>,
        message: Term<'a>,
    ) -> Atom {
        if deliver_some(env, &dispatcher, &batch, message, DIRTY_SLICE) {
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
        names
            .iter()
            .map(|name| {
                let mut binary = NewBinary::new(env, name.len());
                binary.as_mut_slice().copy_from_slice(name);
                Term::from(binary)
            })
            .collect()
    }

    // Counting distinct topics walks every topic name: dirty, like any O(topics) call.
    #[rustler::nif(schedule = "DirtyCpu")]
    fn stats(dispatcher: ResourceArc<Dispatcher>) -> Vec<(Atom, u64)> {
        let registry = dispatcher.registry.stats();
        let lanes = dispatcher.lanes.stats();
        vec![
            (atoms::topics(), registry.topics as u64),
            (atoms::subscriptions(), registry.subscriptions as u64),
            (atoms::subscribers(), registry.subscribers as u64),
            (atoms::monitors(), registry.subscribers as u64),
            (atoms::lanes(), lanes.lanes as u64),
            (atoms::queue_capacity(), lanes.capacity as u64),
            (atoms::in_flight(), lanes.in_flight as u64),
            (atoms::max_in_flight(), lanes.max_in_flight as u64),
            (atoms::peak_in_flight(), lanes.peak as u64),
            (atoms::delivered_batches(), lanes.delivered),
            (atoms::waiting(), lanes.waiting as u64),
            (atoms::allocated_bytes(), memory::live_bytes() as u64),
        ]
    }

    #[rustler::nif(schedule = "DirtyCpu")]
    fn close(env: Env<'_>, dispatcher: ResourceArc<Dispatcher>) -> Atom {
        let monitors = dispatcher.registry.close();
        for monitor in &monitors {
            dispatcher.demonitor(Some(env), monitor);
        }
        dispatcher.lanes.close();
        atoms::ok()
    }

    fn load(_env: Env, _info: Term) -> bool {
        pin_library();
        true
    }

    /// Keeps this library mapped for the life of the VM: a batch may still be in a
    /// sender's hands when the module is purged, and rustler has no `unload` callback.
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

    rustler::init!("Elixir.ExAtlas.Fly.Dispatcher.Native", load = load);
}
