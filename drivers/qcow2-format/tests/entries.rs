//! L1/L2 entry decoding, run resolution and refcount block accessors.

use qcow2_format::*;

fn hdr(version: u32, cb: u32, ext: bool) -> Header {
    Header {
        version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: cb,
        size: 1 << 30,
        crypt_method: 0,
        l1_size: 1 << 12,
        l1_table_offset: 3 << cb,
        refcount_table_offset: 1 << cb,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: if ext { incompat::EXTL2 } else { 0 },
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: if version == 2 { 72 } else { 104 },
        compression_type: 0,
    }
}

/// Deterministic xorshift64* generator.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn l1_entries() {
    for cb in MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS {
        let h = hdr(3, cb, false);
        assert_eq!(decode_l1(&h, 0), Ok(None));
        assert_eq!(decode_l1(&h, L1E_COPIED), Ok(None));
        let off = 5u64 << cb;
        assert_eq!(
            decode_l1(&h, off),
            Ok(Some(L1Entry {
                l2_offset: off,
                copied: false
            }))
        );
        assert_eq!(
            decode_l1(&h, off | L1E_COPIED),
            Ok(Some(L1Entry {
                l2_offset: off,
                copied: true
            }))
        );
        let top = 0x00ff_ffff_ffff_ffffu64 & !((1 << cb) - 1);
        assert_eq!(decode_l1(&h, top).unwrap().unwrap().l2_offset, top);
        for bit in (0..=8).chain(56..=62) {
            assert_eq!(
                decode_l1(&h, off | 1 << bit),
                Err(FormatError::BadL1Entry),
                "bit {bit}"
            );
            assert_eq!(decode_l1(&h, 1 << bit), Err(FormatError::BadL1Entry));
        }
        for bit in 9..cb {
            assert_eq!(
                decode_l1(&h, off | 1 << bit),
                Err(FormatError::BadL1Entry),
                "cb {cb} bit {bit}"
            );
        }
        for copied in [false, true] {
            let raw = encode_l1(off, copied);
            assert_eq!(
                decode_l1(&h, raw),
                Ok(Some(L1Entry {
                    l2_offset: off,
                    copied
                }))
            );
        }
    }
}

#[test]
fn l2_standard_entries() {
    for version in [2, 3] {
        for cb in MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS {
            let h = hdr(version, cb, false);
            let off = 7u64 << cb;
            assert_eq!(decode_l2(&h, 0, 0), Ok(Cluster::Unallocated));
            assert_eq!(decode_l2(&h, L2E_COPIED, 0), Ok(Cluster::Unallocated));
            assert_eq!(
                decode_l2(&h, off, 0),
                Ok(Cluster::Normal {
                    host: off,
                    copied: false
                })
            );
            assert_eq!(
                decode_l2(&h, encode_l2_normal(off, true), 0),
                Ok(Cluster::Normal {
                    host: off,
                    copied: true
                })
            );
            // The bitmap word is ignored without extended L2.
            assert_eq!(
                decode_l2(&h, off, u64::MAX),
                decode_l2(&h, off, 0),
                "bitmap ignored"
            );
            for bit in (1..=8).chain(56..=61) {
                assert_eq!(
                    decode_l2(&h, off | 1 << bit, 0),
                    Err(FormatError::BadL2Entry),
                    "bit {bit}"
                );
            }
            for bit in 9..cb {
                assert_eq!(
                    decode_l2(&h, off | 1 << bit, 0),
                    Err(FormatError::BadL2Entry)
                );
                // Misaligned preallocated zero cluster too.
                if version == 3 {
                    assert_eq!(
                        decode_l2(&h, off | 1 << bit | L2E_ZERO, 0),
                        Err(FormatError::BadL2Entry)
                    );
                }
            }
            if version == 2 {
                assert_eq!(decode_l2(&h, L2E_ZERO, 0), Err(FormatError::BadL2Entry));
                assert_eq!(
                    decode_l2(&h, off | L2E_ZERO, 0),
                    Err(FormatError::BadL2Entry)
                );
            } else {
                assert_eq!(decode_l2(&h, L2E_ZERO, 0), Ok(Cluster::Zero));
                assert_eq!(
                    decode_l2(&h, encode_l2_zero(None, false), 0),
                    Ok(Cluster::Zero)
                );
                assert_eq!(
                    decode_l2(&h, encode_l2_zero(Some(off), true), 0),
                    Ok(Cluster::ZeroPrealloc { host: off })
                );
            }
        }
    }
}

