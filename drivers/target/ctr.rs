// SPDX-License-Identifier: GPL-2.0

//! The constructor: the table line's descriptors, each image's header and
//! the chain's consistency checked (every error as the C target's), the
//! metadata loaded and the table's state built.

use super::*;

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

impl Delta {
    fn open(fd_arg: &CStr, is_top: bool, writable: bool) -> Result<Self, CtrError> {
        let fd = fd_arg
            .to_str()
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
            .ok_or_else(|| ctr_err(EINVAL, c_str!("Wrong fd")))?;
        // As the C target: a number that is no open descriptor is ENOENT.
        let mut file =
            File::fget(fd).map_err(|_| ctr_err(ENOENT, c_str!("Error attaching file")))?;
        if !file.is_regular() {
            return Err(ctr_err(EINVAL, c_str!("Not a regular file")));
        }
        // Descriptors opened without O_DIRECT are fine (the vendor's helper
        // script opens images with a plain `exec {fd}<>`, as the C target
        // allows): every request sets IOCB_DIRECT itself, and direct I/O
        // writes back and invalidates page-cache pages of its range first.
        if !file.can_direct_io() {
            return Err(ctr_err(EINVAL, c_str!("File system cannot do direct I/O")));
        }
        // Writes would land at the end of the file, wherever they were meant
        // to go (our own I/O ignores the flag, but the file is shared).
        if file.is_append() {
            return Err(ctr_err(EINVAL, c_str!("Image opened with O_APPEND")));
        }
        if !file.readable() {
            return Err(ctr_err(EACCES, c_str!("Image is not opened for reading")));
        }
        if is_top && writable && !file.writable() {
            return Err(ctr_err(
                EACCES,
                c_str!("Top image is not opened for writing"),
            ));
        }
        let hdr = Self::read_header(&file, is_top && writable)?;
        // Where the tables' walks ask about holes (SEEK_DATA).
        file.open_probe();
        Ok(Self { file, hdr })
    }

    /// Reads and checks the header of `file` (`rw`: the image takes writes).
    pub(crate) fn read_header(file: &File, rw: bool) -> Result<Header, CtrError> {
        let mut buf =
            IoBuf::new(Header::MIN_READ).map_err(|e| ctr_err(e, c_str!("Out of memory")))?;
        let n = file
            .read_at(&mut buf, 0)
            .map_err(|e| ctr_err(e, c_str!("Cannot read image header")))?;
        // Only what was read: a truncated header must fail as such.
        let hdr = Header::parse(buf.get(..n).unwrap_or(&[])).map_err(fmt_err)?;
        if u64::from(hdr.cluster_bits) < u64::from(kernel::bindings::PAGE_SHIFT) {
            return Err(ctr_err(
                eopnotsupp(),
                c_str!("Cluster size below PAGE_SIZE"),
            ));
        }
        // O_DIRECT cannot address less than the host's logical block.
        if hdr.subcluster_size() < u64::from(file.logical_block_size()) {
            return Err(ctr_err(
                eopnotsupp(),
                c_str!("Subclusters smaller than the host's logical block size"),
            ));
        }
        // A refcount table's move cut short by a crash leaves the file longer
        // than the table describes (QEMU opens it): what it can leave is
        // accepted (nothing durable points there).
        if file.size() > crate::meta::crash_size_limit(&hdr) {
            return Err(ctr_err(
                EFBIG,
                c_str!("File larger than its refcount table describes"),
            ));
        }
        // Lazy refcounts left dirty by a crash are stale: allocating from them
        // could hand out clusters in use.
        if rw
            && hdr.incompatible_features & fmt::incompat::DIRTY != 0
            && hdr.compatible_features & COMPAT_LAZY_REFCOUNTS != 0
        {
            return Err(ctr_err(
                EINVAL,
                c_str!("Image is dirty: repair it with qemu-img check -r all"),
            ));
        }
        Ok(hdr)
    }
}

