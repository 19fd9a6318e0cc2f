// SPDX-License-Identifier: GPL-2.0

//! The `qcow2` target: the table's state (the chain, the worker's state, the
//! queues) and the device-mapper callbacks. By concern:
//!
//! - `ctr`: the constructor (descriptors, headers, chain checks);
//! - `worker`: the I/O worker, commits, ENOSPC parking;
//! - `fast`: the fast path for allocated clusters and its lanes;
//! - `message`: messages and the status INFO line;
//! - `suspend`: suspend/resume and header updates.
//!
//! The I/O path is in `io`, metadata in `meta`, merges in `merge`.

mod ctr;
mod fast;
mod message;
mod suspend;
mod worker;

use crate::count;
use crate::hot::Fast;
use crate::io::CowGang;
use crate::kernel_abstractions::bio::{Bio, BioList, BioStack, Op};
use crate::kernel_abstractions::direct_io::{BioPart, IoCounter};
use crate::kernel_abstractions::dm::{
    self, CtrError, Emit, QueueLimits, StatusType, TargetCtr, TargetLink,
};
use crate::kernel_abstractions::file::{File, IoBuf, DIO_ALIGN};
use crate::kernel_abstractions::inflight::InflightRefs;
use crate::kernel_abstractions::param;
use crate::kernel_abstractions::task::{
    self,
    code::{ebadslt, eopnotsupp, euclean},
};
use crate::kernel_abstractions::wq::{self, OwnedQueue};
use crate::kernel_abstractions::zlib::Inflater;
use crate::merge::{self, Dir, Merge};
use crate::meta::DeltaMd;
use crate::qcow2_format::{self as fmt, FormatError, Header};
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use fast::{FastRoute, Lanes};
use kernel::error::code::*;
use kernel::prelude::*;
use kernel::str::CStr;
use kernel::sync::lock::{mutex::MutexBackend, Guard};
use kernel::sync::{Arc, Mutex, SpinLock};
use kernel::workqueue::{impl_has_work, new_work, Work, WorkItem};
use kernel::{c_str, new_mutex, new_spinlock};

pub(crate) const SECTOR: u64 = 512;
/// Header offsets of the backing file name's offset (u64) and size (u32).
const HDR_BACKING: usize = 8;
/// The period of the commit of metadata no flush asked for, in 100 ms.
const COMMIT_SLICES: u32 = 50;
/// qcow2 compatible feature bit 0: refcounts may be updated lazily.
const COMPAT_LAZY_REFCOUNTS: u64 = 1;
/// Header offsets of the v3 feature words.
const HDR_INCOMPAT: usize = 72;
const HDR_AUTOCLEAR: usize = 88;

/// One image of the chain: its file and header (metadata lives in `DeltaMd`).
pub(crate) struct Delta {
    pub(crate) file: File,
    pub(crate) hdr: Header,
}

/// State only the worker (an express lane serving bios as it would, and
/// control paths, with it locked) touches.
pub(crate) struct WorkerState {
    /// Base first: index == img_id. Changed only by a merge's `complete`.
    pub(crate) deltas: KVec<Arc<Delta>>,
    /// Index == img_id.
    pub(crate) md: KVec<DeltaMd>,
    /// A cluster-sized buffer for copy-on-write (taken while in use).
    pub(crate) cow: Option<IoBuf>,
    /// Copy-on-write fills of the batch, in flight together (`io::cow`);
    /// empty whenever the state is unlocked.
    pub(crate) gang: CowGang,
    pub(crate) inflater: Inflater,
    pub(crate) zin: IoBuf,
    pub(crate) zout: IoBuf,
    /// (delta, host offset) of the compressed cluster held in `zout`.
    pub(crate) zkey: Option<(usize, u64)>,
    pub(crate) merge: Option<Merge>,
    /// Writes that hit ENOSPC, retried later.
    parked: BioList,
    /// Bios waiting for the batch's commit before they complete.
    unsynced: BioList,
    /// A flush was asked for in this batch: its commit fsyncs the top even
    /// if no metadata changed.
    pub(crate) flush: bool,
    /// A FUA bio waits for the batch's commit: it waits for the data I/O
    /// in flight, then fsyncs the top (`Inner::sync_batch`).
    fua: bool,
    /// The images may have changed (we were suspended): re-read them on resume.
    stale: bool,
    /// The fast path's table while it is on (`Inner::fast_on`).
    pub(crate) fast: Option<Arc<Fast>>,
    /// The table is being destroyed: the periodic commit is not armed any
    /// more (its queue goes away; arming happens with the state locked).
    no_timer: bool,
}

