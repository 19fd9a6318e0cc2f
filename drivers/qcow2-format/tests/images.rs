//! Read real qemu-img images (and backing chains) through the crate's
//! decoders and compare byte for byte with `qemu-img convert -O raw`.
//! Also cross-checks every refcount against the metadata that uses it.

use qcow2_format::*;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

// ---------------------------------------------------------------------------
// Minimal host-side qcow2 reader built on the crate.

/// What the reader met, so tests can assert a fixture exercises a path.
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    unallocated: u64,
    zero: u64,
    data: u64,
    compressed: u64,
    zero_prealloc: u64,
    /// Extended clusters mixing run kinds inside one cluster.
    mixed_extended: u64,
    /// Reads that fell through a lower image's virtual end.
    past_end: u64,
}

struct Image {
    file: File,
    hdr: Header,
    l1: Vec<u64>,
    backing: Option<Box<Image>>,
}

fn pread(f: &File, off: u64, len: u64) -> Vec<u8> {
    // Short reads past EOF are zero-filled, as QEMU's file driver does.
    let mut buf = vec![0u8; len as usize];
    let mut done = 0;
    while done < buf.len() {
        let n = f.read_at(&mut buf[done..], off + done as u64).unwrap();
        if n == 0 {
            break;
        }
        done += n;
    }
    buf
}

fn inflate(data: &[u8], cs: usize) -> Vec<u8> {
    let mut out = vec![0u8; cs];
    let mut st = miniz_oxide::inflate::stream::InflateState::new(miniz_oxide::DataFormat::Raw);
    let r = miniz_oxide::inflate::stream::inflate(
        &mut st,
        data,
        &mut out,
        miniz_oxide::MZFlush::Finish,
    );
    // QEMU accepts a stream that fills the cluster even without an end marker.
    assert_eq!(r.bytes_written, cs, "inflate: {r:?}");
    out
}

impl Image {
    fn open(path: &Path) -> Image {
        let file = File::open(path).unwrap();
        let head = pread(&file, 0, Header::MIN_READ as u64);
        let hdr = Header::parse(&head).unwrap_or_else(|e| panic!("{path:?}: {}", e.msg()));
        let l1raw = pread(&file, hdr.l1_table_offset, u64::from(hdr.l1_size) * 8);
        let l1 = (0..u64::from(hdr.l1_size))
            .map(|i| table_entry(&l1raw, i).unwrap())
            .collect();
        let backing = hdr.has_backing_file().then(|| {
            let name = pread(
                &file,
                hdr.backing_file_offset,
                u64::from(hdr.backing_file_size),
            );
            let name = PathBuf::from(String::from_utf8(name).unwrap());
            let full = if name.is_absolute() {
                name
            } else {
                path.parent().unwrap().join(name)
            };
            Box::new(Image::open(&full))
        });
        Image {
            file,
            hdr,
            l1,
            backing,
        }
    }

    fn cluster(&self, vaddr: u64) -> Cluster {
        let h = &self.hdr;
        let Some(&raw) = self.l1.get(h.l1_index(vaddr) as usize) else {
            return Cluster::Unallocated;
        };
        let Some(l1e) = decode_l1(h, raw).unwrap() else {
            return Cluster::Unallocated;
        };
        let ent = pread(
            &self.file,
            l1e.l2_offset + h.l2_entry_offset(h.l2_index(vaddr)),
            h.l2_entry_bytes(),
        );
        let (raw, bitmap) = l2_raw_entry(h, &ent, 0).unwrap();
        decode_l2(h, raw, bitmap).unwrap()
    }

