// SPDX-License-Identifier: GPL-2.0

//! Module parameters (declared in the C shim: 6.12's `module!` has none).

use super::bindings;

/// `kernel_sets_dirty_bit`: set the qcow2 dirty bit on resume, clear it on
/// suspend.
pub(crate) fn kernel_sets_dirty_bit() -> bool {
    // SAFETY: Reads a bool the module owns (READ_ONCE in the shim).
    unsafe { bindings::dmq_kernel_sets_dirty_bit() }
}

/// `enospc_retry_ms`: time between retries of writes parked on ENOSPC, in
/// milliseconds (clamped to 100..600000).
pub(crate) fn enospc_retry_ms() -> u32 {
    // SAFETY: Reads an unsigned int the module owns (READ_ONCE in the shim).
    let ms = unsafe { bindings::dmq_enospc_retry_ms() };
    ms.clamp(100, 600_000)
}

/// `md_cache_pages`: metadata pages cached per image (at least 16).
pub(crate) fn md_cache_pages() -> usize {
    // SAFETY: Reads an unsigned int the module owns (READ_ONCE in the shim).
    let n = unsafe { bindings::dmq_md_cache_pages() };
    (n as usize).max(16)
}
