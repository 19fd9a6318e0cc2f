// SPDX-License-Identifier: GPL-2.0

//! Helpers of the host tests: scratch directories and qemu-img.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::image::{self, CreateOpts};

/// A scratch directory removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "dm-qcow2-test-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }

    pub fn path(&self, n: &str) -> PathBuf {
        self.0.join(n)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A 64k-cluster image of `size` bytes naming `backing` (not checked).
pub fn mk(p: &Path, size: u64, backing: Option<&str>) {
    let o = CreateOpts {
        size,
        cluster_size: 65536,
        extended_l2: false,
        backing: backing.map(str::to_string),
    };
    image::create(p, &o).unwrap();
}

/// qemu-img, or None (test skipped) when it is missing outside CI; in CI
/// (CI=true) a missing qemu-img fails the test.
pub fn qemu_img() -> Option<&'static str> {
    let ok = Command::new("qemu-img").arg("--version").output().is_ok_and(|o| o.status.success());
    if ok {
        return Some("qemu-img");
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("qemu-img is missing and CI=true: install qemu-utils");
    }
    eprintln!("SKIP: qemu-img not found");
    None
}

/// Runs qemu-img; panics with its output if it fails; returns stdout.
pub fn run_qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
