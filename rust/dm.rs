// SPDX-License-Identifier: GPL-2.0

//! Device-mapper targets.
//!
//! C header: [`include/linux/device-mapper.h`](srctree/include/linux/device-mapper.h)
//!
//! A target implements [`Target`]; [`Registration`] registers its
//! `struct target_type` with device-mapper for as long as it lives. The
//! constructor returns the per-table state, which device-mapper keeps in
//! `ti->private` until the destructor drops it. Device-mapper calls `map`
//! concurrently from many CPUs, so the state is shared as `&T` (`T: Sync`).

mod callbacks;
mod per_bio;

use super::bindings;
use super::bio::{Bio, Op};
use super::inflight::InflightRefs;
use callbacks::Vtable;
use core::cell::UnsafeCell;
use core::fmt;
use core::marker::PhantomData;
use core::mem::{ManuallyDrop, MaybeUninit};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};
use kernel::error::{
    code::{E2BIG, ENOMEM},
    Error, Result,
};
use kernel::ffi::{c_char, c_int, c_uint};
use kernel::prelude::*;
use kernel::str::CStr;
use kernel::sync::{Arc, Mutex};
pub(crate) use per_bio::{release_inflight, retake_inflight, sync_after_end, take_io_room};

/// Target feature flags (`DM_TARGET_*`).
pub(crate) mod features {
    /// Only one target of this type in a table.
    pub(crate) const SINGLETON: u64 = super::bindings::DM_TARGET_SINGLETON as u64;
}

/// A failed constructor: the error code and the message for `ti->error`.
pub(crate) struct CtrError {
    /// Returned to device-mapper (and printed by it with the message).
    pub(crate) err: Error,
    /// Stored in `ti->error`.
    pub(crate) msg: &'static CStr,
}

impl CtrError {
    /// A constructor error with a fixed message.
    pub(crate) const fn new(err: Error, msg: &'static CStr) -> Self {
        Self { err, msg }
    }
}

/// Which status `dmsetup status`/`dmsetup table` asks for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum StatusType {
    /// `dmsetup status`.
    Info,
    /// `dmsetup table`.
    Table,
    /// Integrity measurement (IMA).
    Ima,
}

/// A link to a constructed target for code that runs outside its callbacks
/// (work items): raises table events and tells whether the device is
/// suspended. Until the constructor succeeded, and once the target is
/// destroyed, the link is dead and does nothing (a failed constructor gets
/// no destructor call: its target is freed with the link still held).
#[pin_data]
pub(crate) struct TargetLink {
    ti: *mut bindings::dm_target,
    /// Set once the constructor succeeded (no `&mut` to the target is left
    /// then), cleared by the destructor before the target goes away.
    #[pin]
    alive: Mutex<bool>,
}

// SAFETY: `ti` is only used under `alive`, while the target exists and is
// constructed; the dm functions called on it are thread-safe.
unsafe impl Send for TargetLink {}
// SAFETY: As above.
unsafe impl Sync for TargetLink {}

impl TargetLink {
    fn new(ti: *mut bindings::dm_target) -> Result<Arc<Self>> {
        Arc::pin_init(
            pin_init!(Self { ti, alive <- kernel::new_mutex!(false, "dm::TargetLink") }),
            GFP_KERNEL,
        )
    }

    /// Raises a table event (`dmsetup wait` returns, a uevent may follow).
    pub(crate) fn table_event(&self) {
        let alive = self.alive.lock();
        if *alive {
            // SAFETY: The target, and so its table, exists while `alive` is set,
            // and the destructor cannot clear it while we hold the lock.
            unsafe { bindings::dm_table_event(bindings::dmq_target_table(self.ti)) };
        }
    }

    /// Whether the mapped device is suspended.
    pub(crate) fn suspended(&self) -> bool {
        let alive = self.alive.lock();
        // SAFETY: As in `table_event`.
        *alive && unsafe { bindings::dm_suspended(self.ti) } != 0
    }
}

