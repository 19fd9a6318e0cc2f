// SPDX-License-Identifier: GPL-2.0

//! The `qcow2` target: constructor checks, the bio queue, reads and writes.

use crate::kx::bio::{Bio, BioList, Op};
use crate::kx::dm::{self, CtrError, Emit, QueueLimits, StatusType, TargetCtr};
use crate::kx::file::{File, IoBuf, IoCounter, DIO_ALIGN};
use crate::kx::param;
use crate::kx::task::{self, code::{ebadslt, eopnotsupp}};
use crate::kx::wq::OwnedQueue;
use crate::kx::zlib::Inflater;
use crate::meta::{corrupt, DeltaMd};
use crate::qcow2_format::{self as fmt, Cluster, FormatError, Header, RunKind};
use core::fmt::Write;
use kernel::error::code::*;
use kernel::prelude::*;
use kernel::str::CStr;
use kernel::sync::{Arc, Mutex, SpinLock};
use kernel::workqueue::{impl_has_work, new_work, Work, WorkItem};
use kernel::{c_str, new_mutex, new_spinlock};

const SECTOR: u64 = 512;
/// qcow2 compatible feature bit 0: refcounts may be updated lazily.
const COMPAT_LAZY_REFCOUNTS: u64 = 1;
/// Header offsets of the v3 feature words.
const HDR_INCOMPAT: usize = 72;
const HDR_AUTOCLEAR: usize = 88;

fn ctr_err(err: Error, msg: &'static CStr) -> CtrError {
    CtrError::new(err, msg)
}

fn oom<E>(_: E) -> CtrError {
    ctr_err(ENOMEM, c_str!("Out of memory"))
}

fn fmt_err(e: FormatError) -> CtrError {
    let err = Error::from_errno(-e.errno());
    match CStr::from_bytes_with_nul(e.msg_with_nul().as_bytes()) {
        Ok(msg) => CtrError::new(err, msg),
        Err(_) => CtrError::new(err, c_str!("Bad image")),
    }
}

/// One image of the chain: its file and header (metadata lives in `DeltaMd`).
struct Delta {
    file: File,
    hdr: Header,
}

impl Delta {
    fn open(fd_arg: &CStr, is_top: bool, writable: bool) -> Result<Self, CtrError> {
        let fd = fd_arg
            .to_str()
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
            .ok_or_else(|| ctr_err(EBADF, c_str!("Wrong fd")))?;
        let file = File::fget(fd).map_err(|_| ctr_err(EBADF, c_str!("Wrong fd")))?;
        if !file.is_regular() {
            return Err(ctr_err(EINVAL, c_str!("Not a regular file")));
        }
        if !file.is_direct() {
            return Err(ctr_err(EINVAL, c_str!("Image opened in cached mode, need O_DIRECT")));
        }
        if !file.readable() {
            return Err(ctr_err(EACCES, c_str!("Image is not opened for reading")));
        }
        if is_top && writable && !file.writable() {
            return Err(ctr_err(EACCES, c_str!("Top image is not opened for writing")));
        }

        let mut buf = IoBuf::new(Header::MIN_READ).map_err(|e| ctr_err(e, c_str!("Out of memory")))?;
        let n = file
            .read_at(&mut buf, 0)
            .map_err(|e| ctr_err(e, c_str!("Cannot read image header")))?;
        // Only what was read: a truncated header must fail as such.
        let hdr = Header::parse(buf.get(..n).unwrap_or(&[])).map_err(fmt_err)?;
        if u64::from(hdr.cluster_bits) < u64::from(kernel::bindings::PAGE_SHIFT) {
            return Err(ctr_err(eopnotsupp(), c_str!("Cluster size below PAGE_SIZE")));
        }
        // O_DIRECT cannot address less than the host's logical block.
        if hdr.subcluster_size() < u64::from(file.logical_block_size()) {
            return Err(ctr_err(
                eopnotsupp(),
                c_str!("Subclusters smaller than the host's logical block size"),
            ));
        }
        if file.size() > hdr.max_file_size() {
            return Err(ctr_err(EFBIG, c_str!("File larger than its refcount table describes")));
        }
        // Lazy refcounts left dirty by a crash are stale: allocating from them
        // could hand out clusters in use.
        if is_top
            && writable
            && hdr.incompatible_features & fmt::incompat::DIRTY != 0
            && hdr.compatible_features & COMPAT_LAZY_REFCOUNTS != 0
        {
            return Err(ctr_err(EINVAL, c_str!("Image is dirty: repair it with qemu-img check -r all")));
        }
        Ok(Self { file, hdr })
    }
}

