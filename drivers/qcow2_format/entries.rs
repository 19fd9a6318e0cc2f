// SPDX-License-Identifier: GPL-2.0

//! L1 and L2 entries, and the runs of one kind inside a cluster.

use super::*;

/// A decoded, allocated L1 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L1Entry {
    /// Offset of the L2 table in the image file (cluster aligned).
    pub l2_offset: u64,
    /// Refcount of the L2 table is exactly one.
    pub copied: bool,
}

/// Decode an L1 entry: `Ok(None)` if no L2 table is allocated.
pub fn decode_l1(hdr: &Header, raw: u64) -> Result<Option<L1Entry>, FormatError> {
    if raw & L1E_RESERVED_MASK != 0 {
        return Err(FormatError::BadL1Entry);
    }
    let l2_offset = raw & L1E_OFFSET_MASK;
    if l2_offset == 0 {
        return Ok(None);
    }
    if l2_offset & hdr.cluster_mask() != 0 {
        return Err(FormatError::BadL1Entry);
    }
    Ok(Some(L1Entry {
        l2_offset,
        copied: raw & L1E_COPIED != 0,
    }))
}

/// Encode an L1 entry pointing at the L2 table at `l2_offset`.
pub fn encode_l1(l2_offset: u64, copied: bool) -> u64 {
    (l2_offset & L1E_OFFSET_MASK) | if copied { L1E_COPIED } else { 0 }
}

/// A decoded L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cluster {
    /// Not allocated here: read from the backing image (or zeros).
    Unallocated,
    /// v3 zero cluster without a host offset.
    Zero,
    /// v3 zero cluster with a preallocated host cluster.
    ZeroPrealloc {
        /// Host cluster offset (not read).
        host: u64,
    },
    /// Data at a host cluster.
    Normal {
        /// Host cluster offset.
        host: u64,
        /// Refcount is exactly one.
        copied: bool,
    },
    /// zlib (raw deflate) compressed cluster.
    Compressed {
        /// Byte offset of the compressed data.
        host: u64,
        /// Bytes to read: nb_csectors * 512 - (host & 511).
        len: u64,
    },
    /// Standard cluster of an extended-L2 image.
    Extended {
        /// Host cluster offset, None if no host cluster.
        host: Option<u64>,
        /// Refcount is exactly one.
        copied: bool,
        /// Bit n set: subcluster n is allocated at host.
        alloc: u32,
        /// Bit n set: subcluster n reads as zeros.
        zero: u32,
    },
}

/// Split a compressed descriptor into (host byte offset, bytes to read).
fn compressed_desc(hdr: &Header, raw: u64) -> (u64, u64) {
    let csize_bits = hdr.cb() - 8;
    let shift = 62 - csize_bits;
    let host = raw & ((1u64 << shift) - 1);
    let nb_csectors = ((raw >> shift) & ((1u64 << csize_bits) - 1)) + 1;
    // nb_csectors <= 8192, so this cannot overflow.
    (host, nb_csectors * 512 - (host & 511))
}

/// Decode an L2 entry. `raw` is the first 64-bit word; `bitmap` is the
/// second word with extended L2 and is ignored otherwise.
pub fn decode_l2(hdr: &Header, raw: u64, bitmap: u64) -> Result<Cluster, FormatError> {
    use FormatError::BadL2Entry;
    if raw & L2E_COMPRESSED != 0 {
        // Compressed clusters are shared by design and have no subclusters.
        if raw & L2E_COPIED != 0 || (hdr.extended_l2() && bitmap != 0) {
            return Err(BadL2Entry);
        }
        let (host, len) = compressed_desc(hdr, raw);
        return Ok(Cluster::Compressed { host, len });
    }
    if raw & L2E_RESERVED_MASK != 0 {
        return Err(BadL2Entry);
    }
    let host = raw & L2E_OFFSET_MASK;
    if host & hdr.cluster_mask() != 0 {
        return Err(BadL2Entry);
    }
    let copied = raw & L2E_COPIED != 0;
    if hdr.extended_l2() {
        let alloc = (bitmap & 0xffff_ffff) as u32;
        let zero = (bitmap >> 32) as u32;
        if raw & L2E_ZERO != 0 || alloc & zero != 0 || (host == 0 && alloc != 0) {
            return Err(BadL2Entry);
        }
        let host = if host == 0 { None } else { Some(host) };
        return Ok(Cluster::Extended {
            host,
            copied,
            alloc,
            zero,
        });
    }
    if raw & L2E_ZERO != 0 {
        if hdr.version < 3 {
            return Err(BadL2Entry);
        }
        return Ok(if host == 0 {
            Cluster::Zero
        } else {
            Cluster::ZeroPrealloc { host }
        });
    }
    if host == 0 {
        // Offset 0 is unallocated even with COPIED set (no data file).
        return Ok(Cluster::Unallocated);
    }
    Ok(Cluster::Normal { host, copied })
}

