// SPDX-License-Identifier: GPL-2.0

//! `dm-qcow2`: map, snapshot and merge qcow2 chains with the dm-qcow2
//! device-mapper target, without hand-made dmsetup lines.
//!
//! Exit status: 0 success, 1 error (one line on stderr: `dm-qcow2: <what>:
//! <why>`), 2 usage error.

mod chain;
mod device;
mod dm;
mod image;
mod merge;
#[cfg(test)]
mod testutil;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};

use crate::dm::Dm;

const AFTER_HELP: &str = "\
Exit status: 0 success, 1 error, 2 usage error.
Needs CAP_SYS_ADMIN for everything but create.";

/// Map qcow2 image chains as block devices with the dm-qcow2 target.
#[derive(Debug, Parser)]
#[command(name = "dm-qcow2", version, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Map an image and its backing chain as /dev/mapper/NAME.
    ///
    /// The chain is followed from the images' headers (relative backing
    /// names are relative to the image naming them, as in QEMU), or given
    /// with --chain BASE ... TOP. The top is opened read-write unless
    /// --read-only, the others read-only, all with O_DIRECT.
    Connect {
        /// Device name (default: the top's file name without extension).
        #[arg(long, short = 'n')]
        name: Option<String>,
        /// Map read-only (the top is opened read-only too).
        #[arg(long, short = 'r')]
        read_only: bool,
        /// What to do with discards: unmap (the target frees clusters).
        #[arg(long, value_enum, default_value = "unmap")]
        discard: device::Discard,
        /// The images are the whole chain, base first, top last.
        #[arg(long)]
        chain: bool,
        /// The top image (or, with --chain, BASE ... TOP).
        #[arg(required = true, value_name = "IMAGE")]
        images: Vec<PathBuf>,
    },
    /// Remove a device (by name, /dev/mapper/NAME, or its top image).
    Disconnect {
        /// NAME, /dev/mapper/NAME or TOP.qcow2.
        device: String,
        /// Remove it when its last user closes it.
        #[arg(long)]
        deferred: bool,
    },
    /// List qcow2 devices with their chains.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Show a device's status (the target's status line, explained).
    Status {
        /// NAME, /dev/mapper/NAME or TOP.qcow2.
        device: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Create a qcow2 v3 image (an overlay with --backing).
    Create {
        /// The new image (must not exist).
        image: PathBuf,
        /// Virtual size (512, 64k, 10G ...); default with --backing: its size.
        size: Option<String>,
        /// Backing file name, stored as given (relative to IMAGE's directory).
        #[arg(long, short = 'b')]
        backing: Option<String>,
        /// Cluster size (default: the backing file's, else 64k).
        #[arg(long)]
        cluster_size: Option<String>,
        /// Extended L2 entries (32 subclusters per cluster).
        #[arg(long)]
        extended_l2: bool,
    },
    /// Put a new overlay on top of a live device.
    ///
    /// The device is suspended (a file system on it is frozen), reloaded
    /// with NEW as its writable top and resumed. On any failure the old
    /// table is resumed and NEW removed.
    Snapshot {
        /// NAME, /dev/mapper/NAME or TOP.qcow2.
        device: String,
        /// The new top image (must not exist).
        new: PathBuf,
    },
    /// Merge a delta of a live device into its neighbour.
    ///
    /// Backward (default): the delta at --depth (0 = the top) into the one
    /// below. --forward: the delta at --depth (default 1) into the one
    /// above. The backing-file name of the delta above is updated after.
    Merge {
        /// NAME, /dev/mapper/NAME or TOP.qcow2.
        device: String,
        /// Depth of the merged delta counted from the top.
        #[arg(long, short = 'd')]
        depth: Option<u64>,
        /// Merge into the delta above.
        #[arg(long)]
        forward: bool,
        /// Start the merge and return (`merge DEVICE` later completes it).
        #[arg(long, conflicts_with = "cancel")]
        no_wait: bool,
        /// Cancel a running merge.
        #[arg(long, conflicts_with_all = ["depth", "forward"])]
        cancel: bool,
    },
    /// Grow the device and its top image.
    Resize {
        /// NAME, /dev/mapper/NAME or TOP.qcow2.
        device: String,
        /// New virtual size (grow only).
        size: String,
    },
    /// Write the man pages into DIR.
    #[command(hide = true)]
    GenMan {
        /// Output directory.
        dir: PathBuf,
    },
    /// Print shell completions.
    #[command(hide = true)]
    GenCompletions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dm-qcow2: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Connect { name, read_only, discard, chain, images } => {
            if discard == device::Discard::Ignore {
                bail!("--discard ignore: not supported (the target always handles discards; mount without -o discard instead)");
            }
            let dm = Dm::open()?;
            let o = device::ConnectOpts { name, read_only, explicit: chain };
            if !chain && images.len() > 1 {
                bail!("give one top image, or --chain BASE ... TOP");
            }
            let node = device::connect(&dm, &images, &o)?;
            println!("{}", node.display());
        }
        Cmd::Disconnect { device, deferred } => {
            let dm = Dm::open()?;
            let name = dm::find_device(&dm, &device)?;
            dm.qcow2_line(&name, true)?;
            dm.remove(&name, deferred)?;
        }
        Cmd::List { json } => {
            let dm = Dm::open()?;
            let mut devs = Vec::new();
            for n in dm.qcow2_devices()? {
                devs.push(describe(&dm, &n)?);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&devs)?);
            } else {
                for d in &devs {
                    print_short(d);
                }
            }
        }
        Cmd::Status { device, json } => {
            let dm = Dm::open()?;
            let name = dm::find_device(&dm, &device)?;
            let d = describe(&dm, &name)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                print_long(&d);
            }
        }
        Cmd::Create { image, size, backing, cluster_size, extended_l2 } => {
            create(&image, size.as_deref(), backing, cluster_size.as_deref(), extended_l2)?;
        }
        Cmd::Snapshot { device, new } => {
            let dm = Dm::open()?;
            let name = dm::find_device(&dm, &device)?;
            let p = device::snapshot(&dm, &name, &new)?;
            println!("{}", p.display());
        }
        Cmd::Merge { device, depth, forward, no_wait, cancel } => {
            let dm = Dm::open()?;
            let name = dm::find_device(&dm, &device)?;
            merge::merge(&dm, &name, merge::MergeOpts { depth, forward, no_wait, cancel })?;
        }
        Cmd::Resize { device, size } => {
            let size = image::parse_size(&size)?;
            let dm = Dm::open()?;
            let name = dm::find_device(&dm, &device)?;
            device::resize(&dm, &name, size)?;
        }
        Cmd::GenMan { dir } => gen_man(&dir)?,
        Cmd::GenCompletions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "dm-qcow2", &mut std::io::stdout());
        }
    }
    Ok(())
}

