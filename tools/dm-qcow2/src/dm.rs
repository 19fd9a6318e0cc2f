// SPDX-License-Identifier: GPL-2.0

//! Device-mapper calls (the `devicemapper` crate's ioctls, in-process, so
//! that the kernel takes the image descriptors from this process) and the
//! errors they turn into.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use devicemapper::{DevId, DmError, DmFlags, DmName, DmOptions, DM};

/// Target name of dm-qcow2 tables.
pub const TARGET: &str = "qcow2";
/// Where udev's control socket lives (its presence means udev runs; the
/// same test as libdevmapper's and the `devicemapper` crate's).
const UDEV_CONTROL: &str = "/run/udev/control";
/// How long we wait for udev to make /dev/mapper/NAME.
const NODE_TIMEOUT: Duration = Duration::from_secs(10);

/// Message for a caller without the capability.
pub const NEEDS_ROOT: &str = "needs CAP_SYS_ADMIN (run as root)";

/// The errno of a failed ioctl, if that is what failed.
pub fn errno_of(e: &DmError) -> Option<i32> {
    match e {
        DmError::Core(devicemapper::errors::Error::Ioctl(_, _, _, err)) => Some(**err as i32),
        _ => None,
    }
}

/// A short reason for a failed call: strerror of the ioctl's errno.
fn reason(e: &DmError) -> String {
    match errno_of(e) {
        Some(libc::EPERM) | Some(libc::EACCES) => NEEDS_ROOT.to_string(),
        Some(libc::ENXIO) => "no such device".to_string(),
        Some(n) => std::io::Error::from_raw_os_error(n).to_string(),
        None => e.to_string(),
    }
}

/// Error with the errno kept, for callers that react to it (EBUSY ...).
#[derive(Debug)]
pub struct DmCallError {
    /// What was attempted.
    pub what: String,
    /// errno of the ioctl, if any.
    pub errno: Option<i32>,
    /// Human reason.
    pub reason: String,
}

impl std::fmt::Display for DmCallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.reason)
    }
}

impl std::error::Error for DmCallError {}

fn call_err(what: impl Into<String>, e: &DmError) -> anyhow::Error {
    anyhow!(DmCallError { what: what.into(), errno: errno_of(e), reason: reason(e) })
}

/// The errno in an error chain made by this module, if any.
pub fn chain_errno(e: &anyhow::Error) -> Option<i32> {
    e.chain().find_map(|c| c.downcast_ref::<DmCallError>()).and_then(|d| d.errno)
}

/// One table line of a device.
#[derive(Debug, Clone)]
pub struct TableLine {
    /// Length in sectors.
    pub len: u64,
    /// Target type.
    pub target: String,
    /// Parameters (dm-qcow2: "<nr_images> v<version> <cluster_sectors>").
    pub params: String,
}

/// What `list`/`status` show about a device.
#[derive(Debug, Clone)]
pub struct DevInfo {
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
    /// Read-only table.
    pub read_only: bool,
    /// Suspended.
    pub suspended: bool,
    /// Openers of the device.
    pub open_count: i32,
}

/// A device-mapper control handle.
pub struct Dm {
    dm: DM,
}

/// Checks a device name the way device-mapper does.
fn dm_name(name: &str) -> Result<&DmName> {
    DmName::new(name).map_err(|e| anyhow!("bad device name '{name}': {e}"))
}

