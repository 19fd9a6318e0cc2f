// SPDX-License-Identifier: GPL-2.0

//! The merge walker: batches of clusters copied with the state locked,
//! runs of allocated clusters read and written as one, moved clusters
//! dropped from the merged delta, and the yielding to guest I/O between
//! batches.

use super::*;

/// The walker.
impl Inner {
    /// Runs (in the merge work item) until the merge is ready, failed or gone.
    pub(crate) fn merge_run(&self) {
        loop {
            let mut st = self.lock_state();
            let start = Ktime::ktime_get();
            if !self.merge_batch(&mut st) {
                break;
            }
            let backoff = st.merge.as_mut().map_or(0, Merge::take_backoff);
            drop(st);
            // Unlocked here: queued guest bios get the state between
            // batches, and other tasks the CPU. If guest bios came since
            // the last batch, they get `YIELD_FACTOR` times as long as the
            // batch took. Out of memory, the retry waits (`batch_failed`).
            if backoff > 0 {
                task::sleep_ms(backoff);
            } else if self.guest_io.swap(false, Ordering::Relaxed) {
                let took = ktime_ms_delta(Ktime::ktime_get(), start);
                let ms = took.saturating_mul(YIELD_FACTOR).clamp(1, YIELD_MAX_MS);
                task::sleep_ms(ms as u32);
            } else {
                task::cond_resched();
            }
        }
    }

    /// Called for every guest bio: the merge walker yields to them.
    pub(crate) fn note_guest_io(&self) {
        // A load first: no cache-line write per bio while the flag is set.
        if !self.guest_io.load(Ordering::Relaxed) {
            self.guest_io.store(true, Ordering::Relaxed);
        }
    }

    /// Copies one batch; returns whether there is more to do.
    fn merge_batch(&self, st: &mut WorkerState) -> bool {
        let Some(m) = st.merge.as_ref() else {
            return false;
        };
        // In `ready`, only the clusters written since (the redo set).
        let redo_only = m.stage == Stage::Ready;
        if !(m.stage == Stage::Copying || (redo_only && m.redo_len > 0))
            || !m.armed
            || self.is_suspending()
        {
            return false;
        }
        // In-place writes started before now must land before we read.
        self.inflight.wait_idle();
        let mut res = self.copy_batch(st);
        // The copies are committed with the next commit (a guest flush, the
        // periodic one, a full cache); here only when the queued decrements
        // grow long, and when everything is copied, so `ready` means durable.
        let dst = m_dst(st);
        let wants = dst
            .and_then(|d| st.md.get(d))
            .is_some_and(|md| md.wants_commit())
            || st
                .merge
                .as_ref()
                .is_some_and(|m| m.moved.len() >= MOVE_BATCH);
        if matches!(res, Ok(false)) || (res.is_ok() && wants) {
            if let Err(e) = self.commit_all(st, false).1 {
                res = Err(e);
            }
            // The copies are durable: drop them from the merged delta.
            if res.is_ok() {
                if let Err(e) = self.drop_moved(st) {
                    res = Err(e);
                }
            }
            self.apply_frees(st);
        }
        let Some(m) = st.merge.as_mut() else {
            return false;
        };
        match res {
            Ok(true) => {
                m.nomem = 0;
                true
            }
            Ok(false) => {
                m.nomem = 0;
                if !redo_only {
                    m.set_stage(Stage::Ready);
                }
                false
            }
            Err(e) => m.batch_failed(e),
        }
    }

    /// Copies up to `BATCH` clusters (a skipped L2 range counts as one);
    /// `Ok(false)` when nothing is left. Out of memory, the cluster it
    /// failed on is left to copy again (the cursor goes back to it, or it
    /// stays in the redo set): a retry (`merge_batch`) copies it.
    fn copy_batch(&self, st: &mut WorkerState) -> Result<bool> {
        let mut budget = BATCH;
        while budget > 0 {
            budget -= 1;
            let m = st.merge.as_mut().ok_or(EINVAL)?;
            let at = m.cursor;
            if at >= m.end {
                if !self.copy_next_redo(st)? {
                    return Ok(false);
                }
                continue;
            }
            if let Err(e) = self.copy_at(st, at, &mut budget) {
                // Copies already done from `at` on are found and made again
                // (in place) by the retry.
                if let Some(m) = st.merge.as_mut().filter(|_| e == ENOMEM) {
                    m.cursor = at;
                }
                return Err(e);
            }
        }
        Ok(true)
    }

