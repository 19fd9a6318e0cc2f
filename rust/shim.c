// SPDX-License-Identifier: GPL-2.0
/* C shim of dm-qcow2; see shim.h. */

#include <linux/bio.h>
#include <linux/eventfd.h>
#include <linux/file.h>
#include <linux/percpu-refcount.h>
#include <linux/rcupdate.h>
#include <linux/slab.h>
#include <linux/completion.h>
#include <linux/mutex.h>
#include <linux/device-mapper.h>
#include <linux/blkdev.h>
#include <linux/fs.h>
#include <linux/ioprio.h>
#include <linux/module.h>
#include <linux/sched/mm.h>
#include <linux/uio.h>
#include <linux/wait_bit.h>
#include <linux/workqueue.h>
#include "shim.h"

static bool kernel_sets_dirty_bit;
module_param(kernel_sets_dirty_bit, bool, 0444);
MODULE_PARM_DESC(kernel_sets_dirty_bit,
		 "Set the qcow2 dirty bit on resume and clear it on suspend");

static unsigned int md_cache_pages = 4096;
module_param(md_cache_pages, uint, 0644);
MODULE_PARM_DESC(md_cache_pages,
		 "Metadata pages (4 KiB) cached per image before clean ones are dropped");

static unsigned int enospc_retry_ms = 1000;
module_param(enospc_retry_ms, uint, 0644);
MODULE_PARM_DESC(enospc_retry_ms,
		 "Milliseconds between retries of writes waiting for space (100..600000; the C target: 20000)");

unsigned int dmq_enospc_retry_ms(void)
{
	return READ_ONCE(enospc_retry_ms);
}

unsigned int dmq_md_cache_pages(void)
{
	return READ_ONCE(md_cache_pages);
}

bool dmq_kernel_sets_dirty_bit(void)
{
	return READ_ONCE(kernel_sets_dirty_bit);
}

/*
 * bio_inc_remaining() without its unconditional bio_set_flag(), a plain
 * read-modify-write of bi_flags: two references of one bio split on two
 * CPUs at once would race on it. BIO_CHAIN is set by the first split,
 * when the caller's reference is the bio's only one (there is no other
 * thread to race with), and cleared by bio_endio() only with the last
 * reference: later splits, which may run concurrently, only read it.
 */
void dmq_bio_inc_remaining(struct bio *bio)
{
	if (!bio_flagged(bio, BIO_CHAIN))
		bio_set_flag(bio, BIO_CHAIN);
	/* The flag before the count, as bio_inc_remaining() orders them. */
	smp_mb__before_atomic();
	atomic_inc(&bio->__bi_remaining);
}

/*
 * Make a bio whose completion ran (down to the target's end_io, which took
 * it back with DM_ENDIO_INCOMPLETE) completable again: no error, one
 * completion reference, not chained.
 */
void dmq_bio_rearm(struct bio *bio)
{
	bio->bi_status = BLK_STS_OK;
	bio_clear_flag(bio, BIO_CHAIN);
	atomic_set(&bio->__bi_remaining, 1);
}

/* Position @it on [off, off + len) of @bio; false when out of range. */
static bool dmq_bio_range(struct bio *bio, u32 off, u32 len, struct bvec_iter *it)
{
	*it = bio->bi_iter;
	if (off > it->bi_size || len > it->bi_size - off)
		return false;
	bio_advance_iter(bio, it, off);
	it->bi_size = len;
	return true;
}

/* Only a read bio's pages are ours to fill (a write's may be read-only). */
static bool dmq_bio_fillable(struct bio *bio)
{
	return bio_has_data(bio) && bio_op(bio) == REQ_OP_READ;
}

int dmq_bio_zero(struct bio *bio, u32 off, u32 len)
{
	struct bvec_iter it, pos;
	struct bio_vec bv;

	if (!dmq_bio_fillable(bio) || !dmq_bio_range(bio, off, len, &it))
		return -EINVAL;
	__bio_for_each_segment(bv, bio, pos, it)
		memzero_bvec(&bv);
	return 0;
}

