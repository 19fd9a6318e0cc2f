// SPDX-License-Identifier: GPL-2.0

//! A workqueue owned by the caller (the kernel crate only offers the system ones).
//!
//! C header: [`include/linux/workqueue.h`](srctree/include/linux/workqueue.h)

use super::bindings;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};
use kernel::error::{code::ENOMEM, Result};
use kernel::str::CStr;
use kernel::workqueue::Queue;

/// An own workqueue: `WQ_UNBOUND`, with a rescuer (`WQ_MEM_RECLAIM`) if
/// asked for, or per-CPU and high-priority (`new_local_highpri`).
/// [`shutdown`] drains and destroys it (so that the owner can do so before
/// the state its work items use goes away); drop does it otherwise.
///
/// Under memory pressure a `WQ_MEM_RECLAIM` queue may be down to its one
/// rescuer thread: work that sleeps or waits long there delays every other
/// item of the queue, so such work gets a queue of its own.
///
/// [`shutdown`]: OwnedQueue::shutdown
pub(crate) struct OwnedQueue {
    ptr: NonNull<bindings::workqueue_struct>,
    dead: AtomicBool,
}

// SAFETY: Workqueues may be used and destroyed from any thread.
unsafe impl Send for OwnedQueue {}
// SAFETY: Queueing work is thread-safe; `dead` guards use after shutdown.
unsafe impl Sync for OwnedQueue {}

impl OwnedQueue {
    /// Allocates a workqueue named `name` (copied); `mem_reclaim`: with a
    /// rescuer, for work that I/O under memory pressure waits for.
    pub(crate) fn new(name: &CStr, mem_reclaim: bool) -> Result<Self> {
        // SAFETY: `name` is a valid C string; the shim copies it with "%s".
        // The new workqueue (or null) is ours alone.
        unsafe {
            Self::owning(bindings::dmq_alloc_workqueue(
                name.as_char_ptr(),
                mem_reclaim,
            ))
        }
    }

    /// Allocates a per-CPU, high-priority workqueue named `name` (copied),
    /// with a rescuer: a work item runs on the CPU that queued it, in a
    /// worker that the scheduler runs ahead of normal tasks there.
    pub(crate) fn new_local_highpri(name: &CStr) -> Result<Self> {
        // SAFETY: `name` is a valid C string; the shim copies it with "%s".
        // The new workqueue (or null) is ours alone.
        unsafe {
            Self::owning(bindings::dmq_alloc_local_highpri_workqueue(
                name.as_char_ptr(),
            ))
        }
    }

    /// Takes ownership of a workqueue just allocated (null: it was not).
    ///
    /// # Safety
    ///
    /// `p` is null or a workqueue nobody else owns or destroys.
    unsafe fn owning(p: *mut bindings::workqueue_struct) -> Result<Self> {
        let ptr = NonNull::new(p).ok_or(ENOMEM)?;
        Ok(Self {
            ptr,
            dead: AtomicBool::new(false),
        })
    }

    /// The queue, for enqueueing work; `None` once shut down.
    ///
    /// A work item of this queue may still enqueue while `shutdown` drains
    /// it (the workqueue allows such chained work); nothing else may race
    /// with `shutdown`.
    pub(crate) fn queue(&self) -> Option<&Queue> {
        if self.dead.load(Ordering::Acquire) {
            return None;
        }
        // SAFETY: The workqueue is alive until `shutdown` or drop, and only
        // chained work can call this concurrently with `shutdown` (see above).
        Some(unsafe { Queue::from_raw(self.ptr.as_ptr()) })
    }

    /// Waits for every work item queued so far to finish.
    pub(crate) fn flush(&self) {
        if !self.dead.load(Ordering::Acquire) {
            // SAFETY: The workqueue is alive until shutdown.
            unsafe { bindings::__flush_workqueue(self.ptr.as_ptr()) };
        }
    }

    /// Drains and destroys the workqueue. Must not be called from one of its
    /// work items.
    pub(crate) fn shutdown(&self) {
        if !self.dead.swap(true, Ordering::AcqRel) {
            // SAFETY: We own the workqueue and destroy it once (the flag).
            // `destroy_workqueue` drains it first, chained work included.
            unsafe { bindings::destroy_workqueue(self.ptr.as_ptr()) };
        }
    }
}

impl Drop for OwnedQueue {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The CPU the caller ran on a moment ago (`raw_smp_processor_id`): a hint
/// for spreading work, stale as soon as it is read (the caller may move).
pub(crate) fn this_cpu() -> u32 {
    // SAFETY: Reads the current CPU's number; no preconditions.
    unsafe { bindings::dmq_this_cpu() }
}

/// How many CPU numbers there may be (`nr_cpu_ids`): every CPU's number is
/// below it.
pub(crate) fn nr_cpu_ids() -> u32 {
    // SAFETY: Reads a variable set once at boot; no preconditions.
    unsafe { bindings::dmq_nr_cpu_ids() }
}
