// SPDX-License-Identifier: GPL-2.0

//! Per-bio data of the targets registered here: the in-flight reference
//! (`InflightRefs`) each bio `map` took holds until it ends, dropped once
//! whichever of the bio's end and a target's parking comes first, and
//! taken again when a parked bio is worked on.

use super::super::bindings;
use super::super::bio::Bio;
use super::super::inflight::InflightRefs;
use core::sync::atomic::{AtomicU32, Ordering};

/// Per-bio data of every bio `map` takes: where its in-flight reference is.
#[repr(C)]
struct RefSlot {
    /// The refs of the target that mapped the bio (`Target::inflight`), null
    /// if it has none. Written by `map` only, before any `Bio` of it exists.
    refs: *mut bindings::dmq_inflight,
    /// `REF_TAKEN | index` while the bio holds a reference on `refs`, else 0.
    tag: AtomicU32,
}

/// Bytes of per-bio data every target registered here asks for: a multiple
/// of 8 so that device-mapper's placement (just below the bio, inside
/// pointer-aligned structures) keeps the slot aligned.
pub(super) const REF_SLOT_SIZE: usize = core::mem::size_of::<RefSlot>();
const _: () = assert!(REF_SLOT_SIZE % core::mem::align_of::<RefSlot>() == 0);
/// Tag of a slot holding a reference.
const REF_TAKEN: u32 = 1 << 31;

/// The slot of `bio`.
///
/// # Safety
///
/// `bio` must be a bio device-mapper passed to `map` of a target registered
/// here (all ask for `REF_SLOT_SIZE` bytes of per-bio data), not ended yet.
unsafe fn ref_slot(bio: *mut bindings::bio) -> *mut RefSlot {
    // SAFETY: Per the contract, the bio carries `REF_SLOT_SIZE` bytes of
    // per-bio data, aligned (see `REF_SLOT_SIZE`).
    unsafe { bindings::dm_per_bio_data(bio, REF_SLOT_SIZE).cast::<RefSlot>() }
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
    // SAFETY: Per the contract the slot is ours and nothing reads it yet.
    unsafe {
        ref_slot(bio).write(RefSlot {
            refs,
            tag: AtomicU32::new(tag),
        })
    };
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