impl WorkerState {
    pub(crate) fn delta(&self, d: usize) -> Result<Arc<Delta>> {
        self.deltas.get(d).cloned().ok_or(EIO)
    }

    pub(crate) fn top(&self) -> usize {
        self.deltas.len().saturating_sub(1)
    }

    /// The fast path's table, if it is on and `d` is the top.
    pub(crate) fn fast_for(&self, d: usize) -> Option<Arc<Fast>> {
        self.fast.clone().filter(|_| d == self.top())
    }

    /// Forgets the fast path's lookup for the cluster of `vaddr` (if on)
    /// before an L2 entry of it changes in delta `d`: an entry may point
    /// below the top, where a change of the top or of a delta between makes
    /// it wrong; one pointing above `d` stays right. Every change of an L2
    /// entry, of any delta, calls this first.
    pub(crate) fn hot_forget(&self, d: usize, vaddr: u64) {
        if let Some(f) = &self.fast {
            let above = self.top().saturating_sub(d);
            let vci = vaddr >> f.top.hdr.cluster_bits;
            f.map.del(vci, above);
            // Whichever delta changes, the cluster may stop being zeroes.
            f.zero.clear(vci);
        }
    }

    /// Removes delta `d` from the chain; the ones above it move down one id.
    pub(crate) fn unlink(&mut self, d: usize) -> Result<Arc<Delta>> {
        let n = self.deltas.len();
        if d >= n || n < 2 {
            return Err(EINVAL);
        }
        let mut deltas = KVec::with_capacity(n - 1, GFP_KERNEL)?;
        let mut md = KVec::with_capacity(n - 1, GFP_KERNEL)?;
        let mut removed = None;
        let old_md = core::mem::replace(&mut self.md, KVec::new());
        let old = core::mem::replace(&mut self.deltas, KVec::new());
        for (i, (delta, m)) in old.into_iter().zip(old_md).enumerate() {
            if i == d {
                removed = Some(delta);
                continue;
            }
            // Cannot fail: the capacity is reserved.
            let _ = deltas.push(delta, GFP_KERNEL);
            let _ = md.push(m, GFP_KERNEL);
        }
        for (i, m) in md.iter_mut().enumerate() {
            m.set_img(i);
        }
        self.deltas = deltas;
        self.md = md;
        // Indices changed.
        self.zkey = None;
        removed.ok_or(EINVAL)
    }
}

/// The worker's buffers sized for one cluster of the chain (all deltas have
/// the top's cluster size).
struct ClusterBufs {
    cow: IoBuf,
    zin: IoBuf,
    zout: IoBuf,
}

impl ClusterBufs {
    fn new(cs: usize) -> Result<Self> {
        // A compressed cluster spans at most two clusters of input, plus
        // alignment slack on both ends.
        let zin_len = cs
            .checked_mul(2)
            .and_then(|n| n.checked_add(2 * DIO_ALIGN))
            .ok_or(ENOMEM)?;
        Ok(Self {
            cow: IoBuf::new(cs)?,
            zin: IoBuf::new(zin_len)?,
            zout: IoBuf::new(cs)?,
        })
    }

    /// Whether the buffers of `st` are sized for clusters of `cs` bytes.
    fn fit(st: &WorkerState, cs: usize) -> bool {
        st.cow.as_ref().map(|b| b.len()) == Some(cs) && st.zout.len() == cs
    }
}

/// What the status lines show of the state, copied out whenever the state
/// is unlocked (`StateGuard`): `dmsetup status` reads it under a spinlock
/// and never waits for the state mutex, which the worker holds for whole
/// batches (and a status caller preempted while holding it would stall the
/// worker behind it).
pub(crate) struct StatusView {
    /// Deltas in the chain.
    pub(crate) images: usize,
    /// Clusters each delta references, base first (`None`: not counted
    /// yet): the first `images` entries (sized for the chain at ctr).
    pub(crate) counts: KVec<Option<u64>>,
    pub(crate) merge: merge::MergeView,
    /// The top's qcow2 version and cluster size in sectors (status TABLE).
    pub(crate) top: (u32, u64),
}

/// The locked state. Unlocking it refreshes the status view.
pub(crate) struct StateGuard<'a> {
    inner: &'a Inner,
    guard: Guard<'a, WorkerState, MutexBackend>,
}

impl core::ops::Deref for StateGuard<'_> {
    type Target = WorkerState;

    fn deref(&self) -> &WorkerState {
        &self.guard
    }
}

