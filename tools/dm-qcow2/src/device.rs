// SPDX-License-Identifier: GPL-2.0

//! Connecting chains, taking snapshots and swapping tables safely.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use crate::chain::{self, Image};
use crate::dm::{self, Dm};
use crate::image;

/// `--discard`: what the device does with discards (qemu-nbd's flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Discard {
    /// Pass them to the images (the target frees clusters).
    Unmap,
    /// Not supported by the target (it always handles discards): refused.
    Ignore,
}

/// Options of `connect`.
#[derive(Debug, Clone)]
pub struct ConnectOpts {
    /// Device name (default: from the top file name).
    pub name: Option<String>,
    /// Read-only table.
    pub read_only: bool,
    /// Chain given explicitly (base first) instead of from the headers.
    pub explicit: bool,
}

/// A test hook: `DM_QCOW2_FAULT=<point>` makes the operation fail there,
/// to check that failures half-way leave the device as it was.
pub fn fault(point: &str) -> Result<()> {
    match std::env::var("DM_QCOW2_FAULT") {
        Ok(p) if p == point => bail!("fault injected at {point} (DM_QCOW2_FAULT)"),
        _ => Ok(()),
    }
}

/// Default device name: the top's file name without its extension,
/// characters device-mapper or shells dislike replaced.
pub fn default_name(top: &Path) -> String {
    let stem = top.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let n: String = stem
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "-_.+".contains(c) { c } else { '_' })
        .take(100)
        .collect();
    if n.is_empty() { "qcow2".to_string() } else { n }
}

/// The table parameters for a list of open files.
pub fn params(files: &[&File]) -> String {
    files.iter().map(|f| f.as_raw_fd().to_string()).collect::<Vec<_>>().join(" ")
}

/// Table length (sectors) for a top image.
fn sectors(top: &Image) -> u64 {
    top.hdr.size / 512
}

/// `connect`: maps a chain; returns the device node.
pub fn connect(dm: &Dm, paths: &[PathBuf], o: &ConnectOpts) -> Result<PathBuf> {
    let chain = if o.explicit {
        chain::explicit(paths)?
    } else {
        let top = paths.first().context("no image given")?;
        chain::discover(top)?
    };
    chain::check_chain(&chain, !o.read_only)?;
    let top = chain.last().context("no images given")?;
    let name = o.name.clone().unwrap_or_else(|| default_name(&top.path));
    if dm.info(&name).is_ok() {
        bail!("{name}: a device of that name exists (give --name)");
    }
    let mut files = Vec::new();
    for (i, img) in chain.iter().enumerate() {
        let rw = !o.read_only && i + 1 == chain.len();
        files.push(image::open_image(&img.path, rw)?);
    }
    let refs: Vec<&File> = files.iter().collect();
    // The table holds its own references: our descriptors close on return.
    dm.create(&name, sectors(top), &params(&refs), o.read_only)
        .with_context(|| format!("connect {}", top.path.display()))
}

/// Descriptors of the chain a device uses now (`get_img_fd`), base first.
pub fn chain_fds(dm: &Dm, name: &str, nr: usize) -> Result<Vec<File>> {
    let mut out = Vec::new();
    for i in 0..nr {
        let s = dm.message(name, &format!("get_img_fd {i}"))?;
        let fd: i32 = s.trim().parse().map_err(|_| anyhow!("{name}: get_img_fd {i} gave '{}'", s.trim()))?;
        // SAFETY: the kernel just installed `fd` in this process for us and
        // nothing else refers to it: the File owns it from here on.
        let f = unsafe { File::from_raw_fd(fd) };
        // The kernel's descriptor is not close-on-exec; ours should be.
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        out.push(f);
    }
    Ok(out)
}

/// Whether a descriptor was opened for writing.
pub fn is_writable(f: &File) -> bool {
    // SAFETY: fcntl F_GETFL on a descriptor we own.
    let fl = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    fl >= 0 && (fl & libc::O_ACCMODE) != libc::O_RDONLY
}

/// Opens `path` again with other flags, making sure it is still the file
/// the table uses (`same`), not another one put in its place.
pub fn reopen(path: &Path, same: &File, rw: bool) -> Result<File> {
    let f = image::open_image(path, rw)?;
    let (a, b) = (f.metadata()?, same.metadata()?);
    if a.dev() != b.dev() || a.ino() != b.ino() {
        bail!("{}: not the file the device uses any more (renamed or replaced?)", path.display());
    }
    Ok(f)
}

