// SPDX-License-Identifier: GPL-2.0

//! Refcounts and cluster allocation of a delta: the refcount table and
//! blocks, the search for free clusters, growing and trimming the file,
//! and the deferred decrements the commit makes safe to apply.

use super::*;

/// Image files are extended (sparsely) in steps of this many bytes, so that
/// most writes of new clusters do not extend the file, and trimmed back to
/// the last used cluster on suspend.
const GROW_STEP: u64 = 128 << 20;

/// The longest file a crash can leave for an image whose header is `hdr`:
/// what its refcount table describes, plus the refcount block and the
/// twice larger table a move of the table writes past that before the
/// header points at them (`grow_refcount_table`), rounded up to a growth
/// step. A longer file is refused (EFBIG, as the C target refuses any
/// file longer than its table describes, its own crash states included).
pub(crate) fn crash_size_limit(hdr: &Header) -> u64 {
    let cs = hdr.cluster_size();
    let entries = u64::from(hdr.refcount_table_clusters).saturating_mul(cs / 8);
    let end = hdr
        .max_file_size()
        .saturating_add(cs)
        .saturating_add(moved_table_bytes(entries, cs).unwrap_or(u64::MAX));
    end.checked_next_multiple_of(GROW_STEP).unwrap_or(u64::MAX)
}

/// Bytes of the table a move of a refcount table of `entries` entries
/// writes: twice as many entries (one more at least), whole clusters.
fn moved_table_bytes(entries: u64, cs: u64) -> Option<u64> {
    entries
        .checked_mul(16)?
        .max(entries.checked_add(1)?.checked_mul(8)?)
        .checked_next_multiple_of(cs)
}

/// Clusters in use in a row past the file's end after which a free-cluster
/// search skips to the next refcount block not allocated yet (see
/// `DeltaMd::skip_leaked`).
const LEAK_RUN: u64 = 4096;

/// "freeing a free cluster" lines per load of a delta.
const FREE_FREE_LOG_MAX: u32 = 16;

/// Refcounts and allocation.
impl DeltaMd {
    /// Queues dropping one reference of every cluster overlapping `[start,
    /// start + len)`, after whatever removed the reference: applied by
    /// `apply_frees` after the next (successful) commit.
    pub(crate) fn defer_free(&mut self, start: u64, len: u64) -> Result {
        if len == 0 {
            return Ok(());
        }
        start.checked_add(len).ok_or(EIO)?;
        // Adjacent ranges merge only where they meet on a cluster boundary:
        // two compressed clusters' data may share a host cluster, which then
        // loses one reference for each (one decrement per range and cluster).
        if let Some(last) = self.frees.last_mut() {
            if last.0.checked_add(last.1) == Some(start)
                && start.checked_rem(self.cluster_size) == Some(0)
            {
                last.1 += len;
                return Ok(());
            }
        }
        self.frees.push((start, len), GFP_KERNEL)?;
        Ok(())
    }

    /// Applies the decrements whose references' removal a commit made
    /// durable; they become durable with the next commit's first fsync,
    /// before anything can reference a reused cluster. The caller made sure
    /// no I/O is in flight to these clusters.
    ///
    /// Clusters left without a reference are deallocated in the file (a
    /// hole punched, as the C target does on discard and QEMU on a freed
    /// cluster), so what the guest discards is given back to the host file
    /// system. Safe before the decrement is durable: nothing durable points
    /// at them (a crash leaks them, holding zeroes), and a reused cluster is
    /// written in full (new data and its fill) before anything points at it.
    pub(crate) fn apply_frees(&mut self, file: &File, hdr: &Header) -> Result {
        // Not sorted (core's sort trips objtool in a module): queued in the
        // order the references went, which for a discard or a merge is the
        // file's order too, so neighbouring clusters still make one hole.
        let frees = core::mem::replace(&mut self.frees_ready, KVec::new());
        // A damaged image (a cluster with more references than its count)
        // keeps its old bytes until the cluster is reused, as before.
        let mut holes = Holes {
            file,
            run: None,
            off: self.corrupt,
        };
        let mut res = Ok(());
        for (start, len) in frees.iter() {
            if let Err(e) = self.free_range_into(file, hdr, *start, *len, Some(&mut holes)) {
                res = Err(e);
            }
        }
        holes.finish();
        res
    }

