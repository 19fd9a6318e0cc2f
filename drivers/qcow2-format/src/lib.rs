// SPDX-License-Identifier: GPL-2.0

//! Host build of the dm-qcow2 format logic (`drivers/qcow2_format.rs`), so
//! that `cargo test` and fuzzers can exercise the exact kernel source.

#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

#[path = "../../qcow2_format.rs"]
mod format;

pub use format::*;
