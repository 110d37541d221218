//! The synchronisation primitives of the lane state machines (`fanout`, `handoff`): the
//! standard library's, or loom's when the crate is built with `--cfg loom`, so that the
//! loom models in `loom_tests.rs` explore every interleaving of the very same code (loom
//! is a dev-dependency: only the test build swaps).

#[cfg(all(test, loom))]
pub use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
#[cfg(all(test, loom))]
pub use loom::sync::{Mutex, MutexGuard};

#[cfg(not(all(test, loom)))]
pub use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
#[cfg(not(all(test, loom)))]
pub use std::sync::{Mutex, MutexGuard};

pub use std::sync::atomic::Ordering;

/// Locks `mutex`. Every critical section of the state machines leaves its data consistent
/// before anything that could panic, so a poisoned lock is still safe to use.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
