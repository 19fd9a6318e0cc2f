// SPDX-License-Identifier: GPL-2.0

//! The fast path for allocated clusters (see `hot`) and its lanes.
//!
//! `map` sends a read whose clusters the fast path's table knows, one
//! after the other in one delta's file, or such a write without PREFLUSH
//! into clusters the top owns (FUA only while the top's metadata is
//! durable), to the lane of the CPU it runs on: a work
//! item that starts the bios' direct I/O, one per bio. Lanes are work items
//! of one unbound queue, so bios submitted on N CPUs are started by up to
//! N workers at once, while everything else (and every bio a lane finds it
//! cannot serve after all) goes through the single I/O worker and the
//! state mutex as before. An empty flush that finds the table idle goes to
//! the express lane (below), which runs the worker's code for it under the
//! state mutex itself (`Lanes::queue_flush`).
//!
//! Unbound, not per-CPU, for a stream of bios: the scheduler runs a lane
//! where a CPU is free, so one submitter and its lane overlap on two CPUs.
//! A per-CPU queue pinned the lane to the submitter's CPU, where the two
//! took turns: with one fio job (4k random, QD32, tmpfs, 2-vCPU TCG VM,
//! three runs) it served 4.3k to 5.8k IOPS against 9.1k to 13.4k unbound;
//! with two jobs both were within noise of each other (10k to 14k).
//!
//! But a bio that comes when nothing of the table is in flight or queued
//! (queue depth 1: the submitter waits for each I/O; on a host whose
//! direct I/O completes inline, told from a stream by a probe, see
//! `Inner::express_fits`) goes to an *express*
//! lane: per-CPU and `WQ_HIGHPRI`, so it runs at once on the submitter's
//! CPU (the submitter is about to sleep on the I/O anyway) instead of
//! waking an idle CPU, which cost ~180 us under TCG at the seventeenth
//! stop. ext4 over loop, 4k QD1, two runs each: p50 completion latency
//! 117-148 us against raw's 115-151 (main: 167-222 against 118-140);
//! that is fio's clat, which leaves out the submitting call, where the
//! express lane does the I/O's work: in all (fio's lat, twenty-fifth stop,
//! two rounds) reads took 247-309 us at the median against raw's 206-212
//! and loop's 253-305, writes 358-432 against 305-338 and 391-412;
//! the lanes at QD32 were within noise of main (writes 15.9k-17.7k IOPS
//! against 18.4k-19.0k, reads 23.2k-24.1k against 23.7k-24.5k). The
//! per-CPU high-priority queue alone (every bio) served half as many QD32
//! writes (10.7k against 19.8k-20.8k).
//!
//! The unbound lanes are not `WQ_HIGHPRI` (as dm-crypt's I/O queue is):
//! with high-priority unbound workers (ext4 over loop, two three-round
//! runs each, in turns with the plain queue) dm-qcow2 served 4517 and 4699
//! 4k random writes a second at QD32 against 6986 and 7095, and QD1 writes
//! took 498 and 618 us at the median against 375 and 449 (the wake-up of
//! another CPU, not the priority, is what QD1 pays for).
//!
//! A lane does its lookups concurrently with the worker's changes of the
//! mappings, so the table alone does not order them. What makes that safe:
//!
//! - A lookup and the I/O it starts happen under a hold of the in-flight
//!   counter (`IoCounter::hold`). A host cluster is freed only after the
//!   entries pointing at it were cleared (`hot_forget`) and
//!   `Inner::apply_frees` waited for the counter to be idle; a hold made
//!   after that wait began fails (the bio takes the locked path), and one
//!   made before is waited for. So no lane I/O reaches a cluster after it
//!   was handed out again.
//! - An entry is put only once reads of the cluster show what the chain
//!   shows: after a copy-on-write fill was written (`write_full`), or for a
//!   cluster never written before (it reads as zeroes, as the chain does
//!   around a write that needs no fill). A lane read racing the guest's own
//!   write of the same cluster may see what the locked path would (for a
//!   whole-cluster write into a never-written cluster: zeroes until the
//!   data lands); nothing of another cluster. That holds for every plain
//!   entry of the top's metadata cache whenever the state mutex is free
//!   (each is set under it only at such a point), which is why
//!   `Inner::warm` may put a whole cached page's entries at once.
//! - An entry pointing below the top (the chain shows the cluster from a
//!   lower delta: `Inner::hot_below`, which also warms the rest of that
//!   delta's cached L2 page) is put only when every delta above has
//!   nothing for the whole cluster (no L2 table, or a zero entry in the
//!   current cached page of it: exactly `Unallocated`, plain entries
//!   only), and removed before the cluster's
//!   L2 entry changes in that delta or any above it (`hot_forget` in every
//!   change of an L2 entry: a first write, zeroes or discard giving the
//!   top the cluster, a merge's copy or drop). A lane read racing the
//!   top's first write of the cluster reads what the chain showed before,
//!   as a read racing a write may; once the write's entry is set (before
//!   the write completes) the entry is gone.
//!   Lower deltas' clusters are freed only by merges, after the same
//!   removal and the same wait for the in-flight counter.
//! - A read of clusters the zero map says the chain shows as zeroes is
//!   answered in `map` (`Inner::end_zeroes`): no file I/O, so no hold. A
//!   bit is set only from what the state showed under the mutex (a lookup
//!   that found the cluster zeroes all the way down, or a page's other
//!   entries read the same way from cached pages), and cleared by the same
//!   `hot_forget` before any L2 entry of the cluster changes, in any delta.
//!   `map` looks only at the current table (one retired was replaced under
//!   the same spinlock first); between a merge's unlink of a delta and the
//!   table's replacement the old bits still hold, as a merge changes what
//!   no cluster shows (nor does its cancel). A read racing
//!   a write of the cluster may see zeroes, as through the worker; one
//!   submitted after the write completed cannot (the bit went before the
//!   write's entry changed, hence before it completed). The table's own
//!   lookup goes first: a bio it knows takes a lane.
//! - A cluster of the top that becomes metadata (a new L2 table or
//!   refcount block, the refcount table's growth) is forgotten first and,
//!   where a lane may be writing it, the counter is waited for before the
//!   metadata is written (`DeltaMd::fence_lanes`). Only a damaged image's
//!   owned entries name a cluster the allocator hands out (its refcount
//!   was 0); the locked path refuses such a write (the overlap check), and
//!   lanes then cannot do it either.
//! - Writes in place go only to clusters the top owns (COPIED), and a flush
//!   bio never takes the fast path: durability stays with the batch's
//!   commit (the worker's, or for an empty flush an express lane's running
//!   the same code, `Inner::serve_here`), which covers every write
//!   completed before the flush arrived. A FUA write takes it only while
//!   the top's metadata is durable (`Inner::md_durable`, read after the
//!   lookups): then its mapping is, and the commit that follows its
//!   landing (`Inner::sync_fua`, the top fsynced) makes its data durable
//!   too before it completes.
//! - Corruption turns the path off (`fast_off`), and a merge's end and a
//!   resume replace its table (`fast_on`): the old one is retired, so the
//!   worker stops keeping it up to date, and a lane still holding it
//!   checks `Fast::is_dead` under its hold (ordered like an entry's
//!   removal) and leaves the bio to the locked path. Callers
//!   that need the bios mapped before gone wait for them
//!   (`refs.switch_wait`).
//! - While a merge runs the table serves reads only (`Fast::stop_writes`
//!   at its start, before the in-flight switch that waits for bios mapped
//!   before): the merge must see every guest write (its redo set). Guest
//!   reads keep their speed. The merge changes mappings the way the locked
//!   path does (`hot_forget` before the change): dropping clusters it
//!   moved out of the delta merged (the top at depth 0), and copying into
//!   the receiving delta where it had nothing (the top, forward), where an
//!   entry may point at the delta the copy comes from.
//!
//! `map` itself does not start file I/O: it runs in the submitter's
//! `submit_bio` with `current->bio_list` active, where a host file
//! system's own metadata read (an extent block, a block bitmap) would be
//! deferred until `map` returns and wait forever.