    /// Refcount page and index in it for cluster `c`, or `None` when its
    /// refcount block does not exist (refcount 0). Errors when `c` is past
    /// what the refcount table can describe.
    pub(super) fn refcount_slot(&self, hdr: &Header, c: u64) -> Result<Option<(u64, u64)>> {
        let (ti, bi) = fmt::refcount_split(hdr, c);
        let raw = *usize::try_from(ti)
            .ok()
            .and_then(|i| self.rt.get(i))
            .ok_or(ENOSPC)?;
        let Some(blk) = fmt::refcount_block_offset(hdr, raw).map_err(|e| corrupt(self.img, e))?
        else {
            return Ok(None);
        };
        // Refcounts per page (the parser keeps the order at most 6): a
        // non-zero divisor, so no panic path for the compiler to keep.
        let per_page = (MD_PAGE * 8)
            .checked_shr(hdr.refcount_order)
            .and_then(core::num::NonZeroU64::new)
            .ok_or(EIO)?;
        // Checked here, not by the alignment the parser enforces: a
        // refcount table entry may name offsets up to 2^64 - 512.
        let poff = (bi / per_page)
            .checked_mul(MD_PAGE)
            .and_then(|o| blk.checked_add(o))
            .ok_or(EIO)?;
        Ok(Some((poff, bi % per_page)))
    }

    pub(super) fn refcount(&mut self, file: &File, hdr: &Header, c: u64) -> Result<u64> {
        let Some((poff, i)) = self.refcount_slot(hdr, c)? else {
            return Ok(0);
        };
        let page = self.page(file, poff)?;
        fmt::refcount_get(page, i, hdr.refcount_order).ok_or(EIO)
    }

    /// Sets a refcount in the cache (written by the next commit; an
    /// increment before anything else of it).
    fn set_refcount(&mut self, file: &File, hdr: &Header, c: u64, v: u64) -> Result {
        let (poff, i) = self.refcount_slot(hdr, c)?.ok_or(EIO)?;
        let page = self.page_dirty(file, poff, Kind::Refcount)?;
        let old = fmt::refcount_get(page, i, hdr.refcount_order).ok_or(EIO)?;
        fmt::refcount_set(page, i, hdr.refcount_order, v).ok_or(EIO)?;
        if v > old {
            self.barrier = true;
        }
        Ok(())
    }

    /// Bytes of the file the refcount table describes (the one in memory
    /// is the durable one: a move is durable before it replaces it).
    fn coverage(&self, hdr: &Header) -> u64 {
        (self.rt.len() as u64)
            .saturating_mul(fmt::refcount_block_entries(hdr))
            .saturating_mul(self.cluster_size)
    }

    /// Makes the file at least `end` bytes long, sparsely, a step at a
    /// time, but not past `limit` unless `end` is: after a crash a file
    /// longer than its refcount table describes is refused (beyond what a
    /// table move leaves, see `crash_size_limit`). Best effort: a write
    /// past the end extends the file anyway.
    fn reserve(&mut self, file: &File, end: u64, limit: u64) {
        if end <= self.grown {
            return;
        }
        let Some(step) = end.checked_next_multiple_of(GROW_STEP) else {
            return;
        };
        let new = step.min(limit.max(end));
        if file.truncate(new).is_ok() {
            self.grown = new;
        }
    }

    /// End of the last cluster inside the file with a non-zero refcount (as
    /// the cache has it). Clusters past the file's end hold nothing and are
    /// not cut anyway; a damaged image's refcounts may claim every cluster
    /// the table could describe (2^39 of them), a walk this bounds by the
    /// file's size.
    fn used_end(&mut self, file: &File, hdr: &Header) -> Result<u64> {
        let per_block = fmt::refcount_block_entries(hdr);
        let cs = hdr.cluster_size();
        let limit = file.size().div_ceil(cs);
        for ti in (0..self.rt.len()).rev() {
            if self.rt.get(ti).copied().unwrap_or(0) == 0 {
                continue;
            }
            let first = (ti as u64).checked_mul(per_block).ok_or(EIO)?;
            if first >= limit {
                continue;
            }
            for c in (first..first.saturating_add(per_block).min(limit)).rev() {
                if self.refcount(file, hdr, c)? != 0 {
                    return (c + 1).checked_mul(cs).ok_or(EIO);
                }
                if c % 8192 == 0 {
                    crate::kernel_abstractions::task::cond_resched();
                }
            }
        }
        Ok(cs)
    }

    /// Truncates the file after its last used cluster (it grew in steps).
    /// Only for a delta whose refcounts are loaded and trusted. Queued
    /// decrements count as references still: nothing they free is cut.
    pub(crate) fn trim(&mut self, file: &File, hdr: &Header) -> Result {
        if self.rt.is_empty() {
            return Ok(());
        }
        let end = self.used_end(file, hdr)?;
        if file.size() > end {
            file.truncate(end)?;
            // Nothing past `end` is in use, and it is gone: holes from now on.
            self.untouched_from = self.untouched_from.min(end);
        }
        self.grown = end.max(file.size());
        Ok(())
    }

