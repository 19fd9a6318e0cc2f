//! Header parsing and serialisation on crafted buffers.

use qcow2_format::*;

/// A valid header: 1 GiB, tables right after the header cluster.
fn base(version: u32, cb: u32) -> Header {
    let mut h = Header {
        version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: cb,
        size: 1 << 30,
        crypt_method: 0,
        l1_size: 0,
        l1_table_offset: 3 << cb,
        refcount_table_offset: 1 << cb,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: if version == 2 { 72 } else { 104 },
        compression_type: 0,
    };
    h.l1_size = h.min_l1_entries() as u32;
    h
}

fn bytes(h: &Header) -> Vec<u8> {
    let mut b = vec![0u8; Header::MIN_READ];
    h.write_to(&mut b).unwrap();
    b
}

fn parse(h: &Header) -> Result<Header, FormatError> {
    Header::parse(&bytes(h))
}

#[test]
fn valid_v2_and_v3_every_cluster_size() {
    for version in [2, 3] {
        for cb in MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS {
            let h = base(version, cb);
            assert_eq!(parse(&h), Ok(h), "v{version} cb{cb}");
            assert_eq!(h.cluster_size(), 1 << cb);
            assert_eq!(h.l2_entries(), 1 << (cb - 3));
            assert_eq!(h.l2_entry_bytes(), 8);
            assert_eq!(h.subcluster_size(), 1 << cb);
            assert!(!h.extended_l2());
        }
    }
}

#[test]
fn extended_l2_geometry() {
    for cb in 14..=MAX_CLUSTER_BITS {
        let mut h = base(3, cb);
        h.incompatible_features = incompat::EXTL2;
        h.l1_size = h.min_l1_entries() as u32;
        assert_eq!(parse(&h), Ok(h));
        assert!(h.extended_l2());
        assert_eq!(h.l2_entry_bytes(), 16);
        assert_eq!(h.l2_entries(), 1 << (cb - 4));
        assert_eq!(h.subcluster_size(), 1 << (cb - 5));
        assert_eq!(h.l1_coverage(), 1 << (2 * cb - 4));
    }
    for cb in MIN_CLUSTER_BITS..14 {
        let mut h = base(3, cb);
        h.incompatible_features = incompat::EXTL2;
        h.l1_size = h.min_l1_entries() as u32;
        assert_eq!(parse(&h), Err(FormatError::BadSubclusterSize), "cb{cb}");
    }
}

#[test]
fn error_messages_and_errnos() {
    use FormatError::*;
    let table = [
        (TooShort, "Image header truncated", errno::EINVAL),
        (BadMagic, "Bad qcow2 magic", errno::EINVAL),
        (BadVersion, "Unsupported qcow2 version", errno::EINVAL),
        (BadClusterBits, "Bad cluster_bits", errno::EINVAL),
        (BadHeaderLength, "Bad header length", errno::EINVAL),
        (MisalignedL1, "Misaligned L1 table", errno::EINVAL),
        (
            MisalignedRefcountTable,
            "Misaligned refcount table",
            errno::EINVAL,
        ),
        (
            L1TooSmall,
            "L1 table too small for virtual size",
            errno::EINVAL,
        ),
        (L1TooLarge, "L1 table too large", errno::EINVAL),
        (BadRefcountOrder, "Bad refcount order", errno::EINVAL),
        (
            Encrypted,
            "Encrypted images are not supported",
            errno::EOPNOTSUPP,
        ),
        (Corrupt, "Image is marked corrupt", errno::EOPNOTSUPP),
        (
            ExternalDataFile,
            "External data files are not supported",
            errno::EOPNOTSUPP,
        ),
        (
            CompressionType,
            "Only zlib compression is supported",
            errno::EOPNOTSUPP,
        ),
        (
            UnknownIncompatible,
            "Unknown incompatible features",
            errno::EOPNOTSUPP,
        ),
        (
            BadSubclusterSize,
            "Unsupported subcluster size",
            errno::EINVAL,
        ),
        (
            RefcountTableTooLarge,
            "Refcount table too large",
            errno::EINVAL,
        ),
        (BadBackingFile, "Bad backing file name", errno::EINVAL),
        (BadL1Entry, "Corrupt L1 entry", errno::EIO),
        (BadL2Entry, "Corrupt L2 entry", errno::EIO),
        (BadRefcountEntry, "Corrupt refcount table entry", errno::EIO),
    ];
    for (e, msg, no) in table {
        assert_eq!(e.msg(), msg);
        assert_eq!(e.errno(), no, "{e:?}");
        assert_eq!(e.to_string(), msg);
    }
    assert_eq!(errno::EIO, 5);
    assert_eq!(errno::ENOENT, 2);
    assert_eq!(errno::EINVAL, 22);
    assert_eq!(errno::EXDEV, 18);
    assert_eq!(errno::EFBIG, 27);
    assert_eq!(errno::EBADSLT, 57);
    assert_eq!(errno::EOPNOTSUPP, 95);
}

