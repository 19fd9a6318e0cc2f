// SPDX-License-Identifier: GPL-2.0

//! Merging two neighbouring deltas while the device stays online.
//!
//! Backward (`merge_backward`): the data of delta `src` is copied into the
//! delta below it (`dst`). Forward (`merge_forward`): what delta `src`
//! provides is copied into the delta above it (`dst`). Either way, after
//! `complete` the chain no longer needs `src` and it is unlinked.
//!
//! The copy never changes what the device shows, and `src` is never written
//! by the merge: a cluster is copied as the chain shows it from the upper of
//! the two deltas down, into `dst`, through `dst`'s normal write path
//! (allocation, copy-on-write, subclusters, zero clusters). So `cancel` at
//! any point leaves both images valid and the chain as it was.
//!
//! The walker copies a batch of clusters at a time with the state locked and
//! after waiting for the data I/O in flight, so guest bios queue meanwhile
//! and never see half a copy. Guest writes can only change `src` when it is
//! the top (backward merge at depth 0); a write to a cluster the walker has
//! passed puts it on a redo list, copied again before `ready` and at
//! `complete`.
//!
//! Here: the merge's state, its start, its completion and cancelling;
//! `walker` holds the copy loop.

mod walker;

use crate::io::Src;
use crate::kernel_abstractions::eventfd::EventFd;
use crate::kernel_abstractions::file::IoBuf;
use crate::kernel_abstractions::param;
use crate::kernel_abstractions::task::{self, code::ebadslt};
use crate::meta::{corrupt, HoleWord};
use crate::qcow2_format::{self as fmt, Cluster};
use crate::target::{Delta, Inner, WorkerState};
use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};
use kernel::error::code::*;
use kernel::prelude::*;
use kernel::rbtree::RBTree;
use kernel::sync::Arc;
use kernel::time::{ktime_ms_delta, Ktime};

/// Clusters copied per batch, with the state locked.
const BATCH: u32 = 16;

/// Clusters copied with one read at most (`copy_run`).
const RUN_MAX: usize = 16;

/// The walker's copy buffer: a run of `RUN_MAX` 64 KiB clusters, or one
/// cluster if they are larger.
const RUN_BYTES: u64 = 1 << 20;

/// While guest bios arrive, the walker sleeps after each batch
/// `YIELD_FACTOR` times as long as the batch held the state (bounded by
/// `YIELD_MAX_MS`): guest I/O gets the disk and the state about two thirds
/// of the time, as md's resync slows down for array I/O. An idle device
/// merges at full speed. (With a factor of 1, 4k random reads during a
/// merge ran at 0.45x-0.65x their rate alone, ext4 in the 2-vCPU VM.)
const YIELD_FACTOR: i64 = 2;

/// The longest sleep between two batches.
const YIELD_MAX_MS: i64 = 100;

/// A batch that runs out of memory is tried again this many times in a
/// row, after a sleep that doubles from `NOMEM_SLEEP_MS` up to
/// `NOMEM_SLEEP_MAX_MS` (about 3 s in all), before the merge fails: memory
/// is short for a moment more often than for good.
const NOMEM_RETRIES: u32 = 16;
const NOMEM_SLEEP_MS: u32 = 10;
const NOMEM_SLEEP_MAX_MS: u32 = 200;

/// Copied clusters waiting to be dropped from the merged delta above which
/// the walker commits (and drops them) early.
const MOVE_BATCH: usize = 1024;

