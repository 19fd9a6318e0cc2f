// SPDX-License-Identifier: GPL-2.0

//! Bits of the current task: allocation scope and capabilities.
//!
//! C headers: [`include/linux/sched/mm.h`](srctree/include/linux/sched/mm.h),
//! [`include/linux/capability.h`](srctree/include/linux/capability.h)

use super::bindings;
use core::marker::PhantomData;
use kernel::error::Error;

/// While alive, allocations of the current task do not recurse into I/O
/// (`memalloc_noio_save`), as the I/O path of a block device requires.
pub(crate) struct NoIo(u32, PhantomData<*mut ()>);

impl NoIo {
    /// Enters the scope.
    pub(crate) fn enter() -> Self {
        // SAFETY: Saves and sets a flag of the current task; `drop` restores it
        // on the same task (the guard is not `Send`).
        Self(unsafe { bindings::dmq_noio_save() }, PhantomData)
    }
}

impl Drop for NoIo {
    fn drop(&mut self) {
        // SAFETY: Restores what `enter` saved, on the same task.
        unsafe { bindings::dmq_noio_restore(self.0) };
    }
}

/// Sleeps for at least `ms` milliseconds.
pub(crate) fn sleep_ms(ms: u32) {
    // SAFETY: `msleep` may be called from any sleepable context, which is
    // what callers of this function are.
    unsafe { bindings::msleep(ms) };
}

/// Lets other tasks run if this one has run long (between batches of a
/// long walk, with no lock held).
pub(crate) fn cond_resched() {
    // SAFETY: `cond_resched` may be called from any sleepable context, which
    // is what callers of this function are.
    unsafe { bindings::dmq_cond_resched() };
}

/// Whether the current task has CAP_SYS_ADMIN.
pub(crate) fn capable_sys_admin() -> bool {
    // SAFETY: `capable` only inspects the current task's credentials.
    unsafe { bindings::capable(bindings::CAP_SYS_ADMIN as i32) }
}

/// Error codes the kernel crate (6.12) does not name.
pub(crate) mod code {
    use super::*;

    /// Operation not supported.
    pub(crate) fn eopnotsupp() -> Error {
        Error::from_errno(-(bindings::EOPNOTSUPP as i32))
    }

    /// Invalid slot: used for size mismatches, as the reference does.
    pub(crate) fn ebadslt() -> Error {
        Error::from_errno(-(bindings::EBADSLT as i32))
    }

    /// Structure needs cleaning: an image whose metadata is inconsistent.
    pub(crate) fn euclean() -> Error {
        Error::from_errno(-(bindings::EUCLEAN as i32))
    }
}