int dmq_bio_copy_from(struct bio *bio, u32 off, const void *src, u32 len)
{
	struct bvec_iter it, pos;
	struct bio_vec bv;

	if (!dmq_bio_fillable(bio) || !dmq_bio_range(bio, off, len, &it))
		return -EINVAL;
	__bio_for_each_segment(bv, bio, pos, it) {
		memcpy_to_bvec(&bv, src);
		src += bv.bv_len;
	}
	return 0;
}

int dmq_bio_copy_to(struct bio *bio, u32 off, void *dst, u32 len)
{
	struct bvec_iter it, pos;
	struct bio_vec bv;

	if (!bio_has_data(bio) || !dmq_bio_range(bio, off, len, &it))
		return -EINVAL;
	__bio_for_each_segment(bv, bio, pos, it) {
		memcpy_from_bvec(dst, &bv);
		dst += bv.bv_len;
	}
	return 0;
}

loff_t dmq_file_size(struct file *file)
{
	return i_size_read(file_inode(file));
}

unsigned int dmq_file_logical_block_size(struct file *file)
{
	struct block_device *bdev = file_inode(file)->i_sb->s_bdev;

	return bdev ? bdev_logical_block_size(bdev) : SECTOR_SIZE;
}

unsigned int dmq_file_dma_alignment(struct file *file)
{
	struct block_device *bdev = file_inode(file)->i_sb->s_bdev;

	return bdev ? bdev_dma_alignment(bdev) : SECTOR_SIZE - 1;
}

bool dmq_file_is_reg(struct file *file)
{
	return S_ISREG(file_inode(file)->i_mode);
}

bool dmq_file_readable(struct file *file)
{
	return file->f_mode & FMODE_READ;
}

bool dmq_file_writable(struct file *file)
{
	return file->f_mode & FMODE_WRITE;
}

bool dmq_file_same_inode(struct file *a, struct file *b)
{
	/*
	 * The inode the file was opened on, and the one that holds its data
	 * (they differ on stacking file systems such as overlayfs, where the
	 * same data can also be opened through the layer below).
	 */
	return file_inode(a) == file_inode(b) ||
	       d_real_inode(a->f_path.dentry) == d_real_inode(b->f_path.dentry);
}

bool dmq_file_append(struct file *file)
{
	return READ_ONCE(file->f_flags) & O_APPEND;
}

/*
 * Whether @file's file system does direct I/O (our kiocbs always ask for it,
 * whatever the descriptor's own O_DIRECT).
 */
bool dmq_file_can_direct_io(struct file *file)
{
	return file->f_mode & FMODE_CAN_ODIRECT;
}

/* Whether @file can do direct I/O of this direction (0, or the errno). */
static int dmq_file_io_ok(struct file *file, bool write)
{
	if (!(file->f_mode & FMODE_CAN_ODIRECT))
		return -EINVAL;
	if (write ? !(file->f_mode & FMODE_WRITE) || !(file->f_mode & FMODE_CAN_WRITE) ||
		    !file->f_op->write_iter
		  : !(file->f_mode & FMODE_READ) || !(file->f_mode & FMODE_CAN_READ) ||
		    !file->f_op->read_iter)
		return -EBADF;
	return 0;
}

ssize_t dmq_file_rw_sync(struct file *file, void *buf, size_t len, loff_t pos,
			 bool write)
{
	struct kvec kv = { .iov_base = buf, .iov_len = len };
	struct iov_iter iter;
	struct kiocb kiocb;
	ssize_t ret;

	if (pos < 0 || len > MAX_RW_COUNT || len > LLONG_MAX - pos)
		return -EINVAL;
	ret = dmq_file_io_ok(file, write);
	if (ret)
		return ret;
	/*
	 * As kernel_read()/kernel_write(), but with flags of our own instead of
	 * the file's (f_iocb_flags follows O_APPEND and O_DSYNC, which fcntl()
	 * may set on the fd get_img_fd hands out): direct I/O at @pos, always.
	 * A synchronous kiocb (no ki_complete): the call returns when done.
	 */
	init_sync_kiocb(&kiocb, file);
	kiocb.ki_flags = IOCB_DIRECT;
	kiocb.ki_pos = pos;
	iov_iter_kvec(&iter, write ? ITER_SOURCE : ITER_DEST, &kv, 1, len);
	if (write) {
		file_start_write(file);
		ret = file->f_op->write_iter(&kiocb, &iter);
		file_end_write(file);
	} else {
		ret = file->f_op->read_iter(&kiocb, &iter);
	}
	/* Cannot happen for a synchronous kiocb; never report it as a size. */
	if (WARN_ON_ONCE(ret == -EIOCBQUEUED))
		ret = -EIO;
	return ret;
}

