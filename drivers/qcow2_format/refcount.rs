// SPDX-License-Identifier: GPL-2.0

//! Refcount table entries and refcount blocks of any width.

use super::*;

/// Largest refcount value representable with `order`.
pub fn refcount_max(order: u32) -> u64 {
    match order {
        0..=5 => (1u64 << (1u32 << order)) - 1,
        _ => u64::MAX,
    }
}

/// Refcount entries in one refcount block.
pub fn refcount_block_entries(hdr: &Header) -> u64 {
    1 << (hdr.cb() + 3 - hdr.order())
}

/// Split a host cluster index into (refcount table index, index inside
/// the refcount block).
pub fn refcount_split(hdr: &Header, cluster_index: u64) -> (u64, u64) {
    let bits = hdr.cb() + 3 - hdr.order();
    (cluster_index >> bits, cluster_index & ((1u64 << bits) - 1))
}

/// Refcount table entry: offset of the refcount block.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

/// Decode a refcount table entry: `Ok(None)` if no refcount block is
/// allocated, else the block offset.
pub fn refcount_block_offset(hdr: &Header, raw: u64) -> Result<Option<u64>, FormatError> {
    let off = raw & REFT_OFFSET_MASK;
    if raw & !REFT_OFFSET_MASK != 0 || off & hdr.cluster_mask() != 0 {
        return Err(FormatError::BadRefcountEntry);
    }
    Ok(if off == 0 { None } else { Some(off) })
}

/// Read refcount `index` from a refcount block laid out as QEMU does
/// (big-endian words; sub-byte entries packed from the low bits).
pub fn refcount_get(block: &[u8], index: u64, order: u32) -> Option<u64> {
    match order {
        0..=2 => {
            let bits = 1u32 << order;
            let byte = usize::try_from(index >> (3 - order)).ok()?;
            let shift = (index & u64::from((8u32 >> order) - 1)) as u32 * bits;
            let b = *block.get(byte)?;
            Some(u64::from(b >> shift) & refcount_max(order))
        }
        3..=6 => {
            let width = 1usize << (order - 3);
            let start = usize::try_from(index).ok()?.checked_mul(width)?;
            let bytes = block.get(start..start.checked_add(width)?)?;
            Some(bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
        }
        _ => None,
    }
}

/// Store refcount `index` in a refcount block; None if the index is out
/// of range, the order invalid or the value does not fit.
pub fn refcount_set(block: &mut [u8], index: u64, order: u32, value: u64) -> Option<()> {
    if order > 6 || value > refcount_max(order) {
        return None;
    }
    match order {
        0..=2 => {
            let bits = 1u32 << order;
            let byte = usize::try_from(index >> (3 - order)).ok()?;
            let shift = (index & u64::from((8u32 >> order) - 1)) as u32 * bits;
            let b = block.get_mut(byte)?;
            let mask = (refcount_max(order) as u8) << shift;
            *b = (*b & !mask) | ((value as u8) << shift);
            Some(())
        }
        _ => {
            let width = 1usize << (order - 3);
            let start = usize::try_from(index).ok()?.checked_mul(width)?;
            let bytes = block.get_mut(start..start.checked_add(width)?)?;
            let be = value.to_be_bytes();
            bytes.copy_from_slice(be.get(8 - width..)?);
            Some(())
        }
    }
}