#[test]
fn bad_magic_and_version() {
    for version in [2, 3] {
        let mut b = bytes(&base(version, 16));
        b[3] ^= 1;
        assert_eq!(Header::parse(&b), Err(FormatError::BadMagic));
        b[3] ^= 1;
        for v in [0u32, 1, 4, 0x100, u32::MAX] {
            b[4..8].copy_from_slice(&v.to_be_bytes());
            assert_eq!(Header::parse(&b), Err(FormatError::BadVersion), "{v}");
        }
    }
}

#[test]
fn truncated_buffers_never_panic() {
    for version in [2, 3] {
        for hl in [104u32, 112] {
            let mut h = base(version, 16);
            if version == 3 {
                h.header_length = hl;
            }
            let b = bytes(&h);
            let need = match (version, hl) {
                (2, _) => 72,
                (_, 104) => 104,
                _ => 105,
            };
            for len in 0..need {
                assert_eq!(
                    Header::parse(&b[..len]),
                    Err(FormatError::TooShort),
                    "v{version} hl{hl} len{len}"
                );
            }
            for len in need..need + 16 {
                assert_eq!(Header::parse(&b[..len]), Ok(h));
            }
        }
    }
    // A short buffer is TooShort even when its magic is wrong.
    assert_eq!(Header::parse(&[0u8; 71]), Err(FormatError::TooShort));
    assert_eq!(Header::parse(&[]), Err(FormatError::TooShort));
}

#[test]
fn bad_cluster_bits() {
    for version in [2, 3] {
        for cb in [0u32, 1, 8, 22, 31, 32, 63, 64, 255, u32::MAX] {
            let mut b = bytes(&base(version, 16));
            b[20..24].copy_from_slice(&cb.to_be_bytes());
            assert_eq!(
                Header::parse(&b),
                Err(FormatError::BadClusterBits),
                "v{version} cb{cb}"
            );
        }
    }
}

#[test]
fn header_length() {
    for cb in MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS {
        let cs = 1u32 << cb;
        for hl in [
            0u32,
            8,
            72,
            96,
            100,
            103,
            105,
            106,
            110,
            111,
            cs + 8,
            u32::MAX,
        ] {
            let mut b = bytes(&base(3, cb));
            b[100..104].copy_from_slice(&hl.to_be_bytes());
            assert_eq!(
                Header::parse(&b),
                Err(FormatError::BadHeaderLength),
                "cb{cb} hl{hl}"
            );
        }
        for hl in [104u32, 112, 120, cs.max(104)] {
            let mut h = base(3, cb);
            h.header_length = hl;
            let mut b = vec![0u8; h.serialized_len().max(4096)];
            h.write_to(&mut b).unwrap();
            if hl <= cs {
                assert_eq!(Header::parse(&b), Ok(h), "cb{cb} hl{hl}");
            } else {
                assert_eq!(Header::parse(&b), Err(FormatError::BadHeaderLength));
            }
        }
    }
    // v2 ignores bytes 72.. entirely.
    let h = base(2, 16);
    let mut b = bytes(&h);
    b[72..112].fill(0xff);
    assert_eq!(Header::parse(&b), Ok(h));
}

