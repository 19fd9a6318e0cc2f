// SPDX-License-Identifier: GPL-2.0

//! The `qcow2` target: constructor checks, the bio queue and the read path.

use crate::kx::bio::{Bio, BioList, Op};
use crate::kx::dm::{self, CtrError, Emit, QueueLimits, StatusType, TargetCtr};
use crate::kx::file::{File, IoBuf, DIO_ALIGN};
use crate::kx::task::{self, code::{ebadslt, eopnotsupp}};
use crate::kx::wq::OwnedQueue;
use crate::kx::zlib::Inflater;
use crate::qcow2_format::{self as fmt, Cluster, FormatError, Header, RunKind};
use core::fmt::Write;
use kernel::error::code::*;
use kernel::prelude::*;
use kernel::rbtree::RBTree;
use kernel::str::CStr;
use kernel::sync::{Arc, Mutex, SpinLock};
use kernel::workqueue::{impl_has_work, new_work, Work, WorkItem};
use kernel::{c_str, new_mutex, new_spinlock};

/// Metadata pages cached per delta before the oldest-keyed ones are dropped.
const MAX_CACHED_PAGES: usize = 4096;
/// Size of a cached metadata page.
const MD_PAGE: u64 = 4096;
/// Smallest cluster size with extended L2 entries (QEMU's limit): keeps every
/// subcluster a whole number of sectors.
const MIN_EXTL2_CLUSTER_BITS: u32 = 14;
const SECTOR: u64 = 512;

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

/// One image of the chain: its file, header and L1 table (read-only here).
struct Delta {
    file: File,
    hdr: Header,
    l1: KVVec<u64>,
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
        let hdr = Header::parse(buf.get(..n).unwrap_or(&[])).map_err(fmt_err)?;
        if u64::from(hdr.cluster_bits) < u64::from(kernel::bindings::PAGE_SHIFT) {
            return Err(ctr_err(eopnotsupp(), c_str!("Cluster size below PAGE_SIZE")));
        }
        if hdr.extended_l2() && hdr.cluster_bits < MIN_EXTL2_CLUSTER_BITS {
            return Err(ctr_err(eopnotsupp(), c_str!("Extended L2 needs clusters of 16K or more")));
        }
        if file.size() > hdr.max_file_size() {
            return Err(ctr_err(EFBIG, c_str!("File larger than its refcount table describes")));
        }
        let l1 = Self::load_l1(&file, &hdr).map_err(|e| ctr_err(e, c_str!("Cannot read L1 table")))?;
        Ok(Self { file, hdr, l1 })
    }

    fn load_l1(file: &File, hdr: &Header) -> Result<KVVec<u64>> {
        let n = hdr.l1_size as usize;
        let mut l1 = KVVec::with_capacity(n, GFP_KERNEL)?;
        // Read in bounded chunks: the L1 table may be up to 32 MiB.
        const CHUNK: usize = 256 * 1024;
        let mut buf = IoBuf::new(CHUNK.min(n * 8).max(DIO_ALIGN))?;
        let mut pos = hdr.l1_table_offset;
        while l1.len() < n {
            let want = ((n - l1.len()) * 8).next_multiple_of(DIO_ALIGN).min(buf.len());
            let chunk = buf.get_mut(..want).ok_or(EINVAL)?;
            let got = file.read_at(chunk, pos)?;
            // Past the end of the file the table reads as zeroes (unallocated).
            chunk.get_mut(got..).unwrap_or(&mut []).fill(0);
            for e in chunk.chunks_exact(8) {
                if l1.len() == n {
                    break;
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(e);
                l1.push(u64::from_be_bytes(b), GFP_KERNEL)?;
            }
            pos += want as u64;
        }
        Ok(l1)
    }
}

/// Per-delta cache of metadata pages (L2 tables), keyed by file offset.
struct MdCache {
    pages: RBTree<u64, IoBuf>,
    count: usize,
}

impl MdCache {
    fn new() -> Self {
        Self { pages: RBTree::new(), count: 0 }
    }

    fn page(&mut self, file: &File, off: u64) -> Result<&IoBuf> {
        if self.pages.get(&off).is_none() {
            if self.count >= MAX_CACHED_PAGES {
                if let Some(c) = self.pages.cursor_front() {
                    drop(c.remove_current());
                    self.count -= 1;
                }
            }
            let mut buf = IoBuf::new(MD_PAGE as usize)?;
            let got = file.read_at(&mut buf, off)?;
            buf.get_mut(got..).unwrap_or(&mut []).fill(0);
            self.pages.try_create_and_insert(off, buf, GFP_KERNEL)?;
            self.count += 1;
        }
        self.pages.get(&off).ok_or(EIO)
    }
}