/// State only the worker touches.
struct WorkerState {
    /// Index == img_id.
    md: KVec<DeltaMd>,
    /// A cluster-sized buffer for copy-on-write (taken while in use).
    cow: Option<IoBuf>,
    inflater: Inflater,
    zin: IoBuf,
    zout: IoBuf,
    /// (delta, host offset) of the compressed cluster held in `zout`.
    zkey: Option<(usize, u64)>,
}

/// The table's shared state: the chain, the bio queue and the worker.
#[pin_data]
pub(crate) struct Inner {
    /// Base first: index == img_id.
    deltas: KVec<Delta>,
    /// The table was loaded read-write: the top delta takes writes.
    writable: bool,
    /// Asynchronous data I/O in flight.
    inflight: Arc<IoCounter>,
    #[pin]
    pending: SpinLock<BioList>,
    #[pin]
    state: Mutex<WorkerState>,
    #[pin]
    work: Work<Inner>,
}

impl_has_work! {
    impl HasWork<Self> for Inner { self.work }
}

impl WorkItem for Inner {
    type Pointer = Arc<Inner>;

    fn run(this: Arc<Inner>) {
        let _noio = task::NoIo::enter();
        let mut st = this.state.lock();
        loop {
            let mut list = this.pending.lock().take();
            if list.is_empty() {
                break;
            }
            while let Some(bio) = list.pop() {
                this.process(&mut st, bio);
            }
        }
    }
}

impl Inner {
    fn process(&self, st: &mut WorkerState, bio: Bio) {
        let res = match bio.op() {
            Op::Read => self.read_bio(st, &bio),
            Op::Write | Op::Flush if self.writable => self.write_bio(st, &bio),
            Op::Discard | Op::WriteZeroes if self.writable => self.zero_bio(st, &bio),
            _ => Err(EIO),
        };
        bio.end(res);
    }

    fn top(&self) -> usize {
        self.deltas.len().saturating_sub(1)
    }

    fn read_bio(&self, st: &mut WorkerState, bio: &Bio) -> Result {
        let size = u64::from(bio.size());
        let mut vaddr = bio.sector().checked_mul(SECTOR).ok_or(EIO)?;
        let cs = self.deltas.get(self.top()).ok_or(EIO)?.hdr.cluster_size();
        let mut done = 0u64;
        while done < size {
            let len = (cs - vaddr % cs).min(size - done);
            self.read_piece(st, bio, vaddr, done as u32, len)?;
            vaddr += len;
            done += len;
        }
        Ok(())
    }

    /// The L2 entry of `vaddr` in delta `d`.
    fn cluster(&self, st: &mut WorkerState, d: usize, vaddr: u64) -> Result<Cluster> {
        let delta = self.deltas.get(d).ok_or(EIO)?;
        let md = st.md.get_mut(d).ok_or(EIO)?;
        let Some(l1e) = md.l1_entry(&delta.hdr, vaddr)? else {
            return Ok(Cluster::Unallocated);
        };
        let (raw, bitmap) = md.l2_entry(&delta.file, &delta.hdr, l1e.l2_offset, vaddr)?;
        fmt::decode_l2(&delta.hdr, raw, bitmap).map_err(|e| corrupt(d, e))
    }

