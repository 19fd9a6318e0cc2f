// SPDX-License-Identifier: GPL-2.0

//! The I/O path: reads, writes, discard and write-zeroes, run by the worker
//! with the table's state locked. Reads always resolve from the top of the
//! chain; writes go to a delta `d` (the top for guest I/O, a merge target for
//! merges) and copy on write what the chain shows from `d` down.

use crate::hot::Fast;
use crate::kernel_abstractions::bio::{Bio, Op};
use crate::kernel_abstractions::file::{File, IoBuf, DIO_ALIGN};
use crate::meta::{corrupt, DeltaMd};
use crate::qcow2_format::{self as fmt, Cluster, Header, RunKind};
use crate::target::{Inner, WorkerState, SECTOR};
use kernel::error::code::*;
use kernel::prelude::*;

/// Where written data comes from.
#[derive(Clone, Copy)]
pub(crate) enum Src<'a> {
    /// The bio's data, from this byte offset.
    Bio(&'a Bio, u32),
    /// Zeroes.
    Zero,
    /// A buffer (merges), as long as the write.
    Buf(&'a [u8]),
}

/// A direct read not started yet: `len` bytes of delta `delta`'s file at
/// `host` into the bio at `off`.
struct ReadRun {
    delta: usize,
    host: u64,
    off: u32,
    len: u32,
}

impl ReadRun {
    /// Appends `next` if it follows on, in the file and in the bio.
    fn extend(&mut self, next: &ReadRun) -> bool {
        let follows = next.delta == self.delta
            && self.host.checked_add(u64::from(self.len)) == Some(next.host)
            && self.off.checked_add(self.len) == Some(next.off);
        match self.len.checked_add(next.len) {
            Some(len) if follows => {
                self.len = len;
                true
            }
            _ => false,
        }
    }
}

/// Read path.
impl Inner {
    pub(crate) fn read_bio(&self, st: &mut WorkerState, bio: &Bio) -> Result {
        let size = u64::from(bio.size());
        let mut vaddr = bio.sector().checked_mul(SECTOR).ok_or(EIO)?;
        let cs = st.delta(st.top())?.hdr.cluster_size();
        let mut done = 0u64;
        let mut run = None;
        while done < size {
            let len = (cs - vaddr % cs).min(size - done);
            self.read_piece(st, bio, vaddr, done as u32, len, &mut run)?;
            vaddr += len;
            done += len;
        }
        self.start_read(st, bio, run)
    }

    /// Starts the direct read of `run` (if any) into its part of `bio`.
    fn start_read(&self, st: &WorkerState, bio: &Bio, run: Option<ReadRun>) -> Result {
        if let Some(r) = run {
            let f = &st.deltas.get(r.delta).ok_or(EIO)?.file;
            f.submit_bio_io(bio.split_ref(), r.off, r.len, r.host, false, &self.inflight);
        }
        Ok(())
    }

    /// The L2 entry of `vaddr` in delta `d`.
    pub(crate) fn cluster(&self, st: &mut WorkerState, d: usize, vaddr: u64) -> Result<Cluster> {
        let delta = st.delta(d)?;
        let is_top = d == st.top();
        let md = st.md.get_mut(d).ok_or(EIO)?;
        if vaddr >= delta.hdr.size {
            return Ok(Cluster::Unallocated);
        }
        let Some(l1e) = md.l1_entry(&delta.hdr, vaddr)? else {
            return Ok(Cluster::Unallocated);
        };
        let (raw, bitmap) = md.l2_entry(&delta.file, &delta.hdr, l1e.l2_offset, vaddr)?;
        let c = fmt::decode_l2(&delta.hdr, raw, bitmap).map_err(|e| corrupt(d, e))?;
        if let (Cluster::Normal { host, copied }, Some(f), true) = (c, &st.fast, is_top) {
            // Writes through the table skip the overlap check: a cluster
            // that is metadata goes in for reads only.
            let writable =
                copied && !md.is_corrupt() && md.overlap(host, delta.hdr.cluster_size()).is_none();
            let cb = delta.hdr.cluster_bits;
            f.map.put(cb, vaddr >> cb, host, writable);
        }
        Ok(c)
    }

    /// Forgets the fast path's lookup for the cluster of `vaddr` before its
    /// mapping changes (`fast`: the fast path, if on and `vaddr` is in the top).
    pub(crate) fn hot_forget(fast: Option<&Fast>, hdr: &Header, vaddr: u64) {
        if let Some(f) = fast {
            f.map.del(vaddr >> hdr.cluster_bits);
        }
    }

    /// Resolves the first run of `[vaddr, vaddr + len)` (inside one cluster)
    /// from delta `d` down: returns the delta that holds it, what it is and
    /// its length. Unallocated everywhere, or past a delta's end, is zero.
    fn resolve(
        &self,
        st: &mut WorkerState,
        d: usize,
        vaddr: u64,
        mut len: u64,
    ) -> Result<(usize, RunKind, u64)> {
        let mut d = Some(d);
        while let Some(i) = d {
            let delta = st.delta(i)?;
            let hdr = &delta.hdr;
            // Lower deltas are never larger than the ones above them.
            if vaddr >= hdr.size {
                return Ok((i, RunKind::Zero, len));
            }
            len = len.min(hdr.size - vaddr);
            let c = self.cluster(st, i, vaddr)?;
            let (kind, rl) = fmt::first_run(hdr, &c, hdr.offset_in_cluster(vaddr), len);
            if rl == 0 {
                return Err(EIO);
            }
            if kind != RunKind::Unallocated {
                return Ok((i, kind, rl));
            }
            len = rl;
            d = i.checked_sub(1);
        }
        Ok((0, RunKind::Zero, len))
    }

    /// Reads `[vaddr, vaddr + len)` (inside one cluster) into `bio` at
    /// `boff`. Data runs are added to `run` while they follow on in the same
    /// file (a 1 MiB read of clusters written in order is one I/O); the run
    /// before is started when one does not.
    fn read_piece(
        &self,
        st: &mut WorkerState,
        bio: &Bio,
        vaddr: u64,
        boff: u32,
        len: u64,
        run: &mut Option<ReadRun>,
    ) -> Result {
        let mut pos = 0u64;
        while pos < len {
            let (d, kind, rl) = self.resolve(st, st.top(), vaddr + pos, len - pos)?;
            let off = boff + pos as u32;
            let rl32 = rl as u32;
            match kind {
                RunKind::Zero | RunKind::Unallocated => bio.zero(off, rl32)?,
                RunKind::Data { host } => {
                    let next = ReadRun {
                        delta: d,
                        host,
                        off,
                        len: rl32,
                    };
                    if !run.as_mut().is_some_and(|r| r.extend(&next)) {
                        self.start_read(st, bio, run.replace(next))?;
                    }
                }
                RunKind::Compressed { host, len: clen } => {
                    bio.copy_from(off, self.inflated(st, d, host, clen, vaddr + pos, rl)?)?;
                }
            }
            pos += rl;
        }
        Ok(())
    }

    /// `[vaddr, vaddr + len)` (inside one cluster) of the compressed cluster
    /// of delta `d` at `host`, inflated.
    fn inflated<'a>(
        &self,
        st: &'a mut WorkerState,
        d: usize,
        host: u64,
        clen: u64,
        vaddr: u64,
        len: u64,
    ) -> Result<&'a [u8]> {
        self.inflate(st, d, host, clen)?;
        let at = st.delta(d)?.hdr.offset_in_cluster(vaddr) as usize;
        st.zout.get(at..at + len as usize).ok_or(EIO)
    }

    /// Makes `st.zout` hold the inflated compressed cluster at `host`.
    fn inflate(&self, st: &mut WorkerState, d: usize, host: u64, clen: u64) -> Result {
        if st.zkey == Some((d, host)) {
            return Ok(());
        }
        st.zkey = None;
        let delta = st.delta(d)?;
        let a = DIO_ALIGN as u64;
        let start = host & !(a - 1);
        let end = host.checked_add(clen).ok_or(EIO)?.next_multiple_of(a);
        let span = usize::try_from(end - start).map_err(|_| EIO)?;
        let zin = st.zin.get_mut(..span).ok_or(EIO)?;
        // The last compressed cluster may end before its rounded-up span.
        delta.file.read_full(zin, start)?;
        let skip = (host - start) as usize;
        let src = zin.get(skip..skip + clen as usize).ok_or(EIO)?;
        let cs = delta.hdr.cluster_size() as usize;
        let dst = st.zout.get_mut(..cs).ok_or(EIO)?;
        if st.inflater.inflate_raw(src, dst).is_err() {
            pr_err!(
                "dm-qcow2: image {}: bad compressed cluster at {:#x}\n",
                d,
                host
            );
            return Err(EIO);
        }
        st.zkey = Some((d, host));
        Ok(())
    }

    /// Reads what delta `d` and those below it show at `[vaddr, vaddr +
    /// buf.len())` (inside one cluster) into `buf`, synchronously.
    pub(crate) fn read_into(
        &self,
        st: &mut WorkerState,
        d: usize,
        vaddr: u64,
        buf: &mut [u8],
    ) -> Result {
        let len = buf.len() as u64;
        let mut pos = 0u64;
        while pos < len {
            let (i, kind, rl) = self.resolve(st, d, vaddr + pos, len - pos)?;
            let dst = buf.get_mut(pos as usize..(pos + rl) as usize).ok_or(EIO)?;
            match kind {
                RunKind::Zero | RunKind::Unallocated => dst.fill(0),
                RunKind::Data { host } => st.deltas.get(i).ok_or(EIO)?.file.read_full(dst, host)?,
                RunKind::Compressed { host, len: clen } => {
                    dst.copy_from_slice(self.inflated(st, i, host, clen, vaddr + pos, rl)?);
                }
            }
            pos += rl;
        }
        Ok(())
    }
}

