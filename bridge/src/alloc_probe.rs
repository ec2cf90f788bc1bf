//! The unit tests' allocator: the system's, counting the allocations made
//! by a process other than the test process while a test watches (the
//! spawn's child shares the test's memory, and so its allocator, until its
//! exec).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

struct Counting;

static WATCHING: AtomicBool = AtomicBool::new(false);
static TEST_PID: AtomicI64 = AtomicI64::new(0);
static FOREIGN: AtomicU64 = AtomicU64::new(0);

#[global_allocator]
static ALLOCATOR: Counting = Counting;

// SAFETY: every call is forwarded to the system allocator unchanged; the
// count is a side effect on atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn note() {
    if WATCHING.load(Ordering::Relaxed) {
        // SAFETY: getpid as a raw system call: the child's own pid, where
        // glibc's wrapper could answer from a cache of the parent's.
        let pid = unsafe { libc::syscall(libc::SYS_getpid) };
        if pid != TEST_PID.load(Ordering::Relaxed) {
            FOREIGN.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Starts counting allocations made outside this process.
pub(crate) fn watch() {
    TEST_PID.store(i64::from(std::process::id()), Ordering::Relaxed);
    WATCHING.store(true, Ordering::SeqCst);
}

/// Allocations made outside this process since `watch`.
pub(crate) fn foreign_allocations() -> u64 {
    FOREIGN.load(Ordering::SeqCst)
}
