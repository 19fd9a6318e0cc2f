// SPDX-License-Identifier: GPL-2.0

//! The `qcow2` target: constructor checks, the table's state and worker,
//! suspend/resume, status and messages. The I/O path is in `io`, merges in
//! `merge`.

use crate::kx::bio::{Bio, BioList, BioStack, Op};
use crate::kx::dm::{self, CtrError, Emit, QueueLimits, StatusType, TargetCtr, TargetLink};
use crate::kx::file::{File, IoBuf, IoCounter, DIO_ALIGN};
use crate::kx::inflight::InflightRefs;
use crate::kx::param;
use crate::kx::task::{self, code::{ebadslt, eopnotsupp, euclean}};
use crate::kx::wq::OwnedQueue;
use crate::kx::zlib::Inflater;
use crate::count;
use crate::hot::Fast;
use crate::merge::{self, Dir, Merge};
use crate::meta::DeltaMd;
use crate::qcow2_format::{self as fmt, FormatError, Header};
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
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
const COMMIT_SLICES: u32 = 10;
/// qcow2 compatible feature bit 0: refcounts may be updated lazily.
const COMPAT_LAZY_REFCOUNTS: u64 = 1;
/// Header offsets of the v3 feature words.
const HDR_INCOMPAT: usize = 72;
const HDR_AUTOCLEAR: usize = 88;

fn ctr_err(err: Error, msg: &'static CStr) -> CtrError {
    CtrError::new(err, msg)
}

fn oom<E>(_: E) -> CtrError {
    ctr_err(ENOMEM, c_str!("Out of memory"))
}

fn fmt_err(e: FormatError) -> CtrError {
    let err = Error::from_errno(-e.errno());
    match CStr::from_bytes_with_nul(e.msg_with_nul().as_bytes()) {
        Ok(msg) => CtrError::new(err, msg),
        Err(_) => CtrError::new(err, c_str!("Bad image")),
    }
}

/// One image of the chain: its file and header (metadata lives in `DeltaMd`).
pub(crate) struct Delta {
    pub(crate) file: File,
    pub(crate) hdr: Header,
}

impl Delta {
    fn open(fd_arg: &CStr, is_top: bool, writable: bool) -> Result<Self, CtrError> {
        let fd = fd_arg
            .to_str()
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
            .ok_or_else(|| ctr_err(EINVAL, c_str!("Wrong fd")))?;
        // As the C target: a number that is no open descriptor is ENOENT.
        let file = File::fget(fd).map_err(|_| ctr_err(ENOENT, c_str!("Error attaching file")))?;
        if !file.is_regular() {
            return Err(ctr_err(EINVAL, c_str!("Not a regular file")));
        }
        // Descriptors opened without O_DIRECT are fine (the vendor's helper
        // script opens images with a plain `exec {fd}<>`, as the C target
        // allows): every request sets IOCB_DIRECT itself, and direct I/O
        // writes back and invalidates page-cache pages of its range first.
        if !file.can_direct_io() {
            return Err(ctr_err(EINVAL, c_str!("File system cannot do direct I/O")));
        }
        // Writes would land at the end of the file, wherever they were meant
        // to go (our own I/O ignores the flag, but the file is shared).
        if file.is_append() {
            return Err(ctr_err(EINVAL, c_str!("Image opened with O_APPEND")));
        }
        if !file.readable() {
            return Err(ctr_err(EACCES, c_str!("Image is not opened for reading")));
        }
        if is_top && writable && !file.writable() {
            return Err(ctr_err(EACCES, c_str!("Top image is not opened for writing")));
        }

        let hdr = Self::read_header(&file, is_top && writable)?;
        Ok(Self { file, hdr })
    }

    /// Reads and checks the header of `file` (`rw`: the image takes writes).
    pub(crate) fn read_header(file: &File, rw: bool) -> Result<Header, CtrError> {
        let mut buf = IoBuf::new(Header::MIN_READ).map_err(|e| ctr_err(e, c_str!("Out of memory")))?;
        let n = file
            .read_at(&mut buf, 0)
            .map_err(|e| ctr_err(e, c_str!("Cannot read image header")))?;
        // Only what was read: a truncated header must fail as such.
        let hdr = Header::parse(buf.get(..n).unwrap_or(&[])).map_err(fmt_err)?;
        if u64::from(hdr.cluster_bits) < u64::from(kernel::bindings::PAGE_SHIFT) {
            return Err(ctr_err(eopnotsupp(), c_str!("Cluster size below PAGE_SIZE")));
        }
        // O_DIRECT cannot address less than the host's logical block.
        if hdr.subcluster_size() < u64::from(file.logical_block_size()) {
            return Err(ctr_err(
                eopnotsupp(),
                c_str!("Subclusters smaller than the host's logical block size"),
            ));
        }
        if file.size() > hdr.max_file_size() {
            return Err(ctr_err(EFBIG, c_str!("File larger than its refcount table describes")));
        }
        // Lazy refcounts left dirty by a crash are stale: allocating from them
        // could hand out clusters in use.
        if rw
            && hdr.incompatible_features & fmt::incompat::DIRTY != 0
            && hdr.compatible_features & COMPAT_LAZY_REFCOUNTS != 0
        {
            return Err(ctr_err(EINVAL, c_str!("Image is dirty: repair it with qemu-img check -r all")));
        }
        Ok(hdr)
    }
}

/// State only the worker (and control paths, with it locked) touches.
pub(crate) struct WorkerState {
    /// Base first: index == img_id. Changed only by a merge's `complete`.
    pub(crate) deltas: KVec<Arc<Delta>>,
    /// Index == img_id.
    pub(crate) md: KVec<DeltaMd>,
    /// A cluster-sized buffer for copy-on-write (taken while in use).
    pub(crate) cow: Option<IoBuf>,
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
        let zin_len = cs.checked_mul(2).and_then(|n| n.checked_add(2 * DIO_ALIGN)).ok_or(ENOMEM)?;
        Ok(Self { cow: IoBuf::new(cs)?, zin: IoBuf::new(zin_len)?, zout: IoBuf::new(cs)? })
    }

    /// Whether the buffers of `st` are sized for clusters of `cs` bytes.
    fn fit(st: &WorkerState, cs: usize) -> bool {
        st.cow.as_ref().map(|b| b.len()) == Some(cs) && st.zout.len() == cs
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
    /// The fast path (see `hot`) while it is on (not during merges); the
    /// worker's copy of `WorkerState::fast`.
    #[pin]
    fast: SpinLock<Option<Arc<Fast>>>,
    #[pin]
    pending: SpinLock<BioList>,
    #[pin]
    pub(crate) state: Mutex<WorkerState>,
    #[pin]
    work: Work<Inner, 0>,
    #[pin]
    merge_work: Work<Inner, 1>,
    #[pin]
    retry_work: Work<Inner, 2>,
    #[pin]
    commit_work: Work<Inner, 3>,
}