impl Dm {
    /// Opens /dev/mapper/control; a non-root caller gets [`NEEDS_ROOT`].
    pub fn open() -> Result<Dm> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        match DM::new() {
            Ok(dm) => Ok(Dm { dm }),
            Err(_) if euid != 0 => bail!("{NEEDS_ROOT}"),
            Err(e) => Err(anyhow!("cannot open /dev/mapper/control: {e}")),
        }
    }

    /// Creates device `name` with one qcow2 table line and resumes it;
    /// on failure the empty device is removed again. Returns its node.
    pub fn create(&self, name: &str, len: u64, params: &str, read_only: bool) -> Result<PathBuf> {
        let n = dm_name(name)?;
        let id = DevId::Name(n);
        let ro = if read_only { DmFlags::DM_READONLY } else { DmFlags::empty() };
        self.dm
            .device_create(n, None, DmOptions::default().set_flags(ro))
            .map_err(|e| call_err(format!("create {name}"), &e))?;
        let res = self.load(name, len, params, read_only).and_then(|_| self.resume(name));
        if let Err(e) = res {
            let _ = self.dm.device_remove(&id, DmOptions::default());
            return Err(e);
        }
        self.wait_node(name)
    }

    /// Loads a table into the inactive slot; a refusal carries the
    /// target's constructor message from the kernel log.
    pub fn load(&self, name: &str, len: u64, params: &str, read_only: bool) -> Result<()> {
        let id = DevId::Name(dm_name(name)?);
        let ro = if read_only { DmFlags::DM_READONLY } else { DmFlags::empty() };
        let kmsg = Kmsg::start();
        let table = [(0u64, len, TARGET.to_string(), params.to_string())];
        match self.dm.table_load(&id, &table, DmOptions::default().set_flags(ro)) {
            Ok(_) => Ok(()),
            Err(e) => {
                let why = kmsg.and_then(|k| k.ctr_message()).unwrap_or_else(|| reason(&e));
                Err(anyhow!(DmCallError {
                    what: format!("{name}: the kernel refused the table"),
                    errno: errno_of(&e),
                    reason: why,
                }))
            }
        }
    }

    /// Suspends (flushing and freezing a file system on the device).
    pub fn suspend(&self, name: &str) -> Result<()> {
        let id = DevId::Name(dm_name(name)?);
        self.dm
            .device_suspend(&id, DmOptions::default().set_flags(DmFlags::DM_SUSPEND))
            .map_err(|e| call_err(format!("suspend {name}"), &e))?;
        Ok(())
    }

    /// Resumes (swapping in a loaded table, if any).
    pub fn resume(&self, name: &str) -> Result<()> {
        let id = DevId::Name(dm_name(name)?);
        let kmsg = Kmsg::start();
        match self.dm.device_suspend(&id, DmOptions::default()) {
            Ok(_) => Ok(()),
            Err(e) => {
                let why = kmsg.and_then(|k| k.last_qcow2_line()).unwrap_or_else(|| reason(&e));
                Err(anyhow!(DmCallError { what: format!("resume {name}"), errno: errno_of(&e), reason: why }))
            }
        }
    }

    /// Drops a loaded, not yet resumed table.
    pub fn clear(&self, name: &str) -> Result<()> {
        let id = DevId::Name(dm_name(name)?);
        self.dm.table_clear(&id).map_err(|e| call_err(format!("clear {name}"), &e))?;
        Ok(())
    }

    /// Removes a device (deferred: when its last opener closes it).
    pub fn remove(&self, name: &str, deferred: bool) -> Result<()> {
        let id = DevId::Name(dm_name(name)?);
        let info = self.info(name)?;
        let fl = if deferred { DmFlags::DM_DEFERRED_REMOVE } else { DmFlags::empty() };
        self.dm.device_remove(&id, DmOptions::default().set_flags(fl)).map_err(|e| {
            let mut err = call_err(format!("disconnect {name}"), &e);
            if errno_of(&e) == Some(libc::EBUSY) {
                err = anyhow!(DmCallError {
                    what: format!("disconnect {name}"),
                    errno: Some(libc::EBUSY),
                    reason: format!("device is busy (open {} times; unmount it, or use --deferred)", info.open_count),
                });
            }
            err
        })?;
        if !udev_running() {
            // Without udev we made the node ourselves: remove it too.
            let node = Path::new("/dev/mapper").join(name);
            if !deferred && is_blockdev(&node, info.major, info.minor) {
                let _ = std::fs::remove_file(node);
            }
        }
        Ok(())
    }

    /// Sends a target message; returns its output (possibly empty).
    pub fn message(&self, name: &str, msg: &str) -> Result<String> {
        let id = DevId::Name(dm_name(name)?);
        match self.dm.target_msg(&id, None, msg) {
            Ok((_, out)) => Ok(out.unwrap_or_default()),
            Err(e) => Err(call_err(format!("{name}: message '{msg}'"), &e)),
        }
    }

    /// Device state.
    pub fn info(&self, name: &str) -> Result<DevInfo> {
        let id = DevId::Name(dm_name(name)?);
        let i = self.dm.device_info(&id).map_err(|e| call_err(name.to_string(), &e))?;
        let d = i.device();
        Ok(DevInfo {
            major: d.major,
            minor: d.minor,
            read_only: i.flags().contains(DmFlags::DM_READONLY),
            suspended: i.flags().contains(DmFlags::DM_SUSPEND),
            open_count: i.open_count(),
        })
    }

    /// The active table (`table == true`) or status lines.
    pub fn lines(&self, name: &str, table: bool) -> Result<Vec<TableLine>> {
        let id = DevId::Name(dm_name(name)?);
        let fl = if table { DmFlags::DM_STATUS_TABLE } else { DmFlags::DM_NOFLUSH };
        let (_, lines) = self
            .dm
            .table_status(&id, DmOptions::default().set_flags(fl))
            .map_err(|e| call_err(name.to_string(), &e))?;
        Ok(lines
            .into_iter()
            .map(|(_, len, target, params)| TableLine { len, target, params })
            .collect())
    }

    /// The one qcow2 line of a device, or an error naming what it is.
    pub fn qcow2_line(&self, name: &str, table: bool) -> Result<TableLine> {
        let lines = self.lines(name, table)?;
        match lines.as_slice() {
            [l] if l.target == TARGET => Ok(l.clone()),
            [] => bail!("{name}: no active table"),
            _ => bail!("{name}: not a qcow2 device"),
        }
    }

    /// Names of all devices whose table is one qcow2 line.
    pub fn qcow2_devices(&self) -> Result<Vec<String>> {
        let devs = self.dm.list_devices().map_err(|e| call_err("list devices", &e))?;
        let mut out = Vec::new();
        for (name, _, _) in devs {
            let n = name.to_string();
            if matches!(self.lines(&n, true).as_deref(), Ok([l]) if l.target == TARGET) {
                out.push(n);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Makes sure /dev/mapper/NAME exists when we return: udev made it
    /// (the crate waits for udev on resume through its cookie semaphore) or,
    /// without udev, we make it as libdevmapper does.
    fn wait_node(&self, name: &str) -> Result<PathBuf> {
        let info = self.info(name)?;
        let node = Path::new("/dev/mapper").join(name);
        let deadline = Instant::now() + NODE_TIMEOUT;
        while udev_running() && Instant::now() < deadline {
            if is_blockdev(&node, info.major, info.minor) {
                return Ok(node);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if is_blockdev(&node, info.major, info.minor) {
            return Ok(node);
        }
        if udev_running() {
            bail!("{}: udev did not create the node within {:?}", node.display(), NODE_TIMEOUT);
        }
        mknod_block(&node, info.major, info.minor)?;
        Ok(node)
    }
}

/// Whether udev runs (and so creates and removes device nodes).
pub fn udev_running() -> bool {
    Path::new(UDEV_CONTROL).exists()
}

fn is_blockdev(p: &Path, major: u32, minor: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(p) {
        Ok(m) => m.file_type().is_block_device() && m.rdev() == libc::makedev(major, minor),
        Err(_) => false,
    }
}

fn mknod_block(node: &Path, major: u32, minor: u32) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let _ = std::fs::remove_file(node);
    let c = std::ffi::CString::new(node.as_os_str().as_bytes()).context("node path")?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o660, libc::makedev(major, minor)) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("mknod {}", node.display()));
    }
    Ok(())
}

