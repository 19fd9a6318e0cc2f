// SPDX-License-Identifier: GPL-2.0

//! Writes into delta `d`: in place, into new clusters, with copy on
//! write of what the chain shows below; frees of clusters no entry needs.

use super::*;

/// Write path.
impl Inner {
    /// Writes `bio` into the top delta. Returns whether the bio must wait
    /// for the batch's commit before it completes: an empty flush, or a
    /// FUA write (its data is durable only after an fsync that follows it,
    /// see `Inner::sync_batch`); a flush with data commits before its data
    /// goes. Other writes complete once their
    /// data is written, like on a disk with a volatile write cache: what
    /// they changed in the metadata is committed by the next flush (or the
    /// periodic commit, see `Inner::sync_batch`).
    pub(crate) fn write_bio(&self, st: &mut WorkerState, bio: &Bio) -> Result<bool> {
        let d = st.top();
        let flush = bio.is_preflush() || bio.op() == Op::Flush;
        let size = u64::from(bio.size());
        if flush && size == 0 {
            // Everything acknowledged so far is in the file (data written
            // before it completed) or in the metadata cache: the batch's
            // commit writes the cache out in order and ends with an fsync
            // that makes it all durable; the bio completes after it.
            st.flush = true;
            return Ok(true);
        }
        if flush {
            // A flush with data (a journal's commit record): what completed
            // before it must be durable before its data may land, or a
            // crash could keep the record without the blocks it commits.
            // So the commit comes first, here; the data goes after it.
            // (Device-mapper sends such a bio's flush on its own first, as
            // an empty flush, and the data without REQ_PREFLUSH after it
            // completed: `dm.c`'s `bio_is_flush_with_data`. This holds if
            // that ever changes.)
            let (res, _) = self.commit_all(st, true);
            res?;
        }
        let fua = bio.is_fua();
        let mut vaddr = bio.sector().checked_mul(SECTOR).ok_or(EIO)?;
        let cs = st.delta(d)?.hdr.cluster_size();
        let mut done = 0u64;
        // In-place pieces that follow one another in the file go as one
        // direct I/O (not one per cluster). If a later piece
        // fails, the run is not started: the bio fails (or is parked and
        // written again whole) anyway.
        let mut run = None;
        while done < size {
            let len = (cs - vaddr % cs).min(size - done);
            let src = Src::Bio(bio, done as u32);
            self.write_piece(st, d, src, vaddr, len, fua, Some(&mut run))?;
            vaddr += len;
            done += len;
        }
        if let Some(r) = run {
            self.start_run(st, d, bio, r)?;
        }
        Ok(fua)
    }

    /// Starts `run` of `bio` in delta `d`, unless metadata allocated since
    /// its pieces were checked (pieces after them in the bio) now overlaps
    /// it: only with damaged refcounts, see `overlap_error`.
    fn start_run(&self, st: &mut WorkerState, d: usize, bio: &Bio, run: InPlaceRun) -> Result {
        if let Some(what) = st
            .md
            .get(d)
            .and_then(|m| m.overlap(run.pos, u64::from(run.len)))
        {
            return Err(self.overlap_error(st, d, what, run.pos));
        }
        run.start(&st.delta(d)?.file, bio, &self.inflight);
        Ok(())
    }