    /// Allocates a free cluster (refcount 0 -> 1, in the cache) and returns
    /// its offset: first fit from a moving position. A missing refcount block
    /// is placed in the cluster being looked at, which then describes itself:
    /// its contents are written at once, its refcount table entry by the next
    /// commit, after an fsync.
    pub(crate) fn alloc_cluster(&mut self, file: &File, hdr: &Header) -> Result<u64> {
        self.alloc_cluster_untouched(file, hdr).map(|(off, _)| off)
    }

    /// Where the next free-cluster search starts (a cluster index).
    pub(crate) fn search_position(&self) -> u64 {
        self.hint
    }

    /// Starts free-cluster searches at cluster `hint` (where an earlier load
    /// of the same image had got to), at most at the end of the file of
    /// `file_size` bytes (a suspend trims it). The search never goes back:
    /// clusters below the position were in use, or skipped, before too
    /// (only our own frees move it back).
    pub(crate) fn resume_search_at(&mut self, hint: u64, file_size: u64) {
        self.hint = hint
            .min(file_size.checked_div(self.cluster_size).unwrap_or(0))
            .max(1);
    }

    /// Like [`alloc_cluster`](Self::alloc_cluster); also returns whether the
    /// cluster was never written since the load (it reads as zeroes).
    pub(crate) fn alloc_cluster_untouched(
        &mut self,
        file: &File,
        hdr: &Header,
    ) -> Result<(u64, bool)> {
        let cs = hdr.cluster_size();
        let eof = file.size().div_ceil(cs);
        // Clusters in use in a row past the file's end (see `LEAK_RUN`).
        let mut leaked_run = 0u64;
        let mut c = self.hint.max(1);
        loop {
            let off = c.checked_mul(cs).ok_or(ENOSPC)?;
            let end = off.checked_add(cs).ok_or(ENOSPC)?;
            let (ti, bi) = fmt::refcount_split(hdr, c);
            let Some(raw) = usize::try_from(ti)
                .ok()
                .and_then(|i| self.rt.get(i))
                .copied()
            else {
                self.grow_refcount_table(file, hdr)?;
                continue;
            };
            if raw == 0 {
                self.note_meta(off, MetaKind::RefcountBlock)?;
                self.reserve(file, end, self.coverage(hdr));
                self.cache.invalidate(off, end);
                let mut blk = IoBuf::new(cs as usize)?;
                fmt::refcount_set(&mut blk, bi, hdr.refcount_order, 1).ok_or(EIO)?;
                file.write_full(&blk, off)?;
                let i = ti as usize;
                mark_table_page(&mut self.rt_dirty, i / TABLE_PER_PAGE)?;
                if let Some(e) = self.rt.get_mut(i) {
                    *e = off;
                }
                self.barrier = true;
                self.untouched_from = self.untouched_from.max(end);
                c += 1;
                self.hint = c;
                continue;
            }
            if self.refcount(file, hdr, c)? == 0 {
                self.reserve(file, end, self.coverage(hdr));
                self.set_refcount(file, hdr, c, 1)?;
                self.cache.invalidate(off, end);
                self.hint = c + 1;
                let untouched = off >= self.untouched_from;
                self.untouched_from = self.untouched_from.max(end);
                return Ok((off, untouched));
            }
            if c >= eof {
                leaked_run += 1;
                if leaked_run >= LEAK_RUN {
                    c = self.skip_leaked(hdr, ti, c)?;
                    leaked_run = 0;
                    continue;
                }
            }
            c += 1;
            // A long run of used clusters (a full image): let others run.
            if c % 8192 == 0 {
                crate::kernel_abstractions::task::cond_resched();
            }
        }
    }