    /// Resolves the first run of `[vaddr, vaddr + len)` (inside one cluster)
    /// from delta `d` down: returns the delta that holds it, what it is and
    /// its length. Unallocated everywhere, or past a delta's end, is zero.
    fn resolve(&self, st: &mut WorkerState, d: usize, vaddr: u64, mut len: u64) -> Result<(usize, RunKind, u64)> {
        let mut d = Some(d);
        while let Some(i) = d {
            let hdr = &self.deltas.get(i).ok_or(EIO)?.hdr;
            // Lower deltas are never larger than the ones above them.
            if vaddr >= hdr.size {
                return Ok((i, RunKind::Zero, len));
            }
            len = len.min(hdr.size - vaddr);
            let c = self.cluster(st, i, vaddr)?;
            let (kind, rl) = fmt::first_run(hdr, &c, hdr.offset_in_cluster(vaddr), len);
            if rl == 0 {
                return Err(EIO);
            }
            if kind != RunKind::Unallocated {
                return Ok((i, kind, rl));
            }
            len = rl;
            d = i.checked_sub(1);
        }
        Ok((0, RunKind::Zero, len))
    }

    fn read_piece(&self, st: &mut WorkerState, bio: &Bio, vaddr: u64, boff: u32, len: u64) -> Result {
        let mut pos = 0u64;
        while pos < len {
            let (d, kind, rl) = self.resolve(st, self.top(), vaddr + pos, len - pos)?;
            let off = boff + pos as u32;
            let rl32 = rl as u32;
            match kind {
                RunKind::Zero | RunKind::Unallocated => bio.zero(off, rl32)?,
                RunKind::Data { host } => {
                    let f = &self.deltas.get(d).ok_or(EIO)?.file;
                    f.submit_bio_io(bio.split_ref(), off, rl32, host, false, &self.inflight);
                }
                RunKind::Compressed { host, len: clen } => {
                    bio.copy_from(off, self.inflated(st, d, host, clen, vaddr + pos, rl)?)?;
                }
            }
            pos += rl;
        }
        Ok(())
    }

    /// `[vaddr, vaddr + len)` (inside one cluster) of the compressed cluster
    /// of delta `d` at `host`, inflated.
    fn inflated<'a>(
        &self,
        st: &'a mut WorkerState,
        d: usize,
        host: u64,
        clen: u64,
        vaddr: u64,
        len: u64,
    ) -> Result<&'a [u8]> {
        self.inflate(st, d, host, clen)?;
        let at = self.deltas.get(d).ok_or(EIO)?.hdr.offset_in_cluster(vaddr) as usize;
        st.zout.get(at..at + len as usize).ok_or(EIO)
    }

    /// Makes `st.zout` hold the inflated compressed cluster at `host`.
    fn inflate(&self, st: &mut WorkerState, d: usize, host: u64, clen: u64) -> Result {
        if st.zkey == Some((d, host)) {
            return Ok(());
        }
        st.zkey = None;
        let delta = self.deltas.get(d).ok_or(EIO)?;
        let a = DIO_ALIGN as u64;
        let start = host & !(a - 1);
        let end = host.checked_add(clen).ok_or(EIO)?.next_multiple_of(a);
        let span = usize::try_from(end - start).map_err(|_| EIO)?;
        let zin = st.zin.get_mut(..span).ok_or(EIO)?;
        // The last compressed cluster may end before its rounded-up span.
        delta.file.read_full(zin, start)?;
        let skip = (host - start) as usize;
        let src = zin.get(skip..skip + clen as usize).ok_or(EIO)?;
        let cs = delta.hdr.cluster_size() as usize;
        let dst = st.zout.get_mut(..cs).ok_or(EIO)?;
        if st.inflater.inflate_raw(src, dst).is_err() {
            pr_err!("dm-qcow2: image {}: bad compressed cluster at {:#x}\n", d, host);
            return Err(EIO);
        }
        st.zkey = Some((d, host));
        Ok(())
    }
}

/// Write path.
impl Inner {
    fn write_bio(&self, st: &mut WorkerState, bio: &Bio) -> Result {
        let top = self.deltas.get(self.top()).ok_or(EIO)?;
        if bio.is_preflush() || bio.op() == Op::Flush {
            // Everything acknowledged so far is in the file: make it durable.
            top.file.fsync()?;
        }
        let size = u64::from(bio.size());
        if size == 0 {
            return Ok(());
        }
        let fua = bio.is_fua();
        let mut vaddr = bio.sector().checked_mul(SECTOR).ok_or(EIO)?;
        let cs = top.hdr.cluster_size();
        let mut done = 0u64;
        let mut synced = false;
        while done < size {
            let len = (cs - vaddr % cs).min(size - done);
            synced |= self.write_piece(st, Src::Bio(bio, done as u32), vaddr, len, fua)?;
            vaddr += len;
            done += len;
        }
        if fua && synced {
            top.file.fsync()?;
        }
        Ok(())
    }

