// SPDX-License-Identifier: GPL-2.0

//! Files handed to a target as file descriptors, with direct I/O.
//!
//! C header: [`include/linux/fs.h`](srctree/include/linux/fs.h)

use super::bindings;
use super::bio::Bio;
use core::ptr::NonNull;
use kernel::error::{code::*, to_result, Error, Result};
use kernel::prelude::*;

/// A reference to a `struct file` (dropped with `fput`).
pub(crate) struct File(NonNull<bindings::file>);

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
        let v = KVVec::from_elem(0u8, len, GFP_KERNEL)?;
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
        // SAFETY: `fget` accepts any number and returns a new reference or null.
        let p = unsafe { bindings::fget(fd) };
        NonNull::new(p).map(Self).ok_or(EBADF)
    }

    fn as_raw(&self) -> *mut bindings::file {
        self.0.as_ptr()
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

    /// Opened with O_DIRECT.
    pub(crate) fn is_direct(&self) -> bool {
        // SAFETY: The file is valid; `f_flags` is only read.
        let flags = unsafe { core::ptr::read_volatile(&raw const (*self.as_raw()).f_flags) };
        flags & bindings::O_DIRECT != 0
    }

    /// A regular file.
    pub(crate) fn is_regular(&self) -> bool {
        // SAFETY: The file is valid while we hold a reference.
        unsafe { bindings::dmq_file_is_reg(self.as_raw()) }
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

    /// Block size of the file system.
    pub(crate) fn fs_block_size(&self) -> u32 {
        // SAFETY: The file is valid while we hold a reference.
        unsafe { bindings::dmq_file_fs_block_size(self.as_raw()) }
    }

    /// Reads into `buf` at `pos`, synchronously. Returns the bytes read
    /// (short at end of file). `buf` and `pos` must suit direct I/O.
    pub(crate) fn read_at(&self, buf: &mut [u8], pos: u64) -> Result<usize> {
        let mut pos = i64::try_from(pos).map_err(|_| EINVAL)?;
        // SAFETY: The file is valid and `buf` is writable for its length.
        let r = unsafe { bindings::kernel_read(self.as_raw(), buf.as_mut_ptr().cast(), buf.len(), &mut pos) };
        if r < 0 {
            return Err(Error::from_errno(r as i32));
        }
        Ok(r as usize)
    }

    /// Flushes the file's data and metadata to stable storage.
    pub(crate) fn fsync(&self) -> Result {
        // SAFETY: The file is valid while we hold a reference.
        to_result(unsafe { bindings::vfs_fsync(self.as_raw(), 0) })
    }

    /// Writes `path` of the file into `buf` and returns it (`d_path`).
    pub(crate) fn path<'a>(&self, buf: &'a mut [u8]) -> Result<&'a [u8]> {
        let len = i32::try_from(buf.len()).map_err(|_| EINVAL)?;
        // SAFETY: The file and its `f_path` are valid while we hold a reference;
        // `buf` is writable for `len` bytes.
        let p = unsafe { bindings::d_path(&raw const (*self.as_raw()).f_path, buf.as_mut_ptr().cast(), len) };
        let p = kernel::error::from_err_ptr(p)?;
        let start = (p as usize).checked_sub(buf.as_ptr() as usize).ok_or(EINVAL)?;
        let tail = buf.get(start..).ok_or(EINVAL)?;
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        Ok(&tail[..end])
    }

    /// Starts direct I/O between bytes `[off, off + len)` of `bio` and the
    /// file at `pos`, ending `bio` (one reference) with the result. Reads that
    /// hit the end of the file are completed with zeroes, as for a hole.
    pub(crate) fn submit_bio_io(&self, bio: Bio, off: u32, len: u32, pos: u64, write: bool) {
        let Ok(ipos) = i64::try_from(pos) else {
            return bio.end(Err(EINVAL));
        };
        let io = match KBox::new(
            BioIo {
                // SAFETY: All-zeroes is a valid `kiocb` (a plain C struct); the shim
                // initialises it before use.
                iocb: unsafe { core::mem::zeroed() },
                bio,
                off,
                len,
                write,
            },
            GFP_KERNEL,
        ) {
            Ok(io) => io,
            Err(_) => return,
        };
        let io = KBox::into_raw(io);
        // SAFETY: `io` is a valid leaked box; `iocb` is its first field (repr(C)),
        // so the completion can find the box again. The bio range is checked by
        // the shim. The box stays alive until `bio_io_done` reclaims it.
        let r = unsafe {
            bindings::dmq_file_rw_bio(
                &raw mut (*io).iocb,
                self.as_raw(),
                (*io).bio.as_raw(),
                off,
                len,
                ipos,
                write,
                Some(bio_io_done),
            )
        };
        if r != -(bindings::EIOCBQUEUED as isize) {
            // SAFETY: The I/O did not queue, so the completion will not run and
            // we still own `io`.
            unsafe { bio_io_done(&raw mut (*io).iocb, r as _) };
        }
    }
}

impl Drop for File {
    fn drop(&mut self) {
        // SAFETY: We own one reference, given up here.
        unsafe { bindings::fput(self.as_raw()) };
    }
}

#[repr(C)]
struct BioIo {
    iocb: bindings::kiocb,
    bio: Bio,
    off: u32,
    len: u32,
    write: bool,
}

/// # Safety
///
/// `iocb` must be the `iocb` of a `BioIo` leaked by `submit_bio_io`, once.
unsafe extern "C" fn bio_io_done(iocb: *mut bindings::kiocb, ret: kernel::ffi::c_long) {
    // SAFETY: `iocb` is the first field of a `BioIo` leaked by `submit_bio_io`,
    // and each I/O completes once.
    let io = unsafe { KBox::from_raw(iocb.cast::<BioIo>()) };
    let mut io = KBox::into_inner(io);
    if io.write {
        // SAFETY: The shim started a write on this kiocb; end it once.
        unsafe { bindings::dmq_kiocb_end_write(&mut io.iocb) };
    }
    let res = if ret < 0 {
        Err(Error::from_errno(ret as i32))
    } else if ret as u64 >= u64::from(io.len) {
        Ok(())
    } else if io.write {
        Err(EIO)
    } else {
        // Short read: past the end of the file reads as zeroes.
        let got = ret as u32;
        io.bio.zero(io.off + got, io.len - got)
    };
    io.bio.end(res);
}
