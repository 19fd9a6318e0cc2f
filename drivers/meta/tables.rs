// SPDX-License-Identifier: GPL-2.0

//! The L1 table and L2 entries of a delta: lookups (from the cache, or
//! the file), the fast path's look at a cached page (`warm_l2_page`),
//! changes of entries (written by the next commit), and new L2 tables.

use super::*;

/// How [`DeltaMd::l1_entry_in_file`] takes a file system's word that a
/// table lies in a hole: images QEMU writes never have one there, and a
/// wrong word (a file system's bug, a FUSE server's answer) must not lose
/// data.
#[derive(Clone, Copy)]
pub(crate) enum HoleWord {
    /// As said: for the count, where a wrong word misstates a number.
    Trust,
    /// Confirmed by reading the table (zeroes only): for merges and
    /// discard, which would leave data behind. One read of a cluster per
    /// such table, not a look at each of its entries.
    Confirm,
}

/// L1 and L2 entries.
impl DeltaMd {
    /// The decoded L1 entry for `vaddr`.
    pub(crate) fn l1_entry(&self, hdr: &Header, vaddr: u64) -> Result<Option<fmt::L1Entry>> {
        let raw = *usize::try_from(hdr.l1_index(vaddr))
            .ok()
            .and_then(|i| self.l1.get(i))
            .ok_or(EIO)?;
        fmt::decode_l1(hdr, raw).map_err(|e| corrupt(self.img, e))
    }

    /// `l1_entry`, but an entry that does not decode is `None` and not
    /// logged: for the fast path's look at a page's neighbours (`Inner::warm`),
    /// which would log a bad entry once per cluster it covers. The lookup
    /// of the cluster itself reports it.
    pub(crate) fn l1_entry_quiet(&self, hdr: &Header, vaddr: u64) -> Option<Option<fmt::L1Entry>> {
        let i = usize::try_from(hdr.l1_index(vaddr)).ok()?;
        fmt::decode_l1(hdr, *self.l1.get(i)?).ok()
    }

    /// File offset of the L2 entry for `vaddr` in the table at `l2_off`.
    fn l2_pos(hdr: &Header, l2_off: u64, vaddr: u64) -> Result<u64> {
        hdr.l2_index(vaddr)
            .checked_mul(hdr.l2_entry_bytes())
            .and_then(|o| o.checked_add(l2_off))
            .ok_or(EIO)
    }

    /// The L1 entry for `vaddr` if its L2 table may map something: none
    /// where there is no table, or where the table lies wholly past the end
    /// of the file or in a hole of it, with no page of it cached (it reads
    /// as zeroes, as QEMU reads it). For walks over whole tables (the count,
    /// merges, discard), which a damaged L1 naming millions of such tables
    /// would otherwise send through every entry (a sparse file's apparent
    /// size bounds nothing). `holes` says how far the file system's word
    /// for a hole is taken.
    pub(crate) fn l1_entry_in_file(
        &mut self,
        file: &File,
        hdr: &Header,
        vaddr: u64,
        holes: HoleWord,
    ) -> Result<Option<fmt::L1Entry>> {
        let Some(e) = self.l1_entry(hdr, vaddr)? else {
            return Ok(None);
        };
        let off = e.l2_offset;
        let cs = hdr.cluster_size();
        // The cache first (a tree lookup; a table being walked is there),
        // then the file (a seek for tables inside it).
        if self.cache.holds_any(off, off.saturating_add(cs)) {
            return Ok(Some(e));
        }
        let zeroes = off >= file.size()
            || (!file.holds_data(off, cs)
                && match holes {
                    HoleWord::Trust => true,
                    HoleWord::Confirm => {
                        let mut buf = IoBuf::new(cs as usize)?;
                        file.read_full(&mut buf, off)?;
                        // A word at a time (a cluster is whole words).
                        buf.chunks_exact(8).all(|c| {
                            <[u8; 8]>::try_from(c).is_ok_and(|w| u64::from_ne_bytes(w) == 0)
                        })
                    }
                });
        Ok((!zeroes).then_some(e))
    }