    /// Writes `[vaddr, vaddr + len)` (inside one cluster) from the bio at
    /// `boff`. Returns whether it was written synchronously (copy-on-write),
    /// as opposed to an in-place write still in flight.
    fn write_piece(&self, st: &mut WorkerState, src: Src<'_>, vaddr: u64, len: u64, fua: bool) -> Result<bool> {
        let d = self.top();
        let delta = self.deltas.get(d).ok_or(EIO)?;
        let hdr = &delta.hdr;
        let off = hdr.offset_in_cluster(vaddr);
        let md = st.md.get_mut(d).ok_or(EIO)?;
        let l2_off = md.ensure_l2(&delta.file, hdr, vaddr)?;
        let (raw, bitmap) = md.l2_entry(&delta.file, hdr, l2_off, vaddr)?;
        let c = fmt::decode_l2(hdr, raw, bitmap).map_err(|e| corrupt(d, e))?;

        // Clusters (or subclusters) of our own are overwritten in place.
        let in_place = match c {
            Cluster::Normal { host, copied: true } => Some(host),
            Cluster::Extended { host: Some(h), copied: true, alloc, .. }
                if subclusters_set(hdr, alloc, off, len) =>
            {
                Some(h)
            }
            _ => None,
        };
        if let Some(h) = in_place {
            match src {
                Src::Bio(bio, boff) => {
                    delta.file.submit_bio_io(bio.split_ref(), boff, len as u32, h + off, fua, &self.inflight);
                    return Ok(false);
                }
                Src::Zero => {
                    let zero = IoBuf::new(len as usize)?;
                    delta.file.write_full(zero.get(..len as usize).ok_or(EIO)?, h + off)?;
                    return Ok(true);
                }
            }
        }

        // Copy-on-write: a cluster of our own holding what reads showed
        // so far, with the new data over it.
        // A host cluster shared with an internal snapshot (no COPIED bit) is
        // copied, not reused, and loses our reference once we point elsewhere.
        let own = raw & fmt::L2E_COPIED != 0;
        let (host, fresh) = match c {
            Cluster::ZeroPrealloc { host } if own => (host, false),
            Cluster::Extended { host: Some(h), .. } if own => (h, false),
            _ => (md.alloc_cluster(&delta.file, hdr)?, true),
        };
        let shared = match c {
            Cluster::Normal { host, copied: false } | Cluster::ZeroPrealloc { host } if !own => Some(host),
            Cluster::Extended { host: Some(h), copied: false, .. } => Some(h),
            _ => None,
        };
        let mut cow = st.cow.take().ok_or(EIO)?;
        let res = self.fill_cow(st, &mut cow, src, vaddr, len);
        let res = res.and_then(|()| {
            let buf = cow.get(..hdr.cluster_size() as usize).ok_or(EIO)?;
            delta.file.write_full(buf, host)
        });
        st.cow = Some(cow);
        let md = st.md.get_mut(d).ok_or(EIO)?;
        let res = res.and_then(|()| {
            // Data is on disk: now make it reachable.
            let (nraw, nbitmap) = if hdr.extended_l2() {
                (host | fmt::L2E_COPIED, u64::from(u32::MAX))
            } else {
                (fmt::encode_l2_normal(host, true), 0)
            };
            md.set_l2_entry(&delta.file, hdr, l2_off, vaddr, nraw, nbitmap)
        });
        if let Err(e) = res {
            if fresh {
                let _ = md.free_range(&delta.file, hdr, host, hdr.cluster_size());
            }
            return Err(e);
        }
        if let Cluster::Compressed { host: chost, len: clen } = c {
            // Free the clusters the compressed data occupied, as QEMU counts them.
            let start = chost & !(SECTOR - 1);
            let _ = md.free_range(&delta.file, hdr, start, clen + (chost - start));
        }
        if let Some(old) = shared {
            let _ = md.free_range(&delta.file, hdr, old, hdr.cluster_size());
        }
        Ok(true)
    }