/// What `ti->private` holds.
struct Private<T> {
    link: Arc<TargetLink>,
    state: KBox<T>,
}

/// The target being constructed: what the constructor may read and set.
pub(crate) struct TargetCtr<'a> {
    ti: NonNull<bindings::dm_target>,
    link: Arc<TargetLink>,
    _p: PhantomData<&'a mut bindings::dm_target>,
}

impl TargetCtr<'_> {
    fn ti(&self) -> &bindings::dm_target {
        // SAFETY: `ti` is valid for the duration of the constructor call, which
        // outlives `self`, and nothing else touches it during the call.
        unsafe { self.ti.as_ref() }
    }

    fn ti_mut(&mut self) -> &mut bindings::dm_target {
        // SAFETY: As in `ti`; `&mut self` makes the access exclusive.
        unsafe { self.ti.as_mut() }
    }

    /// First sector of the target in the device.
    pub(crate) fn begin(&self) -> u64 {
        self.ti().begin
    }

    /// Length of the target in sectors.
    pub(crate) fn len(&self) -> u64 {
        self.ti().len
    }

    /// A link to this target for work items (see [`TargetLink`]).
    pub(crate) fn link(&self) -> Arc<TargetLink> {
        self.link.clone()
    }

    /// Whether the table is being loaded read-write.
    pub(crate) fn table_writable(&self) -> bool {
        // SAFETY: The target and its table are valid while it is constructed.
        unsafe { bindings::dmq_table_writable(self.ti.as_ptr()) }
    }

    /// Number of empty flush bios device-mapper sends to `map`.
    pub(crate) fn set_num_flush_bios(&mut self, n: u32) {
        self.ti_mut().num_flush_bios = n;
    }

    /// Number of discard bios device-mapper sends to `map`.
    pub(crate) fn set_num_discard_bios(&mut self, n: u32) {
        self.ti_mut().num_discard_bios = n;
    }

    /// Number of write-zeroes bios device-mapper sends to `map`.
    pub(crate) fn set_num_write_zeroes_bios(&mut self, n: u32) {
        self.ti_mut().num_write_zeroes_bios = n;
    }

    /// Receive flushes even though there is no underlying block device.
    pub(crate) fn set_flush_supported(&mut self, v: bool) {
        self.ti_mut().set_flush_supported(v);
    }

    /// Receive discards even though there is no underlying block device.
    pub(crate) fn set_discards_supported(&mut self, v: bool) {
        self.ti_mut().set_discards_supported(v);
    }
}

/// Queue limits a target may adjust in `io_hints`.
pub(crate) struct QueueLimits<'a>(&'a mut bindings::queue_limits);

impl QueueLimits<'_> {
    /// Smallest addressable unit, in bytes.
    pub(crate) fn set_logical_block_size(&mut self, v: u32) {
        self.0.logical_block_size = v;
    }

    /// Smallest unit written without read-modify-write, in bytes.
    pub(crate) fn set_physical_block_size(&mut self, v: u32) {
        self.0.physical_block_size = v;
    }

    /// Smallest I/O size without a penalty, in bytes.
    pub(crate) fn set_io_min(&mut self, v: u32) {
        self.0.io_min = v;
    }

    /// Preferred I/O size, in bytes.
    pub(crate) fn set_io_opt(&mut self, v: u32) {
        self.0.io_opt = v;
    }

    /// DMA alignment mask of data buffers (e.g. 511).
    pub(crate) fn set_dma_alignment(&mut self, mask: u32) {
        self.0.dma_alignment = mask;
    }

    /// Largest write-zeroes bio, in sectors.
    pub(crate) fn set_max_write_zeroes(&mut self, sectors: u32) {
        self.0.max_write_zeroes_sectors = sectors;
    }

    /// Discard granularity in bytes and largest discard in sectors.
    pub(crate) fn set_discard(&mut self, granularity: u32, max_sectors: u32) {
        self.0.discard_granularity = granularity;
        self.0.max_hw_discard_sectors = max_sectors;
    }
}

