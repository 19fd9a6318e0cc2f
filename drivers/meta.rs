// SPDX-License-Identifier: GPL-2.0

//! Per-delta metadata: the L1 table, a cache of metadata pages (L2 tables and
//! refcount blocks), the refcount table, and cluster allocation.
//!
//! Only the worker (or an express lane doing its work, or a control path,
//! with the state locked) touches a delta's metadata. The cache is
//! write-back: refcount changes and L1/L2 entry changes only dirty memory
//! (cached pages, the in-memory L1 and refcount tables), and
//! [`DeltaMd::commit`] writes them out in an order fixed by fsync barriers,
//! never by submission order alone:
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
//! allocation of clusters, `tables` the L1 table and L2 entries, `overlap`
//! the guard against writes landing on metadata; the load and the commit
//! are here.

mod cache;
mod clusters;
mod overlap;
mod refcount;
mod tables;

use crate::count::AllocCount;
use crate::hot::Fast;
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
pub(crate) use refcount::crash_size_limit;
pub(crate) use tables::HoleWord;

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
    /// The fast path's table while it is on and this delta is the top
    /// (`Inner::fast_on`): a cluster that becomes metadata is forgotten
    /// there first (`DeltaMd::fence_lanes`).
    fast: Option<Arc<Fast>>,
    /// One past the highest cluster the worker started an asynchronous
    /// write in place into (see `fence_lanes`).
    in_place_end: u64,
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
            fast: None,
            in_place_end: 0,
        };
        if writable_rt {
            md.note_metadata(file, hdr, true)?;
        }
        Ok(md)
    }

    /// The fast path's table lanes write this delta through, if any (see
    /// `fast`).
    pub(crate) fn set_fast(&mut self, fast: Option<Arc<Fast>>) {
        self.fast = fast;
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
        // After a failed fsync nothing written before it is known durable:
        // no entry may become durable over it (see `File::fsync`). The
        // image keeps what the last good commit made durable.
        if file.sync_failed() {
            return Err(EIO);
        }
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
}
