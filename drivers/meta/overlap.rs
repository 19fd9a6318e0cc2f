// SPDX-License-Identifier: GPL-2.0

//! The overlap guard of a writable delta (QEMU's overlap check): which
//! clusters hold metadata, the load's check that each of them has a
//! non-zero refcount (so the allocator never hands one out), and the
//! lookup that stops a write landing on one (`DeltaMd::overlap`).

use super::*;

/// Metadata clusters and the overlap check.
impl DeltaMd {
    /// Records the metadata clusters the tables name (for [`overlap`]) and,
    /// if `check`, makes sure every cluster in use as metadata (header, L1
    /// table, refcount table and blocks, L2 tables) has a non-zero refcount
    /// before the image takes writes: the allocator hands out refcount-0
    /// clusters, and one that holds metadata would be overwritten, spreading
    /// the damage (what QEMU's overlap checks guard against). Done once per
    /// load (our own allocations keep it true); EUCLEAN with a dmesg line
    /// naming the structure otherwise. Bounded by the L1 and refcount table
    /// sizes.
    ///
    /// [`overlap`]: DeltaMd::overlap
    pub(super) fn note_metadata(&mut self, file: &File, hdr: &Header, check: bool) -> Result {
        let cs = hdr.cluster_size();
        let span = |off: u64, bytes: u64| -> (u64, u64) {
            let first = off / cs;
            (first, first + bytes.div_ceil(cs).max(1))
        };
        let l1_bytes = (self.l1.len() as u64).checked_mul(8).ok_or(EFBIG)?;
        let rt_bytes = self.rt_clusters.checked_mul(cs).ok_or(EFBIG)?;
        let fixed = [
            ("header", span(0, 1)),
            ("L1 table", span(self.l1_off, l1_bytes)),
            ("refcount table", span(self.rt_off, rt_bytes)),
        ];
        for (what, (first, end)) in fixed {
            for c in first..end {
                if check {
                    self.check_in_use(file, hdr, c, what)?;
                }
            }
        }
        // The clusters the two tables point at.
        let tables = [
            (true, fmt::REFT_OFFSET_MASK, MetaKind::RefcountBlock),
            (false, fmt::L1E_OFFSET_MASK, MetaKind::L2Table),
        ];
        // Room for what the tables name, not for their size (an L1 of a
        // sparse image is mostly zeroes).
        let named = |t: &KVVec<u64>, mask: u64| t.iter().filter(|&&e| e & mask != 0).count();
        let mut found = MetaBuilder::with_capacity(
            named(&self.rt, fmt::REFT_OFFSET_MASK)
                .saturating_add(named(&self.l1, fmt::L1E_OFFSET_MASK))
                .saturating_add(self.meta.len()),
        )?;
        for (rt, mask, kind) in tables {
            let n = if rt { self.rt.len() } else { self.l1.len() };
            for i in 0..n {
                let raw = if rt { self.rt.get(i) } else { self.l1.get(i) };
                let off = raw.copied().unwrap_or(0) & mask;
                if off != 0 {
                    found.add(self.cluster_of(off), kind)?;
                }
                if i % 1024 == 1023 {
                    crate::kernel_abstractions::task::cond_resched();
                }
            }
        }
        self.meta.rebuild(found)?;
        if check {
            self.check_tables_in_use(file, hdr)?;
        }
        Ok(())
    }

    fn check_in_use(&mut self, file: &File, hdr: &Header, c: u64, what: &str) -> Result {
        if self.refcount(file, hdr, c)? != 0 {
            return Ok(());
        }
        Err(self.refcount_zero(hdr, c, what))
    }

    /// The L2 tables and refcount blocks the tables name (`meta`) all have
    /// a non-zero refcount (see `note_metadata`). Checked in the order of
    /// the refcount pages that hold their refcounts, so each page is read
    /// once: in the tables' order, a damaged refcount table naming a few
    /// blocks in a cycle larger than the metadata cache cost a read per
    /// entry (5 Mi reads from a ~40 MiB file, with the state mutex held at
    /// resume). Takes 8 bytes per cluster for the while.
    fn check_tables_in_use(&mut self, file: &File, hdr: &Header) -> Result {
        /// A refcount's place: its page's index << SLOT_BITS | its index in
        /// the page (below 2^15: 4096 bytes of 1-bit refcounts).
        const SLOT_BITS: u32 = 15;
        let mut slots = KVVec::with_capacity(self.meta.len(), gfp_kv())?;
        for (c, kind) in self.meta.iter() {
            match self.refcount_slot(hdr, c)? {
                Some((poff, i)) if i >> SLOT_BITS == 0 => {
                    slots.push((poff / MD_PAGE) << SLOT_BITS | i, gfp_kv())?
                }
                Some(_) => return Err(EIO),
                None => return Err(self.refcount_zero(hdr, c, kind.name())),
            }
        }
        clusters::sort(&mut slots);
        for (n, &slot) in slots.iter().enumerate() {
            let (poff, i) = ((slot >> SLOT_BITS) * MD_PAGE, slot & ((1 << SLOT_BITS) - 1));
            let page = self.page(file, poff)?;
            if fmt::refcount_get(page, i, hdr.refcount_order).ok_or(EIO)? == 0 {
                // Whose refcount it is: the first cluster with that slot.
                let hit = self.meta.iter().find(
                    |&(c, _)| matches!(self.refcount_slot(hdr, c), Ok(Some(s)) if s == (poff, i)),
                );
                return Err(match hit {
                    Some((c, kind)) => self.refcount_zero(hdr, c, kind.name()),
                    None => EIO,
                });
            }
            if n % 4096 == 4095 {
                crate::kernel_abstractions::task::cond_resched();
            }
        }
        Ok(())
    }

