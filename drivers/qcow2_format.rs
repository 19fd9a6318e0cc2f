// SPDX-License-Identifier: GPL-2.0

//! qcow2 on-disk format logic: header parsing, L1/L2 entry decoding, run
//! resolution inside a cluster and refcount block accessors.
//!
//! Pure `core` code shared by the kernel target and the host test crate.
//! Everything derived from image bytes goes through checked accessors, so
//! no input can make these functions panic.

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

/// The fixed header fields of a qcow2 image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name, 0 if none.
    pub backing_file_offset: u64,
    /// Length of the backing file name in bytes.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Encryption method, 0 for none.
    pub crypt_method: u32,
    /// Number of L1 entries.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Refcount table length in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (0 for v2).
    pub incompatible_features: u64,
    /// Compatible feature bits (0 for v2).
    pub compatible_features: u64,
    /// Autoclear feature bits (0 for v2).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (4 for v2).
    pub refcount_order: u32,
    /// Header length in bytes (72 for v2).
    pub header_length: u32,
    /// Compression type, 0 = zlib.
    pub compression_type: u8,
}

impl Header {
    /// Bytes a caller should read before calling [`Header::parse`].
    pub const MIN_READ: usize = 4096;

    /// Parse and validate a big-endian header at the start of `buf`.
    ///
    /// Checks run in the order of the [`FormatError`] variants, so one
    /// broken field always yields the same error.
    pub fn parse(buf: &[u8]) -> Result<Header, FormatError> {
        use FormatError::*;
        let r32 = |off: usize| be32(buf, off).ok_or(TooShort);
        let r64 = |off: usize| be64(buf, off).ok_or(TooShort);

        if buf.len() < V2_HEADER_LEN as usize {
            return Err(TooShort);
        }
        if r32(0)? != QCOW2_MAGIC {
            return Err(BadMagic);
        }
        let version = r32(4)?;
        if version != 2 && version != 3 {
            return Err(BadVersion);
        }
        if version == 3 && buf.len() < V3_HEADER_LEN as usize {
            return Err(TooShort);
        }
        let mut h = Header {
            version,
            backing_file_offset: r64(8)?,
            backing_file_size: r32(16)?,
            cluster_bits: r32(20)?,
            size: r64(24)?,
            crypt_method: r32(32)?,
            l1_size: r32(36)?,
            l1_table_offset: r64(40)?,
            refcount_table_offset: r64(48)?,
            refcount_table_clusters: r32(56)?,
            nb_snapshots: r32(60)?,
            snapshots_offset: r64(64)?,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
        };
        if version == 3 {
            h.incompatible_features = r64(72)?;
            h.compatible_features = r64(80)?;
            h.autoclear_features = r64(88)?;
            h.refcount_order = r32(96)?;
            h.header_length = r32(100)?;
        }

        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits) {
            return Err(BadClusterBits);
        }
        let cs = h.cluster_size();
        if version == 3
            && (h.header_length < V3_HEADER_LEN
                || h.header_length & 7 != 0
                || u64::from(h.header_length) > cs)
        {
            return Err(BadHeaderLength);
        }
        if h.header_length > V3_HEADER_LEN {
            // Only the compression_type byte is needed past 104, not the
            // padding or any later fields.
            h.compression_type = *buf.get(V3_HEADER_LEN as usize).ok_or(TooShort)?;
        }
        if h.l1_table_offset & h.cluster_mask() != 0 {
            return Err(MisalignedL1);
        }
        if h.refcount_table_offset & h.cluster_mask() != 0 {
            return Err(MisalignedRefcountTable);
        }
        if u64::from(h.l1_size) < h.min_l1_entries() {
            return Err(L1TooSmall);
        }
        if u64::from(h.l1_size) > MAX_L1_BYTES / 8 {
            return Err(L1TooLarge);
        }
        if h.refcount_order > 6 || (version == 2 && h.refcount_order != 4) {
            return Err(BadRefcountOrder);
        }
        if h.crypt_method != 0 {
            return Err(Encrypted);
        }
        let inc = h.incompatible_features;
        if inc & incompat::CORRUPT != 0 {
            return Err(Corrupt);
        }
        if inc & incompat::DATA_FILE != 0 {
            return Err(ExternalDataFile);
        }
        // A non-zlib type is refused whether or not bit 3 announces it;
        // bit 3 with type 0 still means zlib, so it is accepted.
        if h.compression_type != 0 {
            return Err(CompressionType);
        }
        if inc & !incompat::KNOWN != 0 {
            return Err(UnknownIncompatible);
        }
        if h.extended_l2() && h.subcluster_size() < 512 {
            return Err(BadSubclusterSize);
        }
        if u64::from(h.refcount_table_clusters) > MAX_REFTABLE_BYTES >> h.cluster_bits {
            return Err(RefcountTableTooLarge);
        }
        if h.backing_file_offset != 0
            && (h.backing_file_size > MAX_BACKING_NAME
                || h.backing_file_offset > cs
                || h.backing_file_offset + u64::from(h.backing_file_size) > cs)
        {
            return Err(BadBackingFile);
        }
        Ok(h)
    }

    /// cluster_bits forced into the valid range, so that shifts never
    /// overflow even on a hand-built header.
    fn cb(&self) -> u32 {
        self.cluster_bits.clamp(MIN_CLUSTER_BITS, MAX_CLUSTER_BITS)
    }

    /// cluster_size - 1.
    fn cluster_mask(&self) -> u64 {
        self.cluster_size() - 1
    }

    /// log2 of the number of entries in one L2 table.
    fn l2_bits(&self) -> u32 {
        if self.extended_l2() {
            self.cb() - 4
        } else {
            self.cb() - 3
        }
    }

    /// Refcount order forced into 0..=6.
    fn order(&self) -> u32 {
        self.refcount_order.min(6)
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cb()
    }

    /// Whether L2 entries carry subcluster bitmaps (incompatible bit 4).
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTL2 != 0
    }

    /// Whether the header names a backing file.
    pub fn has_backing_file(&self) -> bool {
        self.backing_file_offset != 0
    }

    /// Bytes per L2 entry: 8, or 16 with extended L2.
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Entries per L2 table (one cluster).
    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits()
    }

    /// Bytes of guest data one L1 entry maps.
    pub fn l1_coverage(&self) -> u64 {
        1 << (self.cb() + self.l2_bits())
    }

    /// L1 entries needed to map the whole virtual size.
    pub fn min_l1_entries(&self) -> u64 {
        let shift = self.cb() + self.l2_bits();
        let mask = self.l1_coverage() - 1;
        (self.size >> shift) + u64::from(self.size & mask != 0)
    }

    /// L1 index of a guest byte address.
    pub fn l1_index(&self, vaddr: u64) -> u64 {
        vaddr >> (self.cb() + self.l2_bits())
    }

    /// L2 index of a guest byte address.
    pub fn l2_index(&self, vaddr: u64) -> u64 {
        (vaddr >> self.cb()) & (self.l2_entries() - 1)
    }

    /// Offset of a guest byte address inside its cluster.
    pub fn offset_in_cluster(&self, vaddr: u64) -> u64 {
        vaddr & self.cluster_mask()
    }

    /// Byte offset of entry `l2_index` inside its L2 table.
    pub fn l2_entry_offset(&self, l2_index: u64) -> u64 {
        (l2_index & (self.l2_entries() - 1)) * self.l2_entry_bytes()
    }

    /// Subcluster size: cluster_size / 32 with extended L2, else the
    /// cluster size.
    pub fn subcluster_size(&self) -> u64 {
        if self.extended_l2() {
            self.cluster_size() / SUBCLUSTERS
        } else {
            self.cluster_size()
        }
    }

    /// Largest image file (bytes) the refcount table can describe;
    /// saturates at `u64::MAX`.
    pub fn max_file_size(&self) -> u64 {
        let cs = self.cluster_size();
        let table_entries = u64::from(self.refcount_table_clusters).saturating_mul(cs / 8);
        table_entries
            .saturating_mul(refcount_block_entries(self))
            .saturating_mul(cs)
    }

    /// Number of bytes [`Header::write_to`] produces.
    pub fn serialized_len(&self) -> usize {
        if self.version < 3 {
            V2_HEADER_LEN as usize
        } else {
            self.header_length.max(V3_HEADER_LEN) as usize
        }
    }

    /// Serialise the fixed header fields into `buf` (v2: 72 bytes, v3:
    /// header_length bytes), clearing the autoclear bits.
    ///
    /// v3 padding up to byte 112 is zeroed; bytes past 112 up to
    /// header_length are left as they are. Returns the length written.
    pub fn write_to(&self, buf: &mut [u8]) -> Result<usize, FormatError> {
        let len = self.serialized_len();
        let out = buf.get_mut(..len).ok_or(FormatError::TooShort)?;
        self.fill(out).ok_or(FormatError::TooShort)?;
        Ok(len)
    }

    /// Body of [`Header::write_to`]; `out` has the serialized length.
    fn fill(&self, out: &mut [u8]) -> Option<()> {
        put_be(out, 0, &QCOW2_MAGIC.to_be_bytes())?;
        put_be(out, 4, &self.version.to_be_bytes())?;
        put_be(out, 8, &self.backing_file_offset.to_be_bytes())?;
        put_be(out, 16, &self.backing_file_size.to_be_bytes())?;
        put_be(out, 20, &self.cluster_bits.to_be_bytes())?;
        put_be(out, 24, &self.size.to_be_bytes())?;
        put_be(out, 32, &self.crypt_method.to_be_bytes())?;
        put_be(out, 36, &self.l1_size.to_be_bytes())?;
        put_be(out, 40, &self.l1_table_offset.to_be_bytes())?;
        put_be(out, 48, &self.refcount_table_offset.to_be_bytes())?;
        put_be(out, 56, &self.refcount_table_clusters.to_be_bytes())?;
        put_be(out, 60, &self.nb_snapshots.to_be_bytes())?;
        put_be(out, 64, &self.snapshots_offset.to_be_bytes())?;
        if self.version < 3 {
            return Some(());
        }
        put_be(out, 72, &self.incompatible_features.to_be_bytes())?;
        put_be(out, 80, &self.compatible_features.to_be_bytes())?;
        put_be(out, 88, &0u64.to_be_bytes())?;
        put_be(out, 96, &self.refcount_order.to_be_bytes())?;
        let hl = self.header_length.max(V3_HEADER_LEN);
        put_be(out, 100, &hl.to_be_bytes())?;
        if hl > V3_HEADER_LEN {
            let pad_end = out.len().min(112);
            let pad = out.get_mut(V3_HEADER_LEN as usize..pad_end)?;
            pad.fill(0);
            *pad.first_mut()? = self.compression_type;
        }
        Some(())
    }
}

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