    /// Copies the first cluster of the redo set and takes it out of the
    /// set; `Ok(false)` if the set is empty. On error it stays in the set
    /// (out of memory, a retry copies it).
    pub(super) fn copy_next_redo(&self, st: &mut WorkerState) -> Result<bool> {
        let Some(v) = st.merge.as_ref().and_then(Merge::first_redo) else {
            return Ok(false);
        };
        self.copy_cluster(st, v)?;
        if let Some(m) = st.merge.as_mut() {
            m.redo_done(v);
        }
        Ok(true)
    }

    /// Copies what the cluster at the cursor `v` takes: nothing for a range
    /// without an L2 table in the merged delta (skipped whole), a run of
    /// clusters, or the one cluster.
    fn copy_at(&self, st: &mut WorkerState, v: u64, budget: &mut u32) -> Result {
        let m = st.merge.as_mut().ok_or(EINVAL)?;
        let cs = st.deltas.get(m.dst).ok_or(EIO)?.hdr.cluster_size();
        m.cursor = v - v % cs + cs;
        let src = st.deltas.get(m.src).ok_or(EIO)?;
        let md = st.md.get_mut(m.src).ok_or(EIO)?;
        // A table the L1 named more than once when loaded (QEMU never
        // writes one) would be walked once per name: an L1 naming one table
        // 4 Mi times is 2^35 clusters to look at (or, the table in a hole,
        // 4 Mi reads of it) for a file of a few clusters. The merge fails
        // instead (`qemu-img commit` merges such an image offline).
        if let Some(e) = md.l1_entry(&src.hdr, v)? {
            if md.count.is_shared(e.l2_offset) {
                pr_warn!(
                    "dm-qcow2: image {}: its L1 table named an L2 table more than once when loaded: merge stopped\n",
                    m.src
                );
                return Err(crate::kernel_abstractions::task::code::euclean());
            }
        }
        // Where the merged delta has no L2 table (or one past the end of
        // its file or in a hole of it, which reads as zeroes) it provides
        // nothing: the walk skips the table's whole range.
        if md
            .l1_entry_in_file(&src.file, &src.hdr, v, HoleWord::Confirm)?
            .is_none()
        {
            let left = crate::io::l2_range_left(&src.hdr, v)?;
            let next = v.saturating_add(left);
            let m = st.merge.as_mut().ok_or(EINVAL)?;
            // Cluster-aligned in `dst` too (its clusters may be
            // smaller, never the table's range unaligned to them).
            m.cursor = m.cursor.max(next - next % cs).min(m.end);
            return Ok(());
        }
        let n = self.copy_run(st, v, budget.saturating_add(1))?;
        if n > 1 {
            *budget = budget.saturating_sub(n - 1);
            let m = st.merge.as_mut().ok_or(EINVAL)?;
            m.cursor = v.saturating_add(u64::from(n) * cs).min(m.end);
            return Ok(());
        }
        self.copy_cluster(st, v)
    }

    /// Copies the run of clusters from `vaddr` on (at most `max`, within
    /// one L2 table of the receiving delta) that the merged delta holds as
    /// plain data at consecutive host offsets and the receiving delta has
    /// no entry for: what the chain shows there is the merged delta's data.
    /// One read, then one write per run of consecutive new host clusters.
    /// Returns how many clusters it copied; 0 if fewer than two qualify
    /// (the caller copies the cluster the general way).
    fn copy_run(&self, st: &mut WorkerState, vaddr: u64, max: u32) -> Result<u32> {
        let m = st.merge.as_ref().ok_or(EINVAL)?;
        let (src, dst, end) = (m.src, m.dst, m.end);
        let room = m.buf.as_ref().map_or(0, |b| b.len() as u64);
        let (s, d) = (st.delta(src)?, st.delta(dst)?);
        let cs = d.hdr.cluster_size();
        if s.hdr.cluster_size() != cs
            || d.hdr.extended_l2()
            || s.hdr.extended_l2()
            || vaddr % cs != 0
            || vaddr >= end
        {
            return Ok(0);
        }
        let left = crate::io::l2_range_left(&d.hdr, vaddr)?.min(end - vaddr);
        let max = u64::from(max)
            .min(RUN_MAX as u64)
            .min(room / cs)
            .min(left / cs) as usize;
        if max < 2 {
            return Ok(0);
        }
        let mut first = 0;
        let mut n = 0;
        while n < max {
            let v = vaddr + n as u64 * cs;
            let Cluster::Normal { host, .. } = self.cluster(st, src, v)? else {
                break;
            };
            if n == 0 {
                first = host;
            } else if Some(host) != first.checked_add(n as u64 * cs) {
                break;
            }
            if !matches!(self.cluster(st, dst, v)?, Cluster::Unallocated) {
                break;
            }
            n += 1;
        }
        if n < 2 {
            return Ok(0);
        }
        let bytes = n as u64 * cs;
        let m = st.merge.as_mut().ok_or(EINVAL)?;
        let mut buf = m.buf.take().ok_or(EIO)?;
        let res = self.copy_run_with(st, (&s, &d), dst, vaddr, first, n, &mut buf, bytes);
        if let Some(m) = st.merge.as_mut() {
            m.buf = Some(buf);
        }
        res?;
        let Some(m) = st.merge.as_mut() else {
            return Ok(n as u32);
        };
        if m.moving {
            for i in 0..n {
                m.moved.push(vaddr + i as u64 * cs, GFP_KERNEL)?;
            }
        }
        Ok(n as u32)
    }