use super::*;
use crate::kernel_abstractions::wq;

/// Lanes per table at most (one per CPU up to this).
const MAX_LANES: u32 = 64;

/// Express passes in a row with their I/O completed inline before an idle
/// bio probes an unbound lane (see `Inner::express_fits`): one bio in 1025
/// of a submitter at queue depth 1 on such a host pays a wake-up of
/// another CPU.
const PROBE_PASSES: u32 = 1024;

/// Idle bios in a row after a busy one before the express lane is used
/// again (see `Inner::express_fits`).
const STREAM_IDLE: u32 = 64;

/// Clusters one bio of the fast path may cover at most (bounds the lookups
/// per bio; larger bios take the worker).
const MAX_CLUSTERS: u64 = 256;

/// Where `map` sends a bio the fast path knows (`Inner::fast_route`).
pub(crate) enum FastRoute {
    /// A lane starts its I/O.
    Lane,
    /// A read of zeroes: ended in `map` (`Inner::end_zeroes`).
    Zeroes,
}

/// One CPU's lane: bios the fast path may serve, started by `work`.
#[pin_data]
pub(crate) struct Lane {
    inner: Arc<Inner>,
    /// The bios queued here.
    #[pin]
    bios: SpinLock<LaneQueue>,
    #[pin]
    work: Work<Lane>,
    /// On the express queue (see `Lanes::queue`).
    express: bool,
}

