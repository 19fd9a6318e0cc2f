// SPDX-License-Identifier: GPL-2.0

//! Owned bios.
//!
//! C header: [`include/linux/bio.h`](srctree/include/linux/bio.h)
//!
//! A [`Bio`] is one completion reference of a bio a target registered with
//! `dm::Registration` received in `map` (so it carries that abstraction's
//! per-bio data).
//! Every reference ends exactly once: explicitly with [`Bio::end`], or, if it
//! is dropped, with an I/O error (a forgotten bio must never hang its
//! submitter). [`Bio::split_ref`] makes another reference so that several
//! pieces can complete independently; the bio completes when the last ends.
//!
//! The lists ([`BioList`], [`BioStack`]) link bios through their one
//! `bi_next`, so only a `Bio` goes in them. A further reference is a
//! [`BioPiece`], which cannot: two references of one bio in two lists
//! would share that link, and one list's push would reach into the other
//! (a bio ended twice, one never).

use super::bindings;
use core::mem::ManuallyDrop;
use core::ops::Deref;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicPtr, Ordering};
use kernel::error::{
    code::{EINVAL, ENOMEM, ENOSPC},
    to_result, Error, Result,
};

/// What a bio asks for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Op {
    /// Read data.
    Read,
    /// Write data.
    Write,
    /// Flush (an empty bio with REQ_PREFLUSH arrives as `Write`).
    Flush,
    /// Discard a range.
    Discard,
    /// Write zeroes to a range.
    WriteZeroes,
    /// Anything else.
    Other(u32),
}

const REQ_OP_MASK: u32 = (1 << bindings::REQ_OP_BITS) - 1;
/// `BLK_STS_IOERR` (a `__force` cast in C, so bindgen skips it).
const BLK_STS_IOERR: bindings::blk_status_t = 10;

/// One completion reference of a bio (see the module docs).
pub(crate) struct Bio(NonNull<bindings::bio>);

// SAFETY: A bio may be ended from any thread and in any context; the data
// pages it points to are not tied to the submitting thread. (Not `Sync`:
// the first `split_ref` of a bio sets a non-atomic flag; later ones, which
// references on other threads may make at the same time, only read it.)
unsafe impl Send for Bio {}

impl Bio {
    /// Takes over the completion of `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr` must be a valid bio whose completion the caller owns (one reference,
    /// as handed to a target's `map`), and it must stay valid until ended. It
    /// must be a bio device-mapper passed to `map` of a target registered
    /// with `dm::Registration`, after `map` wrote its per-bio data.
    pub(crate) unsafe fn from_raw(ptr: *mut bindings::bio) -> Self {
        // SAFETY: The caller guarantees `ptr` is valid, hence non-null.
        Self(unsafe { NonNull::new_unchecked(ptr) })
    }

    /// The raw bio, for the other abstractions in this crate.
    pub(crate) fn as_raw(&self) -> *mut bindings::bio {
        self.0.as_ptr()
    }

    fn opf(&self) -> u32 {
        // SAFETY: The bio is valid while we hold a completion reference; other
        // references change other fields (`__bi_remaining`, `bi_status`), so
        // read just this one, which nobody changes while we own the bio.
        unsafe { (&raw const (*self.as_raw()).bi_opf).read() }
    }

    fn iter(&self) -> bindings::bvec_iter {
        // SAFETY: As in `opf`: `bi_iter` does not change while the bio is ours.
        unsafe { (&raw const (*self.as_raw()).bi_iter).read() }
    }

    /// The operation.
    pub(crate) fn op(&self) -> Op {
        match self.opf() & REQ_OP_MASK {
            bindings::req_op_REQ_OP_READ => Op::Read,
            bindings::req_op_REQ_OP_WRITE => Op::Write,
            bindings::req_op_REQ_OP_FLUSH => Op::Flush,
            bindings::req_op_REQ_OP_DISCARD => Op::Discard,
            bindings::req_op_REQ_OP_WRITE_ZEROES => Op::WriteZeroes,
            op => Op::Other(op),
        }
    }

    /// Whether the caller asked for a cache flush before this bio (REQ_PREFLUSH).
    pub(crate) fn is_preflush(&self) -> bool {
        self.opf() & (1 << bindings::req_flag_bits___REQ_PREFLUSH) != 0
    }

    /// Whether this bio must be durable when it completes (REQ_FUA).
    pub(crate) fn is_fua(&self) -> bool {
        self.opf() & (1 << bindings::req_flag_bits___REQ_FUA) != 0
    }

    /// Whether a write-zeroes bio asks to keep the space allocated (REQ_NOUNMAP).
    pub(crate) fn is_nounmap(&self) -> bool {
        self.opf() & (1 << bindings::req_flag_bits___REQ_NOUNMAP) != 0
    }