#[test]
fn l2_compressed_entries() {
    for ext in [false, true] {
        for cb in MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS {
            if ext && cb < 14 {
                continue;
            }
            let h = hdr(3, cb, ext);
            let x = 62 - (cb - 8);
            let max_sectors = 1u64 << (cb - 8);
            for host in [0u64, 1, 511, 512, 0x12345, (1 << x) - 1] {
                for nb in [1u64, 2, max_sectors / 2 + 1, max_sectors] {
                    let raw = L2E_COMPRESSED | ((nb - 1) << x) | host;
                    let want = Cluster::Compressed {
                        host,
                        len: nb * 512 - (host & 511),
                    };
                    assert_eq!(
                        decode_l2(&h, raw, 0),
                        Ok(want),
                        "cb {cb} host {host} nb {nb}"
                    );
                    // The decoder never reads the size field into the offset.
                    let Cluster::Compressed { len, .. } = want else {
                        unreachable!()
                    };
                    assert_eq!(encode_l2_compressed(&h, host, len), Some(raw));
                    assert_eq!(
                        decode_l2(&h, raw | L2E_COPIED, 0),
                        Err(FormatError::BadL2Entry)
                    );
                    if ext {
                        for bm in [1u64, 1 << 32, u64::MAX] {
                            assert_eq!(decode_l2(&h, raw, bm), Err(FormatError::BadL2Entry));
                        }
                    }
                }
            }
            assert_eq!(encode_l2_compressed(&h, 1 << x, 512), None);
            assert_eq!(encode_l2_compressed(&h, 0, 0), None);
            assert_eq!(encode_l2_compressed(&h, 0, max_sectors * 512 + 1), None);
            assert_eq!(encode_l2_compressed(&h, 1, max_sectors * 512), None);
        }
    }
    // A worked example: 64 KiB clusters, x = 54.
    let h = hdr(3, 16, false);
    let raw = L2E_COMPRESSED | (3u64 << 54) | 0x5_0123;
    assert_eq!(
        decode_l2(&h, raw, 0),
        Ok(Cluster::Compressed {
            host: 0x5_0123,
            len: 4 * 512 - 0x123
        })
    );
}

#[test]
fn l2_extended_entries() {
    for cb in 14..=MAX_CLUSTER_BITS {
        let h = hdr(3, cb, true);
        let off = 9u64 << cb;
        assert_eq!(
            decode_l2(&h, 0, 0),
            Ok(Cluster::Extended {
                host: None,
                copied: false,
                alloc: 0,
                zero: 0
            })
        );
        assert_eq!(
            decode_l2(&h, 0, 0xffff_ffff << 32),
            Ok(Cluster::Extended {
                host: None,
                copied: false,
                alloc: 0,
                zero: u32::MAX
            })
        );
        assert_eq!(
            decode_l2(&h, off | L2E_COPIED, 0x0000_00f0_0000_000f),
            Ok(Cluster::Extended {
                host: Some(off),
                copied: true,
                alloc: 0xf,
                zero: 0xf0
            })
        );
        // Host cluster with nothing allocated yet is allowed.
        assert_eq!(
            decode_l2(&h, off, 0),
            Ok(Cluster::Extended {
                host: Some(off),
                copied: false,
                alloc: 0,
                zero: 0
            })
        );
        for sc in 0..32 {
            let both = (1u64 << sc) | (1u64 << (sc + 32));
            assert_eq!(decode_l2(&h, off, both), Err(FormatError::BadL2Entry));
            assert_eq!(decode_l2(&h, 0, 1 << sc), Err(FormatError::BadL2Entry));
        }
        assert_eq!(decode_l2(&h, L2E_ZERO, 0), Err(FormatError::BadL2Entry));
        assert_eq!(
            decode_l2(&h, off | L2E_ZERO, 1),
            Err(FormatError::BadL2Entry)
        );
        for bit in (1..=8).chain(56..=61).chain(9..cb) {
            assert_eq!(
                decode_l2(&h, off | 1 << bit, 1),
                Err(FormatError::BadL2Entry)
            );
        }
    }
}

