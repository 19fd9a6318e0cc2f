// SPDX-License-Identifier: GPL-2.0

//! The callbacks device-mapper calls (`struct target_type`'s functions):
//! each turns its C arguments into the safe types of this module and calls
//! the [`Target`] method of the table's state.

use super::*;

/// Largest argument list we accept (table line or message).
const MAX_ARGS: usize = 4096;

/// Collects `argv` into borrowed C strings.
///
/// # Safety
///
/// `argv` must point to `argc` valid NUL-terminated strings that outlive `'a`.
unsafe fn collect_args<'a>(argc: c_uint, argv: *mut *mut c_char) -> Result<KVec<&'a CStr>> {
    let argc = argc as usize;
    if argc > MAX_ARGS {
        return Err(E2BIG);
    }
    let mut args = KVec::with_capacity(argc, GFP_KERNEL)?;
    for i in 0..argc {
        // SAFETY: `i < argc` and the caller guarantees `argv` has `argc` entries.
        let p = unsafe { *argv.add(i) };
        // SAFETY: The caller guarantees each entry is a valid C string living for `'a`.
        let s = unsafe { CStr::from_char_ptr(p) };
        args.push(s, GFP_KERNEL)?;
    }
    Ok(args)
}

pub(super) struct Vtable<T: Target>(PhantomData<T>);

impl<T: Target> Vtable<T> {
    /// # Safety
    ///
    /// `ti` must be a target whose constructor succeeded and has not been destroyed.
    unsafe fn private<'a>(ti: *mut bindings::dm_target) -> &'a T {
        // SAFETY: The constructor stored a `KBox<Private<T>>` in `ti->private`
        // and only the destructor takes it back, after every other callback.
        unsafe { &(*((*ti).private as *const Private<T>)).state }
    }

    /// # Safety
    ///
    /// Called by device-mapper with a valid target and arguments.
    pub(super) unsafe extern "C" fn ctr(
        ti: *mut bindings::dm_target,
        argc: c_uint,
        argv: *mut *mut c_char,
    ) -> c_int {
        // Every failure names itself in `ti->error` (else dm logs "Unknown error").
        let fail = |e: Error| {
            let msg = if e == E2BIG {
                kernel::c_str!("Too many arguments")
            } else {
                kernel::c_str!("Out of memory")
            };
            // SAFETY: `ti` is valid and ours during the constructor; device-mapper
            // only reads `error` (never frees it) and the message is `'static`.
            unsafe { (*ti).error = msg.as_char_ptr() as *mut c_char };
            e.to_errno()
        };
        // SAFETY: device-mapper passes `argc` valid strings that outlive this call.
        let args = match unsafe { collect_args(argc, argv) } {
            Ok(a) => a,
            Err(e) => return fail(e),
        };
        let link = match TargetLink::new(ti) {
            Ok(l) => l,
            Err(e) => return fail(e),
        };
        // SAFETY: `ti` is valid and exclusively ours during the constructor.
        unsafe { (*ti).per_io_data_size = per_bio::PER_BIO_SIZE as c_uint };
        let mut ctx = TargetCtr {
            // SAFETY: device-mapper passes a valid, non-null target.
            ti: unsafe { NonNull::new_unchecked(ti) },
            link: link.clone(),
            _p: PhantomData,
        };
        let r = T::ctr(&mut ctx, &args).and_then(|state| {
            KBox::new(Private { link, state }, GFP_KERNEL)
                .map_err(|_| CtrError::new(ENOMEM, kernel::c_str!("Out of memory")))
        });
        match r {
            Ok(p) => {
                // SAFETY: `ti` is valid and exclusively ours during the constructor.
                unsafe { (*ti).private = KBox::into_raw(p).cast() };
                // Constructed, and `ctx` (the `&mut` access) is done with:
                // links taken during the constructor come alive.
                *ctx.link.alive.lock() = true;
                0
            }
            Err(e) => {
                // SAFETY: As above; device-mapper only reads `error` (never frees it)
                // and the message is `'static`.
                unsafe { (*ti).error = e.msg.as_char_ptr() as *mut c_char };
                e.err.to_errno()
            }
        }
    }

    /// # Safety
    ///
    /// Called by device-mapper with a valid target.
    pub(super) unsafe extern "C" fn dtr(ti: *mut bindings::dm_target) {
        // SAFETY: The constructor succeeded, so `private` holds the box it
        // leaked; device-mapper calls the destructor once, after all other callbacks.
        let p = unsafe { KBox::from_raw((*ti).private as *mut Private<T>) };
        // Links held by work items go dead before the target does.
        *p.link.alive.lock() = false;
        drop(p);
    }