/// `create`: sizes and defaults, then [`image::create`].
fn create(
    img: &Path,
    size: Option<&str>,
    backing: Option<String>,
    cluster_size: Option<&str>,
    extended_l2: bool,
) -> Result<()> {
    let bimg = match &backing {
        Some(b) => {
            let p = chain::resolve_backing(img, b)?;
            let c = chain::discover(&p).with_context(|| format!("backing file {b}"))?;
            chain::check_chain(&c, false)?;
            c.last().cloned()
        }
        None => None,
    };
    let size = match (size, &bimg) {
        (Some(s), _) => image::parse_size(s)?,
        (None, Some(b)) => b.hdr.size,
        (None, None) => bail!("give a SIZE (or --backing to take its size)"),
    };
    let cs = match (cluster_size, &bimg) {
        (Some(s), _) => image::parse_size(s)?,
        (None, Some(b)) => b.hdr.cluster_size(),
        (None, None) => 64 << 10,
    };
    let ext = extended_l2 || bimg.as_ref().is_some_and(|b| b.hdr.extended_l2());
    if let Some(b) = &bimg {
        // The target refuses chains that differ in these.
        if b.hdr.cluster_size() != cs || b.hdr.extended_l2() != ext {
            bail!("{}: cluster size and extended L2 must be the backing file's ({} bytes, extended L2 {})",
                img.display(), b.hdr.cluster_size(), b.hdr.extended_l2());
        }
        if size < b.hdr.size {
            bail!("{}: size {size} below the backing file's {} (the target refuses such a chain)", img.display(), b.hdr.size);
        }
    }
    let o = image::CreateOpts { size, cluster_size: cs, extended_l2: ext, backing };
    image::create(img, &o)
}

/// What `list` and `status` show.
#[derive(Debug, serde::Serialize)]
struct Described {
    name: String,
    device: String,
    size: u64,
    read_only: bool,
    suspended: bool,
    open_count: i32,
    chain: Vec<String>,
    status: BTreeMap<String, String>,
}

fn describe(dm: &Dm, name: &str) -> Result<Described> {
    let info = dm.info(name)?;
    let table = dm.qcow2_line(name, true)?;
    let st = dm.qcow2_line(name, false)?;
    Ok(Described {
        name: name.to_string(),
        device: format!("/dev/mapper/{name}"),
        size: table.len.saturating_mul(512),
        read_only: info.read_only,
        suspended: info.suspended,
        open_count: info.open_count,
        chain: dm::chain_names(dm, name)?,
        status: dm::parse_status(&st.params),
    })
}

fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{bytes} B") } else { format!("{v:.1} {}", units[u]) }
}

