// SPDX-License-Identifier: GPL-2.0

//! qcow2 on-disk format logic: header parsing, L1/L2 entry decoding, run
//! resolution inside a cluster and refcount block accessors.
//!
//! Pure `core` code shared by the kernel target and the host test crate.
//! Everything derived from image bytes goes through checked accessors, so
//! no input can make these functions panic.

// The submodules by path, relative to this file: the host crate loads it
// through #[path] too, and both builds must find the same files.
#[path = "qcow2_format/entries.rs"]
mod entries;
#[path = "qcow2_format/header.rs"]
mod header;
#[path = "qcow2_format/refcount.rs"]
mod refcount;

pub use entries::*;
pub use header::*;
pub use refcount::*;

/// Positive errno values (the kernel side negates them).
pub mod errno {
    /// I/O error.
    pub const EIO: i32 = 5;
    /// No such file or directory.
    pub const ENOENT: i32 = 2;
    /// Invalid argument.
    pub const EINVAL: i32 = 22;
    /// Cross-device link.
    pub const EXDEV: i32 = 18;
    /// File too large.
    pub const EFBIG: i32 = 27;
    /// Invalid slot.
    pub const EBADSLT: i32 = 57;
    /// Operation not supported.
    pub const EOPNOTSUPP: i32 = 95;
}

/// Why an image is refused or a metadata entry is bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatError {
    /// The buffer is shorter than the header fields being read.
    TooShort,
    /// Magic is not `QFI\xfb`.
    BadMagic,
    /// Version is neither 2 nor 3.
    BadVersion,
    /// cluster_bits outside 9..=21.
    BadClusterBits,
    /// header_length invalid for the version.
    BadHeaderLength,
    /// L1 table offset not cluster aligned.
    MisalignedL1,
    /// Refcount table offset not cluster aligned.
    MisalignedRefcountTable,
    /// L1 table cannot map the whole virtual size.
    L1TooSmall,
    /// L1 table larger than 32 MiB.
    L1TooLarge,
    /// refcount_order outside 0..=6 (v3) or not 4 (v2).
    BadRefcountOrder,
    /// crypt_method is not 0.
    Encrypted,
    /// Incompatible bit 1 (corrupt) is set.
    Corrupt,
    /// Incompatible bit 2 (external data file) is set.
    ExternalDataFile,
    /// Compression type other than zlib.
    CompressionType,
    /// Incompatible feature bits above bit 4 are set.
    UnknownIncompatible,
    /// Extended L2 with subclusters smaller than 512 bytes.
    BadSubclusterSize,
    /// Refcount table larger than 8 MiB.
    RefcountTableTooLarge,
    /// Backing file name too long or outside the first cluster.
    BadBackingFile,
    /// Reserved bits set or misaligned L2 table offset in an L1 entry.
    BadL1Entry,
    /// Invalid L2 entry.
    BadL2Entry,
    /// Reserved bits set or misaligned block in a refcount table entry.
    BadRefcountEntry,
}

impl FormatError {
    /// Positive errno for this error.
    pub fn errno(self) -> i32 {
        use FormatError::*;
        match self {
            Encrypted | Corrupt | ExternalDataFile | CompressionType | UnknownIncompatible => {
                errno::EOPNOTSUPP
            }
            BadL1Entry | BadL2Entry | BadRefcountEntry => errno::EIO,
            TooShort
            | BadMagic
            | BadVersion
            | BadClusterBits
            | BadHeaderLength
            | MisalignedL1
            | MisalignedRefcountTable
            | L1TooSmall
            | L1TooLarge
            | BadRefcountOrder
            | BadSubclusterSize
            | RefcountTableTooLarge
            | BadBackingFile => errno::EINVAL,
        }
    }

