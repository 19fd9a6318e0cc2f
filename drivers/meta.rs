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
//!
//! `cache` holds the page cache, `refcount` the refcounts and the
//! allocation of clusters; the tables and the commit are here.

mod cache;
mod clusters;
mod refcount;

use crate::count::AllocCount;
use crate::kernel_abstractions::direct_io::IoCounter;
use crate::kernel_abstractions::file::{File, IoBuf, DIO_ALIGN};
use crate::kernel_abstractions::task::code::{eopnotsupp, euclean};
use crate::kernel_abstractions::{gfp_kv, param};
use crate::qcow2_format::{self as fmt, FormatError, Header};
use cache::{Kind, MdCache};
use clusters::{MetaBuilder, MetaClusters, MetaKind};
use kernel::error::code::*;
use kernel::prelude::*;
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
    let mut t = KVVec::with_capacity(n, gfp_kv())?;
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

/// The L2 tables `l1` names more than once (sorted offsets, each once): see
/// `count`. Takes 8 bytes per name for the while.
fn shared_tables(l1: &[u64]) -> Result<KVVec<u64>> {
    let named = |&&e: &&u64| e & fmt::L1E_OFFSET_MASK != 0;
    let mut offs = KVVec::with_capacity(l1.iter().filter(named).count(), gfp_kv())?;
    for (i, &e) in l1.iter().filter(named).enumerate() {
        offs.push(e & fmt::L1E_OFFSET_MASK, gfp_kv())?;
        if i % 4096 == 4095 {
            crate::kernel_abstractions::task::cond_resched();
        }
    }
    clusters::sort(&mut offs);
    let mut shared = KVVec::new();
    for (&a, &b) in offs.iter().zip(offs.iter().skip(1)) {
        if a == b && shared.last() != Some(&a) {
            shared.push(a, gfp_kv())?;
        }
    }
    Ok(shared)
}

/// Remembers that page `pi` of an in-memory table is dirty.
fn mark_table_page(dirty: &mut KVec<usize>, pi: usize) -> Result {
    if !dirty.contains(&pi) {
        dirty.push(pi, GFP_KERNEL)?;
    }
    Ok(())
}

