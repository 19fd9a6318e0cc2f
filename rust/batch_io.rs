// SPDX-License-Identifier: GPL-2.0

//! Direct I/O of several buffers at once: every transfer is started
//! asynchronously and the call returns when all are done (for a worker that
//! has several independent transfers to make and nothing to do until they
//! land, such as a batch of copy-on-write fills).
//!
//! Sound for the same reason a synchronous read is: the buffers are borrowed
//! for the whole call, and the call does not return before the last
//! completion has run (also when a transfer fails or was never started).
//!
//! C header: [`include/linux/fs.h`](srctree/include/linux/fs.h)

use super::bindings;
use super::file::File;
use kernel::error::{code::*, Error, Result};
use kernel::prelude::*;

/// One read of [`read_batch`]: `buf` filled from `file` at `pos`, as
/// [`File::read_full`] does (zeroes past the end of the file).
pub(crate) struct ReadAt<'a> {
    pub(crate) file: &'a File,
    pub(crate) buf: &'a mut [u8],
    pub(crate) pos: u64,
    /// The caller's (which of its jobs the read is for); left as it is.
    pub(crate) tag: usize,
    /// Set by [`read_batch`].
    pub(crate) res: Result,
}

impl<'a> ReadAt<'a> {
    pub(crate) fn new(file: &'a File, buf: &'a mut [u8], pos: u64, tag: usize) -> Self {
        Self {
            file,
            buf,
            pos,
            tag,
            res: Ok(()),
        }
    }
}

/// One write of [`write_batch`]: all of `buf` to `file` at `pos`, as
/// [`File::write_full`] does.
pub(crate) struct WriteAt<'a> {
    pub(crate) file: &'a File,
    pub(crate) buf: &'a [u8],
    pub(crate) pos: u64,
    /// The caller's, as [`ReadAt::tag`].
    pub(crate) tag: usize,
    /// Set by [`write_batch`].
    pub(crate) res: Result,
}

impl<'a> WriteAt<'a> {
    pub(crate) fn new(file: &'a File, buf: &'a [u8], pos: u64, tag: usize) -> Self {
        Self {
            file,
            buf,
            pos,
            tag,
            res: Ok(()),
        }
    }
}

/// Reads every one of `reqs`, all in flight at once; each one's result is
/// in its `res` when this returns. Buffers and offsets must suit direct I/O.
pub(crate) fn read_batch(reqs: &mut [ReadAt<'_>]) {
    batch(reqs);
}

/// Writes every one of `reqs`, all in flight at once; each one's result is
/// in its `res` when this returns. Buffers and offsets must suit direct I/O.
pub(crate) fn write_batch(reqs: &mut [WriteAt<'_>]) {
    batch(reqs);
}

/// One transfer of a batch: what [`ReadAt`] and [`WriteAt`] have in common.
///
/// # Safety
///
/// `raw` must return a buffer valid for its length for as long as the
/// transfer is borrowed, writable and not aliased for a read (`WRITE`
/// false), and the file must be the transfer's own (borrowed as long).
unsafe trait Transfer {
    const WRITE: bool;
    fn file(&self) -> &File;
    fn res(&mut self) -> &mut Result;
    fn is_ok(&self) -> bool;
    /// The buffer (pointer, length) and the file position.
    fn raw(&mut self) -> (*mut u8, usize, u64);
    /// Done alone, synchronously (no memory for the batch).
    fn alone(&mut self) -> Result;
    /// The result, given the shim's count of bytes done.
    fn finish(&mut self, done: usize) -> Result;
}

// SAFETY: The buffer is the `&mut [u8]` the read borrows, the file its own.
unsafe impl Transfer for ReadAt<'_> {
    const WRITE: bool = false;
    fn file(&self) -> &File {
        self.file
    }
    fn res(&mut self) -> &mut Result {
        &mut self.res
    }
    fn is_ok(&self) -> bool {
        self.res.is_ok()
    }
    fn raw(&mut self) -> (*mut u8, usize, u64) {
        (self.buf.as_mut_ptr(), self.buf.len(), self.pos)
    }
    fn alone(&mut self) -> Result {
        self.file.read_full_no_fault(self.buf, self.pos)
    }
    fn finish(&mut self, n: usize) -> Result {
        if n >= self.buf.len() {
            return Ok(());
        }
        // Short at the end of the file: the rest reads as zeroes.
        if self.pos.saturating_add(n as u64) < self.file.size() {
            return Err(EIO);
        }
        self.buf.get_mut(n..).unwrap_or(&mut []).fill(0);
        Ok(())
    }
}

// SAFETY: The buffer is the `&[u8]` the write borrows (only read through the
// `*mut`: a write's source, `ITER_SOURCE`), the file its own.
unsafe impl Transfer for WriteAt<'_> {
    const WRITE: bool = true;
    fn file(&self) -> &File {
        self.file
    }
    fn res(&mut self) -> &mut Result {
        &mut self.res
    }
    fn is_ok(&self) -> bool {
        self.res.is_ok()
    }
    fn raw(&mut self) -> (*mut u8, usize, u64) {
        (self.buf.as_ptr().cast_mut(), self.buf.len(), self.pos)
    }
    fn alone(&mut self) -> Result {
        self.file.write_full_no_fault(self.buf, self.pos)
    }
    fn finish(&mut self, n: usize) -> Result {
        if n >= self.buf.len() {
            return Ok(());
        }
        // Short: the rest synchronously, so that its cause (e.g. ENOSPC) is
        // what the caller sees. (A count that is not a multiple of the block
        // size would make that direct write fail with EINVAL: an error,
        // never a wrong success.)
        match (self.buf.get(n..), self.pos.checked_add(n as u64)) {
            (Some(rest), Some(pos)) if n > 0 => self.file.write_full_no_fault(rest, pos),
            _ => Err(EIO),
        }
    }
}