    /// # Safety
    ///
    /// Called by device-mapper with a valid target and arguments.
    pub(super) unsafe extern "C" fn map(
        ti: *mut bindings::dm_target,
        bio: *mut bindings::bio,
    ) -> c_int {
        // SAFETY: `map` runs only on a constructed target.
        let t = unsafe { Self::private(ti) };
        // SAFETY: `bio` was passed to this target, registered here: its per-bio
        // data is ours while the bio is, and no `Bio` of it exists yet.
        unsafe { per_bio::init_slot(bio, t.inflight()) };
        // SAFETY: device-mapper hands us the bio; with DM_MAPIO_SUBMITTED we own
        // its completion, which `Bio` guarantees to perform exactly once.
        t.map(unsafe { Bio::from_raw(bio) });
        bindings::DM_MAPIO_SUBMITTED as c_int
    }

    /// # Safety
    ///
    /// Called by device-mapper with a valid target and a bio `map` took.
    pub(super) unsafe extern "C" fn end_io(
        ti: *mut bindings::dm_target,
        bio: *mut bindings::bio,
        error: *mut bindings::blk_status_t,
    ) -> c_int {
        // SAFETY: Runs only on a constructed target.
        let t = unsafe { Self::private(ti) };
        // SAFETY: device-mapper passes the status the bio ends with.
        let errno = unsafe { bindings::blk_status_to_errno(*error) };
        // SAFETY: `bio` was passed to this target's `map`, which wrote the
        // per-bio data; cleared at every end, so taken back at most once
        // per mark.
        let sync = unsafe { per_bio::take_sync_after(bio) };
        if sync && errno == 0 {
            // SAFETY: The bio's completion ran down to us and we keep it
            // (DM_ENDIO_INCOMPLETE): nothing else uses it; re-armed, it is
            // an owned completion reference again, still holding its
            // in-flight reference. Its references all ended, so its I/O room
            // holds nothing.
            unsafe {
                bindings::dmq_bio_rearm(bio);
                per_bio::free_io_room(bio);
            }
            // SAFETY: As above.
            t.sync_after(unsafe { Bio::from_raw(bio) });
            return bindings::DM_ENDIO_INCOMPLETE as c_int;
        }
        if errno == kernel::error::code::ENOSPC.to_errno() {
            // SAFETY: `bio` is valid; only its operation is read (the
            // `ManuallyDrop` never ends it).
            let read = ManuallyDrop::new(unsafe { Bio::from_raw(bio) }).op() == Op::Read;
            if !read && t.wants_nospc() {
                // SAFETY: The bio's completion ran down to us and we keep it
                // (DM_ENDIO_INCOMPLETE): nothing else uses it; re-armed, it
                // is an owned completion reference again. Parked, it holds
                // no in-flight reference (`Target::park_nospc`). Its
                // references all ended, so its I/O room holds nothing.
                unsafe {
                    bindings::dmq_bio_rearm(bio);
                    per_bio::put_slot(bio);
                    per_bio::free_io_room(bio);
                }
                // SAFETY: As above.
                t.park_nospc(unsafe { Bio::from_raw(bio) });
                return bindings::DM_ENDIO_INCOMPLETE as c_int;
            }
        }
        // SAFETY: `bio` was passed to this target's `map`, which wrote the
        // slot; the bio is ending.
        unsafe { per_bio::put_slot(bio) };
        bindings::DM_ENDIO_DONE as c_int
    }

    /// # Safety
    ///
    /// Called by device-mapper with a valid target and arguments.
    pub(super) unsafe extern "C" fn status(
        ti: *mut bindings::dm_target,
        kind: bindings::status_type_t,
        _flags: c_uint,
        result: *mut c_char,
        maxlen: c_uint,
    ) {
        let kind = match kind {
            bindings::status_type_t_STATUSTYPE_INFO => StatusType::Info,
            bindings::status_type_t_STATUSTYPE_TABLE => StatusType::Table,
            _ => StatusType::Ima,
        };
        // SAFETY: `result` has room for `maxlen` bytes for the duration of the call.
        let buf = unsafe { core::slice::from_raw_parts_mut(result.cast::<u8>(), maxlen as usize) };
        if let Some(b) = buf.first_mut() {
            *b = 0;
        }
        let mut out = Emit {
            buf,
            pos: 0,
            attempted: false,
        };
        // SAFETY: `status` runs only on a constructed target.
        unsafe { Self::private(ti) }.status(kind, &mut out);
    }

