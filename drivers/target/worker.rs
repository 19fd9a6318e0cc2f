// SPDX-License-Identifier: GPL-2.0

//! The I/O worker and the work items beside it: bios taken in batches (the
//! fast path's first, see `fast`), the batch's commit and the periodic
//! one, parking on ENOSPC and the retry, the merge walker's entry point.

use super::*;

/// An error a retry can get past: `ENOSPC` (writes wait for space, "Running
/// out of space") and `ENOMEM` (the next commit or bio may find memory).
/// A metadata commit that fails with one keeps its dirty pages and neither
/// records a writeback error nor latches wants_check: nothing on disk is
/// worse than after a crash at that point, and the next commit completes it.
pub(crate) fn transient(e: Error) -> bool {
    e == ENOSPC || e == ENOMEM
}

/// The I/O worker: processes queued bios.
impl WorkItem<0> for Inner {
    type Pointer = Arc<Inner>;

    fn run(this: Arc<Inner>) {
        task::no_io(|| {
            let mut parked = false;
            let mut locked = false;
            loop {
                loop {
                    let late = this.late_nospc.take();
                    if !late.is_empty() {
                        locked = true;
                        let mut st = this.lock_state();
                        parked |= this.park_late(&mut st, late);
                    }
                    let list = this.pending.lock().take();
                    this.queued_bios.fetch_sub(list.len(), Ordering::Relaxed);
                    if list.is_empty() {
                        if this.commit_due.load(Ordering::Acquire) {
                            locked = true;
                            let mut st = this.lock_state();
                            parked |= this.sync_batch(&mut st);
                        }
                        break;
                    }
                    // One plug per batch: the direct I/O of its bios (4 KiB
                    // writes next to each other in the file, say) reaches the
                    // host's devices as merged requests. Sleeping (the state
                    // mutex, a commit's writes) sends what it holds first.
                    let mut st = match task::plugged(|| this.process_batch(list, &mut parked)) {
                        Some(st) => st,
                        None => continue,
                    };
                    locked = true;
                    // A merge waiting in `ready` copies what was written since
                    // in the background (bounded redo set).
                    if st
                        .merge
                        .as_mut()
                        .is_some_and(|m| core::mem::take(&mut m.redo_kick))
                    {
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
                let st = this.lock_state();
                if st.parked.is_empty() {
                    this.enospc_episode.store(false, Ordering::Release);
                } else {
                    let _ = this.retry_wq.enqueue::<_, 2>(this.clone());
                }
            }
            if parked {
                this.link.table_event();
            }
        });
    }
}

/// The merge walker.
impl WorkItem<1> for Inner {
    type Pointer = Arc<Inner>;

    fn run(this: Arc<Inner>) {
        task::no_io(|| this.merge_run());
    }
}

/// The allocated-cluster counts (status INFO `clusters=`) of every delta
/// whose metadata was loaded since, a batch at a time, with the state
/// unlocked in between (guest I/O goes on).
impl WorkItem<4> for Inner {
    type Pointer = Arc<Inner>;

    fn run(this: Arc<Inner>) {
        task::no_io(|| this.count_all());
    }
}

/// The sync of the fast path's FUA writes whose data landed
/// (`Inner::sync_fua`), on an express queue (`fast::Lanes::queue_sync`).
impl WorkItem<5> for Inner {
    type Pointer = Arc<Inner>;

    fn run(this: Arc<Inner>) {
        task::no_io(|| this.sync_fua());
    }
}

/// The periodic commit: metadata changed by writes that did not wait for a
/// commit (all but flushes and FUA) is written out within about
/// `COMMIT_SLICES` tenths of a second (ext4's default commit interval; dm-thin
/// commits every second, QEMU only on flush). A guest file system flushes at
/// least that often itself; the commit bounds what a power cut loses of a
/// workload that never flushes.
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
        let _ = this.wq.enqueue::<_, 0>(this.clone());
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
    /// Serves `list`: the fast path's bios first, then the others with the
    /// state locked and the batch's commit. Returns the state, still locked,
    /// if it took it; `parked` notes a table event (see `note_enospc`).
    fn process_batch(self: &Arc<Self>, list: BioList, parked: &mut bool) -> Option<StateGuard<'_>> {
        let slow = self.serve_fast(list);
        if slow.is_empty() {
            return None;
        }
        Some(self.process_locked(slow, parked))
    }