impl_has_work! {
    impl HasWork<Self, 0> for Inner { self.work }
    impl HasWork<Self, 1> for Inner { self.merge_work }
    impl HasWork<Self, 2> for Inner { self.retry_work }
    impl HasWork<Self, 3> for Inner { self.commit_work }
}

/// The I/O worker: processes queued bios.
impl WorkItem<0> for Inner {
    type Pointer = Arc<Inner>;

    fn run(this: Arc<Inner>) {
        let _noio = task::NoIo::enter();
        let mut parked = false;
        let mut locked = false;
        loop {
            loop {
                let late = this.late_nospc.take();
                if !late.is_empty() {
                    locked = true;
                    let mut st = this.state.lock();
                    parked |= this.park_late(&mut st, late);
                }
                let mut list = this.pending.lock().take();
                if list.is_empty() {
                    if this.commit_due.load(Ordering::Acquire) {
                        locked = true;
                        let mut st = this.state.lock();
                        parked |= this.sync_batch(&mut st);
                    }
                    break;
                }
                // Taken after the bios: a merge that turned the fast path off
                // before they were mapped is seen.
                let fp = this.fast.lock().clone();
                let mut slow = BioList::new();
                let mut fast = 0;
                while let Some(bio) = list.pop() {
                    let bio = match &fp {
                        Some(f) => match this.try_fast(f, bio) {
                            Ok(()) => {
                                fast += 1;
                                continue;
                            }
                            Err(bio) => bio,
                        },
                        None => bio,
                    };
                    slow.push(bio);
                }
                if fast > 0 {
                    this.fast_bios.fetch_add(fast, Ordering::Relaxed);
                }
                if slow.is_empty() {
                    continue;
                }
                locked = true;
                let mut st = this.state.lock();
                while let Some(bio) = slow.pop() {
                    parked |= this.process(&mut st, bio);
                }
                parked |= this.sync_batch(&mut st);
                // A merge waiting in `ready` copies what was written since
                // in the background (bounded redo set).
                if st.merge.as_mut().is_some_and(|m| core::mem::take(&mut m.redo_kick)) {
                    drop(st);
                    this.kick_merge();
                }
            }
            // Retried writes whose I/O is still in flight may come back with
            // ENOSPC (`late_nospc`): during an episode, wait for them before
            // deciding below whether it is over.
            if this.enospc_episode.load(Ordering::Acquire) {
                this.inflight.wait_idle();
                if !this.late_nospc.is_empty() {
                    continue;
                }
            }
            break;
        }
        // An episode ends when nothing is left parked, also when the retried
        // bios all took the fast path.
        if locked || this.enospc_episode.load(Ordering::Acquire) {
            let st = this.state.lock();
            if st.parked.is_empty() {
                this.enospc_episode.store(false, Ordering::Release);
            } else if let Some(q) = this.retry_wq.queue() {
                let _ = q.enqueue::<_, 2>(this.clone());
            }
        }
        if parked {
            this.link.table_event();
        }
    }
}

/// The merge walker.
impl WorkItem<1> for Inner {
    type Pointer = Arc<Inner>;

    fn run(this: Arc<Inner>) {
        let _noio = task::NoIo::enter();
        this.merge_run();
    }
}

/// The periodic commit: metadata changed by writes that did not wait for a
/// commit (all but flushes and FUA) is written out within about
/// `COMMIT_SLICES` tenths of a second, like dm-thin's commit period.
impl WorkItem<3> for Inner {
    type Pointer = Arc<Inner>;

    fn run(this: Arc<Inner>) {
        for _ in 0..COMMIT_SLICES {
            if this.suspending.load(Ordering::Acquire) {
                break;
            }
            task::sleep_ms(100);
        }
        this.commit_armed.store(false, Ordering::Release);
        this.commit_due.store(true, Ordering::Release);
        if let Some(q) = this.wq.queue() {
            let _ = q.enqueue::<_, 0>(this.clone());
        }
    }
}

/// Retries parked writes after a while.
impl WorkItem<2> for Inner {
    type Pointer = Arc<Inner>;

    fn run(this: Arc<Inner>) {
        // In slices, so that a suspend does not wait for the whole interval.
        for _ in 0..param::enospc_retry_ms().div_ceil(100) {
            if this.suspending.load(Ordering::Acquire) {
                break;
            }
            task::sleep_ms(100);
        }
        this.retry_round.fetch_add(1, Ordering::AcqRel);
        this.unpark();
    }
}

impl Inner {
    /// Starts the I/O of `bio` if it lies in one cluster of the top that
    /// `fp` knows (a write needs one the top owns); gives it back otherwise.
    fn try_fast(&self, fp: &Fast, bio: Bio) -> Result<(), Bio> {
        let write = match bio.op() {
            Op::Read => false,
            Op::Write if self.writable && !bio.is_preflush() && !bio.is_fua() => true,
            _ => return Err(bio),
        };
        let top = &fp.top;
        let hdr = &top.hdr;
        let len = bio.size();
        let cb = hdr.cluster_bits;
        let Some(vaddr) = bio.sector().checked_mul(SECTOR) else {
            return Err(bio);
        };
        let end = vaddr.saturating_add(u64::from(len));
        if len == 0 || hdr.extended_l2() || end > hdr.size || vaddr >> cb != (end - 1) >> cb {
            return Err(bio);
        }
        match fp.map.lookup(cb, vaddr >> cb, write) {
            Some(host) => {
                let pos = host + hdr.offset_in_cluster(vaddr);
                top.file.submit_bio_io(bio, 0, len, pos, false, &self.inflight);
                Ok(())
            }
            None => Err(bio),
        }
    }