    /// Read guest bytes [vaddr, vaddr + out.len()) through the chain.
    fn read(&self, mut vaddr: u64, mut out: &mut [u8], st: &mut Stats) {
        let h = &self.hdr;
        while !out.is_empty() {
            if vaddr >= h.size {
                st.past_end += 1;
                out.fill(0);
                return;
            }
            let off = h.offset_in_cluster(vaddr);
            let chunk = (out.len() as u64)
                .min(h.cluster_size() - off)
                .min(h.size - vaddr);
            let c = self.cluster(vaddr);
            match c {
                Cluster::ZeroPrealloc { .. } => st.zero_prealloc += 1,
                Cluster::Extended { .. }
                    if first_run(h, &c, 0, h.cluster_size()).1 < h.cluster_size() =>
                {
                    st.mixed_extended += 1
                }
                _ => {}
            }
            let mut pos = 0;
            while pos < chunk {
                let (kind, run) = first_run(h, &c, off + pos, chunk - pos);
                assert!(run > 0 && run <= chunk - pos);
                let dst = &mut out[pos as usize..(pos + run) as usize];
                match kind {
                    RunKind::Unallocated => {
                        st.unallocated += 1;
                        match &self.backing {
                            Some(b) => b.read(vaddr + pos, dst, st),
                            None => dst.fill(0),
                        }
                    }
                    RunKind::Zero => {
                        st.zero += 1;
                        dst.fill(0);
                    }
                    RunKind::Data { host } => {
                        st.data += 1;
                        dst.copy_from_slice(&pread(&self.file, host, run));
                    }
                    RunKind::Compressed { host, len } => {
                        st.compressed += 1;
                        let cs = h.cluster_size() as usize;
                        let plain = inflate(&pread(&self.file, host, len), cs);
                        let s = (off + pos) as usize;
                        dst.copy_from_slice(&plain[s..s + run as usize]);
                    }
                }
                pos += run;
            }
            out = &mut out[chunk as usize..];
            vaddr += chunk;
        }
    }

    fn read_all(&self) -> (Vec<u8>, Stats) {
        let mut st = Stats::default();
        let mut buf = vec![0u8; self.hdr.size as usize];
        // Odd-sized reads so runs start and end off cluster boundaries.
        let step = 3 * self.hdr.cluster_size() / 2 + 512;
        let mut v = 0;
        while v < buf.len() {
            let end = (v + step as usize).min(buf.len());
            self.read(v as u64, &mut buf[v..end], &mut st);
            v = end;
        }
        (buf, st)
    }

    /// Expected refcount of every host cluster, from the metadata, and the
    /// refcounts the refcount structures hold; they must match exactly.
    fn check_refcounts(&self) {
        let h = &self.hdr;
        let cs = h.cluster_size();
        let mut want: HashMap<u64, u64> = HashMap::new();
        let mut add = |off: u64, len: u64| {
            for c in off / cs..(off + len).div_ceil(cs) {
                *want.entry(c).or_default() += 1;
            }
        };
        add(0, cs);
        add(h.l1_table_offset, u64::from(h.l1_size) * 8);
        add(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
        );
        let reft = pread(
            &self.file,
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
        );
        let mut blocks = Vec::new();
        for i in 0..u64::from(h.refcount_table_clusters) * cs / 8 {
            let raw = table_entry(&reft, i).unwrap();
            if let Some(b) = refcount_block_offset(h, raw).unwrap() {
                add(b, cs);
                blocks.push((i, b));
            }
        }
        for &raw in &self.l1 {
            let Some(l1e) = decode_l1(h, raw).unwrap() else {
                continue;
            };
            add(l1e.l2_offset, cs);
            let l2 = pread(&self.file, l1e.l2_offset, cs);
            for j in 0..h.l2_entries() {
                let (raw, bm) = l2_raw_entry(h, &l2, j).unwrap();
                match decode_l2(h, raw, bm).unwrap() {
                    Cluster::Normal { host, copied } => {
                        assert!(copied, "no snapshots: COPIED must be set");
                        add(host, cs)
                    }
                    Cluster::ZeroPrealloc { host } => add(host, cs),
                    Cluster::Extended {
                        host: Some(host), ..
                    } => add(host, cs),
                    Cluster::Compressed { host, len } => {
                        // QEMU counts the sectors the descriptor names.
                        let start = host & !511;
                        add(start, (host + len) - start)
                    }
                    _ => {}
                }
            }
        }
        let n = refcount_block_entries(h);
        let order = h.refcount_order;
        let mut got: HashMap<u64, u64> = HashMap::new();
        for (ti, boff) in blocks {
            let block = pread(&self.file, boff, cs);
            let mut copy = block.clone();
            for bi in 0..n {
                let rc = refcount_get(&block, bi, order).unwrap();
                // Writing back every value leaves the block byte-identical.
                refcount_set(&mut copy, bi, order, rc).unwrap();
                if rc != 0 {
                    let cluster = ti * n + bi;
                    assert_eq!(refcount_split(h, cluster), (ti, bi));
                    got.insert(cluster, rc);
                }
            }
            assert_eq!(copy, block);
            assert_eq!(refcount_get(&block, n, order), None);
        }
        assert_eq!(got, want, "refcounts (order {order})");
        let file_len = self.file.metadata().unwrap().len();
        assert!(file_len <= h.max_file_size());
    }
}

// ---------------------------------------------------------------------------
// qemu-img / qemu-io helpers.