    /// Serves `slow` with the state locked, then the batch's commit (see
    /// `sync_batch`); returns the state, still locked.
    fn process_locked(self: &Arc<Self>, mut slow: BioList, parked: &mut bool) -> StateGuard<'_> {
        let mut st = self.lock_state();
        while let Some(bio) = slow.pop() {
            *parked |= self.process(&mut st, bio);
        }
        self.flush_cow_gang(&mut st);
        *parked |= self.sync_batch(&mut st);
        st
    }

    /// Serves `slow` (empty flushes: `fast::Lanes::queue_flush`) in the
    /// caller's context, an express lane's: what a pass of the worker does
    /// for them, without waking it. The worker is kicked only to end an ENOSPC
    /// episode or arm its retry, which its pass does.
    pub(super) fn serve_here(self: &Arc<Self>, slow: BioList) {
        self.express_flushes.fetch_add(
            u64::try_from(slow.len()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        let mut parked = false;
        let mut st = self.process_locked(slow, &mut parked);
        let redo = st
            .merge
            .as_mut()
            .is_some_and(|m| core::mem::take(&mut m.redo_kick));
        drop(st);
        if redo {
            self.kick_merge();
        }
        if parked {
            self.link.table_event();
        }
        if self.enospc_episode.load(Ordering::Acquire) {
            self.kick_worker();
        }
    }

    /// Makes the FUA writes of the fast path whose data landed durable
    /// (`fua_landed`, see `Inner::fast_target`): the commit a batch of the
    /// worker ends with for its FUA writes (the top fsynced, and whatever
    /// else is dirty committed first), then ends them with its result. Their
    /// mappings were durable when they were served, and their data landed
    /// before they came here, so unlike the worker's this does not wait for
    /// the table's I/O in flight first (the commit still does if something
    /// was allocated since the last one, and so do the frees it applies). A
    /// failed fsync is final (`File::fsync`), as there. Each
    /// holds its in-flight reference meanwhile: a merge's start waits for
    /// them, so the top is the one they were written to.
    pub(super) fn sync_fua(self: &Arc<Self>) {
        let mut list = self.fua_landed.take();
        if list.is_empty() {
            return;
        }
        let res = {
            let mut st = self.lock_state();
            let (res, _) = self.commit_all(&mut st, true);
            self.apply_frees(&mut st);
            self.arm_commit(&st);
            res
        };
        // An ENOSPC end parks the bio (`dm::Target::park_nospc`): written
        // again by the worker, as a FUA write of its own.
        while let Some(bio) = list.pop() {
            bio.end(res);
        }
    }

    /// Ends `bio` with its result, or parks it on ENOSPC (returns true if
    /// that raises a table event, see `note_enospc`). A plain write inside
    /// one cluster may leave its copy-on-write fill to the batch's gang
    /// (`io::cow`), which runs before any other bio but a read of clusters
    /// it does not hold, before a write into or a read of a cluster it
    /// holds, and when full.
    fn process(&self, st: &mut WorkerState, bio: Bio) -> bool {
        let join = self.writable && self.may_join_gang(st, &bio);
        if !st.gang.is_empty() {
            // A read leaves the gang alone unless it reads one of its
            // clusters; every other bio that may not join flushes it.
            let flush = st.deltas.last().map_or(true, |top| {
                let hdr = &top.hdr;
                let held = || {
                    let start = bio.sector().saturating_mul(SECTOR);
                    let end = start.saturating_add(u64::from(bio.size()));
                    st.gang.covers(st.top(), start, end, hdr.cluster_bits)
                };
                match bio.op() {
                    _ if join => st.gang.full(hdr.cluster_size()) || held(),
                    Op::Read => held(),
                    _ => true,
                }
            });
            if flush {
                self.flush_cow_gang(st);
            }
        }
        st.gang.open = join;
        let res = match bio.op() {
            Op::Read => self.read_bio(st, &bio).map(|()| false),
            Op::Write | Op::Flush if self.writable => self.write_bio(st, &bio),
            Op::Discard | Op::WriteZeroes if self.writable => self.zero_bio(st, &bio),
            _ => Err(EIO),
        };
        st.gang.open = false;
        match res {
            // A flush, or a FUA write (its data and its mapping durable before
            // it completes): one commit at the end of the batch covers them
            // all.
            Ok(true) => {
                st.fua |= bio.is_fua();
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
            Err(e)
                if e == ENOSPC
                    && bio.op() != Op::Read
                    && !self.suspending.load(Ordering::Acquire) =>
            {
                // Parked, it holds no in-flight reference: a merge may
                // start or complete meanwhile (as in the C target).
                dm::release_inflight(&bio);
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
                dm::retake_inflight(&bio);
                self.push_pending(&mut self.pending.lock(), bio);
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
        // A FUA bio's data went as plain direct writes (not IOCB_DSYNC, whose
        // failure cannot tell a bad sector from a failed cache flush, and
        // after a failed flush no later one may pass: `File::fsync`). The
        // fsync that makes it durable comes after it landed.
        let fua = core::mem::replace(&mut st.fua, false);
        if fua {
            self.inflight.wait_idle();
        }
        // The bios changed the top only; a merge's receiving delta failing
        // its commit fails the merge instead.
        let (res, _) = self.commit_all(st, flush || fua);
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
        // Not for an image whose fsync failed: no commit of it can succeed
        // (see `File::fsync`); flushes still try, and fail.
        let pending = st
            .md
            .iter()
            .zip(st.deltas.iter())
            .any(|(m, d)| (m.is_dirty() || m.has_frees()) && !d.file.sync_failed());
        if st.stale || st.no_timer || !pending {
            return;
        }
        if self.commit_armed.swap(true, Ordering::AcqRel) {
            return;
        }
        let queued = matches!(self.commit_wq.enqueue::<_, 3>(self.clone()), Ok(Ok(())));
        if !queued {
            self.commit_armed.store(false, Ordering::Release);
        }
    }

    /// Commits the dirty metadata of every delta (`flush`: fsync the top in
    /// any case). Returns the top's result and the first error of any. On
    /// error the cache keeps what is not durable as dirty (the next commit
    /// writes it again) and the error is recorded; one that is not
    /// [`transient`] latches wants_check (the image may keep refcounts of
    /// references that never became durable: leaks); a merge whose
    /// receiving delta (not the top) failed fails.
    pub(crate) fn commit_all(&self, st: &mut WorkerState, flush: bool) -> (Result, Result) {
        let top = st.top();
        let (mut top_res, mut all) = (Ok(()), Ok(()));
        for d in 0..st.md.len() {
            let Ok(delta) = st.delta(d) else { break };
            let Some(md) = st.md.get_mut(d) else { break };
            if md.take_leaked() {
                pr_err!("dm-qcow2: image {}: leaked clusters: wants_check\n", d);
                self.latch_wants_check();
            }
            let force = flush && d == top;
            if !force && !md.is_dirty() {
                continue;
            }
            let Err(e) = md.commit(&delta.file, force) else {
                continue;
            };
            pr_err!("dm-qcow2: image {}: metadata commit failed: {:?}\n", d, e);
            self.md_error(e);
            if !transient(e) {
                self.latch_wants_check();
            }
            if all.is_ok() {
                all = Err(e);
            }
            if d == top {
                top_res = Err(e);
            } else if let Some(m) = st.merge.as_mut().filter(|m| m.dst == d && e != ENOMEM) {
                // Out of memory, the pages stay dirty for the next commit
                // and the walker's batch is tried again (`batch_failed`).
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
                pr_err!(
                    "dm-qcow2: image {}: refcount update failed ({:?}): wants_check\n",
                    d,
                    e
                );
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

    pub(super) fn queue(self: &Arc<Self>, bio: Bio) {
        self.push_pending(&mut self.pending.lock(), bio);
        self.kick_worker();
    }

    /// Queues the bios of `list` for the worker.
    pub(super) fn queue_list(self: &Arc<Self>, mut list: BioList) {
        {
            let mut pending = self.pending.lock();
            while let Some(bio) = list.pop() {
                self.push_pending(&mut pending, bio);
            }
        }
        self.kick_worker();
    }

    /// Appends `bio` to `pending` (the worker's queue, locked), counted as
    /// queued until the worker takes it: a bio that finds the worker with
    /// bios to do does not find the table idle (`fast::Lanes::queue`).
    fn push_pending(&self, pending: &mut BioList, bio: Bio) {
        self.queued_bios.fetch_add(1, Ordering::Relaxed);
        pending.push(bio);
    }

    fn kick_worker(self: &Arc<Self>) {
        // Already queued: the running or pending pass will see the bio.
        let _ = self.wq.enqueue::<_, 0>(self.clone());
    }

    /// Queues the parked bios again.
    pub(super) fn unpark(self: &Arc<Self>) {
        let mut parked = self.lock_state().parked.take();
        let mut n = 0;
        {
            let mut pending = self.pending.lock();
            while let Some(bio) = parked.pop() {
                // Back to work: under the mapping of now, seen by switches.
                dm::retake_inflight(&bio);
                self.push_pending(&mut pending, bio);
                n += 1;
            }
        }
        if n > 0 {
            self.parked_count.fetch_sub(n, Ordering::AcqRel);
            let _ = self.wq.enqueue::<_, 0>(self.clone());
        }
    }

    /// Whether every delta's allocated-cluster count is known. (Not after a
    /// failed walk: the status asks for another try, then shows `?`.)
    pub(crate) fn counted(&self) -> bool {
        Self::status_counts(&self.status.lock()).all(Option::is_some)
    }

    /// Starts the count (if it is not queued already).
    pub(crate) fn kick_count(self: &Arc<Self>) {
        let _ = self.count_wq.enqueue::<_, 4>(self.clone());
    }

    /// Completes the allocated-cluster count of every delta that needs it,
    /// a batch at a time, with the state unlocked in between. A delta whose
    /// walk fails (an unreadable L2 table) is tried again by the next run
    /// (the next status line queues one).
    fn count_all(&self) {
        let mut st = self.lock_state();
        for md in st.md.iter_mut() {
            md.count.failed = false;
        }
        loop {
            // Suspended (the images settled, maybe in other hands now): the
            // walk's cache reads may commit dirty pages a failed settle left.
            // The resume's reload counts again.
            if st.stale {
                return;
            }
            // Deltas may change while unlocked (a merge completes): look again.
            let next = (0..st.deltas.len()).find(|&i| {
                let (Some(d), Some(md)) = (st.deltas.get(i), st.md.get(i)) else {
                    return false;
                };
                !md.count.failed && md.count.value(&d.hdr).is_none()
            });
            let Some(i) = next else {
                return;
            };
            if let (Ok(d), Some(md)) = (st.delta(i), st.md.get_mut(i)) {
                if count::step(md, &d.file, &d.hdr, count::BATCH_ENTRIES).is_err() {
                    md.count.failed = true;
                }
            }
            drop(st);
            task::cond_resched();
            st = self.lock_state();
        }
    }

    /// Starts the merge walker (if it is not queued already).
    pub(crate) fn kick_merge(self: &Arc<Self>) {
        let _ = self.merge_wq.enqueue::<_, 1>(self.clone());
    }

    /// A suspend is under way (or done): no background copying.
    pub(crate) fn is_suspending(&self) -> bool {
        self.suspending.load(Ordering::Acquire)
    }

    /// Records an L1/L2 writeback error. Not a transient one
    /// ([`transient`]): the cache keeps what was not written, and the
    /// next commit writes it.
    pub(crate) fn md_error(&self, e: Error) -> Error {
        if !transient(e) {
            self.errors
                .md_writeback
                .store(-e.to_errno(), Ordering::Relaxed);
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
}