#[test]
fn misaligned_tables() {
    for version in [2, 3] {
        for cb in MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS {
            for bit in 0..cb {
                let mut h = base(version, cb);
                h.l1_table_offset |= 1 << bit;
                assert_eq!(parse(&h), Err(FormatError::MisalignedL1));
                let mut h = base(version, cb);
                h.refcount_table_offset |= 1 << bit;
                assert_eq!(parse(&h), Err(FormatError::MisalignedRefcountTable));
            }
        }
    }
}

#[test]
fn l1_size_bounds() {
    for version in [2, 3] {
        for cb in MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS {
            let mut h = base(version, cb);
            let cov = h.l1_coverage();
            h.l1_size = 5;
            h.size = 5 * cov;
            assert_eq!(parse(&h), Ok(h));
            h.size = 5 * cov + 1;
            assert_eq!(parse(&h), Err(FormatError::L1TooSmall));
            h.size = 4 * cov + 1;
            assert_eq!(parse(&h), Ok(h));
            h.size = u64::MAX;
            assert_eq!(parse(&h), Err(FormatError::L1TooSmall));
            h.size = 0;
            h.l1_size = 0;
            assert_eq!(parse(&h), Ok(h));
            h.l1_size = (32 << 20) / 8;
            assert_eq!(parse(&h), Ok(h));
            h.l1_size += 1;
            assert_eq!(parse(&h), Err(FormatError::L1TooLarge));
            h.l1_size = u32::MAX;
            assert_eq!(parse(&h), Err(FormatError::L1TooLarge));
        }
    }
}

#[test]
fn refcount_order() {
    for order in 0..=6 {
        let mut h = base(3, 16);
        h.refcount_order = order;
        assert_eq!(parse(&h), Ok(h));
    }
    for order in [7, 8, 32, u32::MAX] {
        let mut h = base(3, 16);
        h.refcount_order = order;
        assert_eq!(parse(&h), Err(FormatError::BadRefcountOrder));
    }
    // v2 has no refcount_order field: it always parses as 4.
    let mut b = bytes(&base(2, 16));
    b[96..100].copy_from_slice(&7u32.to_be_bytes());
    assert_eq!(Header::parse(&b).unwrap().refcount_order, 4);
}

#[test]
fn encrypted() {
    for version in [2, 3] {
        for m in [1u32, 2, u32::MAX] {
            let mut h = base(version, 16);
            h.crypt_method = m;
            assert_eq!(parse(&h), Err(FormatError::Encrypted));
        }
    }
}

#[test]
fn incompatible_features() {
    let with = |bits: u64, ct: u8| {
        let mut h = base(3, 16);
        h.incompatible_features = bits;
        h.l1_size = h.min_l1_entries() as u32;
        h.header_length = 112;
        h.compression_type = ct;
        parse(&h)
    };
    assert!(with(0, 0).is_ok());
    assert!(with(incompat::DIRTY, 0).is_ok());
    assert!(with(incompat::EXTL2, 0).is_ok());
    assert!(with(incompat::COMPRESSION, 0).is_ok());
    assert!(with(incompat::DIRTY | incompat::EXTL2 | incompat::COMPRESSION, 0).is_ok());
    assert_eq!(with(incompat::CORRUPT, 0), Err(FormatError::Corrupt));
    assert_eq!(
        with(incompat::DATA_FILE, 0),
        Err(FormatError::ExternalDataFile)
    );
    for ct in [1u8, 2, 255] {
        assert_eq!(
            with(incompat::COMPRESSION, ct),
            Err(FormatError::CompressionType)
        );
        assert_eq!(with(0, ct), Err(FormatError::CompressionType));
    }
    for bit in 5..64 {
        assert_eq!(
            with(1 << bit, 0),
            Err(FormatError::UnknownIncompatible),
            "bit {bit}"
        );
    }
    // Unknown compatible and autoclear bits are fine.
    let mut h = base(3, 16);
    h.compatible_features = u64::MAX;
    assert_eq!(parse(&h), Ok(h));
    h.autoclear_features = u64::MAX;
    let p = parse(&h).unwrap();
    assert_eq!(p.autoclear_features, 0, "write_to clears autoclear bits");
    // With header_length 104 the compression_type byte is not read.
    let h = base(3, 16);
    let mut b = bytes(&h);
    b[104] = 1;
    assert_eq!(Header::parse(&b), Ok(h));
}

