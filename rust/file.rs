// SPDX-License-Identifier: GPL-2.0

//! Files handed to a target as file descriptors: synchronous direct I/O
//! into page-aligned buffers, fsync, hole punching. A bio's asynchronous
//! direct I/O is in `direct_io`.
//!
//! C header: [`include/linux/fs.h`](srctree/include/linux/fs.h)

use super::bindings;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use kernel::error::{code::*, to_result, Error, Result};
use kernel::prelude::*;
use kernel::sync::Arc;

/// A reference to a `struct file` (dropped with `fput`).
///
/// Every I/O through it can be made to fail at random (fault injection).
pub(crate) struct File {
    ptr: NonNull<bindings::file>,
    /// Probability, in 1/[`FAULT_SCALE`], that an I/O fails with EIO.
    fault: AtomicU32,
    /// The size no write goes past (`dmq_file_write_limit`), taken at open.
    write_limit: u64,
    /// A private open of the same file for [`File::holds_data`] (its own
    /// `f_pos`, which `SEEK_DATA` moves); one reference, or none where the
    /// file system refused the open.
    probe: Option<NonNull<bindings::file>>,
    /// An fsync of the file failed; shared by every `File` of the same
    /// open (see [`File::fsync`]).
    sync_failed: Arc<AtomicBool>,
}

/// Denominator of fault injection ratios.
pub(crate) const FAULT_SCALE: u32 = 100_000;

// SAFETY: `struct file` is reference counted and its operations may be used
// from any thread.
unsafe impl Send for File {}
// SAFETY: All `&self` methods are thread-safe file operations.
unsafe impl Sync for File {}

/// Alignment of every buffer and offset of our direct I/O (covers any
/// logical block size up to a page).
pub(crate) const DIO_ALIGN: usize = 4096;

/// A zeroed, page-aligned buffer for direct I/O.
pub(crate) struct IoBuf(KVVec<u8>);

impl IoBuf {
    /// Allocates `len` bytes, rounded up to [`DIO_ALIGN`].
    pub(crate) fn new(len: usize) -> Result<Self> {
        let len = len.checked_next_multiple_of(DIO_ALIGN).ok_or(ENOMEM)?;
        let v = KVVec::from_elem(0u8, len, super::gfp_kv())?;
        // kmalloc aligns power-of-two sizes naturally and larger allocations
        // come from the page allocator or vmalloc; refuse anything else.
        if v.as_ptr() as usize % DIO_ALIGN != 0 {
            return Err(ENOMEM);
        }
        Ok(Self(v))
    }
}

impl core::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl core::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl File {
    /// Takes a reference to the file behind `fd` of the current task.
    pub(crate) fn fget(fd: u32) -> Result<Self> {
        // First: nothing to give back if there is no memory.
        let sync_failed = Arc::new(AtomicBool::new(false), GFP_KERNEL)?;
        // SAFETY: `fget` accepts any number and returns a new reference or null.
        let p = unsafe { bindings::fget(fd) };
        let ptr = NonNull::new(p).ok_or(EBADF)?;
        // SAFETY: We hold the reference `fget` returned, in process context
        // (`fget` itself reads the current task's file table).
        let limit = unsafe { bindings::dmq_file_write_limit(ptr.as_ptr()) };
        Ok(Self::from_ptr(
            ptr,
            u64::try_from(limit).unwrap_or(0),
            None,
            sync_failed,
        ))
    }

    /// Opens the private file [`File::holds_data`] seeks on (the same path,
    /// read-only), if the file is a regular one and its file system lets
    /// it; without it every range may hold data. The open runs what any
    /// open of the file runs (a lease break, fsnotify, a FUSE or NFS open):
    /// callers open it for files already found to be images. Process
    /// context.
    pub(crate) fn open_probe(&mut self) {
        if self.probe.is_some() {
            return;
        }
        // SAFETY: The file is valid (our reference); the shim returns a new
        // file of its own (one reference, ours) or null.
        self.probe = NonNull::new(unsafe { bindings::dmq_file_reopen(self.as_raw()) });
    }

    fn from_ptr(
        ptr: NonNull<bindings::file>,
        write_limit: u64,
        probe: Option<NonNull<bindings::file>>,
        sync_failed: Arc<AtomicBool>,
    ) -> Self {
        Self {
            ptr,
            fault: AtomicU32::new(0),
            write_limit,
            probe,
            sync_failed,
        }
    }

