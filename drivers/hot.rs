// SPDX-License-Identifier: GPL-2.0

//! Lookups for the allocated-cluster path: where the top delta maps a
//! cluster to a plain data cluster of its own, a bio inside that cluster
//! (or over a run of such clusters, one after the other in the file)
//! needs no metadata work. The fast path (`target::fast`: the
//! submitting CPU's lane, or the worker before it locks the state) serves such
//! bios from this table without the table's state mutex, so they never
//! wait behind allocation, copy-on-write, a merge batch or a status walk.
//!
//! The table is direct-mapped by virtual cluster index; a slot holds the
//! host cluster, a tag for the rest of the index and whether the top owns
//! the cluster outright (COPIED: writes may go in place). Entries are put
//! and removed with the state mutex held, by code that has just read or
//! is about to change the L2 entry (or, `Inner::warm`, has just read
//! another entry of the same metadata page); lookups run concurrently with that
//! (one atomic word per slot: a lookup sees an entry whole or not at all).
//! Why a lookup racing a change is harmless, and how a freed cluster is
//! kept from lane I/O until it is reused, is in `target::fast`. Everything
//! else that changes the top's mappings wholesale (a merge's end, resume)
//! replaces the table (see `Inner::fast_on`): the old one is retired, the
//! new one is empty, for the top of then. While a merge runs the table
//! serves reads only (`Fast::stop_writes`).
//!
//! A slot may come from a cached L2 page not committed yet (see `meta`).
//! The fast path never serves a FUA or flush bio (those take the locked
//! path): a flush commits the mapping (or fails) before it completes.

use crate::kernel_abstractions::gfp_kv;
use crate::target::Delta;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use kernel::prelude::*;
use kernel::sync::Arc;

/// The next table's `Fast::id` (0 is none).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

const VALID: u64 = 1 << 63;
/// The top owns the cluster (COPIED): writes may go in place.
const OWNED: u64 = 1 << 62;
const HOST_BITS: u32 = 44;
const TAG_BITS: u32 = 18;
/// Table size bounds, in slots (8 bytes each). At most 2 MiB: one slot per
/// cluster of a 16 GiB image of 64 KiB clusters; beyond, clusters share
/// slots, and a working set larger than the table evicts itself. With 64 Ki
/// slots, 4k random reads over a written 512 MiB image of 4 KiB clusters
/// found 37% of their clusters in the table after a first pass over it;
/// with 256 Ki, 91% to 100%.
const MIN_SLOTS: u64 = 64;
const MAX_SLOTS: u64 = 1 << 18;

/// The fast path while it is on: the top and what is known of it.
pub(crate) struct Fast {
    pub(crate) top: Arc<Delta>,
    pub(crate) map: HotMap,
    /// Tells this table from every other one (never 0): marks the metadata
    /// pages whose entries went into it (`Inner::warm`).
    pub(crate) id: u64,
    /// Retired (`Inner::fast_off`, or `Inner::fast_on` replacing it): the
    /// worker no longer keeps this table up to date, so a lane still
    /// holding it must not use it.
    dead: AtomicBool,
    /// Writes in place may use it (not while a merge runs: the merge must
    /// see every guest write).
    writes: AtomicBool,
}

impl Fast {
    /// An empty table for `top`; for reads only unless `writes`.
    pub(crate) fn new(top: Arc<Delta>, writes: bool) -> Result<Arc<Self>> {
        let map = HotMap::new(top.hdr.size >> top.hdr.cluster_bits)?;
        Ok(Arc::new(
            Self {
                top,
                map,
                id: NEXT_ID.fetch_add(1, Relaxed),
                dead: AtomicBool::new(false),
                writes: AtomicBool::new(writes),
            },
            GFP_KERNEL,
        )?)
    }

    /// Retires the table (state mutex held). Like an entry's removal, this
    /// is ordered before a later free by `IoCounter::wait_idle`: a lane
    /// that checks `is_dead` under a hold either sees it or is waited for.
    pub(crate) fn retire(&self) {
        self.dead.store(true, Relaxed);
    }

    /// Whether the table was retired (see `retire`).
    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Relaxed)
    }

    /// Takes writes off the table for good (state mutex held; a merge
    /// starts). Ordered like `retire` for the bios mapped after the merge's
    /// in-flight switch; those mapped before are waited for.
    pub(crate) fn stop_writes(&self) {
        self.writes.store(false, Relaxed);
    }

    /// Whether writes in place may use the table (see `stop_writes`).
    pub(crate) fn takes_writes(&self) -> bool {
        self.writes.load(Relaxed)
    }
}

pub(crate) struct HotMap {
    slots: KVVec<AtomicU64>,
    /// log2 of the number of slots.
    bits: u32,
}

impl HotMap {
    /// A table for an image of `clusters` clusters (one slot per cluster
    /// up to `MAX_SLOTS`).
    pub(crate) fn new(clusters: u64) -> Result<Self> {
        let n = clusters.clamp(MIN_SLOTS, MAX_SLOTS).next_power_of_two();
        let mut slots = KVVec::with_capacity(n as usize, gfp_kv())?;
        for _ in 0..n {
            slots.push(AtomicU64::new(0), GFP_KERNEL)?;
        }
        Ok(Self {
            slots,
            bits: n.trailing_zeros(),
        })
    }

    fn slot(&self, vci: u64) -> Option<&AtomicU64> {
        self.slots.get((vci & ((1 << self.bits) - 1)) as usize)
    }

    /// Remembers that the top maps cluster `vci` to the host cluster at
    /// `host` (`owned`: COPIED). State mutex held.
    pub(crate) fn put(&self, cb: u32, vci: u64, host: u64, owned: bool) {
        let (tag, hci) = (vci >> self.bits, host >> cb);
        if tag >> TAG_BITS != 0 || hci >> HOST_BITS != 0 {
            return;
        }
        let v = VALID | if owned { OWNED } else { 0 } | tag << HOST_BITS | hci;
        if let Some(s) = self.slot(vci) {
            s.store(v, Relaxed);
        }
    }

    /// `put`, but only into a slot that holds nothing: for entries nobody
    /// asked for yet (`Inner::warm`), which must not evict one in use.
    /// State mutex held (as every change of a slot is, so the check and the
    /// store cannot race another change).
    pub(crate) fn warm(&self, cb: u32, vci: u64, host: u64, owned: bool) {
        if self.slot(vci).is_some_and(|s| s.load(Relaxed) & VALID == 0) {
            self.put(cb, vci, host, owned);
        }
    }

    /// Forgets cluster `vci` (its mapping is about to change). State mutex
    /// held.
    pub(crate) fn del(&self, vci: u64) {
        if let Some(s) = self.slot(vci) {
            s.store(0, Relaxed);
        }
    }

    /// Host offset of the cluster `vci` if the fast path may serve it (a
    /// write needs a cluster the top owns).
    pub(crate) fn lookup(&self, cb: u32, vci: u64, write: bool) -> Option<u64> {
        let v = self.slot(vci)?.load(Relaxed);
        let tag = (v >> HOST_BITS) & ((1 << TAG_BITS) - 1);
        if v & VALID == 0 || tag != vci >> self.bits || (write && v & OWNED == 0) {
            return None;
        }
        Some((v & ((1 << HOST_BITS) - 1)) << cb)
    }
}