    /// Turns the fast path off: every bio goes through the locked path.
    /// Bios the worker already took may still use it: callers that need
    /// them gone wait for the bios mapped before (`refs.switch_wait`).
    pub(crate) fn fast_off(&self, st: &mut WorkerState) {
        st.fast = None;
        let old = self.fast.lock().take();
        drop(old);
    }

    /// Turns the fast path on for the chain in `st` (unless a merge runs)
    /// with a new, empty table; it stays off if that cannot be allocated.
    pub(crate) fn fast_on(&self, st: &mut WorkerState) {
        let new = match (&st.merge, st.deltas.last()) {
            (None, Some(top)) => Fast::new(top.clone()).ok(),
            _ => None,
        };
        st.fast = new.clone();
        let old = core::mem::replace(&mut *self.fast.lock(), new);
        drop(old);
    }

    /// Ends `bio` with its result, or parks it on ENOSPC (returns true if
    /// that raises a table event, see `note_enospc`).
    fn process(&self, st: &mut WorkerState, bio: Bio) -> bool {
        let res = match bio.op() {
            Op::Read => self.read_bio(st, &bio).map(|()| false),
            Op::Write | Op::Flush if self.writable => self.write_bio(st, &bio),
            Op::Discard | Op::WriteZeroes if self.writable => self.zero_bio(st, &bio),
            _ => Err(EIO),
        };
        match res {
            // A flush, or a FUA write whose mapping must be durable before it
            // completes: one commit at the end of the batch covers them all.
            Ok(true) => {
                st.unsynced.push(bio);
                false
            }
            r => self.finish(st, bio, r.map(|_| ())),
        }
    }

    /// Notes that a write was parked on ENOSPC. The first of an episode,
    /// and the first after each retry, arms `get_event`'s `event_ENOSPC`;
    /// returns whether to raise a table event for it. (The C target raises
    /// one on every ENOSPC; once per retry keeps a daemon hearing while
    /// space is short, without a storm.)
    fn note_enospc(&self) -> bool {
        if !self.enospc_episode.swap(true, Ordering::AcqRel) {
            pr_warn!("dm-qcow2: no space left on the host file system: writes wait\n");
        }
        let round = self.retry_round.load(Ordering::Acquire);
        if self.event_round.swap(round, Ordering::AcqRel) == round {
            return false;
        }
        self.enospc_event.store(true, Ordering::Release);
        true
    }

    /// Ends `bio` with `res`, or parks it on ENOSPC (returns true if that
    /// raises a table event, see `note_enospc`).
    fn finish(&self, st: &mut WorkerState, bio: Bio, res: Result) -> bool {
        match res {
            // Not acknowledged: retried when there may be space again (what
            // was written of it so far is simply written again).
            Err(e) if e == ENOSPC && bio.op() != Op::Read && !self.suspending.load(Ordering::Acquire) => {
                self.parked_count.fetch_add(1, Ordering::AcqRel);
                st.parked.push(bio);
                self.note_enospc()
            }
            r => {
                bio.end(r);
                false
            }
        }
    }

    /// Parks the bios whose data I/O hit ENOSPC (`late_nospc`, counted in
    /// `parked_count` already); while suspending they go through the worker
    /// once more instead (and fail if there is still no space). Returns true
    /// if that raises a table event (`note_enospc`).
    fn park_late(&self, st: &mut WorkerState, mut late: BioList) -> bool {
        let mut new = false;
        while let Some(bio) = late.pop() {
            if self.suspending.load(Ordering::Acquire) {
                self.parked_count.fetch_sub(1, Ordering::AcqRel);
                self.pending.lock().push(bio);
                continue;
            }
            st.parked.push(bio);
            new |= self.note_enospc();
        }
        new
    }

    /// Ends the batch. If a bio waits for a commit (a flush, FUA), commits
    /// the metadata of every delta (so everything acknowledged so far is
    /// durable, in order, see `meta`), completes those bios, then applies
    /// the refcount decrements of removals the commit made durable. A failed
    /// commit fails the bios (or parks them on ENOSPC) and keeps the
    /// decrements queued. Otherwise commits only when the periodic commit is
    /// due or the queued decrements grew large, and arms the periodic
    /// commit while anything is left to write out. Returns true if parking a
    /// bio raises a table event (`note_enospc`).
    fn sync_batch(self: &Arc<Self>, st: &mut WorkerState) -> bool {
        let due = self.commit_due.swap(false, Ordering::AcqRel);
        if st.unsynced.is_empty() && !st.flush {
            // Not once suspended: the images are settled and may change.
            if !st.stale && (due || st.md.iter().any(|m| m.wants_commit())) {
                let _ = self.commit_all(st, false);
                self.apply_frees(st);
            }
            self.arm_commit(st);
            return false;
        }
        let flush = core::mem::replace(&mut st.flush, false);
        // The bios changed the top only; a merge's receiving delta failing
        // its commit fails the merge instead.
        let (res, _) = self.commit_all(st, flush);
        let mut list = st.unsynced.take();
        let mut parked = false;
        while let Some(bio) = list.pop() {
            parked |= self.finish(st, bio, res);
        }
        self.apply_frees(st);
        self.arm_commit(st);
        parked
    }

    /// Starts the periodic commit's timer if the cache holds anything not
    /// written out yet (and the timer is not running).
    fn arm_commit(self: &Arc<Self>, st: &WorkerState) {
        if st.stale || st.no_timer || !st.md.iter().any(|m| m.is_dirty() || m.has_frees()) {
            return;
        }
        if self.commit_armed.swap(true, Ordering::AcqRel) {
            return;
        }
        let queued = self.commit_wq.queue().is_some_and(|q| q.enqueue::<_, 3>(self.clone()).is_ok());
        if !queued {
            self.commit_armed.store(false, Ordering::Release);
        }
    }