    /// Another reference to the same file (fault injection off; a failed
    /// fsync stays failed, see [`File::fsync`]).
    pub(crate) fn try_clone(&self) -> Self {
        // SAFETY: The file is valid; `get_file` takes a new reference, owned by
        // the returned value and dropped with it.
        unsafe { bindings::dmq_get_file(self.as_raw()) };
        if let Some(p) = self.probe {
            // SAFETY: As above, for the probe file (valid while we hold ours).
            unsafe { bindings::dmq_get_file(p.as_ptr()) };
        }
        Self::from_ptr(
            self.ptr,
            self.write_limit,
            self.probe,
            self.sync_failed.clone(),
        )
    }

    pub(super) fn as_raw(&self) -> *mut bindings::file {
        self.ptr.as_ptr()
    }

    /// The size no write goes past, taken at open.
    pub(super) fn write_limit(&self) -> u64 {
        self.write_limit
    }

    /// Makes each I/O fail with EIO with probability `ratio / FAULT_SCALE`.
    pub(crate) fn set_fault_ratio(&self, ratio: u32) -> Result {
        if ratio > FAULT_SCALE {
            return Err(EINVAL);
        }
        self.fault.store(ratio, Ordering::Relaxed);
        Ok(())
    }

    /// The fault injection ratio.
    pub(crate) fn fault_ratio(&self) -> u32 {
        self.fault.load(Ordering::Relaxed)
    }

    /// An injected fault, if one is due.
    pub(super) fn inject(&self) -> Result {
        let ratio = self.fault.load(Ordering::Relaxed);
        if ratio == 0 {
            return Ok(());
        }
        // SAFETY: `get_random_u32` may be called from any context.
        if unsafe { bindings::get_random_u32() } % FAULT_SCALE < ratio {
            return Err(EIO);
        }
        Ok(())
    }

    /// Installs a new file descriptor for the file in the current task
    /// (not close-on-exec: callers pass it on) and returns it.
    pub(crate) fn install_fd(&self) -> Result<u32> {
        // SAFETY: The file is valid; the shim takes the reference the new fd owns.
        let fd = unsafe { bindings::dmq_file_install_fd(self.as_raw()) };
        u32::try_from(fd).map_err(|_| Error::from_errno(fd))
    }

    /// Truncates the file to `len` bytes, or extends it sparsely.
    pub(crate) fn truncate(&self, len: u64) -> Result {
        let len = i64::try_from(len).map_err(|_| EINVAL)?;
        // SAFETY: The file and its path are valid while we hold a reference.
        to_result(unsafe { bindings::dmq_file_truncate(self.as_raw(), len) })
    }

    /// Deallocates `[pos, pos + len)` of the file, keeping its size
    /// (`fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`): the range
    /// then reads as zeroes and takes no space. EOPNOTSUPP where the file
    /// system cannot. Waits for direct I/O in flight to the file.
    pub(crate) fn punch_hole(&self, pos: u64, len: u64) -> Result {
        // include/uapi/linux/falloc.h (user ABI, stable)
        const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
        const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
        let pos = i64::try_from(pos).map_err(|_| EINVAL)?;
        let len = i64::try_from(len).map_err(|_| EINVAL)?;
        pos.checked_add(len).ok_or(EINVAL)?;
        // SAFETY: The file is valid while we hold a reference; `vfs_fallocate`
        // checks the mode, the range and the file's open mode itself.
        to_result(unsafe {
            bindings::vfs_fallocate(
                self.as_raw(),
                FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                pos,
                len,
            )
        })
    }

    /// Opened for reading.
    pub(crate) fn readable(&self) -> bool {
        // SAFETY: The file is valid while we hold a reference.
        unsafe { bindings::dmq_file_readable(self.as_raw()) }
    }

    /// Opened for writing.
    pub(crate) fn writable(&self) -> bool {
        // SAFETY: The file is valid while we hold a reference.
        unsafe { bindings::dmq_file_writable(self.as_raw()) }
    }

    /// The same file as `other`: the same inode, or (stacking file systems)
    /// the same inode underneath. Hard links and two opens of one path are
    /// the same file.
    pub(crate) fn same_file(&self, other: &File) -> bool {
        // SAFETY: Both files are valid while we hold a reference to each; their
        // paths (and so dentries and inodes) are pinned by those references.
        unsafe { bindings::dmq_file_same_inode(self.as_raw(), other.as_raw()) }
    }

