/* SPDX-License-Identifier: GPL-2.0 */
/*
 * C shim of dm-qcow2: wrappers for static inline kernel functions and a few
 * bio/kiocb loops that are clearer in C. Each is called from one safe Rust
 * abstraction in rust/; drivers/ never calls these directly.
 */
#ifndef DMQ_SHIM_H
#define DMQ_SHIM_H

#include <linux/types.h>

struct bio;
struct file;
struct kiocb;
struct workqueue_struct;
struct module;
struct dm_target;
struct eventfd_ctx;
struct dmq_inflight;

/* Whether the table of @ti is being loaded read-write. */
bool dmq_table_writable(struct dm_target *ti);

/* THIS_MODULE of dm-qcow2, for target registration. */
struct module *dmq_this_module(void);

/* Module parameter kernel_sets_dirty_bit. */
bool dmq_kernel_sets_dirty_bit(void);
/* Module parameter enospc_retry_ms. */
unsigned int dmq_enospc_retry_ms(void);
/* Module parameter md_cache_pages. */
unsigned int dmq_md_cache_pages(void);

/* bio helpers: byte ranges are relative to the bio's current position. */
void dmq_bio_inc_remaining(struct bio *bio);
void dmq_bio_rearm(struct bio *bio);
int dmq_bio_zero(struct bio *bio, u32 off, u32 len);
int dmq_bio_copy_from(struct bio *bio, u32 off, const void *src, u32 len);
int dmq_bio_copy_to(struct bio *bio, u32 off, void *dst, u32 len);

/* File helpers. */
loff_t dmq_file_size(struct file *file);
unsigned int dmq_file_logical_block_size(struct file *file);
unsigned int dmq_file_dma_alignment(struct file *file);
bool dmq_file_is_reg(struct file *file);
bool dmq_file_readable(struct file *file);
bool dmq_file_writable(struct file *file);
/* Whether @a and @b are the same file (same inode, or same data inode). */
bool dmq_file_same_inode(struct file *a, struct file *b);
/* Whether @file is in append mode (O_APPEND, which fcntl may change). */
bool dmq_file_append(struct file *file);
bool dmq_file_can_direct_io(struct file *file);
/*
 * Synchronous direct I/O of @len bytes between @buf (kernel memory, suitably
 * aligned) and @file at @pos, with IOCB_DIRECT and none of the file's own
 * flags (no O_APPEND, O_DSYNC). Returns the bytes transferred or -errno.
 */
ssize_t dmq_file_rw_sync(struct file *file, void *buf, size_t len, loff_t pos,
			 bool write);

/*
 * Direct I/O between [off, off + len) of @bio and @file at @pos, in the bio's
 * direction. Returns -EIOCBQUEUED when @done will be called (possibly before
 * this returns, from interrupt context), otherwise the result (bytes or a
 * negative errno) and @done is not called. *@started tells whether a write
 * took the file system's freeze protection (kiocb_start_write()): then its
 * completion must end it with dmq_kiocb_end_write().
 */
ssize_t dmq_file_rw_bio(struct kiocb *iocb, struct file *file, struct bio *bio,
			u32 off, u32 len, loff_t pos, bool *started,
			void (*done)(struct kiocb *iocb, long ret));

/* cond_resched() (a macro). */
void dmq_cond_resched(void);

/* Allocation scope for the I/O path: no allocation may recurse into I/O. */
unsigned int dmq_noio_save(void);
void dmq_noio_restore(unsigned int flags);

/* One transfer of dmq_file_rw_many(): @ret is set to its result. */
struct dmq_rw_req {
	struct file *file;
	void *buf;
	size_t len;
	loff_t pos;
	ssize_t ret;
};

/*
 * Direct I/O of every one of @reqs (@write: all writes, else all reads),
 * each as dmq_file_rw_sync() does it, but all in flight at once: each is
 * started asynchronously, and the call returns when all of them are done,
 * their results in @ret (bytes or -errno). Returns -ENOMEM (and starts
 * nothing) if its bookkeeping cannot be allocated, else 0.
 */
int dmq_file_rw_many(struct dmq_rw_req *reqs, unsigned int n, bool write);

/* Pairs with the kiocb_start_write() of a write by dmq_file_rw_bio(). */
void dmq_kiocb_end_write(struct kiocb *iocb);

/*
 * The size past which no write of @file goes (generic_write_checks: the
 * s_maxbytes of the file system holding its data, under overlayfs the
 * real one; 2 GiB for a file opened without O_LARGEFILE): a write across
 * it ends short there, for good. Process context (d_real_inode).
 */
loff_t dmq_file_write_limit(struct file *file);

/*
 * Own unbound workqueue (alloc_workqueue is variadic and printf-checked);
 * @mem_reclaim: with a rescuer (WQ_MEM_RECLAIM), for work that I/O under
 * memory pressure waits for.
 */
struct workqueue_struct *dmq_alloc_workqueue(const char *name, bool mem_reclaim);

/*
 * A per-CPU WQ_HIGHPRI | WQ_MEM_RECLAIM workqueue named @name: work runs on
 * the CPU that queued it, in a high-priority worker.
 */
struct workqueue_struct *dmq_alloc_local_highpri_workqueue(const char *name);
void dmq_rcu_read_lock(void);
void dmq_rcu_read_unlock(void);
void dmq_synchronize_rcu(void);

/*
 * wait_var_event() until *@count (an AtomicUsize of the Rust side) is 0,
 * uninterruptible; dmq_wake_count() (wake_up_var()) wakes the waiters, after
 * a full barrier between the store that made it 0 and the call.
 */
void dmq_wait_count_zero(unsigned long *count);
void dmq_wake_count(unsigned long *count);

/* raw_smp_processor_id(): the CPU we ran on a moment ago (a hint). */
unsigned int dmq_this_cpu(void);

/* nr_cpu_ids: CPU numbers are below it. */
unsigned int dmq_nr_cpu_ids(void);

/*
 * In-flight reference switching: two percpu refs and an index. get() takes a
 * reference on the current index (under RCU) and returns the index; put()
 * drops it. switch_wait() flips the index and sleeps until every reference
 * taken on the old index is dropped, while new ones go to the other index.
 */
struct dmq_inflight *dmq_inflight_new(void);
void dmq_inflight_free(struct dmq_inflight *in);
unsigned int dmq_inflight_get(struct dmq_inflight *in);
void dmq_inflight_put(struct dmq_inflight *in, unsigned int idx);
void dmq_inflight_switch_wait(struct dmq_inflight *in);

/* get_file(): a new reference to @file. */
struct file *dmq_get_file(struct file *file);
/* A new fd for @file in the current task (not close-on-exec); the fd or -errno. */
int dmq_file_install_fd(struct file *file);
/* Truncates (or sparsely extends) @file to @len bytes. */
int dmq_file_truncate(struct file *file, loff_t len);
/*
 * A private read-only open of @file's path (its own f_pos, for SEEK_DATA
 * without moving the position of the file the user handed us); NULL unless
 * @file is a regular file, or if the file system refuses.
 */
struct file *dmq_file_reopen(struct file *file);
/*
 * vfs_llseek(@file, @pos, SEEK_DATA) under f_pos_lock: the next data at or
 * after @pos, or -errno.
 */
loff_t dmq_file_seek_data(struct file *file, loff_t pos);

/* eventfd_signal() is a static inline. */
void dmq_eventfd_signal(struct eventfd_ctx *ctx);

/* The table of @ti (for dm_table_event()). */
struct dm_table *dmq_target_table(struct dm_target *ti);

#endif /* DMQ_SHIM_H */
