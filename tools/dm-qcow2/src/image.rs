// SPDX-License-Identifier: GPL-2.0

//! Writing qcow2 images: new images and overlays, and backing-file names.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};
use qcow2_format::{incompat, set_table_entry, Header, V3_HEADER_LEN};

use crate::chain;

/// Header extension: backing file format name.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Refcount width used for new images (16 bits, QEMU's default).
const REFCOUNT_ORDER: u32 = 4;

/// What `create` is asked for.
#[derive(Debug, Clone)]
pub struct CreateOpts {
    /// Virtual size in bytes (a multiple of 512).
    pub size: u64,
    /// Cluster size in bytes (a power of two, 4 KiB..2 MiB).
    pub cluster_size: u64,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// Backing-file name to store (as given, like `qemu-img create -b`).
    pub backing: Option<String>,
}

/// Parses a size like QEMU does: a number with an optional binary suffix
/// (k/K, M, G, T, P, E; "b" for bytes).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult): (&str, u64) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                'p' => 1 << 50,
                'e' => 1 << 60,
                _ => bail!("bad size '{s}': unknown suffix '{c}'"),
            };
            (t.get(..i).unwrap_or(""), m)
        }
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| anyhow::anyhow!("bad size '{s}'"))?;
    n.checked_mul(mult).ok_or_else(|| anyhow::anyhow!("size '{s}' too large"))
}

/// Layout of a new image: clusters for the header, refcount table,
/// refcount blocks and L1 table, in that order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    reftable_clusters: u64,
    refblocks: u64,
    l1_clusters: u64,
}

impl Layout {
    fn total(&self) -> u64 {
        1 + self.reftable_clusters + self.refblocks + self.l1_clusters
    }

    /// Smallest layout whose refcount blocks cover every cluster it uses
    /// (the blocks and the table describe themselves too).
    fn new(cs: u64, l1_entries: u64) -> Layout {
        let per_block = cs * 8 / (1 << REFCOUNT_ORDER);
        let l1_clusters = (l1_entries * 8).div_ceil(cs);
        let mut l = Layout { reftable_clusters: 1, refblocks: 1, l1_clusters };
        loop {
            let blocks = l.total().div_ceil(per_block);
            let table = (blocks * 8).div_ceil(cs);
            if blocks == l.refblocks && table == l.reftable_clusters {
                return l;
            }
            l.refblocks = blocks;
            l.reftable_clusters = table;
        }
    }
}

