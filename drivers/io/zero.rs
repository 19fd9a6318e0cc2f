// SPDX-License-Identifier: GPL-2.0

//! Discard and write-zeroes: whole clusters dropped or marked zero (v3),
//! the rest written as zeroes; ranges that already read as zeroes, and L2
//! tables nobody has, skipped whole.

use super::*;

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
                self.write_piece(st, d, Src::Zero, vaddr, len, false, None)?;
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
    /// `vaddr` does not. Where a delta has no L2 table (or one past the end
    /// of its file or in a hole of it), its whole range counts at once.
    fn zero_already(&self, st: &mut WorkerState, d: usize, vaddr: u64, end: u64) -> Result<u64> {
        let delta = st.delta(d)?;
        let cs = delta.hdr.cluster_size();
        let md = st.md.get_mut(d).ok_or(EIO)?;
        let mut span = if md
            .l1_entry_in_file(&delta.file, &delta.hdr, vaddr, HoleWord::Confirm)?
            .is_none()
        {
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
            let md = st.md.get_mut(i).ok_or(EIO)?;
            if md
                .l1_entry_in_file(&below.file, hdr, vaddr, HoleWord::Confirm)?
                .is_some()
            {
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
        st.hot_forget(d, vaddr);
        let md = st.md.get_mut(d).ok_or(EIO)?;
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
