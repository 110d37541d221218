//! ExAtlas's dispatcher as a NIF library: a duplicate-key registry of local pids and
//! off-scheduler fan-out, for `ExAtlas.Fly.Dispatcher.Native`.
//!
//! The core is plain Rust, tested with `cargo test` without a VM (the lane state
//! machines also with loom): `registry` (topic → subscribers), `route` (which process
//! sends which part of a dispatch), `fanout` (the lanes' credits), `handoff` (batches on
//! their way to a lane's sender), `history` (replay), `etf` (what an encoded term
//! holds). The glue, `nif`, decodes terms, calls the core and encodes results; this
//! file loads it.

// Every unsafe operation is marked as such, with its SAFETY comment, even inside an
// `unsafe fn`.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod activity;
pub mod etf;
pub mod fanout;
pub mod handoff;
pub mod history;
#[cfg(all(test, loom))]
mod loom_tests;
pub mod memory;
// The glue references `enif_*` symbols that only the VM provides, so a test binary could
// not link it; `cargo test` covers the core modules without a VM.
#[cfg(not(test))]
mod nif;
pub mod registry;
pub mod route;
pub mod skip;
#[cfg(all(test, not(loom)))]
mod stress_tests;
pub mod sync;

#[cfg(feature = "alloc-stats")]
#[global_allocator]
static ALLOCATOR: memory::CountingAllocator = memory::CountingAllocator;

#[cfg(not(test))]
use rustler::{Env, Term};

// The NIFs and the resource types (`Dispatcher`, `Batch`, `Pending`) register
// themselves wherever they are defined (rustler collects them with `inventory`); `load`
// opens the resource types before it runs.
#[cfg(not(test))]
fn load(_env: Env, _info: Term) -> bool {
    pin_library();
    // A fresh load after the module was purged maps this same library again (it is
    // pinned), statics and all. What the old copy published is a resource of the old
    // copy's type, which none of this copy's other functions accept: publish nothing
    // until a server of this copy starts, so that every call agrees.
    nif::unpublish();
    true
}

/// Keeps this library mapped for the life of the VM: a batch may still be in a
/// sender's hands when the module is purged, and rustler has no `unload` callback.
/// `dladdr` and `RTLD_NODELETE` are POSIX/glibc/BSD/macOS extensions that `libc`
/// exposes on every Unix we build for (checked for Linux, macOS and FreeBSD).
#[cfg(all(unix, not(test)))]
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

#[cfg(not(test))]
rustler::init!("Elixir.ExAtlas.Fly.Dispatcher.Native", load = load);