/// Builds the header of a new image (extensions and backing name included)
/// and its metadata; returns the bytes to write at offset 0.
fn build(o: &CreateOpts) -> Result<Vec<u8>> {
    let cs = o.cluster_size;
    if !cs.is_power_of_two() || !(chain::MIN_TARGET_CLUSTER..=2 << 20).contains(&cs) {
        bail!("cluster size {cs} is not a power of two between 4096 and 2 MiB");
    }
    if o.extended_l2 && cs < 16 << 10 {
        bail!("extended L2 needs a cluster size of at least 16 KiB");
    }
    if !o.size.is_multiple_of(512) {
        bail!("size {} is not a multiple of 512", o.size);
    }
    let cluster_bits = cs.trailing_zeros();
    let mut hdr = Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size: o.size,
        crypt_method: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 0,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: if o.extended_l2 { incompat::EXTL2 } else { 0 },
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: REFCOUNT_ORDER,
        header_length: V3_HEADER_LEN,
        compression_type: 0,
    };
    let l1_entries = hdr.min_l1_entries();
    let lay = Layout::new(cs, l1_entries);
    hdr.l1_size = u32::try_from(l1_entries).context("size too large for one L1 table")?;
    hdr.refcount_table_clusters = u32::try_from(lay.reftable_clusters).context("size too large")?;
    // An empty L1 table has no cluster (QEMU writes offset 0 then too).
    hdr.l1_table_offset = if l1_entries == 0 { 0 } else { (1 + lay.reftable_clusters + lay.refblocks) * cs };

    let total = lay.total();
    let len = usize::try_from(total * cs).context("image metadata too large")?;
    let mut buf = vec![0u8; len];

    // Header extensions (backing format, end marker), then the name.
    let mut ext = Vec::new();
    if let Some(b) = &o.backing {
        if b.is_empty() || b.len() > qcow2_format::MAX_BACKING_NAME as usize {
            bail!("backing file name '{b}' is empty or too long");
        }
        ext.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        ext.extend_from_slice(&5u32.to_be_bytes());
        ext.extend_from_slice(b"qcow2\0\0\0");
    }
    ext.extend_from_slice(&[0u8; 8]);
    let ext_off = V3_HEADER_LEN as usize;
    let name_off = ext_off + ext.len();
    if let Some(b) = &o.backing {
        if (name_off + b.len()) as u64 > cs {
            bail!("backing file name too long for the first cluster");
        }
        hdr.backing_file_offset = name_off as u64;
        hdr.backing_file_size = b.len() as u32;
    }
    // Our own header must pass our own (and the kernel's) checks.
    let n = hdr.write_to(&mut buf).map_err(|e| anyhow::anyhow!("header: {}", e.msg()))?;
    debug_assert_eq!(n, V3_HEADER_LEN as usize);
    put(&mut buf, ext_off, &ext)?;
    if let Some(b) = &o.backing {
        put(&mut buf, name_off, b.as_bytes())?;
    }
    Header::parse(&buf).map_err(|e| anyhow::anyhow!("built header refused: {}", e.msg()))?;

    // Refcount table: entry i -> refcount block i.
    let rt_off = usize::try_from(cs).context("cluster size")?;
    let rb_first = 1 + lay.reftable_clusters;
    for i in 0..lay.refblocks {
        let table = buf.get_mut(rt_off..).context("refcount table")?;
        set_table_entry(table, i, (rb_first + i) * cs).context("refcount table entry")?;
    }
    // Refcount blocks: every metadata cluster has refcount 1.
    let rb_off = usize::try_from(rb_first * cs).context("refcount block")?;
    for c in 0..total {
        let blocks = buf.get_mut(rb_off..).context("refcount block")?;
        qcow2_format::refcount_set(blocks, c, REFCOUNT_ORDER, 1).context("refcount entry")?;
    }
    Ok(buf)
}

fn put(buf: &mut [u8], off: usize, data: &[u8]) -> Result<()> {
    buf.get_mut(off..off + data.len()).context("buffer too small")?.copy_from_slice(data);
    Ok(())
}

/// Writes a new qcow2 v3 image at `path` (which must not exist).
pub fn create(path: &Path, o: &CreateOpts) -> Result<()> {
    let buf = build(o)?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .with_context(|| path.display().to_string())?;
    let res = f.write_all(&buf).and_then(|_| f.sync_all());
    if let Err(e) = res {
        // Never leave half an image behind.
        let _ = std::fs::remove_file(path);
        return Err(e).with_context(|| path.display().to_string());
    }
    Ok(())
}

/// The name to store for `backing` in an image at `image`: relative if both
/// are in the same directory (a chain that can be moved as a whole), else
/// the absolute path.
pub fn backing_name_for(image: &Path, backing: &Path) -> Result<String> {
    let b = backing.canonicalize().with_context(|| backing.display().to_string())?;
    let dir = image
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .canonicalize()
        .with_context(|| image.display().to_string())?;
    let s = match (b.parent(), b.file_name()) {
        (Some(p), Some(n)) if p == dir => n.to_string_lossy().into_owned(),
        _ => b.to_string_lossy().into_owned(),
    };
    Ok(s)
}