/// Read the raw words of L2 entry `index` from an L2 table buffer:
/// (first word, bitmap word or 0). None if out of range.
pub fn l2_raw_entry(hdr: &Header, table: &[u8], index: u64) -> Option<(u64, u64)> {
    let off = usize::try_from(index.checked_mul(hdr.l2_entry_bytes())?).ok()?;
    let raw = be64(table, off)?;
    let bitmap = if hdr.extended_l2() {
        be64(table, off.checked_add(8)?)?
    } else {
        0
    };
    Some((raw, bitmap))
}

/// Encode a standard L2 entry for data at host cluster `host`.
pub fn encode_l2_normal(host: u64, copied: bool) -> u64 {
    (host & L2E_OFFSET_MASK) | if copied { L2E_COPIED } else { 0 }
}

/// Encode a v3 zero L2 entry, optionally keeping a preallocated host
/// cluster.
pub fn encode_l2_zero(host: Option<u64>, copied: bool) -> u64 {
    encode_l2_normal(host.unwrap_or(0), copied) | L2E_ZERO
}

/// Encode a compressed L2 entry; None if `host` or `len` do not fit the
/// descriptor for this cluster size.
pub fn encode_l2_compressed(hdr: &Header, host: u64, len: u64) -> Option<u64> {
    let csize_bits = hdr.cb() - 8;
    let shift = 62 - csize_bits;
    if len == 0 || host >> shift != 0 {
        return None;
    }
    let end = (host & 511).checked_add(len)?;
    let nb_csectors = end.div_ceil(512);
    if nb_csectors > 1 << csize_bits {
        return None;
    }
    Some(L2E_COMPRESSED | ((nb_csectors - 1) << shift) | host)
}

/// What a byte range inside one cluster resolves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// Not allocated in this image: fall through to the backing image.
    Unallocated,
    /// Reads as zeros.
    Zero,
    /// Plain data.
    Data {
        /// Image file byte address of the run's first byte.
        host: u64,
    },
    /// Compressed cluster: inflate the whole cluster, then slice.
    Compressed {
        /// Byte offset of the compressed data.
        host: u64,
        /// Compressed bytes to read.
        len: u64,
    },
}

/// Kind of subcluster `sc` of an extended entry, host at the subcluster
/// start.
fn subcluster_kind(host: Option<u64>, alloc: u32, zero: u32, sc: u64, sc_size: u64) -> RunKind {
    let bit = 1u32.checked_shl(sc as u32).unwrap_or(0);
    if zero & bit != 0 {
        RunKind::Zero
    } else if alloc & bit != 0 {
        match host {
            Some(h) => RunKind::Data {
                host: h.saturating_add(sc.saturating_mul(sc_size)),
            },
            // Not producible by decode_l2; never expose stale data.
            None => RunKind::Zero,
        }
    } else {
        RunKind::Unallocated
    }
}

/// Resolve the first run of `[off, off + len)` inside one cluster
/// (`off + len <= cluster_size`) into `(kind, run_len)`.
///
/// `run_len <= len` is the longest prefix of one kind with contiguous
/// host addresses; it is never 0 when `len > 0`.
pub fn first_run(hdr: &Header, c: &Cluster, off: u64, len: u64) -> (RunKind, u64) {
    match *c {
        Cluster::Unallocated => (RunKind::Unallocated, len),
        Cluster::Zero | Cluster::ZeroPrealloc { .. } => (RunKind::Zero, len),
        Cluster::Normal { host, .. } => (
            RunKind::Data {
                host: host.saturating_add(off),
            },
            len,
        ),
        Cluster::Compressed { host, len: clen } => (RunKind::Compressed { host, len: clen }, len),
        Cluster::Extended {
            host, alloc, zero, ..
        } => {
            let sc_size = hdr.cluster_size() / SUBCLUSTERS;
            let first = (off / sc_size).min(SUBCLUSTERS - 1);
            let kind = subcluster_kind(host, alloc, zero, first, sc_size);
            let kind = match kind {
                RunKind::Data { host } => RunKind::Data {
                    host: host.saturating_add(off % sc_size),
                },
                k => k,
            };
            let mut sc = first + 1;
            while sc < SUBCLUSTERS {
                let same = matches!(
                    (kind, subcluster_kind(host, alloc, zero, sc, sc_size)),
                    (RunKind::Zero, RunKind::Zero)
                        | (RunKind::Unallocated, RunKind::Unallocated)
                        | (RunKind::Data { .. }, RunKind::Data { .. })
                );
                if !same {
                    break;
                }
                sc += 1;
            }
            let run_end = sc.saturating_mul(sc_size);
            let run = run_end.saturating_sub(off).min(len);
            // Only reachable with off beyond the cluster (caller bug).
            (kind, if run == 0 { len } else { run })
        }
    }
}
