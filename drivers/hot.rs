// SPDX-License-Identifier: GPL-2.0

//! Lookups for the allocated-cluster path: where the chain maps a cluster
//! to a plain data cluster of one delta (the top's own, or a lower delta's
//! where every delta above it has nothing for the cluster), a bio inside
//! that cluster (or over a run of such clusters, one after the other in the
//! same file) needs no metadata work. The fast path (`target::fast`: the
//! submitting CPU's lane, or the worker before it locks the state) serves such
//! bios from this table without the table's state mutex, so they never
//! wait behind allocation, copy-on-write, a merge batch or a status walk.
//! Reads of a base through a thin top (a guest booting from a template
//! image) thus go the way reads of the top's own clusters go.
//!
//! The table is direct-mapped by virtual cluster index; a slot holds the
//! host cluster, which delta's file it is in (how far below the top), a
//! tag for the rest of the index and whether the top owns the cluster
//! outright (COPIED: writes may go in place; never so below the top).
//! Entries are put and removed with the state mutex held, by code that has
//! just read or is about to change an L2 entry (or, `Inner::warm` and
//! `Inner::hot_below`, has just read another entry of the same metadata
//! page of the top, or of a lower delta where every delta above has
//! nothing for the cluster); lookups run concurrently with that
//! (one atomic word per slot: a lookup sees an entry whole or not at all).
//! An entry is removed before its cluster's L2 entry changes in the delta
//! it points into or in any above it (`WorkerState::hot_forget`, called
//! for every change of an L2 entry), so one pointing below the top goes
//! before the top (or a delta between) maps the cluster, and before a
//! merge changes the delta it points into.
//! Why a lookup racing a change is harmless, and how a freed cluster is
//! kept from lane I/O until it is reused, is in `target::fast`. Everything
//! else that changes the chain's mappings wholesale (a merge's end, resume)
//! replaces the table (see `Inner::fast_on`): the old one is retired, the
//! new one is empty, for the chain of then. While a merge runs the table
//! serves reads only (`Fast::stop_writes`).
//!
//! Beside the table, a bitmap (`ZeroMap`) says which clusters the chain
//! shows as zeroes; reads of those only are answered in `map` itself.
//!
//! A slot may come from a cached L2 page not committed yet (see `meta`).
//! The fast path never serves a flush bio (those take the locked path): a
//! flush commits the mapping (or fails) before it completes. It serves a
//! FUA write only while the top's metadata is durable, the mapping with it
//! (`target::fast`, `Inner::sync_fua`).

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
/// Host cluster index (with 512-byte clusters, files up to 512 TiB; a
/// cluster beyond is not put).
const HOST_BITS: u32 = 40;
/// How far below the top the cluster's delta is (0: the top).
const BELOW_BITS: u32 = 4;
const TAG_SHIFT: u32 = HOST_BITS + BELOW_BITS;
const TAG_BITS: u32 = 18;
/// Deltas below the top an entry may point into at most.
const MAX_BELOW: usize = (1 << BELOW_BITS) - 1;
/// Table size bounds, in slots (8 bytes each). At most 2 MiB: one slot per
/// cluster of a 16 GiB image of 64 KiB clusters; beyond, clusters share
/// slots, and a working set larger than the table evicts itself. With 64 Ki
/// slots, 4k random reads over a written 512 MiB image of 4 KiB clusters
/// found 37% of their clusters in the table after a first pass over it;
/// with 256 Ki, 91% to 100%.
const MIN_SLOTS: u64 = 64;
const MAX_SLOTS: u64 = 1 << 18;
/// Clusters the zero map covers at most (2 MiB of bits: 1 TiB of 64 KiB
/// clusters, 64 GiB of 4 KiB ones); reads of clusters beyond go through
/// the worker as before.
const ZERO_MAX_CLUSTERS: u64 = 1 << 24;

