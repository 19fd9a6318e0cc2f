// SPDX-License-Identifier: GPL-2.0

//! A workqueue owned by the caller (the kernel crate only offers the system ones).
//!
//! C header: [`include/linux/workqueue.h`](srctree/include/linux/workqueue.h)

use super::bindings;
use core::ptr::NonNull;
use kernel::error::{code::ENOMEM, Result};
use kernel::str::CStr;
use kernel::workqueue::Queue;

/// An own `WQ_MEM_RECLAIM | WQ_UNBOUND` workqueue, destroyed (after draining)
/// on drop.
pub(crate) struct OwnedQueue(NonNull<bindings::workqueue_struct>);

// SAFETY: Workqueues may be used and destroyed from any thread.
unsafe impl Send for OwnedQueue {}
// SAFETY: Queueing work is thread-safe.
unsafe impl Sync for OwnedQueue {}

impl OwnedQueue {
    /// Allocates a workqueue named `name` (copied).
    pub(crate) fn new(name: &CStr) -> Result<Self> {
        // SAFETY: `name` is a valid C string; the shim copies it with "%s".
        let p = unsafe { bindings::dmq_alloc_workqueue(name.as_char_ptr()) };
        NonNull::new(p).map(Self).ok_or(ENOMEM)
    }

    /// Waits for every work item queued so far to finish.
    pub(crate) fn flush(&self) {
        // SAFETY: The workqueue is alive until drop.
        unsafe { bindings::__flush_workqueue(self.0.as_ptr()) };
    }
}

impl core::ops::Deref for OwnedQueue {
    type Target = Queue;
    fn deref(&self) -> &Queue {
        // SAFETY: The workqueue lives as long as `self`, which bounds the borrow.
        unsafe { Queue::from_raw(self.0.as_ptr()) }
    }
}

impl Drop for OwnedQueue {
    fn drop(&mut self) {
        // SAFETY: We own the workqueue. `destroy_workqueue` drains it first; no
        // work item of this queue may drop the queue itself (see the target).
        unsafe { bindings::destroy_workqueue(self.0.as_ptr()) };
    }
}