    /// Logs that the `what` in cluster `c` has refcount 0; EUCLEAN.
    fn refcount_zero(&self, hdr: &Header, c: u64, what: &str) -> Error {
        pr_err!(
            "dm-qcow2: image {}: {} at {:#x} has refcount 0 (metadata would be overwritten): repair with qemu-img check -r all\n",
            self.img,
            what,
            c.saturating_mul(hdr.cluster_size())
        );
        euclean()
    }

    /// Records that the cluster at `off` holds metadata (`kind`), before
    /// anything is written there.
    pub(super) fn note_meta(&mut self, off: u64, kind: MetaKind) -> Result {
        let c = self.cluster_of(off);
        self.meta.insert(c, kind)?;
        self.fence_lanes(off, self.cluster_size);
        Ok(())
    }

    /// Host bytes `[off, off + len)` are about to hold metadata: no data
    /// write may land there from then on (only a damaged image's entries
    /// can name them, see `Fast::forget_for_metadata`). Called after they
    /// are in the set `overlap` looks at, so no entry put later owns them
    /// and the locked path refuses writes there.
    pub(super) fn fence_lanes(&self, off: u64, len: u64) {
        let lanes = self
            .fast
            .as_ref()
            .is_some_and(|f| f.forget_for_metadata(off, len));
        if lanes || self.cluster_of(off) < self.in_place_end {
            // Writes in place started before (by lanes, or by the worker:
            // `note_in_place`) are waited for; lane holds taken meanwhile
            // fail (see `IoCounter::hold`), and the worker is the caller.
            self.io.wait_idle();
        }
    }

    /// The worker starts an asynchronous write in place into the cluster
    /// at `host` (see `fence_lanes`).
    pub(crate) fn note_in_place(&mut self, host: u64) {
        let end = self.cluster_of(host).saturating_add(1);
        self.in_place_end = self.in_place_end.max(end);
    }

    /// The cluster index of host offset `off`.
    fn cluster_of(&self, off: u64) -> u64 {
        // The cluster size is not zero (the header parser checked it).
        off.checked_div(self.cluster_size).unwrap_or(0)
    }

    /// The metadata structure that host bytes `[off, off + len)` of this
    /// delta overlap, if any: the header, the L1 table, the refcount table,
    /// a refcount block or an L2 table of the active L1 (QEMU's default
    /// overlap check, with every L2 table rather than the cached ones). Only
    /// for a delta that takes writes (refcounts loaded); O(log n) per
    /// cluster of the range, which callers keep to one or two clusters.
    pub(crate) fn overlap(&self, off: u64, len: u64) -> Option<&'static str> {
        if self.rt.is_empty() || len == 0 {
            return None;
        }
        let cs = self.cluster_size;
        let first = self.cluster_of(off);
        let last = self.cluster_of(off.saturating_add(len - 1));
        let hits = |start: u64, bytes: u64| -> bool {
            let end = self.cluster_of(start.saturating_add(bytes.max(1) - 1));
            first <= end && self.cluster_of(start) <= last
        };
        if first == 0 {
            return Some("header");
        }
        if hits(self.l1_off, (self.l1.len() as u64).saturating_mul(8)) {
            return Some("L1 table");
        }
        if hits(self.rt_off, self.rt_clusters.saturating_mul(cs)) {
            return Some("refcount table");
        }
        (first..=last).find_map(|c| self.meta.get(c).map(MetaKind::name))
    }

    /// Whether a write found metadata in its way (the delta takes no more).
    pub(crate) fn is_corrupt(&self) -> bool {
        self.corrupt
    }

    /// Records that a write found metadata in its way; true the first time.
    pub(crate) fn set_corrupt(&mut self) -> bool {
        !core::mem::replace(&mut self.corrupt, true)
    }
}