/// A lane's queue.
struct LaneQueue {
    list: BioList,
    /// A pass of the lane runs and takes the list again before it ends:
    /// a bio queued meanwhile needs no new pass (see `Lanes::queue`).
    active: bool,
    /// The pass serves bios under the state mutex (an express lane, see
    /// `Lane::serve`): a bio does not join the queue (it would wait for
    /// that mutex, a commit, an fsync) but goes elsewhere.
    locked: bool,
}

impl_has_work! {
    impl HasWork<Self> for Lane { self.work }
}

impl WorkItem for Lane {
    type Pointer = Arc<Lane>;

    fn run(this: Arc<Lane>) {
        task::no_io(|| loop {
            let list = {
                let mut q = this.bios.lock();
                // Seen empty under the lock: a bio queued from now on
                // queues a new pass.
                q.active = !q.list.is_empty();
                if !q.active {
                    break;
                }
                q.list.take()
            };
            this.inner
                .queued_bios
                .fetch_sub(list.len(), Ordering::Relaxed);
            // One plug per batch: its bios reach the host's devices together
            // (not held across `cond_resched`, which does not flush it).
            let locked = task::plugged(|| this.serve(list));
            // A pass that served bios under the state mutex ends with their
            // commit's wait for the I/O in flight: it tells nothing of how the
            // host completes direct I/O.
            if this.express && !locked {
                this.inner.note_express_pass();
            }
            // Sustained load keeps the lane busy: let others run.
            task::cond_resched();
        });
    }
}

impl Lane {
    /// Starts the I/O of the bios of `list` the fast path serves. The
    /// others go to the worker but, on an express lane, empty flushes
    /// (`Lanes::queue_flush`): those are served here as the worker would
    /// (`Inner::serve_here`), with the queue `locked` meanwhile; returns
    /// whether that happened.
    fn serve(&self, list: BioList) -> bool {
        let mut slow = self.inner.serve_fast(list);
        if slow.is_empty() {
            return false;
        }
        let mut here = BioList::new();
        if self.express {
            let mut rest = BioList::new();
            while let Some(bio) = slow.pop() {
                if bio.size() == 0 {
                    here.push(bio);
                } else {
                    rest.push(bio);
                }
            }
            slow = rest;
        }
        if !slow.is_empty() {
            self.inner.queue_list(slow);
        }
        if here.is_empty() {
            return false;
        }
        self.bios.lock().locked = true;
        self.inner.serve_here(here);
        self.bios.lock().locked = false;
        true
    }
}

