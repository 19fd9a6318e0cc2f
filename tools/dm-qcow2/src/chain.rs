// SPDX-License-Identifier: GPL-2.0

//! Reading qcow2 headers and following backing chains.
//!
//! Every check here mirrors what the kernel target's constructor refuses
//! (`drivers/target/ctr.rs`), so that the user gets a clear message before
//! a table is ever loaded.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use qcow2_format::{incompat, Header};

/// qcow2 compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1;
/// The target refuses clusters smaller than a page (x86: 4 KiB).
pub const MIN_TARGET_CLUSTER: u64 = 4096;
/// Longest chain we follow before calling it a loop-like mistake.
const MAX_CHAIN: usize = 256;

/// One image of a chain as read from its file.
#[derive(Debug, Clone)]
pub struct Image {
    /// The path as given or as derived from the backing-file name.
    pub path: PathBuf,
    /// Its header.
    pub hdr: Header,
    /// The backing-file name stored in the header, if any.
    pub backing: Option<String>,
}

impl Image {
    /// Reads and checks the header of `path` (see [`check_header`]).
    pub fn read(path: &Path) -> Result<Image> {
        let f = File::open(path).with_context(|| path.display().to_string())?;
        read_from(&f, path)
    }

    /// Whether the image is dirty and uses lazy refcounts (refused as a
    /// writable top: its refcounts may be stale).
    pub fn dirty_lazy(&self) -> bool {
        self.hdr.incompatible_features & incompat::DIRTY != 0
            && self.hdr.compatible_features & COMPAT_LAZY_REFCOUNTS != 0
    }
}

/// Reads the header (and the backing-file name) of an open image.
pub fn read_from(f: &File, path: &Path) -> Result<Image> {
    let what = || path.display().to_string();
    let mut buf = vec![0u8; Header::MIN_READ];
    let n = read_full(f, &mut buf, 0).with_context(what)?;
    buf.truncate(n);
    let hdr = Header::parse(&buf)
        .map_err(|e| anyhow::anyhow!("{} (the target would refuse it)", e.msg()))
        .with_context(what)?;
    if hdr.cluster_size() < MIN_TARGET_CLUSTER {
        bail!("{}: cluster size {} below the page size (the target needs at least 4096)", what(), hdr.cluster_size());
    }
    let file_len = f.metadata().with_context(what)?.len();
    if file_len > hdr.max_file_size() {
        bail!("{}: file larger than its refcount table describes (the target would refuse it)", what());
    }
    let backing = if hdr.has_backing_file() {
        // Header::parse checked that the name lies in the first cluster.
        let len = usize::try_from(hdr.backing_file_size).context("backing file name length")?;
        let mut name = vec![0u8; len];
        let got = read_full(f, &mut name, hdr.backing_file_offset).with_context(what)?;
        if got != len {
            bail!("{}: backing file name past the end of the file", what());
        }
        let s = String::from_utf8(name)
            .map_err(|_| anyhow::anyhow!("{}: backing file name is not UTF-8", what()))?;
        Some(s)
    } else {
        None
    };
    Ok(Image { path: path.to_path_buf(), hdr, backing })
}

/// `pread` until `buf` is full or the file ends; returns the bytes read.
fn read_full(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let rest = buf.get_mut(done..).unwrap_or(&mut []);
        let n = f.read_at(rest, off + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

/// Resolves a backing-file name as QEMU does: an absolute name is taken as
/// is, a relative one is relative to the directory of the image naming it
/// (the path as given, not its canonical form). A `file:` prefix is dropped;
/// other protocols (`json:`, `nbd:` ...) cannot be a file we can open.
pub fn resolve_backing(image: &Path, name: &str) -> Result<PathBuf> {
    let name = name.strip_prefix("file:").unwrap_or(name);
    if name.starts_with("json:") || (name.contains("://") && !name.starts_with('/')) {
        bail!("backing file '{name}' of {} is not a plain file name", image.display());
    }
    let p = Path::new(name);
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    let dir = image.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok(dir.join(p))
}

/// Follows the backing chain of `top` from the headers; returns it base
/// first. Refuses loops and names missing files.
pub fn discover(top: &Path) -> Result<Vec<Image>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut cur = top.to_path_buf();
    loop {
        let canon = cur.canonicalize().with_context(|| match out.last() {
            Some(Image { path, backing: Some(b), .. }) => {
                format!("backing file '{b}' of {} ({})", path.display(), cur.display())
            }
            _ => cur.display().to_string(),
        })?;
        if !seen.insert(canon.clone()) {
            bail!("{}: loop in the backing chain ({} is its own backing file further down)", top.display(), canon.display());
        }
        if out.len() >= MAX_CHAIN {
            bail!("{}: backing chain longer than {MAX_CHAIN} images", top.display());
        }
        let img = Image::read(&cur)?;
        let next = img.backing.as_deref().map(|b| resolve_backing(&cur, b)).transpose()?;
        out.push(img);
        match next {
            Some(n) => cur = n,
            None => break,
        }
    }
    out.reverse();
    Ok(out)
}

/// Reads an explicitly given chain (base first).
pub fn explicit(paths: &[PathBuf]) -> Result<Vec<Image>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for p in paths {
        let canon = p.canonicalize().with_context(|| p.display().to_string())?;
        if !seen.insert(canon) {
            bail!("{}: given twice in the chain", p.display());
        }
        out.push(Image::read(p)?);
    }
    Ok(out)
}