fn merge_text(s: &BTreeMap<String, String>) -> String {
    let g = |k: &str| s.get(k).map_or("?", String::as_str);
    match g("merge") {
        "none" | "?" => "none".to_string(),
        m => format!("{m} depth {} {} {}%{}", g("depth"), g("stage"), g("progress"),
            if g("error") != "0" { format!(" error {}", g("error")) } else { String::new() }),
    }
}

fn errors_text(s: &BTreeMap<String, String>) -> String {
    let bad: Vec<String> = ["wants_check", "md_writeback_error", "truncate_error"]
        .iter()
        .filter_map(|k| s.get(*k).filter(|v| v.as_str() != "0").map(|v| format!("{k}={v}")))
        .collect();
    if bad.is_empty() { "none".to_string() } else { bad.join(" ") }
}

fn print_short(d: &Described) {
    println!("{}\t{}\t{}\t{}\tmerge: {}\terrors: {}", d.device, human(d.size),
        if d.read_only { "ro" } else { "rw" }, d.chain.join(" <- "),
        merge_text(&d.status), errors_text(&d.status));
}

fn print_long(d: &Described) {
    let g = |k: &str| d.status.get(k).map_or("?", String::as_str);
    println!("device:     {}", d.device);
    println!("size:       {} ({} bytes){}", human(d.size), d.size, if d.read_only { ", read-only" } else { "" });
    println!("state:      {}, open {} times", if d.suspended { "suspended" } else { "active" }, d.open_count);
    println!("chain:      (base first)");
    let clusters: Vec<&str> = g("clusters").split(',').collect();
    for (i, c) in d.chain.iter().enumerate() {
        println!("  {i}: {c} ({} clusters with data)", clusters.get(i).copied().unwrap_or("?"));
    }
    println!("merge:      {}", merge_text(&d.status));
    println!("errors:     {}", errors_text(&d.status));
    println!("enospc:     {} writes waiting for space", g("enospc"));
    println!("fast path:  {} bios", g("fast_bios"));
    println!("flushes:    {} committed by an express lane", g("express_flushes"));
    println!("FUA writes: {} synced by the fast path", g("fast_fua"));
}

/// Writes dm-qcow2.8 and dm-qcow2-VERB.8 (section 8: a command for root) into `dir`.
fn gen_man(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let cmd = Cli::command();
    let mut pages = vec![("dm-qcow2".to_string(), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let n = format!("dm-qcow2-{}", sub.get_name());
        pages.push((n.clone(), sub.clone().name(n)));
    }
    for (n, c) in pages {
        let mut buf = Vec::new();
        clap_mangen::Man::new(c).section("8").render(&mut buf)?;
        let p = dir.join(format!("{n}.8"));
        std::fs::write(&p, buf).with_context(|| p.display().to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn man_pages_and_completions() {
        let s = crate::testutil::Scratch::new("man");
        gen_man(&s.0).unwrap();
        for page in ["dm-qcow2.8", "dm-qcow2-connect.8", "dm-qcow2-merge.8", "dm-qcow2-snapshot.8"] {
            let t = std::fs::read_to_string(s.path(page)).unwrap();
            assert!(t.contains(".TH"), "{page}");
        }
        assert!(!s.path("dm-qcow2-gen-man.8").exists(), "hidden verbs get no page");
        let mut out = Vec::new();
        clap_complete::generate(clap_complete::Shell::Bash, &mut Cli::command(), "dm-qcow2", &mut out);
        assert!(String::from_utf8(out).unwrap().contains("disconnect"));
    }

    #[test]
    fn parses_verbs() {
        let c = Cli::try_parse_from(["dm-qcow2", "connect", "--read-only", "-n", "vm0", "top.qcow2"]).unwrap();
        assert!(matches!(c.cmd, Cmd::Connect { read_only: true, ref name, .. } if name.as_deref() == Some("vm0")));
        let c = Cli::try_parse_from(["dm-qcow2", "connect", "--chain", "a", "b", "c"]).unwrap();
        assert!(matches!(c.cmd, Cmd::Connect { chain: true, ref images, .. } if images.len() == 3));
        let c = Cli::try_parse_from(["dm-qcow2", "merge", "vm0", "--depth", "1", "--forward"]).unwrap();
        assert!(matches!(c.cmd, Cmd::Merge { depth: Some(1), forward: true, .. }));
        assert!(Cli::try_parse_from(["dm-qcow2", "merge", "vm0", "--cancel", "--depth", "1"]).is_err());
        assert!(Cli::try_parse_from(["dm-qcow2", "connect"]).is_err());
        assert!(Cli::try_parse_from(["dm-qcow2", "connect", "--discard", "bogus", "x"]).is_err());
        let e = Cli::try_parse_from(["dm-qcow2", "frobnicate"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }
}
