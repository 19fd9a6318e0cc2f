// SPDX-License-Identifier: GPL-2.0

//! A workqueue owned by the caller (the kernel crate only offers the system ones).
//!
//! C header: [`include/linux/workqueue.h`](srctree/include/linux/workqueue.h)

use super::bindings;
use super::direct_io::IoCounter;
use core::marker::PhantomData;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};
use kernel::error::{code::ENOMEM, Result};
use kernel::str::CStr;
use kernel::sync::Arc;
use kernel::workqueue::{Queue, RawWorkItem};

/// An own workqueue: `WQ_UNBOUND`, with a rescuer (`WQ_MEM_RECLAIM`) if
/// asked for, or per-CPU and high-priority (`new_local_highpri`).
/// [`shutdown`] drains and destroys it (so that the owner can do so before
/// the state its work items use goes away); drop does it otherwise.
///
/// Every method may be called from any thread at any time, also while
/// another thread shuts the queue down: [`enqueue`] checks and enqueues in
/// an RCU read-side critical section and [`flush`] under a hold of a
/// counter, and `shutdown` marks the queue dead, then waits for a grace
/// period and for the flushes before it destroys it. Work enqueued after
/// that (chained work too) is refused. A second `shutdown` returns at once,
/// possibly before the first has drained the queue.
///
/// Under memory pressure a `WQ_MEM_RECLAIM` queue may be down to its one
/// rescuer thread: work that sleeps or waits long there delays every other
/// item of the queue, so such work gets a queue of its own.
///
/// [`shutdown`]: OwnedQueue::shutdown
/// [`enqueue`]: OwnedQueue::enqueue
/// [`flush`]: OwnedQueue::flush
pub(crate) struct OwnedQueue {
    ptr: NonNull<bindings::workqueue_struct>,
    dead: AtomicBool,
    /// Callers in `flush` (which sleeps, so no RCU read-side section).
    flushes: Arc<IoCounter>,
}

// SAFETY: Workqueues may be used and destroyed from any thread.
unsafe impl Send for OwnedQueue {}
// SAFETY: Queueing work and flushing are thread-safe; `shutdown` waits for
// every caller that saw the queue alive before it destroys it.
unsafe impl Sync for OwnedQueue {}

impl OwnedQueue {
    /// Allocates a workqueue named `name` (copied); `mem_reclaim`: with a
    /// rescuer, for work that I/O under memory pressure waits for.
    pub(crate) fn new(name: &CStr, mem_reclaim: bool) -> Result<Self> {
        let flushes = IoCounter::new()?;
        // SAFETY: `name` is a valid C string; the shim copies it with "%s".
        // The new workqueue (or null) is ours alone.
        unsafe {
            Self::owning(
                bindings::dmq_alloc_workqueue(name.as_char_ptr(), mem_reclaim),
                flushes,
            )
        }
    }

    /// Allocates a per-CPU, high-priority workqueue named `name` (copied),
    /// with a rescuer: a work item runs on the CPU that queued it, in a
    /// worker that the scheduler runs ahead of normal tasks there.
    pub(crate) fn new_local_highpri(name: &CStr) -> Result<Self> {
        let flushes = IoCounter::new()?;
        // SAFETY: `name` is a valid C string; the shim copies it with "%s".
        // The new workqueue (or null) is ours alone.
        unsafe {
            Self::owning(
                bindings::dmq_alloc_local_highpri_workqueue(name.as_char_ptr()),
                flushes,
            )
        }
    }

    /// Takes ownership of a workqueue just allocated (null: it was not).
    ///
    /// # Safety
    ///
    /// `p` is null or a workqueue nobody else owns or destroys.
    unsafe fn owning(p: *mut bindings::workqueue_struct, flushes: Arc<IoCounter>) -> Result<Self> {
        let ptr = NonNull::new(p).ok_or(ENOMEM)?;
        Ok(Self {
            ptr,
            dead: AtomicBool::new(false),
            flushes,
        })
    }

    /// Whether the queue was shut down (a hint: it may be any moment).
    pub(crate) fn is_shut_down(&self) -> bool {
        self.dead.load(Ordering::Relaxed)
    }

    /// Enqueues `w` (see [`Queue::enqueue`]) and returns what that did;
    /// gives `w` back once the queue is shut down. Does not sleep: callable
    /// from interrupt context.
    pub(crate) fn enqueue<W, const ID: u64>(&self, w: W) -> Result<W::EnqueueOutput, W>
    where
        W: RawWorkItem<ID> + Send + 'static,
    {
        let _rcu = RcuReadLock::new();
        if self.dead.load(Ordering::Acquire) {
            // Dropped by the caller, outside the read-side section.
            return Err(w);
        }
        // SAFETY: `dead` was clear inside this read-side section, so
        // `shutdown`, which sets it and then waits for a grace period,
        // destroys the workqueue only after the section ends.
        let q = unsafe { Queue::from_raw(self.ptr.as_ptr()) };
        Ok(q.enqueue(w))
    }

    /// Waits for every work item queued so far to finish (nothing once the
    /// queue is shut down, or while it is being shut down: that drains
    /// it). Must not be called from one of its work items.
    pub(crate) fn flush(&self) {
        // Counted while it flushes: `shutdown` waits for it. A hold taken
        // after `shutdown` set `dead` sees it set (store buffering, full
        // fences on both sides: `IoCounter::hold`, `wait_idle`).
        let Some(_hold) = self.flushes.hold() else {
            return;
        };
        if !self.dead.load(Ordering::Acquire) {
            // SAFETY: `dead` was clear under the hold, so `shutdown` waits
            // for the hold's end before it destroys the workqueue.
            unsafe { bindings::__flush_workqueue(self.ptr.as_ptr()) };
        }
    }

    /// Drains and destroys the workqueue. Must not be called from one of its
    /// work items; sleeps (a grace period).
    pub(crate) fn shutdown(&self) {
        if self.dead.swap(true, Ordering::AcqRel) {
            return;
        }
        // Enqueuers that saw the queue alive are in read-side sections that
        // began before the grace period; flushers hold `flushes`.
        // SAFETY: Process context (we may sleep); no preconditions.
        unsafe { bindings::dmq_synchronize_rcu() };
        self.flushes.wait_idle();
        // SAFETY: We own the workqueue and destroy it once (the flag), with
        // no caller left that saw it alive. `destroy_workqueue` drains it
        // first, chained work included.
        unsafe { bindings::destroy_workqueue(self.ptr.as_ptr()) };
    }
}

impl Drop for OwnedQueue {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Runs `f`, which must not sleep, in an RCU read-side critical section:
/// an [`OwnedQueue::shutdown`] that begins meanwhile (its grace period)
/// waits for it. For a caller that hands work to a queue's item and then
/// still uses what the queue's owner owns (the item may finish the work,
/// and the owner be torn down, in between).
pub(crate) fn rcu_read<T>(f: impl FnOnce() -> T) -> T {
    let _rcu = RcuReadLock::new();
    f()
}

/// An RCU read-side critical section, until dropped. Not `Send`: it ends
/// on the CPU and task that began it.
struct RcuReadLock(PhantomData<*mut ()>);

impl RcuReadLock {
    fn new() -> Self {
        // SAFETY: No preconditions; paired with the unlock in `drop`.
        unsafe { bindings::dmq_rcu_read_lock() };
        Self(PhantomData)
    }
}

impl Drop for RcuReadLock {
    fn drop(&mut self) {
        // SAFETY: Ends the section `new` began, in the same task.
        unsafe { bindings::dmq_rcu_read_unlock() };
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