impl core::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut WorkerState {
        &mut self.guard
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        self.inner.publish_status(&self.guard);
        // Still under the mutex: see `Inner::md_durable`.
        let st = &*self.guard;
        let durable = st.md.get(st.top()).is_some_and(|md| !md.is_dirty())
            && st.deltas.last().is_some_and(|d| !d.file.sync_failed());
        self.inner.md_durable.store(durable, Ordering::Relaxed);
    }
}

/// Error state reported by `get_errors` and the status line.
#[derive(Default)]
struct Errors {
    /// A refcount update failed: refcounts may be too high (leaks only).
    /// Resume is refused until the table is reloaded.
    wants_check: AtomicBool,
    /// Last L1/L2 writeback error (positive errno), 0 if none.
    md_writeback: AtomicI32,
    /// Last error of a truncate of an image (positive errno), 0 if none.
    truncate: AtomicI32,
}

/// The table's shared state: the chain, the bio queue and the worker.
#[pin_data]
pub(crate) struct Inner {
    /// The table was loaded read-write: the top delta takes writes.
    writable: bool,
    /// Length of the table in sectors.
    len_sectors: u64,
    /// Asynchronous data I/O in flight.
    pub(crate) inflight: Arc<IoCounter>,
    /// Held by every bio from `map` to its end (see `dm::Target::inflight`).
    pub(crate) refs: InflightRefs,
    link: Arc<TargetLink>,
    /// The I/O worker's queue (with a rescuer: bios wait for it).
    wq: OwnedQueue,
    /// The ENOSPC retry, which sleeps between tries: a queue of its own
    /// (with a rescuer: parked bios wait for it), so that it never holds up
    /// the I/O worker.
    retry_wq: OwnedQueue,
    /// The merge walker, which runs for a whole merge: a queue of its own
    /// (no rescuer: background work no I/O waits for).
    merge_wq: OwnedQueue,
    /// The periodic commit's timer, which sleeps: a queue of its own (no
    /// rescuer: flushes commit by themselves, nothing waits for it).
    commit_wq: OwnedQueue,
    /// The allocated-cluster count after a load of the metadata (see
    /// `count`): a queue of its own that the status line may wait for.
    count_wq: OwnedQueue,
    /// The timer is queued or sleeping.
    commit_armed: AtomicBool,
    /// The timer ran out: the worker commits what the cache holds.
    commit_due: AtomicBool,
    errors: Errors,
    /// An ENOSPC happened and `get_event` has not reported it yet.
    enospc_event: AtomicBool,
    /// Bios parked on ENOSPC.
    parked_count: AtomicUsize,
    /// Bios whose asynchronous data I/O ended with ENOSPC, taken back at
    /// `end_io` (any context); the worker parks them.
    late_nospc: BioStack,
    /// Bios are parked since the last event (cleared when none is left).
    enospc_episode: AtomicBool,
    /// Retries of parked bios so far.
    retry_round: AtomicU64,
    /// `retry_round` when the last ENOSPC event was raised.
    event_round: AtomicU64,
    /// Suspending: parked bios fail instead of waiting for space.
    suspending: AtomicBool,
    /// Bios the fast path served (status INFO `fast_bios`).
    fast_bios: AtomicU64,
    /// Empty flushes an express lane committed itself (status INFO
    /// `express_flushes`, see `Inner::serve_here`).
    express_flushes: AtomicU64,
    /// FUA writes the fast path served (status INFO `fast_fua`, see
    /// `Inner::fast_target`).
    fast_fua: AtomicU64,
    /// The top's metadata is durable (nothing dirty, no failed fsync) and
    /// the state unlocked: every mapping the fast path's table holds is
    /// durable, so a FUA write in place needs only its own data synced.
    /// Cleared, then fenced, by every lock of the state before anything
    /// changes (an entry put under the lock comes after the clear); set
    /// by an unlock that finds the top clean (`StateGuard::drop`).
    md_durable: AtomicBool,
    /// Bios queued on the fast path's lanes or for the worker and not taken
    /// yet (see `Lanes::queue`).
    queued_bios: AtomicUsize,
    /// Idle bios in a row since the last busy one (`Inner::express_fits`).
    idle_streak: AtomicU32,
    /// Express passes in a row whose I/O completed inline
    /// (`Inner::express_fits`).
    express_inline: AtomicU32,
    /// A guest bio was mapped since the merge walker last looked: it
    /// yields the disk between batches (see `merge_run`).
    pub(crate) guest_io: AtomicBool,
    /// The fast path (see `hot`) while it is on (not during merges); the
    /// worker's copy of `WorkerState::fast`.
    #[pin]
    fast: SpinLock<Option<Arc<Fast>>>,
    #[pin]
    pending: SpinLock<BioList>,
    /// Locked through `lock_state`.
    #[pin]
    state: Mutex<WorkerState>,
    /// What the status lines show (see `StatusView`).
    #[pin]
    status: SpinLock<StatusView>,
    #[pin]
    work: Work<Inner, 0>,
    #[pin]
    merge_work: Work<Inner, 1>,
    #[pin]
    retry_work: Work<Inner, 2>,
    #[pin]
    commit_work: Work<Inner, 3>,
    #[pin]
    count_work: Work<Inner, 4>,
    /// FUA writes of the fast path whose data landed, waiting for the sync
    /// that makes it durable (`Inner::sync_fua`); pushed in any context.
    fua_landed: BioStack,
    #[pin]
    sync_work: Work<Inner, 5>,
}