#[test]
fn l2_raw_entry_reads_tables() {
    let h = hdr(3, 16, false);
    let mut t = vec![0u8; 65536];
    set_table_entry(&mut t, 3, 0x1122).unwrap();
    assert_eq!(l2_raw_entry(&h, &t, 3), Some((0x1122, 0)));
    assert_eq!(l2_raw_entry(&h, &t, 8191), Some((0, 0)));
    assert_eq!(l2_raw_entry(&h, &t, 8192), None);
    assert_eq!(l2_raw_entry(&h, &t, u64::MAX), None);
    assert_eq!(table_entry(&t, 3), Some(0x1122));
    assert_eq!(set_table_entry(&mut t, 8192, 1), None);
    let e = hdr(3, 16, true);
    // Word 3 is the bitmap of extended entry 1.
    assert_eq!(l2_raw_entry(&e, &t, 1), Some((0, 0x1122)));
    set_table_entry(&mut t, 2, 0xabc).unwrap();
    assert_eq!(l2_raw_entry(&e, &t, 1), Some((0xabc, 0x1122)));
    assert_eq!(l2_raw_entry(&e, &t, 4095), Some((0, 0)));
    assert_eq!(l2_raw_entry(&e, &t, 4096), None);
    assert_eq!(l2_raw_entry(&e, &t[..8], 0), None, "bitmap word missing");
}

#[test]
fn first_run_uniform_shapes() {
    let h = hdr(3, 16, false);
    let cs = h.cluster_size();
    for (off, len) in [(0, cs), (0, 1), (cs - 1, 1), (100, 1000), (0, 0)] {
        assert_eq!(
            first_run(&h, &Cluster::Unallocated, off, len),
            (RunKind::Unallocated, len)
        );
        assert_eq!(
            first_run(&h, &Cluster::Zero, off, len),
            (RunKind::Zero, len)
        );
        assert_eq!(
            first_run(&h, &Cluster::ZeroPrealloc { host: 1 << 20 }, off, len),
            (RunKind::Zero, len)
        );
        assert_eq!(
            first_run(
                &h,
                &Cluster::Normal {
                    host: 1 << 20,
                    copied: true
                },
                off,
                len
            ),
            (
                RunKind::Data {
                    host: (1 << 20) + off
                },
                len
            )
        );
        assert_eq!(
            first_run(
                &h,
                &Cluster::Compressed {
                    host: 12345,
                    len: 999
                },
                off,
                len
            ),
            (
                RunKind::Compressed {
                    host: 12345,
                    len: 999
                },
                len
            )
        );
    }
}

/// Per-byte reference for an extended cluster.
fn byte_kind(c: &Cluster, sc_size: u64, b: u64) -> RunKind {
    let Cluster::Extended {
        host, alloc, zero, ..
    } = *c
    else {
        unreachable!()
    };
    let sc = b / sc_size;
    if zero >> sc & 1 != 0 {
        RunKind::Zero
    } else if alloc >> sc & 1 != 0 {
        RunKind::Data {
            host: host.unwrap() + b,
        }
    } else {
        RunKind::Unallocated
    }
}

fn same_run(a: RunKind, b: RunKind, step: u64) -> bool {
    match (a, b) {
        (RunKind::Data { host: x }, RunKind::Data { host: y }) => x + step == y,
        (RunKind::Zero, RunKind::Zero) | (RunKind::Unallocated, RunKind::Unallocated) => true,
        _ => false,
    }
}