/// The fast path while it is on: the top and what is known of it.
pub(crate) struct Fast {
    pub(crate) top: Arc<Delta>,
    /// The deltas under the top entries may point into, nearest first, up
    /// to `MAX_BELOW`. One slot is one cluster of each: the constructor
    /// and a reload refuse a chain of mixed cluster sizes, and `new` stops
    /// at one all the same.
    below: KVec<Arc<Delta>>,
    pub(crate) map: HotMap,
    /// The clusters the chain shows as zeroes.
    pub(crate) zero: ZeroMap,
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
    /// An empty table for `chain` (base first); for reads only unless
    /// `writes`.
    pub(crate) fn new(chain: &[Arc<Delta>], writes: bool) -> Result<Arc<Self>> {
        let top = chain.last().ok_or(EINVAL)?.clone();
        let cb = top.hdr.cluster_bits;
        let mut below = KVec::new();
        for d in chain.iter().rev().skip(1).take(MAX_BELOW) {
            if d.hdr.cluster_bits != cb {
                break;
            }
            below.push(d.clone(), GFP_KERNEL)?;
        }
        let map = HotMap::new(top.hdr.size >> cb)?;
        let zero = ZeroMap::new(top.hdr.size.div_ceil(top.hdr.cluster_size()))?;
        Ok(Arc::new(
            Self {
                top,
                below,
                map,
                zero,
                id: NEXT_ID.fetch_add(1, Relaxed),
                dead: AtomicBool::new(false),
                writes: AtomicBool::new(writes),
            },
            GFP_KERNEL,
        )?)
    }