    /// First sector (relative to the target: device-mapper already remapped it).
    pub(crate) fn sector(&self) -> u64 {
        self.iter().bi_sector
    }

    /// Remaining size in bytes.
    pub(crate) fn size(&self) -> u32 {
        self.iter().bi_size
    }

    /// Fills `[off, off + len)` of the data with zeroes.
    pub(crate) fn zero(&self, off: u32, len: u32) -> Result {
        // SAFETY: The bio is valid; the shim checks the range against `bi_size`.
        to_result(unsafe { bindings::dmq_bio_zero(self.as_raw(), off, len) })
    }

    /// Copies `src` into the data at `off`.
    pub(crate) fn copy_from(&self, off: u32, src: &[u8]) -> Result {
        let len = u32::try_from(src.len()).map_err(|_| EINVAL)?;
        // SAFETY: The bio is valid, `src` is readable for `len` bytes and the
        // shim checks the range against `bi_size`.
        to_result(unsafe {
            bindings::dmq_bio_copy_from(self.as_raw(), off, src.as_ptr().cast(), len)
        })
    }

    /// Copies the data at `off` into `dst`.
    pub(crate) fn copy_to(&self, off: u32, dst: &mut [u8]) -> Result {
        let len = u32::try_from(dst.len()).map_err(|_| EINVAL)?;
        // SAFETY: The bio is valid, `dst` is writable for `len` bytes and the
        // shim checks the range against `bi_size`.
        to_result(unsafe {
            bindings::dmq_bio_copy_to(self.as_raw(), off, dst.as_mut_ptr().cast(), len)
        })
    }

    /// Makes another completion reference of the same bio: a piece, which
    /// ends like a `Bio` but goes in no list (see the module docs).
    pub(crate) fn split_ref(&self) -> BioPiece {
        // SAFETY: The bio is valid and we hold a reference, so it cannot complete
        // while the count is raised.
        unsafe { bindings::dmq_bio_inc_remaining(self.as_raw()) };
        BioPiece(Bio(self.0))
    }

    /// Ends this reference. An error is recorded in the bio; success leaves an
    /// error recorded by another reference in place.
    pub(crate) fn end(self, res: Result) {
        let this = ManuallyDrop::new(self);
        if let Err(e) = res {
            this.set_error(e);
        }
        // SAFETY: We own this completion reference and give it up here, once.
        unsafe { bindings::bio_endio(this.as_raw()) };
    }

    /// Whether no reference of the bio has recorded an error so far (one
    /// still in flight may record one later).
    pub(crate) fn no_error_yet(&self) -> bool {
        // SAFETY: The bio is valid while we hold a completion reference.
        // Other references may store an error status concurrently (a one-byte
        // store, `set_error`): the read sees the old or the new value.
        let sts = unsafe { core::ptr::read_volatile(&raw const (*self.as_raw()).bi_status) };
        sts == 0
    }

    fn set_error(&self, e: Error) {
        // Only statuses that mean something to the submitter: others (e.g.
        // -EREMCHG, device-mapper's internal requeue) become plain I/O errors.
        let errno = e.to_errno();
        let sts = if [ENOSPC, super::task::code::eopnotsupp(), ENOMEM]
            .iter()
            .any(|c| c.to_errno() == errno)
        {
            // SAFETY: `errno_to_blk_status` is a pure lookup.
            unsafe { bindings::errno_to_blk_status(errno) }
        } else {
            BLK_STS_IOERR
        };
        // SAFETY: The bio is valid. Racing writers all store an error status,
        // which is what the C targets do as well.
        unsafe { core::ptr::write_volatile(&raw mut (*self.as_raw()).bi_status, sts) };
    }
}

impl Drop for Bio {
    fn drop(&mut self) {
        self.set_error(kernel::error::code::EIO);
        // SAFETY: We own this completion reference and give it up here, once.
        unsafe { bindings::bio_endio(self.as_raw()) };
    }
}

/// A further completion reference of a bio ([`Bio::split_ref`]): everything
/// a `Bio` does through `&Bio`, and [`BioPiece::end`], but it cannot become
/// a `Bio` outside this crate's abstractions, so it never goes in a list.
pub(crate) struct BioPiece(Bio);

impl BioPiece {
    /// Ends this reference, as [`Bio::end`] does.
    pub(crate) fn end(self, res: Result) {
        self.0.end(res)
    }

    /// The reference as a `Bio`, for abstractions that end it without
    /// linking it anywhere (`File::submit_bio_io`).
    pub(super) fn into_bio(self) -> Bio {
        self.0
    }
}