    /// The raw L2 entry for `vaddr` in the table at `l2_off` if its page is
    /// cached (no I/O; plain entries, not extended L2).
    pub(crate) fn cached_l2_entry(&self, hdr: &Header, l2_off: u64, vaddr: u64) -> Option<u64> {
        // An extended entry's first word alone does not say what it shows.
        if hdr.extended_l2() {
            return None;
        }
        let pos = Self::l2_pos(hdr, l2_off, vaddr).ok()?;
        let page = self.cache_page(pos & !(MD_PAGE - 1))?;
        fmt::table_entry(page, (pos & (MD_PAGE - 1)) / 8)
    }

    /// The raw L2 entry (and extended-L2 bitmap, else 0) for `vaddr`.
    pub(crate) fn l2_entry(
        &mut self,
        file: &File,
        hdr: &Header,
        l2_off: u64,
        vaddr: u64,
    ) -> Result<(u64, u64)> {
        let pos = Self::l2_pos(hdr, l2_off, vaddr)?;
        let page = self.page(file, pos & !(MD_PAGE - 1))?;
        let at = (pos & (MD_PAGE - 1)) as usize;
        let raw = fmt::table_entry(page, (at / 8) as u64).ok_or(EIO)?;
        let bitmap = if hdr.extended_l2() {
            fmt::table_entry(page, (at / 8 + 1) as u64).ok_or(EIO)?
        } else {
            0
        };
        Ok((raw, bitmap))
    }

    /// Calls `f(self, guest address, raw entry)` for every entry of the L2
    /// table at `l2_off` on the cached page that holds `vaddr`'s entry (up
    /// to the image's end), the first time it is asked for that page and the
    /// fast path's table `id` (a page read again starts unmarked). Plain
    /// entries only (not extended L2): at most `MD_PAGE / 8` calls.
    pub(crate) fn warm_l2_page(
        &mut self,
        hdr: &Header,
        l2_off: u64,
        vaddr: u64,
        id: u64,
        mut f: impl FnMut(&Self, u64, u64),
    ) -> Result {
        let page_off = Self::l2_pos(hdr, l2_off, vaddr)? & !(MD_PAGE - 1);
        // A page is one L2 table's: clusters are never smaller than a page
        // here (the constructor refuses them), so the page alone is marked.
        if hdr.extended_l2() || !self.claim_page_warm(page_off, id) {
            return Ok(());
        }
        let md = &*self;
        let Some(page) = md.cache_page(page_off) else {
            return Ok(());
        };
        let cs = hdr.cluster_size();
        // The table's part of the page (all of it, as said; the bounds do
        // not rely on that).
        let start = page_off.max(l2_off);
        let end = page_off
            .checked_add(MD_PAGE)
            .zip(l2_off.checked_add(cs))
            .map(|(a, b)| a.min(b))
            .ok_or(EIO)?;
        // The guest address of the table's first entry.
        let base = hdr
            .l2_index(vaddr)
            .checked_mul(cs)
            .and_then(|o| o.checked_add(hdr.offset_in_cluster(vaddr)))
            .and_then(|o| vaddr.checked_sub(o))
            .ok_or(EIO)?;
        let mut pos = start;
        while pos < end {
            let v = ((pos - l2_off) / 8)
                .checked_mul(cs)
                .and_then(|o| o.checked_add(base))
                .ok_or(EIO)?;
            if v >= hdr.size {
                break;
            }
            f(
                md,
                v,
                fmt::table_entry(page, (pos - page_off) / 8).ok_or(EIO)?,
            );
            pos = pos.checked_add(8).ok_or(EIO)?;
        }
        Ok(())
    }