#[test]
fn first_run_extended_examples() {
    let h = hdr(3, 16, true);
    let sc = h.subcluster_size();
    assert_eq!(sc, 2048);
    let host = 5u64 << 16;
    let c = Cluster::Extended {
        host: Some(host),
        copied: true,
        alloc: 0b0011,
        zero: 0b1100,
    };
    assert_eq!(
        first_run(&h, &c, 0, 65536),
        (RunKind::Data { host }, 2 * sc)
    );
    assert_eq!(
        first_run(&h, &c, 100, 65536 - 100),
        (RunKind::Data { host: host + 100 }, 2 * sc - 100)
    );
    assert_eq!(
        first_run(&h, &c, 10, 5),
        (RunKind::Data { host: host + 10 }, 5)
    );
    assert_eq!(
        first_run(&h, &c, 2 * sc, 65536 - 2 * sc),
        (RunKind::Zero, 2 * sc)
    );
    assert_eq!(
        first_run(&h, &c, 4 * sc + 1, 65536 - 4 * sc - 1),
        (RunKind::Unallocated, 65536 - 4 * sc - 1)
    );
    let all = Cluster::Extended {
        host: Some(host),
        copied: false,
        alloc: u32::MAX,
        zero: 0,
    };
    assert_eq!(
        first_run(&h, &all, 0, 65536),
        (RunKind::Data { host }, 65536)
    );
    let last = Cluster::Extended {
        host: Some(host),
        copied: false,
        alloc: 1 << 31,
        zero: 0,
    };
    assert_eq!(
        first_run(&h, &last, 65535, 1),
        (RunKind::Data { host: host + 65535 }, 1)
    );
    assert_eq!(
        first_run(&h, &last, 0, 65536),
        (RunKind::Unallocated, 31 * sc)
    );
}

#[test]
fn first_run_extended_matches_reference() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for cb in [14u32, 16, 21] {
        let h = hdr(3, cb, true);
        let cs = h.cluster_size();
        let scs = h.subcluster_size();
        for _ in 0..400 {
            let zero = rng.next() as u32 & rng.next() as u32;
            let alloc = rng.next() as u32 & !zero;
            let c = Cluster::Extended {
                host: Some(rng.below(1 << 20) << cb),
                copied: false,
                alloc,
                zero,
            };
            // Random sub-ranges, aligned to 512 half of the time.
            let mut off = rng.below(cs);
            let mut end = off + 1 + rng.below(cs - off);
            if rng.next() & 1 == 0 {
                off &= !511;
                end = (end + 511) & !511;
            }
            let mut pos = off;
            let mut runs = 0;
            while pos < end {
                let (kind, run) = first_run(&h, &c, pos, end - pos);
                assert!(run > 0 && run <= end - pos);
                // Every byte of the run has the run's kind at the right host.
                for b in [pos, pos + run / 2, pos + run - 1] {
                    let want = byte_kind(&c, scs, b);
                    let got = match kind {
                        RunKind::Data { host } => RunKind::Data {
                            host: host + (b - pos),
                        },
                        k => k,
                    };
                    assert_eq!(got, want);
                }
                // Maximal: the next byte starts a different run.
                if pos + run < end {
                    assert!(!same_run(
                        byte_kind(&c, scs, pos + run - 1),
                        byte_kind(&c, scs, pos + run),
                        1
                    ));
                    assert_eq!((pos + run) % scs, 0, "runs end on subcluster boundaries");
                }
                pos += run;
                runs += 1;
            }
            assert!(runs <= 32);
        }
    }
}