    /// Fills `cow` with the whole cluster of `vaddr`: what reads return
    /// outside the write, the bio's data inside it.
    fn fill_cow(&self, st: &mut WorkerState, cow: &mut [u8], src: Src<'_>, vaddr: u64, len: u64) -> Result {
        let hdr = &self.deltas.get(self.top()).ok_or(EIO)?.hdr;
        let cs = hdr.cluster_size();
        let off = hdr.offset_in_cluster(vaddr);
        let base = vaddr - off;
        let (head, rest) = cow.split_at_mut(off as usize);
        let (mid, tail) = rest.split_at_mut(len as usize);
        self.read_into(st, base, head)?;
        match src {
            Src::Bio(bio, boff) => bio.copy_to(boff, mid)?,
            Src::Zero => mid.fill(0),
        }
        let tail_len = (cs - off - len) as usize;
        self.read_into(st, vaddr + len, tail.get_mut(..tail_len).ok_or(EIO)?)
    }

    /// Reads what the device shows at `[vaddr, vaddr + buf.len())` (inside
    /// one cluster) into `buf`, synchronously.
    fn read_into(&self, st: &mut WorkerState, vaddr: u64, buf: &mut [u8]) -> Result {
        let len = buf.len() as u64;
        let mut pos = 0u64;
        while pos < len {
            let (d, kind, rl) = self.resolve(st, self.top(), vaddr + pos, len - pos)?;
            let dst = buf.get_mut(pos as usize..(pos + rl) as usize).ok_or(EIO)?;
            match kind {
                RunKind::Zero | RunKind::Unallocated => dst.fill(0),
                RunKind::Data { host } => self.deltas.get(d).ok_or(EIO)?.file.read_full(dst, host)?,
                RunKind::Compressed { host, len: clen } => {
                    dst.copy_from_slice(self.inflated(st, d, host, clen, vaddr + pos, rl)?);
                }
            }
            pos += rl;
        }
        Ok(())
    }
}

/// Where written data comes from.
#[derive(Clone, Copy)]
enum Src<'a> {
    /// The bio's data, from this byte offset.
    Bio(&'a Bio, u32),
    /// Zeroes.
    Zero,
}

/// Discard and write-zeroes.
impl Inner {
    fn zero_bio(&self, st: &mut WorkerState, bio: &Bio) -> Result {
        let top = self.deltas.get(self.top()).ok_or(EIO)?;
        let discard = bio.op() == Op::Discard;
        let unmap = discard || !bio.is_nounmap();
        let size = u64::from(bio.size());
        let mut vaddr = bio.sector().checked_mul(SECTOR).ok_or(EIO)?;
        let end = vaddr.checked_add(size).ok_or(EIO)?;
        let cs = top.hdr.cluster_size();
        while vaddr < end {
            let len = (cs - vaddr % cs).min(end - vaddr);
            if len == cs && top.hdr.version >= 3 {
                self.zero_cluster(st, vaddr, unmap)?;
            } else if !discard {
                // Partial clusters (and v2 images, which have no zero flag)
                // get zeroes written.
                self.write_piece(st, Src::Zero, vaddr, len, false)?;
            } else if len == cs {
                // v2 discard: zero what the device shows (lower data must
                // not reappear), keeping the cluster.
                self.write_piece(st, Src::Zero, vaddr, len, false)?;
            }
            // A partial-cluster discard is a hint we may ignore.
            vaddr += len;
        }
        Ok(())
    }