    /// Where a free-cluster search that found `LEAK_RUN` clusters in use in
    /// a row past the file's end, the last cluster `c` (described by refcount
    /// table entry `ti`), goes on: at the first cluster of the next table
    /// entry without a block (all its clusters are free), or past the
    /// table, which then grows. Nothing can be stored past the file's end,
    /// so such refcounts are leaks (a damaged image's; a crash leaves a
    /// few at most), and cluster by cluster the search could take 2^39
    /// lookups with the state locked. The clusters skipped stay leaked.
    fn skip_leaked(&mut self, hdr: &Header, ti: u64, c: u64) -> Result<u64> {
        let from = usize::try_from(ti).map_err(|_| ENOSPC)?.saturating_add(1);
        let next = self
            .rt
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, e)| **e == 0)
            .map_or(self.rt.len(), |(i, _)| i);
        if !self.leak_skip_noted {
            self.leak_skip_noted = true;
            pr_warn!(
                "dm-qcow2: image {}: refcounts mark clusters past the end of the file in use (from {:#x}): leaked, new clusters go after them (qemu-img check -r leaks reclaims them)\n",
                self.img,
                c.saturating_sub(LEAK_RUN - 1)
                    .saturating_mul(hdr.cluster_size())
            );
        }
        (next as u64)
            .checked_mul(fmt::refcount_block_entries(hdr))
            .ok_or(ENOSPC)
    }

    /// Moves the refcount table to a place twice its size, past every cluster
    /// it describes now, together with one new refcount block that describes
    /// the new table and itself. The header switches to the new table in one
    /// sector write, after the new table is durable; a crash before leaves the
    /// old table in use (and the new clusters leaked), a crash after leaves the
    /// old table's clusters leaked. The new table holds every entry of the
    /// in-memory one, also those not committed yet (their blocks were written
    /// before and are covered by the first fsync here).
    fn grow_refcount_table(&mut self, file: &File, hdr: &Header) -> Result {
        let cs = hdr.cluster_size();
        let per_block = fmt::refcount_block_entries(hdr);
        let old_n = self.rt.len() as u64;
        let start = old_n.checked_mul(per_block).ok_or(ENOSPC)?;
        let tbl_bytes = moved_table_bytes(old_n, cs).ok_or(ENOSPC)?;
        let tbl_clusters = tbl_bytes / cs;
        if tbl_clusters + 1 > per_block || tbl_bytes > fmt::MAX_REFTABLE_BYTES {
            pr_err!(
                "dm-qcow2: image {}: refcount table cannot grow further\n",
                self.img
            );
            return Err(ENOSPC);
        }
        let blk_off = start.checked_mul(cs).ok_or(ENOSPC)?;
        let tbl_off = blk_off.checked_add(cs).ok_or(ENOSPC)?;
        let tbl_end = tbl_off.checked_add(tbl_bytes).ok_or(ENOSPC)?;

        let mut blk = IoBuf::new(cs as usize)?;
        for i in 0..=tbl_clusters {
            fmt::refcount_set(&mut blk, i, hdr.refcount_order, 1).ok_or(EIO)?;
        }
        let mut tbl = IoBuf::new(tbl_bytes as usize)?;
        for (i, e) in self.rt.iter().enumerate() {
            fmt::set_table_entry(&mut tbl, i as u64, *e).ok_or(EIO)?;
        }
        fmt::set_table_entry(&mut tbl, old_n, blk_off).ok_or(EIO)?;
        self.note_meta(blk_off, MetaKind::RefcountBlock)?;
        // The table's clusters join the overlap set with the header change.
        self.fence_lanes(tbl_off, tbl_bytes);
        // Past what the old table describes (the new one is not durable
        // yet): within what `crash_size_limit` accepts.
        self.reserve(file, tbl_end, tbl_end);
        self.untouched_from = self.untouched_from.max(tbl_end);
        file.write_full(&blk, blk_off)?;
        file.write_full(&tbl, tbl_off)?;
        file.fsync()?;

        // refcount_table_offset (u64 at 48) and _clusters (u32 at 56) share a sector.
        let mut page = IoBuf::new(DIO_ALIGN)?;
        file.read_full(&mut page, 0)?;
        page.get_mut(48..56)
            .ok_or(EIO)?
            .copy_from_slice(&tbl_off.to_be_bytes());
        let clusters = u32::try_from(tbl_clusters).map_err(|_| ENOSPC)?;
        page.get_mut(56..60)
            .ok_or(EIO)?
            .copy_from_slice(&clusters.to_be_bytes());
        file.write_full(&page, 0)?;
        file.fsync()?;

        let mut rt = KVVec::with_capacity((tbl_bytes / 8) as usize, gfp_kv())?;
        for c in tbl.chunks_exact(8) {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            rt.push(u64::from_be_bytes(b), GFP_KERNEL)?;
        }
        let (old_off, old_clusters) = (self.rt_off, self.rt_clusters);
        self.rt = rt;
        self.rt_off = tbl_off;
        self.rt_clusters = tbl_clusters;
        // The new table was written whole.
        self.rt_dirty = KVec::new();
        self.cache.invalidate(blk_off, tbl_end);
        pr_info!(
            "dm-qcow2: image {}: refcount table moved to {:#x}, {} clusters\n",
            self.img,
            tbl_off,
            tbl_clusters
        );
        // The old table is no longer referenced by the (durable) header.
        let queued = self.defer_free(old_off, old_clusters * cs);
        self.leak_on_error(queued);
        Ok(())
    }

    /// `res` of freeing (or queueing the release of) clusters nothing
    /// points at: on error they leak, which is noted for `take_leaked`.
    pub(crate) fn leak_on_error(&mut self, res: Result) {
        if let Err(e) = res {
            pr_err!(
                "dm-qcow2: image {}: cannot free a cluster nothing points at ({:?}): leaked\n",
                self.img,
                e
            );
            self.leaked = true;
        }
    }

    /// Whether clusters leaked since the last call (see `leak_on_error`).
    pub(crate) fn take_leaked(&mut self) -> bool {
        core::mem::take(&mut self.leaked)
    }

    /// Drops one reference of every cluster overlapping `[start, start + len)`
    /// in the cache: for references whose removal is durable (`apply_frees`)
    /// and for clusters just allocated that nothing points at.
    pub(crate) fn free_range(&mut self, file: &File, hdr: &Header, start: u64, len: u64) -> Result {
        self.free_range_into(file, hdr, start, len, None)
    }

    /// `free_range`, adding the clusters it leaves free to `holes` (byte
    /// ranges, adjacent ones merged; as many as memory allows).
    fn free_range_into(
        &mut self,
        file: &File,
        hdr: &Header,
        start: u64,
        len: u64,
        mut holes: Option<&mut Holes<'_>>,
    ) -> Result {
        let cs = hdr.cluster_size();
        if len == 0 {
            return Ok(());
        }
        let first = start / cs;
        let last = (start + len - 1) / cs;
        for c in first..=last {
            let r = self.refcount(file, hdr, c)?;
            if r == 0 {
                // Per cluster, under the state mutex: a damaged image (many
                // entries naming one cluster) could make one discard print
                // a million lines.
                if self.free_free_logged < FREE_FREE_LOG_MAX {
                    self.free_free_logged += 1;
                    let more = if self.free_free_logged == FREE_FREE_LOG_MAX {
                        " (further ones not logged until the next load)"
                    } else {
                        ""
                    };
                    pr_err!(
                        "dm-qcow2: image {}: freeing a free cluster {:#x}{}\n",
                        self.img,
                        c * cs,
                        more
                    );
                }
                continue;
            }
            self.set_refcount(file, hdr, c, r - 1)?;
            if r == 1 {
                // Free now: no longer metadata if it was (an L2 table a
                // snapshot shared, a cluster allocated for one in vain).
                self.meta.remove(c);
                // What the count kept of a shared table there is gone with it.
                self.count.forget_shared(c * cs);
                self.cache.invalidate(c * cs, c * cs + cs);
                self.hint = self.hint.min(c.max(1));
                if let Some(h) = holes.as_deref_mut() {
                    h.add(c * cs, cs);
                }
            }
        }
        Ok(())
    }
}