impl Deref for BioPiece {
    type Target = Bio;

    fn deref(&self) -> &Bio {
        &self.0
    }
}

/// A stack of owned bios linked through `bi_next` that bios may be pushed
/// on from any context, interrupts included (lock-free); taken whole.
pub(crate) struct BioStack(AtomicPtr<bindings::bio>);

impl BioStack {
    /// An empty stack.
    pub(crate) const fn new() -> Self {
        Self(AtomicPtr::new(core::ptr::null_mut()))
    }

    /// Pushes `bio`. Never sleeps.
    pub(crate) fn push(&self, bio: Bio) {
        let raw = ManuallyDrop::new(bio).as_raw();
        let mut head = self.0.load(Ordering::Acquire);
        loop {
            // SAFETY: We own `raw` (its reference passes to the stack);
            // `bi_next` is free for the owner's use while it is not submitted.
            unsafe { (*raw).bi_next = head };
            match self
                .0
                .compare_exchange_weak(head, raw, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(h) => head = h,
            }
        }
    }

    /// Whether the stack is empty (now).
    pub(crate) fn is_empty(&self) -> bool {
        self.0.load(Ordering::Acquire).is_null()
    }

    /// Takes every bio, oldest first.
    pub(crate) fn take(&self) -> BioList {
        let mut p = self.0.swap(core::ptr::null_mut(), Ordering::AcqRel);
        // Newest first on the stack: reverse.
        let mut rev: *mut bindings::bio = core::ptr::null_mut();
        while !p.is_null() {
            // SAFETY: `p` is a bio of the stack, which the swap handed to us
            // with the references of all of them.
            let next = unsafe { (*p).bi_next };
            // SAFETY: As above.
            unsafe { (*p).bi_next = rev };
            rev = p;
            p = next;
        }
        let mut list = BioList::new();
        while !rev.is_null() {
            // SAFETY: As above.
            let next = unsafe { (*rev).bi_next };
            // SAFETY: As above: we own this reference and hand it to the list.
            list.push(unsafe { Bio::from_raw(rev) });
            rev = next;
        }
        list
    }
}

impl Drop for BioStack {
    fn drop(&mut self) {
        // Dropping the list ends every bio with an error.
        drop(self.take());
    }
}

/// A FIFO of owned bios linked through `bi_next`, like `struct bio_list`.
pub(crate) struct BioList {
    head: Option<Bio>,
    tail: *mut bindings::bio,
    /// How many bios the list holds.
    len: usize,
}

// SAFETY: The list owns its bios, which are `Send`.
unsafe impl Send for BioList {}

impl BioList {
    /// An empty list.
    pub(crate) const fn new() -> Self {
        Self {
            head: None,
            tail: core::ptr::null_mut(),
            len: 0,
        }
    }

    /// Whether the list is empty.
    pub(crate) fn is_empty(&self) -> bool {
        self.head.is_none()
    }

    /// How many bios the list holds.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Appends `bio`.
    pub(crate) fn push(&mut self, bio: Bio) {
        let bio = ManuallyDrop::new(bio);
        let raw = bio.as_raw();
        // SAFETY: We own `raw`; `bi_next` is free for the owner's use while the
        // bio is not submitted anywhere.
        unsafe { (*raw).bi_next = core::ptr::null_mut() };
        if self.head.is_none() {
            self.head = Some(ManuallyDrop::into_inner(bio));
        } else {
            // SAFETY: `tail` is the last bio of the list, which we own.
            unsafe { (*self.tail).bi_next = raw };
        }
        self.tail = raw;
        self.len = self.len.saturating_add(1);
    }

    /// Removes the first bio.
    pub(crate) fn pop(&mut self) -> Option<Bio> {
        let head = self.head.take()?;
        let raw = head.as_raw();
        // SAFETY: We own `raw`; its `bi_next` is the next bio of the list or null.
        let next = unsafe { (*raw).bi_next };
        // SAFETY: As above; clear our link before handing the bio out.
        unsafe { (*raw).bi_next = core::ptr::null_mut() };
        if next.is_null() {
            self.tail = core::ptr::null_mut();
        } else {
            // SAFETY: `next` is a bio of the list whose reference the list owns.
            self.head = Some(unsafe { Bio::from_raw(next) });
        }
        self.len = self.len.saturating_sub(1);
        Some(head)
    }

    /// Takes all bios, leaving this list empty.
    pub(crate) fn take(&mut self) -> BioList {
        core::mem::replace(self, BioList::new())
    }
}

impl Drop for BioList {
    fn drop(&mut self) {
        // Each popped bio ends with an error when dropped.
        while self.pop().is_some() {}
    }
}
