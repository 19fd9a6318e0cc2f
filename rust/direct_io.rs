// SPDX-License-Identifier: GPL-2.0

//! Direct I/O between a bio and a file, asynchronous, ending the bio when
//! the file system completes it (as loop's `lo_rw_aio`), and the counter of
//! such I/Os in flight that callers wait on before a host cluster is
//! reused.
//!
//! C header: [`include/linux/fs.h`](srctree/include/linux/fs.h)

use super::bindings;
use super::bio::{Bio, BioPiece, Op};
use super::dm;
use super::file::File;
use core::mem::{ManuallyDrop, MaybeUninit};
use core::ptr::NonNull;
use core::sync::atomic::{fence, AtomicU32, AtomicUsize, Ordering};
use kernel::error::{code::*, Error, Result};
use kernel::prelude::*;
use kernel::sync::Arc;

/// Counts asynchronous I/Os in flight, so that a caller can wait for all of
/// them (e.g. before a cluster they may target is freed and reused).
///
/// Submitters that run concurrently with such a waiter (the fast path's
/// lanes) first [`hold`] the counter: that fails while someone waits, so a
/// waiter is never starved by new I/O, and a submitter that holds it did
/// its lookup after the waiter's preceding stores were visible or is
/// counted (see `hold`).
///
/// [`hold`]: IoCounter::hold
pub(crate) struct IoCounter {
    inflight: AtomicUsize,
    /// Callers in `wait_idle`.
    waiters: AtomicUsize,
}

impl IoCounter {
    /// A counter at zero.
    pub(crate) fn new() -> Result<Arc<Self>> {
        Ok(Arc::new(
            Self {
                inflight: AtomicUsize::new(0),
                waiters: AtomicUsize::new(0),
            },
            GFP_KERNEL,
        )?)
    }

    fn inc(&self) {
        self.inflight.fetch_add(1, Ordering::SeqCst);
    }

    fn dec(&self) {
        if self.inflight.fetch_sub(1, Ordering::SeqCst) != 1 {
            return;
        }
        // The count reached zero: wake a waiter. Store-buffering pairing
        // with `wait_idle` (full fences on both sides): either it sees the
        // zero before it sleeps, or this sees it counted in `waiters`. The
        // fence is also the barrier `wake_up_var` needs after the store.
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::Relaxed) != 0 {
            // SAFETY: `inflight` lives as long as `self`; the shim only uses
            // the address as a wait queue key.
            unsafe { bindings::dmq_wake_count(self.inflight.as_ptr().cast()) };
        }
    }

    /// Counts the caller as in flight until the guard drops (or, given to
    /// `File::submit_bio_io`, until that I/O completes), unless a caller
    /// waits in `wait_idle` (then `None`: take the locked path).
    ///
    /// The pairing with `wait_idle` is a store-buffering one, both sides
    /// with a full fence: what a waiter stored before it started waiting
    /// (say, a lookup entry it cleared) is seen by every load made under a
    /// guard that the waiter did not wait for.
    pub(crate) fn hold(&self) -> Option<IoHold<'_>> {
        self.inc();
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::Relaxed) != 0 {
            self.dec();
            return None;
        }
        Some(IoHold(self))
    }

    /// Whether no I/O is counted now (a hint: stale as soon as read).
    pub(crate) fn is_idle(&self) -> bool {
        self.count() == 0
    }

    /// The I/Os counted now (a hint: stale as soon as read).
    pub(crate) fn count(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Sleeps until no I/O counted here is in flight. New holds fail
    /// meanwhile, so that lanes cannot keep the count above zero; I/O the
    /// worker starts takes no hold, so a caller that waits without the
    /// state mutex waits as long as the worker keeps I/O going (callers
    /// hold it, or are the worker). Woken by the completion that brings the
    /// count to zero, not by a poll: `msleep(1)` sleeps two ticks, 8 ms at
    /// the HZ=250 of distribution kernels, and commits after allocations,
    /// merge batches and the application of frees wait here.
    pub(crate) fn wait_idle(&self) {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        // Acquire: pairs with the completions' decrements (their I/O
        // happened before). Again after a wake: a failed `hold` may have
        // raised the count for a moment since.
        while self.inflight.load(Ordering::Acquire) != 0 {
            // SAFETY: `inflight` lives as long as `self` and is an aligned
            // `usize` (the C `unsigned long`), which the shim reads with
            // READ_ONCE while it waits; sleeping is allowed (our callers may
            // sleep, as `wait_var_event` needs).
            unsafe { bindings::dmq_wait_count_zero(self.inflight.as_ptr().cast()) };
        }
        self.waiters.fetch_sub(1, Ordering::Release);
    }
}

