// SPDX-License-Identifier: GPL-2.0

//! The I/O path: reads, writes, discard and write-zeroes, run by the worker
//! with the table's state locked. Reads always resolve from the top of the
//! chain; writes go to a delta `d` (the top for guest I/O, a merge target for
//! merges) and copy on write what the chain shows from `d` down.
//!
//! `read`, `write` and `zero` (discard and write-zeroes) hold the three
//! paths, `cow` the copy-on-write fills of a batch's writes, in flight
//! together; what they share (metadata overlap protection, subcluster and
//! L2 range arithmetic) is here.

mod cow;
mod read;
mod write;
mod zero;

use crate::hot::Fast;
use crate::kernel_abstractions::bio::{Bio, BioPiece, Op};
use crate::kernel_abstractions::direct_io::{BioPart, IoCounter};
use crate::kernel_abstractions::file::{File, IoBuf, DIO_ALIGN};
use crate::meta::{corrupt, DeltaMd, HoleWord};
use crate::qcow2_format::{self as fmt, Cluster, Header, RunKind};
use crate::target::{Delta, Inner, WorkerState, SECTOR};
use kernel::error::code::*;
use kernel::prelude::*;
use kernel::sync::Arc;

pub(crate) use cow::CowGang;

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

/// What of a `cs`-byte cluster a fill reads from the chain around a write
/// of `[off, end)`: all of it in one read where the write is inside (one
/// I/O where the chain holds it in one piece, not one before the write and
/// one after), else the part before or after the write, or nothing.
fn fill_span(off: u64, end: u64, cs: u64) -> (u64, u64) {
    match (off, end) {
        (0, e) if e == cs => (0, 0),
        (0, e) => (e, cs),
        (o, e) if e == cs => (0, o),
        _ => (0, cs),
    }
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
