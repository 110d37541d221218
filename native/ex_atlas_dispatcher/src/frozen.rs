//! Kept messages (replay): a dispatched term copied into an environment of its own,
//! immutable from then on, and the size we account for it.

use rustler::sys::{self, ErlNifEnv, ErlNifMapIterator, ErlNifMapIteratorEntry, ErlNifTerm};
use rustler::{Env, Term};
use smallvec::SmallVec;

/// A copy of a message in a process-independent environment, never changed after
/// `freeze`: sends copy out of it (`enif_send` with no message environment), from any
/// process, any number of times at once, as ETS lookups copy out of a table.
pub struct Frozen {
    env: *mut ErlNifEnv,
    term: ErlNifTerm,
}

// SAFETY: a process-independent environment is not tied to a thread, and after `freeze`
// nothing writes to it until `drop`, which runs once, when the last handle goes; readers
// only copy the term (a copy touches the source only through reference counts of the
// binaries it holds, which the VM keeps atomically).
unsafe impl Send for Frozen {}
unsafe impl Sync for Frozen {}

impl Frozen {
    /// Copies `message` into an environment of its own.
    pub fn freeze(message: Term<'_>) -> Self {
        // SAFETY: the environment is allocated here and owned by the `Frozen` (freed in
        // `drop`); `enif_make_copy` copies a valid term of the caller's env into it.
        unsafe {
            let env = sys::enif_alloc_env();
            let term = sys::enif_make_copy(env, message.as_c_arg());
            Frozen { env, term }
        }
    }

    /// The kept term, to be copied (sent) by the caller: valid as long as `self`.
    pub fn term<'a>(&self, caller: Env<'a>) -> Term<'a> {
        // SAFETY: the term lives in `self.env`, alive and unchanged as long as `self`;
        // the caller only passes it to `enif_send` with no message env, which copies it.
        unsafe { Term::new(caller, self.term) }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: allocated in `freeze`, freed exactly once here.
        unsafe { sys::enif_free_env(self.env) }
    }
}

const WORD: usize = 8;
/// Binaries up to this size live on the heap; larger ones are shared, reference-counted.
const HEAP_BINARY_MAX: usize = 64;
/// Maps up to this size are flat (a keys tuple and the values).
const FLATMAP_MAX: usize = 32;

/// About the memory a copy of `term` takes, in bytes: its heap words as the VM lays them
/// out on a 64-bit machine (as `:erts_debug.flat_size/1` counts them) plus the bytes of
/// the reference-counted binaries it holds (each counted whole, even when shared with
/// other terms, and only their own size when a slice of a bigger binary). The walk keeps
/// its own stack, so no nesting overflows ours.
pub fn term_bytes(env: Env<'_>, term: Term<'_>) -> usize {
    let env = env.as_c_arg();
    let mut stack: SmallVec<[ErlNifTerm; 32]> = SmallVec::new();
    stack.push(term.as_c_arg());
    // The root's own word.
    let mut bytes = WORD;
    while let Some(term) = stack.pop() {
        // SAFETY (every call below): `term` is a term of `env` (the root or a part of
        // it), `env` is the calling process's env for this NIF call, and every
        // out-pointer points to a local of the right type.
        bytes += unsafe { node_bytes(env, term, &mut stack) };
    }
    bytes
}

/// The bytes of `term`'s own node (not counting the word that refers to it); pushes the
/// terms it holds.
unsafe fn node_bytes(
    env: *mut ErlNifEnv,
    term: ErlNifTerm,
    stack: &mut SmallVec<[ErlNifTerm; 32]>,
) -> usize {
    use rustler::sys::ErlNifTermType::*;
    match sys::enif_term_type(env, term) {
        ERL_NIF_TERM_TYPE_ATOM | ERL_NIF_TERM_TYPE_PID | ERL_NIF_TERM_TYPE_PORT => 0,
        ERL_NIF_TERM_TYPE_INTEGER => {
            let mut small = 0i64;
            let fits = sys::enif_get_int64(env, term, &mut small) != 0
                && (-(1i64 << 59)..(1i64 << 59)).contains(&small);
            if fits {
                0
            } else {
                3 * WORD
            }
        }
        ERL_NIF_TERM_TYPE_FLOAT => 2 * WORD,
        ERL_NIF_TERM_TYPE_BITSTRING => {
            let mut binary = std::mem::MaybeUninit::uninit();
            if sys::enif_inspect_binary(env, term, binary.as_mut_ptr()) == 0 {
                return 4 * WORD;
            }
            let size = binary.assume_init().size;
            if size <= HEAP_BINARY_MAX {
                2 * WORD + size.div_ceil(WORD) * WORD
            } else {
                6 * WORD + size
            }
        }
        ERL_NIF_TERM_TYPE_TUPLE => {
            let mut arity = 0;
            let mut items: *const ErlNifTerm = std::ptr::null();
            if sys::enif_get_tuple(env, term, &mut arity, &mut items) == 0 || items.is_null() {
                return WORD;
            }
            let items = std::slice::from_raw_parts(items, arity as usize);
            stack.extend_from_slice(items);
            (1 + items.len()) * WORD
        }
        ERL_NIF_TERM_TYPE_LIST => {
            let (mut bytes, mut rest) = (0, term);
            let (mut head, mut tail) = (term, term);
            while sys::enif_get_list_cell(env, rest, &mut head, &mut tail) != 0 {
                bytes += 2 * WORD;
                stack.push(head);
                rest = tail;
            }
            if sys::enif_is_empty_list(env, rest) == 0 {
                // An improper tail.
                stack.push(rest);
            }
            bytes
        }
        ERL_NIF_TERM_TYPE_MAP => {
            let mut size = 0;
            if sys::enif_get_map_size(env, term, &mut size) == 0 {
                return WORD;
            }
            let mut iter = std::mem::MaybeUninit::<ErlNifMapIterator>::uninit();
            let created = sys::enif_map_iterator_create(
                env,
                term,
                iter.as_mut_ptr(),
                ErlNifMapIteratorEntry::ERL_NIF_MAP_ITERATOR_HEAD,
            ) != 0;
            if created {
                let (mut key, mut value) = (term, term);
                while sys::enif_map_iterator_get_pair(env, iter.as_mut_ptr(), &mut key, &mut value)
                    != 0
                {
                    stack.push(key);
                    stack.push(value);
                    sys::enif_map_iterator_next(env, iter.as_mut_ptr());
                }
                sys::enif_map_iterator_destroy(env, iter.as_mut_ptr());
            }
            if size <= FLATMAP_MAX {
                // Header, size, keys pointer and values; the keys tuple.
                (3 + size + 1 + size) * WORD
            } else {
                // A hash trie: the pairs, and about one node word per pair.
                3 * size * WORD
            }
        }
        // A reference or a fun (its environment is not visible here): a few words.
        _ => 8 * WORD,
    }
}