/// Text output of `status` and `message` (device-mapper's `DMEMIT` buffer).
///
/// Output that does not fit is cut off, as with `DMEMIT`; the buffer always
/// stays NUL-terminated.
pub(crate) struct Emit<'a> {
    buf: &'a mut [u8],
    pos: usize,
    /// Something was written, even if none of it fit.
    attempted: bool,
}

impl fmt::Write for Emit<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.attempted |= !s.is_empty();
        // Keep one byte for the terminating NUL.
        let room = self.buf.len().saturating_sub(self.pos + 1);
        let n = s.len().min(room);
        if let Some(dst) = self.buf.get_mut(self.pos..self.pos + n) {
            dst.copy_from_slice(&s.as_bytes()[..n]);
            self.pos += n;
        }
        if let Some(nul) = self.buf.get_mut(self.pos) {
            *nul = 0;
        }
        Ok(())
    }
}

/// A device-mapper target type.
pub(crate) trait Target: Sized + Send + Sync + 'static {
    /// The target name in table lines.
    const NAME: &'static CStr;
    /// Target version reported to userspace.
    const VERSION: [u32; 3];
    /// `features` bits of `struct target_type`.
    const FEATURES: u64 = 0;

    /// Builds the per-table state from the table line arguments.
    fn ctr(ti: &mut TargetCtr<'_>, args: &[&CStr]) -> Result<KBox<Self>, CtrError>;

    /// Takes a bio. The target owns it from now on and must end it.
    fn map(&self, bio: Bio);

    /// In-flight refs every bio holds from `map` until it ends, so that
    /// [`InflightRefs::switch_wait`] waits for the bios started before it.
    /// Must return the same refs (or `None`) for the target's whole life.
    fn inflight(&self) -> Option<&InflightRefs> {
        None
    }

    /// Writes the status line.
    fn status(&self, _kind: StatusType, _out: &mut Emit<'_>) {}

    /// Handles `dmsetup message`; text written to `out` is returned to the caller.
    fn message(&self, _args: &[&CStr], _out: &mut Emit<'_>) -> Result {
        Err(kernel::error::code::EINVAL)
    }

    /// Before suspend: stop background work.
    fn presuspend(&self) {}
    /// The suspend announced by `presuspend` did not happen after all.
    fn presuspend_undo(&self) {}
    /// After suspend: all bios have ended; write everything back.
    fn postsuspend(&self) {}
    /// Before resume: may refuse the resume.
    fn preresume(&self) -> Result {
        Ok(())
    }
    /// After resume.
    fn resume(&self) {}
    /// Adjusts the queue limits of the mapped device.
    fn io_hints(&self, _limits: &mut QueueLimits<'_>) {}

    /// A bio `map` took (not a read) is ending with ENOSPC: whether the
    /// target takes it back with [`park_nospc`](Self::park_nospc). Called in
    /// any context, interrupts included: must not sleep.
    fn wants_nospc(&self) -> bool {
        false
    }

    /// Takes back a bio `wants_nospc` asked for: it is re-armed (no error,
    /// one completion reference, its in-flight reference given up as by
    /// [`release_inflight`]) and the target must end it again, e.g. after
    /// [`retake_inflight`] and submitting it again once there is space.
    /// Called in any context, interrupts included: must not sleep.
    ///
    /// No default: ending the bio with ENOSPC here would bring it back at
    /// once, without end. A target whose `wants_nospc` is always false may
    /// end it with any other error.
    fn park_nospc(&self, bio: Bio);

    /// Takes back a bio marked with [`sync_after_end`] that ended without
    /// error: it is re-armed (no error, one completion reference, its
    /// in-flight reference kept, its I/O room free) and the target must end
    /// it again, e.g. once what it wrote is durable. Ended again, it is not
    /// taken back again unless marked anew. Called in any context,
    /// interrupts included: must not sleep.
    fn sync_after(&self, bio: Bio) {
        bio.end(Ok(()))
    }
}

/// Where a registered target type lives: a `static` of the module, so that
/// it outlives every table of the type, even one still loaded after its
/// [`Registration`] was dropped (a table holds a reference to the module,
/// which then cannot be unloaded before the table is destroyed). Serves one
/// registration, once: memory a table may still use is never written again.
pub(crate) struct TargetTypeSlot {
    tt: UnsafeCell<MaybeUninit<bindings::target_type>>,
    taken: AtomicBool,
}

// SAFETY: `tt` is written once, by the registration that took the slot
// (`taken`), before device-mapper sees it; from then on only device-mapper
// uses it, under its own locking.
unsafe impl Sync for TargetTypeSlot {}

impl TargetTypeSlot {
    /// An unused slot.
    pub(crate) const fn new() -> Self {
        Self {
            tt: UnsafeCell::new(MaybeUninit::uninit()),
            taken: AtomicBool::new(false),
        }
    }
}

/// A registered target type; unregistered on drop.
pub(crate) struct Registration<T: Target> {
    tt: NonNull<bindings::target_type>,
    _p: PhantomData<T>,
}

// SAFETY: The registration only points at the `target_type`, which
// device-mapper accesses under its own locking; moving or sharing the handle
// is fine.
unsafe impl<T: Target> Send for Registration<T> {}
// SAFETY: As above: `&Registration` gives no access to anything.
unsafe impl<T: Target> Sync for Registration<T> {}

impl<T: Target> Registration<T> {
    /// Registers `T` with device-mapper, its type kept in `slot` (EBUSY if
    /// the slot served a registration before).
    pub(crate) fn new(slot: &'static TargetTypeSlot) -> Result<Self> {
        if slot.taken.swap(true, Ordering::AcqRel) {
            return Err(EBUSY);
        }
        let tt = bindings::target_type {
            features: T::FEATURES,
            name: T::NAME.as_char_ptr(),
            // SAFETY: Returns THIS_MODULE, valid for the module's lifetime.
            module: unsafe { bindings::dmq_this_module() },
            version: T::VERSION,
            ctr: Some(Vtable::<T>::ctr),
            dtr: Some(Vtable::<T>::dtr),
            map: Some(Vtable::<T>::map),
            end_io: Some(Vtable::<T>::end_io),
            status: Some(Vtable::<T>::status),
            message: Some(Vtable::<T>::message),
            presuspend: Some(Vtable::<T>::presuspend),
            presuspend_undo: Some(Vtable::<T>::presuspend_undo),
            postsuspend: Some(Vtable::<T>::postsuspend),
            preresume: Some(Vtable::<T>::preresume),
            resume: Some(Vtable::<T>::resume),
            io_hints: Some(Vtable::<T>::io_hints),
            iterate_devices: Some(Vtable::<T>::iterate_devices),
            ..Default::default()
        };
        let p = slot.tt.get().cast::<bindings::target_type>();
        // SAFETY: The slot is ours alone (taken above, never given back) and
        // nothing saw it before: device-mapper learns of it only below.
        unsafe { p.write(tt) };
        // SAFETY: `p` is a fully initialised `target_type` in static memory,
        // never written again; it stays registered until `drop` unregisters it.
        let ret = unsafe { bindings::dm_register_target(p) };
        if ret < 0 {
            return Err(Error::from_errno(ret));
        }
        Ok(Self {
            // SAFETY: `p` points into `slot`, not null.
            tt: unsafe { NonNull::new_unchecked(p) },
            _p: PhantomData,
        })
    }
}

impl<T: Target> Drop for Registration<T> {
    fn drop(&mut self) {
        // SAFETY: `tt` was registered in `new` and is unregistered once, here.
        // Tables still using it keep a reference to the module, so the slot's
        // static memory outlives them.
        unsafe { bindings::dm_unregister_target(self.tt.as_ptr()) };
    }
}