/// Finds the device: a name, /dev/mapper/NAME, /dev/dm-N, or the top image
/// of a qcow2 device (compared by canonical path with `get_img_name`).
pub fn find_device(dm: &Dm, what: &str) -> Result<String> {
    let p = Path::new(what);
    // A device name wins over a file of the same name in the working dir.
    if !what.contains('/') && dm.info(what).is_ok() {
        return Ok(what.to_string());
    }
    if let Some(n) = what.strip_prefix("/dev/mapper/") {
        return Ok(n.to_string());
    }
    if let Ok(m) = std::fs::metadata(p) {
        if m.file_type().is_block_device() {
            use std::os::unix::fs::MetadataExt;
            let rdev = m.rdev();
            for n in dm.qcow2_devices()? {
                let i = dm.info(&n)?;
                if libc::makedev(i.major, i.minor) == rdev {
                    return Ok(n);
                }
            }
            bail!("{what}: not a qcow2 device");
        }
        if m.is_file() {
            let want = p.canonicalize().with_context(|| what.to_string())?;
            for n in dm.qcow2_devices()? {
                let Ok(chain) = chain_names(dm, &n) else { continue };
                if let Some(top) = chain.last() {
                    if Path::new(top) == want {
                        return Ok(n);
                    }
                }
            }
            bail!("{what}: no qcow2 device has it as its top image");
        }
    }
    if what.contains('/') {
        bail!("{what}: no such device or image");
    }
    Ok(what.to_string())
}