fn have_qemu() -> bool {
    let ok = ["qemu-img", "qemu-io"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    // In CI a missing tool is a failure, not a quiet pass.
    if !ok && std::env::var_os("CI").is_some_and(|v| v == "true") {
        panic!("qemu-img/qemu-io not found (CI=true: the fixture tests must run)");
    }
    if !ok {
        eprintln!("SKIP: qemu-img/qemu-io not found; image fixture test skipped");
    }
    ok
}

struct TempDir(PathBuf);
impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("qcow2-format-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(dir: &TempDir, prog: &str, args: &[&str]) {
    let out = Command::new(prog)
        .args(args)
        .current_dir(&dir.0)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // qemu-io reports some failures on stdout with exit status 0.
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("failed") && !text.contains("error"),
        "{prog} {args:?}: {text}"
    );
}

/// `qemu-img create -f qcow2 -o OPTS [-b BACKING] NAME SIZE`.
fn create(dir: &TempDir, name: &str, opts: &str, backing: Option<&str>, size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", opts];
    if let Some(b) = backing {
        args.extend(["-b", b, "-F", "qcow2"]);
    }
    args.extend([name, size]);
    run(dir, "qemu-img", &args);
}

/// Run qemu-io commands (e.g. "write -P 0x11 0 64k") on an image.
fn io(dir: &TempDir, name: &str, cmds: &[&str]) {
    let cmds: Vec<String> = cmds
        .iter()
        .map(|c| c.split(' ').map(eval).collect::<Vec<_>>().join(" "))
        .collect();
    let mut args = vec!["-f", "qcow2"];
    for c in &cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(name);
    run(dir, "qemu-io", &args);
}

/// qemu-io takes plain sizes only: turn "3m+512" or "8m-4k" into bytes.
fn eval(tok: &str) -> String {
    let is_expr = tok.starts_with(|c: char| c.is_ascii_digit())
        && !tok.starts_with("0x")
        && tok
            .chars()
            .all(|c| c.is_ascii_digit() || "km+-".contains(c));
    if !is_expr {
        return tok.to_string();
    }
    let term = |t: &str| -> i64 {
        let (n, mul) = match t.strip_suffix('k') {
            Some(n) => (n, 1 << 10),
            None => match t.strip_suffix('m') {
                Some(n) => (n, 1 << 20),
                None => (t, 1),
            },
        };
        n.parse::<i64>().unwrap() * mul
    };
    let mut total = 0;
    let mut sign = 1;
    let mut start = 0;
    for (i, c) in tok.char_indices().chain([(tok.len(), '+')]) {
        if c == '+' || c == '-' {
            total += sign * term(&tok[start..i]);
            sign = if c == '+' { 1 } else { -1 };
            start = i + 1;
        }
    }
    total.to_string()
}

/// Compare our read of `name` (with its chain) to qemu's raw export.
fn compare(dir: &TempDir, name: &str) -> Stats {
    let raw = format!("{name}.raw");
    run(dir, "qemu-img", &["convert", "-O", "raw", name, &raw]);
    let want = std::fs::read(dir.path(&raw)).unwrap();
    let img = Image::open(&dir.path(name));
    let (got, st) = img.read_all();
    assert_eq!(got.len(), want.len(), "{name}: virtual size");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!(
            "{name}: first mismatch at byte {i:#x}: got {:#x} want {:#x} ({st:?})",
            got[i], want[i]
        );
    }
    std::fs::remove_file(dir.path(&raw)).unwrap();
    st
}

fn check_refcounts(dir: &TempDir, name: &str) {
    Image::open(&dir.path(name)).check_refcounts();
}

/// A spread of writes: aligned, unaligned, cross-cluster, tail.
const WRITES: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x22 1000 3000",
    "write -P 0x33 1m 513",
    "write -P 0x44 3m-5 2m+517",
    "write -P 0x55 8m-4k 4k",
];

// ---------------------------------------------------------------------------

#[test]
fn cluster_sizes_and_versions() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("sizes");
    for cs in ["4k", "64k", "2m"] {
        for compat in ["0.10", "1.1"] {
            let name = format!("img-{cs}-{compat}.qcow2");
            create(
                &dir,
                &name,
                &format!("cluster_size={cs},compat={compat}"),
                None,
                "12m",
            );
            io(&dir, &name, WRITES);
            let st = compare(&dir, &name);
            assert!(st.data > 0 && st.unallocated > 0, "{name}: {st:?}");
            check_refcounts(&dir, &name);
            let img = Image::open(&dir.path(&name));
            assert_eq!(img.hdr.version, if compat == "0.10" { 2 } else { 3 });
            let want_cs = match cs {
                "4k" => 4096,
                "64k" => 65536,
                _ => 2 << 20,
            };
            assert_eq!(img.hdr.cluster_size(), want_cs);
        }
    }
}

