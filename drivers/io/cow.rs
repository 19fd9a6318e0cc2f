// SPDX-License-Identifier: GPL-2.0

//! Copy-on-write fills of a batch, in flight together.
//!
//! A write into a cluster the top does not own yet (unallocated, or shared
//! with a snapshot) gets a new cluster holding what the chain shows there,
//! with the new data over it. Done one write at a time (`write_piece`), the
//! worker waits for a read from the chain and a write of the cluster for
//! each: a random-write workload over a backing image runs at one cluster
//! copy at a time. The fills of writes into different clusters are
//! independent, so within one batch the worker gathers them in a gang:
//! each write allocates its cluster and plans its reads as the single fill
//! would; at the end of the run (`Inner::flush_cow_gang`) every read is in
//! flight at once, then every cluster write, and only then are the L2
//! entries pointed at the new clusters, in the writes' order.
//!
//! The order the durability rules need is the single fill's: the data is
//! written (completed) before the entry that reaches it changes in the
//! cache, and the commit that writes the entry out fsyncs the file first.
//! Nothing else sees a gang's clusters before its entries are set: no entry
//! points at them, the fast path's table has none of them (it may still
//! map the guest cluster to the old, shared host cluster, or to a lower
//! delta's, for reads, until the entry changes), and the gang is flushed
//! before any bio that could read or write what it changes and before the
//! batch ends, so neither messages, suspend nor the merge walker (all of
//! which take the state) ever find it non-empty.
//!
//! Two kinds of bio leave a gang be: a plain write inside one cluster the
//! gang does not hold (it joins), and a read of clusters it does not hold.
//! A read changes no entry and no refcount, and what it resolves (the
//! top's entries of other clusters, the lower deltas the fills read from)
//! no fill changes; so with reads of other clusters between them (a guest
//! reading and copying up over a backing image) the writes of a batch
//! still gather. A commit may run while fills are planned (the metadata
//! cache writes pages out to make room): it writes the refcounts of their
//! clusters, not entries pointing at them (a crash then leaks those
//! clusters, as it would a single fill's).
//!
//! Memory for the gang is taken when a write joins it (its buffer, its
//! place in the gang); the buffers of fills done are kept for the next
//! ones (up to `GANG_BYTES` per table, 4 MiB, freed on suspend), so that
//! a steady stream of copies allocates and zeroes none. A write that finds
//! no memory fills its cluster alone, and a flush without memory for its
//! request lists runs the fills' I/O one after the other: low memory slows
//! a gang down, it never fails a write.
//!
//! Each write's bio keeps one completion reference in the gang: the bio
//! completes when its fill's entry is set, or fails with the fill's error
//! (ENOSPC parks it, as for any data write; its cluster is freed at once).

use super::*;
use crate::kernel_abstractions::batch_io::{read_batch, write_batch, ReadAt, WriteAt};

/// Most fills in one gang.
const GANG_MAX: usize = 32;

/// Most bytes of cluster buffers one gang holds (two fills of the largest
/// clusters, 2 MiB).
const GANG_BYTES: u64 = 4 << 20;

/// Copy-on-write fills gathered for one flush (see the module doc).
pub(crate) struct CowGang {
    /// Whether the write being processed may join (`Inner::process`).
    pub(crate) open: bool,
    fills: KVec<Fill>,
    bytes: u64,
    /// Cluster buffers of fills done, for the next ones (at most
    /// `GANG_BYTES`): a fill writes every byte of its buffer (the chain's
    /// data, zeroes, the write's own), so a buffer needs neither a new
    /// allocation nor zeroing per copy.
    spare: KVec<Option<IoBuf>>,
}

/// A read from the chain into a fill's buffer.
struct ChainRead {
    delta: usize,
    host: u64,
    at: usize,
    len: usize,
}

/// One write's fill: its new cluster, what to read into it, the entry to set.
struct Fill {
    /// The write's own completion reference (see the module doc).
    bio: BioPiece,
    boff: u32,
    d: usize,
    l2_off: u64,
    vaddr: u64,
    /// The write's offset in the cluster, its length, the cluster's size.
    off: u64,
    len: u64,
    cs: u64,
    host: u64,
    /// The host cluster the entry pointed at (shared), which loses our
    /// reference once the entry points at `host`.
    shared: Option<u64>,
    buf: IoBuf,
    reads: KVec<ChainRead>,
    /// The fill's result so far.
    res: Result,
}