/// While a merge waits in `ready`, guest writes behind the cursor are copied
/// again in the background once this many wait, so the redo set (and the
/// copying `complete` does with the state locked) stays bounded.
const REDO_KICK: usize = 64;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Dir {
    Backward,
    Forward,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Stage {
    /// The walker copies clusters.
    Copying,
    /// Everything is copied: waiting for `complete` (or `cancel`).
    Ready,
    /// The copy failed with this errno: only `cancel` remains.
    Failed(i32),
}

/// A merge in progress (in `WorkerState`).
pub(crate) struct Merge {
    pub(crate) dir: Dir,
    /// As given by the user.
    depth: usize,
    /// The delta that goes away at `complete`.
    pub(crate) src: usize,
    /// The delta that receives the data.
    pub(crate) dst: usize,
    pub(crate) stage: Stage,
    /// Next virtual address the walker copies.
    cursor: u64,
    /// Where the walk ends (`src`'s virtual size).
    end: u64,
    /// Clusters (virtual addresses) of `src` written behind the cursor.
    redo: RBTree<u64, ()>,
    /// Entries in `redo`.
    redo_len: usize,
    /// The worker should queue the walker to copy the redo set (`ready`).
    pub(crate) redo_kick: bool,
    eventfd: Option<EventFd>,
    /// A cluster of data being copied (taken while in use).
    buf: Option<IoBuf>,
    /// Tells this merge from one started after it (see `armed`).
    id: u64,
    /// The bios mapped before the merge existed have ended: the walker may
    /// copy. (A walker still queued for an earlier merge must not start
    /// this one early: the fast path may still write into the top then.)
    armed: bool,
    /// Clusters are moved, not copied: a backward merge whose merged delta
    /// may be written (its file is open read-write), as in the C target.
    moving: bool,
    /// Clusters (virtual addresses) copied into `dst` and not yet dropped
    /// from `src`: dropped once a commit made the copies durable.
    moved: KVec<u64>,
    /// Batches in a row that ran out of memory (see `NOMEM_RETRIES`).
    nomem: u32,
    /// The walker sleeps this long before the next batch (a retry).
    backoff_ms: u32,
}

/// Source of `Merge::id`.
static MERGE_IDS: AtomicU64 = AtomicU64::new(0);

impl Merge {
    /// The first cluster of the redo set; it stays in the set until
    /// `redo_done` (see `copy_next_redo`).
    fn first_redo(&self) -> Option<u64> {
        self.redo.keys().next().copied()
    }

    /// `v` (from `first_redo`) is copied.
    fn redo_done(&mut self, v: u64) {
        if self.redo.remove(&v).is_some() {
            self.redo_len = self.redo_len.saturating_sub(1);
        }
    }

    /// A batch ended with `e`: out of memory, the next batch tries again
    /// after a sleep (true), up to `NOMEM_RETRIES` times in a row; any
    /// other error, or one retry too many, fails the merge (false).
    fn batch_failed(&mut self, e: Error) -> bool {
        if e == ENOMEM && self.nomem < NOMEM_RETRIES && !matches!(self.stage, Stage::Failed(_)) {
            self.backoff_ms = NOMEM_SLEEP_MS
                .checked_shl(self.nomem)
                .map_or(NOMEM_SLEEP_MAX_MS, |ms| ms.min(NOMEM_SLEEP_MAX_MS));
            self.nomem += 1;
            return true;
        }
        self.fail(e);
        false
    }

    /// How long the walker sleeps before its next batch (taken: once).
    pub(crate) fn take_backoff(&mut self) -> u32 {
        core::mem::take(&mut self.backoff_ms)
    }

    fn progress(&self) -> u64 {
        match self.stage {
            Stage::Ready => 100,
            _ if self.end == 0 => 100,
            // `end` (a virtual size) may exceed u64::MAX / 100; no 128-bit
            // division in the kernel (__udivti3) either.
            _ => {
                let c = self.cursor.min(self.end);
                let pct = match c.checked_mul(100) {
                    Some(x) => x / self.end,
                    // Here end >= c > u64::MAX / 100, so end / 100 > 0.
                    None => c / (self.end / 100).max(1),
                };
                pct.min(99)
            }
        }
    }

    fn stage_name(&self) -> &'static str {
        match self.stage {
            Stage::Copying => "copying",
            Stage::Ready => "ready",
            Stage::Failed(_) => "failed",
        }
    }

    /// Fails the merge with `e` (unless it failed already).
    pub(crate) fn fail(&mut self, e: Error) {
        if !matches!(self.stage, Stage::Failed(_)) {
            pr_err!(
                "dm-qcow2: merge of image {} into {} failed: {:?}\n",
                self.src,
                self.dst,
                e
            );
            self.set_stage(Stage::Failed(-e.to_errno()));
        }
    }

    /// Enters `stage` and tells userspace if it is final.
    fn set_stage(&mut self, stage: Stage) {
        self.stage = stage;
        if stage != Stage::Copying {
            if let Some(e) = &self.eventfd {
                e.signal();
            }
        }
    }
}