/// A hold on an [`IoCounter`] (see [`IoCounter::hold`]).
pub(crate) struct IoHold<'a>(&'a IoCounter);

impl Drop for IoHold<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl File {
    /// Starts direct I/O between bytes `[off, off + len)` of the bio `part`
    /// holds and the file at `pos`, in the bio's direction, ending that
    /// reference with the result. Reads that hit the end of the file complete with
    /// zeroes, as for a hole; short writes fail with ENOSPC (the file
    /// system ran out of space or quota part way), or EFBIG if they go past
    /// the file's size limit; other short reads with EIO. A write is
    /// durable only after an fsync that follows its completion (see
    /// `File::fsync`: one that fails is final). The I/O is counted in
    /// `inflight` until it completes; `part` also says what of the bio it
    /// is (see [`BioPart`]).
    pub(crate) fn submit_bio_io(
        &self,
        part: BioPart<'_>,
        off: u32,
        len: u32,
        pos: u64,
        inflight: &Arc<IoCounter>,
    ) {
        let (bio, hold) = match part {
            BioPart::Piece(p) => (p.into_bio(), None),
            BioPart::Whole(b, h) => (b, Some(h)),
        };
        // Every early return below ends `bio` itself: until it is moved into
        // the `BioIo` (which cannot fail any more), `bio` is an owned `Bio`,
        // and a `Bio` that is dropped instead of ended still ends (EIO).
        let Ok(ipos) = i64::try_from(pos) else {
            return bio.end(Err(EINVAL));
        };
        if let Err(e) = self.inject() {
            return bio.end(Err(e));
        }
        // The bio's own room if this is its first direct I/O, else a box.
        // Allocate before the bio goes in: were the bio moved into
        // `KBox::new`'s argument, a failed allocation would drop it inside a
        // `ManuallyDrop` and it would never complete (suspend would hang).
        let home = match dm::take_io_room(&bio) {
            Some(room) => Home::Room(room),
            None => match KBox::<BioIo>::new_uninit(GFP_KERNEL) {
                Ok(b) => Home::Boxed(b),
                Err(_) => return bio.end(Err(ENOMEM)),
            },
        };
        // The I/O's own reference to the file: the completion and the file
        // system's end of a direct I/O use `ki_filp` after `self` may be gone
        // (a caller that drops its `File` with I/O in flight).
        // SAFETY: The file is valid while we hold `self`; the new reference
        // is the `BioIo`'s, given up by its last `put`.
        let file = unsafe { bindings::dmq_get_file(self.as_raw()) };
        let new = BioIo {
            // SAFETY: All-zeroes is a valid `kiocb` (a plain C struct); the shim
            // initialises it before use.
            iocb: unsafe { core::mem::zeroed() },
            refs: AtomicU32::new(2),
            file,
            bio: ManuallyDrop::new(bio),
            file_size: self.size(),
            write_limit: self.write_limit(),
            pos,
            off,
            len,
            started: false,
            boxed: matches!(home, Home::Boxed(_)),
            whole: hold.is_some(),
            res: 0,
            inflight: ManuallyDrop::new(inflight.clone()),
        };
        // From here the bio is ended by the last `BioIo::put`, exactly once:
        // after the file system's completion if the I/O queued, else after
        // ours below. The count it drops is the hold's or a new one.
        match hold {
            Some(h) if core::ptr::eq(h.0, &**inflight) => core::mem::forget(h),
            other => {
                inflight.inc();
                drop(other);
            }
        }
        let io: *mut BioIo = match home {
            Home::Boxed(b) => KBox::into_raw(KBox::write(b, new)),
            Home::Room(room) => {
                let room = room.as_ptr();
                // SAFETY: The room is the bio's, valid while the bio's reference
                // in `new` is unended, and ours alone (`take_io_room`).
                unsafe { room.write(MaybeUninit::new(new)) };
                room.cast()
            }
        };
        // SAFETY: `io` is a valid `BioIo` holding two references: one for the
        // completion, one for us. `iocb` is its first field (repr(C)), so the
        // completion finds the I/O again. The shim checks the bio range, the
        // file's mode and its direct I/O support. `file` is the `BioIo`'s
        // reference, alive until its last `put`, after the completion.
        let r = unsafe {
            bindings::dmq_file_rw_bio(
                &raw mut (*io).iocb,
                file,
                (*io).bio.as_raw(),
                off,
                len,
                ipos,
                &raw mut (*io).started,
                Some(bio_io_done),
            )
        };
        if r != -(bindings::EIOCBQUEUED as isize) {
            // SAFETY: The I/O did not queue, so the completion has not run and will
            // not; run it now with the result. It drops its reference.
            unsafe { bio_io_done(&raw mut (*io).iocb, r as _) };
        }
        // SAFETY: Our reference: the file system may still have used the kiocb
        // until its `->read_iter`/`->write_iter` returned, so only now let go.
        unsafe { BioIo::put(io) };
    }
}