    /// The delta `n` below the top (0: the top), if entries may point into
    /// it.
    pub(crate) fn delta(&self, n: usize) -> Option<&Arc<Delta>> {
        match n.checked_sub(1) {
            None => Some(&self.top),
            Some(i) => self.below.get(i),
        }
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

    /// The top's host bytes `[off, off + len)` are about to hold metadata
    /// (a new L2 table, refcount block or refcount table; state mutex
    /// held, before anything is written there). Forgets every entry naming
    /// those clusters; true if a lane may ever have written one of them
    /// through this table: the caller then waits for the in-flight counter
    /// to go idle before the metadata is written (a write looked up before
    /// may still be in flight, also through an entry since evicted by
    /// another cluster's, or, at a merge's start, one that checked
    /// `takes_writes` before `stop_writes`).
    ///
    /// Only a damaged image gets here with such an entry: a cluster the
    /// allocator hands out has refcount 0, and an entry the top owns
    /// (COPIED) names a cluster with refcount 0 only where the refcounts
    /// are wrong (two COPIED entries for one cluster, one of them
    /// discarded; or a count too low from the start). The locked path
    /// refuses a data write over metadata (`DeltaMd::overlap`), and a new
    /// entry for it goes in for reads only (`Inner::hot_writable`); this
    /// keeps lanes from doing what the locked path refuses. Clusters past
    /// every one an owned entry ever named (the file's growth: nearly
    /// every allocation) cost nothing here; others (reused after a
    /// discard) one pass over the table (at most 2 MiB) and the wait.
    pub(crate) fn forget_for_metadata(&self, off: u64, len: u64) -> bool {
        let cb = self.top.hdr.cluster_bits;
        let first = off >> cb;
        let last = off.saturating_add(len.max(1) - 1) >> cb;
        if first >= self.map.owned_end.load(Relaxed) {
            return false;
        }
        self.map.forget_hosts(first, last);
        true
    }
}

pub(crate) struct HotMap {
    slots: KVVec<AtomicU64>,
    /// log2 of the number of slots.
    bits: u32,
    /// One past the highest host cluster an entry the top owns was ever
    /// put for (0: none): lanes have never written at or past it (see
    /// `Fast::forget_for_metadata`). Changed under the state mutex only.
    owned_end: AtomicU64,
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
            owned_end: AtomicU64::new(0),
        })
    }

    fn slot(&self, vci: u64) -> Option<&AtomicU64> {
        self.slots.get((vci & ((1 << self.bits) - 1)) as usize)
    }

    /// Remembers that the top maps cluster `vci` to the host cluster at
    /// `host` (`owned`: COPIED). State mutex held.
    pub(crate) fn put(&self, cb: u32, vci: u64, host: u64, owned: bool) {
        self.put_at(cb, vci, 0, host, owned);
    }

    /// Remembers that the chain shows cluster `vci` from the host cluster at
    /// `host` of the delta `below` deltas under the top (0: the top;
    /// `owned`: the top's, COPIED). State mutex held.
    pub(crate) fn put_at(&self, cb: u32, vci: u64, below: usize, host: u64, owned: bool) {
        let (tag, hci) = (vci >> self.bits, host >> cb);
        if tag >> TAG_BITS != 0 || hci >> HOST_BITS != 0 || below > MAX_BELOW {
            return;
        }
        let owned = if owned && below == 0 {
            // State mutex held: no other store races this one.
            if self.owned_end.load(Relaxed) <= hci {
                self.owned_end.store(hci + 1, Relaxed);
            }
            OWNED
        } else {
            0
        };
        let v = VALID | owned | tag << TAG_SHIFT | (below as u64) << HOST_BITS | hci;
        let Some(s) = self.slot(vci) else {
            return;
        };
        // An entry of a lower delta does not evict one of the top (another
        // cluster's: the top has nothing for this one), which may serve
        // writes in place.
        let cur = s.load(Relaxed);
        if below > 0 && cur & VALID != 0 && (cur >> HOST_BITS) & ((1 << BELOW_BITS) - 1) == 0 {
            return;
        }
        s.store(v, Relaxed);
    }

    /// `put`, but only into a slot that holds nothing: for entries nobody
    /// asked for yet (`Inner::warm`), which must not evict one in use.
    /// State mutex held (as every change of a slot is, so the check and the
    /// store cannot race another change).
    pub(crate) fn warm(&self, cb: u32, vci: u64, host: u64, owned: bool) {
        self.warm_at(cb, vci, 0, host, owned);
    }

    /// `put_at`, but only into a slot that holds nothing (see `warm`).
    pub(crate) fn warm_at(&self, cb: u32, vci: u64, below: usize, host: u64, owned: bool) {
        if self.slot(vci).is_some_and(|s| s.load(Relaxed) & VALID == 0) {
            self.put_at(cb, vci, below, host, owned);
        }
    }

    /// Forgets cluster `vci` if its entry points into a delta `above` or
    /// more deltas below the top (0: the top): the L2 entry of it in the
    /// delta `above` below the top is about to change, which changes what
    /// the chain shows from there up only. State mutex held (as every
    /// change of a slot is, so the check and the store cannot race another
    /// change).
    pub(crate) fn del(&self, vci: u64, above: usize) {
        let Some(s) = self.slot(vci) else {
            return;
        };
        if let Some((below, _)) = self.decode(s.load(Relaxed), vci) {
            if below >= above {
                s.store(0, Relaxed);
            }
        }
    }

    /// Forgets every entry of the top that names a host cluster in
    /// `first..=last` (see `Fast::forget_for_metadata`). State mutex held.
    fn forget_hosts(&self, first: u64, last: u64) {
        for (i, s) in self.slots.iter().enumerate() {
            let v = s.load(Relaxed);
            let below = (v >> HOST_BITS) & ((1 << BELOW_BITS) - 1);
            let hci = v & ((1 << HOST_BITS) - 1);
            if v & VALID != 0 && below == 0 && (first..=last).contains(&hci) {
                s.store(0, Relaxed);
            }
            if i % 65536 == 65535 {
                crate::kernel_abstractions::task::cond_resched();
            }
        }
    }

    /// Which delta (how far below the top) holds the cluster `vci` and the
    /// host offset of it there, if the fast path may serve it (a write
    /// needs a cluster the top owns).
    pub(crate) fn lookup(&self, cb: u32, vci: u64, write: bool) -> Option<(usize, u64)> {
        let v = self.slot(vci)?.load(Relaxed);
        if write && v & OWNED == 0 {
            return None;
        }
        self.decode(v, vci).map(|(below, hci)| (below, hci << cb))
    }

    /// The delta (how far below the top) and host cluster index of slot
    /// value `v`, if it is an entry for cluster `vci`.
    fn decode(&self, v: u64, vci: u64) -> Option<(usize, u64)> {
        let tag = (v >> TAG_SHIFT) & ((1 << TAG_BITS) - 1);
        if v & VALID == 0 || tag != vci >> self.bits {
            return None;
        }
        let below = ((v >> HOST_BITS) & ((1 << BELOW_BITS) - 1)) as usize;
        Some((below, v & ((1 << HOST_BITS) - 1)))
    }
}