impl CowGang {
    pub(crate) fn new() -> Self {
        Self {
            open: false,
            fills: KVec::new(),
            bytes: 0,
            spare: KVec::new(),
        }
    }

    /// A buffer for a fill of a `cs`-byte cluster: a spare one if there
    /// is one of that size (any other is dropped), else a new one.
    fn buffer(&mut self, cs: u64) -> Result<IoBuf> {
        let len = (cs as usize).checked_next_multiple_of(DIO_ALIGN);
        for slot in self.spare.as_mut_slice() {
            let Some(b) = slot.take() else {
                continue;
            };
            if Some(b.len()) == len {
                return Ok(b);
            }
        }
        IoBuf::new(cs as usize)
    }

    /// Frees the spare buffers (the device is suspended: no fill for a
    /// while, perhaps ever).
    pub(crate) fn release_spare(&mut self) {
        self.spare = KVec::new();
    }

    /// Keeps `buf` for later fills if the spare ones stay within
    /// `GANG_BYTES` (and `GANG_MAX` slots).
    fn keep(&mut self, buf: IoBuf) {
        let held: u64 = self.spare.iter().flatten().map(|b| b.len() as u64).sum();
        if held.saturating_add(buf.len() as u64) > GANG_BYTES {
            return;
        }
        if let Some(slot) = self.spare.as_mut_slice().iter_mut().find(|s| s.is_none()) {
            *slot = Some(buf);
        } else if self.spare.len() < GANG_MAX {
            // No memory for the slot: the buffer is freed.
            let _ = self.spare.push(Some(buf), GFP_KERNEL);
        }
    }

    /// Whether a fill of a `cs`-byte cluster would not fit any more.
    pub(crate) fn full(&self, cs: u64) -> bool {
        self.fills.len() >= GANG_MAX || self.bytes.saturating_add(cs) > GANG_BYTES
    }

    /// Whether a fill of delta `d` covers a cluster of `[start, end)`
    /// (`cluster_bits` of that delta; an empty range is the cluster of
    /// `start`).
    pub(crate) fn covers(&self, d: usize, start: u64, end: u64, cluster_bits: u32) -> bool {
        let first = start >> cluster_bits;
        let last = (end.saturating_sub(1) >> cluster_bits).max(first);
        self.fills
            .iter()
            .any(|f| f.d == d && (first..=last).contains(&(f.vaddr >> cluster_bits)))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.fills.is_empty()
    }
}

impl Inner {
    /// Whether `bio` may join the gang: a plain write (no flush, no FUA)
    /// inside one cluster of the top, without subclusters. Such a write
    /// changes at most its own cluster's entry.
    pub(crate) fn may_join_gang(&self, st: &WorkerState, bio: &Bio) -> bool {
        if bio.op() != Op::Write || bio.is_preflush() || bio.is_fua() || bio.size() == 0 {
            return false;
        }
        let Some(top) = st.deltas.last() else {
            return false;
        };
        let hdr = &top.hdr;
        let Some(vaddr) = bio.sector().checked_mul(SECTOR) else {
            return false;
        };
        !hdr.extended_l2()
            && hdr.offset_in_cluster(vaddr) + u64::from(bio.size()) <= hdr.cluster_size()
    }