    /// Commits the dirty metadata of every delta (`flush`: fsync the top in
    /// any case). Returns the top's result and the first error of any. On
    /// error the cache keeps what is not durable as dirty (the next commit
    /// writes it again) and the error is recorded; an error other than
    /// ENOSPC latches wants_check (the image may keep refcounts of
    /// references that never became durable: leaks); a merge whose
    /// receiving delta (not the top) failed fails.
    pub(crate) fn commit_all(&self, st: &mut WorkerState, flush: bool) -> (Result, Result) {
        let top = st.top();
        let (mut top_res, mut all) = (Ok(()), Ok(()));
        for d in 0..st.md.len() {
            let Ok(delta) = st.delta(d) else { break };
            let Some(md) = st.md.get_mut(d) else { break };
            let force = flush && d == top;
            if !force && !md.is_dirty() {
                continue;
            }
            let Err(e) = md.commit(&delta.file, force) else {
                continue;
            };
            pr_err!("dm-qcow2: image {}: metadata commit failed: {:?}\n", d, e);
            self.md_error(e);
            if e != ENOSPC {
                self.latch_wants_check();
            }
            if all.is_ok() {
                all = Err(e);
            }
            if d == top {
                top_res = Err(e);
            } else if let Some(m) = st.merge.as_mut().filter(|m| m.dst == d) {
                m.fail(e);
            }
        }
        (top_res, all)
    }

    /// Applies the refcount decrements whose references' removal a commit
    /// made durable. I/O in flight to the clusters (started before their
    /// mapping changed) lands first.
    pub(crate) fn apply_frees(&self, st: &mut WorkerState) {
        if !st.md.iter().any(|m| m.has_ready_frees()) {
            return;
        }
        self.inflight.wait_idle();
        for d in 0..st.md.len() {
            let Ok(delta) = st.delta(d) else { break };
            let Some(md) = st.md.get_mut(d) else { break };
            if let Err(e) = md.apply_frees(&delta.file, &delta.hdr) {
                pr_err!("dm-qcow2: image {}: refcount update failed ({:?}): wants_check\n", d, e);
                self.latch_wants_check();
            }
        }
    }

    /// Commits, applies the queued decrements and commits them too: the
    /// images then hold exactly what the cache does (before a header change,
    /// a trim, a suspend).
    pub(crate) fn settle(&self, st: &mut WorkerState) -> Result {
        self.commit_all(st, false).1?;
        self.apply_frees(st);
        self.commit_all(st, false).1
    }

    fn queue(self: &Arc<Self>, bio: Bio) {
        self.pending.lock().push(bio);
        if let Some(q) = self.wq.queue() {
            // Already queued: the running or pending pass will see the bio.
            let _ = q.enqueue::<_, 0>(self.clone());
        }
    }

    /// Queues the parked bios again.
    fn unpark(self: &Arc<Self>) {
        let mut parked = self.state.lock().parked.take();
        let mut n = 0;
        {
            let mut pending = self.pending.lock();
            while let Some(bio) = parked.pop() {
                pending.push(bio);
                n += 1;
            }
        }
        if n > 0 {
            self.parked_count.fetch_sub(n, Ordering::AcqRel);
            if let Some(q) = self.wq.queue() {
                let _ = q.enqueue::<_, 0>(self.clone());
            }
        }
    }

    /// Starts the merge walker (if it is not queued already).
    pub(crate) fn kick_merge(self: &Arc<Self>) {
        if let Some(q) = self.merge_wq.queue() {
            let _ = q.enqueue::<_, 1>(self.clone());
        }
    }

    /// A suspend is under way (or done): no background copying.
    pub(crate) fn is_suspending(&self) -> bool {
        self.suspending.load(Ordering::Acquire)
    }

    /// Writes wait for space: an in-flight switch would wait for them.
    pub(crate) fn has_parked(&self) -> bool {
        self.parked_count.load(Ordering::Acquire) != 0
    }

    /// Records an L1/L2 writeback error. Not ENOSPC: writes that hit it
    /// wait for space and are retried (see "Running out of space").
    pub(crate) fn md_error(&self, e: Error) -> Error {
        if e != ENOSPC {
            self.errors.md_writeback.store(-e.to_errno(), Ordering::Relaxed);
        }
        e
    }

    /// The images need `qemu-img check` before this table may run again:
    /// a refcount update, a metadata writeback or a truncate failed (the C
    /// target's wants_check).
    pub(crate) fn wants_check(&self) -> bool {
        let e = &self.errors;
        e.wants_check.load(Ordering::Acquire)
            || e.md_writeback.load(Ordering::Relaxed) != 0
            || e.truncate.load(Ordering::Relaxed) != 0
    }

    pub(crate) fn latch_wants_check(&self) {
        self.errors.wants_check.store(true, Ordering::Release);
    }

    /// Rewrites the header of `delta`: autoclear bits cleared (we do not keep
    /// what they vouch for, e.g. bitmaps, up to date) and the dirty bit set
    /// or cleared if asked. v2 headers have neither.
    fn update_header(&self, delta: &Delta, dirty: Option<bool>) -> Result {
        if delta.hdr.version < 3 {
            return Ok(());
        }
        let mut page = IoBuf::new(DIO_ALIGN)?;
        delta.file.read_full(&mut page, 0)?;
        let mut incompat = be_u64(&page, HDR_INCOMPAT)?;
        match dirty {
            Some(true) => incompat |= fmt::incompat::DIRTY,
            Some(false) => incompat &= !fmt::incompat::DIRTY,
            None => {}
        }
        if incompat == be_u64(&page, HDR_INCOMPAT)? && be_u64(&page, HDR_AUTOCLEAR)? == 0 {
            return Ok(());
        }
        page.get_mut(HDR_INCOMPAT..HDR_INCOMPAT + 8).ok_or(EIO)?.copy_from_slice(&incompat.to_be_bytes());
        page.get_mut(HDR_AUTOCLEAR..HDR_AUTOCLEAR + 8).ok_or(EIO)?.fill(0);
        delta.file.write_full(&page, 0)?;
        delta.file.fsync()
    }

    /// Sets or clears the dirty bit of `delta` (v3).
    pub(crate) fn set_dirty(&self, delta: &Delta, dirty: bool) -> Result {
        self.update_header(delta, Some(dirty))
    }