    /// Makes the whole cluster of `vaddr` read as zeroes with the zero flag
    /// (v3), freeing its host cluster if `unmap` (else keeping it preallocated).
    fn zero_cluster(&self, st: &mut WorkerState, vaddr: u64, unmap: bool) -> Result {
        let d = self.top();
        let delta = self.deltas.get(d).ok_or(EIO)?;
        let hdr = &delta.hdr;
        let md = st.md.get_mut(d).ok_or(EIO)?;
        let l2_off = md.ensure_l2(&delta.file, hdr, vaddr)?;
        let (raw, bitmap) = md.l2_entry(&delta.file, hdr, l2_off, vaddr)?;
        let c = fmt::decode_l2(hdr, raw, bitmap).map_err(|e| corrupt(d, e))?;
        // Our reference to the host cluster, if any; only one we own outright
        // (COPIED) may stay as preallocation.
        let own = raw & fmt::L2E_COPIED != 0;
        let referenced = match c {
            Cluster::Normal { host, .. } | Cluster::ZeroPrealloc { host } => Some(host),
            Cluster::Extended { host: Some(h), .. } => Some(h),
            _ => None,
        };
        let keep = if unmap || !own { None } else { referenced };
        let (nraw, nbitmap) = if hdr.extended_l2() {
            // All subclusters zero; the host offset may stay as preallocation.
            (keep.map_or(0, |h| h | fmt::L2E_COPIED), u64::from(u32::MAX) << 32)
        } else {
            (fmt::encode_l2_zero(keep, keep.is_some()), 0)
        };
        md.set_l2_entry(&delta.file, hdr, l2_off, vaddr, nraw, nbitmap)?;
        // The entry no longer points there: now the space may go.
        if keep.is_none() {
            if let Some(h) = referenced {
                // An overlapping read or write may still be in flight to the
                // old host cluster: it must land before the cluster can be
                // handed out again.
                self.inflight.wait_idle();
                let _ = md.free_range(&delta.file, hdr, h, hdr.cluster_size());
            }
        }
        if let Cluster::Compressed { host: chost, len: clen } = c {
            let start = chost & !(SECTOR - 1);
            let _ = md.free_range(&delta.file, hdr, start, clen + (chost - start));
        }
        Ok(())
    }
}

/// Whether every subcluster touched by `[off, off + len)` has its bit in `bits`.
fn subclusters_set(hdr: &Header, bits: u32, off: u64, len: u64) -> bool {
    let scs = hdr.subcluster_size();
    if len == 0 || scs == 0 {
        return true;
    }
    let first = off / scs;
    let last = (off + len - 1) / scs;
    (first..=last).all(|i| i < 32 && bits & (1 << i) != 0)
}

/// Per-table state kept in `ti->private`.
pub(crate) struct Qcow2 {
    // Dropped first: destroying the queue waits for the worker, which holds
    // references to `inner`.
    wq: OwnedQueue,
    inner: Arc<Inner>,
}

impl Qcow2 {
    fn queue(&self, bio: Bio) {
        self.inner.pending.lock().push(bio);
        // Already queued: the running or pending pass will see the bio.
        let _ = self.wq.enqueue(self.inner.clone());
    }

    /// Rewrites the top's header: autoclear bits cleared (we do not keep
    /// what they vouch for, e.g. bitmaps, up to date) and the dirty bit set
    /// or cleared if asked. v2 headers have neither.
    fn update_header(&self, dirty: Option<bool>) -> Result {
        let top = self.inner.deltas.last().ok_or(EIO)?;
        if top.hdr.version < 3 {
            return Ok(());
        }
        let mut page = IoBuf::new(DIO_ALIGN)?;
        top.file.read_full(&mut page, 0)?;
        let word = |p: &IoBuf, at: usize| -> Result<u64> {
            let mut b = [0u8; 8];
            b.copy_from_slice(p.get(at..at + 8).ok_or(EIO)?);
            Ok(u64::from_be_bytes(b))
        };
        let mut incompat = word(&page, HDR_INCOMPAT)?;
        match dirty {
            Some(true) => incompat |= fmt::incompat::DIRTY,
            Some(false) => incompat &= !fmt::incompat::DIRTY,
            None => {}
        }
        if incompat == word(&page, HDR_INCOMPAT)? && word(&page, HDR_AUTOCLEAR)? == 0 {
            return Ok(());
        }
        page.get_mut(HDR_INCOMPAT..HDR_INCOMPAT + 8).ok_or(EIO)?.copy_from_slice(&incompat.to_be_bytes());
        page.get_mut(HDR_AUTOCLEAR..HDR_AUTOCLEAR + 8).ok_or(EIO)?.fill(0);
        top.file.write_full(&page, 0)?;
        top.file.fsync()
    }