impl_has_work! {
    impl HasWork<Self, 0> for Inner { self.work }
    impl HasWork<Self, 1> for Inner { self.merge_work }
    impl HasWork<Self, 2> for Inner { self.retry_work }
    impl HasWork<Self, 3> for Inner { self.commit_work }
    impl HasWork<Self, 4> for Inner { self.count_work }
    impl HasWork<Self, 5> for Inner { self.sync_work }
}

impl Inner {
    /// Locks the state (the chain, the metadata, the merge).
    pub(crate) fn lock_state(&self) -> StateGuard<'_> {
        let guard = self.state.lock();
        // Before any change under this lock: a lane that finds an entry put
        // under it (its lookup, then an acquire fence) sees this clear or a
        // later store (`Inner::fast_target`).
        self.md_durable.store(false, Ordering::Relaxed);
        core::sync::atomic::fence(Ordering::Release);
        StateGuard { inner: self, guard }
    }

    /// Copies what the status lines show out of `st`. O(chain length), no
    /// allocation: `counts` was sized for the chain at ctr, and a chain
    /// only gets shorter (merges).
    fn publish_status(&self, st: &WorkerState) {
        let top = st
            .deltas
            .last()
            .map_or((0, 0), |t| (t.hdr.version, t.hdr.cluster_size() / SECTOR));
        let merge = merge::MergeView::of(st.merge.as_ref());
        let mut v = self.status.lock();
        let v = &mut *v;
        let mut n = 0;
        for ((d, md), slot) in st.deltas.iter().zip(st.md.iter()).zip(v.counts.iter_mut()) {
            *slot = md.count.value(&d.hdr);
            n += 1;
        }
        v.images = n;
        v.merge = merge;
        v.top = top;
    }

    /// Each delta's count in the status view, base first.
    pub(crate) fn status_counts<'a>(
        v: &'a StatusView,
    ) -> impl Iterator<Item = &'a Option<u64>> + 'a {
        v.counts.iter().take(v.images)
    }
}

/// Per-table state kept in `ti->private`.
pub(crate) struct Qcow2 {
    inner: Arc<Inner>,
    /// The fast path's lanes (see `fast`).
    lanes: Lanes,
}

impl Qcow2 {
    /// Sends `bio`, which the fast path does not serve, to the worker; an
    /// empty flush to this CPU's express lane if the table is idle
    /// (`Lanes::queue_flush`).
    fn queue_slow(&self, bio: Bio) {
        if let Err(bio) = self.lanes.queue_flush(bio) {
            self.inner.queue(bio)
        }
    }
}

impl dm::Target for Qcow2 {
    const NAME: &'static CStr = c_str!("qcow2");
    const VERSION: [u32; 3] = [1, 1, 0];
    const FEATURES: u64 = dm::features::SINGLETON;

    fn ctr(ti: &mut TargetCtr<'_>, args: &[&CStr]) -> Result<KBox<Self>, CtrError> {
        Self::new(ti, args)
    }

    fn map(&self, bio: Bio) {
        self.inner.note_guest_io();
        let route = match bio.op() {
            Op::Read | Op::Write if bio.size() > 0 => self.inner.fast_route(&bio),
            _ => None,
        };
        match route {
            Some(FastRoute::Zeroes) => return self.inner.end_zeroes(bio),
            Some(FastRoute::Lane) => {
                if let Err(bio) = self.lanes.queue(bio) {
                    self.inner.queue(bio)
                }
                return;
            }
            None => {}
        }
        match bio.op() {
            Op::Read if bio.size() > 0 => self.inner.queue(bio),
            Op::Write | Op::Flush | Op::Discard | Op::WriteZeroes if self.inner.writable => {
                self.queue_slow(bio)
            }
            // Read-only table: an empty flush has nothing to make durable.
            _ if bio.size() == 0 => bio.end(Ok(())),
            _ => bio.end(Err(EIO)),
        }
    }

