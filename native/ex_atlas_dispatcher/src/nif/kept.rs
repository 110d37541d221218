//! Kept messages (replay): a dispatched term as the history holds it, and what it costs.
//!
//! Most terms are kept in Erlang's external format, in one binary of exactly their
//! encoded size: compact (an 8 KiB log batch encodes to about 3 KiB), one allocation
//! per message, and a size that is what was allocated, not an estimate (charged with a
//! margin for how allocations spread over the schedulers: `ENCODED_SPREAD`). A joiner
//! decodes each into a message environment of its own and sends it to itself without a
//! further copy.
//!
//! A term that holds a reference or a local fun cannot be kept so: a decoded copy of a
//! NIF resource's or an `:atomics` reference does not keep the object alive, and a
//! local fun is bound to its module's code. Such a term is kept as a copy in an
//! environment of its own (as an ETS table keeps terms), charged with the heap the VM
//! lays out for it, read from the same encoding, plus what an environment costs, both
//! times `FROZEN_SPREAD`.

use crate::etf;
use rustler::sys::{self, ErlNifBinary, ErlNifEnv, ErlNifTerm};
use rustler::{Env, LocalPid, Term};

/// What the VM's binary allocator takes besides the bytes of a binary we allocate: the
/// binary's header (flags, reference count, size) and the allocator's block header.
const BINARY_OVERHEAD: usize = 48;
/// What one process-independent environment costs before the term copied into it: the
/// environment and the phony process inside it, and the smallest heap fragment the VM
/// allocates for a copy. Measured on OTP 25: about 2 520 bytes of `:erlang.memory/0`
/// per kept tiny term with a reference (test/.../replay_memory_test.exs checks the whole
/// bound against resident memory).
const ENV_OVERHEAD: usize = 2_560;
/// What a kept message takes in resident memory, at most, for each byte it takes of the
/// VM's allocators: `(numerator, denominator)`. `replay_memory` is a bound on what the OS
/// sees, and a kept message comes from the allocator instance of the scheduler that
/// keeps it: when the producer moves to another scheduler, the first instance's carriers
/// empty only as the history turns over (a carrier goes back when its last block does),
/// and both are resident meanwhile. Measured with replay_memory_test.exs (segment cache
/// off), resident growth over the unscaled charge:
///
/// * an encoded batch (a binary each, from the binary allocator): 1.00-1.01x with one
///   scheduler, 0.95-1.18x with two (10 and 12 runs), so it is charged 1.25x;
/// * a frozen copy (heap fragments, from the allocator that also holds process heaps):
///   0.88-0.92x with one, 0.92-1.53x with two (14 runs each), so it is charged 1.6x.
const ENCODED_SPREAD: (usize, usize) = (5, 4);
const FROZEN_SPREAD: (usize, usize) = (8, 5);
const WORD: usize = 8;

pub enum Kept {
    /// The external format of the term, in a binary of exactly its size.
    Encoded(Encoded),
    Frozen(Frozen),
}

impl Kept {
    /// Keeps `message`: `(kept, bytes charged for it)`, or `None` when the VM cannot
    /// encode it (a term beyond the external format's limits).
    pub fn of(env: Env<'_>, message: Term<'_>) -> Option<(Kept, usize)> {
        let encoded = Encoded::of(env, message)?;
        let shape = etf::scan(encoded.bytes()).ok()?;
        if !shape.keeps_alive {
            let bytes = spread(encoded.bytes().len() + BINARY_OVERHEAD, ENCODED_SPREAD);
            return Some((Kept::Encoded(encoded), bytes));
        }
        drop(encoded);
        let allocated = ENV_OVERHEAD.saturating_add(shape.heap_words.saturating_mul(WORD));
        // Off-heap binaries it refers to are shared (the history holds a reference), not
        // laid out by the copy, and are charged at their size.
        let bytes = spread(allocated, FROZEN_SPREAD).saturating_add(shape.refc_bytes);
        Some((Kept::Frozen(Frozen::of(message)), bytes))
    }

    /// Sends a copy of the kept term to `pid` from the calling process `caller`, built
    /// in `out` (a process-independent environment, emptied by the send). False when it
    /// could not be sent.
    pub fn send(&self, caller: Env<'_>, out: &Scratch, pid: &LocalPid) -> bool {
        let term = match self {
            Kept::Encoded(encoded) => match encoded.decode(out) {
                Some(term) => term,
                None => return false,
            },
            Kept::Frozen(frozen) => frozen.copy_into(out),
        };
        out.send(caller, pid, term)
    }
}

/// `bytes` allocated, charged for how they spread over the schedulers' allocators.
fn spread(bytes: usize, (numerator, denominator): (usize, usize)) -> usize {
    bytes.saturating_mul(numerator) / denominator
}

/// A term's external format, in a binary the VM allocated and we own.
pub struct Encoded {
    binary: ErlNifBinary,
}

// SAFETY: the binary is never written after `of`; reading it from several threads at
// once is reading plain bytes, and releasing it (once, in `drop`) is allowed from any
// thread.
unsafe impl Send for Encoded {}
unsafe impl Sync for Encoded {}