    /// Opened with O_APPEND (now: `fcntl` may change it later, which the
    /// I/O here does not follow: it sets its own kiocb flags).
    pub(crate) fn is_append(&self) -> bool {
        // SAFETY: The file is valid while we hold a reference; the shim only
        // reads `f_flags` (READ_ONCE).
        unsafe { bindings::dmq_file_append(self.as_raw()) }
    }

    /// Its file system does direct I/O (FMODE_CAN_ODIRECT). The descriptor's
    /// own O_DIRECT does not matter: every kiocb here sets IOCB_DIRECT.
    pub(crate) fn can_direct_io(&self) -> bool {
        // SAFETY: The file is valid while we hold a reference; `f_mode` is
        // set at open and only read here.
        unsafe { bindings::dmq_file_can_direct_io(self.as_raw()) }
    }

    /// A regular file.
    pub(crate) fn is_regular(&self) -> bool {
        // SAFETY: The file is valid while we hold a reference.
        unsafe { bindings::dmq_file_is_reg(self.as_raw()) }
    }

    /// Whether `[pos, pos + len)` may hold data: false only where the file
    /// system says it is a hole (`SEEK_DATA` finds nothing before its end),
    /// which reads as zeroes. True when it cannot tell (no probe file, an
    /// error, a file system without holes, where every byte is data). For
    /// walks over what an image's tables name, which a sparse file could
    /// otherwise inflate by its apparent size.
    pub(crate) fn holds_data(&self, pos: u64, len: u64) -> bool {
        let (Some(p), Ok(at), Some(end)) = (self.probe, i64::try_from(pos), pos.checked_add(len))
        else {
            return true;
        };
        // SAFETY: The probe file is valid while we hold its reference; the
        // shim seeks under its `f_pos_lock` (callers in any number of
        // threads: a reloaded table shares the probe with the old one).
        let next = unsafe { bindings::dmq_file_seek_data(p.as_ptr(), at) };
        match u64::try_from(next) {
            Ok(d) => d < end,
            // No data at or after `pos`.
            Err(_) => next != i64::from(ENXIO.to_errno()),
        }
    }

    /// Current size in bytes.
    pub(crate) fn size(&self) -> u64 {
        // SAFETY: The file is valid while we hold a reference.
        let s = unsafe { bindings::dmq_file_size(self.as_raw()) };
        u64::try_from(s).unwrap_or(0)
    }

    /// Logical block size of the device under the file system (512 if none).
    pub(crate) fn logical_block_size(&self) -> u32 {
        // SAFETY: The file is valid while we hold a reference.
        unsafe { bindings::dmq_file_logical_block_size(self.as_raw()) }
    }

    /// DMA alignment mask of the device under the file system (511 if none).
    pub(crate) fn dma_alignment(&self) -> u32 {
        // SAFETY: The file is valid while we hold a reference.
        unsafe { bindings::dmq_file_dma_alignment(self.as_raw()) }
    }

    /// Fills `buf` from `pos`, synchronously. What lies past the end of the
    /// file reads as zeroes; a short read before it is an error. `buf` and
    /// `pos` must suit direct I/O.
    pub(crate) fn read_full(&self, buf: &mut [u8], pos: u64) -> Result {
        self.inject()?;
        self.read_full_no_fault(buf, pos)
    }

    /// [`File::read_full`] without fault injection (for a caller that
    /// injected already, so that a fault is not drawn twice).
    pub(super) fn read_full_no_fault(&self, buf: &mut [u8], pos: u64) -> Result {
        let got = self.read_at_no_fault(buf, pos)?;
        if got < buf.len() {
            if pos.saturating_add(got as u64) < self.size() {
                return Err(EIO);
            }
            buf.get_mut(got..).unwrap_or(&mut []).fill(0);
        }
        Ok(())
    }

    /// Reads into `buf` at `pos`, synchronously. Returns the bytes read
    /// (short at end of file). `buf` and `pos` must suit direct I/O.
    pub(crate) fn read_at(&self, buf: &mut [u8], pos: u64) -> Result<usize> {
        self.inject()?;
        self.read_at_no_fault(buf, pos)
    }

