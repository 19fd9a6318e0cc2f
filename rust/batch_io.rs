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
    /// Set by [`read_batch`].
    pub(crate) res: Result,
}

impl<'a> ReadAt<'a> {
    pub(crate) fn new(file: &'a File, buf: &'a mut [u8], pos: u64) -> Self {
        Self {
            file,
            buf,
            pos,
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
    /// Set by [`write_batch`].
    pub(crate) res: Result,
}

impl<'a> WriteAt<'a> {
    pub(crate) fn new(file: &'a File, buf: &'a [u8], pos: u64) -> Self {
        Self {
            file,
            buf,
            pos,
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
    let raw = run(
        reqs.iter_mut()
            .filter(|r| r.res.is_ok())
            .map(|r| (r.file, r.buf.as_mut_ptr(), r.buf.len(), r.pos)),
        false,
    );
    let Ok(raw) = raw else {
        // No memory for the batch: one after the other.
        for r in reqs.iter_mut().filter(|r| r.res.is_ok()) {
            r.res = r.file.read_full(r.buf, r.pos);
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
    let raw = run(
        reqs.iter()
            .filter(|r| r.res.is_ok())
            // Only read through the `*mut` (a write's source, `ITER_SOURCE`).
            .map(|r| (r.file, r.buf.as_ptr().cast_mut(), r.buf.len(), r.pos)),
        true,
    );
    let Ok(raw) = raw else {
        for r in reqs.iter_mut().filter(|r| r.res.is_ok()) {
            r.res = r.file.write_full(r.buf, r.pos);
        }
        return;
    };
    for (r, done) in reqs.iter_mut().filter(|r| r.res.is_ok()).zip(raw.iter()) {
        r.res = match usize::try_from(done.ret) {
            Err(_) => Err(Error::from_errno(done.ret as i32)),
            Ok(n) if n >= r.buf.len() => Ok(()),
            // Short: the rest synchronously, so that its cause (e.g. ENOSPC)
            // is what the caller sees.
            Ok(n) => match (r.buf.get(n..), r.pos.checked_add(n as u64)) {
                (Some(rest), Some(pos)) if n > 0 => r.file.write_full(rest, pos),
                _ => Err(EIO),
            },
        };
    }
}

/// Starts and waits for the transfers `(file, buf, len, pos)`; their results,
/// in order.
fn run<'a>(
    transfers: impl Iterator<Item = (&'a File, *mut u8, usize, u64)>,
    write: bool,
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
    if raw.is_empty() {
        return Ok(raw);
    }
    let n = u32::try_from(raw.len()).map_err(|_| EINVAL)?;
    // SAFETY: Every entry names a file the caller holds a reference to (it
    // borrows the `File`) and a buffer valid for `len` bytes for the whole
    // call, writable for reads (the caller's `&mut [u8]`, distinct from every
    // other entry's) and only read for writes. The shim returns only after
    // every transfer it started has completed, so none of them touches a
    // buffer after the borrows end.
    let r = unsafe { bindings::dmq_file_rw_many(raw.as_mut_ptr(), n, write) };
    if r != 0 {
        return Err(Error::from_errno(r));
    }
    Ok(raw)
}