/// The bio reference a direct I/O ends, and what of its bio the I/O is,
/// for `File::submit_bio_io`.
pub(crate) enum BioPart<'a> {
    /// A piece, one of possibly several (the worker's): counted anew, and a
    /// write ends its bio before it is uncounted (its end may park the bio).
    Piece(BioPiece),
    /// All of the bio (the fast path), counted by the hold since the lookup.
    /// A hold of the I/O's own counter becomes its count (no second
    /// increment, and none left over when the host completes the I/O inside
    /// the call: the last `BioIo::put` may then find the counter idle before
    /// a read's bio ends); a hold of another counter is let go once the I/O
    /// is counted. A write that succeeds, of a bio no other I/O recorded an
    /// error in, is uncounted before it ends, as a read is (`BioIo::put`).
    Whole(Bio, IoHold<'a>),
}

/// Where a `BioIo` lives.
enum Home {
    /// The bio's per-bio room.
    Room(NonNull<MaybeUninit<BioIo>>),
    /// A box, for a bio's further I/Os.
    Boxed(KBox<MaybeUninit<BioIo>>),
}

/// One direct I/O on behalf of a bio: in the bio's per-bio room
/// (`dm::take_io_room`) or, for a bio's further I/Os, in a box. Done when
/// both the submitter and the completion have dropped their reference: the
/// completion may run (in interrupt context) before the file system's
/// `->read_iter` returns, and the file system may still touch the kiocb
/// until then. The last reference ends the bio, after moving out what it
/// needs: ending it may free the room.
#[repr(C)]
pub(crate) struct BioIo {
    iocb: bindings::kiocb,
    refs: AtomicU32,
    /// A reference to the file of `iocb.ki_filp`, given up by the last
    /// reference (`fput` may run in interrupt context).
    file: *mut bindings::file,
    /// Ended by the last reference, exactly once.
    bio: ManuallyDrop<Bio>,
    file_size: u64,
    write_limit: u64,
    pos: u64,
    off: u32,
    len: u32,
    /// The shim took the write's freeze protection (`kiocb_start_write`):
    /// the completion ends it.
    started: bool,
    /// Whether the I/O is in a `KBox` (else in the bio's room).
    boxed: bool,
    /// All of the bio (`BioPart::Whole`).
    whole: bool,
    /// What the bio ends with: 0 or a negative errno, set by the completion.
    res: i32,
    /// Taken by the last reference.
    inflight: ManuallyDrop<Arc<IoCounter>>,
}