/// What `merge_* progress` and the status line show of a merge, copied out
/// of the state (see `StatusView`).
#[derive(Clone, Copy)]
pub(crate) struct MergeView {
    dir: Option<Dir>,
    depth: usize,
    stage: &'static str,
    progress: u64,
    error: i32,
}

impl MergeView {
    /// No merge.
    pub(crate) const NONE: Self = Self {
        dir: None,
        depth: 0,
        stage: "none",
        progress: 0,
        error: 0,
    };

    /// The view of `m` (or of no merge).
    pub(crate) fn of(m: Option<&Merge>) -> Self {
        match m {
            None => Self::NONE,
            Some(m) => Self {
                dir: Some(m.dir),
                depth: m.depth,
                stage: m.stage_name(),
                progress: m.progress(),
                error: match m.stage {
                    Stage::Failed(e) => e,
                    _ => 0,
                },
            },
        }
    }

    /// Writes the `merge_* progress` / status fields.
    pub(crate) fn describe(&self, out: &mut impl Write) -> core::fmt::Result {
        let dir = match self.dir {
            None => "none",
            Some(Dir::Backward) => "backward",
            Some(Dir::Forward) => "forward",
        };
        write!(
            out,
            "merge={} depth={} stage={} progress={} error={}",
            dir, self.depth, self.stage, self.progress, self.error
        )
    }
}

/// The receiving delta of the merge in `st`, if any.
fn m_dst(st: &WorkerState) -> Option<usize> {
    st.merge.as_ref().map(|m| m.dst)
}

/// Whether `c` allocates nothing (reads fall through to the delta below).
fn unallocated(c: &Cluster) -> bool {
    matches!(c, Cluster::Unallocated)
        || matches!(
            c,
            Cluster::Extended {
                alloc: 0,
                zero: 0,
                ..
            }
        )
}

/// Whether `c` defines every byte of its cluster itself.
fn covers(c: &Cluster) -> bool {
    match c {
        Cluster::Unallocated => false,
        Cluster::Extended { alloc, zero, .. } => alloc | zero == u32::MAX,
        _ => true,
    }
}

/// Whether `c` reads as zeroes in full by its own flags.
fn all_zero(c: &Cluster) -> bool {
    match c {
        Cluster::Zero | Cluster::ZeroPrealloc { .. } => true,
        Cluster::Extended { alloc: 0, zero, .. } => *zero == u32::MAX,
        _ => false,
    }
}

