// SPDX-License-Identifier: GPL-2.0

//! The fast path: where the top delta keeps a cluster of its own, a bio
//! inside that cluster needs no metadata work. `map` recognises such bios
//! from a lock-free, direct-mapped table of recent lookups and hands them to
//! a work item that starts their direct I/O without the table's state mutex,
//! so they never wait behind allocation or copy-on-write.
//!
//! Entries are put and removed by the worker with the state locked. A
//! mapping change removes the entry first and then waits for the data I/O in
//! flight; the fast path counts itself in flight before it reads an entry
//! and until its I/O is started, so either it sees the removal or the
//! change waits for it (both sides use sequentially consistent atomics).

use crate::kx::file::File;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use kernel::prelude::*;

/// Table slots (direct-mapped by virtual cluster index).
const SLOTS: u64 = 4096;
const VALID: u64 = 1 << 63;
/// The top owns the cluster (COPIED): writes may go in place.
const OWNED: u64 = 1 << 62;
const HOST_BITS: u32 = 44;
const TAG_BITS: u32 = 18;

pub(crate) struct HotMap {
    slots: KVec<AtomicU64>,
    /// Cluster bits of the chain.
    cb: u32,
    /// Virtual size of the top when the table was built.
    size: u64,
    /// The top's file when the table was built: the fast path's target.
    pub(crate) file: File,
    /// Off while a merge runs.
    enabled: AtomicBool,
    /// The top the table was built with left the chain: off for good.
    retired: AtomicBool,
}

impl HotMap {
    pub(crate) fn new(file: File, cb: u32, size: u64) -> Result<Self> {
        let mut slots = KVec::with_capacity(SLOTS as usize, GFP_KERNEL)?;
        for _ in 0..SLOTS {
            slots.push(AtomicU64::new(0), GFP_KERNEL)?;
        }
        Ok(Self { slots, cb, size, file, enabled: AtomicBool::new(true), retired: AtomicBool::new(false) })
    }

    fn slot(&self, vci: u64) -> Option<&AtomicU64> {
        self.slots.get((vci % SLOTS) as usize)
    }

    /// Whether `[vaddr, vaddr + len)` lies in one cluster of the top.
    pub(crate) fn in_one_cluster(&self, vaddr: u64, len: u64) -> bool {
        let Some(end) = vaddr.checked_add(len) else {
            return false;
        };
        len > 0 && end <= self.size && vaddr >> self.cb == (end - 1) >> self.cb
    }

    /// Remembers that the top maps the cluster of `vaddr` to `host`.
    /// Worker only, state locked.
    pub(crate) fn put(&self, vaddr: u64, host: u64, owned: bool) {
        if !self.enabled.load(SeqCst) {
            return;
        }
        let vci = vaddr >> self.cb;
        let (tag, hci) = (vci / SLOTS, host >> self.cb);
        if tag >> TAG_BITS != 0 || hci >> HOST_BITS != 0 {
            return;
        }
        let v = VALID | if owned { OWNED } else { 0 } | tag << HOST_BITS | hci;
        if let Some(s) = self.slot(vci) {
            s.store(v, SeqCst);
        }
    }

    /// Forgets the cluster of `vaddr` (its mapping is about to change).
    pub(crate) fn del(&self, vaddr: u64) {
        if let Some(s) = self.slot(vaddr >> self.cb) {
            s.store(0, SeqCst);
        }
    }

    /// Host offset of `vaddr` if the fast path may serve it (a write needs
    /// a cluster the top owns).
    pub(crate) fn lookup(&self, vaddr: u64, write: bool) -> Option<u64> {
        if !self.enabled.load(SeqCst) {
            return None;
        }
        let vci = vaddr >> self.cb;
        let v = self.slot(vci)?.load(SeqCst);
        let tag = (v >> HOST_BITS) & ((1 << TAG_BITS) - 1);
        if v & VALID == 0 || tag != vci / SLOTS || (write && v & OWNED == 0) {
            return None;
        }
        let hci = v & ((1 << HOST_BITS) - 1);
        Some((hci << self.cb) | (vaddr & ((1 << self.cb) - 1)))
    }

    fn clear(&self) {
        for s in self.slots.iter() {
            s.store(0, SeqCst);
        }
    }

    /// Forgets everything (images re-read).
    pub(crate) fn reset(&self) {
        self.clear();
    }

    /// Off (a merge starts): every bio goes through the worker.
    pub(crate) fn disable(&self) {
        self.enabled.store(false, SeqCst);
        self.clear();
    }

    /// On again, unless the top changed.
    pub(crate) fn enable(&self) {
        if !self.retired.load(SeqCst) {
            self.enabled.store(true, SeqCst);
        }
    }

    /// The top left the chain: off for the table's life.
    pub(crate) fn retire(&self) {
        self.retired.store(true, SeqCst);
        self.disable();
    }
}
