// SPDX-License-Identifier: GPL-2.0

//! The metadata page cache of a delta: L2 tables and refcount blocks, a
//! page at a time, keyed by file offset, written back by the commit.

use super::*;
use kernel::rbtree::RBTree;

/// What a dirty cached page holds (they are written in this order).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Kind {
    Refcount,
    L2,
}

/// A cached metadata page; `dirty` if it differs from the image.
struct Page {
    buf: IoBuf,
    dirty: Option<Kind>,
    /// The fast path's table (`Fast::id`) this page's entries were last
    /// put into, 0 for none (see `DeltaMd::warm_l2_page`).
    warmed: u64,
}

/// Cache of metadata pages, keyed by file offset.
pub(super) struct MdCache {
    pages: RBTree<u64, Page>,
    count: usize,
    /// Dirty pages per kind.
    dirty_rc: usize,
    dirty_l2: usize,
    /// Offsets of the pages made dirty since all were last clean (some may
    /// be clean or gone by now), so a commit need not walk the whole cache.
    dirty_keys: KVec<u64>,
    /// Eviction sweeps the keys like a clock hand, so no page range is
    /// evicted over and over.
    hand: u64,
}

impl MdCache {
    pub(super) fn new() -> Self {
        Self {
            pages: RBTree::new(),
            count: 0,
            dirty_rc: 0,
            dirty_l2: 0,
            dirty_keys: KVec::new(),
            hand: 0,
        }
    }

    pub(super) fn dirty(&self) -> usize {
        self.dirty_rc + self.dirty_l2
    }

    fn count_dirty(&mut self, kind: Kind, add: bool) {
        let n = match kind {
            Kind::Refcount => &mut self.dirty_rc,
            Kind::L2 => &mut self.dirty_l2,
        };
        *n = if add { *n + 1 } else { n.saturating_sub(1) };
    }

    /// The first clean page at or after `from`.
    fn clean_from(&mut self, from: u64) -> Option<u64> {
        let mut cur = self.pages.cursor_lower_bound(&from);
        while let Some(c) = cur {
            let (k, p) = c.current();
            if p.dirty.is_none() {
                return Some(*k);
            }
            cur = c.move_next();
        }
        None
    }

    /// Drops a clean page (never a dirty one); false if there is none.
    fn evict_one(&mut self) -> bool {
        let hand = self.hand;
        let Some(key) = self.clean_from(hand).or_else(|| self.clean_from(0)) else {
            return false;
        };
        if self.pages.remove(&key).is_some() {
            self.count -= 1;
        }
        self.hand = key + MD_PAGE;
        true
    }

    /// Whether a page starting in `[start, end)` is cached (`start` is
    /// page-aligned where it matters: clusters are at least a page).
    pub(super) fn holds_any(&mut self, start: u64, end: u64) -> bool {
        self.pages
            .cursor_lower_bound(&start)
            .is_some_and(|c| *c.current().0 < end)
    }

    /// Drops the pages of `[start, end)`: the clusters there changed role
    /// (what they held, even if dirty, is of no use any more).
    pub(super) fn invalidate(&mut self, start: u64, end: u64) {
        // One lookup per cached page in the range, plus one: it is usually
        // empty (called for every allocation).
        loop {
            let key = match self.pages.cursor_lower_bound(&start) {
                Some(c) if *c.current().0 < end => *c.current().0,
                _ => return,
            };
            if let Some(p) = self.pages.remove(&key) {
                self.count -= 1;
                if let Some(k) = p.dirty {
                    self.count_dirty(k, false);
                }
            }
        }
    }

    /// Writes every dirty page of `kind` (they stay dirty).
    pub(super) fn write_dirty(&self, file: &File, kind: Kind) -> Result {
        for off in self.dirty_keys.iter() {
            if let Some(p) = self.pages.get(off).filter(|p| p.dirty == Some(kind)) {
                file.write_full(&p.buf, *off)?;
            }
        }
        Ok(())
    }

    /// Marks every page of `kind` clean (their writes are durable).
    pub(super) fn mark_clean(&mut self, kind: Kind) {
        for off in self.dirty_keys.iter() {
            if let Some(p) = self.pages.get_mut(off).filter(|p| p.dirty == Some(kind)) {
                p.dirty = None;
            }
        }
        match kind {
            Kind::Refcount => self.dirty_rc = 0,
            Kind::L2 => self.dirty_l2 = 0,
        }
        if self.dirty() == 0 {
            self.dirty_keys = KVec::new();
        }
    }
}

/// Pages of the cache.
impl DeltaMd {
    /// The cached page at `off`, read if needed. Only clean pages are
    /// evicted to make room; with none left (or too many dirty) everything
    /// is committed first.
    pub(super) fn page(&mut self, file: &File, off: u64) -> Result<&mut IoBuf> {
        if self.cache.pages.get(&off).is_none() {
            let max = param::md_cache_pages();
            // After a failed fsync no commit can succeed (`File::fsync`): the
            // dirty pages stay, at most half the cache (`page_dirty`), and
            // the clean half keeps serving lookups (reads go on working).
            if self.cache.dirty() >= max / 2 && !file.sync_failed() {
                self.commit(file, false)?;
            }
            while self.cache.count >= max {
                if !self.cache.evict_one() {
                    self.commit(file, false)?;
                    if !self.cache.evict_one() {
                        break;
                    }
                }
            }
            let mut buf = IoBuf::new(MD_PAGE as usize)?;
            file.read_full(&mut buf, off)?;
            self.cache.pages.try_create_and_insert(
                off,
                Page {
                    buf,
                    dirty: None,
                    warmed: 0,
                },
                GFP_KERNEL,
            )?;
            self.cache.count += 1;
        }
        self.cache
            .pages
            .get_mut(&off)
            .map(|p| &mut p.buf)
            .ok_or(EIO)
    }

    /// The cached page at `off`, if it is cached.
    pub(super) fn cache_page(&self, off: u64) -> Option<&IoBuf> {
        self.cache.pages.get(&off).map(|p| &p.buf)
    }

    /// Records that the entries of the cached page at `off` go into the
    /// fast path's table `id`; false if they already went (or the page is
    /// not cached).
    pub(super) fn claim_page_warm(&mut self, off: u64, id: u64) -> bool {
        match self.cache.pages.get_mut(&off) {
            Some(p) if p.warmed != id => {
                p.warmed = id;
                true
            }
            _ => false,
        }
    }

    /// The cached page at `off`, marked dirty (of `kind`) for the next commit.
    /// A page not dirty yet, with half the cache dirty, commits first (as a
    /// miss does in `page`): at most half the cache is ever dirty, so a
    /// failed fsync leaves a clean half for lookups. After one such a page
    /// is refused (EIO): no dirty page can be written out any more.
    pub(super) fn page_dirty(&mut self, file: &File, off: u64, kind: Kind) -> Result<&mut IoBuf> {
        let clean = self
            .cache
            .pages
            .get(&off)
            .map_or(true, |p| p.dirty.is_none());
        if clean && self.cache.dirty() >= param::md_cache_pages() / 2 {
            if file.sync_failed() {
                return Err(EIO);
            }
            self.commit(file, false)?;
        }
        self.page(file, off)?;
        let cache = &mut self.cache;
        let p = cache.pages.get_mut(&off).ok_or(EIO)?;
        if p.dirty.is_none() {
            cache.dirty_keys.push(off, GFP_KERNEL)?;
            match kind {
                Kind::Refcount => cache.dirty_rc += 1,
                Kind::L2 => cache.dirty_l2 += 1,
            }
        }
        p.dirty = Some(kind);
        Ok(&mut p.buf)
    }
}