#[test]
fn zero_clusters_mask_backing() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("zero");
    for compat in ["0.10", "1.1"] {
        let base = format!("base-{compat}.qcow2");
        let top = format!("top-{compat}.qcow2");
        create(&dir, &base, &format!("compat={compat}"), None, "4m");
        io(&dir, &base, &["write -P 0xaa 0 4m"]);
        create(&dir, &top, &format!("compat={compat}"), Some(&base), "4m");
        io(
            &dir,
            &top,
            &[
                // Plain zero clusters over backing data.
                "write -z 64k 128k",
                // Allocated, then zeroed in place (preallocated zero).
                "write -P 0x11 1m 128k",
                "write -z 1m 64k",
                // Allocated, then zeroed with unmap.
                "write -P 0x22 2m 64k",
                "write -z -u 2m 64k",
                // Partial-cluster zero write forces data allocation.
                "write -z 3m+512 1k",
            ],
        );
        let st = compare(&dir, &top);
        if compat == "1.1" {
            assert!(st.zero > 0 && st.zero_prealloc > 0, "{st:?}");
        }
        assert!(st.unallocated > 0, "{st:?}");
        check_refcounts(&dir, &top);
        check_refcounts(&dir, &base);
    }
}

/// Deterministic mix of incompressible and compressible data.
fn mixed_data(len: usize) -> Vec<u8> {
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut v = vec![0u8; len];
    for (i, b) in v.iter_mut().enumerate() {
        // 2 MiB stripes: random, pattern, zero.
        *b = match (i >> 21) % 3 {
            0 => {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
            1 => (i % 251) as u8,
            _ => 0,
        };
    }
    v
}

#[test]
fn compressed_clusters() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("compressed");
    let raw = mixed_data(6 << 20);
    std::fs::write(dir.path("src.raw"), &raw).unwrap();
    for (cs, compat, ext) in [
        ("4k", "1.1", false),
        ("64k", "1.1", false),
        ("2m", "1.1", false),
        ("64k", "0.10", false),
        ("64k", "1.1", true),
        ("512", "1.1", false),
    ] {
        let name = format!("c-{cs}-{compat}-{ext}.qcow2");
        let opts = format!(
            "cluster_size={cs},compat={compat}{}",
            if ext { ",extended_l2=on" } else { "" }
        );
        run(
            &dir,
            "qemu-img",
            &[
                "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", &opts, "src.raw", &name,
            ],
        );
        let st = compare(&dir, &name);
        assert!(st.compressed > 0 && st.data > 0, "{name}: {st:?}");
        let (got, _) = Image::open(&dir.path(&name)).read_all();
        assert!(got == raw, "{name}: differs from source");
        check_refcounts(&dir, &name);
    }
    // Compressed writes into an overlay over a backing file.
    create(&dir, "cbase.qcow2", "cluster_size=64k", None, "2m");
    io(&dir, "cbase.qcow2", &["write -P 0x5a 0 2m"]);
    create(
        &dir,
        "ctop.qcow2",
        "cluster_size=64k",
        Some("cbase.qcow2"),
        "2m",
    );
    io(
        &dir,
        "ctop.qcow2",
        &["write -c -P 0x66 64k 64k", "write -c -P 0x77 1m 128k"],
    );
    let st = compare(&dir, "ctop.qcow2");
    assert!(st.compressed >= 3 && st.unallocated > 0, "{st:?}");
    check_refcounts(&dir, "ctop.qcow2");
}

#[test]
fn extended_l2_subclusters() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("extl2");
    for cs in ["16k", "64k", "2m"] {
        let base = format!("base-{cs}.qcow2");
        let top = format!("top-{cs}.qcow2");
        create(&dir, &base, "cluster_size=64k", None, "8m");
        io(&dir, &base, &["write -P 0xaa 0 8m"]);
        create(
            &dir,
            &top,
            &format!("cluster_size={cs},extended_l2=on"),
            Some(&base),
            "8m",
        );
        io(
            &dir,
            &top,
            &[
                "write -P 0x11 0 512",
                "write -P 0x22 4k 1k",
                "write -P 0x33 100k 7k",
                "write -z 200k 2k",
                "write -z 300k 100k",
                "write -P 0x44 1m 1m",
                "write -z 1m+4k 8k",
                "write -z -u 6m 2m",
                "write -P 0x55 7m+512 1k",
            ],
        );
        let st = compare(&dir, &top);
        assert!(
            st.mixed_extended > 0 && st.zero > 0 && st.unallocated > 0 && st.data > 0,
            "{cs}: {st:?}"
        );
        let img = Image::open(&dir.path(&top));
        assert!(img.hdr.extended_l2());
        check_refcounts(&dir, &top);
    }
}