/// State only the worker touches.
struct WorkerState {
    caches: KVec<MdCache>,
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
        let hdr = &delta.hdr;
        let raw = *usize::try_from(hdr.l1_index(vaddr))
            .ok()
            .and_then(|i| delta.l1.get(i))
            .ok_or(EIO)?;
        let Some(l1e) = fmt::decode_l1(hdr, raw).map_err(|e| self.corrupt(d, e))? else {
            return Ok(Cluster::Unallocated);
        };
        let off = hdr
            .l2_index(vaddr)
            .checked_mul(hdr.l2_entry_bytes())
            .and_then(|o| o.checked_add(l1e.l2_offset))
            .ok_or(EIO)?;
        let cache = st.caches.get_mut(d).ok_or(EIO)?;
        let page = cache.page(&delta.file, off & !(MD_PAGE - 1))?;
        let at = (off & (MD_PAGE - 1)) as usize;
        let word = |i: usize| -> Result<u64> {
            let mut b = [0u8; 8];
            b.copy_from_slice(page.get(at + i * 8..at + i * 8 + 8).ok_or(EIO)?);
            Ok(u64::from_be_bytes(b))
        };
        let raw = word(0)?;
        let bitmap = if hdr.extended_l2() { word(1)? } else { 0 };
        fmt::decode_l2(hdr, raw, bitmap).map_err(|e| self.corrupt(d, e))
    }

    fn corrupt(&self, d: usize, e: FormatError) -> Error {
        pr_err!("dm-qcow2: image {}: {}\n", d, e.msg());
        Error::from_errno(-e.errno())
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
                    f.submit_bio_io(bio.split_ref(), off, rl32, host, false);
                }
                RunKind::Compressed { host, len: clen } => {
                    let hdr = &self.deltas.get(d).ok_or(EIO)?.hdr;
                    self.inflate(st, d, host, clen)?;
                    let in_cl = hdr.offset_in_cluster(vaddr + pos) as usize;
                    let src = st.zout.get(in_cl..in_cl + rl as usize).ok_or(EIO)?;
                    bio.copy_from(off, src)?;
                }
            }
            pos += rl;
        }
        Ok(())
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
        let got = delta.file.read_at(zin, start)?;
        zin.get_mut(got..).unwrap_or(&mut []).fill(0);
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

/// Per-table state kept in `ti->private`.
pub(crate) struct Qcow2 {
    // Dropped first: destroying the queue waits for the worker, which holds
    // references to `inner`.
    wq: OwnedQueue,
    inner: Arc<Inner>,
}

impl Qcow2 {
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
        if writable {
            return Err(ctr_err(eopnotsupp(), c_str!("Writable tables are not supported yet")));
        }

        let cs = deltas.last().map_or(0, |d| d.hdr.cluster_size()) as usize;
        let mut caches = KVec::with_capacity(deltas.len(), GFP_KERNEL).map_err(oom)?;
        for _ in 0..deltas.len() {
            caches.push(MdCache::new(), GFP_KERNEL).map_err(oom)?;
        }
        let st = WorkerState {
            caches,
            inflater: Inflater::new().map_err(oom)?,
            // A compressed cluster spans at most two clusters of input, plus
            // alignment slack on both ends.
            zin: IoBuf::new(2 * cs + 2 * DIO_ALIGN).map_err(oom)?,
            zout: IoBuf::new(cs).map_err(oom)?,
            zkey: None,
        };
        let inner = Arc::pin_init(
            pin_init!(Inner {
                deltas,
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
        KBox::new(Self { wq, inner }, GFP_KERNEL).map_err(oom)
    }

    fn map(&self, bio: Bio) {
        match bio.op() {
            Op::Read if bio.size() > 0 => {
                self.inner.pending.lock().push(bio);
                // Already queued: the running or pending pass will see the bio.
                let _ = self.wq.enqueue(self.inner.clone());
            }
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
    }

    fn io_hints(&self, limits: &mut QueueLimits<'_>) {
        let lbs = self
            .inner
            .deltas
            .iter()
            .map(|d| d.file.logical_block_size())
            .max()
            .unwrap_or(SECTOR as u32)
            .clamp(SECTOR as u32, DIO_ALIGN as u32);
        limits.set_logical_block_size(lbs);
        limits.set_physical_block_size(lbs);
        limits.set_io_min(lbs);
        if let Some(top) = self.inner.deltas.last() {
            limits.set_io_opt(top.hdr.cluster_size() as u32);
        }
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        // Bios cannot be pending at destruction (device-mapper waits for them),
        // but make sure the worker is idle before the chain goes away.
        self.wq.flush();
    }
}
