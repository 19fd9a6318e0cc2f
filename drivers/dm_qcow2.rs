// SPDX-License-Identifier: GPL-2.0

//! dm-qcow2: a device-mapper target exposing a chain of qcow2 images.
//!
//! Table line: `0 <len_sectors> qcow2 <fd_base> ... <fd_top>`. The target is
//! bio-based: `map` queues bios, a work item of the table's own workqueue
//! resolves them through the chain's metadata and starts direct I/O on the
//! image files, and the bio completes when its last piece does. See
//! Documentation/admin-guide/device-mapper/dm-qcow2.rst.

// pin_init! of the table state (many fields) needs more than the default.
#![recursion_limit = "512"]

use kernel::prelude::*;

// The safe abstractions the kernel crate lacks (rust/; all unsafe code is there).
mod count;
mod hot;
mod io;
#[path = "../rust/mod.rs"]
mod kernel_abstractions;
mod merge;
mod meta;
pub mod qcow2_format;
mod target;

module! {
    type: DmQcow2,
    name: "dm_qcow2",
    author: "dm-qcow2 developers",
    description: "qcow2 image chain target for device-mapper (Rust)",
    license: "GPL",
}

struct DmQcow2 {
    _reg: kernel_abstractions::dm::Registration<target::Qcow2>,
}

/// The registered target type's memory (see `TargetTypeSlot`).
static TARGET_TYPE: kernel_abstractions::dm::TargetTypeSlot =
    kernel_abstractions::dm::TargetTypeSlot::new();

impl kernel::Module for DmQcow2 {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let reg = kernel_abstractions::dm::Registration::new(&TARGET_TYPE)?;
        pr_info!("dm-qcow2 (Rust) registered\n");
        Ok(Self { _reg: reg })
    }
}