    /// `copy_run`'s I/O: reads the `n` clusters at `first` of `s` (delta
    /// `src`) into `buf`, allocates `n` clusters in `d` (delta `dst`),
    /// writes them and points `dst`'s entries from `vaddr` on at them. On
    /// error, the new clusters nothing points at yet are freed.
    #[allow(clippy::too_many_arguments)]
    fn copy_run_with(
        &self,
        st: &mut WorkerState,
        (s, d): (&Delta, &Delta),
        dst: usize,
        vaddr: u64,
        first: u64,
        n: usize,
        buf: &mut [u8],
        bytes: u64,
    ) -> Result {
        let hdr = &d.hdr;
        let cs = hdr.cluster_size();
        let data = buf.get_mut(..bytes as usize).ok_or(EIO)?;
        s.file.read_full(data, first)?;
        let md = st.md.get_mut(dst).ok_or(EIO)?;
        let l2_off = self.l2_for_write(md, &d.file, hdr, vaddr)?;
        let mut hosts = [0u64; RUN_MAX];
        let mut got = 0;
        let mut res = Ok(());
        for h in hosts.iter_mut().take(n) {
            match md.alloc_cluster(&d.file, hdr) {
                Ok(c) => {
                    *h = c;
                    got += 1;
                }
                Err(e) => {
                    res = Err(e);
                    break;
                }
            }
        }
        // Writes, one per run of consecutive host clusters.
        let mut i = 0;
        while res.is_ok() && i < got {
            let start = hosts.get(i).copied().ok_or(EIO)?;
            let mut k = 1;
            while i + k < got && hosts.get(i + k).copied() == start.checked_add(k as u64 * cs) {
                k += 1;
            }
            let piece = data.get(i * cs as usize..(i + k) * cs as usize).ok_or(EIO);
            res = piece.and_then(|p| d.file.write_full(p, start));
            i += k;
        }
        // Data is written: now make it reachable.
        let mut set = 0;
        while res.is_ok() && set < got {
            let v = vaddr + set as u64 * cs;
            let raw = fmt::encode_l2_normal(hosts.get(set).copied().ok_or(EIO)?, true);
            // An entry of the fast path pointing into `dst` (or below) is
            // forgotten before `dst`'s entry changes (see `hot`).
            st.hot_forget(dst, v);
            res = st
                .md
                .get_mut(dst)
                .ok_or(EIO)
                .and_then(|md| md.set_l2_entry(&d.file, hdr, l2_off, v, raw, 0))
                .map_err(|e| self.md_error(e));
            if res.is_ok() {
                set += 1;
            }
        }
        for h in hosts.iter().take(got).skip(set) {
            self.free_unused(st, dst, *h, cs);
        }
        res
    }