    /// Sets the qcow2 "corrupt" incompatible bit of `delta` (v3; v2 has
    /// none): QEMU then opens it only to repair it, and so do we.
    pub(crate) fn mark_corrupt(&self, delta: &Delta) -> Result {
        if delta.hdr.version < 3 {
            return Ok(());
        }
        let mut page = IoBuf::new(DIO_ALIGN)?;
        delta.file.read_full(&mut page, 0)?;
        let incompat = be_u64(&page, HDR_INCOMPAT)? | fmt::incompat::CORRUPT;
        page.get_mut(HDR_INCOMPAT..HDR_INCOMPAT + 8).ok_or(EIO)?.copy_from_slice(&incompat.to_be_bytes());
        delta.file.write_full(&page, 0)?;
        delta.file.fsync()
    }

    /// Makes `delta` name no backing file (it became the base).
    pub(crate) fn clear_backing(&self, delta: &Delta) -> Result {
        if !delta.hdr.has_backing_file() {
            return Ok(());
        }
        let mut page = IoBuf::new(DIO_ALIGN)?;
        delta.file.read_full(&mut page, 0)?;
        page.get_mut(HDR_BACKING..HDR_BACKING + 12).ok_or(EIO)?.fill(0);
        delta.file.write_full(&page, 0)?;
        delta.file.fsync()
    }

    /// Truncates delta `d`'s file after its last used cluster (it grows in
    /// steps). Not when refcounts may be wrong.
    pub(crate) fn trim(&self, st: &mut WorkerState, d: usize) {
        if self.wants_check() {
            return;
        }
        let (Ok(delta), Some(md)) = (st.delta(d), st.md.get_mut(d)) else {
            return;
        };
        if let Err(e) = md.trim(&delta.file, &delta.hdr) {
            pr_err!("dm-qcow2: image {}: truncate failed: {:?}\n", d, e);
            self.errors.truncate.store(-e.to_errno(), Ordering::Relaxed);
        }
    }

    /// Re-reads every header and drops all cached metadata: userspace may
    /// have changed the images while we were suspended.
    fn reload(&self, st: &mut WorkerState) -> Result {
        self.fast_off(st);
        let n = st.deltas.len();
        let mut deltas = KVec::with_capacity(n, GFP_KERNEL)?;
        let mut md = KVec::with_capacity(n, GFP_KERNEL)?;
        for (i, old) in st.deltas.iter().enumerate() {
            let rw = self.writable && i + 1 == n;
            let hdr = Delta::read_header(&old.file, rw).map_err(|e| {
                pr_err!("dm-qcow2: image {}: {}\n", i, e.msg.to_str().unwrap_or("bad header"));
                e.err
            })?;
            deltas.push(Delta { file: old.file.try_clone(), hdr }, GFP_KERNEL)?;
        }
        Qcow2::check_chain(&deltas, self.len_sectors).map_err(|e| {
            pr_err!("dm-qcow2: {}\n", e.msg.to_str().unwrap_or("bad chain"));
            e.err
        })?;
        for (i, d) in deltas.iter().enumerate() {
            // Fault injection settings survive the reload.
            if let Some(old) = st.deltas.get(i) {
                let _ = d.file.set_fault_ratio(old.file.fault_ratio());
            }
            let rw = self.writable && i + 1 == n;
            let mut m = DeltaMd::load(i, &d.file, &d.hdr, rw, self.inflight.clone())?;
            // The first-fit search goes on where it was (not from cluster 1
            // again, a walk over every used cluster with the state locked),
            // if the image still has the cluster size the position counts in.
            if let (Some(old), Some(old_md)) = (st.deltas.get(i), st.md.get(i)) {
                if old.hdr.cluster_size() == d.hdr.cluster_size() {
                    m.resume_search_at(old_md.search_position(), d.file.size());
                }
            }
            md.push(m, GFP_KERNEL)?;
        }
        // The images may have been rewritten with another cluster size while
        // we were suspended (same files, other content): the buffers sized
        // for a cluster at ctr must follow, or copy-on-write would not fit.
        let cs = deltas.last().map_or(0, |d| d.hdr.cluster_size()) as usize;
        let bufs = if ClusterBufs::fit(st, cs) {
            None
        } else {
            let old = st.zout.len();
            pr_info!("dm-qcow2: cluster size changed from {} to {} bytes\n", old, cs);
            Some(ClusterBufs::new(cs).inspect_err(|_| {
                pr_err!("dm-qcow2: no memory for buffers of the new cluster size {}\n", cs);
            })?)
        };
        let mut arcs = KVec::with_capacity(n, GFP_KERNEL)?;
        for d in deltas {
            arcs.push(Arc::new(d, GFP_KERNEL)?, GFP_KERNEL)?;
        }
        st.deltas = arcs;
        st.md = md;
        st.zkey = None;
        if let Some(b) = bufs {
            st.cow = Some(b.cow);
            st.zin = b.zin;
            st.zout = b.zout;
        }
        self.fast_on(st);
        Ok(())
    }
}

fn be_u64(p: &[u8], at: usize) -> Result<u64> {
    let mut b = [0u8; 8];
    b.copy_from_slice(p.get(at..at + 8).ok_or(EIO)?);
    Ok(u64::from_be_bytes(b))
}

/// Per-table state kept in `ti->private`.
pub(crate) struct Qcow2 {
    inner: Arc<Inner>,
}

impl Qcow2 {
    /// Makes everything written durable: the top (read-write tables) and a
    /// merge's receiving delta.
    fn sync(&self, st: &WorkerState) {
        let mut targets = [None, None];
        if self.inner.writable {
            targets[0] = Some(st.top());
        }
        targets[1] = st.merge.as_ref().map(|m| m.dst);
        for d in targets.into_iter().flatten() {
            if let Some(delta) = st.deltas.get(d) {
                if let Err(e) = delta.file.fsync() {
                    pr_err!("dm-qcow2: fsync of image {} failed: {:?}\n", d, e);
                }
            }
        }
    }