impl BioIo {
    /// Drops one reference; the last ends the bio with the completion's
    /// result and frees the I/O.
    ///
    /// # Safety
    ///
    /// `io` must be a live `BioIo` made by `submit_bio_io`, and the caller
    /// must own one of its references.
    unsafe fn put(io: *mut BioIo) {
        // SAFETY: The caller owns a reference, so `io` is alive.
        if unsafe { (*io).refs.fetch_sub(1, Ordering::AcqRel) } != 1 {
            return;
        }
        // SAFETY: That was the last reference: nobody else uses `io` (the
        // acquire half of the `AcqRel` above synchronises with the other
        // reference's release, so the completion's writes come before these
        // reads). The bio and the counter are taken exactly once, here;
        // the other fields have no drop glue.
        let (bio, inflight, res, boxed, whole, file) = unsafe {
            (
                ManuallyDrop::take(&mut (*io).bio),
                ManuallyDrop::take(&mut (*io).inflight),
                (*io).res,
                (*io).boxed,
                (*io).whole,
                (*io).file,
            )
        };
        if boxed {
            // SAFETY: A boxed I/O came from `KBox::into_raw` (`submit_bio_io`);
            // what needed dropping was taken above.
            drop(unsafe { KBox::from_raw(io) });
        }
        // `io` is not touched from here on: ending the bio may free its room.
        let result = if res < 0 {
            Err(Error::from_errno(res))
        } else {
            Ok(())
        };
        // Ending a write may park it (ENOSPC, `dm::Target::park_nospc`,
        // also when another I/O of the bio failed so and this one ends it): a
        // worker that waited for the counter during an ENOSPC episode must
        // find it parked. A write that succeeded and is all of its bio, with
        // no error recorded, is not parked by this end. (Such a bio may
        // still have another I/O in flight: one the worker started before
        // it parked the bio after a later piece's ENOSPC, if it comes back
        // through the fast path. That I/O stays counted until after it
        // ends the bio, parking it if it fails so; one that failed already
        // recorded its error.)
        let may_park = op_is_write(bio.op()) && !(whole && result.is_ok() && bio.no_error_yet());
        if may_park {
            bio.end(result);
            inflight.dec();
        } else {
            // The host I/O is over: uncounted before the bio ends, so that a
            // submitter woken by the end (queue depth 1) finds the table idle
            // and takes the express lane (`fast::Lanes::queue`), not an
            // unbound one on another CPU.
            inflight.dec();
            bio.end(result);
        }
        // SAFETY: The I/O's reference (taken in `submit_bio_io`), given up once:
        // neither the completion nor the file system uses the kiocb any more.
        unsafe { bindings::fput(file) };
    }
}

/// # Safety
///
/// `iocb` must be the `iocb` of a live `BioIo` made by `submit_bio_io`, and
/// this must be its one completion (it owns the completion's reference).
unsafe extern "C" fn bio_io_done(iocb: *mut bindings::kiocb, ret: kernel::ffi::c_long) {
    let io = iocb.cast::<BioIo>();
    // SAFETY: `io` is alive (we own a reference). After the shim returned
    // the submitter touches only `refs`, and the other fields only as the
    // last reference, after our release; the bio stays in place (ended by the
    // last reference).
    let (bio, write) = unsafe {
        let write = op_is_write((*io).bio.op());
        // Set by the shim exactly when it took the write's freeze protection.
        if (*io).started {
            bindings::dmq_kiocb_end_write(iocb);
        }
        (&*(*io).bio, write)
    };
    // SAFETY: As above; plain fields only read.
    let (pos, off, len, file_size, write_limit) = unsafe {
        (
            (*io).pos,
            (*io).off,
            (*io).len,
            (*io).file_size,
            (*io).write_limit,
        )
    };
    let res = if ret < 0 {
        Err(Error::from_errno(ret as i32))
    } else if ret as u64 >= u64::from(len) {
        Ok(())
    } else if !write && pos.saturating_add(ret as u64) >= file_size {
        // Short read at the end of the file: the rest reads as zeroes
        // (`ret < len` here, so neither sum nor difference can wrap).
        let got = ret as u32;
        bio.zero(off.saturating_add(got), len - got)
    } else if write {
        // A direct write ends short when the file system could allocate
        // only part of its range (tmpfs, a host file system that returns
        // what it wrote before it ran out of space or quota): ENOSPC, so
        // that the bio waits for space and is written again whole (a
        // write is idempotent). One cut at the file's size limit would
        // end short again every time: EFBIG, not parked.
        if pos.saturating_add(u64::from(len)) > write_limit {
            Err(EFBIG)
        } else {
            Err(ENOSPC)
        }
    } else {
        Err(EIO)
    };
    // SAFETY: As above; the submitter never touches `res`, and the last
    // reference reads it after our `put` releases it.
    unsafe { (*io).res = res.err().map_or(0, |e| e.to_errno()) };
    // SAFETY: The completion's reference, given up last thing.
    unsafe { BioIo::put(io) };
}

fn op_is_write(op: Op) -> bool {
    !matches!(op, Op::Read)
}
