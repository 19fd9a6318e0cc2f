// SPDX-License-Identifier: GPL-2.0

//! In-flight reference switching: "wait for every request started before
//! now" while new requests keep flowing.
//!
//! C header: [`include/linux/percpu-refcount.h`](srctree/include/linux/percpu-refcount.h)
//!
//! Two per-cpu refcounts and an index. A request takes a reference on the
//! current index (lock-free) and drops it when it ends.
//! [`InflightRefs::switch_wait`] flips the index, kills the old refcount and
//! sleeps until it drains, then makes it usable again. The device-mapper
//! abstraction does the get/put around every bio of targets that opt in
//! (see `dm::Target::inflight`; a target gives a bio's reference up while
//! it keeps the bio parked, `dm::release_inflight`).

use super::bindings;
use core::ptr::NonNull;
use kernel::error::{code::ENOMEM, Result};

/// A pair of per-cpu in-flight refcounts with a current index.
pub(crate) struct InflightRefs(NonNull<bindings::dmq_inflight>);

// SAFETY: The C side synchronises get/put (per-cpu refcounts, RCU) and
// serialises switches with a mutex; the object may be used from any thread.
unsafe impl Send for InflightRefs {}
// SAFETY: As above: every operation is thread-safe.
unsafe impl Sync for InflightRefs {}

impl InflightRefs {
    /// Both refcounts live, index 0.
    pub(crate) fn new() -> Result<Self> {
        // SAFETY: No preconditions; returns null on allocation failure.
        let p = unsafe { bindings::dmq_inflight_new() };
        NonNull::new(p).map(Self).ok_or(ENOMEM)
    }

    /// The C object, for the device-mapper abstraction, which takes and
    /// drops the references of bios (`dmq_inflight_get`/`_put`, never
    /// sleeping) while `self` is alive.
    pub(super) fn as_raw(&self) -> *mut bindings::dmq_inflight {
        self.0.as_ptr()
    }

    /// Sleeps until every reference taken before this call is dropped.
    /// References taken meanwhile go to the other index and are not waited
    /// for. Must not be called from a context those references wait on.
    pub(crate) fn switch_wait(&self) {
        // SAFETY: `self.0` is alive; the C side serialises concurrent switches.
        unsafe { bindings::dmq_inflight_switch_wait(self.0.as_ptr()) };
    }
}

impl Drop for InflightRefs {
    fn drop(&mut self) {
        // SAFETY: We own the object; no reference is held any more (the owner
        // outlives every request that took one).
        unsafe { bindings::dmq_inflight_free(self.0.as_ptr()) };
    }
}