impl Encoded {
    fn of(env: Env<'_>, term: Term<'_>) -> Option<Self> {
        let mut binary = std::mem::MaybeUninit::<ErlNifBinary>::uninit();
        // SAFETY: `term` is a term of `env`, the calling process's env; on success the VM
        // fills `binary` with a binary we own (released in `drop`).
        let binary = unsafe {
            if sys::enif_term_to_binary(env.as_c_arg(), term.as_c_arg(), binary.as_mut_ptr()) == 0 {
                return None;
            }
            binary.assume_init()
        };
        let mut encoded = Encoded { binary };
        // The VM allocates for the largest size the term could take and then fills less;
        // giving back the rest makes what is kept exactly what is charged.
        let size = encoded.binary.size;
        // SAFETY: our own binary; shrinking to its filled size keeps its bytes. On
        // failure it is left as it was, still valid.
        unsafe { sys::enif_realloc_binary(&mut encoded.binary, size) };
        Some(encoded)
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `data` points to `size` bytes owned by this binary, unchanged until it
        // is released in `drop`.
        unsafe { std::slice::from_raw_parts(self.binary.data, self.binary.size) }
    }

    fn decode<'a>(&self, out: &'a Scratch) -> Option<Term<'a>> {
        let mut term = ErlNifTerm::default();
        let bytes = self.bytes();
        // SAFETY: `out.env` is a live process-independent environment; the bytes are a
        // whole encoding the VM made; the term is built in `out.env`.
        let read =
            unsafe { sys::enif_binary_to_term(out.env, bytes.as_ptr(), bytes.len(), &mut term, 0) };
        // SAFETY: a term of `out.env`, tied to the borrow of `out`.
        (read == bytes.len()).then(|| unsafe { Term::new(out.handle(), term) })
    }
}

impl Drop for Encoded {
    fn drop(&mut self) {
        // SAFETY: made by enif_term_to_binary in `of`, released exactly once here.
        unsafe { sys::enif_release_binary(&mut self.binary) }
    }
}

/// A copy of a term in a process-independent environment of its own, never changed
/// after `of`.
pub struct Frozen {
    env: *mut ErlNifEnv,
    term: ErlNifTerm,
}

// SAFETY: a process-independent environment is not tied to a thread, and after `of`
// nothing writes to it until `drop`, which runs once, when the last handle goes; readers
// only copy the term out (`enif_make_copy` reads the source and touches shared binaries
// only through their atomic reference counts).
unsafe impl Send for Frozen {}
unsafe impl Sync for Frozen {}

impl Frozen {
    fn of(message: Term<'_>) -> Self {
        // SAFETY: the environment is allocated here and owned by the `Frozen` (freed in
        // `drop`); `enif_make_copy` copies a valid term of the caller's env into it.
        unsafe {
            let env = sys::enif_alloc_env();
            let term = sys::enif_make_copy(env, message.as_c_arg());
            Frozen { env, term }
        }
    }

    /// A copy of the kept term in `out`.
    fn copy_into<'a>(&self, out: &'a Scratch) -> Term<'a> {
        // SAFETY: `enif_make_copy` accepts a source term of any environment: ours lives
        // in `self.env`, alive and unchanged as long as `self`; the copy is made in
        // `out.env` and tied to the borrow of `out`.
        unsafe { Term::new(out.handle(), sys::enif_make_copy(out.env, self.term)) }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: allocated in `of`, freed exactly once here.
        unsafe { sys::enif_free_env(self.env) }
    }
}

/// A process-independent environment in which one message at a time is built and then
/// moved to its receiver by `enif_send` (no further copy), for one NIF call.
pub struct Scratch {
    env: *mut ErlNifEnv,
    marker: (),
}

impl Scratch {
    pub fn new() -> Self {
        Scratch {
            // SAFETY: freed in `drop`.
            env: unsafe { sys::enif_alloc_env() },
            marker: (),
        }
    }

    fn handle(&self) -> Env<'_> {
        // SAFETY: the environment lives as long as `self`; terms made through the
        // handle are tied to the borrow of `self`.
        unsafe { Env::new(&self.marker, self.env) }
    }

    /// Sends `term`, a term of this environment, to `pid` from `caller`'s process. The
    /// environment is empty afterwards either way.
    fn send(&self, caller: Env<'_>, pid: &LocalPid, term: Term<'_>) -> bool {
        // SAFETY: `caller` is the calling process's env, valid for this call; `term` is
        // a term of `self.env` (see `Kept::send`). A successful send empties the
        // environment; after a failed one we empty it.
        unsafe {
            let sent =
                sys::enif_send(caller.as_c_arg(), pid.as_c_arg(), self.env, term.as_c_arg()) != 0;
            if !sent {
                sys::enif_clear_env(self.env);
            }
            sent
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: allocated in `new`, freed exactly once here.
        unsafe { sys::enif_free_env(self.env) }
    }
}