    /// Makes everything written durable (read-only tables have nothing to do).
    fn sync(&self) {
        if !self.inner.writable {
            return;
        }
        if let Some(top) = self.inner.deltas.last() {
            if let Err(e) = top.file.fsync() {
                pr_err!("dm-qcow2: fsync of the top image failed: {:?}\n", e);
            }
        }
    }

    fn check_chain(deltas: &[Delta], len_sectors: u64) -> Result<(), CtrError> {
        let base = deltas.first().ok_or_else(|| ctr_err(EINVAL, c_str!("No images given")))?;
        if base.hdr.has_backing_file() {
            return Err(ctr_err(ENOENT, c_str!("Base image has a backing file")));
        }
        for pair in deltas.windows(2) {
            let (lo, up) = (&pair[0].hdr, &pair[1].hdr);
            if lo.cluster_bits != up.cluster_bits {
                return Err(ctr_err(EXDEV, c_str!("Deltas differ in cluster size")));
            }
            if lo.extended_l2() != up.extended_l2() {
                return Err(ctr_err(EXDEV, c_str!("Deltas differ in extended L2")));
            }
            if lo.size > up.size {
                return Err(ctr_err(ebadslt(), c_str!("Lower delta larger than the one above it")));
            }
        }
        let top = deltas.last().ok_or_else(|| ctr_err(EINVAL, c_str!("No images given")))?;
        if len_sectors.checked_mul(SECTOR).map_or(true, |l| l > top.hdr.size) {
            return Err(ctr_err(ebadslt(), c_str!("Top image smaller than the table")));
        }
        Ok(())
    }
}

impl dm::Target for Qcow2 {
    const NAME: &'static CStr = c_str!("qcow2");
    const VERSION: [u32; 3] = [1, 0, 0];
    const FEATURES: u64 = dm::features::SINGLETON;

    fn ctr(ti: &mut TargetCtr<'_>, args: &[&CStr]) -> Result<KBox<Self>, CtrError> {
        if args.is_empty() {
            return Err(ctr_err(EINVAL, c_str!("No images given")));
        }
        if ti.begin() != 0 {
            return Err(ctr_err(EINVAL, c_str!("Target must start at sector 0")));
        }
        let writable = ti.table_writable();
        let mut deltas = KVec::with_capacity(args.len(), GFP_KERNEL).map_err(oom)?;
        for (i, a) in args.iter().enumerate() {
            let d = Delta::open(a, i + 1 == args.len(), writable)?;
            deltas.push(d, GFP_KERNEL).map_err(oom)?;
        }
        Self::check_chain(&deltas, ti.len())?;

        let cs = deltas.last().map_or(0, |d| d.hdr.cluster_size()) as usize;
        let mut md = KVec::with_capacity(deltas.len(), GFP_KERNEL).map_err(oom)?;
        for (i, d) in deltas.iter().enumerate() {
            let m = DeltaMd::load(i, &d.file, &d.hdr, writable && i + 1 == deltas.len())
                .map_err(|e| ctr_err(e, c_str!("Cannot read image metadata")))?;
            md.push(m, GFP_KERNEL).map_err(oom)?;
        }
        let st = WorkerState {
            md,
            cow: Some(IoBuf::new(cs).map_err(oom)?),
            inflater: Inflater::new().map_err(oom)?,
            // A compressed cluster spans at most two clusters of input, plus
            // alignment slack on both ends.
            zin: IoBuf::new(2 * cs + 2 * DIO_ALIGN).map_err(oom)?,
            zout: IoBuf::new(cs).map_err(oom)?,
            zkey: None,
        };
        let inflight = IoCounter::new().map_err(oom)?;
        let inner = Arc::pin_init(
            pin_init!(Inner {
                deltas,
                writable,
                inflight,
                pending <- new_spinlock!(BioList::new(), "dm_qcow2::pending"),
                state <- new_mutex!(st, "dm_qcow2::state"),
                work <- new_work!("dm_qcow2::work"),
            }),
            GFP_KERNEL,
        )
        .map_err(|e| ctr_err(e, c_str!("Out of memory")))?;
        let wq = OwnedQueue::new(c_str!("dm-qcow2")).map_err(oom)?;

        ti.set_num_flush_bios(1);
        ti.set_flush_supported(true);
        if writable {
            ti.set_num_discard_bios(1);
            ti.set_discards_supported(true);
            ti.set_num_write_zeroes_bios(1);
        }
        KBox::new(Self { wq, inner }, GFP_KERNEL).map_err(oom)
    }