#[test]
fn errors_come_in_documented_order() {
    use FormatError::*;
    // Break every field at once, then repair them front to back.
    let mut h = base(3, 16);
    h.header_length = 108;
    h.l1_table_offset = 1;
    h.refcount_table_offset = 1;
    h.size = u64::MAX;
    h.refcount_order = 9;
    h.crypt_method = 1;
    h.incompatible_features = u64::MAX;
    h.compression_type = 1;
    let mut b = bytes(&h);
    b[20..24].copy_from_slice(&40u32.to_be_bytes());
    assert_eq!(Header::parse(&b), Err(BadClusterBits));
    assert_eq!(parse(&h), Err(BadHeaderLength));
    h.header_length = 112;
    assert_eq!(parse(&h), Err(MisalignedL1));
    h.l1_table_offset = 0;
    assert_eq!(parse(&h), Err(MisalignedRefcountTable));
    h.refcount_table_offset = 0;
    assert_eq!(parse(&h), Err(L1TooSmall));
    h.size = 0;
    h.l1_size = u32::MAX;
    assert_eq!(parse(&h), Err(L1TooLarge));
    h.l1_size = 0;
    assert_eq!(parse(&h), Err(BadRefcountOrder));
    h.refcount_order = 0;
    assert_eq!(parse(&h), Err(Encrypted));
    h.crypt_method = 0;
    assert_eq!(parse(&h), Err(Corrupt));
    h.incompatible_features &= !incompat::CORRUPT;
    assert_eq!(parse(&h), Err(ExternalDataFile));
    h.incompatible_features &= !incompat::DATA_FILE;
    assert_eq!(parse(&h), Err(CompressionType));
    h.compression_type = 0;
    assert_eq!(parse(&h), Err(UnknownIncompatible));
    h.incompatible_features = incompat::KNOWN & !incompat::CORRUPT & !incompat::DATA_FILE;
    assert_eq!(parse(&h), Ok(h));
}

#[test]
fn refcount_table_size_limit() {
    for cb in MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS {
        let mut h = base(3, cb);
        h.refcount_table_clusters = ((8u64 << 20) >> cb) as u32;
        assert_eq!(parse(&h), Ok(h));
        h.refcount_table_clusters += 1;
        assert_eq!(parse(&h), Err(FormatError::RefcountTableTooLarge));
    }
}

#[test]
fn backing_file_name_bounds() {
    let mut h = base(3, 16);
    h.backing_file_offset = 512;
    h.backing_file_size = 1023;
    assert_eq!(parse(&h), Ok(h));
    assert!(h.has_backing_file());
    h.backing_file_size = 1024;
    assert_eq!(parse(&h), Err(FormatError::BadBackingFile));
    h.backing_file_size = 16;
    h.backing_file_offset = 65536 - 16;
    assert_eq!(parse(&h), Ok(h));
    h.backing_file_offset += 1;
    assert_eq!(parse(&h), Err(FormatError::BadBackingFile));
    h.backing_file_offset = u64::MAX;
    assert_eq!(parse(&h), Err(FormatError::BadBackingFile));
    // Size without offset means no backing file.
    h.backing_file_offset = 0;
    h.backing_file_size = u32::MAX;
    assert_eq!(parse(&h), Ok(h));
    assert!(!h.has_backing_file());
}