#[test]
fn refcount_widths() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("refbits");
    for bits in [1u32, 2, 4, 8, 16, 32, 64] {
        for cs in ["4k", "64k"] {
            let name = format!("r{bits}-{cs}.qcow2");
            create(
                &dir,
                &name,
                &format!("cluster_size={cs},refcount_bits={bits}"),
                None,
                "8m",
            );
            io(&dir, &name, WRITES);
            let img = Image::open(&dir.path(&name));
            assert_eq!(1u32 << img.hdr.refcount_order, bits);
            compare(&dir, &name);
            check_refcounts(&dir, &name);
        }
    }
    // Many clusters with 512-byte clusters and 1-bit refcounts: several
    // refcount blocks and a multi-cluster refcount table.
    create(
        &dir,
        "many.qcow2",
        "cluster_size=512,refcount_bits=64",
        None,
        "4m",
    );
    io(&dir, "many.qcow2", &["write -P 0x99 0 3m"]);
    compare(&dir, "many.qcow2");
    check_refcounts(&dir, "many.qcow2");
    let img = Image::open(&dir.path("many.qcow2"));
    assert!(img.hdr.refcount_table_clusters > 1);
}

#[test]
fn three_deep_chain() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("chain");
    // Shorter base, different cluster sizes and versions per layer.
    create(
        &dir,
        "base.qcow2",
        "cluster_size=4k,compat=0.10",
        None,
        "4m",
    );
    io(
        &dir,
        "base.qcow2",
        &["write -P 0xb0 0 4m", "write -P 0xb1 1m+100 5000"],
    );
    create(
        &dir,
        "mid.qcow2",
        "cluster_size=64k",
        Some("base.qcow2"),
        "6m",
    );
    io(
        &dir,
        "mid.qcow2",
        &[
            "write -P 0xc0 64k 64k",
            "write -P 0xc1 3m+7 1m",
            "write -z 2m 256k",
            "write -P 0xc2 5m 4k",
        ],
    );
    create(
        &dir,
        "top.qcow2",
        "cluster_size=2m,extended_l2=on",
        Some("mid.qcow2"),
        "8m",
    );
    io(
        &dir,
        "top.qcow2",
        &[
            "write -P 0xd0 100k 10k",
            "write -P 0xd1 3m+64k 64k",
            "write -z 4m+128k 64k",
            "write -P 0xd2 7m+1k 2k",
        ],
    );
    let st = compare(&dir, "top.qcow2");
    assert!(
        st.past_end > 0 && st.zero > 0 && st.mixed_extended > 0,
        "{st:?}"
    );
    compare(&dir, "mid.qcow2");
    for n in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
        check_refcounts(&dir, n);
    }
}

#[test]
fn real_headers_parse_and_round_trip() {
    if !have_qemu() {
        return;
    }
    let dir = TempDir::new("headers");
    for (opts, backing) in [
        ("compat=0.10", None),
        ("compat=1.1,lazy_refcounts=on", None),
        ("cluster_size=2m,extended_l2=on,refcount_bits=1", None),
        ("compat=1.1", Some("a.qcow2")),
    ] {
        let name = if backing.is_some() {
            "b.qcow2"
        } else {
            "a.qcow2"
        };
        create(&dir, name, opts, backing, "1g");
        let head = std::fs::read(dir.path(name)).unwrap();
        let h = Header::parse(&head).unwrap();
        assert_eq!(h.size, 1 << 30);
        assert_eq!(u64::from(h.l1_size), h.min_l1_entries());
        assert_eq!(h.has_backing_file(), backing.is_some());
        let mut out = head[..h.serialized_len()].to_vec();
        h.write_to(&mut out).unwrap();
        assert_eq!(out, head[..h.serialized_len()], "{opts}");
        // The shortest accepted buffer is the fixed header.
        let need = if h.version == 2 {
            72
        } else {
            105.min(h.header_length as usize)
        };
        assert_eq!(Header::parse(&head[..need]), Ok(h));
        assert_eq!(Header::parse(&head[..need - 1]), Err(FormatError::TooShort));
    }
}