    fn map(&self, bio: Bio) {
        match bio.op() {
            Op::Read if bio.size() > 0 => self.queue(bio),
            Op::Write | Op::Flush | Op::Discard | Op::WriteZeroes if self.inner.writable => self.queue(bio),
            // Read-only table: an empty flush has nothing to make durable.
            _ if bio.size() == 0 => bio.end(Ok(())),
            _ => bio.end(Err(EIO)),
        }
    }

    fn status(&self, kind: StatusType, out: &mut Emit<'_>) {
        let Some(top) = self.inner.deltas.last() else {
            return;
        };
        let _ = match kind {
            StatusType::Table => write!(
                out,
                "{} v{} {}",
                self.inner.deltas.len(),
                top.hdr.version,
                top.hdr.cluster_size() / SECTOR
            ),
            StatusType::Info | StatusType::Ima => Ok(()),
        };
    }

    fn message(&self, args: &[&CStr], out: &mut Emit<'_>) -> Result {
        if !task::capable_sys_admin() {
            return Err(EPERM);
        }
        let cmd = args.first().ok_or(EINVAL)?.as_bytes();
        match cmd {
            b"get_img_name" | b"get_img_id" => {
                let id = args
                    .get(1)
                    .and_then(|a| a.to_str().ok())
                    .and_then(|s| s.parse::<usize>().ok())
                    .ok_or(EINVAL)?;
                if let Some(d) = self.inner.deltas.get(id) {
                    let mut buf = KVec::from_elem(0u8, 4096, GFP_KERNEL)?;
                    let p = d.file.path(&mut buf)?;
                    let _ = writeln!(out, "{}", core::str::from_utf8(p).unwrap_or("?"));
                }
                Ok(())
            }
            b"get_errors" => {
                let _ = write!(out, "wants_check=0\nmd_writeback_error=0\ntruncate_error=0\n");
                Ok(())
            }
            b"get_event" => Ok(()),
            _ => Err(ENOTTY),
        }
    }

    fn postsuspend(&self) {
        self.wq.flush();
        self.sync();
        if self.inner.writable && param::kernel_sets_dirty_bit() {
            if let Err(e) = self.update_header(Some(false)) {
                pr_err!("dm-qcow2: cannot clear the dirty bit: {:?}\n", e);
            }
        }
    }

    fn preresume(&self) -> Result {
        if !self.inner.writable {
            return Ok(());
        }
        let dirty = param::kernel_sets_dirty_bit().then_some(true);
        self.update_header(dirty).inspect_err(|e| {
            pr_err!("dm-qcow2: cannot update the image header: {:?}\n", e);
        })
    }

    fn io_hints(&self, limits: &mut QueueLimits<'_>) {
        // The strictest of the devices under the image files.
        let strictest = |f: fn(&File) -> u32| self.inner.deltas.iter().map(|d| f(&d.file)).max().unwrap_or(0);
        let lbs = strictest(File::logical_block_size).clamp(SECTOR as u32, DIO_ALIGN as u32);
        let dma = strictest(File::dma_alignment).max(lbs - 1);
        limits.set_logical_block_size(lbs);
        limits.set_dma_alignment(dma);
        limits.set_physical_block_size(lbs);
        limits.set_io_min(lbs);
        if let Some(top) = self.inner.deltas.last() {
            let cs = top.hdr.cluster_size() as u32;
            limits.set_io_opt(cs);
            if self.inner.writable {
                // Whole clusters are deallocated; we split bios ourselves.
                limits.set_discard(cs, u32::MAX >> 9);
                limits.set_max_write_zeroes(u32::MAX >> 9);
            } else {
                limits.set_discard(0, 0);
                limits.set_max_write_zeroes(0);
            }
        }
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        // Bios cannot be pending at destruction (device-mapper waits for them),
        // but make sure the worker is idle before the chain goes away.
        self.wq.flush();
        self.sync();
    }
}
