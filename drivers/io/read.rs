// SPDX-License-Identifier: GPL-2.0

//! Reads: a bio resolved from the top of the chain down, pieces that
//! follow on in one file started as one direct read.

use super::*;

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
            f.submit_bio_io(
                BioPart::Piece(bio.split_ref()),
                r.off,
                r.len,
                r.host,
                &self.inflight,
            );
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
        let l2_off = l1e.l2_offset;
        let (raw, bitmap) = md.l2_entry(&delta.file, &delta.hdr, l2_off, vaddr)?;
        let c = fmt::decode_l2(&delta.hdr, raw, bitmap).map_err(|e| corrupt(d, e))?;
        if let (Some(f), true) = (&st.fast, is_top) {
            let (lower, md) = st.md.split_at_mut(d);
            let (Some(md), Some(below)) = (md.first_mut(), st.deltas.get(..d)) else {
                return Ok(c);
            };
            Self::warm(f, md, &delta.hdr, l2_off, vaddr, (below, lower));
            if let Cluster::Normal { host, copied } = c {
                let writable = Self::hot_writable(md, &delta.hdr, host, copied);
                let cb = delta.hdr.cluster_bits;
                f.map.put(cb, vaddr >> cb, host, writable);
            }
        }
        Ok(c)
    }

    /// Whether the fast path may write in place into the top's cluster at
    /// `host`. Writes through the table skip the overlap check: a cluster
    /// that is metadata goes in for reads only.
    fn hot_writable(md: &DeltaMd, hdr: &Header, host: u64, copied: bool) -> bool {
        copied && !md.is_corrupt() && md.overlap(host, hdr.cluster_size()).is_none()
    }

    /// Puts the top's plain data clusters of the cached L2 page that holds
    /// `vaddr`'s entry into the fast path's table, once per table and page
    /// (slots holding nothing only), so that the first access to each of
    /// them need not come through the worker too. Each goes in as a lookup
    /// of it here would put it (see `target::fast` for why that is safe at
    /// any time under the state mutex); entries that do not decode are
    /// left to the lookup that meets them. At most `MD_PAGE / 8` entries.
    /// Best effort: what it cannot do is left to those lookups.
    ///
    /// The page's clusters that the chain shows as zeroes go into the zero
    /// map: zero clusters, and unallocated ones for which every delta
    /// `lower` (base first, with its metadata) has nothing or zeroes too,
    /// as far as its metadata cache knows without I/O (`chain_zero`).
    pub(super) fn warm(
        f: &Fast,
        md: &mut DeltaMd,
        hdr: &Header,
        l2_off: u64,
        vaddr: u64,
        lower: (&[Arc<Delta>], &[DeltaMd]),
    ) {
        let cb = hdr.cluster_bits;
        let _ = md.warm_l2_page(hdr, l2_off, vaddr, f.id, |md, v, raw| match fmt::decode_l2(
            hdr, raw, 0,
        ) {
            Ok(Cluster::Normal { host, copied }) => {
                let owned = Self::hot_writable(md, hdr, host, copied);
                f.map.warm(cb, v >> cb, host, owned);
            }
            Ok(Cluster::Zero | Cluster::ZeroPrealloc { .. }) => f.zero.set(v >> cb),
            Ok(Cluster::Unallocated) if Self::chain_zero(cb, v, lower) => f.zero.set(v >> cb),
            _ => {}
        });
    }

    /// Whether the deltas `chain` (base first, with their metadata) show
    /// the whole cluster at `v` as zeroes, as far as their cached metadata
    /// says (no I/O: a page not cached is a no): no L2 table or an
    /// unallocated entry all the way down, or a zero cluster, or the end of
    /// a delta, under unallocated entries only.
    fn chain_zero(cb: u32, v: u64, chain: (&[Arc<Delta>], &[DeltaMd])) -> bool {
        let (deltas, mds) = chain;
        if deltas.len() != mds.len() {
            return false;
        }
        for (d, md) in deltas.iter().zip(mds).rev() {
            let hdr = &d.hdr;
            if hdr.cluster_bits != cb || hdr.extended_l2() {
                return false;
            }
            // Lower deltas are never larger: past this one's end, zeroes.
            if v >= hdr.size {
                return true;
            }
            let e = match md.l1_entry_quiet(hdr, v) {
                Some(None) => continue,
                Some(Some(e)) => e,
                None => return false,
            };
            match md
                .cached_l2_entry(hdr, e.l2_offset, v)
                .map(|raw| fmt::decode_l2(hdr, raw, 0))
            {
                Some(Ok(Cluster::Unallocated)) => continue,
                Some(Ok(Cluster::Zero | Cluster::ZeroPrealloc { .. })) => return true,
                _ => return false,
            }
        }
        true
    }

    /// Notes in the fast path's zero map that the chain shows the whole
    /// cluster of `vaddr` as zeroes (`resolve` found it so from the top
    /// down). Where no delta has an L2 table for it either (a fresh image,
    /// or a thin top over a base with none there), every cluster such a
    /// table would map is zeroes too, and the whole range goes in at once:
    /// the first read of a fresh image's 512 MiB (64 KiB clusters) makes
    /// the rest of them known.
    fn hot_zero(st: &WorkerState, vaddr: u64) {
        let Some(f) = &st.fast else {
            return;
        };
        // The table's chain is this one (it is replaced whenever the chain
        // changes); checked rather than assumed, as it costs nothing.
        if !st.deltas.last().is_some_and(|t| Arc::ptr_eq(t, &f.top)) {
            return;
        }
        let hdr = &f.top.hdr;
        let (cb, span) = (hdr.cluster_bits, hdr.l1_coverage());
        let start = vaddr & !(span - 1);
        let no_tables = st.md.len() == st.deltas.len()
            && st.deltas.iter().zip(st.md.iter()).all(|(d, md)| {
                d.hdr.cluster_bits == cb
                    && !d.hdr.extended_l2()
                    && (start >= d.hdr.size
                        || matches!(md.l1_entry_quiet(&d.hdr, start), Some(None)))
            });
        if no_tables && !hdr.extended_l2() {
            let end = start.saturating_add(span).min(hdr.size);
            f.zero
                .set_range(start >> cb, end.div_ceil(hdr.cluster_size()));
        } else {
            f.zero.set(vaddr >> cb);
        }
    }

    /// The chain shows the cluster of `vaddr` from `delta`, below the top
    /// (every delta above it has nothing for the whole cluster), and `c` is
    /// its entry there. Puts the fast path's entry for it if it is a plain
    /// data cluster wholly inside `delta` and the table reaches that far
    /// down (see `Fast::delta`): reads of a base through a thin top then
    /// take the fast path too.
    ///
    /// The other entries of `delta`'s cached L2 page for which every delta
    /// above has nothing (no L2 table, or a cached page of it with a zero
    /// entry: under a fresh top, all of them) go in too, once per table and
    /// page, as `warm` does for the top's: plain data clusters into empty
    /// slots, and those the chain shows as zeroes from there down (a zero
    /// cluster, or an unallocated one over deltas with nothing either, see
    /// `chain_zero`) into the zero map. The first read of each of them need
    /// not come through the worker. `resolve` calls this for the base with
    /// `Unallocated` when no delta had the cluster: the base's page then
    /// tells where the chain has holes.
    fn hot_below(st: &mut WorkerState, delta: &Arc<Delta>, vaddr: u64, c: &Cluster) {
        let Some(f) = st.fast.clone() else {
            return;
        };
        let Some(below) = st.deltas.iter().rev().position(|d| Arc::ptr_eq(d, delta)) else {
            return;
        };
        // The table's chain is this one (it is replaced whenever the chain
        // changes); checked rather than assumed, as it costs nothing.
        if below == 0 || !st.deltas.last().is_some_and(|t| Arc::ptr_eq(t, &f.top)) {
            return;
        }
        // Entries of the table may point into `delta`.
        let reach = f.delta(below).is_some_and(|d| Arc::ptr_eq(d, delta));
        let hdr = &delta.hdr;
        let (cb, cs) = (hdr.cluster_bits, hdr.cluster_size());
        let whole = |v: u64| v.checked_add(cs).is_some_and(|end| end <= hdr.size);
        if let Cluster::Normal { host, .. } = c {
            if reach && whole(vaddr - hdr.offset_in_cluster(vaddr)) {
                f.map.put_at(cb, vaddr >> cb, below, *host, false);
            }
        }
        // Every delta of a chain has the same cluster size and entry size
        // (the constructor's check), so the entries of one page of each
        // cover the same clusters.
        let i = st.top() - below;
        let n = st.md.len();
        // One metadata set per delta (always so; `zip` below relies on it).
        if n != st.deltas.len() {
            return;
        }
        let (lower, upper) = st.md.split_at_mut(i.saturating_add(1).min(n));
        let (deeper, md) = lower.split_at_mut(i.min(lower.len()));
        let (Some(md), Some(up), Some(down)) = (
            md.first_mut(),
            st.deltas.get(i.saturating_add(1)..),
            st.deltas.get(..i),
        ) else {
            return;
        };
        let clear = |v: u64| {
            up.iter()
                .zip(upper.iter())
                .all(|(du, mu)| match mu.l1_entry_quiet(&du.hdr, v) {
                    Some(None) => true,
                    Some(Some(e)) => mu.cached_l2_entry(&du.hdr, e.l2_offset, v) == Some(0),
                    None => false,
                })
        };
        let Ok(Some(l1e)) = md.l1_entry(hdr, vaddr) else {
            return;
        };
        let _ = md.warm_l2_page(hdr, l1e.l2_offset, vaddr, f.id, |_, v, raw| {
            if !clear(v) {
                return;
            }
            match fmt::decode_l2(hdr, raw, 0) {
                Ok(Cluster::Normal { host, .. }) if reach && whole(v) => {
                    f.map.warm_at(cb, v >> cb, below, host, false);
                }
                Ok(Cluster::Zero | Cluster::ZeroPrealloc { .. }) => f.zero.set(v >> cb),
                Ok(Cluster::Unallocated) if Self::chain_zero(cb, v, (down, &*deeper)) => {
                    f.zero.set(v >> cb);
                }
                _ => {}
            }
        });
    }

    /// Resolves the first run of `[vaddr, vaddr + len)` (inside one cluster)
    /// from delta `d` down: returns the delta that holds it, what it is and
    /// its length. Unallocated everywhere, or past a delta's end, is zero.
    pub(super) fn resolve(
        &self,
        st: &mut WorkerState,
        d: usize,
        vaddr: u64,
        mut len: u64,
    ) -> Result<(usize, RunKind, u64)> {
        // Every delta passed had nothing for the whole cluster (the fast
        // path may learn where the chain shows it from).
        let mut clear_above = d == st.top() && st.fast.is_some();
        let mut d = Some(d);
        while let Some(i) = d {
            let delta = st.delta(i)?;
            let hdr = &delta.hdr;
            // Lower deltas are never larger than the ones above them.
            if vaddr >= hdr.size {
                if clear_above && vaddr - hdr.offset_in_cluster(vaddr) >= hdr.size {
                    Self::hot_zero(st, vaddr);
                }
                return Ok((i, RunKind::Zero, len));
            }
            len = len.min(hdr.size - vaddr);
            let c = self.cluster(st, i, vaddr)?;
            let (kind, rl) = fmt::first_run(hdr, &c, hdr.offset_in_cluster(vaddr), len);
            if rl == 0 {
                return Err(EIO);
            }
            if kind != RunKind::Unallocated {
                if clear_above {
                    if matches!(c, Cluster::Zero | Cluster::ZeroPrealloc { .. }) {
                        Self::hot_zero(st, vaddr);
                    }
                    if i != st.top() {
                        Self::hot_below(st, &delta, vaddr, &c);
                    }
                }
                return Ok((i, kind, rl));
            }
            clear_above &= matches!(c, Cluster::Unallocated);
            len = rl;
            d = i.checked_sub(1);
        }
        if clear_above {
            Self::hot_zero(st, vaddr);
            let base = st.delta(0)?;
            Self::hot_below(st, &base, vaddr, &Cluster::Unallocated);
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
    pub(super) fn inflated<'a>(
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