#[test]
fn refcount_layout_matches_qemu() {
    // Order 0: index 0 is the least significant bit of byte 0.
    let mut b = [0u8; 4];
    refcount_set(&mut b, 0, 0, 1).unwrap();
    refcount_set(&mut b, 9, 0, 1).unwrap();
    assert_eq!(b, [0x01, 0x02, 0, 0]);
    // Order 1: two bits each, low bits first.
    let mut b = [0u8; 4];
    refcount_set(&mut b, 1, 1, 3).unwrap();
    refcount_set(&mut b, 4, 1, 2).unwrap();
    assert_eq!(b, [0x0c, 0x02, 0, 0]);
    // Order 2: nibbles, low nibble first.
    let mut b = [0u8; 4];
    refcount_set(&mut b, 0, 2, 0xa).unwrap();
    refcount_set(&mut b, 1, 2, 0x5).unwrap();
    refcount_set(&mut b, 3, 2, 0xf).unwrap();
    assert_eq!(b, [0x5a, 0xf0, 0, 0]);
    // Orders 3..=6: big-endian words.
    let mut b = [0u8; 16];
    refcount_set(&mut b, 1, 4, 0x1234).unwrap();
    assert_eq!(&b[..4], &[0, 0, 0x12, 0x34]);
    let mut b = [0u8; 16];
    refcount_set(&mut b, 1, 5, 0x1234_5678).unwrap();
    assert_eq!(&b[4..8], &[0x12, 0x34, 0x56, 0x78]);
    let mut b = [0u8; 16];
    refcount_set(&mut b, 1, 6, 0x0102_0304_0506_0708).unwrap();
    assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(refcount_get(&b, 1, 6), Some(0x0102_0304_0506_0708));
    assert_eq!(refcount_get(&b, 3, 5), Some(0x0506_0708));
    assert_eq!(refcount_get(&b, 15, 3), Some(8));
}

#[test]
fn refcount_round_trips_every_order() {
    let mut rng = Rng(12345);
    for order in 0..=6u32 {
        let max = refcount_max(order);
        assert_eq!(
            max,
            if order == 6 {
                u64::MAX
            } else {
                (1 << (1 << order)) - 1
            }
        );
        let mut block = vec![0u8; 64];
        let n = (64 * 8) >> order;
        let mut model = vec![0u64; n as usize];
        for _ in 0..2000 {
            let i = rng.below(n);
            let v = match rng.below(4) {
                0 => 0,
                1 => max,
                _ => rng.next() & max,
            };
            refcount_set(&mut block, i, order, v).unwrap();
            model[i as usize] = v;
        }
        for i in 0..n {
            assert_eq!(refcount_get(&block, i, order), Some(model[i as usize]));
        }
        // Boundaries.
        assert_eq!(refcount_get(&block, n, order), None);
        assert_eq!(refcount_get(&block, u64::MAX, order), None);
        assert_eq!(refcount_set(&mut block, n, order, 0), None);
        assert_eq!(refcount_set(&mut block, u64::MAX, order, 0), None);
        assert!(refcount_set(&mut block, n - 1, order, max).is_some());
        assert_eq!(refcount_get(&block, n - 1, order), Some(max));
        if order < 6 {
            let before = block.clone();
            assert_eq!(refcount_set(&mut block, 0, order, max + 1), None);
            assert_eq!(block, before, "failed set leaves the block alone");
        }
    }
    let mut b = [0u8; 8];
    assert_eq!(refcount_get(&b, 0, 7), None);
    assert_eq!(refcount_set(&mut b, 0, 7, 0), None);
    assert_eq!(refcount_max(7), u64::MAX);
}

#[test]
fn refcount_geometry() {
    for cb in MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS {
        for order in 0..=6 {
            let mut h = hdr(3, cb, false);
            h.refcount_order = order;
            let n = refcount_block_entries(&h);
            assert_eq!(n, ((1u64 << cb) * 8) >> order);
            assert_eq!(refcount_split(&h, 0), (0, 0));
            assert_eq!(refcount_split(&h, n - 1), (0, n - 1));
            assert_eq!(refcount_split(&h, n), (1, 0));
            assert_eq!(refcount_split(&h, 5 * n + 7), (5, 7));
            let (t, i) = refcount_split(&h, u64::MAX);
            assert_eq!(t * n + i, u64::MAX);
        }
    }
    let h = hdr(3, 16, false);
    assert_eq!(refcount_block_offset(&h, 0), Ok(None));
    assert_eq!(refcount_block_offset(&h, 3 << 16), Ok(Some(3 << 16)));
    assert_eq!(
        refcount_block_offset(&h, (3 << 16) | 512),
        Err(FormatError::BadRefcountEntry)
    );
    assert_eq!(
        refcount_block_offset(&h, 1),
        Err(FormatError::BadRefcountEntry)
    );
}

