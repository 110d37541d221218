//! Term and environment plumbing: pids as the raw words the core stores, sends from the
//! calling process's environment, topic names as binaries, and messages built in an
//! environment of their own ([`Outgoing`]).

use super::atoms;
use rustler::sys::ErlNifPid;
use rustler::types::binary::NewBinary;
use rustler::{Decoder, Env, LocalPid, NifResult, Term};

pub(super) fn pid_to_raw(pid: &LocalPid) -> u64 {
    // SAFETY: `ErlNifPid` is `#[repr(C)]` around a single `ERL_NIF_TERM` (a u64), so
    // the two have the same size and layout and every bit pattern of either is valid.
    unsafe { std::mem::transmute::<ErlNifPid, u64>(*pid.as_c_arg()) }
}

pub(super) fn pid_from_raw(raw: u64) -> LocalPid {
    // SAFETY: see `pid_to_raw`; `raw` always comes from `pid_to_raw` of a local pid,
    // an immediate term that stays valid for the life of the VM.
    LocalPid::from_c_arg(unsafe { std::mem::transmute::<u64, ErlNifPid>(raw) })
}

/// Sends `message` from the calling process's env to the local pid `raw`, as
/// `enif_send` does; `false` when the receiver is gone. Rustler's `Env::send` would ask
/// the VM which kind of thread this is on every send (a thread-local read), which is
/// a measurable share of a small dispatch.
pub(super) fn send_from(env: Env<'_>, raw: u64, message: Term<'_>) -> bool {
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
pub(super) fn current_process_alive(env: Env<'_>) -> bool {
    // SAFETY: `env` is the calling process's env, valid for this call.
    unsafe { rustler::sys::enif_is_current_process_alive(env.as_c_arg()) != 0 }
}

/// A topic name as a binary term of `env`.
pub(super) fn binary_term<'a>(env: Env<'a>, bytes: &[u8]) -> Term<'a> {
    let mut binary = NewBinary::new(env, bytes.len());
    binary.as_mut_slice().copy_from_slice(bytes);
    Term::from(binary)
}

/// `term` as a `T`, or `None` for `:undefined`; badarg for anything else.
pub(super) fn decode_or_undefined<'a, T: Decoder<'a>>(term: Term<'a>) -> NifResult<Option<T>> {
    match term.decode::<T>() {
        Ok(value) => Ok(Some(value)),
        Err(_) if term == atoms::undefined().to_term(term.get_env()) => Ok(None),
        Err(_) => Err(rustler::Error::BadArg),
    }
}

/// A message built in an environment of its own, which a send moves to the receiver
/// whole. Every message that carries a resource of ours goes this way: a message
/// built in the caller's environment stays on the caller's heap until its next
/// garbage collection, and an idle sender or a waiting producer may not collect for a
/// long time, keeping a dead process's `Batch` or `Pending` alive, and its lane
/// credit with it. Dropping an unsent one frees its terms.
pub(super) struct Outgoing {
    env: *mut rustler::sys::ErlNifEnv,
    term: rustler::sys::ErlNifTerm,
}

// SAFETY: a process-independent environment is not tied to a thread; an `Outgoing` is
// only ever used by whoever holds it (under the parking lock when parked).
unsafe impl Send for Outgoing {}

impl Outgoing {
    pub(super) fn build(build: impl for<'m> FnOnce(Env<'m>) -> Term<'m>) -> Self {
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
    pub(super) fn send(self, caller: Env<'_>, pid: u64) -> Result<(), Outgoing> {
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
        let sent =
            unsafe { rustler::sys::enif_send(caller, pid.as_c_arg(), self.env, self.term) != 0 };
        if sent {
            Ok(())
        } else {
            Err(self)
        }
    }

    /// A copy of the message in `env`, the calling process's.
    pub(super) fn copy_to<'a>(&self, env: Env<'a>) -> Term<'a> {
        // SAFETY: `self.term` lives in `self.env`, alive as long as `self`; the copy is
        // made in `env`, valid for this call.
        unsafe { Term::new(env, rustler::sys::enif_make_copy(env.as_c_arg(), self.term)) }
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        // SAFETY: allocated in `build`, freed exactly once here.
        unsafe { rustler::sys::enif_free_env(self.env) }
    }
}