    fn inflight(&self) -> Option<&InflightRefs> {
        Some(&self.inner.refs)
    }

    fn status(&self, kind: StatusType, out: &mut Emit<'_>) {
        let _ = match kind {
            StatusType::Table => {
                let v = self.inner.status.lock();
                write!(out, "{} v{} {}", v.images, v.top.0, v.top.1)
            }
            StatusType::Info => self.status_info(out),
            StatusType::Ima => Ok(()),
        };
    }

    fn message(&self, args: &[&CStr], out: &mut Emit<'_>) -> Result {
        self.handle_message(args, out)
    }

    fn presuspend(&self) {
        self.suspend_begin()
    }

    fn presuspend_undo(&self) {
        self.suspend_undo()
    }

    fn postsuspend(&self) {
        self.suspend_end()
    }

    fn preresume(&self) -> Result {
        self.resume_begin()
    }

    fn resume(&self) {
        self.resume_end()
    }

    fn wants_nospc(&self) -> bool {
        self.inner.writable && !self.inner.suspending.load(Ordering::Acquire)
    }

    fn sync_after(&self, bio: Bio) {
        // Once pushed, a running pass may end the bio, and the table be
        // destroyed, before the enqueue: the queues' shutdown (in `drop`)
        // waits for this section. A completion in process context (a host
        // file system's end-I/O work) is in none of its own.
        wq::rcu_read(|| {
            let inner = &self.inner;
            inner.fua_landed.push(bio);
            // Already queued: the pending pass takes the bio.
            self.lanes.queue_sync(inner);
        })
    }

    fn park_nospc(&self, bio: Bio) {
        // As in `sync_after`: the worker may end the bio before the enqueue.
        wq::rcu_read(|| {
            let inner = &self.inner;
            inner.parked_count.fetch_add(1, Ordering::AcqRel);
            inner.late_nospc.push(bio);
            // Already queued: the running or pending pass will see the bio.
            let _ = inner.wq.enqueue::<_, 0>(inner.clone());
        })
    }

    fn io_hints(&self, limits: &mut QueueLimits<'_>) {
        let st = self.inner.lock_state();
        // The strictest of the devices under the image files.
        let strictest =
            |f: fn(&File) -> u32| st.deltas.iter().map(|d| f(&d.file)).max().unwrap_or(0);
        let lbs = strictest(File::logical_block_size).clamp(SECTOR as u32, DIO_ALIGN as u32);
        let dma = strictest(File::dma_alignment).max(lbs - 1);
        limits.set_logical_block_size(lbs);
        limits.set_dma_alignment(dma);
        limits.set_physical_block_size(lbs);
        limits.set_io_min(lbs);
        if let Some(top) = st.deltas.last() {
            let cs = top.hdr.cluster_size() as u32;
            limits.set_io_opt(cs);
            if self.inner.writable {
                // Whole clusters are deallocated; we split bios ourselves.
                limits.set_discard(cs, u32::MAX >> 9);
                limits.set_max_write_zeroes(u32::MAX >> 9);
            } else {
                limits.set_discard(0, 0);
                limits.set_max_write_zeroes(0);
            }
        }
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        // Bios cannot be pending at destruction (device-mapper waits for them).
        // Stop the work items before the chain goes away; none of them may
        // hold the last reference to `inner` (we hold one until after this).
        // The retry and the walker first: the retry queues I/O work (on a
        // queue still alive); the I/O worker queues a retry only while bios
        // are parked, and none are now (then `retry_wq.enqueue` refuses).
        // The I/O worker arms the commit timer with the state locked: once
        // `no_timer` is seen it no longer does, and the timer's queue may go.
        self.inner.lock_state().no_timer = true;
        // The lanes first: they hand bios to the I/O worker.
        self.lanes.shutdown();
        self.inner.commit_wq.shutdown();
        self.inner.count_wq.shutdown();
        self.inner.retry_wq.shutdown();
        self.inner.merge_wq.shutdown();
        self.inner.wq.shutdown();
        // No trim here (postsuspend did it): after a reload the new table
        // is live on the same files before the old one is destroyed. For the
        // same reason nothing is written once the table was suspended (it
        // settled its metadata then); a table never suspended writes out
        // what it holds.
        let mut st = self.inner.lock_state();
        if !st.stale {
            if let Err(e) = self.inner.settle(&mut st) {
                pr_err!("dm-qcow2: metadata writeback failed: {:?}\n", e);
            }
        }
        self.sync(&st);
    }
}