/// Random headers (including invalid, hand-built ones) and random entries
/// must never panic; debug builds check arithmetic overflow.
#[test]
fn arbitrary_inputs_never_panic() {
    let mut rng = Rng(7);
    let mut buf = vec![0u8; 4096];
    for i in 0..20000u64 {
        let pick = |r: &mut Rng, small: u64| -> u64 {
            match r.below(4) {
                0 => r.next(),
                1 => r.below(small),
                2 => u64::MAX - r.below(4),
                _ => 0,
            }
        };
        let h = Header {
            version: pick(&mut rng, 5) as u32,
            backing_file_offset: pick(&mut rng, 1 << 22),
            backing_file_size: pick(&mut rng, 2048) as u32,
            cluster_bits: pick(&mut rng, 70) as u32,
            size: pick(&mut rng, 1 << 40),
            crypt_method: pick(&mut rng, 3) as u32,
            l1_size: pick(&mut rng, 1 << 23) as u32,
            l1_table_offset: pick(&mut rng, 1 << 30),
            refcount_table_offset: pick(&mut rng, 1 << 30),
            refcount_table_clusters: pick(&mut rng, 1 << 10) as u32,
            nb_snapshots: pick(&mut rng, 4) as u32,
            snapshots_offset: pick(&mut rng, 1 << 30),
            incompatible_features: pick(&mut rng, 64),
            compatible_features: pick(&mut rng, 4),
            autoclear_features: pick(&mut rng, 4),
            refcount_order: pick(&mut rng, 10) as u32,
            header_length: pick(&mut rng, 4200) as u32,
            compression_type: pick(&mut rng, 3) as u8,
        };
        let raw = rng.next()
            & if i & 1 == 0 {
                u64::MAX
            } else {
                0xc0ff_ffff_ffff_fe01
            };
        let bm = pick(&mut rng, 1 << 40);
        let _ = (h.cluster_size(), h.l2_entries(), h.l2_entry_bytes());
        let _ = (h.l1_index(raw), h.l2_index(raw), h.offset_in_cluster(raw));
        let _ = (h.max_file_size(), h.min_l1_entries(), h.subcluster_size());
        let _ = h.l2_entry_offset(raw);
        let _ = decode_l1(&h, raw);
        let _ = encode_l2_compressed(&h, raw, bm);
        let _ = refcount_split(&h, raw);
        let _ = refcount_block_entries(&h);
        let _ = refcount_block_offset(&h, raw);
        if let Ok(c) = decode_l2(&h, raw, bm) {
            let off = pick(&mut rng, h.cluster_size());
            let len = pick(&mut rng, h.cluster_size());
            let (_, run) = first_run(&h, &c, off, len);
            assert!(run <= len);
        }
        let c = Cluster::Extended {
            host: if bm & 1 == 0 { None } else { Some(raw) },
            copied: false,
            alloc: bm as u32,
            zero: (bm >> 32) as u32,
        };
        let (_, run) = first_run(&h, &c, raw, bm);
        assert!(run <= bm);
        let _ = l2_raw_entry(&h, &buf, raw);
        let _ = refcount_get(&buf, raw, h.refcount_order);
        let _ = refcount_set(&mut buf, raw, h.refcount_order, bm);
        let _ = refcount_get(&buf, bm & 0xffff, (raw & 7) as u32);
        let _ = h.write_to(&mut buf);
        if let Ok(p) = Header::parse(&buf) {
            // Anything parse accepts serialises back to itself.
            let mut again = vec![0u8; 4096];
            p.write_to(&mut again).unwrap();
            assert_eq!(Header::parse(&again), Ok(p));
        }
        // Byte-level corruption of a serialised header.
        let j = rng.below(120) as usize;
        buf[j] = rng.next() as u8;
        let _ = Header::parse(&buf[..rng.below(130) as usize]);
    }
}
