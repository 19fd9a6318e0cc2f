// SPDX-License-Identifier: GPL-2.0

//! Messages (`dmsetup message`) and the status INFO line.

use super::*;

/// Parses message argument `i` as a decimal number of type `T`. Every
/// message argument is untrusted: a missing word, anything but digits (with
/// an optional sign where `T` has one) or a value outside `T`'s range is
/// EINVAL. The parse itself cannot overflow (`FromStr` checks), and callers
/// range-check the value without arithmetic that can.
fn arg<T: core::str::FromStr>(args: &[&CStr], i: usize) -> Result<T> {
    args.get(i)
        .and_then(|a| a.to_str().ok())
        .and_then(|s| s.parse::<T>().ok())
        .ok_or(EINVAL)
}

/// The message has exactly `n` words (the command included): extra
/// arguments are refused, not ignored.
fn arity(args: &[&CStr], n: usize) -> Result {
    if args.len() == n {
        Ok(())
    } else {
        Err(EINVAL)
    }
}

impl Qcow2 {
    /// The status INFO line, from counters and the state's view
    /// (`StatusView`): no metadata read, no wait for the state mutex (which
    /// the worker holds for whole batches).
    pub(super) fn status_info(&self, out: &mut Emit<'_>) -> core::fmt::Result {
        let inner = &self.inner;
        let e = &inner.errors;
        // The counts are built in the background after every load of the
        // metadata (resume); a status that comes first waits for that work.
        if !inner.counted() {
            inner.kick_count();
            inner.count_wq.flush();
        }
        let v = inner.status.lock();
        write!(
            out,
            "images={} wants_check={} md_writeback_error={} truncate_error={} enospc={} ",
            v.images,
            u8::from(inner.wants_check()),
            e.md_writeback.load(Ordering::Relaxed),
            e.truncate.load(Ordering::Relaxed),
            inner.parked_count.load(Ordering::Acquire),
        )?;
        v.merge.describe(out)?;
        write!(out, " clusters=")?;
        for (i, n) in Inner::status_counts(&v).enumerate() {
            if i > 0 {
                write!(out, ",")?;
            }
            match n {
                Some(n) => write!(out, "{}", n)?,
                None => write!(out, "?")?,
            }
        }
        write!(
            out,
            " fast_bios={} express_flushes={} fast_fua={}",
            inner.fast_bios.load(Ordering::Relaxed),
            inner.express_flushes.load(Ordering::Relaxed),
            inner.fast_fua.load(Ordering::Relaxed)
        )
    }

    /// `message`: every message of the C target, and ours.
    pub(super) fn handle_message(&self, args: &[&CStr], out: &mut Emit<'_>) -> Result {
        if !task::capable_sys_admin() {
            return Err(EPERM);
        }
        // Messages (a merge's complete, cancel) commit, fsync and punch
        // holes with the state locked: no reclaim may write back to this
        // device meanwhile, as in the worker.
        task::no_io(|| self.run_message(args, out))
    }

    /// `handle_message` past the capability check.
    fn run_message(&self, args: &[&CStr], out: &mut Emit<'_>) -> Result {
        let inner = &self.inner;
        let cmd = args.first().ok_or(EINVAL)?.as_bytes();
        let suspended = || inner.link.suspended();
        match cmd {
            b"get_img_name" | b"get_img_id" => {
                arity(args, 2)?;
                let id: usize = arg(args, 1)?;
                let d = inner.lock_state().delta(id).ok();
                if let Some(d) = d {
                    let mut buf = KVec::from_elem(0u8, 4096, GFP_KERNEL)?;
                    let p = d.file.path(&mut buf)?;
                    // No newline, as the C target (dmsetup adds one; ioctl
                    // users see the exact path).
                    let _ = write!(out, "{}", core::str::from_utf8(p).unwrap_or("?"));
                }
                Ok(())
            }
            b"get_img_fd" => {
                arity(args, 2)?;
                let id: usize = arg(args, 1)?;
                // An unknown id: empty output and success, as the C target.
                let d = inner.lock_state().delta(id).ok();
                if let Some(d) = d {
                    let fd = d.file.install_fd()?;
                    let _ = writeln!(out, "{}", fd);
                }
                Ok(())
            }
            b"get_errors" => {
                arity(args, 1)?;
                // Each 0 or 1, as the C target (the status line has the
                // errnos).
                let e = &inner.errors;
                let _ = write!(
                    out,
                    "wants_check={}\nmd_writeback_error={}\ntruncate_error={}\n",
                    u8::from(inner.wants_check()),
                    u8::from(e.md_writeback.load(Ordering::Relaxed) != 0),
                    u8::from(e.truncate.load(Ordering::Relaxed) != 0)
                );
                Ok(())
            }
            b"get_event" => {
                arity(args, 1)?;
                if inner.enospc_event.swap(false, Ordering::AcqRel) {
                    let _ = writeln!(out, "event_ENOSPC");
                }
                Ok(())
            }
            b"set_fault_injection" => {
                arity(args, 3)?;
                // Parsed (EINVAL) before the state is looked at.
                let id: usize = arg(args, 1)?;
                let ratio: u32 = arg(args, 2)?;
                // Allowed while suspended, as get_img_name (the C target).
                let d = inner.lock_state().delta(id).map_err(|_| ENOENT)?;
                d.file.set_fault_ratio(ratio)
            }
            b"merge_backward" | b"merge_forward" => {
                let dir = if cmd == b"merge_backward" {
                    Dir::Backward
                } else {
                    Dir::Forward
                };
                let sub = args.get(1).ok_or(EINVAL)?.as_bytes();
                match sub {
                    b"start" => {
                        if !(3..=4).contains(&args.len()) {
                            return Err(EINVAL);
                        }
                        // An fd is an int; a depth any usize, range-checked
                        // against the chain by `merge_start`.
                        let efd: i32 = arg(args, 2)?;
                        let depth = if args.len() > 3 {
                            Some(arg::<usize>(args, 3)?)
                        } else {
                            None
                        };
                        if suspended() {
                            return Err(EBUSY);
                        }
                        inner.merge_start(dir, efd, depth)
                    }
                    b"complete" => {
                        arity(args, 2)?;
                        if suspended() {
                            return Err(EBUSY);
                        }
                        inner.merge_complete(dir)
                    }
                    b"cancel" => {
                        arity(args, 2)?;
                        let mut st = inner.lock_state();
                        // Always succeeds, also with nothing (of this
                        // direction) running, as the C target.
                        if st.merge.as_ref().map(|m| m.dir) != Some(dir) {
                            return Ok(());
                        }
                        inner.merge_cancel(&mut st)
                    }
                    b"progress" => {
                        arity(args, 2)?;
                        let st = inner.lock_state();
                        let m = st.merge.as_ref().filter(|m| m.dir == dir);
                        let _ = merge::MergeView::of(m).describe(out);
                        let _ = writeln!(out);
                        Ok(())
                    }
                    _ => Err(EINVAL),
                }
            }
            // Unknown: ENOTTY, or EBUSY while suspended (the C target).
            _ if suspended() => Err(EBUSY),
            _ => Err(ENOTTY),
        }
    }
}