    /// Writes `[vaddr, vaddr + len)` (inside one cluster) of delta `d` from
    /// `src`. Returns whether the mapping changed (copy-on-write), as opposed
    /// to an in-place write (in flight for a bio, or pending in `run`; done
    /// for a buffer). With `run`, an in-place piece of a bio extends the run
    /// if it follows it (in the bio and in the file), else starts the run's
    /// I/O and begins a new one (the caller starts the last).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn write_piece(
        &self,
        st: &mut WorkerState,
        d: usize,
        src: Src<'_>,
        vaddr: u64,
        len: u64,
        fua: bool,
        run: Option<&mut Option<InPlaceRun>>,
    ) -> Result<bool> {
        let delta = st.delta(d)?;
        let fast = st.fast_for(d);
        let hdr = &delta.hdr;
        let off = hdr.offset_in_cluster(vaddr);
        let (lower, md) = st.md.split_at_mut(d);
        let md = md.first_mut().ok_or(EIO)?;
        let l2_off = self.l2_for_write(md, &delta.file, hdr, vaddr)?;
        let (raw, bitmap) = md.l2_entry(&delta.file, hdr, l2_off, vaddr)?;
        if let (Some(f), Some(below)) = (&fast, st.deltas.get(..d)) {
            Self::warm(f, md, hdr, l2_off, vaddr, (below, lower));
        }
        let c = fmt::decode_l2(hdr, raw, bitmap).map_err(|e| corrupt(d, e))?;
        // A running merge must see this change of `d`.
        self.merge_note_write(st, d, vaddr)?;

        // Clusters (or subclusters) of our own are overwritten in place.
        let in_place = match c {
            Cluster::Normal { host, copied: true } => Some(host),
            Cluster::Extended {
                host: Some(h),
                copied: true,
                alloc,
                ..
            } if subclusters_set(hdr, alloc, off, len) => Some(h),
            _ => None,
        };
        if let Some(h) = in_place {
            let pos = h.checked_add(off).ok_or(EIO)?;
            if let Some(what) = st.md.get(d).and_then(|m| m.overlap(pos, len)) {
                return Err(self.overlap_error(st, d, what, pos));
            }
            if let (Some(f), false) = (&fast, hdr.extended_l2()) {
                f.map
                    .put(hdr.cluster_bits, vaddr >> hdr.cluster_bits, h, true);
            }
            match src {
                Src::Bio(bio, boff) => {
                    if let Some(m) = st.md.get_mut(d) {
                        m.note_in_place(h);
                    }
                    let piece = InPlaceRun {
                        pos,
                        boff,
                        len: len as u32,
                    };
                    let Some(run) = run else {
                        piece.start(&delta.file, bio, &self.inflight);
                        return Ok(false);
                    };
                    if !run.as_mut().is_some_and(|r| r.extend(&piece)) {
                        if let Some(prev) = run.replace(piece) {
                            self.start_run(st, d, bio, prev)?;
                        }
                    }
                    return Ok(false);
                }
                Src::Zero => {
                    let zero = IoBuf::new(len as usize)?;
                    delta
                        .file
                        .write_full(zero.get(..len as usize).ok_or(EIO)?, pos)?;
                    return Ok(false);
                }
                Src::Buf(b) => {
                    delta
                        .file
                        .write_full(b.get(..len as usize).ok_or(EIO)?, pos)?;
                    return Ok(false);
                }
            }
        }

        // Extended L2: only the subclusters the write touches are written
        // (and filled from what reads showed), in our own host cluster.
        if let Cluster::Extended {
            host, alloc, zero, ..
        } = c
        {
            if host.is_none() || raw & fmt::L2E_COPIED != 0 {
                return self.write_subclusters(st, d, l2_off, (host, alloc, zero), src, vaddr, len);
            }
        }

        // Copy-on-write: a cluster of our own holding what reads showed
        // so far, with the new data over it.
        // A host cluster shared with an internal snapshot (no COPIED bit) is
        // copied, not reused, and loses our reference once we point elsewhere.
        let md = st.md.get_mut(d).ok_or(EIO)?;
        let own = raw & fmt::L2E_COPIED != 0;
        let (host, fresh, untouched) = match c {
            Cluster::ZeroPrealloc { host } if own => (host, false, false),
            _ => {
                let (h, u) = md.alloc_cluster_untouched(&delta.file, hdr)?;
                (h, true, u)
            }
        };
        if let (false, Some(what)) = (fresh, md.overlap(host, hdr.cluster_size())) {
            return Err(self.overlap_error(st, d, what, host));
        }
        let shared = match c {
            Cluster::Normal {
                host,
                copied: false,
            }
            | Cluster::ZeroPrealloc { host }
                if !own =>
            {
                Some(host)
            }
            Cluster::Extended {
                host: Some(h),
                copied: false,
                ..
            } => Some(h),
            _ => None,
        };
        if let (Src::Bio(bio, boff), true) = (src, fresh) {
            match self.needs_no_fill(st, d, &c, vaddr, len, untouched) {
                Ok(true) => {
                    return self.write_new_cluster(
                        st,
                        d,
                        (bio, boff),
                        (l2_off, host),
                        vaddr,
                        len,
                        shared,
                    );
                }
                Ok(false) => {}
                Err(e) => {
                    self.free_unused(st, d, host, hdr.cluster_size());
                    return Err(e);
                }
            }
        }
        let mut src = src;
        let compressed = matches!(c, Cluster::Compressed { .. });
        // (`gang_point` sets a plain entry: no extended L2 in a gang.)
        let plain = !compressed && !hdr.extended_l2();
        if let (Src::Bio(bio, boff), true, false, true, true) =
            (src, fresh, fua, plain, st.gang.open)
        {
            // Filled with the batch's other fills (`cow`).
            let gang = self.gang_cow(st, d, (bio, boff), (l2_off, host), vaddr, len, shared);
            match gang {
                Ok(None) => return Ok(true),
                Ok(Some(back)) => src = back,
                Err(e) => {
                    self.free_unused(st, d, host, hdr.cluster_size());
                    return Err(e);
                }
            }
        }
        let mut cow = st.cow.take().ok_or(EIO)?;
        let res = self.fill_cow(st, d, &mut cow, src, vaddr, len);
        let res = res.and_then(|()| {
            let buf = cow.get(..hdr.cluster_size() as usize).ok_or(EIO)?;
            delta.file.write_full(buf, host)
        });
        st.cow = Some(cow);
        if res.is_ok() {
            st.hot_forget(d, vaddr);
        }
        let md = st.md.get_mut(d).ok_or(EIO)?;
        let res = res.and_then(|()| {
            // Data is on disk: now make it reachable.
            let (nraw, nbitmap) = if hdr.extended_l2() {
                (host | fmt::L2E_COPIED, u64::from(u32::MAX))
            } else {
                (fmt::encode_l2_normal(host, true), 0)
            };
            md.set_l2_entry(&delta.file, hdr, l2_off, vaddr, nraw, nbitmap)
                .map_err(|e| self.md_error(e))
        });
        if let Err(e) = res {
            if fresh {
                self.free_unused(st, d, host, hdr.cluster_size());
            }
            return Err(e);
        }
        if let Cluster::Compressed { .. } = c {
            self.free_entry(st, d, &c);
        }
        if let Some(old) = shared {
            // Normally still referenced by a snapshot; if this was the last
            // reference, reads in flight to it end before the (deferred)
            // decrement is applied (`Inner::apply_frees`).
            self.free(st, d, old, hdr.cluster_size());
        }
        Ok(true)
    }

    /// Whether a write of `[vaddr, vaddr + len)` to a new host cluster of
    /// delta `d` (whose entry was `c`) needs no copy-on-write fill: the host
    /// cluster was never written (`untouched`: it reads as zeroes) and the
    /// write covers the whole cluster or the chain shows zeroes around it.
    /// Only untouched clusters: if the data I/O fails, the entry points at
    /// zeroes, never at bytes a freed cluster held. Not for extended L2
    /// entries (subclusters) or compressed clusters (their own path).
    fn needs_no_fill(
        &self,
        st: &mut WorkerState,
        d: usize,
        c: &Cluster,
        vaddr: u64,
        len: u64,
        untouched: bool,
    ) -> Result<bool> {
        let hdr = &st.delta(d)?.hdr;
        if !untouched || hdr.extended_l2() {
            return Ok(false);
        }
        let cs = hdr.cluster_size();
        let off = hdr.offset_in_cluster(vaddr);
        if matches!(c, Cluster::Compressed { .. }) {
            return Ok(false);
        }
        if off == 0 && len == cs {
            return Ok(true);
        }
        match c {
            Cluster::Zero | Cluster::ZeroPrealloc { .. } => Ok(true),
            Cluster::Unallocated => {
                // What the chain below shows of the whole cluster.
                let Some(below) = d.checked_sub(1) else {
                    return Ok(true);
                };
                let (_, kind, rl) = self.resolve(st, below, vaddr - off, cs)?;
                Ok(matches!(kind, RunKind::Zero | RunKind::Unallocated) && rl == cs)
            }
            _ => Ok(false),
        }
    }

    /// Writes a bio's piece `[vaddr, vaddr + len)` straight into the new
    /// host cluster `host` of delta `d` (no fill needed: `needs_no_fill`) and
    /// points the L2 entry at `l2_off` at it; `shared`: the host cluster the
    /// entry pointed at before, which loses our reference.
    ///
    /// The data I/O is asynchronous and started before the entry changes, so
    /// any commit from then on (the next one's first step waits for data
    /// I/O in flight, see `DeltaMd::commit`) finds it landed before the
    /// fsync that must make it durable ahead of the entry. The bio completes
    /// when its I/O does (with a FUA bio, after the commit too).
    #[allow(clippy::too_many_arguments)]
    fn write_new_cluster(
        &self,
        st: &mut WorkerState,
        d: usize,
        (bio, boff): (&Bio, u32),
        (l2_off, host): (u64, u64),
        vaddr: u64,
        len: u64,
        shared: Option<u64>,
    ) -> Result<bool> {
        let delta = st.delta(d)?;
        let fast = st.fast_for(d);
        let hdr = &delta.hdr;
        let pos = host.checked_add(hdr.offset_in_cluster(vaddr)).ok_or(EIO)?;
        st.hot_forget(d, vaddr);
        delta.file.submit_bio_io(
            BioPart::Piece(bio.split_ref()),
            boff,
            len as u32,
            pos,
            &self.inflight,
        );
        let md = st.md.get_mut(d).ok_or(EIO)?;
        let res = md
            .set_l2_entry(
                &delta.file,
                hdr,
                l2_off,
                vaddr,
                fmt::encode_l2_normal(host, true),
                0,
            )
            .map_err(|e| self.md_error(e));
        if let Err(e) = res {
            // Nothing points at the cluster: free it, once the data I/O to
            // it is over (it could be handed out again at once).
            self.inflight.wait_idle();
            self.free_unused(st, d, host, hdr.cluster_size());
            return Err(e);
        }
        if let Some(f) = &fast {
            f.map
                .put(hdr.cluster_bits, vaddr >> hdr.cluster_bits, host, true);
        }
        if let Some(old) = shared {
            self.free(st, d, old, hdr.cluster_size());
        }
        Ok(true)
    }

    /// Writes `[vaddr, vaddr + len)` of delta `d` into the subclusters it
    /// touches, in the cluster's host cluster (allocated if it has none):
    /// the rest of the first and last touched subcluster is filled with what
    /// reads showed; other subclusters keep their state. `cur` is the
    /// entry's (host, alloc bits, zero bits). Returns true (mapping changed).
    #[allow(clippy::too_many_arguments)]
    fn write_subclusters(
        &self,
        st: &mut WorkerState,
        d: usize,
        l2_off: u64,
        cur: (Option<u64>, u32, u32),
        src: Src<'_>,
        vaddr: u64,
        len: u64,
    ) -> Result<bool> {
        let (host, alloc, zero) = cur;
        let delta = st.delta(d)?;
        let hdr = &delta.hdr;
        let scs = hdr.subcluster_size();
        let off = hdr.offset_in_cluster(vaddr);
        let base = vaddr - off;
        let (first, last) = (off / scs, (off + len - 1) / scs);
        let (start, end) = (first * scs, (last + 1) * scs);
        let mask = subcluster_mask(first, last);
        let md = st.md.get_mut(d).ok_or(EIO)?;
        let (host, fresh) = match host {
            Some(h) => (h, false),
            None => (md.alloc_cluster(&delta.file, hdr)?, true),
        };
        if !fresh {
            let pos = host.checked_add(start).ok_or(EIO)?;
            if let Some(what) = md.overlap(pos, end - start) {
                return Err(self.overlap_error(st, d, what, pos));
            }
        }
        if !fresh && (off > start || off + len < end) {
            // The edges are read and written back whole: an in-place write
            // still in flight to them must land first, or it is undone.
            self.inflight.wait_idle();
        }
        let mut cow = st.cow.take().ok_or(EIO)?;
        let res = (|| -> Result {
            let buf = cow.get_mut(start as usize..end as usize).ok_or(EIO)?;
            let (head, mid, tail) = split3(buf, (off - start) as usize, len as usize)?;
            self.read_into(st, d, base + start, head)?;
            match src {
                Src::Bio(bio, boff) => bio.copy_to(boff, mid)?,
                Src::Zero => mid.fill(0),
                Src::Buf(b) => mid.copy_from_slice(b.get(..len as usize).ok_or(EIO)?),
            }
            self.read_into(st, d, vaddr + len, tail)?;
            delta.file.write_full(
                cow.get(start as usize..end as usize).ok_or(EIO)?,
                host + start,
            )
        })();
        st.cow = Some(cow);
        if res.is_ok() {
            st.hot_forget(d, vaddr);
        }
        let md = st.md.get_mut(d).ok_or(EIO)?;
        let res = res.and_then(|()| {
            // Data is on disk: now make it reachable.
            let bitmap = (u64::from(zero & !mask) << 32) | u64::from(alloc | mask);
            md.set_l2_entry(
                &delta.file,
                hdr,
                l2_off,
                vaddr,
                host | fmt::L2E_COPIED,
                bitmap,
            )
            .map_err(|e| self.md_error(e))
        });
        if let Err(e) = res {
            if fresh {
                self.free_unused(st, d, host, hdr.cluster_size());
            }
            return Err(e);
        }
        Ok(true)
    }

    /// The L2 table of `md`'s delta that maps `vaddr`, ready for a change
    /// (allocated, or copied if shared); EIO if the delta is marked corrupt.
    pub(crate) fn l2_for_write(
        &self,
        md: &mut DeltaMd,
        file: &File,
        hdr: &Header,
        vaddr: u64,
    ) -> Result<u64> {
        if md.is_corrupt() {
            return Err(EIO);
        }
        md.ensure_l2(file, hdr, vaddr).map_err(|e| self.md_error(e))
    }

    /// Drops a reference to host clusters of delta `d` once the change that
    /// removed it is durable (after the next commit: `Inner::apply_frees`).
    /// A failure leaves a refcount too high (a leak, not a corruption) but
    /// latches wants_check.
    pub(crate) fn free(&self, st: &mut WorkerState, d: usize, start: u64, len: u64) {
        let Some(md) = st.md.get_mut(d) else {
            return;
        };
        if let Some(what) = md.overlap(start, len) {
            // An entry pointed at metadata: dropping that reference would
            // let the allocator hand the metadata out. Leaked instead.
            self.overlap_error(st, d, what, start);
            return;
        }
        if let Err(e) = md.defer_free(start, len) {
            pr_err!(
                "dm-qcow2: image {}: refcount update failed ({:?}): wants_check\n",
                d,
                e
            );
            self.latch_wants_check();
        }
    }

    /// Drops the references entry `c` of delta `d` held, once its removal
    /// is durable (see `free`): its host cluster, or the clusters the data
    /// of a compressed cluster occupies (as QEMU counts them).
    pub(crate) fn free_entry(&self, st: &mut WorkerState, d: usize, c: &Cluster) {
        let Ok(cs) = st.delta(d).map(|delta| delta.hdr.cluster_size()) else {
            return;
        };
        match *c {
            Cluster::Normal { host, .. }
            | Cluster::ZeroPrealloc { host }
            | Cluster::Extended {
                host: Some(host), ..
            } => self.free(st, d, host, cs),
            Cluster::Compressed { host, len } => {
                let start = host & !(SECTOR - 1);
                self.free(st, d, start, len.saturating_add(host - start));
            }
            _ => {}
        }
    }

    /// Drops the reference of a cluster just allocated for delta `d` that
    /// nothing points at (what was to point at it failed): at once, so a
    /// retry (ENOSPC) allocates it again.
    pub(crate) fn free_unused(&self, st: &mut WorkerState, d: usize, start: u64, len: u64) {
        let Ok(delta) = st.delta(d) else {
            return;
        };
        let Some(md) = st.md.get_mut(d) else {
            return;
        };
        if let Err(e) = md.free_range(&delta.file, &delta.hdr, start, len) {
            pr_err!(
                "dm-qcow2: image {}: refcount update failed ({:?}): wants_check\n",
                d,
                e
            );
            self.latch_wants_check();
        }
    }

    /// Fills `cow` with the whole cluster of `vaddr`: what delta `d` shows
    /// outside the write, the new data inside it.
    fn fill_cow(
        &self,
        st: &mut WorkerState,
        d: usize,
        cow: &mut [u8],
        src: Src<'_>,
        vaddr: u64,
        len: u64,
    ) -> Result {
        let hdr = &st.delta(d)?.hdr;
        let cs = hdr.cluster_size();
        let off = hdr.offset_in_cluster(vaddr);
        let base = vaddr - off;
        // Checked, not assumed: `cow` must be a cluster and the write inside it.
        let cow = cow.get_mut(..cs as usize).ok_or(EIO)?;
        let end = off.checked_add(len).filter(|&e| e <= cs).ok_or(EIO)?;
        let (from, to) = fill_span(off, end, cs);
        let outside = cow.get_mut(from as usize..to as usize).ok_or(EIO)?;
        self.read_into(st, d, base + from, outside)?;
        let mid = cow.get_mut(off as usize..end as usize).ok_or(EIO)?;
        match src {
            Src::Bio(bio, boff) => bio.copy_to(boff, mid)?,
            Src::Zero => mid.fill(0),
            Src::Buf(b) => mid.copy_from_slice(b.get(..len as usize).ok_or(EIO)?),
        }
        Ok(())
    }
}

/// Bytes `[boff, boff + len)` of a bio written in place at `pos` of a
/// delta's file: in-place pieces that follow one another, one direct I/O
/// (started once: `start` takes the run).
pub(crate) struct InPlaceRun {
    pos: u64,
    boff: u32,
    len: u32,
}

impl InPlaceRun {
    /// Extends the run by `next` if that starts where the run ends, in the
    /// bio and in the file; returns whether it did.
    fn extend(&mut self, next: &InPlaceRun) -> bool {
        let follows = self.boff.checked_add(self.len) == Some(next.boff)
            && self.pos.checked_add(u64::from(self.len)) == Some(next.pos);
        match self.len.checked_add(next.len) {
            Some(len) if follows => {
                self.len = len;
                true
            }
            _ => false,
        }
    }

    /// Starts the run's direct I/O into `file` (one completion reference of
    /// `bio` of its own).
    fn start(self, file: &File, bio: &Bio, inflight: &Arc<IoCounter>) {
        let Self { pos, boff, len } = self;
        file.submit_bio_io(BioPart::Piece(bio.split_ref()), boff, len, pos, inflight);
    }
}
