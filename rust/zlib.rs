// SPDX-License-Identifier: GPL-2.0

//! Raw-deflate decompression with the kernel's zlib.
//!
//! C header: [`include/linux/zlib.h`](srctree/include/linux/zlib.h)

use super::bindings;
use kernel::error::{code::*, Result};
use kernel::prelude::*;

/// A reusable raw-deflate (no zlib header) decompressor.
pub(crate) struct Inflater {
    strm: KBox<bindings::z_stream>,
    _workspace: KVVec<u8>,
}

// SAFETY: The stream and its workspace are plain memory owned by `self`; all
// use goes through `&mut self`.
unsafe impl Send for Inflater {}

impl Inflater {
    /// Allocates a decompressor and its workspace.
    pub(crate) fn new() -> Result<Self> {
        // SAFETY: A pure size query.
        let ws = unsafe { bindings::zlib_inflate_workspacesize() };
        let ws = usize::try_from(ws).map_err(|_| EINVAL)?;
        let mut workspace = KVVec::from_elem(0u8, ws, super::gfp_kv())?;
        // SAFETY: All-zeroes is a valid `z_stream` (a plain C struct).
        let mut strm: KBox<bindings::z_stream> =
            KBox::new(unsafe { core::mem::zeroed() }, GFP_KERNEL)?;
        strm.workspace = workspace.as_mut_ptr().cast();
        Ok(Self {
            strm,
            _workspace: workspace,
        })
    }

    /// Inflates raw deflate data `src` into `dst`, which it must fill
    /// completely (a qcow2 compressed cluster always inflates to a full
    /// cluster; trailing input is ignored, as QEMU does).
    pub(crate) fn inflate_raw(&mut self, src: &[u8], dst: &mut [u8]) -> Result {
        let s = &mut *self.strm;
        s.next_in = src.as_ptr();
        s.avail_in = src.len();
        s.next_out = dst.as_mut_ptr();
        s.avail_out = dst.len();
        // SAFETY: The stream has its workspace; negative window bits select raw
        // deflate. `next_in`/`next_out` point to buffers valid for the call.
        let r = unsafe { bindings::zlib_inflateInit2(s, -(bindings::MAX_WBITS as i32)) };
        if r != bindings::Z_OK as i32 {
            return Err(EIO);
        }
        // SAFETY: As above; the buffers outlive the call.
        let r = unsafe { bindings::zlib_inflate(s, bindings::Z_FINISH as i32) };
        let full = s.avail_out == 0;
        // SAFETY: The stream was initialised above.
        unsafe { bindings::zlib_inflateEnd(s) };
        s.next_in = core::ptr::null();
        s.next_out = core::ptr::null_mut();
        match r {
            x if x == bindings::Z_STREAM_END as i32 && full => Ok(()),
            x if x == bindings::Z_BUF_ERROR && full => Ok(()),
            x if x == bindings::Z_OK as i32 && full => Ok(()),
            _ => Err(EIO),
        }
    }
}
