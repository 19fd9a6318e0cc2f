// SPDX-License-Identifier: GPL-2.0

//! Per-delta metadata: the L1 table, a cache of metadata pages (L2 tables and
//! refcount blocks), the refcount table, and cluster allocation.
//!
//! Only the worker (or a control path with the state locked) touches a
//! delta's metadata. The cache is write-back: refcount changes and L1/L2
//! entry changes only dirty memory (cached pages, the in-memory L1 and
//! refcount tables), and [`DeltaMd::commit`] writes them out in an order
//! fixed by fsync barriers, never by submission order alone:
//!
//! 1. if anything was allocated or pointed at host data since the last
//!    commit (the barrier): wait for the table's data I/O in flight (new
//!    clusters are written asynchronously, see `Inner::write_new_cluster`),
//!    then dirty refcount pages (together with data and copy-on-write fills
//!    of new clusters, new refcount blocks and new L2 tables' contents, all
//!    written before), fsync; then dirty refcount table pages, fsync;
//! 2. dirty L2 pages and dirty L1 pages (and refcount pages holding only
//!    decrements, whose removals are durable already), fsync.
//!
//! So a cluster's data and its refcount are durable before any L2 entry
//! points at it, and a new L2 table's contents (as it was made: zeroed, or
//! copied from a snapshot's table) are durable before the L1 entry that
//! points at it. A reference's removal is only a dirty page too; the
//! refcount decrement is queued ([`DeltaMd::defer_free`]) and applied
//! ([`DeltaMd::apply_frees`]) only after a commit made the removal durable:
//! until then the cluster keeps its refcount in the cache and cannot be
//! handed out again. A page is marked clean only after the fsync that covers
//! its write succeeded, so a failed commit leaves it dirty (retried by the
//! next commit) and the cache never claims more than the image holds.
//!
//! Clean pages may be dropped at any time; dirty ones never (when no clean
//! page is left, or too many are dirty, the cache commits first).

use crate::count::AllocCount;
use crate::kernel_abstractions::file::{File, IoBuf, IoCounter, DIO_ALIGN};
use crate::kernel_abstractions::param;
use crate::kernel_abstractions::task::code::euclean;
use crate::qcow2_format::{self as fmt, FormatError, Header};
use kernel::error::code::*;
use kernel::prelude::*;
use kernel::rbtree::RBTree;
use kernel::sync::Arc;

/// Size of a cached metadata page (and of every metadata write).
pub(crate) const MD_PAGE: u64 = 4096;

/// Queued refcount decrements (ranges) above which a merge commits early.
pub(crate) const FREES_SOFT_MAX: usize = 1024;

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
        let want = ((n - t.len()) * 8)
            .next_multiple_of(DIO_ALIGN)
            .min(buf.len());
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

/// Entries of an in-memory table per metadata page.
const TABLE_PER_PAGE: usize = (MD_PAGE / 8) as usize;

/// Writes page `pi` of an in-memory table that lives at file offset `off`.
fn write_table_page(file: &File, table: &[u64], off: u64, pi: usize) -> Result {
    let first = pi.checked_mul(TABLE_PER_PAGE).ok_or(EIO)?;
    let mut buf = IoBuf::new(MD_PAGE as usize)?;
    for (i, b) in buf.chunks_exact_mut(8).enumerate() {
        if let Some(v) = table.get(first + i) {
            b.copy_from_slice(&v.to_be_bytes());
        }
    }
    file.write_full(&buf, off + (first as u64) * 8)
}

/// Remembers that page `pi` of an in-memory table is dirty.
fn mark_table_page(dirty: &mut KVec<usize>, pi: usize) -> Result {
    if !dirty.contains(&pi) {
        dirty.push(pi, GFP_KERNEL)?;
    }
    Ok(())
}

/// What a dirty cached page holds (they are written in this order).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    Refcount,
    L2,
}

/// A cached metadata page; `dirty` if it differs from the image.
struct Page {
    buf: IoBuf,
    dirty: Option<Kind>,
}