/// Number of images from the table line "<nr> v<ver> <clu>".
pub fn nr_images(line: &TableLine) -> Result<usize> {
    line.params
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("unexpected qcow2 table '{}'", line.params))
}

/// The chain's file names, base first (`get_img_name 0..n-1`).
pub fn chain_names(dm: &Dm, name: &str) -> Result<Vec<String>> {
    let nr = nr_images(&dm.qcow2_line(name, true)?)?;
    (0..nr).map(|i| dm.message(name, &format!("get_img_name {i}"))).collect()
}

/// Parses the status line's `key=value` fields.
pub fn parse_status(s: &str) -> BTreeMap<String, String> {
    s.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Reads constructor messages from /dev/kmsg written after [`Kmsg::start`].
pub struct Kmsg {
    f: File,
}

impl Kmsg {
    /// Opens /dev/kmsg at its end (None if it cannot be read).
    pub fn start() -> Option<Kmsg> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/kmsg")
            .ok()?;
        // SAFETY: lseek on a descriptor we own; /dev/kmsg supports SEEK_END.
        unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_END) };
        Some(Kmsg { f })
    }

    /// Messages logged since start (one record per read).
    fn records(mut self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        // Bounded: records written meanwhile could keep us reading forever.
        for _ in 0..10_000 {
            match self.f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let rec = String::from_utf8_lossy(buf.get(..n).unwrap_or(&[])).into_owned();
                    let msg = rec.split_once(';').map_or(rec.as_str(), |(_, m)| m);
                    out.push(msg.lines().next().unwrap_or("").to_string());
                }
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(_) => break,
            }
        }
        out
    }

    /// The last "device-mapper: table: ...: qcow2: <msg>" since start.
    pub fn ctr_message(self) -> Option<String> {
        self.records()
            .into_iter()
            .rev()
            .find(|m| m.contains("device-mapper: table:") && m.contains("qcow2: "))
            .and_then(|m| m.split_once("qcow2: ").map(|(_, r)| r.to_string()))
    }

    /// The last line of the target since start (for a refused resume).
    pub fn last_qcow2_line(self) -> Option<String> {
        self.records().into_iter().rev().find(|m| m.contains("qcow2"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields() {
        let m = parse_status("images=3 wants_check=0 merge=backward depth=1 stage=copying progress=42 clusters=1,2,?");
        assert_eq!(m.get("images").map(String::as_str), Some("3"));
        assert_eq!(m.get("clusters").map(String::as_str), Some("1,2,?"));
        assert_eq!(m.get("stage").map(String::as_str), Some("copying"));
    }

    #[test]
    fn table_nr() {
        let l = TableLine { len: 8, target: TARGET.into(), params: "3 v3 128".into() };
        assert_eq!(nr_images(&l).unwrap(), 3);
    }
}