/// Runs every one of `reqs` in flight at once (or, without memory for the
/// batch, one after the other); each one's result in its `res`.
fn batch<T: Transfer>(reqs: &mut [T]) {
    for r in reqs.iter_mut() {
        *r.res() = r.file().inject();
    }
    let mut raw = KVec::new();
    for r in reqs.iter_mut() {
        if !r.is_ok() {
            continue;
        }
        let (buf, len, pos) = r.raw();
        let req = bindings::dmq_rw_req {
            file: r.file().as_raw(),
            buf: buf.cast(),
            len,
            // Out of range: refused by the shim (EINVAL) for this one.
            pos: i64::try_from(pos).unwrap_or(-1),
            ret: 0,
        };
        if raw.push(req, GFP_KERNEL).is_err() {
            raw = KVec::new();
            break;
        }
    }
    let started = reqs.iter().filter(|r| r.is_ok()).count();
    // SAFETY: Every request is one of `reqs` (`Transfer::raw`), all
    // borrowed for this whole call: buffers valid for their length,
    // writable and distinct for reads; files held.
    let ran = raw.len() == started && unsafe { run(&mut raw, T::WRITE) }.is_ok();
    if !ran {
        // No memory for the batch: one after the other.
        for r in reqs.iter_mut().filter(|r| r.is_ok()) {
            *r.res() = r.alone();
        }
        return;
    }
    for (r, done) in reqs.iter_mut().filter(|r| r.is_ok()).zip(raw.iter()) {
        *r.res() = match usize::try_from(done.ret) {
            Err(_) => Err(Error::from_errno(done.ret as i32)),
            Ok(n) => r.finish(n),
        };
    }
}

/// Starts the transfers of `raw` and waits for them all; each one's result
/// is in its `ret`. Returns ENOMEM, having started none, if the shim has no
/// memory for its bookkeeping.
///
/// # Safety
///
/// Every entry's `file` must be a file the caller holds a reference to for
/// the whole call, and its `buf` valid for `len` bytes for the whole call:
/// writable and not aliased by any other entry or reference for reads
/// (`write` false), readable for writes.
unsafe fn run(raw: &mut [bindings::dmq_rw_req], write: bool) -> Result {
    if raw.is_empty() {
        return Ok(());
    }
    let n = u32::try_from(raw.len()).map_err(|_| EINVAL)?;
    // SAFETY: The entries are as this function's contract requires, and the
    // shim returns only after every transfer it started has completed, so
    // none of them touches a buffer after this call.
    let r = unsafe { bindings::dmq_file_rw_many(raw.as_mut_ptr(), n, write) };
    if r != 0 {
        return Err(Error::from_errno(r));
    }
    Ok(())
}