bool dmq_table_writable(struct dm_target *ti)
{
	return dm_table_get_mode(ti->table) & BLK_OPEN_WRITE;
}

ssize_t dmq_file_rw_bio(struct kiocb *iocb, struct file *file, struct bio *bio,
			u32 off, u32 len, loff_t pos, bool *started,
			void (*done)(struct kiocb *iocb, long ret))
{
	bool write = op_is_write(bio_op(bio));
	struct bvec_iter it, cnt;
	struct bio_vec bv;
	struct iov_iter iter;
	unsigned int nr = 0;
	int err;

	*started = false;
	if (!bio_has_data(bio) || !dmq_bio_range(bio, off, len, &it))
		return -EINVAL;
	err = dmq_file_io_ok(file, write);
	if (err)
		return err;
	/* Clones share bi_io_vec but have no bi_vcnt: count what we span. */
	__bio_for_each_bvec(bv, bio, cnt, it)
		nr++;
	iov_iter_bvec(&iter, write ? ITER_SOURCE : ITER_DEST,
		      __bvec_iter_bvec(bio->bi_io_vec, it), nr,
		      len + it.bi_bvec_done);
	iov_iter_advance(&iter, it.bi_bvec_done);

	memset(iocb, 0, sizeof(*iocb));
	iocb->ki_filp = file;
	iocb->ki_pos = pos;
	/*
	 * Not the file's own flags: no IOCB_APPEND or DSYNC surprises (a FUA
	 * bio's durability comes from the target's fsync, whose failure it can
	 * tell from a failed write: never IOCB_DSYNC). A write
	 * carries IOCB_WRITE, as aio and io_uring set it for any write_iter.
	 * On 6.12.117 overlayfs' backing_file_write_iter ended the real file
	 * system's freeze protection only for a kiocb with it (without it,
	 * fsfreeze hung: kselftest overlayfs_freeze); 6.12.118's backing-file
	 * tracks that itself (aio->is_write).
	 */
	iocb->ki_flags = IOCB_DIRECT | (write ? IOCB_WRITE : 0);
	iocb->ki_ioprio = get_current_ioprio();
	iocb->ki_complete = done;
	if (write) {
		/*
		 * Freeze protection of the file's own file system for the whole
		 * I/O, as loop's lo_rw_aio(): ended by the completion
		 * (dmq_kiocb_end_write()), also when the write did not queue.
		 */
		kiocb_start_write(iocb);
		*started = true;
		return file->f_op->write_iter(iocb, &iter);
	}
	return file->f_op->read_iter(iocb, &iter);
}

void dmq_kiocb_end_write(struct kiocb *iocb)
{
	kiocb_end_write(iocb);
}

loff_t dmq_file_write_limit(struct file *file)
{
	struct inode *inode = d_real_inode(file->f_path.dentry);
	loff_t max = inode->i_sb->s_maxbytes;

	if (!(file->f_flags & O_LARGEFILE))
		max = min_t(loff_t, max, MAX_NON_LFS);
	return max;
}

struct dmq_rw_many {
	atomic_t pending;
	struct completion done;
};

struct dmq_rw_one {
	struct kiocb iocb;
	struct kvec kv;
	struct dmq_rw_req *req;
	struct dmq_rw_many *many;
	bool write;
	bool started;
};

