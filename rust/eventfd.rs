// SPDX-License-Identifier: GPL-2.0

//! Eventfd contexts: how a merge tells userspace it is ready.
//!
//! C header: [`include/linux/eventfd.h`](srctree/include/linux/eventfd.h)

use super::bindings;
use core::ptr::NonNull;
use kernel::error::{code::ENOMEM, Result};

/// An eventfd context, signalled to tell userspace that something finished.
pub(crate) struct EventFd(NonNull<bindings::eventfd_ctx>);

// SAFETY: eventfd contexts are reference counted and signalling is thread-safe.
unsafe impl Send for EventFd {}
// SAFETY: As above.
unsafe impl Sync for EventFd {}

impl EventFd {
    /// The eventfd behind `fd` of the current task.
    pub(crate) fn from_fd(fd: i32) -> Result<Self> {
        // SAFETY: Accepts any number; returns a new reference or an ERR_PTR.
        let p = unsafe { bindings::eventfd_ctx_fdget(fd) };
        let p = kernel::error::from_err_ptr(p)?;
        NonNull::new(p).map(Self).ok_or(ENOMEM)
    }

    /// Adds one to the counter and wakes up waiters.
    pub(crate) fn signal(&self) {
        // SAFETY: We hold a reference to the context.
        unsafe { bindings::dmq_eventfd_signal(self.0.as_ptr()) };
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        // SAFETY: We own one reference, given up here.
        unsafe { bindings::eventfd_ctx_put(self.0.as_ptr()) };
    }
}