/// One bit per cluster: set, the chain shows the whole cluster as zeroes
/// (every delta has nothing for it, or the first that has something has
/// a zero cluster, or it lies past the end of the first delta without
/// it). A read of such clusters only is answered in `map` with zeroes: no
/// lane, no worker, no I/O (`Inner::fast_zero`); reads of a thin image's
/// holes (a fresh image, a sparse one read at random) then cost what a
/// read of dm-zero does. A bit is set and cleared with the state mutex
/// held as the table's entries are (`Inner::resolve`, `Inner::warm`,
/// and `WorkerState::hot_forget` before every change of an L2 entry of any
/// delta for the cluster: a guest write, write-zeroes, discard, a merge's
/// copy or drop). Dense, unlike the table: 64 GiB of 64 KiB clusters take
/// 128 KiB, and no cluster evicts another.
pub(crate) struct ZeroMap {
    words: KVVec<AtomicU64>,
}

impl ZeroMap {
    /// A map for an image of `clusters` clusters (the first
    /// `ZERO_MAX_CLUSTERS` of them).
    fn new(clusters: u64) -> Result<Self> {
        let n = clusters.min(ZERO_MAX_CLUSTERS).div_ceil(64) as usize;
        let mut words = KVVec::with_capacity(n, gfp_kv())?;
        for _ in 0..n {
            words.push(AtomicU64::new(0), GFP_KERNEL)?;
        }
        Ok(Self { words })
    }

    fn bit(&self, vci: u64) -> Option<(&AtomicU64, u64)> {
        let w = self.words.get(usize::try_from(vci / 64).ok()?)?;
        Some((w, 1 << (vci % 64)))
    }

    /// Remembers that the chain shows cluster `vci` as zeroes. State mutex
    /// held.
    pub(crate) fn set(&self, vci: u64) {
        if let Some((w, m)) = self.bit(vci) {
            // A load first: a stream of reads of known zeroes must not pull
            // the line from the CPUs reading it.
            if w.load(Relaxed) & m == 0 {
                w.fetch_or(m, Relaxed);
            }
        }
    }

    /// `set` for the clusters `first..end` (those the map covers).
    pub(crate) fn set_range(&self, first: u64, end: u64) {
        let end = end.min((self.words.len() as u64).saturating_mul(64));
        let mut v = first;
        while v < end {
            let n = (64 - v % 64).min(end - v);
            let m = (u64::MAX >> (64 - n)) << (v % 64);
            if let Some(w) = usize::try_from(v / 64).ok().and_then(|i| self.words.get(i)) {
                if w.load(Relaxed) & m != m {
                    w.fetch_or(m, Relaxed);
                }
            }
            v += n;
        }
    }

    /// Forgets that cluster `vci` is zeroes (an L2 entry of it is about to
    /// change). State mutex held.
    pub(crate) fn clear(&self, vci: u64) {
        if let Some((w, m)) = self.bit(vci) {
            if w.load(Relaxed) & m != 0 {
                w.fetch_and(!m, Relaxed);
            }
        }
    }

    /// Whether the chain shows cluster `vci` as zeroes.
    pub(crate) fn is_zero(&self, vci: u64) -> bool {
        self.bit(vci).is_some_and(|(w, m)| w.load(Relaxed) & m != 0)
    }
}
