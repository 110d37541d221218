//! A global allocator that counts the bytes the library holds, so the NIF can report its
//! own memory (the benchmark's bytes per subscription, the leak soak's "back to start").
//!
//! It is installed only with the `alloc-stats` cargo feature: every allocation pays one
//! atomic add on a counter shared by all threads, which production builds need not pay.
//! The Mix compiler turns the feature on outside `MIX_ENV=prod`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

/// `System` plus a live-byte counter.
pub struct CountingAllocator;

// SAFETY: every method forwards to `System` with the caller's own arguments and only adds
// bookkeeping on an atomic counter, so `System`'s guarantees carry over unchanged.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which is `System`'s.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller passes a block this allocator (so `System`) gave out, with
        // the layout it was given out with.
        unsafe { System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`, and the caller upholds `realloc`'s size contract.
        let new_ptr = unsafe { System.realloc(ptr, layout, new_size) };
        if !new_ptr.is_null() {
            LIVE_BYTES.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        new_ptr
    }
}

/// Bytes currently allocated through Rust's allocator by this library; `None` when the
/// counting allocator is not installed (built without `alloc-stats`).
pub fn live_bytes() -> Option<usize> {
    cfg!(feature = "alloc-stats").then(|| LIVE_BYTES.load(Ordering::Relaxed).max(0) as usize)
}