impl Inner {
    /// `merge_* start`: checks, prepares the receiving delta and starts the
    /// walker. `depth` counts from the top (0).
    pub(crate) fn merge_start(
        self: &Arc<Self>,
        dir: Dir,
        eventfd: i32,
        depth: Option<usize>,
    ) -> Result {
        let eventfd = match eventfd {
            -1 => None,
            fd if fd < 0 => return Err(EBADF),
            fd => Some(EventFd::from_fd(fd).map_err(|_| EBADF)?),
        };
        let id = MERGE_IDS.fetch_add(1, Ordering::Relaxed);
        {
            let mut st = self.lock_state();
            // A suspend cancels merges under this lock after raising the
            // flag: none may start behind its back.
            if self.is_suspending() {
                return Err(EBUSY);
            }
            // A failed merge is over (its error stays for `progress` until
            // now): cleaned up as by `cancel`, and the new one may start at
            // once, as in the C target.
            if st
                .merge
                .as_ref()
                .is_some_and(|m| matches!(m.stage, Stage::Failed(_)))
            {
                self.merge_cancel(&mut st)?;
            }
            if st.merge.is_some() {
                return Err(EBUSY);
            }
            let n = st.deltas.len();
            let top = n.checked_sub(1).ok_or(EINVAL)?;
            // `depth` comes from a message: any usize. Range-checked against
            // the chain first, then only subtracted from `top` (checked, so
            // that a mistake here is an error, never an overflow panic with
            // the state locked).
            let (depth, src, dst) = match dir {
                Dir::Backward => {
                    let k = depth.unwrap_or(0);
                    // 0..=top-1: the delta at k has one below it (else
                    // ENOENT, as the C target).
                    if k >= top {
                        return Err(ENOENT);
                    }
                    let src = top.checked_sub(k).ok_or(EINVAL)?;
                    (k, src, src.checked_sub(1).ok_or(EINVAL)?)
                }
                Dir::Forward => {
                    let k = depth.unwrap_or(1);
                    // 1..=top: the delta at k has one above it.
                    if k == 0 || k > top {
                        return Err(ENOENT);
                    }
                    let src = top.checked_sub(k).ok_or(EINVAL)?;
                    (k, src, src.checked_add(1).ok_or(EINVAL)?)
                }
            };
            let (s, d) = (st.delta(src)?, st.delta(dst)?);
            if !d.file.writable() {
                return Err(EACCES);
            }
            // As for a writable top: stale lazy refcounts must not be
            // allocated from.
            Delta::read_header(&d.file, true).map_err(|e| e.err)?;
            // The receiving delta must be able to hold every address of src.
            if d.hdr.size < s.hdr.size {
                return Err(ebadslt());
            }
            st.md
                .get_mut(dst)
                .ok_or(EIO)?
                .load_refcounts(&d.file, &d.hdr)?;
            // Backward merges move clusters where the merged delta may be
            // written: each copy is dropped from it once durable, so the
            // merge needs no more space than dst's growth.
            let moving = dir == Dir::Backward && s.file.writable();
            if moving {
                st.md
                    .get_mut(src)
                    .ok_or(EIO)?
                    .load_refcounts(&s.file, &s.hdr)?;
            }
            let buf = IoBuf::new(d.hdr.cluster_size().max(RUN_BYTES) as usize)?;
            // A crash while copying leaks clusters in dst at worst. With
            // kernel_sets_dirty_bit (only then: otherwise the kernel never
            // writes the bit, as the C target), dst is marked dirty while the
            // merge runs, so QEMU repairs them when it next opens the image.
            if param::kernel_sets_dirty_bit() {
                self.set_dirty(&d, true)?;
            }
            st.merge = Some(Merge {
                dir,
                depth,
                src,
                dst,
                stage: Stage::Copying,
                cursor: 0,
                end: s.hdr.size,
                redo: RBTree::new(),
                redo_len: 0,
                redo_kick: false,
                eventfd,
                buf: Some(buf),
                id,
                armed: false,
                moving,
                moved: KVec::new(),
                nomem: 0,
                backoff_ms: 0,
            });
            // Writes take the locked path while a merge runs (it must see
            // them); reads keep the table. The switch below waits for bios
            // the fast path may have taken before.
            if let Some(f) = &st.fast {
                f.stop_writes();
            }
        }
        // Bios mapped before the merge existed finish before the walker
        // starts; later ones see it.
        self.refs.switch_wait();
        if let Some(m) = self.lock_state().merge.as_mut().filter(|m| m.id == id) {
            m.armed = true;
        }
        self.kick_merge();
        Ok(())
    }

    /// Called by the write path before it changes delta `d` at `vaddr`.
    pub(crate) fn merge_note_write(&self, st: &mut WorkerState, d: usize, vaddr: u64) -> Result {
        let Some(m) = st.merge.as_mut() else {
            return Ok(());
        };
        if m.src != d || vaddr >= m.cursor || matches!(m.stage, Stage::Failed(_)) {
            return Ok(());
        }
        let cs = st.deltas.get(d).ok_or(EIO)?.hdr.cluster_size();
        let key = vaddr - vaddr % cs;
        match m.redo.try_create_and_insert(key, (), GFP_KERNEL) {
            Ok(None) => {
                m.redo_len += 1;
                if m.stage == Stage::Ready && m.redo_len >= REDO_KICK {
                    m.redo_kick = true;
                }
            }
            Ok(Some(_)) => {}
            // Cannot track it: the merge cannot be trusted any more.
            Err(_) => m.set_stage(Stage::Failed(-ENOMEM.to_errno())),
        }
        Ok(())
    }