/// Rewrites the backing-file name of `path` (in place, in its first
/// cluster) to `name`; the backing format extension, if any, is kept.
///
/// The caller makes sure nothing else writes the header meanwhile (the
/// device is suspended, and re-reads headers on resume).
pub fn set_backing_name(path: &Path, name: &str) -> Result<()> {
    let what = || path.display().to_string();
    let f = OpenOptions::new().read(true).write(true).open(path).with_context(what)?;
    let img = chain::read_from(&f, path)?;
    let cs = img.hdr.cluster_size();
    // Keep the name where it was, or put it after the header extensions.
    let off = if img.hdr.backing_file_offset != 0 {
        img.hdr.backing_file_offset
    } else {
        bail!("{}: has no backing file name to rewrite", what());
    };
    if off + name.len() as u64 > cs || name.len() > qcow2_format::MAX_BACKING_NAME as usize {
        bail!("{}: new backing file name '{name}' does not fit in the first cluster", what());
    }
    let old_len = u64::from(img.hdr.backing_file_size);
    // One write covering the length field and both names: when it all lies
    // in the first sector (QEMU's layout) it lands as a whole.
    let end = off + (name.len() as u64).max(old_len);
    let mut buf = vec![0u8; usize::try_from(end).context("header range")?];
    f.read_exact_at(&mut buf, 0).with_context(what)?;
    put(&mut buf, 16, &(name.len() as u32).to_be_bytes())?;
    let o = usize::try_from(off).context("name offset")?;
    if let Some(old) = buf.get_mut(o..) {
        old.fill(0);
    }
    put(&mut buf, o, name.as_bytes())?;
    f.write_all_at(&buf, 0).with_context(what)?;
    f.sync_data().with_context(what)?;
    Ok(())
}

/// Grows the virtual size of the image at `path` to `size` bytes.
///
/// The L1 table grows inside the clusters it already occupies (QEMU
/// allocates whole clusters: one 64 KiB cluster maps 4 TiB); a size that
/// would need a bigger, moved L1 table is refused. Nothing else changes:
/// new L1 entries are zero (unallocated). The caller keeps the target from
/// writing the header meanwhile (suspended device).
pub fn grow(path: &Path, size: u64) -> Result<()> {
    let what = || path.display().to_string();
    let f = OpenOptions::new().read(true).write(true).open(path).with_context(what)?;
    let img = chain::read_from(&f, path)?;
    let mut h = img.hdr;
    if size < h.size {
        bail!("{}: shrinking is not supported", what());
    }
    h.size = size;
    let want = h.min_l1_entries();
    let old = u64::from(img.hdr.l1_size);
    let cs = h.cluster_size();
    let room = (old * 8).div_ceil(cs).max(1) * cs / 8;
    if want > room || h.l1_table_offset == 0 {
        bail!("{}: {size} bytes need a larger L1 table than its clusters hold; \
               resize it offline with qemu-img resize", what());
    }
    if want > old {
        // The slack of the L1 clusters must be unused (zero) to become entries.
        let mut slack = vec![0u8; usize::try_from((want - old) * 8).context("L1 size")?];
        f.read_exact_at(&mut slack, h.l1_table_offset + old * 8).with_context(what)?;
        if slack.iter().any(|&b| b != 0) {
            bail!("{}: L1 table slack is not zero; resize it offline with qemu-img resize", what());
        }
    }
    let l1 = want.max(old);
    let mut fields = [0u8; 16];
    put(&mut fields, 0, &size.to_be_bytes())?;
    put(&mut fields, 8, &[0u8; 4])?; // crypt_method, checked 0 by parse
    put(&mut fields, 12, &u32::try_from(l1).context("L1 size")?.to_be_bytes())?;
    // size (24..32), crypt_method (32..36), l1_size (36..40): one write.
    f.write_all_at(&fields, 24).with_context(what)?;
    f.sync_data().with_context(what)?;
    Ok(())
}