    fn check_chain(deltas: &[Delta], len_sectors: u64) -> Result<(), CtrError> {
        let base = deltas.first().ok_or_else(|| ctr_err(EINVAL, c_str!("No images given")))?;
        if base.hdr.has_backing_file() {
            return Err(ctr_err(ENOENT, c_str!("Base image has a backing file")));
        }
        for pair in deltas.windows(2) {
            let (lo, up) = (&pair[0].hdr, &pair[1].hdr);
            if lo.cluster_bits != up.cluster_bits {
                return Err(ctr_err(EXDEV, c_str!("Deltas differ in cluster size")));
            }
            if lo.extended_l2() != up.extended_l2() {
                return Err(ctr_err(EXDEV, c_str!("Deltas differ in extended L2")));
            }
            if lo.size > up.size {
                return Err(ctr_err(ebadslt(), c_str!("Lower delta larger than the one above it")));
            }
        }
        let top = deltas.last().ok_or_else(|| ctr_err(EINVAL, c_str!("No images given")))?;
        if len_sectors.checked_mul(SECTOR).map_or(true, |l| l > top.hdr.size) {
            return Err(ctr_err(ebadslt(), c_str!("Top image smaller than the table")));
        }
        Ok(())
    }

    /// Completes the allocated-cluster count of every delta that needs it
    /// (the first status after a load of the metadata), a batch at a time,
    /// with the state unlocked in between; returns with it locked.
    fn count_clusters(&self) -> Guard<'_, WorkerState, MutexBackend> {
        let inner = &self.inner;
        let mut st = inner.state.lock();
        for md in st.md.iter_mut() {
            md.count.failed = false;
        }
        loop {
            // Deltas may change while unlocked (a merge completes): look again.
            let next = (0..st.deltas.len()).find(|&i| {
                let (Some(d), Some(md)) = (st.deltas.get(i), st.md.get(i)) else {
                    return false;
                };
                !md.count.failed && md.count.value(&d.hdr).is_none()
            });
            let Some(i) = next else {
                return st;
            };
            if let (Ok(d), Some(md)) = (st.delta(i), st.md.get_mut(i)) {
                if count::step(md, &d.file, &d.hdr, count::BATCH_ENTRIES).is_err() {
                    md.count.failed = true;
                }
            }
            drop(st);
            task::cond_resched();
            st = inner.state.lock();
        }
    }

    fn status_info(&self, out: &mut Emit<'_>) -> core::fmt::Result {
        let inner = &self.inner;
        let e = &inner.errors;
        let st = self.count_clusters();
        write!(
            out,
            "images={} wants_check={} md_writeback_error={} truncate_error={} enospc={} ",
            st.deltas.len(),
            u8::from(inner.wants_check()),
            e.md_writeback.load(Ordering::Relaxed),
            e.truncate.load(Ordering::Relaxed),
            inner.parked_count.load(Ordering::Acquire),
        )?;
        merge::describe(st.merge.as_ref(), out)?;
        write!(out, " clusters=")?;
        for (i, d) in st.deltas.iter().enumerate() {
            // O(1): counted when the metadata was loaded, kept up to date since.
            let n = st.md.get(i).and_then(|md| md.count.value(&d.hdr));
            if i > 0 {
                write!(out, ",")?;
            }
            match n {
                Some(n) => write!(out, "{}", n)?,
                None => write!(out, "?")?,
            }
        }
        write!(out, " fast_bios={}", inner.fast_bios.load(Ordering::Relaxed))
    }
}

/// Parses message argument `i` as a decimal number of type `T`. Every
/// message argument is untrusted: a missing word, anything but digits (with
/// an optional sign where `T` has one) or a value outside `T`'s range is
/// EINVAL. The parse itself cannot overflow (`FromStr` checks), and callers
/// range-check the value without arithmetic that can.
fn arg<T: core::str::FromStr>(args: &[&CStr], i: usize) -> Result<T> {
    args.get(i)
        .and_then(|a| a.to_str().ok())
        .and_then(|s| s.parse::<T>().ok())
        .ok_or(EINVAL)
}

/// The message has exactly `n` words (the command included): extra
/// arguments are refused, not ignored.
fn arity(args: &[&CStr], n: usize) -> Result {
    if args.len() == n {
        Ok(())
    } else {
        Err(EINVAL)
    }
}

impl dm::Target for Qcow2 {
    const NAME: &'static CStr = c_str!("qcow2");
    const VERSION: [u32; 3] = [1, 1, 0];
    const FEATURES: u64 = dm::features::SINGLETON;