/// Write path.
impl Inner {
    /// Writes `bio` into the top delta. Returns whether the bio must wait
    /// for the batch's commit before it completes: a flush, or a FUA write
    /// whose mapping is not durable yet. Other writes complete once their
    /// data is written, like on a disk with a volatile write cache: what
    /// they changed in the metadata is committed by the next flush (or the
    /// periodic commit, see `Inner::sync_batch`).
    pub(crate) fn write_bio(&self, st: &mut WorkerState, bio: &Bio) -> Result<bool> {
        let d = st.top();
        let top = st.delta(d)?;
        let flush = bio.is_preflush() || bio.op() == Op::Flush;
        if flush {
            // Everything acknowledged so far is in the file (data written
            // before it completed) or in the metadata cache: the batch's
            // commit writes the cache out in order and ends with an fsync
            // that makes it all durable; the bio completes after it.
            st.flush = true;
        }
        let size = u64::from(bio.size());
        if size == 0 {
            return Ok(flush);
        }
        let fua = bio.is_fua();
        let mut vaddr = bio.sector().checked_mul(SECTOR).ok_or(EIO)?;
        let cs = top.hdr.cluster_size();
        let mut done = 0u64;
        let mut md_changed = false;
        while done < size {
            let len = (cs - vaddr % cs).min(size - done);
            md_changed |= self.write_piece(st, d, Src::Bio(bio, done as u32), vaddr, len, fua)?;
            vaddr += len;
            done += len;
        }
        // In-place pieces of a FUA write are written through (dsync); if the
        // mapping they went to is not durable yet (this bio or an earlier one
        // changed metadata not committed yet), the bio also waits for the
        // commit.
        let md_dirty = fua && st.md.get(d).is_some_and(|m| m.is_dirty());
        Ok(flush || (fua && (md_changed || md_dirty)))
    }