static void dmq_rw_one_done(struct kiocb *iocb, long ret)
{
	struct dmq_rw_one *one = container_of(iocb, struct dmq_rw_one, iocb);
	struct dmq_rw_many *many = one->many;

	if (one->write && one->started)
		kiocb_end_write(iocb);
	one->req->ret = ret;
	/* @one may be freed once the waiter sees the count drop to zero. */
	if (atomic_dec_and_test(&many->pending))
		complete(&many->done);
}

int dmq_file_rw_many(struct dmq_rw_req *reqs, unsigned int n, bool write)
{
	struct dmq_rw_many many;
	struct dmq_rw_one *ones;
	unsigned int i;

	ones = kvmalloc_array(n, sizeof(*ones), GFP_KERNEL);
	if (!ones)
		return -ENOMEM;
	/* One count per transfer, and ours until every one was started. */
	atomic_set(&many.pending, n + 1);
	init_completion(&many.done);
	for (i = 0; i < n; i++) {
		struct dmq_rw_req *r = &reqs[i];
		struct dmq_rw_one *one = &ones[i];
		struct iov_iter iter;
		ssize_t ret;

		memset(one, 0, sizeof(*one));
		one->req = r;
		one->many = &many;
		one->write = write;
		if (r->pos < 0 || r->len > MAX_RW_COUNT || r->len > LLONG_MAX - r->pos)
			ret = -EINVAL;
		else
			ret = dmq_file_io_ok(r->file, write);
		if (!ret) {
			one->kv.iov_base = r->buf;
			one->kv.iov_len = r->len;
			iov_iter_kvec(&iter, write ? ITER_SOURCE : ITER_DEST, &one->kv, 1,
				      r->len);
			/* As dmq_file_rw_bio(): our flags, not the file's. */
			one->iocb.ki_filp = r->file;
			one->iocb.ki_pos = r->pos;
			one->iocb.ki_flags = IOCB_DIRECT | (write ? IOCB_WRITE : 0);
			one->iocb.ki_ioprio = get_current_ioprio();
			one->iocb.ki_complete = dmq_rw_one_done;
			one->started = true;
			if (write) {
				kiocb_start_write(&one->iocb);
				ret = r->file->f_op->write_iter(&one->iocb, &iter);
			} else {
				ret = r->file->f_op->read_iter(&one->iocb, &iter);
			}
		}
		/* Not queued: the completion was not called and will not be. */
		if (ret != -EIOCBQUEUED)
			dmq_rw_one_done(&one->iocb, ret);
	}
	/*
	 * Sleeping sends the bios the file systems left in our plug; the
	 * completions may run in interrupt context.
	 */
	if (!atomic_dec_and_test(&many.pending))
		wait_for_completion_io(&many.done);
	kvfree(ones);
	return 0;
}

struct workqueue_struct *dmq_alloc_workqueue(const char *name, bool mem_reclaim)
{
	return alloc_workqueue("%s", WQ_UNBOUND | (mem_reclaim ? WQ_MEM_RECLAIM : 0), 0,
			       name);
}

struct workqueue_struct *dmq_alloc_local_highpri_workqueue(const char *name)
{
	return alloc_workqueue("%s", WQ_HIGHPRI | WQ_MEM_RECLAIM, 0, name);
}

void dmq_rcu_read_lock(void)
{
	rcu_read_lock();
}

void dmq_rcu_read_unlock(void)
{
	rcu_read_unlock();
}

void dmq_synchronize_rcu(void)
{
	synchronize_rcu();
}

void dmq_wait_count_zero(unsigned long *count)
{
	wait_var_event(count, READ_ONCE(*count) == 0);
}

void dmq_wake_count(unsigned long *count)
{
	wake_up_var(count);
}

unsigned int dmq_this_cpu(void)
{
	return raw_smp_processor_id();
}

unsigned int dmq_nr_cpu_ids(void)
{
	return nr_cpu_ids;
}

struct module *dmq_this_module(void)
{
	return THIS_MODULE;
}

void dmq_cond_resched(void)
{
	cond_resched();
}

unsigned int dmq_noio_save(void)
{
	return memalloc_noio_save();
}