    fn ctr(ti: &mut TargetCtr<'_>, args: &[&CStr]) -> Result<KBox<Self>, CtrError> {
        if args.is_empty() {
            return Err(ctr_err(EINVAL, c_str!("No images given")));
        }
        if ti.begin() != 0 {
            return Err(ctr_err(EINVAL, c_str!("Target must start at sector 0")));
        }
        let writable = ti.table_writable();
        let mut deltas = KVec::with_capacity(args.len(), GFP_KERNEL).map_err(oom)?;
        for (i, a) in args.iter().enumerate() {
            let d = Delta::open(a, i + 1 == args.len(), writable)?;
            // One file twice in the chain would be written as the top and
            // read as a lower delta (or merged into itself): refuse it, also
            // through another fd, path or hard link.
            if deltas.iter().any(|o: &Delta| o.file.same_file(&d.file)) {
                return Err(ctr_err(EINVAL, c_str!("Same image file given twice in the chain")));
            }
            deltas.push(d, GFP_KERNEL).map_err(oom)?;
        }
        Self::check_chain(&deltas, ti.len())?;

        let cs = deltas.last().map_or(0, |d| d.hdr.cluster_size()) as usize;
        let bufs = ClusterBufs::new(cs).map_err(oom)?;
        let inflight = IoCounter::new().map_err(oom)?;
        let mut md = KVec::with_capacity(deltas.len(), GFP_KERNEL).map_err(oom)?;
        for (i, d) in deltas.iter().enumerate() {
            let rw = writable && i + 1 == deltas.len();
            let m = DeltaMd::load(i, &d.file, &d.hdr, rw, inflight.clone()).map_err(|e| {
                if e == euclean() {
                    ctr_err(e, c_str!("Metadata cluster with refcount 0: repair with qemu-img check -r all"))
                } else {
                    ctr_err(e, c_str!("Cannot read image metadata"))
                }
            })?;
            md.push(m, GFP_KERNEL).map_err(oom)?;
        }
        let mut arcs = KVec::with_capacity(deltas.len(), GFP_KERNEL).map_err(oom)?;
        for d in deltas {
            arcs.push(Arc::new(d, GFP_KERNEL).map_err(oom)?, GFP_KERNEL).map_err(oom)?;
        }
        let st = WorkerState {
            deltas: arcs,
            md,
            cow: Some(bufs.cow),
            inflater: Inflater::new().map_err(oom)?,
            zin: bufs.zin,
            zout: bufs.zout,
            zkey: None,
            merge: None,
            parked: BioList::new(),
            unsynced: BioList::new(),
            flush: false,
            // A reloaded table is built while the old one still writes the
            // same files: read them again when it is resumed.
            stale: true,
            // Turned on by that first resume.
            fast: None,
            no_timer: false,
        };
        let refs = InflightRefs::new().map_err(oom)?;
        let wq = OwnedQueue::new(c_str!("dm-qcow2"), true).map_err(oom)?;
        let retry_wq = OwnedQueue::new(c_str!("dm-qcow2-retry"), true).map_err(oom)?;
        let merge_wq = OwnedQueue::new(c_str!("dm-qcow2-merge"), false).map_err(oom)?;
        let commit_wq = OwnedQueue::new(c_str!("dm-qcow2-commit"), false).map_err(oom)?;
        let (len_sectors, link) = (ti.len(), ti.link());
        let inner = Arc::pin_init(
            pin_init!(Inner {
                writable,
                len_sectors,
                inflight,
                refs,
                link,
                wq,
                retry_wq,
                merge_wq,
                commit_wq,
                commit_armed: AtomicBool::new(false),
                commit_due: AtomicBool::new(false),
                errors: Errors::default(),
                enospc_event: AtomicBool::new(false),
                parked_count: AtomicUsize::new(0),
                late_nospc: BioStack::new(),
                enospc_episode: AtomicBool::new(false),
                retry_round: AtomicU64::new(0),
                event_round: AtomicU64::new(u64::MAX),
                suspending: AtomicBool::new(false),
                fast_bios: AtomicU64::new(0),
                fast <- new_spinlock!(None, "dm_qcow2::fast"),
                pending <- new_spinlock!(BioList::new(), "dm_qcow2::pending"),
                state <- new_mutex!(st, "dm_qcow2::state"),
                work <- new_work!("dm_qcow2::work"),
                merge_work <- new_work!("dm_qcow2::merge_work"),
                retry_work <- new_work!("dm_qcow2::retry_work"),
                commit_work <- new_work!("dm_qcow2::commit_work"),
            }),
            GFP_KERNEL,
        )
        .map_err(|e| ctr_err(e, c_str!("Out of memory")))?;

        ti.set_num_flush_bios(1);
        ti.set_flush_supported(true);
        if writable {
            ti.set_num_discard_bios(1);
            ti.set_discards_supported(true);
            ti.set_num_write_zeroes_bios(1);
        }
        KBox::new(Self { inner }, GFP_KERNEL).map_err(oom)
    }

