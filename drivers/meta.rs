// SPDX-License-Identifier: GPL-2.0

//! Per-delta metadata: the L1 table, a cache of metadata pages (L2 tables and
//! refcount blocks), the refcount table, and cluster allocation.
//!
//! Only the worker touches a delta's metadata. Every change is written to the
//! image right away, in an order that leaves only leaked clusters behind a
//! crash: a refcount is raised before anything points at its cluster, a new
//! L2 table is on disk before the L1 entry that points at it, data is on disk
//! before the L2 entry that makes it reachable. So cached pages are always
//! clean and can be dropped at any time.

use crate::count::AllocCount;
use crate::kx::file::{File, IoBuf, DIO_ALIGN};
use crate::kx::param;
use crate::qcow2_format::{self as fmt, FormatError, Header};
use kernel::error::code::*;
use kernel::prelude::*;
use kernel::rbtree::RBTree;

/// Size of a cached metadata page (and of every metadata write).
pub(crate) const MD_PAGE: u64 = 4096;

/// Logs corrupt metadata of image `img` and turns it into an errno.
pub(crate) fn corrupt(img: usize, e: FormatError) -> Error {
    pr_err!("dm-qcow2: image {}: {}\n", img, e.msg());
    Error::from_errno(-e.errno())
}

/// Reads a table of `n` big-endian u64 entries at `off`.
fn read_table(file: &File, off: u64, n: usize) -> Result<KVVec<u64>> {
    let mut t = KVVec::with_capacity(n, GFP_KERNEL)?;
    // In bounded chunks: an L1 table may be up to 32 MiB.
    const CHUNK: usize = 256 * 1024;
    let mut buf = IoBuf::new(CHUNK.min(n * 8).max(DIO_ALIGN))?;
    let mut pos = off;
    while t.len() < n {
        let want = ((n - t.len()) * 8).next_multiple_of(DIO_ALIGN).min(buf.len());
        let chunk = buf.get_mut(..want).ok_or(EINVAL)?;
        // Past the end of the file a table reads as zeroes (unallocated).
        file.read_full(chunk, pos)?;
        for e in chunk.chunks_exact(8) {
            if t.len() == n {
                break;
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(e);
            t.push(u64::from_be_bytes(b), GFP_KERNEL)?;
        }
        pos += want as u64;
    }
    Ok(t)
}

/// Writes the page of an in-memory table (at file offset `off`) that holds entry `idx`.
fn write_table_page(file: &File, table: &[u64], off: u64, idx: usize) -> Result {
    let per_page = (MD_PAGE / 8) as usize;
    let first = idx - idx % per_page;
    let mut buf = IoBuf::new(MD_PAGE as usize)?;
    for (i, b) in buf.chunks_exact_mut(8).enumerate() {
        if let Some(v) = table.get(first + i) {
            b.copy_from_slice(&v.to_be_bytes());
        }
    }
    file.write_full(&buf, off + (first as u64) * 8)
}

/// Cache of metadata pages, keyed by file offset.
struct MdCache {
    pages: RBTree<u64, IoBuf>,
    count: usize,
    /// Eviction sweeps the keys like a clock hand, so no page range is
    /// evicted over and over.
    hand: u64,
}

impl MdCache {
    fn new() -> Self {
        Self { pages: RBTree::new(), count: 0, hand: 0 }
    }

    fn evict_one(&mut self) -> bool {
        let hand = self.hand;
        let cursor = match self.pages.cursor_lower_bound(&hand) {
            Some(c) => Some(c),
            None => self.pages.cursor_front(),
        };
        if let Some(c) = cursor {
            let key = *c.current().0;
            drop(c.remove_current());
            self.count -= 1;
            self.hand = key + MD_PAGE;
            return true;
        }
        false
    }

    fn page(&mut self, file: &File, off: u64) -> Result<&mut IoBuf> {
        if self.pages.get(&off).is_none() {
            // Bounded by a module parameter; every cached page is clean (see
            // the module docs), so any may go.
            while self.count >= param::md_cache_pages() && self.evict_one() {}
            let mut buf = IoBuf::new(MD_PAGE as usize)?;
            file.read_full(&mut buf, off)?;
            self.pages.try_create_and_insert(off, buf, GFP_KERNEL)?;
            self.count += 1;
        }
        self.pages.get_mut(&off).ok_or(EIO)
    }

    /// Drops the pages of `[start, end)`: the clusters there changed role.
    fn invalidate(&mut self, start: u64, end: u64) {
        let mut off = start;
        while off < end {
            if self.pages.remove(&off).is_some() {
                self.count -= 1;
            }
            off += MD_PAGE;
        }
    }
}

/// Metadata of one delta.
pub(crate) struct DeltaMd {
    img: usize,
    l1: KVVec<u64>,
    cache: MdCache,
    /// Refcount table; empty unless the delta is written to.
    rt: KVVec<u64>,
    /// Where the refcount table is, and its size in clusters (it may move).
    rt_off: u64,
    rt_clusters: u64,
    /// Where the next free-cluster search starts.
    hint: u64,
    /// File size as we last set it (it grows in `GROW_STEP`s).
    grown: u64,
    /// Clusters mapping host data, for the status line (see `count`).
    pub(crate) count: AllocCount,
}

/// Image files are extended (sparsely) in steps of this many bytes, so that
/// most writes of new clusters do not extend the file, and trimmed back to
/// the last used cluster on suspend.
const GROW_STEP: u64 = 128 << 20;

impl DeltaMd {
    /// Loads the tables of image `img`; the refcount table only if `writable`.
    pub(crate) fn load(img: usize, file: &File, hdr: &Header, writable: bool) -> Result<Self> {
        let l1 = read_table(file, hdr.l1_table_offset, hdr.l1_size as usize)?;
        let rt = if writable {
            let n = u64::from(hdr.refcount_table_clusters) * hdr.cluster_size() / 8;
            read_table(file, hdr.refcount_table_offset, usize::try_from(n).map_err(|_| EFBIG)?)?
        } else {
            KVVec::new()
        };
        Ok(Self {
            img,
            l1,
            cache: MdCache::new(),
            rt,
            rt_off: hdr.refcount_table_offset,
            rt_clusters: u64::from(hdr.refcount_table_clusters),
            hint: 1,
            grown: file.size(),
            count: AllocCount::new(),
        })
    }

    /// The delta's img_id changed (a merge unlinked one below it).
    pub(crate) fn set_img(&mut self, img: usize) {
        self.img = img;
    }

    /// Loads the refcount table if it is not loaded yet (the delta is about
    /// to be written to, e.g. as the target of a merge).
    pub(crate) fn load_refcounts(&mut self, file: &File, hdr: &Header) -> Result {
        if self.rt.is_empty() {
            let n = u64::from(hdr.refcount_table_clusters) * hdr.cluster_size() / 8;
            self.rt = read_table(file, hdr.refcount_table_offset, usize::try_from(n).map_err(|_| EFBIG)?)?;
            self.rt_off = hdr.refcount_table_offset;
            self.rt_clusters = u64::from(hdr.refcount_table_clusters);
        }
        Ok(())
    }

    /// The decoded L1 entry for `vaddr`.
    pub(crate) fn l1_entry(&self, hdr: &Header, vaddr: u64) -> Result<Option<fmt::L1Entry>> {
        let raw = *usize::try_from(hdr.l1_index(vaddr))
            .ok()
            .and_then(|i| self.l1.get(i))
            .ok_or(EIO)?;
        fmt::decode_l1(hdr, raw).map_err(|e| corrupt(self.img, e))
    }

    /// File offset of the L2 entry for `vaddr` in the table at `l2_off`.
    fn l2_pos(hdr: &Header, l2_off: u64, vaddr: u64) -> Result<u64> {
        hdr.l2_index(vaddr)
            .checked_mul(hdr.l2_entry_bytes())
            .and_then(|o| o.checked_add(l2_off))
            .ok_or(EIO)
    }

    /// The raw L2 entry (and extended-L2 bitmap, else 0) for `vaddr`.
    pub(crate) fn l2_entry(&mut self, file: &File, hdr: &Header, l2_off: u64, vaddr: u64) -> Result<(u64, u64)> {
        let pos = Self::l2_pos(hdr, l2_off, vaddr)?;
        let page = self.cache.page(file, pos & !(MD_PAGE - 1))?;
        let at = (pos & (MD_PAGE - 1)) as usize;
        let raw = fmt::table_entry(page, (at / 8) as u64).ok_or(EIO)?;
        let bitmap = if hdr.extended_l2() {
            fmt::table_entry(page, (at / 8 + 1) as u64).ok_or(EIO)?
        } else {
            0
        };
        Ok((raw, bitmap))
    }

    /// Sets the L2 entry for `vaddr` and writes its page.
    pub(crate) fn set_l2_entry(
        &mut self,
        file: &File,
        hdr: &Header,
        l2_off: u64,
        vaddr: u64,
        raw: u64,
        bitmap: u64,
    ) -> Result {
        let pos = Self::l2_pos(hdr, l2_off, vaddr)?;
        let poff = pos & !(MD_PAGE - 1);
        let page = self.cache.page(file, poff)?;
        let at = (pos & (MD_PAGE - 1)) / 8;
        let old = (fmt::table_entry(page, at), fmt::table_entry(page, at + 1));
        fmt::set_table_entry(page, at, raw).ok_or(EIO)?;
        if hdr.extended_l2() {
            fmt::set_table_entry(page, at + 1, bitmap).ok_or(EIO)?;
        }
        if let Err(e) = file.write_full(page, poff) {
            // Keep the cache equal to what the image holds.
            if let (Some(r), Some(b)) = old {
                let _ = fmt::set_table_entry(page, at, r);
                if hdr.extended_l2() {
                    let _ = fmt::set_table_entry(page, at + 1, b);
                }
            }
            return Err(e);
        }
        // The status line's count follows every change of an entry.
        let ext = hdr.extended_l2();
        let was = (old.0.unwrap_or(0), if ext { old.1.unwrap_or(0) } else { 0 });
        self.count.note(hdr, vaddr, was, (raw, if ext { bitmap } else { 0 }));
        Ok(())
    }

    /// Points the L1 entry for `vaddr` at a new L2 table and writes it.
    fn set_l1_entry(&mut self, file: &File, hdr: &Header, vaddr: u64, raw: u64) -> Result {
        let i = usize::try_from(hdr.l1_index(vaddr)).map_err(|_| EIO)?;
        let e = self.l1.get_mut(i).ok_or(EIO)?;
        let old = core::mem::replace(e, raw);
        if let Err(err) = write_table_page(file, &self.l1, hdr.l1_table_offset, i) {
            if let Some(e) = self.l1.get_mut(i) {
                *e = old;
            }
            return Err(err);
        }
        Ok(())
    }

    /// The L2 table covering `vaddr`, allocating an empty one if there is none.
    pub(crate) fn ensure_l2(&mut self, file: &File, hdr: &Header, vaddr: u64) -> Result<u64> {
        match self.l1_entry(hdr, vaddr)? {
            Some(e) if e.copied => Ok(e.l2_offset),
            // Shared with an internal snapshot: give the active L1 its own copy
            // first. Data refcounts already count both tables' references.
            Some(e) => {
                let cs = hdr.cluster_size();
                let mut table = IoBuf::new(cs as usize)?;
                file.read_full(&mut table, e.l2_offset)?;
                let off = self.alloc_cluster(file, hdr)?;
                let res = file
                    .write_full(&table, off)
                    .and_then(|()| self.set_l1_entry(file, hdr, vaddr, fmt::encode_l1(off, true)));
                if let Err(err) = res {
                    let _ = self.free_range(file, hdr, off, cs);
                    return Err(err);
                }
                // Only now that nothing points at the old table from here.
                let _ = self.free_range(file, hdr, e.l2_offset, cs);
                Ok(off)
            }
            None => {
                let off = self.alloc_cluster(file, hdr)?;
                let zero = IoBuf::new(hdr.cluster_size() as usize)?;
                let res = file
                    .write_full(&zero, off)
                    .and_then(|()| self.set_l1_entry(file, hdr, vaddr, fmt::encode_l1(off, true)));
                if let Err(e) = res {
                    let _ = self.free_range(file, hdr, off, hdr.cluster_size());
                    return Err(e);
                }
                Ok(off)
            }
        }
    }

    /// Refcount page and index in it for cluster `c`, or `None` when its
    /// refcount block does not exist (refcount 0). Errors when `c` is past
    /// what the refcount table can describe.
    fn refcount_slot(&mut self, hdr: &Header, c: u64) -> Result<Option<(u64, u64)>> {
        let (ti, bi) = fmt::refcount_split(hdr, c);
        let raw = *usize::try_from(ti).ok().and_then(|i| self.rt.get(i)).ok_or(ENOSPC)?;
        let Some(blk) = fmt::refcount_block_offset(hdr, raw).map_err(|e| corrupt(self.img, e))? else {
            return Ok(None);
        };
        let per_page = (MD_PAGE * 8) >> hdr.refcount_order;
        Ok(Some((blk + bi / per_page * MD_PAGE, bi % per_page)))
    }

    fn refcount(&mut self, file: &File, hdr: &Header, c: u64) -> Result<u64> {
        let Some((poff, i)) = self.refcount_slot(hdr, c)? else {
            return Ok(0);
        };
        let page = self.cache.page(file, poff)?;
        fmt::refcount_get(page, i, hdr.refcount_order).ok_or(EIO)
    }

    fn set_refcount(&mut self, file: &File, hdr: &Header, c: u64, v: u64) -> Result {
        let (poff, i) = self.refcount_slot(hdr, c)?.ok_or(EIO)?;
        let page = self.cache.page(file, poff)?;
        let old = fmt::refcount_get(page, i, hdr.refcount_order).ok_or(EIO)?;
        fmt::refcount_set(page, i, hdr.refcount_order, v).ok_or(EIO)?;
        if let Err(e) = file.write_full(page, poff) {
            let _ = fmt::refcount_set(page, i, hdr.refcount_order, old);
            return Err(e);
        }
        Ok(())
    }

    /// Makes the file at least `end` bytes long, sparsely, a step at a
    /// time. Best effort: a write past the end extends the file anyway.
    fn reserve(&mut self, file: &File, end: u64) {
        if end <= self.grown {
            return;
        }
        let Some(new) = end.checked_next_multiple_of(GROW_STEP) else {
            return;
        };
        if file.truncate(new).is_ok() {
            self.grown = new;
        }
    }

    /// End of the last cluster with a non-zero refcount.
    fn used_end(&mut self, file: &File, hdr: &Header) -> Result<u64> {
        let per_block = fmt::refcount_block_entries(hdr);
        let cs = hdr.cluster_size();
        for ti in (0..self.rt.len()).rev() {
            if self.rt.get(ti).copied().unwrap_or(0) == 0 {
                continue;
            }
            let first = (ti as u64).checked_mul(per_block).ok_or(EIO)?;
            for c in (first..first + per_block).rev() {
                if self.refcount(file, hdr, c)? != 0 {
                    return (c + 1).checked_mul(cs).ok_or(EIO);
                }
            }
        }
        Ok(cs)
    }

    /// Truncates the file after its last used cluster (it grew in steps).
    /// Only for a delta whose refcounts are loaded and trusted.
    pub(crate) fn trim(&mut self, file: &File, hdr: &Header) -> Result {
        if self.rt.is_empty() {
            return Ok(());
        }
        let end = self.used_end(file, hdr)?;
        if file.size() > end {
            file.truncate(end)?;
        }
        self.grown = end.max(file.size());
        Ok(())
    }

    /// Allocates a free cluster (refcount 0 -> 1, on disk) and returns its
    /// offset: first fit from a moving position. A missing refcount block is
    /// placed in the cluster being looked at, which then describes itself.
    pub(crate) fn alloc_cluster(&mut self, file: &File, hdr: &Header) -> Result<u64> {
        let cs = hdr.cluster_size();
        let mut c = self.hint.max(1);
        loop {
            let off = c.checked_mul(cs).ok_or(ENOSPC)?;
            let (ti, bi) = fmt::refcount_split(hdr, c);
            let Some(raw) = usize::try_from(ti).ok().and_then(|i| self.rt.get(i)).copied() else {
                self.grow_refcount_table(file, hdr)?;
                continue;
            };
            if raw == 0 {
                self.reserve(file, off + cs);
                self.cache.invalidate(off, off + cs);
                let mut blk = IoBuf::new(cs as usize)?;
                fmt::refcount_set(&mut blk, bi, hdr.refcount_order, 1).ok_or(EIO)?;
                file.write_full(&blk, off)?;
                let i = ti as usize;
                if let Some(e) = self.rt.get_mut(i) {
                    *e = off;
                }
                if let Err(e) = write_table_page(file, &self.rt, self.rt_off, i) {
                    if let Some(e) = self.rt.get_mut(i) {
                        *e = 0;
                    }
                    return Err(e);
                }
                c += 1;
                self.hint = c;
                continue;
            }
            if self.refcount(file, hdr, c)? == 0 {
                self.reserve(file, off + cs);
                self.set_refcount(file, hdr, c, 1)?;
                self.cache.invalidate(off, off + cs);
                self.hint = c + 1;
                return Ok(off);
            }
            c += 1;
        }
    }

    /// Moves the refcount table to a place twice its size, past every cluster
    /// it describes now, together with one new refcount block that describes
    /// the new table and itself. The header switches to the new table in one
    /// sector write, after the new table is durable; a crash before leaves the
    /// old table in use (and the new clusters leaked), a crash after leaves the
    /// old table's clusters leaked.
    fn grow_refcount_table(&mut self, file: &File, hdr: &Header) -> Result {
        let cs = hdr.cluster_size();
        let per_block = fmt::refcount_block_entries(hdr);
        let old_n = self.rt.len() as u64;
        let start = old_n.checked_mul(per_block).ok_or(ENOSPC)?;
        let tbl_bytes = old_n
            .checked_mul(16)
            .ok_or(ENOSPC)?
            .max((old_n + 1) * 8)
            .next_multiple_of(cs);
        let tbl_clusters = tbl_bytes / cs;
        if tbl_clusters + 1 > per_block || tbl_bytes > fmt::MAX_REFTABLE_BYTES {
            pr_err!("dm-qcow2: image {}: refcount table cannot grow further\n", self.img);
            return Err(ENOSPC);
        }
        let blk_off = start.checked_mul(cs).ok_or(ENOSPC)?;
        let tbl_off = blk_off + cs;

        let mut blk = IoBuf::new(cs as usize)?;
        for i in 0..=tbl_clusters {
            fmt::refcount_set(&mut blk, i, hdr.refcount_order, 1).ok_or(EIO)?;
        }
        let mut tbl = IoBuf::new(tbl_bytes as usize)?;
        for (i, e) in self.rt.iter().enumerate() {
            fmt::set_table_entry(&mut tbl, i as u64, *e).ok_or(EIO)?;
        }
        fmt::set_table_entry(&mut tbl, old_n, blk_off).ok_or(EIO)?;
        self.reserve(file, tbl_off + tbl_bytes);
        file.write_full(&blk, blk_off)?;
        file.write_full(&tbl, tbl_off)?;
        file.fsync()?;

        // refcount_table_offset (u64 at 48) and _clusters (u32 at 56) share a sector.
        let mut page = IoBuf::new(DIO_ALIGN)?;
        file.read_full(&mut page, 0)?;
        page.get_mut(48..56).ok_or(EIO)?.copy_from_slice(&tbl_off.to_be_bytes());
        let clusters = u32::try_from(tbl_clusters).map_err(|_| ENOSPC)?;
        page.get_mut(56..60).ok_or(EIO)?.copy_from_slice(&clusters.to_be_bytes());
        file.write_full(&page, 0)?;
        file.fsync()?;

        let mut rt = KVVec::with_capacity((tbl_bytes / 8) as usize, GFP_KERNEL)?;
        for c in tbl.chunks_exact(8) {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            rt.push(u64::from_be_bytes(b), GFP_KERNEL)?;
        }
        let (old_off, old_clusters) = (self.rt_off, self.rt_clusters);
        self.rt = rt;
        self.rt_off = tbl_off;
        self.rt_clusters = tbl_clusters;
        self.cache.invalidate(blk_off, tbl_off + tbl_bytes);
        pr_info!(
            "dm-qcow2: image {}: refcount table moved to {:#x}, {} clusters\n",
            self.img,
            tbl_off,
            tbl_clusters
        );
        // The old table is no longer referenced by the header.
        let _ = self.free_range(file, hdr, old_off, old_clusters * cs);
        Ok(())
    }

    /// Drops one reference of every cluster overlapping `[start, start + len)`.
    pub(crate) fn free_range(&mut self, file: &File, hdr: &Header, start: u64, len: u64) -> Result {
        let cs = hdr.cluster_size();
        if len == 0 {
            return Ok(());
        }
        let first = start / cs;
        let last = (start + len - 1) / cs;
        for c in first..=last {
            let r = self.refcount(file, hdr, c)?;
            if r == 0 {
                pr_err!("dm-qcow2: image {}: freeing a free cluster {:#x}\n", self.img, c * cs);
                continue;
            }
            self.set_refcount(file, hdr, c, r - 1)?;
            if r == 1 {
                self.cache.invalidate(c * cs, c * cs + cs);
                self.hint = self.hint.min(c.max(1));
            }
        }
        Ok(())
    }
}