/// The lanes of a table and their queues.
pub(crate) struct Lanes {
    inner: Arc<Inner>,
    /// On the unbound queue: where bios go while others are in flight.
    lanes: KVec<Arc<Lane>>,
    wq: OwnedQueue,
    /// On the per-CPU high-priority queue: where a bio goes when nothing
    /// is in flight (see `queue`).
    express: KVec<Arc<Lane>>,
    express_wq: OwnedQueue,
}

impl Lanes {
    /// One lane per CPU on each queue (up to `MAX_LANES`; CPUs beyond
    /// share them).
    pub(crate) fn new(inner: &Arc<Inner>) -> Result<Self> {
        let wq = OwnedQueue::new(c_str!("dm-qcow2-lane"), true)?;
        let express_wq = OwnedQueue::new_local_highpri(c_str!("dm-qcow2-express"))?;
        Ok(Self {
            inner: inner.clone(),
            lanes: Self::new_lanes(inner, false)?,
            wq,
            express: Self::new_lanes(inner, true)?,
            express_wq,
        })
    }

    fn new_lanes(inner: &Arc<Inner>, express: bool) -> Result<KVec<Arc<Lane>>> {
        let n = wq::nr_cpu_ids().clamp(1, MAX_LANES);
        let mut lanes = KVec::with_capacity(n as usize, GFP_KERNEL)?;
        for _ in 0..n {
            let lane = Arc::pin_init(
                pin_init!(Lane {
                    inner: inner.clone(),
                    bios <- new_spinlock!(
                        LaneQueue {
                            list: BioList::new(),
                            active: false,
                            locked: false,
                        },
                        "dm_qcow2::lane"
                    ),
                    work <- new_work!("dm_qcow2::lane"),
                    express,
                }),
                GFP_KERNEL,
            )?;
            lanes.push(lane, GFP_KERNEL)?;
        }
        Ok(lanes)
    }

    /// Queues `bio` on the lane of the CPU we run on: the express one if no
    /// I/O of the table is in flight and no bio waits for a lane or the
    /// worker (a bio
    /// submitted after the last one completed, as at queue depth 1: its
    /// lane runs at once on this CPU, with no wake-up of another) and
    /// `Inner::express_fits` does not see a stream, else the unbound one (a
    /// stream of bios: the lane runs beside the submitter, on another CPU;
    /// also while the express lane serves bios under the state mutex).
    pub(crate) fn queue(&self, bio: Bio) -> Result<(), Bio> {
        let bio = if self.idle_for(&bio) {
            match self.push(bio, true) {
                Ok(()) => return Ok(()),
                // That lane serves bios under the state mutex.
                Err(bio) => bio,
            }
        } else {
            bio
        };
        self.push(bio, false)
    }

    /// Queues `bio`, an empty flush, on the express lane of the CPU we run
    /// on if the table is idle (as `queue`): the lane commits under the
    /// state mutex itself (`Inner::serve_here`, the worker's code), with no
    /// wake-up of the worker on another CPU. Gives it back otherwise (the
    /// worker's).
    ///
    /// Flushes only. 4k writes each followed by `fdatasync` at queue depth
    /// 1 (ext4 over loop, 2-vCPU TCG VM, nine rounds in two sittings, in
    /// turns with the worker's build) served 1006 IOPS at the median
    /// against 840 through the worker, with ~2 context switches fewer per
    /// I/O; but FUA writes served the same way (the data write and its wait
    /// for the I/O on the express lane) served ~860 against 1166, with
    /// twice the CPU per I/O. (A FUA write in place whose mapping is
    /// durable takes a lane instead, and its sync waits for nothing but
    /// its own landing: `Inner::fast_target`, `Inner::sync_fua`.)
    pub(crate) fn queue_flush(&self, bio: Bio) -> Result<(), Bio> {
        if bio.size() != 0 || !matches!(bio.op(), Op::Write | Op::Flush) || !self.idle_for(&bio) {
            return Err(bio);
        }
        self.push(bio, true)
    }