void dmq_noio_restore(unsigned int flags)
{
	memalloc_noio_restore(flags);
}

struct dmq_inflight_slot {
	struct percpu_ref ref;
	struct dmq_inflight *in;
};

struct dmq_inflight {
	struct dmq_inflight_slot slot[2];
	/* Read under RCU by get(); changed by switch_wait() under @lock. */
	unsigned int idx;
	struct completion drained;
	struct mutex lock;
};

static void dmq_inflight_release(struct percpu_ref *ref)
{
	struct dmq_inflight_slot *s = container_of(ref, struct dmq_inflight_slot, ref);

	complete(&s->in->drained);
}

struct dmq_inflight *dmq_inflight_new(void)
{
	struct dmq_inflight *in = kzalloc(sizeof(*in), GFP_KERNEL);
	int i;

	if (!in)
		return NULL;
	for (i = 0; i < 2; i++) {
		in->slot[i].in = in;
		if (percpu_ref_init(&in->slot[i].ref, dmq_inflight_release,
				    PERCPU_REF_ALLOW_REINIT, GFP_KERNEL)) {
			while (i--)
				percpu_ref_exit(&in->slot[i].ref);
			kfree(in);
			return NULL;
		}
	}
	init_completion(&in->drained);
	mutex_init(&in->lock);
	return in;
}

void dmq_inflight_free(struct dmq_inflight *in)
{
	percpu_ref_exit(&in->slot[0].ref);
	percpu_ref_exit(&in->slot[1].ref);
	mutex_destroy(&in->lock);
	kfree(in);
}

unsigned int dmq_inflight_get(struct dmq_inflight *in)
{
	unsigned int idx;

	/*
	 * The grace period percpu_ref_kill() waits for before it sums the
	 * counts covers this section: a reference taken on the old index
	 * after the flip is still counted.
	 */
	rcu_read_lock();
	idx = READ_ONCE(in->idx);
	percpu_ref_get(&in->slot[idx].ref);
	rcu_read_unlock();
	return idx;
}

void dmq_inflight_put(struct dmq_inflight *in, unsigned int idx)
{
	percpu_ref_put(&in->slot[idx & 1].ref);
}

void dmq_inflight_switch_wait(struct dmq_inflight *in)
{
	unsigned int old;

	mutex_lock(&in->lock);
	old = in->idx;
	reinit_completion(&in->drained);
	WRITE_ONCE(in->idx, !old);
	percpu_ref_kill(&in->slot[old].ref);
	wait_for_completion(&in->drained);
	percpu_ref_reinit(&in->slot[old].ref);
	mutex_unlock(&in->lock);
}

struct file *dmq_get_file(struct file *file)
{
	return get_file(file);
}

int dmq_file_install_fd(struct file *file)
{
	/* Not close-on-exec: callers hand it on to dmsetup or qemu (C target). */
	int fd = get_unused_fd_flags(0);

	if (fd < 0)
		return fd;
	fd_install(fd, get_file(file));
	return fd;
}

int dmq_file_truncate(struct file *file, loff_t len)
{
	return vfs_truncate(&file->f_path, len);
}

struct file *dmq_file_reopen(struct file *file)
{
	struct file *f;

	/* Nothing but regular files: no FIFO that waits, no device open. */
	if (!S_ISREG(file_inode(file)->i_mode))
		return NULL;
	f = dentry_open(&file->f_path, O_RDONLY | O_LARGEFILE, file->f_cred);
	return IS_ERR(f) ? NULL : f;
}

loff_t dmq_file_seek_data(struct file *file, loff_t pos)
{
	loff_t ret;

	/* As lseek(2) on a shared file: one position store at a time. */
	mutex_lock(&file->f_pos_lock);
	ret = vfs_llseek(file, pos, SEEK_DATA);
	mutex_unlock(&file->f_pos_lock);
	return ret;
}

void dmq_eventfd_signal(struct eventfd_ctx *ctx)
{
	eventfd_signal(ctx);
}

struct dm_table *dmq_target_table(struct dm_target *ti)
{
	return ti->table;
}
