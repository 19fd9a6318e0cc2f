// SPDX-License-Identifier: GPL-2.0

//! Per-bio data of the targets registered here: the in-flight reference
//! (`InflightRefs`) each bio `map` took holds until it ends, dropped once
//! whichever of the bio's end and a target's parking comes first, and
//! taken again when a parked bio is worked on; and room for one direct I/O
//! on the bio's behalf ([`take_io_room`]), so that the usual bio, served by
//! one direct I/O, needs no allocation: device-mapper allocates the per-bio
//! data with the clone, from its mempool-backed bio set, so such a bio makes
//! progress under memory pressure, and costs no `kmalloc`/`kfree` pair.

use super::super::bindings;
use super::super::bio::Bio;
use super::super::direct_io::BioIo;
use super::super::inflight::InflightRefs;
use core::mem::MaybeUninit;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// Per-bio data of every bio `map` takes: where its in-flight reference is.
#[repr(C)]
struct RefSlot {
    /// The refs of the target that mapped the bio (`Target::inflight`), null
    /// if it has none. Written by `map` only, before any `Bio` of it exists.
    refs: *mut bindings::dmq_inflight,
    /// `REF_TAKEN | index` while the bio holds a reference on `refs`, else 0.
    tag: AtomicU32,
}

/// The per-bio data of every bio `map` takes.
#[repr(C)]
struct PerBio {
    refs: RefSlot,
    /// Whether a direct I/O of the bio has taken `io` ([`take_io_room`]).
    /// Cleared by `map` and when a parked bio is re-armed.
    io_taken: AtomicBool,
    /// The target takes the bio back when it ends without error
    /// ([`sync_after_end`]). Cleared by `map` and by that end.
    sync_after: AtomicBool,
    io: MaybeUninit<BioIo>,
}

/// Bytes of per-bio data every target registered here asks for. The data is
/// aligned for `PerBio` as long as that needs no more than a pointer's
/// alignment: device-mapper places it just below its `dm_target_io`, rounding
/// the front pad up to that structure's alignment (`dm_table_alloc_md_mempools`),
/// in slab objects aligned to at least `ARCH_KMALLOC_MINALIGN`.
pub(super) const PER_BIO_SIZE: usize = core::mem::size_of::<PerBio>();
const _: () = assert!(core::mem::align_of::<PerBio>() <= core::mem::align_of::<*const u8>());
/// Tag of a slot holding a reference.
const REF_TAKEN: u32 = 1 << 31;

/// The per-bio data of `bio`.
///
/// # Safety
///
/// `bio` must be a bio device-mapper passed to `map` of a target registered
/// here (all ask for `PER_BIO_SIZE` bytes of per-bio data), not yet released
/// by device-mapper (until its `end_io` returns).
unsafe fn per_bio(bio: *mut bindings::bio) -> *mut PerBio {
    // SAFETY: Per the contract, the bio carries `PER_BIO_SIZE` bytes of
    // per-bio data, aligned (see `PER_BIO_SIZE`).
    unsafe { bindings::dm_per_bio_data(bio, PER_BIO_SIZE).cast::<PerBio>() }
}

/// The in-flight slot of `bio`.
///
/// # Safety
///
/// As for [`per_bio`].
unsafe fn ref_slot(bio: *mut bindings::bio) -> *mut RefSlot {
    // SAFETY: Per the contract `per_bio` is valid; no reference is made.
    unsafe { &raw mut (*per_bio(bio)).refs }
}

/// Writes the slot of a bio `map` was just given: a reference on `refs`
/// (the target's, if it counts its bios) taken now.
///
/// # Safety
///
/// As for [`ref_slot`], and no `Bio` of `bio` exists yet.
pub(super) unsafe fn init_slot(bio: *mut bindings::bio, refs: Option<&InflightRefs>) {
    let (refs, tag) = match refs {
        // SAFETY: The target's refs are alive; taking a reference never sleeps.
        Some(r) => (
            r.as_raw(),
            REF_TAKEN | unsafe { bindings::dmq_inflight_get(r.as_raw()) },
        ),
        None => (core::ptr::null_mut(), 0),
    };
    // SAFETY: Per the contract the per-bio data is ours and nothing reads it
    // yet; `io` stays uninitialised until taken.
    unsafe {
        let p = per_bio(bio);
        (&raw mut (*p).refs).write(RefSlot {
            refs,
            tag: AtomicU32::new(tag),
        });
        (&raw mut (*p).io_taken).write(AtomicBool::new(false));
        (&raw mut (*p).sync_after).write(AtomicBool::new(false));
    }
}