    /// Copies the cluster of `vaddr` into the receiving delta if the merged
    /// one provides anything there.
    pub(super) fn copy_cluster(&self, st: &mut WorkerState, vaddr: u64) -> Result {
        let m = st.merge.as_mut().ok_or(EINVAL)?;
        let (dir, src, dst) = (m.dir, m.src, m.dst);
        let mut buf = m.buf.take().ok_or(EIO)?;
        let res = self.copy_cluster_with(st, dir, src, dst, vaddr, &mut buf);
        let Some(m) = st.merge.as_mut() else {
            return res.map(|_| ());
        };
        m.buf = Some(buf);
        if res? && m.moving {
            m.moved.push(vaddr, GFP_KERNEL)?;
        }
        Ok(())
    }

    /// Drops the clusters copied so far from the merged delta (its L2
    /// entries cleared, its references queued for release), the copies
    /// being durable (a commit since), and commits the removals: a crash
    /// leaves every cluster readable from one of the two deltas. Clusters
    /// written again since their copy are skipped (copied, and dropped,
    /// again later).
    pub(super) fn drop_moved(&self, st: &mut WorkerState) -> Result {
        let Some(m) = st.merge.as_mut() else {
            return Ok(());
        };
        if m.moved.is_empty() {
            return Ok(());
        }
        let (src, dst) = (m.src, m.dst);
        // The copies are durable before any entry of `src` goes: a copy
        // into a cluster `dst` had already is a plain write in place, which
        // no commit covers (one skips a delta with nothing dirty).
        st.delta(dst)?.file.fsync()?;
        let Some(m) = st.merge.as_mut() else {
            return Ok(());
        };
        let moved = core::mem::replace(&mut m.moved, KVec::new());
        for v in moved.iter() {
            if st.merge.as_ref().is_some_and(|m| m.redo.get(v).is_some()) {
                continue;
            }
            if let Err(e) = self.drop_cluster(st, src, *v) {
                // All of them again later (dropping a dropped one does
                // nothing; nothing was added meanwhile): none is kept in
                // `src` for good (a merge that goes on after an error).
                if let Some(m) = st.merge.as_mut() {
                    m.moved = moved;
                }
                return Err(e);
            }
        }
        self.commit_all(st, false).1
    }

    /// Makes the cluster of `vaddr` unallocated in delta `d` (reads fall
    /// through to the delta below) and queues the release of what it held.
    fn drop_cluster(&self, st: &mut WorkerState, d: usize, vaddr: u64) -> Result {
        let delta = st.delta(d)?;
        let hdr = &delta.hdr;
        let md = st.md.get_mut(d).ok_or(EIO)?;
        if md.l1_entry(hdr, vaddr)?.is_none() {
            return Ok(());
        }
        // A table shared with an internal snapshot gets its own copy first.
        let l2_off = md.ensure_l2(&delta.file, hdr, vaddr)?;
        let (raw, bitmap) = md.l2_entry(&delta.file, hdr, l2_off, vaddr)?;
        let c = fmt::decode_l2(hdr, raw, bitmap).map_err(|e| corrupt(d, e))?;
        if unallocated(&c) {
            return Ok(());
        }
        // The fast path's reads of the cluster stop here (see `target::fast`).
        st.hot_forget(d, vaddr);
        let md = st.md.get_mut(d).ok_or(EIO)?;
        md.set_l2_entry(&delta.file, hdr, l2_off, vaddr, 0, 0)?;
        self.free_entry(st, d, &c);
        Ok(())
    }

    fn copy_cluster_with(
        &self,
        st: &mut WorkerState,
        dir: Dir,
        src: usize,
        dst: usize,
        vaddr: u64,
        buf: &mut [u8],
    ) -> Result<bool> {
        let sc = self.cluster(st, src, vaddr)?;
        if unallocated(&sc) {
            return Ok(false);
        }
        let dc = self.cluster(st, dst, vaddr)?;
        // Forward: what the upper delta defines itself stays as it is.
        if dir == Dir::Forward && covers(&dc) {
            return Ok(false);
        }
        let d = st.delta(dst)?;
        let cs = d.hdr.cluster_size();
        let base = vaddr - vaddr % cs;
        if all_zero(&sc) && d.hdr.version >= 3 && (dir == Dir::Backward || unallocated(&dc)) {
            self.zero_cluster(st, dst, base, true)?;
            return Ok(true);
        }
        let buf = buf.get_mut(..cs as usize).ok_or(EIO)?;
        // What the chain shows there, from the upper of the two down.
        self.read_into(st, src.max(dst), base, buf)?;
        self.write_piece(st, dst, Src::Buf(buf), base, cs, false, None)?;
        Ok(true)
    }
}