    /// # Safety
    ///
    /// Called by device-mapper with a valid target and arguments.
    pub(super) unsafe extern "C" fn message(
        ti: *mut bindings::dm_target,
        argc: c_uint,
        argv: *mut *mut c_char,
        result: *mut c_char,
        maxlen: c_uint,
    ) -> c_int {
        // SAFETY: device-mapper passes `argc` valid strings that outlive this call.
        let args = match unsafe { collect_args(argc, argv) } {
            Ok(a) => a,
            Err(e) => return e.to_errno(),
        };
        // The arguments live inside the result buffer (dm-ioctl splits the
        // message in place there), so output goes to a buffer of its own and
        // is copied over once the arguments are no longer used. As large as
        // the caller's (dm-ioctl takes up to 1 GiB from userspace, and
        // kvmallocs it): a kmalloc that size would warn past 4 MiB.
        let Ok(mut own) = KVVec::from_elem(0u8, maxlen as usize, super::super::gfp_kv()) else {
            return ENOMEM.to_errno();
        };
        let mut out = Emit {
            buf: &mut own,
            pos: 0,
            attempted: false,
        };
        // SAFETY: `message` runs only on a constructed target.
        let r = unsafe { Self::private(ti) }.message(&args, &mut out);
        let (n, wrote) = (out.pos, out.attempted);
        drop(args);
        match r {
            Ok(()) if wrote => {
                // SAFETY: `result` has room for `maxlen` bytes, `n < maxlen` (Emit
                // keeps room for the NUL) and no argument borrows it any more.
                unsafe { core::ptr::copy_nonoverlapping(own.as_ptr(), result.cast::<u8>(), n + 1) };
                // 1 tells device-mapper that `result` holds output for userspace.
                1
            }
            Ok(()) => 0,
            Err(e) => e.to_errno(),
        }
    }

    /// # Safety
    ///
    /// Called by device-mapper with a valid target.
    pub(super) unsafe extern "C" fn presuspend(ti: *mut bindings::dm_target) {
        // SAFETY: Runs only on a constructed target.
        unsafe { Self::private(ti) }.presuspend();
    }

    /// # Safety
    ///
    /// Called by device-mapper with a valid target.
    pub(super) unsafe extern "C" fn presuspend_undo(ti: *mut bindings::dm_target) {
        // SAFETY: Runs only on a constructed target.
        unsafe { Self::private(ti) }.presuspend_undo();
    }

    /// # Safety
    ///
    /// Called by device-mapper with a valid target.
    pub(super) unsafe extern "C" fn postsuspend(ti: *mut bindings::dm_target) {
        // SAFETY: Runs only on a constructed target.
        unsafe { Self::private(ti) }.postsuspend();
    }

    /// # Safety
    ///
    /// Called by device-mapper with a valid target.
    pub(super) unsafe extern "C" fn preresume(ti: *mut bindings::dm_target) -> c_int {
        // SAFETY: Runs only on a constructed target.
        match unsafe { Self::private(ti) }.preresume() {
            Ok(()) => 0,
            Err(e) => e.to_errno(),
        }
    }

    /// # Safety
    ///
    /// Called by device-mapper with a valid target.
    pub(super) unsafe extern "C" fn resume(ti: *mut bindings::dm_target) {
        // SAFETY: Runs only on a constructed target.
        unsafe { Self::private(ti) }.resume();
    }

    /// # Safety
    ///
    /// Called by device-mapper with a valid target.
    pub(super) unsafe extern "C" fn iterate_devices(
        _ti: *mut bindings::dm_target,
        _fn: bindings::iterate_devices_callout_fn,
        _data: *mut kernel::ffi::c_void,
    ) -> c_int {
        // Targets of this kind sit on files, not block devices: there is
        // nothing to iterate (and so nothing that lacks a capability).
        0
    }

    /// # Safety
    ///
    /// Called by device-mapper with a valid target and arguments.
    pub(super) unsafe extern "C" fn io_hints(
        ti: *mut bindings::dm_target,
        limits: *mut bindings::queue_limits,
    ) {
        // SAFETY: `limits` is valid and exclusively ours for the duration of the call.
        let mut l = QueueLimits(unsafe { &mut *limits });
        // SAFETY: Runs only on a constructed target.
        unsafe { Self::private(ti) }.io_hints(&mut l);
    }
}
