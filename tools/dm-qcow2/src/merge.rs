// SPDX-License-Identifier: GPL-2.0

//! Online merges through the target's `merge_backward` / `merge_forward`
//! messages: start with an eventfd, follow `progress`, `complete`, then fix
//! the backing-file name of the delta above so that the shortened chain is
//! valid for QEMU offline.

use std::fs::File;
use std::io::IsTerminal;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::device::{self, Current};
use crate::dm::{self, Dm};
use crate::image;

/// Options of `merge`.
#[derive(Debug, Clone, Copy)]
pub struct MergeOpts {
    /// Depth from the top (backward: 0 = the top; forward: default 1).
    pub depth: Option<u64>,
    /// Into the delta above instead of the one below.
    pub forward: bool,
    /// Start and return.
    pub no_wait: bool,
    /// Cancel a running merge.
    pub cancel: bool,
}

/// A merge's state from `merge_* progress` (or the status line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// backward, forward or none.
    pub merge: String,
    /// copying, ready, failed or none.
    pub stage: String,
    /// 0..100.
    pub progress: u64,
    /// errno of a failed merge.
    pub error: i32,
    /// depth of the merge.
    pub depth: u64,
}

/// Parses `merge=... depth=... stage=... progress=... error=...`.
pub fn parse_progress(s: &str) -> Progress {
    let m = dm::parse_status(s);
    let get = |k: &str| m.get(k).cloned().unwrap_or_default();
    Progress {
        merge: get("merge"),
        stage: get("stage"),
        progress: get("progress").parse().unwrap_or(0),
        error: get("error").parse().unwrap_or(0),
        depth: get("depth").parse().unwrap_or(0),
    }
}

fn msg_prefix(forward: bool) -> &'static str {
    if forward { "merge_forward" } else { "merge_backward" }
}

/// Which image ids a merge touches: (merged, receiving).
pub fn ids(nr: usize, depth: u64, forward: bool) -> Result<(usize, usize)> {
    if nr < 2 {
        bail!("nothing to merge: the chain has one image");
    }
    let d = usize::try_from(depth).unwrap_or(usize::MAX);
    if forward {
        if d == 0 || d >= nr {
            bail!("--forward --depth must be 1..{} for {nr} images (0 is the top, which has nothing above)", nr - 1);
        }
        let k = nr - 1 - d;
        Ok((k, k + 1))
    } else {
        if d > nr - 2 {
            bail!("--depth must be 0..{} for {nr} images (the base has nothing below)", nr - 2);
        }
        let k = nr - 1 - d;
        Ok((k, k - 1))
    }
}

/// An eventfd the target signals when the merge is ready or failed.
struct EventFd(File);

impl EventFd {
    fn new() -> Result<EventFd> {
        // SAFETY: eventfd has no memory arguments; we check the result.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("eventfd");
        }
        // SAFETY: a fresh descriptor nothing else owns.
        Ok(EventFd(unsafe { File::from_raw_fd(fd) }))
    }

    /// Waits up to `ms` for a signal; drains it.
    fn wait(&self, ms: i32) -> bool {
        let mut p = libc::pollfd { fd: self.0.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n > 0 {
            let mut v = 0u64;
            // SAFETY: reads 8 bytes into `v`.
            unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
            return true;
        }
        false
    }
}

/// Shows progress: a bar on a terminal, plain lines otherwise.
struct Shown {
    bar: Option<ProgressBar>,
    last: Option<u64>,
    label: String,
}

impl Shown {
    fn new(label: String) -> Shown {
        let bar = if std::io::stdout().is_terminal() {
            let b = ProgressBar::new(100);
            if let Ok(st) = ProgressStyle::with_template("{msg} [{bar:40}] {pos:>3}% ({elapsed})") {
                b.set_style(st);
            }
            b.set_message(label.clone());
            Some(b)
        } else {
            None
        };
        Shown { bar, last: None, label }
    }

