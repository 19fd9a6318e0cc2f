//! Feed arbitrary bytes to Header::parse and, for accepted headers, treat
//! the rest of the input as L1/L2/refcount data. Nothing may panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_format::*;

fuzz_target!(|data: &[u8]| {
    let Ok(h) = Header::parse(data) else {
        return;
    };
    let mut out = [0u8; 4096];
    if let Ok(n) = h.write_to(&mut out) {
        // write_to clears the autoclear bits, nothing else.
        let want = Header {
            autoclear_features: 0,
            ..h
        };
        assert_eq!(Header::parse(&out[..n.max(105)]), Ok(want));
    }
    let cs = h.cluster_size();
    let rest = data.get(h.serialized_len()..).unwrap_or(&[]);
    let word = |i: u64| table_entry(rest, i).unwrap_or(0);
    let mut i = 0;
    while table_entry(rest, i + 3).is_some() {
        let (raw, bitmap, a, b) = (word(i), word(i + 1), word(i + 2), word(i + 3));
        let _ = decode_l1(&h, raw);
        let _ = refcount_block_offset(&h, raw);
        if let Ok(c) = decode_l2(&h, raw, bitmap) {
            let off = a % cs;
            let len = b % (cs - off + 1);
            let mut pos = off;
            while pos < off + len {
                let (_, run) = first_run(&h, &c, pos, off + len - pos);
                assert!(run > 0 && run <= off + len - pos);
                pos += run;
            }
        }
        let mut block = rest.to_vec();
        let order = (a % 8) as u32;
        if let Some(v) = refcount_get(&block, b, order) {
            assert_eq!(refcount_set(&mut block, b, order, v), Some(()));
            assert_eq!(block, rest);
        }
        i += 4;
    }
});
