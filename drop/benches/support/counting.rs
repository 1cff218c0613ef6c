//! The benches' counting allocator: the system allocator, counting the bytes and allocations live
//! at any time, so a bench can print the heap a structure holds. A bench uses it with
//! `#[path = "support/counting.rs"] mod counting;` and installs it as its global allocator.

#![allow(dead_code, reason = "each bench uses the part it needs")]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, counting the bytes and allocations live at any time.
pub struct Counting;

static BYTES: AtomicUsize = AtomicUsize::new(0);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are updated.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same layout as the caller's, as `GlobalAlloc::alloc` requires.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        ALLOCATIONS.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Heap held: bytes and allocations.
#[derive(Clone, Copy)]
pub struct Held {
    pub bytes: usize,
    pub allocations: usize,
}

impl Held {
    pub fn now() -> Self {
        Self {
            bytes: BYTES.load(Ordering::Relaxed),
            allocations: ALLOCATIONS.load(Ordering::Relaxed),
        }
    }

    pub fn since(self, before: Self) -> Self {
        Self {
            bytes: self.bytes.saturating_sub(before.bytes),
            allocations: self.allocations.saturating_sub(before.allocations),
        }
    }

    /// MiB, counting glibc's 16 bytes of bookkeeping per allocation.
    pub fn mib(self) -> f64 {
        (self.bytes + 16 * self.allocations) as f64 / (1024.0 * 1024.0)
    }
}
