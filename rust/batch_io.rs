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
    for r in reqs.iter_mut() {
        r.res = r.file.inject();
    }
    let raw = requests(
        reqs.iter_mut()
            .filter(|r| r.res.is_ok())
            .map(|r| (r.file, r.buf.as_mut_ptr(), r.buf.len(), r.pos)),
    );
    // SAFETY: Every request is one of `reqs`, whose buffers are borrowed
    // (uniquely: `&mut [u8]`) for this whole call: writable, valid for their
    // length, distinct from each other; their files are borrowed too.
    let raw = raw.and_then(|mut raw| unsafe { run(&mut raw, false) }.map(|()| raw));
    let Ok(raw) = raw else {
        // No memory for the batch: one after the other.
        for r in reqs.iter_mut().filter(|r| r.res.is_ok()) {
            r.res = r.file.read_full_no_fault(r.buf, r.pos);
        }
        return;
    };
    for (r, done) in reqs.iter_mut().filter(|r| r.res.is_ok()).zip(raw.iter()) {
        r.res = match usize::try_from(done.ret) {
            Err(_) => Err(Error::from_errno(done.ret as i32)),
            Ok(n) if n >= r.buf.len() => Ok(()),
            // Short at the end of the file: the rest reads as zeroes.
            Ok(n) if r.pos.saturating_add(n as u64) >= r.file.size() => {
                r.buf.get_mut(n..).unwrap_or(&mut []).fill(0);
                Ok(())
            }
            Ok(_) => Err(EIO),
        };
    }
}

/// Writes every one of `reqs`, all in flight at once; each one's result is
/// in its `res` when this returns. Buffers and offsets must suit direct I/O.
pub(crate) fn write_batch(reqs: &mut [WriteAt<'_>]) {
    for r in reqs.iter_mut() {
        r.res = r.file.inject();
    }
    let raw = requests(
        reqs.iter()
            .filter(|r| r.res.is_ok())
            // Only read through the `*mut` (a write's source, `ITER_SOURCE`).
            .map(|r| (r.file, r.buf.as_ptr().cast_mut(), r.buf.len(), r.pos)),
    );
    // SAFETY: Every request is one of `reqs`, whose buffers are borrowed for
    // this whole call and valid for their length; a write only reads them.
    let raw = raw.and_then(|mut raw| unsafe { run(&mut raw, true) }.map(|()| raw));
    let Ok(raw) = raw else {
        for r in reqs.iter_mut().filter(|r| r.res.is_ok()) {
            r.res = r.file.write_full_no_fault(r.buf, r.pos);
        }
        return;
    };
    for (r, done) in reqs.iter_mut().filter(|r| r.res.is_ok()).zip(raw.iter()) {
        r.res = match usize::try_from(done.ret) {
            Err(_) => Err(Error::from_errno(done.ret as i32)),
            Ok(n) if n >= r.buf.len() => Ok(()),
            // Short: the rest synchronously, so that its cause (e.g. ENOSPC)
            // is what the caller sees. (A count that is not a multiple of
            // the block size would make that direct write fail with EINVAL:
            // an error, never a wrong success.)
            Ok(n) => match (r.buf.get(n..), r.pos.checked_add(n as u64)) {
                (Some(rest), Some(pos)) if n > 0 => r.file.write_full_no_fault(rest, pos),
                _ => Err(EIO),
            },
        };
    }
}

/// The shim's requests for the transfers `(file, buf, len, pos)`.
fn requests<'a>(
    transfers: impl Iterator<Item = (&'a File, *mut u8, usize, u64)>,
) -> Result<KVec<bindings::dmq_rw_req>> {
    let mut raw = KVec::new();
    for (file, buf, len, pos) in transfers {
        raw.push(
            bindings::dmq_rw_req {
                file: file.as_raw(),
                buf: buf.cast(),
                len,
                // Out of range: refused by the shim (EINVAL) for this one.
                pos: i64::try_from(pos).unwrap_or(-1),
                ret: 0,
            },
            GFP_KERNEL,
        )?;
    }
    Ok(raw)
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