    fn read_at_no_fault(&self, buf: &mut [u8], pos: u64) -> Result<usize> {
        let pos = i64::try_from(pos).map_err(|_| EINVAL)?;
        // SAFETY: The file is valid and `buf` is writable for its length; the
        // shim reads into it synchronously (done when the call returns).
        let r = unsafe {
            bindings::dmq_file_rw_sync(
                self.as_raw(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                pos,
                false,
            )
        };
        if r < 0 {
            return Err(Error::from_errno(r as i32));
        }
        Ok((r as usize).min(buf.len()))
    }

    /// Writes all of `buf` at `pos`, synchronously. `buf` and `pos` must
    /// suit direct I/O.
    pub(crate) fn write_full(&self, buf: &[u8], pos: u64) -> Result {
        self.inject()?;
        self.write_full_no_fault(buf, pos)
    }

    /// [`File::write_full`] without fault injection (see
    /// [`File::read_full_no_fault`]).
    pub(super) fn write_full_no_fault(&self, buf: &[u8], pos: u64) -> Result {
        let mut ipos = i64::try_from(pos).map_err(|_| EINVAL)?;
        let mut rest = buf;
        while !rest.is_empty() {
            // SAFETY: The file is valid and `rest` is readable for its length;
            // the shim only reads it (`ITER_SOURCE`), synchronously. The
            // buffer is not written through the `*mut` the C prototype takes.
            let r = unsafe {
                bindings::dmq_file_rw_sync(
                    self.as_raw(),
                    rest.as_ptr().cast_mut().cast(),
                    rest.len(),
                    ipos,
                    true,
                )
            };
            if r < 0 {
                return Err(Error::from_errno(r as i32));
            }
            // A short write is retried so that its cause (e.g. ENOSPC) is
            // what the caller sees.
            rest = match rest.get(r as usize..) {
                Some(t) if r > 0 => t,
                _ => return Err(EIO),
            };
            ipos = ipos.checked_add(r as i64).ok_or(EIO)?;
        }
        Ok(())
    }

    /// Flushes the file's data, and the metadata needed to read it back (its
    /// size, its blocks' allocation), to stable storage: `fdatasync`, as
    /// QEMU flushes an image (`qemu_fdatasync`). The timestamps a direct
    /// write changes are left out: with them, nearly every fsync of a file
    /// written in place cost the host file system a journal commit.
    ///
    /// Once an fsync failed, every later one fails with EIO: what was
    /// written before the failure may be lost (a disk that dropped its
    /// cache, a host file system that dropped the pages) without any later
    /// fsync saying so, and nothing may be made durable on top of it as if
    /// it were there (a mapping over data that is not). Out of memory is
    /// not such a failure: nothing was flushed, or dropped.
    pub(crate) fn fsync(&self) -> Result {
        if self.sync_failed() {
            return Err(EIO);
        }
        let res = self.inject().and_then(|()| {
            // SAFETY: The file is valid while we hold a reference.
            to_result(unsafe { bindings::vfs_fsync(self.as_raw(), 1) })
        });
        if res.is_err_and(|e| e != ENOMEM) {
            self.sync_failed.store(true, Ordering::Release);
        }
        res
    }

    /// Whether an fsync of the file failed (see [`File::fsync`]).
    pub(crate) fn sync_failed(&self) -> bool {
        self.sync_failed.load(Ordering::Acquire)
    }

    /// Writes `path` of the file into `buf` and returns it (`d_path`).
    pub(crate) fn path<'a>(&self, buf: &'a mut [u8]) -> Result<&'a [u8]> {
        let len = i32::try_from(buf.len()).map_err(|_| EINVAL)?;
        // SAFETY: The file and its `f_path` are valid while we hold a reference;
        // `buf` is writable for `len` bytes.
        let p = unsafe {
            bindings::d_path(
                &raw const (*self.as_raw()).f_path,
                buf.as_mut_ptr().cast(),
                len,
            )
        };
        let p = kernel::error::from_err_ptr(p)?;
        let start = (p as usize)
            .checked_sub(buf.as_ptr() as usize)
            .ok_or(EINVAL)?;
        let tail = buf.get(start..).ok_or(EINVAL)?;
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        Ok(&tail[..end])
    }
}

impl Drop for File {
    fn drop(&mut self) {
        // SAFETY: We own one reference, given up here.
        unsafe { bindings::fput(self.as_raw()) };
        if let Some(p) = self.probe {
            // SAFETY: As above, for the probe file.
            unsafe { bindings::fput(p.as_ptr()) };
        }
    }
}