    /// Writes `[vaddr, vaddr + len)` (inside one cluster) of delta `d` from
    /// `src`. Returns whether the mapping changed (copy-on-write), as opposed
    /// to an in-place write (in flight for a bio, done for a buffer).
    pub(crate) fn write_piece(
        &self,
        st: &mut WorkerState,
        d: usize,
        src: Src<'_>,
        vaddr: u64,
        len: u64,
        fua: bool,
    ) -> Result<bool> {
        let delta = st.delta(d)?;
        let fast = st.fast_for(d);
        let hdr = &delta.hdr;
        let off = hdr.offset_in_cluster(vaddr);
        let md = st.md.get_mut(d).ok_or(EIO)?;
        let l2_off = self.l2_for_write(md, &delta.file, hdr, vaddr)?;
        let (raw, bitmap) = md.l2_entry(&delta.file, hdr, l2_off, vaddr)?;
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
                    delta.file.submit_bio_io(
                        bio.split_ref(),
                        boff,
                        len as u32,
                        pos,
                        fua,
                        &self.inflight,
                    );
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
                        fua,
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
        let mut cow = st.cow.take().ok_or(EIO)?;
        let res = self.fill_cow(st, d, &mut cow, src, vaddr, len);
        let res = res.and_then(|()| {
            let buf = cow.get(..hdr.cluster_size() as usize).ok_or(EIO)?;
            delta.file.write_full(buf, host)
        });
        st.cow = Some(cow);
        let md = st.md.get_mut(d).ok_or(EIO)?;
        let res = res.and_then(|()| {
            // Data is on disk: now make it reachable.
            let (nraw, nbitmap) = if hdr.extended_l2() {
                (host | fmt::L2E_COPIED, u64::from(u32::MAX))
            } else {
                (fmt::encode_l2_normal(host, true), 0)
            };
            Self::hot_forget(fast.as_deref(), hdr, vaddr);
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
        fua: bool,
        shared: Option<u64>,
    ) -> Result<bool> {
        let delta = st.delta(d)?;
        let fast = st.fast_for(d);
        let hdr = &delta.hdr;
        let pos = host.checked_add(hdr.offset_in_cluster(vaddr)).ok_or(EIO)?;
        Self::hot_forget(fast.as_deref(), hdr, vaddr);
        delta
            .file
            .submit_bio_io(bio.split_ref(), boff, len as u32, pos, fua, &self.inflight);
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
        let fast = st.fast_for(d);
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
        let md = st.md.get_mut(d).ok_or(EIO)?;
        let res = res.and_then(|()| {
            // Data is on disk: now make it reachable.
            let bitmap = (u64::from(zero & !mask) << 32) | u64::from(alloc | mask);
            Self::hot_forget(fast.as_deref(), hdr, vaddr);
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
        let (head, mid, tail) = split3(cow, off as usize, len as usize)?;
        self.read_into(st, d, base, head)?;
        match src {
            Src::Bio(bio, boff) => bio.copy_to(boff, mid)?,
            Src::Zero => mid.fill(0),
            Src::Buf(b) => mid.copy_from_slice(b.get(..len as usize).ok_or(EIO)?),
        }
        let tail_len = (cs - off - len) as usize;
        self.read_into(st, d, vaddr + len, tail.get_mut(..tail_len).ok_or(EIO)?)
    }
}

/// Metadata overlap protection.
impl Inner {
    /// A write (or a reference's removal) of delta `d` at host offset `pos`
    /// would have overwritten its `what`: the image's metadata is damaged
    /// (an L2 entry points at metadata). Like QEMU, refuse it with EIO, say
    /// so, and mark the image corrupt (v3: the incompatible bit, which makes
    /// QEMU and us refuse it until `qemu-img check -r all`); the delta takes
    /// no more writes, and the table may not be resumed (wants_check).
    pub(crate) fn overlap_error(
        &self,
        st: &mut WorkerState,
        d: usize,
        what: &str,
        pos: u64,
    ) -> Error {
        pr_err!(
            "dm-qcow2: image {}: write at host offset {:#x} would overwrite its {}: refused, image marked corrupt (repair with qemu-img check -r all)\n",
            d,
            pos,
            what
        );
        let first = st.md.get_mut(d).is_some_and(|m| m.set_corrupt());
        if first {
            // Writes in place through the fast path's table would skip the
            // check above: off for good (its lookups no longer take writes).
            self.fast_off(st);
            if let Ok(delta) = st.delta(d) {
                if let Err(e) = self.mark_corrupt(&delta) {
                    pr_err!(
                        "dm-qcow2: image {}: cannot set the corrupt bit: {:?}\n",
                        d,
                        e
                    );
                }
            }
        }
        self.latch_wants_check();
        EIO
    }
}

/// Discard and write-zeroes.
impl Inner {
    /// Discards or zeroes the range of `bio`; returns whether the bio must
    /// wait for the batch's commit (FUA) like `write_bio`.
    pub(crate) fn zero_bio(&self, st: &mut WorkerState, bio: &Bio) -> Result<bool> {
        let d = st.top();
        let top = st.delta(d)?;
        let discard = bio.op() == Op::Discard;
        let unmap = discard || !bio.is_nounmap();
        let size = u64::from(bio.size());
        let mut vaddr = bio.sector().checked_mul(SECTOR).ok_or(EIO)?;
        let end = vaddr.checked_add(size).ok_or(EIO)?;
        let cs = top.hdr.cluster_size();
        while vaddr < end {
            let len = (cs - vaddr % cs).min(end - vaddr);
            if len == cs && unmap {
                // Whole clusters that read as zeroes with nothing of the top's
                // there stay as they are: a default mkfs discards the whole
                // device, mostly never written, and L2 tables nobody has are
                // skipped whole (and not allocated).
                let skip = self.zero_already(st, d, vaddr, end)?;
                if skip > 0 {
                    vaddr += skip;
                    continue;
                }
            }
            if len == cs && top.hdr.version >= 3 {
                self.zero_cluster(st, d, vaddr, unmap)?;
            } else if discard && len == cs {
                // v2 has no zero flag: a discard deallocates the cluster
                // where the chain below reads zeroes anyway, and is ignored
                // (a hint) where lower data would show through. Never
                // zeroes written: a default mkfs discards the whole device.
                self.discard_v2_cluster(st, d, vaddr)?;
            } else if !discard {
                // Partial clusters (and v2 write-zeroes) get zeroes written.
                self.write_piece(st, d, Src::Zero, vaddr, len, false)?;
            }
            // A partial-cluster discard is a hint we may ignore.
            vaddr += len;
        }
        Ok(bio.is_fua())
    }

    /// How far from `vaddr` (a cluster boundary of the top `d`, below
    /// `end`) whole clusters read as zeroes while the top holds nothing
    /// there to free: unallocated in the top (or a zero cluster without a
    /// host cluster) and zeroes in every delta below. 0 if the cluster of
    /// `vaddr` does not. Where a delta has no L2 table, its whole range
    /// counts at once.
    fn zero_already(&self, st: &mut WorkerState, d: usize, vaddr: u64, end: u64) -> Result<u64> {
        let delta = st.delta(d)?;
        let cs = delta.hdr.cluster_size();
        let md = st.md.get(d).ok_or(EIO)?;
        let mut span = if md.l1_entry(&delta.hdr, vaddr)?.is_none() {
            l2_range_left(&delta.hdr, vaddr)?.min(end - vaddr)
        } else {
            match self.cluster(st, d, vaddr)? {
                Cluster::Zero => return Ok(cs),
                Cluster::Unallocated => cs,
                _ => return Ok(0),
            }
        };
        for i in (0..d).rev() {
            let below = st.delta(i)?;
            let hdr = &below.hdr;
            // Past a delta's end (and so past every lower one's): zeroes.
            if vaddr >= hdr.size {
                break;
            }
            let md = st.md.get(i).ok_or(EIO)?;
            if md.l1_entry(hdr, vaddr)?.is_some() {
                // This delta and the ones below it, one cluster.
                let (_, kind, len) = self.resolve(st, i, vaddr, cs)?;
                span = if kind == RunKind::Zero && len >= cs {
                    cs
                } else {
                    0
                };
                break;
            }
            span = span.min(l2_range_left(hdr, vaddr)?);
        }
        Ok(span - span % cs)
    }

    /// A whole-cluster discard on a v2 image: deallocates the cluster of
    /// `vaddr` in delta `d` if it is allocated and every delta below reads
    /// zeroes there; otherwise nothing.
    fn discard_v2_cluster(&self, st: &mut WorkerState, d: usize, vaddr: u64) -> Result {
        let cs = st.delta(d)?.hdr.cluster_size();
        if matches!(self.cluster(st, d, vaddr)?, Cluster::Unallocated) {
            return Ok(());
        }
        if let Some(below) = d.checked_sub(1) {
            let (_, kind, len) = self.resolve(st, below, vaddr, cs)?;
            if kind != RunKind::Zero || len < cs {
                return Ok(());
            }
        }
        self.zero_cluster(st, d, vaddr, true)
    }

    /// Makes the whole cluster of `vaddr` in delta `d` read as zeroes with
    /// the zero flag (v3), freeing its host cluster if `unmap` (else keeping
    /// it preallocated). On v2 (no zero flag) the entry is cleared instead:
    /// only for callers that know the deltas below read zeroes there.
    pub(crate) fn zero_cluster(
        &self,
        st: &mut WorkerState,
        d: usize,
        vaddr: u64,
        unmap: bool,
    ) -> Result {
        let delta = st.delta(d)?;
        let fast = st.fast_for(d);
        let hdr = &delta.hdr;
        let md = st.md.get_mut(d).ok_or(EIO)?;
        let l2_off = self.l2_for_write(md, &delta.file, hdr, vaddr)?;
        let (raw, bitmap) = md.l2_entry(&delta.file, hdr, l2_off, vaddr)?;
        let c = fmt::decode_l2(hdr, raw, bitmap).map_err(|e| corrupt(d, e))?;
        self.merge_note_write(st, d, vaddr)?;
        // Our reference to the host cluster, if any; only one we own outright
        // (COPIED) may stay as preallocation.
        let own = raw & fmt::L2E_COPIED != 0;
        let keep = match c {
            _ if unmap || !own || hdr.version < 3 => None,
            Cluster::Normal { host, .. } | Cluster::ZeroPrealloc { host } => Some(host),
            Cluster::Extended { host: Some(h), .. } => Some(h),
            _ => None,
        };
        let (nraw, nbitmap) = if hdr.version < 3 {
            (0, 0)
        } else if hdr.extended_l2() {
            // All subclusters zero; the host offset may stay as preallocation.
            (
                keep.map_or(0, |h| h | fmt::L2E_COPIED),
                u64::from(u32::MAX) << 32,
            )
        } else {
            (fmt::encode_l2_zero(keep, keep.is_some()), 0)
        };
        let md = st.md.get_mut(d).ok_or(EIO)?;
        Self::hot_forget(fast.as_deref(), hdr, vaddr);
        md.set_l2_entry(&delta.file, hdr, l2_off, vaddr, nraw, nbitmap)
            .map_err(|e| self.md_error(e))?;
        // The entry no longer points there: now the space may go. (An
        // overlapping read or write may still be in flight to the old host
        // cluster: `Inner::apply_frees` waits for it before the decrement
        // lets the cluster be handed out again.)
        if keep.is_none() {
            self.free_entry(st, d, &c);
        }
        Ok(())
    }
}

/// Bytes from `vaddr` to the end of the range one L2 table of `hdr` maps.
pub(crate) fn l2_range_left(hdr: &Header, vaddr: u64) -> Result<u64> {
    let bits = hdr
        .cluster_bits
        .checked_add(hdr.l2_entries().trailing_zeros())
        .filter(|&b| b < 64)
        .ok_or(EIO)?;
    let next = ((vaddr >> bits) + 1).checked_shl(bits).unwrap_or(0);
    // The last range of a 2^64 address space ends at 2^64 (`next` wraps).
    Ok(next.wrapping_sub(vaddr))
}

/// `buf` split into `[..a]`, `[a..a + b]` and the rest; EIO (never a panic)
/// if that does not fit.
fn split3(buf: &mut [u8], a: usize, b: usize) -> Result<(&mut [u8], &mut [u8], &mut [u8])> {
    if a.checked_add(b).map_or(true, |e| e > buf.len()) {
        return Err(EIO);
    }
    let (head, rest) = buf.split_at_mut(a);
    let (mid, tail) = rest.split_at_mut(b);
    Ok((head, mid, tail))
}

/// Bits `first..=last` (subcluster indices below 32).
fn subcluster_mask(first: u64, last: u64) -> u32 {
    let n = last.saturating_sub(first) + 1;
    let ones = if n >= 32 { u32::MAX } else { (1u32 << n) - 1 };
    ones.checked_shl(first as u32).unwrap_or(0)
}

/// Whether every subcluster touched by `[off, off + len)` has its bit in `bits`.
fn subclusters_set(hdr: &Header, bits: u32, off: u64, len: u64) -> bool {
    let scs = hdr.subcluster_size();
    if len == 0 || scs == 0 {
        return true;
    }
    let first = off / scs;
    let last = (off + len - 1) / scs;
    (first..=last).all(|i| i < 32 && bits & (1 << i) != 0)
}