    /// Fixed human-readable message (tests match these byte for byte).
    pub fn msg(self) -> &'static str {
        let m = self.msg_with_nul();
        m.strip_suffix('\0').unwrap_or(m)
    }

    /// [`Self::msg`] with a trailing NUL, for C strings (`ti->error`).
    pub fn msg_with_nul(self) -> &'static str {
        use FormatError::*;
        match self {
            TooShort => "Image header truncated\0",
            BadMagic => "Bad qcow2 magic\0",
            BadVersion => "Unsupported qcow2 version\0",
            BadClusterBits => "Bad cluster_bits\0",
            BadHeaderLength => "Bad header length\0",
            MisalignedL1 => "Misaligned L1 table\0",
            MisalignedRefcountTable => "Misaligned refcount table\0",
            L1TooSmall => "L1 table too small for virtual size\0",
            L1TooLarge => "L1 table too large\0",
            BadRefcountOrder => "Bad refcount order\0",
            Encrypted => "Encrypted images are not supported\0",
            Corrupt => "Image is marked corrupt\0",
            ExternalDataFile => "External data files are not supported\0",
            CompressionType => "Only zlib compression is supported\0",
            UnknownIncompatible => "Unknown incompatible features\0",
            BadSubclusterSize => "Unsupported subcluster size\0",
            RefcountTableTooLarge => "Refcount table too large\0",
            BadBackingFile => "Bad backing file name\0",
            BadL1Entry => "Corrupt L1 entry\0",
            BadL2Entry => "Corrupt L2 entry\0",
            BadRefcountEntry => "Corrupt refcount table entry\0",
        }
    }
}

impl core::fmt::Display for FormatError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.msg())
    }
}

/// qcow2 magic, `QFI\xfb`.
pub const QCOW2_MAGIC: u32 = 0x514649fb;
/// Smallest supported cluster_bits (512 B clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest supported cluster_bits (2 MiB clusters).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Size of the fixed v2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Minimum v3 header length (without compression_type).
pub const V3_HEADER_LEN: u32 = 104;
/// Largest L1 table QEMU accepts, in bytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU accepts, in bytes.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name QEMU accepts.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u64 = 32;

/// Incompatible feature bits.
pub mod incompat {
    /// Refcounts may be stale (lazy refcounts); harmless for reading.
    pub const DIRTY: u64 = 1 << 0;
    /// Image was marked corrupt by QEMU.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// compression_type field is meaningful.
    pub const COMPRESSION: u64 = 1 << 3;
    /// L2 entries are 128 bits with subcluster bitmaps.
    pub const EXTL2: u64 = 1 << 4;
    /// All bits this implementation knows.
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTL2;
}

/// L1 entry: L2 table is referenced exactly once.
pub const L1E_COPIED: u64 = 1 << 63;
/// L1 entry: offset of the L2 table.
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entry: reserved bits 0..=8 and 56..=62.
pub const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// L2 entry: cluster is referenced exactly once.
pub const L2E_COPIED: u64 = 1 << 63;
/// L2 entry: compressed cluster descriptor.
pub const L2E_COMPRESSED: u64 = 1 << 62;
/// L2 entry: cluster reads as zeros (v3, standard L2 only).
pub const L2E_ZERO: u64 = 1;
/// L2 entry: host cluster offset of a standard cluster.
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L2 entry: reserved bits 1..=8 and 56..=61 of a standard cluster.
pub const L2E_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;

/// Big-endian u32 at `off`, or None past the end of `buf`.
fn be32(buf: &[u8], off: usize) -> Option<u32> {
    let b = buf.get(off..off.checked_add(4)?)?;
    Some(u32::from_be_bytes(b.try_into().ok()?))
}

/// Big-endian u64 at `off`, or None past the end of `buf`.
fn be64(buf: &[u8], off: usize) -> Option<u64> {
    let b = buf.get(off..off.checked_add(8)?)?;
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

/// Store `v` big-endian at `off`; None if it does not fit.
fn put_be(buf: &mut [u8], off: usize, v: &[u8]) -> Option<()> {
    buf.get_mut(off..off.checked_add(v.len())?)?
        .copy_from_slice(v);
    Some(())
}

/// Big-endian u64 number `index` of a table (L1 table, refcount table,
/// standard L2 table); None if out of range.
pub fn table_entry(table: &[u8], index: u64) -> Option<u64> {
    be64(table, usize::try_from(index.checked_mul(8)?).ok()?)
}

/// Store `value` as big-endian u64 number `index` of a table.
pub fn set_table_entry(table: &mut [u8], index: u64, value: u64) -> Option<()> {
    put_be(
        table,
        usize::try_from(index.checked_mul(8)?).ok()?,
        &value.to_be_bytes(),
    )
}
