// SPDX-License-Identifier: GPL-2.0

//! The clusters holding a writable delta's L2 tables and refcount blocks,
//! for the overlap check (`DeltaMd::overlap`).
//!
//! A load records every table the L1 and refcount tables name: up to 4 Mi
//! L2 tables (the format's 32 MiB L1) and 1 Mi refcount blocks (8 MiB
//! refcount table), distinct offsets if the image says so. A tree node per
//! cluster (64 bytes) let a ~40 MiB hostile image take ~330 MiB of kernel
//! memory; the load's set is instead a sorted array of 8-byte keys, no
//! larger than the tables it was read from (which stay in memory too; the
//! load needs up to twice that for the while: the array before it is
//! shrunk, the load check's list), and searched by bisection. Clusters
//! that become metadata later (tables the target allocates) go to a tree,
//! which grows with the image file. A freed cluster of the array is marked
//! in place (no shift of a many-MiB array with the state mutex held).

use crate::kernel_abstractions::{gfp_kv, task};
use kernel::prelude::*;
use kernel::rbtree::RBTree;

/// What a metadata cluster holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum MetaKind {
    RefcountBlock,
    L2Table,
}

impl MetaKind {
    /// How dmesg names it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            MetaKind::RefcountBlock => "refcount block",
            MetaKind::L2Table => "L2 table",
        }
    }

    fn bit(self) -> u64 {
        match self {
            MetaKind::RefcountBlock => 0,
            MetaKind::L2Table => KIND,
        }
    }
}

/// Key of the array: cluster index << 2 | FREED | KIND.
const KIND: u64 = 1;
const FREED: u64 = 2;
const SHIFT: u32 = 2;
/// Cluster indices above this do not fit a key (host offsets are below
/// 2^56 and clusters at least 512 bytes: never reached).
const MAX_CLUSTER: u64 = u64::MAX >> SHIFT;

fn key(c: u64, kind: MetaKind) -> Result<u64> {
    if c > MAX_CLUSTER {
        return Err(EFBIG);
    }
    Ok(c << SHIFT | kind.bit())
}

fn kind_of(k: u64) -> MetaKind {
    if k & KIND != 0 {
        MetaKind::L2Table
    } else {
        MetaKind::RefcountBlock
    }
}

/// Sorts `v` in place: a pass if it is sorted already (an image's tables
/// usually are, in allocation order), a heapsort otherwise (no allocation,
/// O(n log n) for any input, rescheduling now and then). Not core's sort,
/// whose panic paths on a broken order objtool cannot follow.
pub(super) fn sort(v: &mut [u64]) {
    if v.iter().zip(v.iter().skip(1)).all(|(a, b)| a <= b) {
        return;
    }
    let n = v.len();
    for (i, root) in (0..n / 2).rev().enumerate() {
        sift_down(v, root, n);
        if i % 4096 == 4095 {
            task::cond_resched();
        }
    }
    for (i, end) in (1..n).rev().enumerate() {
        v.swap(0, end);
        sift_down(v, 0, end);
        if i % 4096 == 4095 {
            task::cond_resched();
        }
    }
}

/// Moves `v[root]` down the max-heap `v[..end]` to its place.
fn sift_down(v: &mut [u64], mut root: usize, end: usize) {
    loop {
        let Some(mut child) = root.checked_mul(2).and_then(|c| c.checked_add(1)) else {
            return;
        };
        if child >= end {
            return;
        }
        if child + 1 < end && v.get(child) < v.get(child + 1) {
            child += 1;
        }
        match (v.get(root), v.get(child)) {
            (Some(r), Some(c)) if r < c => v.swap(root, child),
            _ => return,
        }
        root = child;
    }
}

/// The first `n` keys of `keys` in an array of their own.
fn shrunk(keys: &KVVec<u64>, n: usize) -> Option<KVVec<u64>> {
    let mut v = KVVec::with_capacity(n, gfp_kv()).ok()?;
    v.extend_from_slice(keys.get(..n)?, gfp_kv()).ok()?;
    Some(v)
}

/// Collects the clusters of a load before [`MetaClusters::rebuild`] sorts
/// them.
pub(crate) struct MetaBuilder {
    keys: KVVec<u64>,
}

impl MetaBuilder {
    /// A builder with room for `n` clusters (the tables' entries).
    pub(crate) fn with_capacity(n: usize) -> Result<Self> {
        Ok(Self {
            keys: KVVec::with_capacity(n, gfp_kv())?,
        })
    }