    /// Whether `bio` finds the table idle: no I/O of it in flight, no bio
    /// waiting for a lane or the worker, and no stream seen
    /// (`Inner::express_fits`).
    fn idle_for(&self, bio: &Bio) -> bool {
        let inner = &self.inner;
        let busy = inner
            .inflight
            .count()
            .saturating_add(inner.queued_bios.load(Ordering::Relaxed));
        inner.express_fits(busy, bio.op() == Op::Write)
    }

    /// Queues `bio` on this CPU's lane, the express one if `express`; gives
    /// it back if that lane is `locked` or its queue shut down.
    fn push(&self, bio: Bio, express: bool) -> Result<(), Bio> {
        let inner = &self.inner;
        let (lanes, wq) = if express {
            (&self.express, &self.express_wq)
        } else {
            (&self.lanes, &self.wq)
        };
        let n = lanes.len();
        let Some(lane) = lanes.get(wq::this_cpu() as usize % n.max(1)) else {
            return Err(bio);
        };
        if wq.is_shut_down() {
            return Err(bio);
        }
        let idle = {
            let mut queued = lane.bios.lock();
            if queued.locked {
                return Err(bio);
            }
            // Counted before the lane can take it (and uncount it).
            inner.queued_bios.fetch_add(1, Ordering::Relaxed);
            let idle = !queued.active && queued.list.is_empty();
            queued.list.push(bio);
            idle
        };
        // A pass is queued only for a bio that finds the lane idle: one that
        // is active takes the list again before it ends (it ends only after
        // seeing it empty, under the lock), and a non-empty list of an
        // inactive lane has a pass queued by the bio that found it empty,
        // which takes the list after that bio's enqueue, hence after ours.
        // A stream's bios that come while the lane serves the ones before
        // thus cost neither an enqueue nor a pass of their own (4k random
        // reads at QD32, 2-vCPU TCG VM, builds in turns: ext4 over loop
        // 23.0k/25.2k IOPS against 19.4k/22.2k, CPU per I/O 10% lower; on
        // tmpfs two copies of one build differ by ~15%: see the README).
        if idle {
            // Already queued (a pass ending): it sees the bio.
            let _ = wq.enqueue(lane.clone());
        }
        Ok(())
    }

    /// Queues the sync of the fast path's FUA writes whose data landed
    /// (`Inner::sync_fua`) on this CPU's express queue: high priority, on
    /// the CPU the write completed on, with no wake-up of another. Any
    /// context.
    pub(crate) fn queue_sync(&self, inner: &Arc<Inner>) {
        // Already queued: that pass takes the bio.
        let _ = self.express_wq.enqueue::<_, 5>(inner.clone());
    }

    /// Waits for the lanes' passes queued so far (a suspend's end: an
    /// express lane may still be finishing a batch of the worker's kind,
    /// see `Inner::serve_here`, after its bios ended).
    pub(crate) fn flush(&self) {
        self.express_wq.flush();
        self.wq.flush();
    }

    /// Drains and destroys the lanes' queues (before the worker's: lanes
    /// hand bios to the worker).
    pub(crate) fn shutdown(&self) {
        self.express_wq.shutdown();
        self.wq.shutdown();
    }
}

