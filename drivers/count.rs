// SPDX-License-Identifier: GPL-2.0

//! Allocated-cluster counts for the status line (`clusters=`), kept up to
//! date instead of walking every L2 table on each `dmsetup status`.
//!
//! Each delta's count is built once (after every load of its metadata, by
//! a work item queued at resume) by a walk over its L2 tables in batches,
//! the state mutex dropped between them; from then on every change of an L2 entry adjusts it
//! (`DeltaMd::set_l2_entry` calls [`AllocCount::note`]). While the walk is
//! under way, a change behind its cursor adjusts the count and one ahead of
//! it is seen by the walk, so the result is exact either way.
//!
//! An L2 table the L1 names more than once (QEMU never writes one; a
//! hand-made image may, with the table's refcount counting each name) is
//! walked once: its count is kept for the other names, so the walk costs
//! the file's tables, not the L1's names (an L1 naming one table 4 Mi
//! times was 2^35 lookups for one status line). Writes never change such a
//! table in place (its names are not COPIED: `DeltaMd::ensure_l2` copies
//! it first), unless a damaged image claims it as its own through one
//! name: then the count may drift from what the others map.

use crate::kernel_abstractions::file::File;
use crate::kernel_abstractions::gfp_kv;
use crate::meta::{DeltaMd, HoleWord};
use crate::qcow2_format::{self as fmt, Cluster, Header};
use kernel::error::code::EIO;
use kernel::prelude::*;

/// L2 entries the walk looks at per batch (with the state locked), in
/// whole tables (at least one).
pub(crate) const BATCH_ENTRIES: u64 = 64 * 1024;

/// The count of clusters whose L2 entries reference host data (normal,
/// compressed, or extended with an allocated subcluster) in one delta.
pub(crate) struct AllocCount {
    /// L1 entries `[0, cursor)` are counted in `n`.
    cursor: u64,
    n: u64,
    /// The walk failed during the current status call (retried by the next).
    pub(crate) failed: bool,
    /// The L2 tables the L1 named more than once at the load, by offset
    /// (sorted), each with what it counts once walked ([`NOT_WALKED`] until
    /// then; [`FORGOTTEN`] once its cluster was freed: it may come back as
    /// another table, named once).
    shared: KVVec<(u64, u64)>,
}

/// A shared table's count is not known yet.
const NOT_WALKED: u64 = u64::MAX;
/// A shared table's cluster was freed: not shared any more.
const FORGOTTEN: u64 = u64::MAX - 1;

/// Whether the L2 entry `(raw, bitmap)` references host data.
fn maps_data(hdr: &Header, raw: u64, bitmap: u64) -> bool {
    let bitmap = if hdr.extended_l2() { bitmap } else { 0 };
    match fmt::decode_l2(hdr, raw, bitmap) {
        Ok(Cluster::Normal { .. } | Cluster::Compressed { .. }) => true,
        Ok(Cluster::Extended {
            host: Some(_),
            alloc,
            ..
        }) => alloc != 0,
        _ => false,
    }
}

impl AllocCount {
    /// Nothing counted yet, for an L1 naming the tables at `shared` (sorted
    /// offsets) more than once.
    pub(crate) fn new(shared: &[u64]) -> Result<Self> {
        let mut memo = KVVec::with_capacity(shared.len(), gfp_kv())?;
        for &off in shared {
            memo.push((off, NOT_WALKED), gfp_kv())?;
        }
        Ok(Self {
            cursor: 0,
            n: 0,
            failed: false,
            shared: memo,
        })
    }

    /// Where in `shared` the table at `off` is kept: the L1 named it more
    /// than once at the load, and its cluster was not freed since.
    fn shared_slot(&mut self, off: u64) -> Option<&mut u64> {
        let k = self.shared.binary_search_by_key(&off, |&(o, _)| o).ok()?;
        let (_, v) = self.shared.get_mut(k)?;
        (*v != FORGOTTEN).then_some(v)
    }

    /// Whether the L1 named the table at `off` more than once at the load
    /// (and its cluster was not freed since).
    pub(crate) fn is_shared(&mut self, off: u64) -> bool {
        self.shared_slot(off).is_some()
    }