    /// Adds the copy-on-write of `[vaddr, vaddr + len)` of delta `d` from
    /// `bio` at `boff` into the new cluster `host` (entry at `l2_off`, which
    /// pointed at `shared`) to the gang: its buffer, and what the chain shows
    /// of the cluster read now or planned. Returns the bio's `Src` back if
    /// there is no memory for it (the caller fills it alone). On error the
    /// caller frees `host`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gang_cow<'a>(
        &self,
        st: &mut WorkerState,
        d: usize,
        (bio, boff): (&'a Bio, u32),
        (l2_off, host): (u64, u64),
        vaddr: u64,
        len: u64,
        shared: Option<u64>,
    ) -> Result<Option<Src<'a>>> {
        let delta = st.delta(d)?;
        let cs = delta.hdr.cluster_size();
        let off = delta.hdr.offset_in_cluster(vaddr);
        let end = off.checked_add(len).filter(|&e| e <= cs).ok_or(EIO)?;
        let (Ok(mut buf), Ok(mut reads), Ok(())) = (
            st.gang.buffer(cs),
            KVec::with_capacity(4, GFP_KERNEL),
            st.gang.fills.reserve(1, GFP_KERNEL),
        ) else {
            return Ok(Some(Src::Bio(bio, boff)));
        };
        let base = vaddr - off;
        let span = fill_span(off, end, cs);
        let mut pos = span.0;
        while pos < span.1 {
            let (i, kind, rl) = self.resolve(st, d, base + pos, span.1 - pos)?;
            let at = pos as usize;
            let dst = buf.get_mut(at..(pos + rl) as usize).ok_or(EIO)?;
            match kind {
                RunKind::Zero | RunKind::Unallocated => dst.fill(0),
                RunKind::Data { host } => reads.push(
                    ChainRead {
                        delta: i,
                        host,
                        at,
                        len: rl as usize,
                    },
                    GFP_KERNEL,
                )?,
                RunKind::Compressed { host, len: clen } => {
                    dst.copy_from_slice(self.inflated(st, i, host, clen, base + pos, rl)?);
                }
            }
            pos += rl;
        }
        // Cannot fail (reserved above): a failure here would end the split
        // reference with an error, never lose the write.
        st.gang.fills.push(
            Fill {
                bio: bio.split_ref(),
                boff,
                d,
                l2_off,
                vaddr,
                off,
                len,
                cs,
                host,
                shared,
                buf,
                reads,
                res: Ok(()),
            },
            GFP_KERNEL,
        )?;
        st.gang.bytes = st.gang.bytes.saturating_add(cs);
        Ok(None)
    }

    /// Runs the gang's fills (see the module doc): all reads, all writes,
    /// then the entries in order; each bio's reference ends with its fill's
    /// result.
    pub(crate) fn flush_cow_gang(&self, st: &mut WorkerState) {
        if st.gang.fills.is_empty() {
            return;
        }
        let mut fills = core::mem::replace(&mut st.gang.fills, KVec::new());
        st.gang.bytes = 0;
        Self::gang_reads(st, &mut fills);
        for f in fills.iter_mut().filter(|f| f.res.is_ok()) {
            f.res = Self::gang_data(f);
        }
        Self::gang_writes(st, &mut fills);
        for f in fills.into_iter() {
            let r = f.res.and_then(|()| self.gang_point(st, &f));
            if r.is_err() {
                if let Ok(cs) = st.delta(f.d).map(|delta| delta.hdr.cluster_size()) {
                    self.free_unused(st, f.d, f.host, cs);
                }
            }
            f.bio.end(r);
            st.gang.keep(f.buf);
        }
    }

    /// Every fill's reads from the chain, in flight at once; a failed read
    /// fails its fill.
    fn gang_reads(st: &WorkerState, fills: &mut [Fill]) {
        let n: usize = fills.iter().map(|f| f.reads.len()).sum();
        if n == 0 {
            return;
        }
        let (Ok(mut reqs), Ok(mut results)) = (
            KVec::with_capacity(n, GFP_KERNEL),
            KVec::<(usize, Result)>::with_capacity(n, GFP_KERNEL),
        ) else {
            // No memory for the lists: each read on its own.
            for f in fills.iter_mut() {
                f.res = Self::fill_reads_one_by_one(st, f);
            }
            return;
        };
        let mut planned = Ok(());
        for (k, f) in fills.iter_mut().enumerate() {
            let mut rest: &mut [u8] = &mut f.buf;
            let mut done = 0usize;
            for c in f.reads.iter() {
                let Some(file) = st.deltas.get(c.delta).map(|delta| &delta.file) else {
                    f.res = Err(EIO);
                    break;
                };
                // Reads were planned in order, each inside the buffer.
                let skip = c.at.checked_sub(done).filter(|&s| s <= rest.len());
                let Some(skip) = skip.filter(|&s| c.len <= rest.len() - s) else {
                    f.res = Err(EIO);
                    break;
                };
                let (_, tail) = core::mem::take(&mut rest).split_at_mut(skip);
                let (piece, tail) = tail.split_at_mut(c.len);
                rest = tail;
                done = c.at + c.len;
                // Within the capacity reserved for all of them.
                if reqs
                    .push(ReadAt::new(file, piece, c.host, k), GFP_KERNEL)
                    .is_err()
                {
                    planned = Err(ENOMEM);
                }
            }
        }
        read_batch(&mut reqs);
        for req in reqs.iter() {
            if results.push((req.tag, req.res), GFP_KERNEL).is_err() {
                planned = Err(ENOMEM);
            }
        }
        let nreqs = reqs.len();
        drop(reqs);
        Self::gang_results(fills, &results, nreqs, planned);
    }

    /// Applies the `(fill, result)` pairs of the gang's reads or writes: a
    /// fill's first error is its result. `due` results were expected; if
    /// fewer were recorded or planning failed (neither can happen: all is
    /// within reserved capacity), every fill fails, as an I/O whose result
    /// is unknown must not count as done.
    fn gang_results(fills: &mut [Fill], results: &[(usize, Result)], due: usize, planned: Result) {
        if planned.is_err() || results.len() != due {
            fills
                .iter_mut()
                .for_each(|f| f.res = f.res.and(Err(ENOMEM)));
            return;
        }
        for (k, r) in results.iter() {
            if let (Err(e), Some(f)) = (r, fills.get_mut(*k)) {
                if f.res.is_ok() {
                    f.res = Err(*e);
                }
            }
        }
    }

    /// A fill's reads from the chain, one after the other.
    fn fill_reads_one_by_one(st: &WorkerState, f: &mut Fill) -> Result {
        for c in f.reads.iter() {
            let file = &st.deltas.get(c.delta).ok_or(EIO)?.file;
            let end = c.at.checked_add(c.len).ok_or(EIO)?;
            file.read_full(f.buf.get_mut(c.at..end).ok_or(EIO)?, c.host)?;
        }
        Ok(())
    }

    /// The write's data over the chain's in the fill's buffer.
    fn gang_data(f: &mut Fill) -> Result {
        let end = f.off.checked_add(f.len).ok_or(EIO)?;
        let mid = f.buf.get_mut(f.off as usize..end as usize).ok_or(EIO)?;
        f.bio.copy_to(f.boff, mid)
    }

    /// Every fill's cluster written, in flight at once (those still good).
    fn gang_writes(st: &WorkerState, fills: &mut [Fill]) {
        let n = fills.iter().filter(|f| f.res.is_ok()).count();
        if n == 0 {
            return;
        }
        let (Ok(mut reqs), Ok(mut results)) = (
            KVec::with_capacity(n, GFP_KERNEL),
            KVec::<(usize, Result)>::with_capacity(n, GFP_KERNEL),
        ) else {
            // No memory for the lists: each write on its own.
            for f in fills.iter_mut().filter(|f| f.res.is_ok()) {
                let file = st.deltas.get(f.d).map(|delta| &delta.file);
                f.res = match (file, f.buf.get(..f.cs as usize)) {
                    (Some(file), Some(buf)) => file.write_full(buf, f.host),
                    _ => Err(EIO),
                };
            }
            return;
        };
        let mut planned = Ok(());
        for (k, f) in fills.iter().enumerate().filter(|(_, f)| f.res.is_ok()) {
            let (Some(delta), Some(buf)) = (st.deltas.get(f.d), f.buf.get(..f.cs as usize)) else {
                // Without the write, the fill counts as failed (below).
                let _ = results.push((k, Err(EIO)), GFP_KERNEL);
                continue;
            };
            // Within the capacity reserved for all of them.
            if reqs
                .push(WriteAt::new(&delta.file, buf, f.host, k), GFP_KERNEL)
                .is_err()
            {
                planned = Err(ENOMEM);
            }
        }
        write_batch(&mut reqs);
        for req in reqs.iter() {
            if results.push((req.tag, req.res), GFP_KERNEL).is_err() {
                planned = Err(ENOMEM);
            }
        }
        drop(reqs);
        // Every fill still good has exactly one result: its write's.
        Self::gang_results(fills, &results, n, planned);
    }

    /// Points the fill's entry at its cluster (the data is written) and
    /// drops the reference of the cluster it pointed at before.
    fn gang_point(&self, st: &mut WorkerState, f: &Fill) -> Result {
        let delta = st.delta(f.d)?;
        let hdr = &delta.hdr;
        st.hot_forget(f.d, f.vaddr);
        let raw = fmt::encode_l2_normal(f.host, true);
        let md = st.md.get_mut(f.d).ok_or(EIO)?;
        md.set_l2_entry(&delta.file, hdr, f.l2_off, f.vaddr, raw, 0)
            .map_err(|e| self.md_error(e))?;
        if let Some(old) = f.shared {
            self.free(st, f.d, old, hdr.cluster_size());
        }
        Ok(())
    }
}