/// Asks for `bio` back when it ends without error, before device-mapper
/// completes it: its `end_io` then hands it to the target's
/// `Target::sync_after`, once. For a write whose durability the target
/// must still see to (a FUA write served as a plain write). Any context.
pub(crate) fn sync_after_end(bio: &Bio) {
    // SAFETY: Every `Bio` is a completion reference of a bio device-mapper
    // passed to `map` of a target registered here (`Bio::from_raw`), which
    // wrote the data; the reference keeps the bio from ending.
    unsafe {
        (*per_bio(bio.as_raw()))
            .sync_after
            .store(true, Ordering::Release)
    };
}

/// Clears the bio's [`sync_after_end`] request; whether there was one.
///
/// # Safety
///
/// As for [`per_bio`]; `map` wrote the data.
pub(super) unsafe fn take_sync_after(bio: *mut bindings::bio) -> bool {
    // SAFETY: Per the contract the data is valid and initialised.
    unsafe { (*per_bio(bio)).sync_after.swap(false, Ordering::AcqRel) }
}

/// Makes the I/O room of a bio whose completion ran down to its target's
/// `end_io` free again (it is about to be parked and served anew).
///
/// # Safety
///
/// As for [`per_bio`], `map` wrote the data, and every reference of the
/// bio has ended (so no direct I/O lives in the room).
pub(super) unsafe fn free_io_room(bio: *mut bindings::bio) {
    // SAFETY: Per the contract the data is valid and initialised.
    unsafe { (*per_bio(bio)).io_taken.store(false, Ordering::Release) };
}

/// Room in the per-bio data of `bio` for one direct I/O on its behalf
/// (`direct_io::BioIo`), handed out once per service of the bio: `None` if an
/// earlier I/O of it took the room (the caller allocates instead). The room
/// stays valid while a completion reference of the bio is unended: whoever
/// fills it must move what it needs out before ending the reference it
/// holds, and must not touch it after.
pub(crate) fn take_io_room(bio: &Bio) -> Option<NonNull<MaybeUninit<BioIo>>> {
    // SAFETY: Every `Bio` is a completion reference of a bio device-mapper
    // passed to `map` of a target registered here (`Bio::from_raw`), which
    // wrote the data; the reference keeps the bio from ending.
    let p = unsafe { per_bio(bio.as_raw()) };
    // SAFETY: As above; `io_taken` is atomic.
    if unsafe { (*p).io_taken.swap(true, Ordering::AcqRel) } {
        return None;
    }
    // SAFETY: As above; only the address is taken.
    NonNull::new(unsafe { &raw mut (*p).io })
}

/// Drops the reference the slot holds, if any (once: the swap decides).
///
/// # Safety
///
/// As for [`ref_slot`]; `map` wrote the slot.
pub(super) unsafe fn put_slot(bio: *mut bindings::bio) {
    // SAFETY: Per the contract the slot is valid and initialised; `refs`
    // does not change after `map` and `tag` is atomic.
    let slot = unsafe { &*ref_slot(bio) };
    let tag = slot.tag.swap(0, Ordering::AcqRel);
    if tag & REF_TAKEN != 0 {
        // SAFETY: A set tag means `map` (or `retake_inflight`) took this
        // reference on `slot.refs`, which live as long as their target, and
        // the target outlives its bios; the swap made this its one put.
        unsafe { bindings::dmq_inflight_put(slot.refs, tag & !REF_TAKEN) };
    }
}

/// Gives up the in-flight reference `bio` holds, if any, while its target
/// keeps the bio without working on it (parked until there is space): an
/// [`InflightRefs::switch_wait`] need not wait for it. The target must
/// [`retake_inflight`] before it works on the bio again. Any context.
pub(crate) fn release_inflight(bio: &Bio) {
    // SAFETY: Every `Bio` is a completion reference of a bio device-mapper
    // passed to `map` of a target registered here (`Bio::from_raw`), which
    // wrote the slot; the reference keeps the bio from ending.
    unsafe { put_slot(bio.as_raw()) };
}

/// Takes an in-flight reference (on the current index) for a bio whose
/// reference was given up with [`release_inflight`]; nothing if it holds
/// one. Never sleeps.
pub(crate) fn retake_inflight(bio: &Bio) {
    // SAFETY: As in `release_inflight`.
    let slot = unsafe { &*ref_slot(bio.as_raw()) };
    if slot.refs.is_null() || slot.tag.load(Ordering::Acquire) & REF_TAKEN != 0 {
        return;
    }
    // SAFETY: `slot.refs` are the live refs of the bio's target (it
    // outlives its bios); taking a reference never sleeps.
    let idx = unsafe { bindings::dmq_inflight_get(slot.refs) };
    if slot
        .tag
        .compare_exchange(0, REF_TAKEN | idx, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        // Another reference of the bio retook it first: give ours back.
        // SAFETY: We took it just now on the same refs.
        unsafe { bindings::dmq_inflight_put(slot.refs, idx) };
    }
}
