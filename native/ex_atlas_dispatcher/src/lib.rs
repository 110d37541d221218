//! NIF glue for `ExAtlas.Fly.Dispatcher.Native`: decodes terms, calls the plain-Rust core
//! (`registry`, `fanout`) and encodes results. No registry or queue logic lives here.

pub mod fanout;
pub mod memory;
pub mod registry;

#[global_allocator]
static ALLOCATOR: memory::CountingAllocator = memory::CountingAllocator;

// The glue references `enif_*` symbols that only the VM provides, so a test binary could
// not link it; `cargo test` covers the core modules above without a VM.
#[cfg(not(test))]
mod nif {
    use crate::{fanout, memory, registry};

    use fanout::{Fanout, PushError};
    use registry::{Part, Registry, SubscribeError};
    use rustler::env::SavedTerm;
    use rustler::types::binary::NewBinary;
    use rustler::sys::ErlNifPid;
    use rustler::{
        Atom, Binary, Encoder, Env, LocalPid, Monitor, NifResult, OwnedEnv, Resource, ResourceArc,
        Term,
    };
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, MutexGuard};

    mod atoms {
        rustler::atoms! {
            ok,
            full,
            closed,
            not_alive,
            too_many_topics,
            topics,
            subscriptions,
            subscribers,
            monitors,
            threads,
            queue_capacity,
            queued,
            max_queued,
            handled,
            panicked,
            running,
            allocated_bytes,
        }
    }

    /// A term copied once into an environment of its own, read by every sender thread that
    /// delivers it.
    struct Message {
        env: OwnedEnv,
        term: SavedTerm,
    }

    // SAFETY: after `Message::copy` returns, nothing writes to `env` again: sender threads
    // only load the saved term and pass it to `enif_send` with a NULL message env, which
    // copies from it (read-only). The env is freed once, by the drop of the last `Arc`.
    unsafe impl Sync for Message {}

    impl Message {
        fn copy(term: Term<'_>) -> Message {
            let env = OwnedEnv::new();
            let term = env.save(term);
            Message { env, term }
        }

        /// Sends the message to every pid. Runs on a sender thread (not managed by the VM),
        /// where `Env::send` copies the term into each receiver's heap.
        fn send_to(&self, pids: impl Iterator<Item = u64>) {
            self.env.run(|env| {
                let term = self.term.load(env);
                for pid in pids {
                    // A dead receiver is not an error: the monitor removes it shortly.
                    let _ = env.send(&pid_from_raw(pid), term);
                }
            });
        }
    }

    enum Job {
        /// Deliver `message` to every pid of one partition's snapshot.
        Deliver { message: Arc<Message>, part: Part },
        /// One per queue: the last queue to reach it sends `message` to `to`, which tells
        /// `to` that everything it queued before has been delivered.
        Reply {
            message: Arc<Message>,
            to: u64,
            remaining: Arc<AtomicUsize>,
        },
    }

    fn handle_job(_queue: usize, job: Job) {
        match job {
            Job::Deliver { message, part } => message.send_to(part.pids()),
            Job::Reply {
                message,
                to,
                remaining,
            } => {
                if remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                    message.send_to(std::iter::once(to));
                }
            }
        }
    }

    struct State {
        registry: Registry<Monitor>,
        closed: bool,
    }

    /// One dispatcher: the registry plus its sender threads. Held by the Elixir side as a
    /// resource; process monitors belong to it.
    pub struct Dispatcher {
        state: Mutex<State>,
        fanout: Fanout<Job>,
    }

    impl Dispatcher {
        fn lock(&self) -> MutexGuard<'_, State> {
            // A panic while the lock was held cannot leave the registry half-updated in a way
            // that matters more than refusing every later call would, so keep serving.
            self.state
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        }
    }

    #[rustler::resource_impl]
    impl Resource for Dispatcher {
        const IMPLEMENTS_DOWN: bool = true;

        fn down<'a>(&'a self, _env: Env<'a>, pid: LocalPid, _monitor: Monitor) {
            // rustler catches panics here too, but do not rely on the version for that.
            let _ = catch_unwind(AssertUnwindSafe(|| {
                self.lock().registry.remove_subscriber(pid_to_raw(&pid));
            }));
        }
    }

    /// Jobs of one dispatch or sync that did not fit; the caller pushes them from a dirty
    /// scheduler, where waiting for room is allowed.
    pub struct Pending {
        dispatcher: ResourceArc<Dispatcher>,
        jobs: Mutex<Vec<(usize, Job)>>,
    }

    #[rustler::resource_impl]
    impl Resource for Pending {}

    fn pid_to_raw(pid: &LocalPid) -> u64 {
        // SAFETY: `ErlNifPid` is `#[repr(C)]` around a single `ERL_NIF_TERM` (a u64), so the
        // two have the same size and layout and every bit pattern of either is valid.
        unsafe { std::mem::transmute::<ErlNifPid, u64>(*pid.as_c_arg()) }
    }

    fn pid_from_raw(raw: u64) -> LocalPid {
        // SAFETY: see `pid_to_raw`; `raw` always comes from `pid_to_raw` of a local pid, an
        // immediate term that stays valid for the life of the VM.
        LocalPid::from_c_arg(unsafe { std::mem::transmute::<u64, ErlNifPid>(raw) })
    }

    /// Queues `jobs` in order without waiting. Returns `ok`, `closed`, or `{full, pending}`
    /// with the jobs that did not fit, in order, for `push_pending/1`.
    fn enqueue<'a>(
        env: Env<'a>,
        dispatcher: &ResourceArc<Dispatcher>,
        jobs: impl IntoIterator<Item = (usize, Job)>,
    ) -> Term<'a> {
        let mut jobs = jobs.into_iter();
        while let Some((queue, job)) = jobs.next() {
            match dispatcher.fanout.try_push(queue, job) {
                Ok(()) => {}
                Err(PushError::Closed(_)) => return atoms::closed().encode(env),
                Err(PushError::Full(job)) => {
                    let mut rest = vec![(queue, job)];
                    rest.extend(jobs);
                    let pending = ResourceArc::new(Pending {
                        dispatcher: dispatcher.clone(),
                        jobs: Mutex::new(rest),
                    });
                    return (atoms::full(), pending).encode(env);
                }
            }
        }
        atoms::ok().encode(env)
    }

    #[rustler::nif(schedule = "DirtyIo")]
    fn new(threads: usize, queue_capacity: usize) -> NifResult<ResourceArc<Dispatcher>> {
        let partitions = threads.max(1);
        let fanout = Fanout::start(partitions, queue_capacity, "ex_atlas_send", handle_job)
            .map_err(|error| {
                rustler::Error::Term(Box::new(format!("thread spawn failed: {error}")))
            })?;
        Ok(ResourceArc::new(Dispatcher {
            state: Mutex::new(State {
                registry: Registry::new(partitions),
                closed: false,
            }),
            fanout,
        }))
    }

    #[rustler::nif]
    fn subscribe(env: Env<'_>, dispatcher: ResourceArc<Dispatcher>, topic: Binary<'_>) -> Atom {
        let pid = env.pid();
        let mut state = dispatcher.lock();
        if state.closed {
            return atoms::closed();
        }
        let result = state
            .registry
            .subscribe(topic.as_slice(), pid_to_raw(&pid), || {
                dispatcher.monitor(Some(env), &pid)
            });
        match result {
            Ok(()) => atoms::ok(),
            Err(SubscribeError::NotAlive) => atoms::not_alive(),
            Err(SubscribeError::TooManyTopics) => atoms::too_many_topics(),
        }
    }

    /// Removes every subscription of `pid` to `topic`; returns how many went.
    fn remove(
        env: Env<'_>,
        dispatcher: &ResourceArc<Dispatcher>,
        topic: &[u8],
        pid: &LocalPid,
    ) -> usize {
        let removed = dispatcher
            .lock()
            .registry
            .unsubscribe(topic, pid_to_raw(pid));
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
        let snapshot = {
            let state = dispatcher.lock();
            if state.closed {
                return atoms::closed().encode(env);
            }
            state.registry.snapshot(topic.as_slice())
        };
        if snapshot.is_empty() {
            return atoms::ok().encode(env);
        }
        let message = Arc::new(Message::copy(message));
        let jobs = snapshot.into_iter().map(|(queue, part)| {
            let message = message.clone();
            (queue, Job::Deliver { message, part })
        });
        enqueue(env, &dispatcher, jobs)
    }

    #[rustler::nif]
    fn sync<'a>(env: Env<'a>, dispatcher: ResourceArc<Dispatcher>, reply: Term<'a>) -> Term<'a> {
        if dispatcher.lock().closed {
            return atoms::closed().encode(env);
        }
        let to = pid_to_raw(&env.pid());
        let threads = dispatcher.fanout.threads();
        let message = Arc::new(Message::copy(reply));
        let remaining = Arc::new(AtomicUsize::new(threads));
        let jobs = (0..threads).map(|queue| {
            let job = Job::Reply {
                message: message.clone(),
                to,
                remaining: remaining.clone(),
            };
            (queue, job)
        });
        enqueue(env, &dispatcher, jobs)
    }

    #[rustler::nif(schedule = "DirtyIo")]
    fn push_pending(pending: ResourceArc<Pending>) -> Atom {
        let jobs = std::mem::take(&mut *pending.jobs.lock().unwrap_or_else(|p| p.into_inner()));
        for (queue, job) in jobs {
            if pending.dispatcher.fanout.push(queue, job).is_err() {
                return atoms::closed();
            }
        }
        atoms::ok()
    }

    #[rustler::nif]
    fn count(dispatcher: ResourceArc<Dispatcher>, topic: Binary<'_>) -> usize {
        dispatcher.lock().registry.count(topic.as_slice())
    }

    #[rustler::nif(schedule = "DirtyCpu")]
    fn subscribers(dispatcher: ResourceArc<Dispatcher>, topic: Binary<'_>) -> Vec<LocalPid> {
        let snapshot = dispatcher.lock().registry.snapshot(topic.as_slice());
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
        let names = dispatcher.lock().registry.topics_of(pid_to_raw(&pid));
        names
            .iter()
            .map(|name| {
                let mut binary = NewBinary::new(env, name.len());
                binary.as_mut_slice().copy_from_slice(name);
                Term::from(binary)
            })
            .collect()
    }

    #[rustler::nif]
    fn stats(dispatcher: ResourceArc<Dispatcher>) -> Vec<(Atom, u64)> {
        let registry = dispatcher.lock().registry.stats();
        let queues = dispatcher.fanout.stats();
        vec![
            (atoms::topics(), registry.topics as u64),
            (atoms::subscriptions(), registry.subscriptions as u64),
            (atoms::subscribers(), registry.subscribers as u64),
            (atoms::monitors(), registry.subscribers as u64),
            (atoms::threads(), queues.threads as u64),
            (atoms::queue_capacity(), queues.capacity as u64),
            (atoms::queued(), queues.queued as u64),
            (atoms::max_queued(), queues.max_queued as u64),
            (atoms::handled(), queues.handled),
            (atoms::panicked(), queues.panicked),
            (atoms::running(), queues.running as u64),
            (atoms::allocated_bytes(), memory::live_bytes() as u64),
        ]
    }

    #[rustler::nif(schedule = "DirtyIo")]
    fn close(env: Env<'_>, dispatcher: ResourceArc<Dispatcher>) -> Atom {
        let monitors = {
            let mut state = dispatcher.lock();
            state.closed = true;
            state.registry.drain_monitors()
        };
        for monitor in &monitors {
            dispatcher.demonitor(Some(env), monitor);
        }
        dispatcher.fanout.close();
        atoms::ok()
    }

    fn load(_env: Env, _info: Term) -> bool {
        pin_library();
        true
    }

    /// Keeps this library mapped for the life of the VM. Sender threads may still be running
    /// our code when the module is purged, and rustler has no `unload` callback to stop them;
    /// unmapping the code under them would crash the VM.
    fn pin_library() {
        // SAFETY: `dladdr` only reads the address of one of our own functions and fills
        // `info`; `dlopen` with RTLD_NOLOAD opens nothing new, it only takes another reference
        // to the already loaded library (the path `dladdr` returned) and marks it
        // RTLD_NODELETE. The handle is deliberately never closed.
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