    /// `merge_* complete`: copies what was written since `ready`, makes the
    /// receiving delta durable and unlinks the merged one.
    pub(crate) fn merge_complete(&self, dir: Dir) -> Result {
        let removed = {
            let mut st = self.lock_state();
            let m = st.merge.as_ref().ok_or(EBUSY)?;
            if m.stage != Stage::Ready || m.dir != dir {
                return Err(EBUSY);
            }
            let (src, dst) = (m.src, m.dst);
            self.inflight.wait_idle();
            loop {
                match self.copy_next_redo(&mut st) {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        // Out of memory it stays ready (the cluster in the
                        // redo set): `complete` may be sent again.
                        if let Some(m) = st.merge.as_mut().filter(|_| e != ENOMEM) {
                            m.set_stage(Stage::Failed(-e.to_errno()));
                        }
                        return Err(e);
                    }
                }
            }
            // The copies (and every decrement they queued) are durable
            // before the header changes below; then the merged delta lets go
            // of what was moved (it ends without data clusters) and its file
            // is trimmed.
            self.settle(&mut st)?;
            self.drop_moved(&mut st)?;
            self.settle(&mut st)?;
            self.trim(&mut st, dst);
            self.trim(&mut st, src);
            let d = st.delta(dst)?;
            d.file.fsync()?;
            if src == 0 {
                // dst becomes the base: it must not name a backing file.
                self.clear_backing(&d)?;
            }
            if param::kernel_sets_dirty_bit() {
                // As the C target: the removed delta is left clean (dirty
                // and autoclear bits cleared) where we may write it; dst
                // stays dirty if it is now the live top (cleared on
                // suspend), else it is clean again.
                let s = st.delta(src)?;
                if s.file.writable() {
                    self.set_dirty(&s, false)?;
                }
                if src != st.top() {
                    self.set_dirty(&d, false)?;
                }
            }
            let removed = st.unlink(src)?;
            st.merge = None;
            self.fast_on(&mut st);
            removed
        };
        // Nothing mapped before the unlink may still use the old delta
        // (`switch_wait`). No I/O the worker started was in flight at the
        // unlink either: the wait for the counter above ran with the state
        // mutex held through it (that covers a bio parked on ENOSPC while
        // an earlier piece's I/O was in flight, which `switch_wait` does
        // not wait for), and each I/O holds its own reference to the file.
        // Nothing started since reaches the removed delta: the worker's
        // chain no longer has it, the new table has no entry into it, and
        // the retired one served writes last before the merge's start.
        // No second wait for the counter here: without the mutex it lasts
        // as long as the worker keeps I/O going, which a busy guest's writes
        // do (they all take the worker while a caller waits there).
        self.refs.switch_wait();
        drop(removed);
        Ok(())
    }

    /// `merge_* cancel` (and suspend): forgets the merge. What was copied
    /// stays in the receiving delta, hidden by the merged one as before.
    pub(crate) fn merge_cancel(&self, st: &mut WorkerState) -> Result {
        let m = st.merge.take().ok_or(EINVAL)?;
        // Whoever waits for the merge learns that it is over.
        if let (Stage::Copying, Some(e)) = (m.stage, &m.eventfd) {
            e.signal();
        }
        let res = (|| {
            self.inflight.wait_idle();
            // What was copied is durable before the dirty bit is cleared.
            self.settle(st)?;
            self.trim(st, m.dst);
            let d = st.delta(m.dst)?;
            d.file.fsync()?;
            if param::kernel_sets_dirty_bit() {
                self.set_dirty(&d, false)?;
            }
            Ok(())
        })();
        self.fast_on(st);
        res
    }
}
