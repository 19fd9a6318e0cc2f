// SPDX-License-Identifier: GPL-2.0

//! Safe abstractions dm-qcow2 needs that the kernel crate (6.12) lacks:
//! device-mapper targets, owned bios, files from fds with direct I/O, a
//! workqueue of our own and raw-deflate decompression.
//!
//! All `unsafe` of the module lives here; `drivers/` builds on these types.

pub(crate) mod batch_io;
pub(crate) mod bindings;
pub(crate) mod bio;
pub(crate) mod direct_io;
pub(crate) mod dm;
pub(crate) mod eventfd;
pub(crate) mod file;
pub(crate) mod inflight;
pub(crate) mod param;
pub(crate) mod task;
pub(crate) mod wq;
pub(crate) mod zlib;

use kernel::alloc::{flags, Flags};

/// Flags for the large, vmalloc-backed (`KVVec`) buffers and tables whose
/// failure the caller handles (the bio, constructor or merge fails with
/// `ENOMEM`, or a fallback takes over): without vmalloc's stack dump,
/// which under memory pressure (or fault injection, `qcow2_faults.sh`)
/// would read as a warning of ours.
#[inline]
pub(crate) fn gfp_kv() -> Flags {
    flags::GFP_KERNEL | flags::__GFP_NOWARN
}