/// Cache of metadata pages, keyed by file offset.
struct MdCache {
    pages: RBTree<u64, Page>,
    count: usize,
    /// Dirty pages per kind.
    dirty_rc: usize,
    dirty_l2: usize,
    /// Offsets of the pages made dirty since all were last clean (some may
    /// be clean or gone by now), so a commit need not walk the whole cache.
    dirty_keys: KVec<u64>,
    /// Eviction sweeps the keys like a clock hand, so no page range is
    /// evicted over and over.
    hand: u64,
}

impl MdCache {
    fn new() -> Self {
        Self {
            pages: RBTree::new(),
            count: 0,
            dirty_rc: 0,
            dirty_l2: 0,
            dirty_keys: KVec::new(),
            hand: 0,
        }
    }

    fn dirty(&self) -> usize {
        self.dirty_rc + self.dirty_l2
    }

    fn count_dirty(&mut self, kind: Kind, add: bool) {
        let n = match kind {
            Kind::Refcount => &mut self.dirty_rc,
            Kind::L2 => &mut self.dirty_l2,
        };
        *n = if add { *n + 1 } else { n.saturating_sub(1) };
    }

    /// The first clean page at or after `from`.
    fn clean_from(&mut self, from: u64) -> Option<u64> {
        let mut cur = self.pages.cursor_lower_bound(&from);
        while let Some(c) = cur {
            let (k, p) = c.current();
            if p.dirty.is_none() {
                return Some(*k);
            }
            cur = c.move_next();
        }
        None
    }

    /// Drops a clean page (never a dirty one); false if there is none.
    fn evict_one(&mut self) -> bool {
        let hand = self.hand;
        let Some(key) = self.clean_from(hand).or_else(|| self.clean_from(0)) else {
            return false;
        };
        if self.pages.remove(&key).is_some() {
            self.count -= 1;
        }
        self.hand = key + MD_PAGE;
        true
    }

    /// Drops the pages of `[start, end)`: the clusters there changed role
    /// (what they held, even if dirty, is of no use any more).
    fn invalidate(&mut self, start: u64, end: u64) {
        // One lookup per cached page in the range, plus one: it is usually
        // empty (called for every allocation).
        loop {
            let key = match self.pages.cursor_lower_bound(&start) {
                Some(c) if *c.current().0 < end => *c.current().0,
                _ => return,
            };
            if let Some(p) = self.pages.remove(&key) {
                self.count -= 1;
                if let Some(k) = p.dirty {
                    self.count_dirty(k, false);
                }
            }
        }
    }

    /// Writes every dirty page of `kind` (they stay dirty).
    fn write_dirty(&self, file: &File, kind: Kind) -> Result {
        for off in self.dirty_keys.iter() {
            if let Some(p) = self.pages.get(off).filter(|p| p.dirty == Some(kind)) {
                file.write_full(&p.buf, *off)?;
            }
        }
        Ok(())
    }

    /// Marks every page of `kind` clean (their writes are durable).
    fn mark_clean(&mut self, kind: Kind) {
        for off in self.dirty_keys.iter() {
            if let Some(p) = self.pages.get_mut(off).filter(|p| p.dirty == Some(kind)) {
                p.dirty = None;
            }
        }
        match kind {
            Kind::Refcount => self.dirty_rc = 0,
            Kind::L2 => self.dirty_l2 = 0,
        }
        if self.dirty() == 0 {
            self.dirty_keys = KVec::new();
        }
    }
}