    /// Sets the L2 entry for `vaddr` in the cache (written by the next
    /// commit). An entry that points at host data needs the commit's
    /// barrier: that data and its refcount go first.
    pub(crate) fn set_l2_entry(
        &mut self,
        file: &File,
        hdr: &Header,
        l2_off: u64,
        vaddr: u64,
        raw: u64,
        bitmap: u64,
    ) -> Result {
        let pos = Self::l2_pos(hdr, l2_off, vaddr)?;
        let page = self.page_dirty(file, pos & !(MD_PAGE - 1), Kind::L2)?;
        let at = (pos & (MD_PAGE - 1)) / 8;
        // Both words or neither: a caller that fails frees the new cluster.
        if hdr.extended_l2() && fmt::table_entry(page, at + 1).is_none() {
            return Err(EIO);
        }
        let old = (fmt::table_entry(page, at), fmt::table_entry(page, at + 1));
        fmt::set_table_entry(page, at, raw).ok_or(EIO)?;
        if hdr.extended_l2() {
            fmt::set_table_entry(page, at + 1, bitmap).ok_or(EIO)?;
        }
        if raw & fmt::L2E_OFFSET_MASK != 0 || raw & fmt::L2E_COMPRESSED != 0 {
            self.barrier = true;
        }
        // The status line's count follows every change of an entry.
        let ext = hdr.extended_l2();
        let was = (old.0.unwrap_or(0), if ext { old.1.unwrap_or(0) } else { 0 });
        self.count
            .note(hdr, vaddr, was, (raw, if ext { bitmap } else { 0 }));
        Ok(())
    }

    /// Points the L1 entry for `vaddr` at a new L2 table (in memory; written
    /// by the next commit, after the table).
    fn set_l1_entry(&mut self, hdr: &Header, vaddr: u64, raw: u64) -> Result {
        let i = usize::try_from(hdr.l1_index(vaddr)).map_err(|_| EIO)?;
        mark_table_page(&mut self.l1_dirty, i / TABLE_PER_PAGE)?;
        *self.l1.get_mut(i).ok_or(EIO)? = raw;
        self.barrier = true;
        Ok(())
    }

    /// The L2 table covering `vaddr`, allocating an empty one if there is none.
    pub(crate) fn ensure_l2(&mut self, file: &File, hdr: &Header, vaddr: u64) -> Result<u64> {
        match self.l1_entry(hdr, vaddr)? {
            Some(e) if e.copied => Ok(e.l2_offset),
            // Shared with an internal snapshot: give the active L1 its own copy
            // first. Data refcounts already count both tables' references.
            // (A shared table is never written, so the image holds it as is.)
            Some(e) => {
                let cs = hdr.cluster_size();
                let mut table = IoBuf::new(cs as usize)?;
                file.read_full(&mut table, e.l2_offset)?;
                let off = self.new_l2_table(file, hdr, vaddr, &table)?;
                // Dropped once the new L1 entry is durable.
                let queued = self.defer_free(e.l2_offset, cs);
                self.leak_on_error(queued);
                Ok(off)
            }
            None => {
                // The buffer first: nothing to free if there is no memory.
                let zero = IoBuf::new(hdr.cluster_size() as usize)?;
                self.new_l2_table(file, hdr, vaddr, &zero)
            }
        }
    }

    /// Writes `contents` to a new cluster and points the L1 entry for
    /// `vaddr` at it (in memory, see `set_l1_entry`); its offset. The
    /// cluster is freed again if that fails.
    fn new_l2_table(
        &mut self,
        file: &File,
        hdr: &Header,
        vaddr: u64,
        contents: &IoBuf,
    ) -> Result<u64> {
        let off = self.alloc_cluster(file, hdr)?;
        let res = self
            .note_meta(off, MetaKind::L2Table)
            .and_then(|()| file.write_full(contents, off))
            .and_then(|()| self.set_l1_entry(hdr, vaddr, fmt::encode_l1(off, true)));
        if let Err(e) = res {
            // Nothing points at it.
            let freed = self.free_range(file, hdr, off, hdr.cluster_size());
            self.leak_on_error(freed);
            return Err(e);
        }
        Ok(off)
    }
}
