// SPDX-License-Identifier: GPL-2.0

//! Suspend and resume: what the cache holds goes to the images, the top is
//! trimmed and the dirty bit follows `kernel_sets_dirty_bit`; on resume the
//! images are read again (userspace may have changed them). Also the
//! header updates (dirty, corrupt, backing file) they and merges make.

use super::*;

impl Inner {
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
        page.get_mut(HDR_INCOMPAT..HDR_INCOMPAT + 8)
            .ok_or(EIO)?
            .copy_from_slice(&incompat.to_be_bytes());
        page.get_mut(HDR_AUTOCLEAR..HDR_AUTOCLEAR + 8)
            .ok_or(EIO)?
            .fill(0);
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
        page.get_mut(HDR_INCOMPAT..HDR_INCOMPAT + 8)
            .ok_or(EIO)?
            .copy_from_slice(&incompat.to_be_bytes());
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
        page.get_mut(HDR_BACKING..HDR_BACKING + 12)
            .ok_or(EIO)?
            .fill(0);
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
                pr_err!(
                    "dm-qcow2: image {}: {}\n",
                    i,
                    e.msg.to_str().unwrap_or("bad header")
                );
                e.err
            })?;
            deltas.push(
                Delta {
                    file: old.file.try_clone(),
                    hdr,
                },
                GFP_KERNEL,
            )?;
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
            pr_info!(
                "dm-qcow2: cluster size changed from {} to {} bytes\n",
                old,
                cs
            );
            Some(ClusterBufs::new(cs).inspect_err(|_| {
                pr_err!(
                    "dm-qcow2: no memory for buffers of the new cluster size {}\n",
                    cs
                );
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

impl Qcow2 {
    /// Makes everything written durable: the top (read-write tables) and a
    /// merge's receiving delta.
    pub(super) fn sync(&self, st: &WorkerState) {
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

    /// `presuspend`: a running merge is cancelled, parked writes get a last try.
    pub(super) fn suspend_begin(&self) {
        let inner = &self.inner;
        inner.suspending.store(true, Ordering::Release);
        {
            let mut st = inner.lock_state();
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

    /// `presuspend_undo`: the suspend was abandoned.
    pub(super) fn suspend_undo(&self) {
        // The suspend was abandoned; a cancelled merge stays cancelled.
        self.inner.suspending.store(false, Ordering::Release);
    }

    /// `postsuspend`: nothing runs any more; the images are settled, trimmed and synced.
    pub(super) fn suspend_end(&self) {
        let inner = &self.inner;
        // What may queue work goes before what it queues: an express lane
        // may still finish a flush's batch (`Inner::serve_here`) after the
        // bio ended and queue the commit timer, the walker or the worker;
        // the retry and the timer queue the worker. (The walker saw the
        // merge cancelled by presuspend and stops.) The count's walk is not
        // waited for: it works in batches under the state mutex, and the
        // first batch after the settle below sees the state stale and stops
        // (`count_all`).
        self.lanes.flush();
        inner.commit_wq.flush();
        inner.retry_wq.flush();
        inner.merge_wq.flush();
        inner.wq.flush();
        let mut st = inner.lock_state();
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
        // An fsync failed since the load (the one above, or a merge's, which
        // latches nothing itself): the images need a check (see
        // `File::fsync`), and
        // the top keeps its dirty bit, which tells QEMU to repair the
        // refcounts.
        let sync_failed = st.deltas.iter().any(|d| d.file.sync_failed());
        if sync_failed {
            inner.latch_wants_check();
        }
        st.stale = true;
        st.gang.release_spare();
        if inner.writable && param::kernel_sets_dirty_bit() && settled.is_ok() && !sync_failed {
            if let Ok(top) = st.delta(st.top()) {
                if let Err(e) = inner.set_dirty(&top, false) {
                    pr_err!("dm-qcow2: cannot clear the dirty bit: {:?}\n", e);
                }
            }
        }
    }

    /// `preresume`: refused while wants_check; the images are read again.
    pub(super) fn resume_begin(&self) -> Result {
        let inner = &self.inner;
        if inner.wants_check() {
            pr_err!("dm-qcow2: metadata may be inconsistent: reload after qemu-img check -r all\n");
            return Err(EIO);
        }
        let mut st = inner.lock_state();
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
            // The device stays suspended, and the images may change before
            // the next resume (a `qemu-img check -r`): that one reads them
            // again. Nothing was written since they were settled.
            st.stale = true;
        })
    }

    /// `resume`.
    pub(super) fn resume_end(&self) {
        self.inner.suspending.store(false, Ordering::Release);
        // The metadata was (re)loaded: count what the status line shows now,
        // in the background, so that `dmsetup status` finds it done.
        self.inner.kick_count();
    }
}