/// Metadata of one delta.
pub(crate) struct DeltaMd {
    img: usize,
    l1: KVVec<u64>,
    /// Where the L1 table is.
    l1_off: u64,
    /// Pages of `l1` changed since the last commit.
    l1_dirty: KVec<usize>,
    cache: MdCache,
    /// Refcount table; empty unless the delta is written to.
    rt: KVVec<u64>,
    /// Pages of `rt` changed since the last commit (new refcount blocks).
    rt_dirty: KVec<usize>,
    /// Where the refcount table is, and its size in clusters (it may move).
    rt_off: u64,
    rt_clusters: u64,
    /// Something written since the last commit must be durable before L2/L1
    /// entries are (new data or refcounts): the commit's first fsync.
    barrier: bool,
    /// Refcount decrements (host byte ranges) waiting for the commit that
    /// makes the removal of their references durable.
    frees: KVec<(u64, u64)>,
    /// Decrements whose references' removal a commit made durable, waiting
    /// to be applied (`apply_frees`).
    frees_ready: KVec<(u64, u64)>,
    /// Where the next free-cluster search starts.
    hint: u64,
    /// The image's cluster size (non-zero: checked by the header parser).
    cluster_size: u64,
    /// File size as we last set it (it grows in `GROW_STEP`s).
    grown: u64,
    /// Clusters at or past this offset were never written since the load
    /// (the file grew past them sparsely): they read as zeroes.
    untouched_from: u64,
    /// The table's asynchronous data I/O: data written to new clusters may
    /// still be in flight when their L2 entries are set; a commit waits for
    /// it before the fsync that must cover it.
    io: Arc<IoCounter>,
    /// Clusters mapping host data, for the status line (see `count`).
    pub(crate) count: AllocCount,
    /// The metadata clusters the tables name (L2 tables of the active L1,
    /// refcount blocks), by cluster index, while the delta takes writes:
    /// with the header, L1 and refcount tables what [`overlap`] guards.
    ///
    /// [`overlap`]: DeltaMd::overlap
    meta: RBTree<u64, &'static str>,
    /// A write would have overwritten metadata (see [`overlap`]): the image
    /// is marked corrupt and takes no more writes.
    ///
    /// [`overlap`]: DeltaMd::overlap
    corrupt: bool,
}

/// Image files are extended (sparsely) in steps of this many bytes, so that
/// most writes of new clusters do not extend the file, and trimmed back to
/// the last used cluster on suspend.
const GROW_STEP: u64 = 128 << 20;