    /// Records cluster `c` as holding `kind`.
    pub(crate) fn add(&mut self, c: u64, kind: MetaKind) -> Result {
        self.keys.push(key(c, kind)?, gfp_kv())?;
        Ok(())
    }
}

/// The set; see the module's comment.
pub(crate) struct MetaClusters {
    /// Sorted by cluster, one key per cluster in `keys[..len]`.
    keys: KVVec<u64>,
    len: usize,
    /// Clusters recorded since the last rebuild and not in `keys`.
    added: RBTree<u64, MetaKind>,
}

impl MetaClusters {
    pub(crate) fn new() -> Self {
        Self {
            keys: KVVec::new(),
            len: 0,
            added: RBTree::new(),
        }
    }

    /// How many clusters the set holds (freed ones of the array included).
    pub(crate) fn len(&self) -> usize {
        self.len.saturating_add(self.added.iter().count())
    }

    /// Makes the set the builder's clusters and those already in it. For a
    /// load: the sort is O(n log n) in the tables' entries (linear for the
    /// ascending offsets an image usually has), once.
    pub(crate) fn rebuild(&mut self, mut b: MetaBuilder) -> Result {
        for &k in self.live() {
            b.keys.push(k, gfp_kv())?;
        }
        for (&c, &kind) in self.added.iter() {
            b.add(c, kind)?;
        }
        let keys = b.keys.as_mut_slice();
        sort(keys);
        // Keep the first key of each cluster (a refcount block if the
        // image names one cluster as both).
        let mut n = 0usize;
        for r in 0..keys.len() {
            let Some(&k) = keys.get(r) else { break };
            let dup = n
                .checked_sub(1)
                .and_then(|p| keys.get(p))
                .is_some_and(|&prev| prev >> SHIFT == k >> SHIFT);
            if dup {
                continue;
            }
            if let Some(slot) = keys.get_mut(n) {
                *slot = k;
            }
            n += 1;
        }
        // Duplicates (an L1 naming one table many times) leave most of the
        // array unused: keep a copy of what is used (or, without the
        // memory for it, the array as it is).
        self.keys = if b.keys.capacity() / 2 > n {
            shrunk(&b.keys, n).unwrap_or(b.keys)
        } else {
            b.keys
        };
        self.len = n;
        self.added = RBTree::new();
        Ok(())
    }

    /// Every cluster of the set and what it holds, the array's in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, MetaKind)> + '_ {
        Iterator::chain(
            self.live().map(|&k| (k >> SHIFT, kind_of(k))),
            self.added.iter().map(|(&c, &kind)| (c, kind)),
        )
    }

    /// The keys of clusters not freed since the rebuild.
    fn live(&self) -> impl Iterator<Item = &u64> {
        self.keys
            .get(..self.len)
            .unwrap_or(&[])
            .iter()
            .filter(|&&k| k & FREED == 0)
    }

    /// Index in `keys` of cluster `c`'s key.
    fn find(&self, c: u64) -> Option<usize> {
        self.keys
            .get(..self.len)?
            .binary_search_by_key(&c, |&k| k >> SHIFT)
            .ok()
    }

    /// What cluster `c` holds, if it is metadata.
    pub(crate) fn get(&self, c: u64) -> Option<MetaKind> {
        match self.find(c) {
            // A freed key is brought back in place, never added to the tree.
            Some(i) => self
                .keys
                .get(i)
                .filter(|&&k| k & FREED == 0)
                .map(|&k| kind_of(k)),
            None => self.added.get(&c).copied(),
        }
    }

    /// Records that cluster `c` holds `kind` (kept as it was if it is
    /// recorded already).
    pub(crate) fn insert(&mut self, c: u64, kind: MetaKind) -> Result {
        let k = key(c, kind)?;
        if let Some(i) = self.find(c) {
            if let Some(slot) = self.keys.get_mut(i) {
                if *slot & FREED != 0 {
                    *slot = k;
                }
            }
        } else if self.added.get(&c).is_none() {
            self.added.try_create_and_insert(c, kind, GFP_KERNEL)?;
        }
        Ok(())
    }

    /// Cluster `c` no longer holds metadata.
    pub(crate) fn remove(&mut self, c: u64) {
        match self.find(c) {
            Some(i) => {
                if let Some(slot) = self.keys.get_mut(i) {
                    *slot |= FREED;
                }
            }
            None => {
                self.added.remove(&c);
            }
        }
    }
}