/// Opens `path` with the flags the target wants: O_DIRECT (falling back to
/// a plain descriptor where the file system refuses it: the target sets
/// direct I/O per request and gives its own message), O_CLOEXEC.
pub fn open_image(path: &Path, rw: bool) -> Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(rw);
    let res = o.clone().custom_flags(libc::O_DIRECT | libc::O_CLOEXEC).open(path);
    match res {
        Ok(f) => Ok(f),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            o.custom_flags(libc::O_CLOEXEC).open(path).with_context(|| path.display().to_string())
        }
        Err(e) => Err(e).with_context(|| path.display().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert!(parse_size("1x").is_err());
        assert!(parse_size("99999999999E").is_err());
    }

    use crate::testutil::{mk, qemu_img, run_qemu_img, Scratch};

    fn info(p: &Path) -> serde_json::Value {
        serde_json::from_str(&run_qemu_img(&["info", "--output=json", p.to_str().unwrap()])).unwrap()
    }

    #[test]
    fn create_checked_by_qemu_img() {
        let Some(_) = qemu_img() else { return };
        let s = Scratch::new("create");
        let cases = [
            (65536u64, false, 1u64 << 30),
            (4096, false, 10 << 30),
            (4096, false, 2 << 40), // many refcount blocks and L1 clusters
            (16384, true, 100 << 20),
            (2 << 20, true, 512),
            (65536, false, 0),
        ];
        for (i, &(cs, ext, size)) in cases.iter().enumerate() {
            let p = s.path(&format!("img{i}.qcow2"));
            create(&p, &CreateOpts { size, cluster_size: cs, extended_l2: ext, backing: None }).unwrap();
            run_qemu_img(&["check", p.to_str().unwrap()]);
            let j = info(&p);
            assert_eq!(j["virtual-size"], size, "{p:?}");
            assert_eq!(j["cluster-size"], cs, "{p:?}");
            assert_eq!(j["format-specific"]["data"]["extended-l2"], ext, "{p:?}");
            assert_eq!(j["format-specific"]["data"]["compat"], "1.1");
        }
        // an overlay: QEMU sees the backing file and its format
        let b = s.path("img0.qcow2");
        let o = s.path("over.qcow2");
        create(&o, &CreateOpts { size: 1 << 30, cluster_size: 65536, extended_l2: false,
            backing: Some("img0.qcow2".into()) }).unwrap();
        run_qemu_img(&["check", o.to_str().unwrap()]);
        let j = info(&o);
        assert_eq!(j["backing-filename"], "img0.qcow2");
        assert_eq!(j["backing-filename-format"], "qcow2");
        assert_eq!(j["full-backing-filename"], b.to_str().unwrap());
        // and can write to it
        let out = std::process::Command::new("qemu-io")
            .args(["-c", "write -P 7 0 1M", o.to_str().unwrap()]).output();
        if let Ok(out) = out {
            assert!(out.status.success());
            run_qemu_img(&["check", o.to_str().unwrap()]);
        }
        assert!(create(&o, &CreateOpts { size: 512, cluster_size: 65536, extended_l2: false, backing: None }).is_err(),
            "an existing file is never overwritten");
    }

    #[test]
    fn backing_name_and_grow() {
        let Some(_) = qemu_img() else { return };
        let s = Scratch::new("rename");
        mk(&s.path("a.qcow2"), 1 << 20, None);
        mk(&s.path("b.qcow2"), 1 << 20, None);
        mk(&s.path("top.qcow2"), 1 << 20, Some("a.qcow2"));
        let top = s.path("top.qcow2");
        set_backing_name(&top, "b.qcow2").unwrap();
        assert_eq!(info(&top)["backing-filename"], "b.qcow2");
        let long = s.path("b.qcow2").to_string_lossy().into_owned();
        set_backing_name(&top, &long).unwrap();
        assert_eq!(info(&top)["backing-filename"], long.as_str());
        set_backing_name(&top, "a.qcow2").unwrap();
        assert_eq!(info(&top)["backing-filename"], "a.qcow2");
        run_qemu_img(&["check", top.to_str().unwrap()]);
        assert_eq!(backing_name_for(&top, &s.path("b.qcow2")).unwrap(), "b.qcow2");

        grow(&top, 3 << 40).unwrap();
        assert_eq!(info(&top)["virtual-size"], 3u64 << 40);
        run_qemu_img(&["check", top.to_str().unwrap()]);
        assert!(grow(&top, 1 << 20).is_err(), "shrinking refused");
        assert!(grow(&top, 5 << 40).is_err(), "beyond the L1 clusters refused");
    }

    #[test]
    fn layout_covers_itself() {
        for &(cs, l1) in &[(4096u64, 1u64), (4096, 4 << 20), (65536, 2048), (2 << 20, 1)] {
            let l = Layout::new(cs, l1);
            let per_block = cs * 8 / 16;
            assert!(l.refblocks * per_block >= l.total());
            assert!(l.reftable_clusters * cs / 8 >= l.refblocks);
        }
    }
}
