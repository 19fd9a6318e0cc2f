// SPDX-License-Identifier: GPL-2.0

//! The image header: parsing with every check, and writing it back.

use super::*;

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
    pub(super) fn cb(&self) -> u32 {
        self.cluster_bits.clamp(MIN_CLUSTER_BITS, MAX_CLUSTER_BITS)
    }

    /// cluster_size - 1.
    pub(super) fn cluster_mask(&self) -> u64 {
        self.cluster_size() - 1
    }

    /// log2 of the number of entries in one L2 table.
    pub(super) fn l2_bits(&self) -> u32 {
        if self.extended_l2() {
            self.cb() - 4
        } else {
            self.cb() - 3
        }
    }

    /// Refcount order forced into 0..=6.
    pub(super) fn order(&self) -> u32 {
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