impl Qcow2 {
    pub(super) fn check_chain(deltas: &[Delta], len_sectors: u64) -> Result<(), CtrError> {
        let base = deltas
            .first()
            .ok_or_else(|| ctr_err(EINVAL, c_str!("No images given")))?;
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
                return Err(ctr_err(
                    ebadslt(),
                    c_str!("Lower delta larger than the one above it"),
                ));
            }
        }
        let top = deltas
            .last()
            .ok_or_else(|| ctr_err(EINVAL, c_str!("No images given")))?;
        if len_sectors
            .checked_mul(SECTOR)
            .map_or(true, |l| l > top.hdr.size)
        {
            return Err(ctr_err(
                ebadslt(),
                c_str!("Top image smaller than the table"),
            ));
        }
        Ok(())
    }

    /// `ctr`: builds the table from its line (the descriptors, base first).
    pub(super) fn new(ti: &mut TargetCtr<'_>, args: &[&CStr]) -> Result<KBox<Self>, CtrError> {
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
            // One file twice in the chain would be written as the top and
            // read as a lower delta (or merged into itself): refuse it, also
            // through another fd, path or hard link.
            if deltas.iter().any(|o: &Delta| o.file.same_file(&d.file)) {
                return Err(ctr_err(
                    EINVAL,
                    c_str!("Same image file given twice in the chain"),
                ));
            }
            deltas.push(d, GFP_KERNEL).map_err(oom)?;
        }
        Self::check_chain(&deltas, ti.len())?;

        let cs = deltas.last().map_or(0, |d| d.hdr.cluster_size()) as usize;
        let bufs = ClusterBufs::new(cs).map_err(oom)?;
        let inflight = IoCounter::new().map_err(oom)?;
        let mut md = KVec::with_capacity(deltas.len(), GFP_KERNEL).map_err(oom)?;
        for (i, d) in deltas.iter().enumerate() {
            let rw = writable && i + 1 == deltas.len();
            let m = DeltaMd::load(i, &d.file, &d.hdr, rw, inflight.clone()).map_err(|e| {
                if e == euclean() {
                    ctr_err(
                        e,
                        c_str!(
                            "Metadata cluster with refcount 0: repair with qemu-img check -r all"
                        ),
                    )
                } else {
                    ctr_err(e, c_str!("Cannot read image metadata"))
                }
            })?;
            md.push(m, GFP_KERNEL).map_err(oom)?;
        }
        let mut arcs = KVec::with_capacity(deltas.len(), GFP_KERNEL).map_err(oom)?;
        for d in deltas {
            arcs.push(Arc::new(d, GFP_KERNEL).map_err(oom)?, GFP_KERNEL)
                .map_err(oom)?;
        }
        let st = WorkerState {
            deltas: arcs,
            md,
            cow: Some(bufs.cow),
            gang: CowGang::new(),
            inflater: Inflater::new().map_err(oom)?,
            zin: bufs.zin,
            zout: bufs.zout,
            zkey: None,
            merge: None,
            parked: BioList::new(),
            unsynced: BioList::new(),
            fua: false,
            flush: false,
            // A reloaded table is built while the old one still writes the
            // same files: read them again when it is resumed.
            stale: true,
            // Turned on by that first resume.
            fast: None,
            no_timer: false,
        };
        // The status view: sized for the chain now (see `publish_status`),
        // filled when the state is first unlocked below.
        let status = StatusView {
            images: 0,
            counts: KVec::from_elem(None, st.deltas.len(), GFP_KERNEL).map_err(oom)?,
            merge: merge::MergeView::NONE,
            top: (0, 0),
        };
        let refs = InflightRefs::new().map_err(oom)?;
        let wq = OwnedQueue::new(c_str!("dm-qcow2"), true).map_err(oom)?;
        let retry_wq = OwnedQueue::new(c_str!("dm-qcow2-retry"), true).map_err(oom)?;
        let merge_wq = OwnedQueue::new(c_str!("dm-qcow2-merge"), false).map_err(oom)?;
        let commit_wq = OwnedQueue::new(c_str!("dm-qcow2-commit"), false).map_err(oom)?;
        let count_wq = OwnedQueue::new(c_str!("dm-qcow2-count"), false).map_err(oom)?;
        let (len_sectors, link) = (ti.len(), ti.link());
        let inner = Arc::pin_init(
            pin_init!(Inner {
                writable,
                len_sectors,
                inflight,
                refs,
                link,
                wq,
                retry_wq,
                merge_wq,
                commit_wq,
                count_wq,
                commit_armed: AtomicBool::new(false),
                commit_due: AtomicBool::new(false),
                errors: Errors::default(),
                enospc_event: AtomicBool::new(false),
                parked_count: AtomicUsize::new(0),
                late_nospc: BioStack::new(),
                enospc_episode: AtomicBool::new(false),
                retry_round: AtomicU64::new(0),
                event_round: AtomicU64::new(u64::MAX),
                suspending: AtomicBool::new(false),
                fast_bios: AtomicU64::new(0),
                express_flushes: AtomicU64::new(0),
                fast_fua: AtomicU64::new(0),
                md_durable: AtomicBool::new(false),
                queued_bios: AtomicUsize::new(0),
                idle_streak: AtomicU32::new(0),
                express_inline: AtomicU32::new(0),
                guest_io: AtomicBool::new(false),
                fast <- new_spinlock!(None, "dm_qcow2::fast"),
                pending <- new_spinlock!(BioList::new(), "dm_qcow2::pending"),
                state <- new_mutex!(st, "dm_qcow2::state"),
                status <- new_spinlock!(status, "dm_qcow2::status"),
                work <- new_work!("dm_qcow2::work"),
                merge_work <- new_work!("dm_qcow2::merge_work"),
                retry_work <- new_work!("dm_qcow2::retry_work"),
                commit_work <- new_work!("dm_qcow2::commit_work"),
                count_work <- new_work!("dm_qcow2::count_work"),
                fua_landed: BioStack::new(),
                sync_work <- new_work!("dm_qcow2::sync_work"),
            }),
            GFP_KERNEL,
        )
        .map_err(|e| ctr_err(e, c_str!("Out of memory")))?;
        // Fill the status view.
        drop(inner.lock_state());

        ti.set_num_flush_bios(1);
        ti.set_flush_supported(true);
        if writable {
            ti.set_num_discard_bios(1);
            ti.set_discards_supported(true);
            ti.set_num_write_zeroes_bios(1);
        }
        let lanes = Lanes::new(&inner).map_err(oom)?;
        KBox::new(Self { inner, lanes }, GFP_KERNEL).map_err(oom)
    }
}