#[test]
fn write_to_layout() {
    let mut h = base(3, 16);
    h.backing_file_offset = 0x1122334455667788;
    h.backing_file_size = 0x99aabbcc;
    h.size = 0x0102030405060708;
    h.nb_snapshots = 7;
    h.snapshots_offset = 0xdead0000;
    h.incompatible_features = 0x11;
    h.compatible_features = 0x1;
    h.autoclear_features = 0x3;
    h.refcount_order = 6;
    h.header_length = 120;
    h.compression_type = 0;
    let mut b = vec![0xeeu8; 200];
    assert_eq!(h.write_to(&mut b), Ok(120));
    assert_eq!(&b[0..4], b"QFI\xfb");
    assert_eq!(&b[4..8], &[0, 0, 0, 3]);
    assert_eq!(&b[8..16], &0x1122334455667788u64.to_be_bytes());
    assert_eq!(&b[16..20], &0x99aabbccu32.to_be_bytes());
    assert_eq!(&b[20..24], &16u32.to_be_bytes());
    assert_eq!(&b[24..32], &0x0102030405060708u64.to_be_bytes());
    assert_eq!(&b[60..64], &7u32.to_be_bytes());
    assert_eq!(&b[64..72], &0xdead0000u64.to_be_bytes());
    assert_eq!(&b[72..80], &0x11u64.to_be_bytes());
    assert_eq!(&b[80..88], &1u64.to_be_bytes());
    assert_eq!(&b[88..96], &[0; 8]);
    assert_eq!(&b[96..100], &6u32.to_be_bytes());
    assert_eq!(&b[100..104], &120u32.to_be_bytes());
    assert_eq!(&b[104..112], &[0; 8]);
    assert_eq!(&b[112..], &[0xee; 88][..], "past 112 is left alone");

    let mut small = vec![0u8; 119];
    assert_eq!(h.write_to(&mut small), Err(FormatError::TooShort));
    let h2 = base(2, 12);
    let mut b = vec![0xeeu8; 80];
    assert_eq!(h2.write_to(&mut b), Ok(72));
    assert_eq!(&b[72..], &[0xee; 8]);
    assert_eq!(Header::parse(&b[..72]), Ok(h2));
    assert_eq!(h2.write_to(&mut b[..71]), Err(FormatError::TooShort));
    let h3 = base(3, 12);
    let mut b = vec![0u8; 104];
    assert_eq!(h3.write_to(&mut b), Ok(104));
    assert_eq!(Header::parse(&b), Ok(h3));
}

#[test]
fn address_split() {
    for ext in [false, true] {
        for cb in 14..=MAX_CLUSTER_BITS {
            let mut h = base(3, cb);
            if ext {
                h.incompatible_features = incompat::EXTL2;
            }
            let l2_bits = if ext { cb - 4 } else { cb - 3 };
            for vaddr in [0u64, 1, (1 << cb) - 1, 1 << cb, 0x1234_5678_9abc, u64::MAX] {
                assert_eq!(h.l1_index(vaddr), vaddr >> (cb + l2_bits));
                assert_eq!(h.l2_index(vaddr), (vaddr >> cb) & ((1 << l2_bits) - 1));
                assert_eq!(h.offset_in_cluster(vaddr), vaddr & ((1 << cb) - 1));
                let back = (h.l1_index(vaddr) << (cb + l2_bits))
                    | (h.l2_index(vaddr) << cb)
                    | h.offset_in_cluster(vaddr);
                assert_eq!(back, vaddr);
            }
            assert_eq!(h.l2_entry_offset(3), 3 * h.l2_entry_bytes());
        }
    }
}

#[test]
fn max_file_size() {
    let mut h = base(3, 16);
    h.refcount_table_clusters = 1;
    // 8192 table entries * 32768 clusters per block * 64 KiB.
    assert_eq!(h.max_file_size(), 1 << 44);
    h.refcount_order = 0;
    assert_eq!(h.max_file_size(), 1 << 48);
    h.refcount_order = 6;
    assert_eq!(h.max_file_size(), 1 << 42);
    h.refcount_table_clusters = 0;
    assert_eq!(h.max_file_size(), 0);
    let mut h = base(3, 21);
    h.refcount_order = 0;
    h.refcount_table_clusters = u32::MAX;
    assert_eq!(h.max_file_size(), u64::MAX);
    let mut h = base(2, 9);
    h.refcount_table_clusters = 1;
    assert_eq!(h.max_file_size(), 64 * 256 * 512);
}