impl Inner {
    /// Whether a bio that found `busy` I/Os of the table in flight or
    /// queued takes the express lane (see `Lanes::queue`): only if none.
    ///
    /// Idle does not always mean queue depth 1. Where the host file's
    /// direct I/O completes inside its call (tmpfs: a copy), an express
    /// lane has done the I/O before the submitter's `io_submit` returns, so
    /// a submitter keeping 32 I/Os in flight finds the table idle at every
    /// bio too, and the express lane serialises it with its own copies on
    /// one CPU. tmpfs, 4k random at QD32, 2-vCPU TCG VM, 6 s runs: reads
    /// 16.1k-20.9k IOPS, writes 12.8k-17.7k; with the probe below 43.1k and
    /// 46.3k, 39.0k and 43.5k (raw 41.3k-43.5k, 41.3k-41.7k; QD1 as
    /// before: 17.1k against 14.1k-16.7k). Nothing the table sees
    /// tells the two apart but a probe: after `PROBE_PASSES` express passes
    /// in a row whose I/O completed inline, one idle bio takes an unbound
    /// lane instead. A submitter that waits for each I/O comes back after
    /// it completed (idle again: express again); one with more to submit
    /// comes while it is still queued, and the table is busy from then on.
    /// Once busy, `STREAM_IDLE` idle bios in a row are needed before the
    /// express lane is used again, so that a stream which just drained the
    /// lanes does not fall back at once. For a `write` busy means two or
    /// more: one is also what a submitter at queue depth 1 finds when its
    /// last write went through the worker and its end woke it before the
    /// I/O was uncounted (see `BioIo::put`; a lane's write is uncounted
    /// first). A host whose direct I/O is asynchronous (ext4, xfs,
    /// a block device) leaves I/O in flight after an express pass and is
    /// never probed.
    fn express_fits(&self, busy: usize, write: bool) -> bool {
        if busy > 0 {
            // Stored only on a change: a stream's every bio comes here, and
            // a store would pull the line from the other CPUs each time.
            if busy > usize::from(write) && self.idle_streak.load(Ordering::Relaxed) != 0 {
                self.idle_streak.store(0, Ordering::Relaxed);
            }
            return false;
        }
        let streak = self.idle_streak.load(Ordering::Relaxed);
        if streak < STREAM_IDLE {
            self.idle_streak.store(streak + 1, Ordering::Relaxed);
            return false;
        }
        if self.express_inline.load(Ordering::Relaxed) >= PROBE_PASSES {
            self.express_inline.store(0, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// An express lane's pass is over: counts it if its I/O completed
    /// inline (nothing of the table in flight any more; see
    /// `express_fits`).
    fn note_express_pass(&self) {
        if self.inflight.is_idle() {
            let n = self.express_inline.load(Ordering::Relaxed);
            self.express_inline
                .store(n.saturating_add(1), Ordering::Relaxed);
        } else if self.express_inline.load(Ordering::Relaxed) != 0 {
            self.express_inline.store(0, Ordering::Relaxed);
        }
    }

    /// Where `map` sends `bio` (a read or write of some bytes) if the fast
    /// path is on and knows its clusters: a lane if the table has them (a
    /// hint; the lane looks again), `Zeroes` if it is a read of clusters
    /// the chain shows as zeroes only (`hot::ZeroMap`); `None` otherwise
    /// (the worker).
    pub(crate) fn fast_route(&self, bio: &Bio) -> Option<FastRoute> {
        let fp = self.fast.lock();
        let f = fp.as_ref()?;
        if self.fast_target(f, bio).is_some() {
            Some(FastRoute::Lane)
        } else if Self::reads_zeroes(f, bio) {
            Some(FastRoute::Zeroes)
        } else {
            None
        }
    }

    /// Whether `bio` is a read of clusters the zero map of `fp` knows
    /// (every one, at most `MAX_CLUSTERS`).
    fn reads_zeroes(fp: &Fast, bio: &Bio) -> bool {
        bio.op() == Op::Read
            && Self::fast_span(fp, bio)
                .is_some_and(|(_, first, last)| (first..=last).all(|v| fp.zero.is_zero(v)))
    }

    /// The guest address of `bio` and the first and last cluster it covers,
    /// if the fast path may look at it: some bytes inside the image, plain
    /// L2 entries, at most `MAX_CLUSTERS` clusters.
    fn fast_span(fp: &Fast, bio: &Bio) -> Option<(u64, u64, u64)> {
        let hdr = &fp.top.hdr;
        let cb = hdr.cluster_bits;
        let len = bio.size();
        let vaddr = bio.sector().checked_mul(SECTOR)?;
        let end = vaddr.saturating_add(u64::from(len));
        if len == 0 || hdr.extended_l2() || end > hdr.size {
            return None;
        }
        let (first, last) = (vaddr >> cb, (end - 1) >> cb);
        (last - first < MAX_CLUSTERS).then_some((vaddr, first, last))
    }

    /// Ends a read `fast_route` found to be of zeroes only: fills it with
    /// zeroes, in the submitter's context (as dm-zero does), with no I/O.
    /// Also for a stream: sending a stream's reads of zeroes to the
    /// unbound lanes instead (the table busy) cost more than it saved
    /// (thirty-second stop, ext4, 2 vCPUs, QD32: 8.6k IOPS, 141 us of CPU
    /// per I/O, against 12.6k and 83 us in the same sitting).
    /// Such a read racing a write of the same clusters may see zeroes, as
    /// one taking the worker may (before the write's L2 entry changes, its
    /// `hot_forget` clears the bits); one submitted after a write completed
    /// finds the bits cleared.
    pub(crate) fn end_zeroes(&self, bio: Bio) {
        if Self::fill_zeroes(bio) {
            self.fast_bios.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Zero-fills and ends `bio`; whether the fill worked.
    fn fill_zeroes(bio: Bio) -> bool {
        let res = bio.zero(0, bio.size());
        let ok = res.is_ok();
        bio.end(res);
        ok
    }

    /// Starts the I/O of the bios of `list` the fast path serves; returns
    /// the others.
    pub(super) fn serve_fast(&self, mut list: BioList) -> BioList {
        // Taken after the bios: a merge that turned the fast path off
        // before they were mapped is seen.
        let fp = self.fast.lock().clone();
        let Some(fp) = fp else {
            return list;
        };
        let mut slow = BioList::new();
        let mut fast = 0;
        while let Some(bio) = list.pop() {
            match self.try_fast(&fp, bio) {
                Ok(()) => fast += 1,
                Err(bio) => slow.push(bio),
            }
        }
        if fast > 0 {
            self.fast_bios.fetch_add(fast, Ordering::Relaxed);
        }
        slow
    }

    /// Where the fast path would do `bio`'s I/O: which delta's file (how far
    /// below the top) and where in it. Every cluster it covers is one `fp`
    /// knows, all in the same delta, each right after the one before in the
    /// file, so that one I/O serves it (a 1 MiB read or write of an image
    /// written in order: one I/O, not 16 through the worker); a write only
    /// into clusters the top owns, without PREFLUSH, and with FUA only
    /// while the top's metadata is durable (`Inner::md_durable`).
    ///
    /// A FUA write served so is a plain direct write whose bio comes back
    /// when it ends without error (`dm::sync_after_end`) to be made durable
    /// by an fsync of the top (`Inner::sync_fua`): its mapping is durable
    /// already. Through the worker it waits for a pass of the worker, for
    /// every I/O of the table in flight, and the commit's fsync. Not
    /// `IOCB_DSYNC`: a failed write-through cannot say whether the write or
    /// the sync failed, and only the latter is final (`File::fsync`).
    fn fast_target(&self, fp: &Fast, bio: &Bio) -> Option<(usize, u64)> {
        let write = match bio.op() {
            Op::Read => false,
            Op::Write if fp.takes_writes() && self.writable && !bio.is_preflush() => true,
            _ => return None,
        };
        let hdr = &fp.top.hdr;
        let cb = hdr.cluster_bits;
        // A write over several clusters, too: one that ends short on a full
        // host file system (into the holes of a sparse image file) ends
        // with ENOSPC and is parked and written again whole.
        let (vaddr, first, last) = Self::fast_span(fp, bio)?;
        let (below, host) = fp.map.lookup(cb, first, write)?;
        let mut next = host;
        for vci in first + 1..=last {
            next = next.checked_add(hdr.cluster_size())?;
            if fp.map.lookup(cb, vci, write)? != (below, next) {
                return None;
            }
        }
        if write && bio.is_fua() {
            // After the lookups: an entry put under a lock of the state
            // was put after that lock cleared `md_durable` (and fenced), so
            // this sees the clear or a later store, set only once the top
            // is clean again (every mapping durable).
            core::sync::atomic::fence(Ordering::Acquire);
            if !self.md_durable.load(Ordering::Relaxed) || fp.top.file.sync_failed() {
                return None;
            }
        }
        Some((below, host.checked_add(hdr.offset_in_cluster(vaddr))?))
    }

    /// Starts the I/O of `bio` if the fast path serves it (see
    /// `fast_target`); gives it back otherwise.
    fn try_fast(&self, fp: &Fast, bio: Bio) -> Result<(), Bio> {
        // Held from the lookup until the I/O is counted (see the module doc):
        // then it is the I/O's count.
        let Some(hold) = self.inflight.hold() else {
            return Err(bio);
        };
        // A table turned off since the lane took it is no longer kept up to
        // date (its entries may point at clusters freed since).
        if fp.is_dead() {
            return Err(bio);
        }
        match self
            .fast_target(fp, &bio)
            .and_then(|(below, pos)| Some((fp.delta(below)?, pos)))
        {
            Some((delta, pos)) if bio.is_fua() => {
                self.fast_fua.fetch_add(1, Ordering::Relaxed);
                // Its mapping is durable (`fast_target`): once the data
                // landed, a sync makes the write durable (`Inner::sync_fua`).
                dm::sync_after_end(&bio);
                let len = bio.size();
                delta
                    .file
                    .submit_bio_io(BioPart::Whole(bio, hold), 0, len, pos, &self.inflight);
                Ok(())
            }
            Some((delta, pos)) => {
                let len = bio.size();
                delta
                    .file
                    .submit_bio_io(BioPart::Whole(bio, hold), 0, len, pos, &self.inflight);
                Ok(())
            }
            // Queued before the lookup that made its clusters known (the
            // first read of a page, and the bios that came while it was
            // resolved).
            None if Self::reads_zeroes(fp, &bio) => {
                Self::fill_zeroes(bio);
                Ok(())
            }
            None => Err(bio),
        }
    }

    /// Gives the top's metadata the table lanes write it through, the
    /// others none (see `DeltaMd::fence_lanes`). A table replaced here had
    /// no lane write in flight: a resume's had none since the suspend, a
    /// merge's none since its start (`Fast::stop_writes` and the switch
    /// after it), and one turned off takes none after the caller's switch.
    fn fence_top(st: &mut WorkerState) {
        let top = st.top();
        for (i, m) in st.md.iter_mut().enumerate() {
            m.set_fast(if i == top { st.fast.clone() } else { None });
        }
    }

    /// Turns the fast path off: every bio goes through the locked path.
    /// Bios the worker or a lane already took may still use it: callers that need
    /// them gone wait for the bios mapped before (`refs.switch_wait`).
    pub(crate) fn fast_off(&self, st: &mut WorkerState) {
        st.fast = None;
        Self::fence_top(st);
        let old = self.fast.lock().take();
        if let Some(f) = old {
            f.retire();
        }
    }

    /// Turns the fast path on for the chain in `st` with a new, empty
    /// table (for reads only while a merge runs); it stays off if that
    /// cannot be allocated, or if a delta's L1 named one L2 table more
    /// than once when loaded (a damaged image: QEMU never writes one).
    /// There a change of one entry changes a cluster under each name, and
    /// `hot_forget` forgets one: another's lookup or zero bit would stay.
    pub(crate) fn fast_on(&self, st: &mut WorkerState) {
        let aliased = st.md.iter().any(|m| m.count.any_shared());
        let new = if aliased {
            None
        } else {
            Fast::new(&st.deltas, st.merge.is_none()).ok()
        };
        st.fast = new.clone();
        Self::fence_top(st);
        let old = core::mem::replace(&mut *self.fast.lock(), new);
        if let Some(f) = old {
            f.retire();
        }
    }
}