/// Swaps the table of a live device: suspend, `between` (header edits),
/// load `new`, resume. On any failure the old table (`old`, the chain's
/// descriptors) is active and resumed again; the device is never left
/// suspended by us. `new == None` only suspends, runs `between`, resumes.
pub fn swap_table(
    dm: &Dm,
    name: &str,
    len: u64,
    read_only: bool,
    old: &[&File],
    new: Option<&[&File]>,
    between: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    dm.suspend(name)?;
    let res = (|| -> Result<bool> {
        between()?;
        let Some(new) = new else { return Ok(false) };
        dm.load(name, len, &params(new), read_only)?;
        fault("after-load").inspect_err(|_| {
            let _ = dm.clear(name);
        })?;
        // Resume swaps the tables: from here the old table is gone.
        dm.resume(name).map_err(|e| anyhow!(Swapped(format!("{e:#}"))))?;
        // Tests: a failure after the swap (the old table must come back).
        fault("after-resume").map_err(|e| anyhow!(Swapped(format!("{e:#}"))))?;
        Ok(true)
    })();
    match res {
        Ok(true) => Ok(()),
        Ok(false) => dm.resume(name),
        Err(e) => {
            let swapped = e.downcast_ref::<Swapped>().is_some();
            let restore = if swapped {
                // The new table is active but did not resume: put the old
                // chain back (we hold its descriptors).
                dm.load(name, len, &params(old), read_only).and_then(|_| dm.resume(name))
            } else {
                dm.resume(name)
            };
            if let Err(r) = restore {
                return Err(e.context(format!(
                    "AND restoring the old table failed ({r:#}): the device {name} is suspended; \
                     check the images, then `dmsetup resume {name}` or `dmsetup remove {name}`"
                )));
            }
            Err(e)
        }
    }
}

/// A resume of a new table that failed.
#[derive(Debug)]
struct Swapped(String);

impl std::fmt::Display for Swapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Swapped {}

/// What a device looks like now.
pub struct Current {
    /// Table length in sectors.
    pub len: u64,
    /// Read-only table.
    pub read_only: bool,
    /// File names, base first.
    pub names: Vec<String>,
}

/// Reads the current table, flags and chain of a device.
pub fn current(dm: &Dm, name: &str) -> Result<Current> {
    let info = dm.info(name)?;
    if info.suspended {
        bail!("{name}: device is suspended (resume it first)");
    }
    let line = dm.qcow2_line(name, true)?;
    let names = dm::chain_names(dm, name)?;
    if names.len() != dm::nr_images(&line)? {
        bail!("{name}: get_img_name gave {} names for {} images", names.len(), dm::nr_images(&line)?);
    }
    Ok(Current { len: line.len, read_only: info.read_only, names })
}

/// Refuses to suspend a device whose merge runs: the suspend would cancel
/// it (presuspend), silently.
fn no_merge_running(dm: &Dm, name: &str) -> Result<()> {
    let st = dm::parse_status(&dm.qcow2_line(name, false)?.params);
    match st.get("stage").map(String::as_str) {
        Some("copying") | Some("ready") => {
            bail!("{name}: a merge is running (finish it with `dm-qcow2 merge {name}` or cancel it with --cancel)")
        }
        _ => Ok(()),
    }
}

/// `snapshot`: a new overlay on the current top, made the device's top.
pub fn snapshot(dm: &Dm, name: &str, new: &Path) -> Result<PathBuf> {
    let cur = current(dm, name)?;
    no_merge_running(dm, name)?;
    let top_name = cur.names.last().context("empty chain")?;
    let top_path = PathBuf::from(top_name);
    let top = Image::read(&top_path)?;
    let backing = image::backing_name_for(new, &top_path).with_context(|| format!("snapshot {name}"))?;
    let opts = image::CreateOpts {
        size: top.hdr.size,
        cluster_size: top.hdr.cluster_size(),
        extended_l2: top.hdr.extended_l2(),
        backing: Some(backing),
    };
    image::create(new, &opts).with_context(|| format!("snapshot {name}"))?;
    let res = (|| -> Result<()> {
        let old = chain_fds(dm, name, cur.names.len())?;
        let old_top = old.last().context("empty chain")?;
        // The old top becomes a lower delta: read-only, as connect opens them.
        let top_ro = reopen(&top_path, old_top, false)?;
        let new_f = image::open_image(new, !cur.read_only)?;
        let mut files: Vec<&File> = old.iter().take(old.len() - 1).collect();
        files.push(&top_ro);
        files.push(&new_f);
        let old_refs: Vec<&File> = old.iter().collect();
        swap_table(dm, name, cur.len, cur.read_only, &old_refs, Some(&files), &mut || fault("after-suspend"))
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(new);
        return Err(e.context(format!("snapshot {name} (device unchanged, {} removed)", new.display())));
    }
    Ok(new.to_path_buf())
}

/// `resize`: grows the virtual size of the top image and the device.
pub fn resize(dm: &Dm, name: &str, size: u64) -> Result<()> {
    let cur = current(dm, name)?;
    no_merge_running(dm, name)?;
    if cur.read_only {
        bail!("{name}: read-only device");
    }
    let top_path = PathBuf::from(cur.names.last().context("empty chain")?);
    let top = Image::read(&top_path)?;
    if !size.is_multiple_of(512) {
        bail!("size {size} is not a multiple of 512");
    }
    if size < top.hdr.size {
        bail!("{name}: shrinking is not supported ({} -> {size} bytes)", top.hdr.size);
    }
    if size == top.hdr.size {
        return Ok(());
    }
    let old = chain_fds(dm, name, cur.names.len())?;
    let refs: Vec<&File> = old.iter().collect();
    // The header is changed while suspended (the target re-reads it on
    // resume); the new table has the new length.
    let mut grow = || image::grow(&top_path, size);
    swap_table(dm, name, size / 512, false, &refs, Some(&refs), &mut grow)
        .with_context(|| format!("resize {name}"))
}