    fn map(&self, bio: Bio) {
        match bio.op() {
            Op::Read if bio.size() > 0 => self.inner.queue(bio),
            Op::Write | Op::Flush | Op::Discard | Op::WriteZeroes if self.inner.writable => self.inner.queue(bio),
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
                let st = self.inner.state.lock();
                match st.deltas.last() {
                    Some(top) => write!(
                        out,
                        "{} v{} {}",
                        st.deltas.len(),
                        top.hdr.version,
                        top.hdr.cluster_size() / SECTOR
                    ),
                    None => Ok(()),
                }
            }
            StatusType::Info => self.status_info(out),
            StatusType::Ima => Ok(()),
        };
    }

    fn message(&self, args: &[&CStr], out: &mut Emit<'_>) -> Result {
        if !task::capable_sys_admin() {
            return Err(EPERM);
        }
        let inner = &self.inner;
        let cmd = args.first().ok_or(EINVAL)?.as_bytes();
        let suspended = || inner.link.suspended();
        match cmd {
            b"get_img_name" | b"get_img_id" => {
                arity(args, 2)?;
                let id: usize = arg(args, 1)?;
                let d = inner.state.lock().delta(id).ok();
                if let Some(d) = d {
                    let mut buf = KVec::from_elem(0u8, 4096, GFP_KERNEL)?;
                    let p = d.file.path(&mut buf)?;
                    // No newline, as the C target (dmsetup adds one; ioctl
                    // users see the exact path).
                    let _ = write!(out, "{}", core::str::from_utf8(p).unwrap_or("?"));
                }
                Ok(())
            }
            b"get_img_fd" => {
                arity(args, 2)?;
                let id: usize = arg(args, 1)?;
                // An unknown id: empty output and success, as the C target.
                let d = inner.state.lock().delta(id).ok();
                if let Some(d) = d {
                    let fd = d.file.install_fd()?;
                    let _ = writeln!(out, "{}", fd);
                }
                Ok(())
            }
            b"get_errors" => {
                arity(args, 1)?;
                // Each 0 or 1, as the C target (the status line has the
                // errnos).
                let e = &inner.errors;
                let _ = write!(
                    out,
                    "wants_check={}\nmd_writeback_error={}\ntruncate_error={}\n",
                    u8::from(inner.wants_check()),
                    u8::from(e.md_writeback.load(Ordering::Relaxed) != 0),
                    u8::from(e.truncate.load(Ordering::Relaxed) != 0)
                );
                Ok(())
            }
            b"get_event" => {
                arity(args, 1)?;
                if inner.enospc_event.swap(false, Ordering::AcqRel) {
                    let _ = writeln!(out, "event_ENOSPC");
                }
                Ok(())
            }
            b"set_fault_injection" => {
                arity(args, 3)?;
                // Parsed (EINVAL) before the state is looked at.
                let id: usize = arg(args, 1)?;
                let ratio: u32 = arg(args, 2)?;
                // Allowed while suspended, as get_img_name (the C target).
                let d = inner.state.lock().delta(id).map_err(|_| ENOENT)?;
                d.file.set_fault_ratio(ratio)
            }
            b"merge_backward" | b"merge_forward" => {
                let dir = if cmd == b"merge_backward" { Dir::Backward } else { Dir::Forward };
                let sub = args.get(1).ok_or(EINVAL)?.as_bytes();
                match sub {
                    b"start" => {
                        if !(3..=4).contains(&args.len()) {
                            return Err(EINVAL);
                        }
                        // An fd is an int; a depth any usize, range-checked
                        // against the chain by `merge_start`.
                        let efd: i32 = arg(args, 2)?;
                        let depth = if args.len() > 3 { Some(arg::<usize>(args, 3)?) } else { None };
                        if suspended() {
                            return Err(EBUSY);
                        }
                        inner.merge_start(dir, efd, depth)
                    }
                    b"complete" => {
                        arity(args, 2)?;
                        if suspended() {
                            return Err(EBUSY);
                        }
                        inner.merge_complete(dir)
                    }
                    b"cancel" => {
                        arity(args, 2)?;
                        let mut st = inner.state.lock();
                        // Always succeeds, also with nothing (of this
                        // direction) running, as the C target.
                        if st.merge.as_ref().map(|m| m.dir) != Some(dir) {
                            return Ok(());
                        }
                        inner.merge_cancel(&mut st)
                    }
                    b"progress" => {
                        arity(args, 2)?;
                        let st = inner.state.lock();
                        let m = st.merge.as_ref().filter(|m| m.dir == dir);
                        let _ = merge::describe(m, out);
                        let _ = writeln!(out);
                        Ok(())
                    }
                    _ => Err(EINVAL),
                }
            }
            // Unknown: ENOTTY, or EBUSY while suspended (the C target).
            _ if suspended() => Err(EBUSY),
            _ => Err(ENOTTY),
        }
    }

    fn presuspend(&self) {
        let inner = &self.inner;
        inner.suspending.store(true, Ordering::Release);
        {
            let mut st = inner.state.lock();
            if st.merge.is_some() {
                pr_info!("dm-qcow2: suspend cancels the merge\n");
                if let Err(e) = inner.merge_cancel(&mut st) {
                    pr_err!("dm-qcow2: merge cancel: {:?}\n", e);
                }
            }
        }
        // Parked writes get one more try, then fail: suspend must not wait
        // for space that may never come.
        inner.unpark();
    }

    fn presuspend_undo(&self) {
        // The suspend was abandoned; a cancelled merge stays cancelled.
        self.inner.suspending.store(false, Ordering::Release);
    }

    fn postsuspend(&self) {
        let inner = &self.inner;
        // The retry and the commit timer may queue I/O work: they go first.
        // (The walker saw the merge cancelled by presuspend and stops.)
        inner.commit_wq.flush();
        inner.retry_wq.flush();
        inner.merge_wq.flush();
        inner.wq.flush();
        let mut st = inner.state.lock();
        // Everything the cache holds goes to the images before they are
        // trimmed, marked clean or read again.
        let settled = inner.settle(&mut st);
        if let Err(e) = settled {
            pr_err!("dm-qcow2: metadata writeback at suspend failed: {:?}\n", e);
            inner.latch_wants_check();
        }
        if inner.writable {
            let top = st.top();
            inner.trim(&mut st, top);
        }
        self.sync(&st);
        st.stale = true;
        if inner.writable && param::kernel_sets_dirty_bit() && settled.is_ok() {
            if let Ok(top) = st.delta(st.top()) {
                if let Err(e) = inner.set_dirty(&top, false) {
                    pr_err!("dm-qcow2: cannot clear the dirty bit: {:?}\n", e);
                }
            }
        }
    }

    fn preresume(&self) -> Result {
        let inner = &self.inner;
        if inner.wants_check() {
            pr_err!("dm-qcow2: metadata may be inconsistent (wants_check): reload the table after qemu-img check -r all\n");
            return Err(EIO);
        }
        let mut st = inner.state.lock();
        if st.stale {
            inner.reload(&mut st)?;
            st.stale = false;
        }
        if !inner.writable {
            return Ok(());
        }
        let dirty = param::kernel_sets_dirty_bit().then_some(true);
        let top = st.delta(st.top())?;
        inner.update_header(&top, dirty).inspect_err(|e| {
            pr_err!("dm-qcow2: cannot update the image header: {:?}\n", e);
        })
    }

    fn resume(&self) {
        self.inner.suspending.store(false, Ordering::Release);
    }

    fn wants_nospc(&self) -> bool {
        self.inner.writable && !self.inner.suspending.load(Ordering::Acquire)
    }

    fn park_nospc(&self, bio: Bio) {
        let inner = &self.inner;
        inner.parked_count.fetch_add(1, Ordering::AcqRel);
        inner.late_nospc.push(bio);
        if let Some(q) = inner.wq.queue() {
            // Already queued: the running or pending pass will see the bio.
            let _ = q.enqueue::<_, 0>(inner.clone());
        }
    }

    fn io_hints(&self, limits: &mut QueueLimits<'_>) {
        let st = self.inner.state.lock();
        // The strictest of the devices under the image files.
        let strictest = |f: fn(&File) -> u32| st.deltas.iter().map(|d| f(&d.file)).max().unwrap_or(0);
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
        // are parked, and none are now (then `retry_wq.queue()` is `None`).
        // The I/O worker arms the commit timer with the state locked: once
        // `no_timer` is seen it no longer does, and the timer's queue may go.
        self.inner.state.lock().no_timer = true;
        self.inner.commit_wq.shutdown();
        self.inner.retry_wq.shutdown();
        self.inner.merge_wq.shutdown();
        self.inner.wq.shutdown();
        // No trim here (postsuspend did it): after a reload the new table
        // is live on the same files before the old one is destroyed. For the
        // same reason nothing is written once the table was suspended (it
        // settled its metadata then); a table never suspended writes out
        // what it holds.
        let mut st = self.inner.state.lock();
        if !st.stale {
            if let Err(e) = self.inner.settle(&mut st) {
                pr_err!("dm-qcow2: metadata writeback failed: {:?}\n", e);
            }
        }
        self.sync(&st);
    }
}
