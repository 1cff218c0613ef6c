//! Giving memory the operator has freed back to the system.
//!
//! glibc's allocator keeps freed memory in its heap for later allocations. When a fleet shrinks
//! (nodes leave, images are deleted) the pacer and the caches free most of what they held, yet the
//! process's resident size stays at its peak, which is what a memory limit and a dashboard see.
//! `malloc_trim` hands the whole free pages inside the heap back to the kernel; run once a minute
//! it costs a few milliseconds, and nothing when nothing was freed. With another allocator or libc
//! there is nothing to do.
//!
//! glibc also gives each thread that allocates at the same time as another an arena of its own,
//! and memory freed in one arena serves only that arena's later allocations. The operator's
//! allocations are small and short (a reconcile at a time per worker) and its worker threads take
//! turns at them, so the arenas fragment side by side: in the 5000-node benchmark, the allocator
//! held 118 MiB from the system for 79 MiB in use, most of it in two arenas. [`one_arena`] keeps
//! every thread on one.

use std::time::Duration;

/// How often freed memory is handed back.
pub const TRIM_PERIOD: Duration = Duration::from_secs(60);

/// Hands freed memory back every `period`, forever (spawn it).
pub async fn trim_every(period: Duration) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        trim();
    }
}

/// Hands the allocator's free pages back to the kernel.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn trim() {
    // SAFETY: `malloc_trim` works on the allocator's own bookkeeping under its own locks; it
    // touches no memory of ours and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Makes every thread allocate from one arena (see the module documentation). Call it before any
/// thread but the main one exists.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn one_arena() {
    // SAFETY: `mallopt` only sets a parameter of the allocator, under its own lock; called before
    // other threads start, it applies to every arena created afterwards (none will be).
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Nothing to set with this platform's allocator.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn one_arena() {}

/// Nothing to hand back with this platform's allocator.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_trim_after_a_large_free_keeps_the_heap_usable() {
        let big: Vec<Vec<u8>> = (0..1000).map(|i| vec![i as u8; 16 * 1024]).collect();
        let kept = big[999].clone();
        drop(big);
        trim();
        assert_eq!(kept.len(), 16 * 1024);
        assert!(kept.iter().all(|&b| b == (999 % 256) as u8));
        let again: Vec<u8> = vec![7; 1 << 20];
        assert_eq!(again.iter().map(|&b| u64::from(b)).sum::<u64>(), 7 << 20);
    }
}