/// How [`DeltaMd::l1_entry_in_file`] takes a file system's word that a
/// table lies in a hole: images QEMU writes never have one there, and a
/// wrong word (a file system's bug, a FUSE server's answer) must not lose
/// data.
#[derive(Clone, Copy)]
pub(crate) enum HoleWord {
    /// As said: for the count, where a wrong word misstates a number.
    Trust,
    /// Confirmed by reading the table (zeroes only): for merges and
    /// discard, which would leave data behind. One read of a cluster per
    /// such table, not a look at each of its entries.
    Confirm,
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
    meta: MetaClusters,
    /// A write would have overwritten metadata (see [`overlap`]): the image
    /// is marked corrupt and takes no more writes.
    ///
    /// [`overlap`]: DeltaMd::overlap
    corrupt: bool,
    /// A cluster nothing points at could not be freed (or its release
    /// queued): the image leaks it; the target's wants_check is latched
    /// (`take_leaked`).
    leaked: bool,
    /// A free-cluster search skipped refcounts past the file's end (see
    /// `skip_leaked`): said once.
    leak_skip_noted: bool,
    /// "freeing a free cluster" lines so far (see `FREE_FREE_LOG_MAX`).
    free_free_logged: u32,
}

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
        // Entries past the disk's end name nothing a walk reads.
        let named = usize::try_from(hdr.min_l1_entries())
            .map_or(&l1[..], |n| l1.get(..n).unwrap_or(&l1[..]));
        let count = AllocCount::new(&shared_tables(named)?)?;
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
            count,
            meta: MetaClusters::new(),
            corrupt: false,
            leaked: false,
            leak_skip_noted: false,
            free_free_logged: 0,
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

    /// Records that the cluster at `off` holds metadata (`kind`).
    fn note_meta(&mut self, off: u64, kind: MetaKind) -> Result {
        let c = self.cluster_of(off);
        self.meta.insert(c, kind)
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
            if let Err(e) = self.note_metadata(file, hdr, false) {
                // Unloaded again: a retried start builds the overlap set
                // (kept only with the refcount table) instead of skipping it.
                self.rt = KVVec::new();
                return Err(e);
            }
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

    /// The decoded L1 entry for `vaddr`.
    pub(crate) fn l1_entry(&self, hdr: &Header, vaddr: u64) -> Result<Option<fmt::L1Entry>> {
        let raw = *usize::try_from(hdr.l1_index(vaddr))
            .ok()
            .and_then(|i| self.l1.get(i))
            .ok_or(EIO)?;
        fmt::decode_l1(hdr, raw).map_err(|e| corrupt(self.img, e))
    }

    /// `l1_entry`, but an entry that does not decode is `None` and not
    /// logged: for the fast path's look at a page's neighbours (`Inner::warm`),
    /// which would log a bad entry once per cluster it covers. The lookup
    /// of the cluster itself reports it.
    pub(crate) fn l1_entry_quiet(&self, hdr: &Header, vaddr: u64) -> Option<Option<fmt::L1Entry>> {
        let i = usize::try_from(hdr.l1_index(vaddr)).ok()?;
        fmt::decode_l1(hdr, *self.l1.get(i)?).ok()
    }

    /// File offset of the L2 entry for `vaddr` in the table at `l2_off`.
    fn l2_pos(hdr: &Header, l2_off: u64, vaddr: u64) -> Result<u64> {
        hdr.l2_index(vaddr)
            .checked_mul(hdr.l2_entry_bytes())
            .and_then(|o| o.checked_add(l2_off))
            .ok_or(EIO)
    }

    /// The L1 entry for `vaddr` if its L2 table may map something: none
    /// where there is no table, or where the table lies wholly past the end
    /// of the file or in a hole of it, with no page of it cached (it reads
    /// as zeroes, as QEMU reads it). For walks over whole tables (the count,
    /// merges, discard), which a damaged L1 naming millions of such tables
    /// would otherwise send through every entry (a sparse file's apparent
    /// size bounds nothing). `holes` says how far the file system's word
    /// for a hole is taken.
    pub(crate) fn l1_entry_in_file(
        &mut self,
        file: &File,
        hdr: &Header,
        vaddr: u64,
        holes: HoleWord,
    ) -> Result<Option<fmt::L1Entry>> {
        let Some(e) = self.l1_entry(hdr, vaddr)? else {
            return Ok(None);
        };
        let off = e.l2_offset;
        let cs = hdr.cluster_size();
        // The cache first (a tree lookup; a table being walked is there),
        // then the file (a seek for tables inside it).
        if self.cache.holds_any(off, off.saturating_add(cs)) {
            return Ok(Some(e));
        }
        let zeroes = off >= file.size()
            || (!file.holds_data(off, cs)
                && match holes {
                    HoleWord::Trust => true,
                    HoleWord::Confirm => {
                        let mut buf = IoBuf::new(cs as usize)?;
                        file.read_full(&mut buf, off)?;
                        // A word at a time (a cluster is whole words).
                        buf.chunks_exact(8).all(|c| {
                            <[u8; 8]>::try_from(c).is_ok_and(|w| u64::from_ne_bytes(w) == 0)
                        })
                    }
                });
        Ok((!zeroes).then_some(e))
    }

    /// The raw L2 entry for `vaddr` in the table at `l2_off` if its page is
    /// cached (no I/O; plain entries, not extended L2).
    pub(crate) fn cached_l2_entry(&self, hdr: &Header, l2_off: u64, vaddr: u64) -> Option<u64> {
        // An extended entry's first word alone does not say what it shows.
        if hdr.extended_l2() {
            return None;
        }
        let pos = Self::l2_pos(hdr, l2_off, vaddr).ok()?;
        let page = self.cache_page(pos & !(MD_PAGE - 1))?;
        fmt::table_entry(page, (pos & (MD_PAGE - 1)) / 8)
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

    /// Calls `f(self, guest address, raw entry)` for every entry of the L2
    /// table at `l2_off` on the cached page that holds `vaddr`'s entry (up
    /// to the image's end), the first time it is asked for that page and the
    /// fast path's table `id` (a page read again starts unmarked). Plain
    /// entries only (not extended L2): at most `MD_PAGE / 8` calls.
    pub(crate) fn warm_l2_page(
        &mut self,
        hdr: &Header,
        l2_off: u64,
        vaddr: u64,
        id: u64,
        mut f: impl FnMut(&Self, u64, u64),
    ) -> Result {
        let page_off = Self::l2_pos(hdr, l2_off, vaddr)? & !(MD_PAGE - 1);
        // A page is one L2 table's: clusters are never smaller than a page
        // here (the constructor refuses them), so the page alone is marked.
        if hdr.extended_l2() || !self.claim_page_warm(page_off, id) {
            return Ok(());
        }
        let md = &*self;
        let Some(page) = md.cache_page(page_off) else {
            return Ok(());
        };
        let cs = hdr.cluster_size();
        // The table's part of the page (all of it, as said; the bounds do
        // not rely on that).
        let start = page_off.max(l2_off);
        let end = page_off
            .checked_add(MD_PAGE)
            .zip(l2_off.checked_add(cs))
            .map(|(a, b)| a.min(b))
            .ok_or(EIO)?;
        // The guest address of the table's first entry.
        let base = hdr
            .l2_index(vaddr)
            .checked_mul(cs)
            .and_then(|o| o.checked_add(hdr.offset_in_cluster(vaddr)))
            .and_then(|o| vaddr.checked_sub(o))
            .ok_or(EIO)?;
        let mut pos = start;
        while pos < end {
            let v = ((pos - l2_off) / 8)
                .checked_mul(cs)
                .and_then(|o| o.checked_add(base))
                .ok_or(EIO)?;
            if v >= hdr.size {
                break;
            }
            f(
                md,
                v,
                fmt::table_entry(page, (pos - page_off) / 8).ok_or(EIO)?,
            );
            pos = pos.checked_add(8).ok_or(EIO)?;
        }
        Ok(())
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
                    .note_meta(off, MetaKind::L2Table)
                    .and_then(|()| file.write_full(&table, off))
                    .and_then(|()| self.set_l1_entry(hdr, vaddr, fmt::encode_l1(off, true)));
                if let Err(err) = res {
                    // Nothing points at it.
                    let freed = self.free_range(file, hdr, off, cs);
                    self.leak_on_error(freed);
                    return Err(err);
                }
                // Dropped once the new L1 entry is durable.
                let queued = self.defer_free(e.l2_offset, cs);
                self.leak_on_error(queued);
                Ok(off)
            }
            None => {
                // The buffer first: nothing to free if there is no memory.
                let zero = IoBuf::new(hdr.cluster_size() as usize)?;
                let off = self.alloc_cluster(file, hdr)?;
                let res = self
                    .note_meta(off, MetaKind::L2Table)
                    .and_then(|()| file.write_full(&zero, off))
                    .and_then(|()| self.set_l1_entry(hdr, vaddr, fmt::encode_l1(off, true)));
                if let Err(e) = res {
                    // Nothing points at it.
                    let freed = self.free_range(file, hdr, off, hdr.cluster_size());
                    self.leak_on_error(freed);
                    return Err(e);
                }
                Ok(off)
            }
        }
    }
}