    /// Whether the L1 named any table more than once at the load (one not
    /// freed since).
    pub(crate) fn any_shared(&self) -> bool {
        self.shared.iter().any(|&(_, v)| v != FORGOTTEN)
    }

    /// The cluster at `off` was freed: if it held a shared table, that
    /// table is gone. (A name given a copy of it, `DeltaMd::ensure_l2`,
    /// leaves the table itself as it was: its count stays good for the
    /// names left.)
    pub(crate) fn forget_shared(&mut self, off: u64) {
        if let Some(v) = self.shared_slot(off) {
            *v = FORGOTTEN;
        }
    }

    /// The count, once the walk is done.
    pub(crate) fn value(&self, hdr: &Header) -> Option<u64> {
        (self.cursor >= hdr.min_l1_entries()).then_some(self.n)
    }

    /// The L2 entry of `vaddr` changed from `old` to `new` (raw entry and
    /// extended-L2 bitmap). O(1); never fails.
    pub(crate) fn note(&mut self, hdr: &Header, vaddr: u64, old: (u64, u64), new: (u64, u64)) {
        // Ahead of the walk: it will count the new entry itself.
        if hdr.l1_index(vaddr) >= self.cursor {
            return;
        }
        match (maps_data(hdr, old.0, old.1), maps_data(hdr, new.0, new.1)) {
            (false, true) => self.n = self.n.saturating_add(1),
            (true, false) => self.n = self.n.saturating_sub(1),
            _ => {}
        }
    }
}

/// Counts about `entries` more L2 entries of `md`, in whole tables (through
/// its metadata cache); returns whether the count is complete. The caller
/// holds the state locked and may drop it between calls.
pub(crate) fn step(md: &mut DeltaMd, file: &File, hdr: &Header, entries: u64) -> Result<bool> {
    let total = hdr.min_l1_entries();
    let per_l2 = hdr.l2_entries();
    let cs = hdr.cluster_size();
    let span = per_l2.saturating_mul(cs);
    let mut done = 0;
    while md.count.cursor < total && done < entries {
        let i = md.count.cursor;
        // `i < min_l1_entries`, so `i * span < size + span`: no overflow
        // for any size the header parser accepts; checked all the same.
        let Some(vbase) = i.checked_mul(span) else {
            return Err(EIO);
        };
        let mut n = 0u64;
        // A table wholly past the file's end or in a hole of it reads as
        // zeroes (nothing to count): not a look at each of its entries,
        // which for an L1 that names a million such tables (a ~10 MiB
        // damaged or hostile image) were 2^33 with 64 KiB clusters, a
        // status call waiting for them.
        let l1e = md.l1_entry_in_file(file, hdr, vbase, HoleWord::Trust)?;
        if let Some(l1e) = l1e {
            // A shared table already walked counts what it did (the last
            // table, which the disk's end may cut short, is walked itself).
            let whole = vbase.checked_add(span).is_some_and(|e| e <= hdr.size);
            let kept = match md.count.shared_slot(l1e.l2_offset) {
                Some(v) if whole => Some(*v),
                _ => None,
            };
            match kept {
                Some(v) if v != NOT_WALKED => n = v,
                _ => {
                    for j in 0..per_l2 {
                        let Some(vaddr) = j.checked_mul(cs).and_then(|o| o.checked_add(vbase))
                        else {
                            break;
                        };
                        if vaddr >= hdr.size {
                            break;
                        }
                        let (raw, bitmap) = md.l2_entry(file, hdr, l1e.l2_offset, vaddr)?;
                        n += u64::from(maps_data(hdr, raw, bitmap));
                    }
                    if kept.is_some() {
                        if let Some(v) = md.count.shared_slot(l1e.l2_offset) {
                            *v = n;
                        }
                    }
                }
            }
        }
        // The whole table at once: an error above leaves the cursor here.
        md.count.n = md.count.n.saturating_add(n);
        md.count.cursor = i + 1;
        done = done.saturating_add(per_l2);
    }
    Ok(md.count.cursor >= total)
}