    fn set(&mut self, p: u64, stage: &str) {
        match &self.bar {
            Some(b) => b.set_position(p.min(100)),
            None => {
                if self.last != Some(p) {
                    println!("{}: {stage} {p}%", self.label);
                }
            }
        }
        self.last = Some(p);
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// The state of a device's merge from its status line.
fn status_progress(dm: &Dm, name: &str) -> Result<Progress> {
    let st = dm.qcow2_line(name, false)?;
    Ok(parse_progress(&st.params))
}

/// `merge`.
pub fn merge(dm: &Dm, name: &str, o: MergeOpts) -> Result<()> {
    let now = status_progress(dm, name)?;
    let running = now.merge != "none" && !now.merge.is_empty() && now.stage != "none";
    if o.cancel {
        if !running {
            println!("{name}: no merge running");
            return Ok(());
        }
        dm.message(name, &format!("merge_{} cancel", now.merge))?;
        println!("{name}: merge cancelled");
        return Ok(());
    }
    let cur = device::current(dm, name)?;
    let nr = cur.names.len();
    if running && (now.stage == "copying" || now.stage == "ready") {
        // A merge started with --no-wait (or by someone else): follow it.
        let forward = now.merge == "forward";
        let (k, r) = ids(nr, now.depth, forward)?;
        return follow(dm, name, &cur, forward, k, r);
    }
    if cur.read_only {
        bail!("{name}: read-only device (connect it without --read-only to merge)");
    }
    let forward = o.forward;
    let depth = o.depth.unwrap_or(if forward { 1 } else { 0 });
    let (k, r) = ids(nr, depth, forward)?;
    make_writable(dm, name, &cur, r)?;

    let efd = EventFd::new()?;
    let pre = msg_prefix(forward);
    dm.message(name, &format!("{pre} start {} {depth}", efd.0.as_raw_fd()))
        .map_err(|e| explain_start(e, &cur, k, r))?;
    if o.no_wait {
        println!("{name}: merge of {} into {} started (`dm-qcow2 merge {name}` completes it)", cur.names[k], cur.names[r]);
        return Ok(());
    }
    wait_and_complete(dm, name, &cur, forward, k, r, Some(&efd))
}

/// Follows a merge started earlier.
fn follow(dm: &Dm, name: &str, cur: &Current, forward: bool, k: usize, r: usize) -> Result<()> {
    wait_and_complete(dm, name, cur, forward, k, r, None)
}

/// Adds what the errno of a refused start means.
fn explain_start(e: anyhow::Error, cur: &Current, k: usize, r: usize) -> anyhow::Error {
    let why = match dm::chain_errno(&e) {
        Some(libc::EBUSY) => "a merge is running or ready, the device is suspended, or writes wait for space",
        Some(libc::EACCES) => "the receiving image is not open read-write",
        Some(libc::EBADSLT) => "the receiving image is smaller than the merged one",
        Some(libc::EINVAL) => "bad argument, or the receiving image is dirty with lazy refcounts",
        Some(libc::ENOENT) => "no such delta",
        _ => return e,
    };
    e.context(format!("merge {} into {}: {why}", cur.names[k], cur.names[r]))
}

/// Reloads the table with image `r` read-write if it is not yet.
fn make_writable(dm: &Dm, name: &str, cur: &Current, r: usize) -> Result<()> {
    let old = device::chain_fds(dm, name, cur.names.len())?;
    let recv = old.get(r).context("receiving image")?;
    if device::is_writable(recv) {
        return Ok(());
    }
    let rw = device::reopen(Path::new(&cur.names[r]), recv, true)?;
    let mut files: Vec<&File> = old.iter().collect();
    files[r] = &rw;
    let old_refs: Vec<&File> = old.iter().collect();
    device::swap_table(dm, name, cur.len, false, &old_refs, Some(&files), &mut || Ok(()))
        .with_context(|| format!("{name}: reopening {} read-write for the merge", cur.names[r]))
}

/// Waits for `ready` (eventfd or polling), completes, fixes the header.
/// Ctrl-C (or SIGTERM) cancels the merge.
fn wait_and_complete(
    dm: &Dm,
    name: &str,
    cur: &Current,
    forward: bool,
    k: usize,
    r: usize,
    efd: Option<&EventFd>,
) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("signal handler")?;
    }
    let pre = msg_prefix(forward);
    let mut shown = Shown::new(format!("merge {} into {}", short(&cur.names[k]), short(&cur.names[r])));
    loop {
        if stop.load(Ordering::Relaxed) {
            shown.finish();
            dm.message(name, &format!("{pre} cancel"))?;
            bail!("{name}: merge cancelled (interrupted); device and images as before");
        }
        let p = parse_progress(&dm.message(name, &format!("{pre} progress"))?);
        match p.stage.as_str() {
            "ready" => {
                shown.set(100, "ready");
                break;
            }
            "copying" => shown.set(p.progress, "copying"),
            "failed" => {
                shown.finish();
                let why = std::io::Error::from_raw_os_error(p.error);
                bail!("{name}: merge failed: {why} (the chain is unchanged; see dmesg)");
            }
            _ => {
                shown.finish();
                bail!("{name}: the merge stopped (cancelled, or the device was suspended)");
            }
        }
        match efd {
            Some(e) => {
                e.wait(200);
            }
            None => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    shown.finish();
    dm.message(name, &format!("{pre} complete"))?;
    println!("{name}: merged {} into {}", cur.names[k], cur.names[r]);
    fix_backing(dm, name, cur, k, r, forward)
}

/// File name for messages.
fn short(p: &str) -> String {
    Path::new(p).file_name().map_or(p.to_string(), |n| n.to_string_lossy().into_owned())
}

/// After `complete`: the delta that was above the merged one (backward: the
/// one above `k`; forward: `r`) must name the merged one's backing file.
fn fix_backing(dm: &Dm, name: &str, cur: &Current, k: usize, r: usize, forward: bool) -> Result<()> {
    let (above, below) = if forward {
        // The receiving delta is above; the kernel itself clears the name
        // when the base was merged forward.
        if k == 0 {
            return Ok(());
        }
        (r, k - 1)
    } else {
        if k + 1 >= cur.names.len() {
            return Ok(());
        }
        (k + 1, r)
    };
    let above_p = PathBuf::from(&cur.names[above]);
    let new_name = image::backing_name_for(&above_p, Path::new(&cur.names[below]))?;
    let line = dm.qcow2_line(name, true)?;
    // The target re-reads every header on resume: edit while suspended.
    let info = dm.info(name)?;
    device::swap_table(dm, name, line.len, info.read_only, &[], None, &mut || {
        image::set_backing_name(&above_p, &new_name)
    })
    .map_err(|e| anyhow!("{e:#}"))
    .with_context(|| format!("{name}: merged, but the backing file name of {} was not updated \
        (run qemu-img rebase -u -b {new_name} -F qcow2 {})", above_p.display(), above_p.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_ids() {
        assert_eq!(ids(3, 0, false).unwrap(), (2, 1));
        assert_eq!(ids(3, 1, false).unwrap(), (1, 0));
        assert!(ids(3, 2, false).is_err());
        assert_eq!(ids(3, 1, true).unwrap(), (1, 2));
        assert_eq!(ids(3, 2, true).unwrap(), (0, 1));
        assert!(ids(3, 0, true).is_err());
        assert!(ids(1, 0, false).is_err());
    }

    #[test]
    fn progress_line() {
        let p = parse_progress("merge=backward depth=1 stage=copying progress=42 error=0");
        assert_eq!(p.stage, "copying");
        assert_eq!(p.progress, 42);
        assert_eq!(p.depth, 1);
    }
}
