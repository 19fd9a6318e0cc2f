// SPDX-License-Identifier: GPL-2.0

//! Bits of the current task: allocation scope, block plug and capabilities.
//!
//! C headers: [`include/linux/sched/mm.h`](srctree/include/linux/sched/mm.h),
//! [`include/linux/blkdev.h`](srctree/include/linux/blkdev.h),
//! [`include/linux/capability.h`](srctree/include/linux/capability.h)

use super::bindings;
use core::mem::MaybeUninit;
use kernel::error::Error;

/// Runs `f` with allocations of the current task not recursing into I/O
/// (`memalloc_noio_save`/`memalloc_noio_restore`), as the I/O path of a
/// block device requires. A closure, not a guard: scopes nest by
/// construction, so a restore always undoes the save it pairs with (guards
/// dropped out of order, or one forgotten, could leave a kworker's later
/// work items with the flag).
pub(crate) fn no_io<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: Saves and sets a flag of the current task; any value is valid.
    let saved = unsafe { bindings::dmq_noio_save() };
    let r = f();
    // SAFETY: Restores what the save above returned, on the same task (a
    // task does not change across a call) and after every scope `f` opened
    // was closed (they are closures too).
    unsafe { bindings::dmq_noio_restore(saved) };
    r
}

/// Runs `f` under a block plug of the current task (`blk_start_plug`): the
/// bios that the direct I/O started in `f` sends to the host's block
/// devices are held and sent as one batch when `f` returns (or sooner, when
/// the task sleeps or the plug fills), so neighbouring ones merge into one
/// request and a device's queue is kicked once per batch, not once per bio.
/// Inside another plug of the task it adds nothing (that one holds them).
pub(crate) fn plugged<R>(f: impl FnOnce() -> R) -> R {
    let mut plug = MaybeUninit::<bindings::blk_plug>::uninit();
    // SAFETY: `blk_start_plug` initialises `plug` and links it to the current task
    // (or, the task being plugged already, touches neither). The plug stays at this
    // address until `blk_finish_plug` below unlinks it: it lives in this frame,
    // which `f` cannot leave, and nothing moves it. Both run on the same task (a
    // task does not change across a call).
    unsafe { bindings::blk_start_plug(plug.as_mut_ptr()) };
    let r = f();
    // SAFETY: As above. A plug that was not linked (nested) is only compared
    // with the task's, never read.
    unsafe { bindings::blk_finish_plug(plug.as_mut_ptr()) };
    r
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