/// The constructor's chain checks: base without backing file, equal
/// cluster size and extended L2, sizes not shrinking upwards; a writable
/// top must not be dirty with lazy refcounts.
pub fn check_chain(chain: &[Image], writable: bool) -> Result<()> {
    let base = chain.first().context("no images given")?;
    if base.backing.is_some() {
        bail!("{}: the base image has a backing file (give the whole chain)", base.path.display());
    }
    for pair in chain.windows(2) {
        let (lo, up) = (&pair[0], &pair[1]);
        if lo.hdr.cluster_bits != up.hdr.cluster_bits {
            bail!("{}: cluster size {} differs from {} of {} below it", up.path.display(),
                up.hdr.cluster_size(), lo.hdr.cluster_size(), lo.path.display());
        }
        if lo.hdr.extended_l2() != up.hdr.extended_l2() {
            bail!("{}: extended L2 differs from {} below it", up.path.display(), lo.path.display());
        }
        if lo.hdr.size > up.hdr.size {
            bail!("{}: lower delta larger ({} bytes) than {} above it ({} bytes)", lo.path.display(),
                lo.hdr.size, up.path.display(), up.hdr.size);
        }
    }
    if let Some(top) = chain.last() {
        if writable && top.dirty_lazy() {
            bail!("{}: image is dirty with lazy refcounts: run qemu-img check -r all {}", top.path.display(), top.path.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{mk, Scratch};

    fn names(c: &[Image]) -> Vec<String> {
        c.iter().map(|i| i.path.file_name().unwrap().to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn relative_and_absolute_names() {
        let s = Scratch::new("chain");
        std::fs::create_dir(s.path("sub")).unwrap();
        mk(&s.path("base.qcow2"), 1 << 20, None);
        // relative to the directory of the image naming it
        mk(&s.path("sub/mid.qcow2"), 1 << 20, Some("../base.qcow2"));
        let abs = s.path("sub/mid.qcow2").to_string_lossy().into_owned();
        mk(&s.path("top.qcow2"), 2 << 20, Some(&abs));
        let c = discover(&s.path("top.qcow2")).unwrap();
        assert_eq!(names(&c), ["base.qcow2", "mid.qcow2", "top.qcow2"]);
        check_chain(&c, true).unwrap();
        // from another working directory, through a relative top path
        let rel = discover(Path::new(&s.path("sub/mid.qcow2"))).unwrap();
        assert_eq!(rel.len(), 2);
    }

    #[test]
    fn loop_refused() {
        let s = Scratch::new("loop");
        mk(&s.path("a.qcow2"), 1 << 20, Some("b.qcow2"));
        mk(&s.path("b.qcow2"), 1 << 20, Some("a.qcow2"));
        let e = format!("{:#}", discover(&s.path("a.qcow2")).unwrap_err());
        assert!(e.contains("loop in the backing chain"), "{e}");
        mk(&s.path("self.qcow2"), 1 << 20, Some("self.qcow2"));
        assert!(discover(&s.path("self.qcow2")).is_err());
    }

    #[test]
    fn missing_file_named() {
        let s = Scratch::new("missing");
        mk(&s.path("top.qcow2"), 1 << 20, Some("gone.qcow2"));
        let e = format!("{:#}", discover(&s.path("top.qcow2")).unwrap_err());
        assert!(e.contains("backing file 'gone.qcow2' of") && e.contains("No such file"), "{e}");
    }

    #[test]
    fn target_refusals() {
        let s = Scratch::new("refuse");
        mk(&s.path("base.qcow2"), 2 << 20, None);
        mk(&s.path("top.qcow2"), 1 << 20, Some("base.qcow2"));
        // a lower delta larger than the one above
        let e = format!("{:#}", check_chain(&discover(&s.path("top.qcow2")).unwrap(), true).unwrap_err());
        assert!(e.contains("lower delta larger"), "{e}");
        // dirty + lazy refcounts: refused as a writable top only
        let p = s.path("dirty.qcow2");
        mk(&p, 1 << 20, None);
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&1u64.to_be_bytes(), 72).unwrap(); // incompatible: dirty
        f.write_all_at(&1u64.to_be_bytes(), 80).unwrap(); // compatible: lazy refcounts
        let c = discover(&p).unwrap();
        let e = format!("{:#}", check_chain(&c, true).unwrap_err());
        assert!(e.contains("qemu-img check -r all"), "{e}");
        check_chain(&c, false).unwrap();
        // corrupt bit: Header::parse refuses it, with the kernel's words
        f.write_all_at(&2u64.to_be_bytes(), 72).unwrap();
        let e = format!("{:#}", discover(&p).unwrap_err());
        assert!(e.contains("Image is marked corrupt"), "{e}");
        // not qcow2
        std::fs::write(s.path("raw.img"), vec![0u8; 4096]).unwrap();
        let e = format!("{:#}", discover(&s.path("raw.img")).unwrap_err());
        assert!(e.contains("Bad qcow2 magic"), "{e}");
        // an explicit chain whose base has a backing file
        let e = format!("{:#}", check_chain(&explicit(&[s.path("top.qcow2")]).unwrap(), true).unwrap_err());
        assert!(e.contains("base image has a backing file"), "{e}");
    }
}