impl DeltaMd {
    /// Loads the tables of image `img`; the refcount table only if `writable`.
    pub(crate) fn load(
        img: usize,
        file: &File,
        hdr: &Header,
        writable: bool,
        io: Arc<IoCounter>,
    ) -> Result<Self> {
        let l1 = read_table(file, hdr.l1_table_offset, hdr.l1_size as usize)?;
        let rt = if writable {
            let n = u64::from(hdr.refcount_table_clusters) * hdr.cluster_size() / 8;
            read_table(
                file,
                hdr.refcount_table_offset,
                usize::try_from(n).map_err(|_| EFBIG)?,
            )?
        } else {
            KVVec::new()
        };
        let writable_rt = !rt.is_empty();
        let mut md = Self {
            img,
            l1,
            l1_off: hdr.l1_table_offset,
            l1_dirty: KVec::new(),
            cache: MdCache::new(),
            rt,
            rt_dirty: KVec::new(),
            rt_off: hdr.refcount_table_offset,
            rt_clusters: u64::from(hdr.refcount_table_clusters),
            barrier: false,
            frees: KVec::new(),
            frees_ready: KVec::new(),
            hint: 1,
            cluster_size: hdr.cluster_size(),
            grown: file.size(),
            untouched_from: file
                .size()
                .checked_next_multiple_of(hdr.cluster_size())
                .unwrap_or(u64::MAX),
            io,
            count: AllocCount::new(),
            meta: RBTree::new(),
            corrupt: false,
        };
        if writable_rt {
            md.note_metadata(file, hdr, true)?;
        }
        Ok(md)
    }

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
    fn note_metadata(&mut self, file: &File, hdr: &Header, check: bool) -> Result {
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
            (true, fmt::REFT_OFFSET_MASK, "refcount block"),
            (false, fmt::L1E_OFFSET_MASK, "L2 table"),
        ];
        for (rt, mask, what) in tables {
            let n = if rt { self.rt.len() } else { self.l1.len() };
            for i in 0..n {
                let raw = if rt { self.rt.get(i) } else { self.l1.get(i) };
                let off = raw.copied().unwrap_or(0) & mask;
                if off != 0 {
                    if check {
                        self.check_in_use(file, hdr, off / cs, what)?;
                    }
                    self.note_meta(off, what)?;
                }
                if i % 1024 == 1023 {
                    crate::kernel_abstractions::task::cond_resched();
                }
            }
        }
        Ok(())
    }

    fn check_in_use(&mut self, file: &File, hdr: &Header, c: u64, what: &str) -> Result {
        if self.refcount(file, hdr, c)? != 0 {
            return Ok(());
        }
        pr_err!(
            "dm-qcow2: image {}: {} at {:#x} has refcount 0 (metadata would be overwritten): repair with qemu-img check -r all\n",
            self.img,
            what,
            c.saturating_mul(hdr.cluster_size())
        );
        Err(euclean())
    }

    /// Records that the cluster at `off` holds metadata (`what`).
    fn note_meta(&mut self, off: u64, what: &'static str) -> Result {
        let c = self.cluster_of(off);
        if self.meta.get(&c).is_none() {
            self.meta.try_create_and_insert(c, what, GFP_KERNEL)?;
        }
        Ok(())
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
        (first..=last).find_map(|c| self.meta.get(&c).copied())
    }

    /// Whether a write found metadata in its way (the delta takes no more).
    pub(crate) fn is_corrupt(&self) -> bool {
        self.corrupt
    }

    /// Records that a write found metadata in its way; true the first time.
    pub(crate) fn set_corrupt(&mut self) -> bool {
        !core::mem::replace(&mut self.corrupt, true)
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
            self.rt = read_table(
                file,
                hdr.refcount_table_offset,
                usize::try_from(n).map_err(|_| EFBIG)?,
            )?;
            self.rt_off = hdr.refcount_table_offset;
            self.rt_clusters = u64::from(hdr.refcount_table_clusters);
            self.note_metadata(file, hdr, false)?;
        }
        Ok(())
    }

    /// Whether anything is waiting for a commit.
    pub(crate) fn is_dirty(&self) -> bool {
        self.barrier
            || self.cache.dirty() > 0
            || !self.l1_dirty.is_empty()
            || !self.rt_dirty.is_empty()
    }

    /// Whether refcount decrements are queued (applied after commits).
    pub(crate) fn has_frees(&self) -> bool {
        !self.frees.is_empty() || !self.frees_ready.is_empty()
    }

    /// Whether refcount decrements may be applied (`apply_frees`).
    pub(crate) fn has_ready_frees(&self) -> bool {
        !self.frees_ready.is_empty()
    }

    /// Whether a long-running writer (a merge) should commit now to keep
    /// the queued decrements bounded.
    pub(crate) fn wants_commit(&self) -> bool {
        self.frees.len() + self.frees_ready.len() >= FREES_SOFT_MAX
    }

    /// Makes everything changed so far durable, in the order the module
    /// docs give; `force`: fsync even if nothing is dirty. Returns whether
    /// it fsynced. On error the pages not known durable stay dirty.
    pub(crate) fn commit(&mut self, file: &File, force: bool) -> Result<bool> {
        let mut synced = false;
        // Data written to clusters allocated since the last commit lands
        // before the fsync below covers it (it may have been submitted
        // after the L2 entry pointing at it was set, see `write_piece`).
        if self.barrier {
            self.io.wait_idle();
        }
        // 1. Refcounts (and the data, new refcount blocks and new L2 tables
        //    written directly) before anything that references them.
        //    Without a barrier the dirty refcounts are decrements only (of
        //    removals already durable) and go with step 2.
        if self.barrier || !self.rt_dirty.is_empty() {
            self.cache.write_dirty(file, Kind::Refcount)?;
            file.fsync()?;
            self.cache.mark_clean(Kind::Refcount);
            synced = true;
            // The refcount table entries of new blocks, now that the
            // blocks are durable.
            if !self.rt_dirty.is_empty() {
                for &pi in self.rt_dirty.iter() {
                    write_table_page(file, &self.rt, self.rt_off, pi)?;
                }
                file.fsync()?;
                self.rt_dirty = KVec::new();
            }
            self.barrier = false;
        }
        // 2. L2 and L1 entries. A new L2 table's contents were written
        //    (zeroed or copied) when it was made and are durable by step 1
        //    (`set_l1_entry` raises the barrier): an L1 entry durable before
        //    the L2 pages written with it shows the table as it was made,
        //    whose entries all point at durable data (leaks at worst).
        if self.cache.dirty() > 0 || !self.l1_dirty.is_empty() {
            self.cache.write_dirty(file, Kind::Refcount)?;
            self.cache.write_dirty(file, Kind::L2)?;
            for &pi in self.l1_dirty.iter() {
                write_table_page(file, &self.l1, self.l1_off, pi)?;
            }
            file.fsync()?;
            self.cache.mark_clean(Kind::Refcount);
            self.cache.mark_clean(Kind::L2);
            self.l1_dirty = KVec::new();
            synced = true;
        }
        if force && !synced {
            file.fsync()?;
            synced = true;
        }
        // Every removal queued so far is durable (each was made before its
        // decrement was queued): the decrements may be applied.
        if self.frees_ready.is_empty() {
            self.frees_ready = core::mem::replace(&mut self.frees, KVec::new());
        } else if self
            .frees_ready
            .extend_from_slice(&self.frees, GFP_KERNEL)
            .is_ok()
        {
            self.frees = KVec::new();
        }
        Ok(synced)
    }

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
    pub(crate) fn apply_frees(&mut self, file: &File, hdr: &Header) -> Result {
        let frees = core::mem::replace(&mut self.frees_ready, KVec::new());
        let mut res = Ok(());
        for (start, len) in frees.iter() {
            if let Err(e) = self.free_range(file, hdr, *start, *len) {
                res = Err(e);
            }
        }
        res
    }

    /// The cached page at `off`, read if needed. Only clean pages are
    /// evicted to make room; with none left (or too many dirty) everything
    /// is committed first.
    fn page(&mut self, file: &File, off: u64) -> Result<&mut IoBuf> {
        if self.cache.pages.get(&off).is_none() {
            let max = param::md_cache_pages();
            if self.cache.dirty() >= max / 2 {
                self.commit(file, false)?;
            }
            while self.cache.count >= max {
                if !self.cache.evict_one() {
                    self.commit(file, false)?;
                    if !self.cache.evict_one() {
                        break;
                    }
                }
            }
            let mut buf = IoBuf::new(MD_PAGE as usize)?;
            file.read_full(&mut buf, off)?;
            self.cache
                .pages
                .try_create_and_insert(off, Page { buf, dirty: None }, GFP_KERNEL)?;
            self.cache.count += 1;
        }
        self.cache
            .pages
            .get_mut(&off)
            .map(|p| &mut p.buf)
            .ok_or(EIO)
    }

    /// The cached page at `off`, marked dirty (of `kind`) for the next commit.
    fn page_dirty(&mut self, file: &File, off: u64, kind: Kind) -> Result<&mut IoBuf> {
        self.page(file, off)?;
        let cache = &mut self.cache;
        let p = cache.pages.get_mut(&off).ok_or(EIO)?;
        if p.dirty.is_none() {
            cache.dirty_keys.push(off, GFP_KERNEL)?;
            match kind {
                Kind::Refcount => cache.dirty_rc += 1,
                Kind::L2 => cache.dirty_l2 += 1,
            }
        }
        p.dirty = Some(kind);
        Ok(&mut p.buf)
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
    pub(crate) fn l2_entry(
        &mut self,
        file: &File,
        hdr: &Header,
        l2_off: u64,
        vaddr: u64,
    ) -> Result<(u64, u64)> {
        let pos = Self::l2_pos(hdr, l2_off, vaddr)?;
        let page = self.page(file, pos & !(MD_PAGE - 1))?;
        let at = (pos & (MD_PAGE - 1)) as usize;
        let raw = fmt::table_entry(page, (at / 8) as u64).ok_or(EIO)?;
        let bitmap = if hdr.extended_l2() {
            fmt::table_entry(page, (at / 8 + 1) as u64).ok_or(EIO)?
        } else {
            0
        };
        Ok((raw, bitmap))
    }

    /// Sets the L2 entry for `vaddr` in the cache (written by the next
    /// commit). An entry that points at host data needs the commit's
    /// barrier: that data and its refcount go first.
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
        let page = self.page_dirty(file, pos & !(MD_PAGE - 1), Kind::L2)?;
        let at = (pos & (MD_PAGE - 1)) / 8;
        // Both words or neither: a caller that fails frees the new cluster.
        if hdr.extended_l2() && fmt::table_entry(page, at + 1).is_none() {
            return Err(EIO);
        }
        let old = (fmt::table_entry(page, at), fmt::table_entry(page, at + 1));
        fmt::set_table_entry(page, at, raw).ok_or(EIO)?;
        if hdr.extended_l2() {
            fmt::set_table_entry(page, at + 1, bitmap).ok_or(EIO)?;
        }
        if raw & fmt::L2E_OFFSET_MASK != 0 || raw & fmt::L2E_COMPRESSED != 0 {
            self.barrier = true;
        }
        // The status line's count follows every change of an entry.
        let ext = hdr.extended_l2();
        let was = (old.0.unwrap_or(0), if ext { old.1.unwrap_or(0) } else { 0 });
        self.count
            .note(hdr, vaddr, was, (raw, if ext { bitmap } else { 0 }));
        Ok(())
    }

    /// Points the L1 entry for `vaddr` at a new L2 table (in memory; written
    /// by the next commit, after the table).
    fn set_l1_entry(&mut self, hdr: &Header, vaddr: u64, raw: u64) -> Result {
        let i = usize::try_from(hdr.l1_index(vaddr)).map_err(|_| EIO)?;
        mark_table_page(&mut self.l1_dirty, i / TABLE_PER_PAGE)?;
        *self.l1.get_mut(i).ok_or(EIO)? = raw;
        self.barrier = true;
        Ok(())
    }

    /// The L2 table covering `vaddr`, allocating an empty one if there is none.
    pub(crate) fn ensure_l2(&mut self, file: &File, hdr: &Header, vaddr: u64) -> Result<u64> {
        match self.l1_entry(hdr, vaddr)? {
            Some(e) if e.copied => Ok(e.l2_offset),
            // Shared with an internal snapshot: give the active L1 its own copy
            // first. Data refcounts already count both tables' references.
            // (A shared table is never written, so the image holds it as is.)
            Some(e) => {
                let cs = hdr.cluster_size();
                let mut table = IoBuf::new(cs as usize)?;
                file.read_full(&mut table, e.l2_offset)?;
                let off = self.alloc_cluster(file, hdr)?;
                let res = self
                    .note_meta(off, "L2 table")
                    .and_then(|()| file.write_full(&table, off))
                    .and_then(|()| self.set_l1_entry(hdr, vaddr, fmt::encode_l1(off, true)));
                if let Err(err) = res {
                    // Nothing points at it.
                    let _ = self.free_range(file, hdr, off, cs);
                    return Err(err);
                }
                // Dropped once the new L1 entry is durable.
                let _ = self.defer_free(e.l2_offset, cs);
                Ok(off)
            }
            None => {
                let off = self.alloc_cluster(file, hdr)?;
                let zero = IoBuf::new(hdr.cluster_size() as usize)?;
                let res = self
                    .note_meta(off, "L2 table")
                    .and_then(|()| file.write_full(&zero, off))
                    .and_then(|()| self.set_l1_entry(hdr, vaddr, fmt::encode_l1(off, true)));
                if let Err(e) = res {
                    // Nothing points at it.
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
        let raw = *usize::try_from(ti)
            .ok()
            .and_then(|i| self.rt.get(i))
            .ok_or(ENOSPC)?;
        let Some(blk) = fmt::refcount_block_offset(hdr, raw).map_err(|e| corrupt(self.img, e))?
        else {
            return Ok(None);
        };
        let per_page = (MD_PAGE * 8) >> hdr.refcount_order;
        Ok(Some((blk + bi / per_page * MD_PAGE, bi % per_page)))
    }

    fn refcount(&mut self, file: &File, hdr: &Header, c: u64) -> Result<u64> {
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

    /// End of the last cluster with a non-zero refcount (as the cache has it).
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
        let mut c = self.hint.max(1);
        loop {
            let off = c.checked_mul(cs).ok_or(ENOSPC)?;
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
                self.note_meta(off, "refcount block")?;
                self.reserve(file, off + cs);
                self.cache.invalidate(off, off + cs);
                let mut blk = IoBuf::new(cs as usize)?;
                fmt::refcount_set(&mut blk, bi, hdr.refcount_order, 1).ok_or(EIO)?;
                file.write_full(&blk, off)?;
                let i = ti as usize;
                mark_table_page(&mut self.rt_dirty, i / TABLE_PER_PAGE)?;
                if let Some(e) = self.rt.get_mut(i) {
                    *e = off;
                }
                self.barrier = true;
                self.untouched_from = self.untouched_from.max(off.saturating_add(cs));
                c += 1;
                self.hint = c;
                continue;
            }
            if self.refcount(file, hdr, c)? == 0 {
                self.reserve(file, off + cs);
                self.set_refcount(file, hdr, c, 1)?;
                self.cache.invalidate(off, off + cs);
                self.hint = c + 1;
                let untouched = off >= self.untouched_from;
                self.untouched_from = self.untouched_from.max(off.saturating_add(cs));
                return Ok((off, untouched));
            }
            c += 1;
            // A long run of used clusters (a full image): let others run.
            if c % 8192 == 0 {
                crate::kernel_abstractions::task::cond_resched();
            }
        }
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
        let tbl_bytes = old_n
            .checked_mul(16)
            .ok_or(ENOSPC)?
            .max((old_n + 1) * 8)
            .next_multiple_of(cs);
        let tbl_clusters = tbl_bytes / cs;
        if tbl_clusters + 1 > per_block || tbl_bytes > fmt::MAX_REFTABLE_BYTES {
            pr_err!(
                "dm-qcow2: image {}: refcount table cannot grow further\n",
                self.img
            );
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
        self.note_meta(blk_off, "refcount block")?;
        self.reserve(file, tbl_off + tbl_bytes);
        self.untouched_from = self.untouched_from.max(tbl_off.saturating_add(tbl_bytes));
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
        // The new table was written whole.
        self.rt_dirty = KVec::new();
        self.cache.invalidate(blk_off, tbl_off + tbl_bytes);
        pr_info!(
            "dm-qcow2: image {}: refcount table moved to {:#x}, {} clusters\n",
            self.img,
            tbl_off,
            tbl_clusters
        );
        // The old table is no longer referenced by the (durable) header.
        let _ = self.defer_free(old_off, old_clusters * cs);
        Ok(())
    }

    /// Drops one reference of every cluster overlapping `[start, start + len)`
    /// in the cache: for references whose removal is durable (`apply_frees`)
    /// and for clusters just allocated that nothing points at.
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
                pr_err!(
                    "dm-qcow2: image {}: freeing a free cluster {:#x}\n",
                    self.img,
                    c * cs
                );
                continue;
            }
            self.set_refcount(file, hdr, c, r - 1)?;
            if r == 1 {
                // Free now: no longer metadata if it was (an L2 table a
                // snapshot shared, a cluster allocated for one in vain).
                self.meta.remove(&c);
                self.cache.invalidate(c * cs, c * cs + cs);
                self.hint = self.hint.min(c.max(1));
            }
        }
        Ok(())
    }
}