/// Freed clusters to deallocate in the file (`apply_frees`): one run of
/// neighbouring clusters at a time, punched when the next freed cluster
/// does not follow on (no allocation, however many clusters are freed).
struct Holes<'a> {
    file: &'a File,
    /// The run not punched yet: file offset and length.
    run: Option<(u64, u64)>,
    /// No (more) holes: a damaged image, or a file system without them.
    off: bool,
}

impl Holes<'_> {
    fn add(&mut self, pos: u64, len: u64) {
        if self.off {
            return;
        }
        if let Some((p, l)) = self.run {
            if let Some(nl) = l.checked_add(len).filter(|_| p.checked_add(l) == Some(pos)) {
                self.run = Some((p, nl));
                return;
            }
            self.punch(p, l);
        }
        self.run = Some((pos, len));
    }

    /// Punches the whole pages of `[pos, pos + len)` (a part of a page
    /// would only be zeroed through the page cache).
    fn punch(&mut self, pos: u64, len: u64) {
        const PAGE: u64 = DIO_ALIGN as u64;
        let (Some(start), Some(end)) = (
            pos.checked_next_multiple_of(PAGE),
            pos.checked_add(len).map(|e| e - e % PAGE),
        ) else {
            return;
        };
        if start >= end {
            return;
        }
        // Best effort: where it fails the space stays allocated, which is
        // all it costs. Without hole support, do not try again.
        if let Err(e) = self.file.punch_hole(start, end - start) {
            if e == eopnotsupp() {
                self.off = true;
            }
        }
    }

    fn finish(mut self) {
        if let Some((p, l)) = self.run.take() {
            if !self.off {
                self.punch(p, l);
            }
        }
    }
}
