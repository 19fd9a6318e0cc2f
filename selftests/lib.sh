# SPDX-License-Identifier: GPL-2.0
# shellcheck shell=bash
#
# Common helpers for the dm-qcow2 selftests. Source it from a test script,
# define case_<name> functions, list them in DMQ_CASES, then dmq_main "$@".
#
# Environment:
#   DMQ_MODULE        path of dm-qcow2.ko to insmod if the qcow2 target is
#                     not registered and `modprobe dm-qcow2` fails
#   KTAP_HELPERS      path of the kernel's ktap_helpers.sh
#   KDIR              kernel tree (ktap_helpers.sh is looked up under it)
#   TMPDIR            where the scratch file system is mounted (default /tmp)
#   DMQ_SCRATCH_FS    the file system the images live on: ext4 (default) or
#                     xfs, on a loop device over a sparse file in a tmpfs, so
#                     the target's direct I/O is asynchronous and its fsync
#                     and FUA reach a block device; or tmpfs (synchronous
#                     copies, fsync a no-op); or dir (a plain directory
#                     under TMPDIR, which must do O_DIRECT)
#   DMQ_SCRATCH_SECTOR  logical sector size of that loop device (512, 4096)
#   DMQ_TMPFS_SIZE    size of the scratch tmpfs (default 2g; a limit only)
#   DMQ_KEEP=1        keep the scratch files of failed cases (and the tmpfs)
#   DMQ_VERBOSE=1     trace the commands the cases run
#   QEMU_IMG, QEMU_IO, DMSETUP, PYTHON  override the tools
#   DMQ_LIB_OVERRIDES a file sourced at the end (host/run.sh uses it)

DMQ_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -z "${PYTHON:-}" ]; then
	# the distribution's python starts faster than a pyenv shim
	if [ -x /usr/bin/python3 ]; then PYTHON=/usr/bin/python3; else PYTHON=python3; fi
fi
QEMU_IMG=${QEMU_IMG:-qemu-img}
QEMU_IO=${QEMU_IO:-qemu-io}
DMSETUP=${DMSETUP:-dmsetup}
DMQ_KMSG=${DMQ_KMSG:-/dev/kmsg}
export QEMU_IMG QEMU_IO DMSETUP
DMQ_PREFIX="dmqst$$-"
DMQ_SCRATCH=
DMQ_MOUNTED=0
DMQ_CASE=
DMQ_CASE_DIR=
DMQ_MARK=
DMQ_HELPER_FAIL=90	# dmq_open.py's own failure status
# Lines that fail any case when they show up in dmesg (the debug kernel's
# detectors: KASAN, UBSAN, lockdep, DEBUG_LIST/OBJECTS, hung tasks, soft
# lockups, workqueue stalls, kmemleak).
DMQ_DMESG_BAD='BUG:|Oops|WARNING:|Kernel panic|KASAN|UBSAN|Call Trace|general protection|list_(add|del) corruption|refcount_t:|kernel BUG|possible (recursive|circular) locking|inconsistent lock state|lock held when returning|blocked for more than|soft lockup|hard LOCKUP|workqueue lockup|ODEBUG|unreferenced object|rcu_sched self-detected|INFO: task'
# The target's own consistency errors: they fail a case unless the script
# lists it in DMQ_FAULT_CASES (fault injection, ENOSPC, corrupt images).
DMQ_DMESG_CONSISTENCY='freeing a free cluster|would overwrite its|metadata commit failed|wants_check|refcount update failed|fsync of .* failed|cannot update the image header|cannot clear the dirty bit|truncate failed|merge of image .* failed'
DMQ_FAULT_CASES=${DMQ_FAULT_CASES:-}
DMQ_LOOP=
DMQ_BACKING=

# ---------------------------------------------------------------- KTAP

# shellcheck disable=SC2034	# the same globals as ktap_helpers.sh
_dmq_ktap_fallback() {
	KTAP_TESTNO=1
	KTAP_CNT_PASS=0
	KTAP_CNT_FAIL=0
	KTAP_CNT_SKIP=0
	KSFT_PASS=0
	KSFT_FAIL=1
	KSFT_XFAIL=2
	KSFT_XPASS=3
	KSFT_SKIP=4
	KSFT_NUM_TESTS=0

	ktap_print_header() { echo "TAP version 13"; }
	ktap_print_msg() { echo "# $*"; }
	ktap_set_plan() {
		KSFT_NUM_TESTS="$1"
		echo "1..$KSFT_NUM_TESTS"
	}
	ktap_skip_all() { echo "1..0 # SKIP $*"; }
	__ktap_test() {
		local result="$1" description="$2" directive="${3:-}"
		local directive_str=
		[ -n "$directive" ] && directive_str="# $directive"
		echo "$result $KTAP_TESTNO $description${directive_str:+ $directive_str}"
		KTAP_TESTNO=$((KTAP_TESTNO + 1))
	}
	ktap_test_pass() {
		__ktap_test "ok" "$1"
		KTAP_CNT_PASS=$((KTAP_CNT_PASS + 1))
	}
	ktap_test_skip() {
		__ktap_test "ok" "$1" "SKIP"
		KTAP_CNT_SKIP=$((KTAP_CNT_SKIP + 1))
	}
	ktap_test_fail() {
		__ktap_test "not ok" "$1"
		KTAP_CNT_FAIL=$((KTAP_CNT_FAIL + 1))
	}
	ktap_test_result() {
		local description="$1"
		shift
		if "$@"; then
			ktap_test_pass "$description"
		else
			ktap_test_fail "$description"
		fi
	}
	ktap_exit_fail_msg() {
		echo "Bail out! $*"
		ktap_print_totals
		exit "$KSFT_FAIL"
	}
	ktap_print_totals() {
		echo "# Totals: pass:$KTAP_CNT_PASS fail:$KTAP_CNT_FAIL xfail:0 xpass:0 skip:$KTAP_CNT_SKIP error:0"
	}
	ktap_finished() {
		ktap_print_totals
		if [ $((KTAP_CNT_PASS + KTAP_CNT_SKIP)) -eq "$KSFT_NUM_TESTS" ]; then
			exit "$KSFT_PASS"
		else
			exit "$KSFT_FAIL"
		fi
	}
}

_dmq_load_ktap() {
	local f
	for f in "${KTAP_HELPERS:-}" \
		"${KDIR:+$KDIR/tools/testing/selftests/kselftest/ktap_helpers.sh}" \
		"$DMQ_DIR/../kselftest/ktap_helpers.sh"; do
		if [ -n "$f" ] && [ -r "$f" ]; then
			# shellcheck source=/dev/null
			. "$f"
			DMQ_KTAP_SRC=$f
			return 0
		fi
	done
	_dmq_ktap_fallback
	DMQ_KTAP_SRC=builtin
}
_dmq_load_ktap

# --------------------------------------------------------- case helpers
# These run inside a case (a subshell): dmq_fail/dmq_skip end the case.

dmq_log() { echo "$*"; }

dmq_fail() {
	echo "FAIL: $*"
	exit "$KSFT_FAIL"
}

dmq_skip() {
	echo "SKIP: $*"
	exit "$KSFT_SKIP"
}

# dmq_run CMD...: run CMD, end the case with its output if it fails.
dmq_run() {
	local out rc
	[ "${DMQ_VERBOSE:-0}" = 1 ] && echo "+ $*"
	out=$("$@" 2>&1)
	rc=$?
	if [ "$rc" -ne 0 ]; then
		[ -n "$out" ] && printf '%s\n' "$out"
		dmq_fail "command failed (rc=$rc): $*"
	fi
	return 0
}

# dmq_size TEXT: bytes for "2M+512" style sizes (k/M/G, + and -).
dmq_size() {
	local e=$1
	e=${e//[kK]/*1024}
	e=${e//M/*1048576}
	e=${e//G/*1073741824}
	echo $((e))
}

# dmq_extl2_cluster SIZE: SIZE in bytes, or the smallest power-of-two
# multiple of it whose subclusters (1/32 of a cluster) are not smaller than
# the scratch device's logical block size: extended-L2 cases run on the
# 4 KiB-sector pass with 128k clusters instead of 64k (the target refuses
# the smaller subclusters there: qcow2_ctr_errors.sh subclusters_below_block).
dmq_extl2_cluster() {
	local c ss=${DMQ_SCRATCH_SECTOR:-512}
	c=$(dmq_size "$1")
	while [ $((c / 32)) -lt "$ss" ]; do
		c=$((c * 2))
	done
	echo "$c"
}

# dmq_img_create FILE SIZE [qemu-img create -o options] [BACKING]
#   dmq_img_create base.qcow2 64M cluster_size=64k
#   dmq_img_create top.qcow2 128M cluster_size=64k base.qcow2
dmq_img_create() {
	local file=$1 size=$2 opts=${3:-} backing=${4:-}
	local args=(create -q -f qcow2)
	[ -n "$opts" ] && args+=(-o "$opts")
	[ -n "$backing" ] && args+=(-b "$backing" -F qcow2)
	dmq_run "$QEMU_IMG" "${args[@]}" "$file" "$(dmq_size "$size")"
}

# dmq_write IMG SPEC...: see dmq_img.py (KIND:OFF:LEN[:SEED]).
dmq_write() {
	local img=$1
	shift
	dmq_run dmq_py dmq_img write "$img" "$@"
}

# dmq_write_raw FILE SPEC...: deterministic data into a raw file
# (only t/r/P kinds; z/zu are holes anyway in a fresh sparse file).
dmq_write_raw() {
	local img=$1
	shift
	dmq_run dmq_py dmq_img write -f raw "$img" "$@"
}

dmq_patch() {
	local img=$1
	shift
	dmq_run dmq_py dmq_img patch "$img" "$@"
}

dmq_header() { dmq_py dmq_img header "$1" "$2"; }

dmq_check_images() {
	local img out
	for img in "$@"; do
		out=$("$QEMU_IMG" check -q -f qcow2 "$img" 2>&1) ||
			{ printf '%s\n' "$out"; dmq_fail "qemu-img check $img"; }
	done
}

# ------------------------------------------------------------- devices

dmq_full_name() { echo "${DMQ_PREFIX}$1"; }

# dmq_create NAME [dmq_open.py options] SPEC...: returns dmsetup's status
# (or 90 if the helper itself failed). NAME gets the per-run prefix.
dmq_create() {
	local name
	name=$(dmq_full_name "$1")
	shift
	# --then runs a command that may outlive the call (often in the
	# background): its own interpreter, not the shared server
	case " $* " in
	*" --then "*) "$PYTHON" "$DMQ_DIR/dmq_open.py" "$name" "$@" ;;
	*) dmq_py dmq_open "$name" "$@" ;;
	esac
}

dmq_dev_exists() {
	"$DMSETUP" info "$(dmq_full_name "$1")" >/dev/null 2>&1
}

# dmq_dev NAME: print the block device node of NAME.
dmq_dev() {
	local full minor i
	full=$(dmq_full_name "$1")
	for i in 1 2 3 4 5 6 7 8 9 10; do
		if [ -b "/dev/mapper/$full" ]; then
			echo "/dev/mapper/$full"
			return 0
		fi
		[ "$i" = 2 ] && "$DMSETUP" mknodes "$full" >/dev/null 2>&1
		minor=$("$DMSETUP" info -c --noheadings -o minor "$full" 2>/dev/null | tr -d ' ')
		if [ -n "$minor" ] && [ -b "/dev/dm-$minor" ]; then
			echo "/dev/dm-$minor"
			return 0
		fi
		sleep 0.5
	done
	return 1
}

dmq_remove() {
	local full
	full=$(dmq_full_name "$1")
	"$DMSETUP" remove --retry "$full" >/dev/null 2>&1 ||
		"$DMSETUP" remove --retry "$full"
}

# Remove every device this run created (all carry DMQ_PREFIX).
dmq_remove_all() {
	local n
	"$DMSETUP" ls 2>/dev/null | while read -r n _; do
		case "$n" in
		"$DMQ_PREFIX"*)
			echo "# removing leftover device $n"
			"$DMSETUP" remove --retry "$n" >/dev/null 2>&1 ||
				{ echo "# remove --retry $n failed: --force";
				  "$DMSETUP" remove --force "$n" >/dev/null 2>&1; }
			;;
		esac
	done
}

# --------------------------------------------------------------- dmesg

# The log is never cleared: the runner scans the whole run's log at the end,
# and each case reads what came after its own marker.
dmq_dmesg_begin() {
	DMQ_MARK="dmq-selftest[$$]: begin case $1 $(date +%s%N)"
	echo "$DMQ_MARK" >"$DMQ_KMSG" 2>/dev/null
}

# Kernel messages since the current case began.
dmq_dmesg_case() {
	dmesg 2>/dev/null | awk -v m="$DMQ_MARK" '
		m != "" && index($0, m) { n = 0; split("", L); next }
		{ L[++n] = $0 }
		END { for (i = 1; i <= n; i++) print L[i] }'
}

# dmq_expect_dmesg MSG ERRNO: a "qcow2: MSG (ERRNO)" line was logged.
dmq_expect_dmesg() {
	local msg=$1 err=$2 lines hit
	lines=$(dmq_dmesg_case)
	hit=$(printf '%s\n' "$lines" | grep -F -- "qcow2: $msg" | grep -F -- "($err)")
	if [ -z "$hit" ]; then
		echo "kernel log of this case:"
		printf '%s\n' "$lines" | sed 's/^/  /'
		dmq_fail "no dmesg line with 'qcow2: $msg' and '($err)'"
	fi
	echo "dmesg: $hit"
}

# dmq_expect_ctr_error NAME MSG ERRNO [dmq_open.py args...]
dmq_expect_ctr_error() {
	local name=$1 msg=$2 err=$3 rc
	shift 3
	dmq_create "$name" "$@"
	rc=$?
	if [ "$rc" -eq "$DMQ_HELPER_FAIL" ]; then
		dmq_fail "dmq_open.py failed before running dmsetup"
	fi
	if [ "$rc" -eq 0 ]; then
		dmq_remove "$name"
		dmq_fail "dmsetup create succeeded; expected '$msg ($err)'"
	fi
	if ! dmq_dev_absent "$name"; then
		"$DMSETUP" info "$(dmq_full_name "$name")"
		dmq_fail "device left behind after a failed create"
	fi
	dmq_expect_dmesg "$msg" "$err"
}

# --------------------------------------------------------------- setup

_dmq_skip_all() {
	ktap_skip_all "$*"
	exit "$KSFT_SKIP"
}

_dmq_cleanup() {
	local rc=$?
	trap - EXIT INT TERM HUP
	dmq_remove_all
	# what a script left outside the scratch space, if it says
	declare -F dmq_script_cleanup >/dev/null && dmq_script_cleanup
	_dmq_pysrv_stop
	if [ "$DMQ_MOUNTED" = 1 ]; then
		if [ "${DMQ_KEEP:-0}" = 1 ] && [ "${DMQ_FAILED:-0}" = 1 ]; then
			echo "# keeping scratch $DMQ_SCRATCH"
		else
			_dmq_umount "$DMQ_SCRATCH" || rc=$KSFT_FAIL
			if [ -n "$DMQ_LOOP" ]; then
				losetup -d "$DMQ_LOOP" || {
					echo "# not ok: losetup -d $DMQ_LOOP failed"; rc=$KSFT_FAIL; }
				_dmq_umount "$DMQ_BACKING" || rc=$KSFT_FAIL
				rmdir "$DMQ_BACKING" 2>/dev/null
			fi
			rmdir "$DMQ_SCRATCH" 2>/dev/null
		fi
	elif [ -n "$DMQ_SCRATCH" ] && [ -d "$DMQ_SCRATCH" ]; then
		if [ "${DMQ_KEEP:-0}" != 1 ] || [ "${DMQ_FAILED:-0}" != 1 ]; then
			rm -rf "$DMQ_SCRATCH"
		fi
	fi
	exit "$rc"
}

# A busy unmount means something still holds a file there (a leaked file
# reference in the target, say): that fails the run, after a lazy unmount.
_dmq_umount() {
	local i
	for i in 1 2 3 4 5; do
		umount "$1" 2>/dev/null && return 0
		sleep 1
	done
	echo "# not ok: umount $1 failed (a file there is still held: leaked reference?)"
	fuser -vm "$1" 2>&1 | sed 's/^/#   /'
	umount -l "$1"
	return 1
}

# _dmq_mount_scratch: the scratch file system on $DMQ_SCRATCH.
_dmq_mount_scratch() {
	local fs=${DMQ_SCRATCH_FS:-ext4} size=${DMQ_TMPFS_SIZE:-2g} ss=${DMQ_SCRATCH_SECTOR:-512}
	case "$fs" in
	dir) return 0 ;;
	tmpfs)
		mount -t tmpfs -o "size=$size,mode=0700" dmq-selftest "$DMQ_SCRATCH" ||
			_dmq_skip_all "could not mount a tmpfs on $DMQ_SCRATCH"
		DMQ_MOUNTED=1
		return 0 ;;
	ext4 | xfs) ;;
	*) _dmq_skip_all "DMQ_SCRATCH_FS=$fs: not ext4, xfs, tmpfs or dir" ;;
	esac
	command -v "mkfs.$fs" >/dev/null 2>&1 || _dmq_skip_all "mkfs.$fs not found"
	DMQ_BACKING=$DMQ_SCRATCH.backing
	mkdir -p "$DMQ_BACKING" &&
		mount -t tmpfs -o "size=$size,mode=0700" dmq-selftest-backing "$DMQ_BACKING" ||
		_dmq_skip_all "could not mount a tmpfs on $DMQ_BACKING"
	truncate -s "$size" "$DMQ_BACKING/disk" &&
		DMQ_LOOP=$(losetup -f --show --sector-size "$ss" "$DMQ_BACKING/disk") ||
		_dmq_skip_all "losetup --sector-size $ss failed"
	# Default options, as a user's mkfs (ext4 discards the device first).
	if [ "$fs" = ext4 ]; then
		mkfs.ext4 -q "$DMQ_LOOP" >/dev/null
	else
		mkfs.xfs -q -f "$DMQ_LOOP" >/dev/null
	fi || _dmq_skip_all "mkfs.$fs $DMQ_LOOP failed"
	mount -t "$fs" "$DMQ_LOOP" "$DMQ_SCRATCH" ||
		_dmq_skip_all "mount -t $fs $DMQ_LOOP failed"
	chmod 0700 "$DMQ_SCRATCH"
	DMQ_MOUNTED=1
}

_dmq_odirect_ok() {
	"$PYTHON" - "$1" <<-'EOF' >/dev/null 2>&1
		import os, sys
		p = os.path.join(sys.argv[1], ".odirect")
		fd = os.open(p, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o600)
		os.close(fd)
		os.unlink(p)
	EOF
}

# (no "dmsetup targets | grep -q": with pipefail, SIGPIPE fails it)
_dmq_target_registered() {
	local t
	t=$("$DMSETUP" targets 2>/dev/null)
	grep -q '^qcow2[[:space:]]' <<<"$t"
}

_dmq_check_module() {
	_dmq_target_registered && return 0
	modprobe dm-qcow2 >/dev/null 2>&1
	if ! _dmq_target_registered && [ -n "${DMQ_MODULE:-}" ]; then
		if [ ! -r "$DMQ_MODULE" ]; then
			ktap_print_msg "DMQ_MODULE=$DMQ_MODULE is not readable"
		elif ! insmod "$DMQ_MODULE"; then
			ktap_print_msg "insmod $DMQ_MODULE failed"
		fi
	fi
	_dmq_target_registered
}

# dmq_py HELPER ARG...: run selftests/HELPER.py ARG... (dmq_img or
# dmq_open) through dmq_pysrv.py, which has the helpers imported already:
# a fresh interpreter costs 1.5-2 s under TCG. Same stdout, stderr, exit
# code, working directory and exported variables as a plain run; stdin is
# /dev/null. Without the server (not started, or DMQ_PYSRV=0), a plain run.
DMQ_PYSRV_DIR=
DMQ_PYSRV_PID=
dmq_py() {
	local helper=$1 d=$DMQ_PYSRV_DIR rc lk v
	shift
	if [ -z "$d" ] || ! kill -0 "$DMQ_PYSRV_PID" 2>/dev/null; then
		"$PYTHON" "$DMQ_DIR/$helper.py" "$@"
		return
	fi
	exec {lk}>>"$d/lock"
	flock "$lk"
	{
		printf '%s\0' "$PWD" "$helper" "$#" "$@"
		for v in $(compgen -e); do
			printf '%s=%s\0' "$v" "${!v}"
		done
	} >"$d/req"
	echo go >"$d/go"
	read -r rc <"$d/done"
	cat "$d/out"
	cat "$d/err" >&2
	exec {lk}>&-
	return "${rc:-70}"
}

_dmq_pysrv_start() {
	[ "${DMQ_PYSRV:-1}" = 1 ] || return 0
	command -v flock >/dev/null 2>&1 || return 0
	DMQ_PYSRV_DIR=$(mktemp -d "${TMPDIR:-/tmp}/dmq-pysrv.XXXXXX") || return 0
	mkfifo "$DMQ_PYSRV_DIR/go" "$DMQ_PYSRV_DIR/done" || {
		rm -rf "$DMQ_PYSRV_DIR"; DMQ_PYSRV_DIR=; return 0; }
	"$PYTHON" "$DMQ_DIR/dmq_pysrv.py" "$DMQ_PYSRV_DIR" </dev/null &
	DMQ_PYSRV_PID=$!
}

_dmq_pysrv_stop() {
	[ -n "$DMQ_PYSRV_DIR" ] || return 0
	if kill -0 "$DMQ_PYSRV_PID" 2>/dev/null; then
		# the FIFO open blocks until the server opens it: bounded
		timeout 10 sh -c 'echo quit >"$1"' sh "$DMQ_PYSRV_DIR/go" ||
			kill "$DMQ_PYSRV_PID" 2>/dev/null
		wait "$DMQ_PYSRV_PID" 2>/dev/null
	fi
	rm -rf "$DMQ_PYSRV_DIR"
	DMQ_PYSRV_DIR=
}

# dmq_init: KTAP header, prerequisites, module, scratch tmpfs, trap.
dmq_init() {
	local t
	ktap_print_header
	ktap_print_msg "ktap helpers: $DMQ_KTAP_SRC"
	[ "$(id -u)" = 0 ] || _dmq_skip_all "must run as root"
	for t in "$QEMU_IMG" "$QEMU_IO" "$DMSETUP" "$PYTHON" sha256sum dd \
		blockdev dmesg awk cmp; do
		command -v "$t" >/dev/null 2>&1 || _dmq_skip_all "$t not found"
	done
	"$DMSETUP" version >/dev/null 2>&1 ||
		_dmq_skip_all "device-mapper is not available (dmsetup version failed)"
	_dmq_check_module ||
		_dmq_skip_all "dm target qcow2 not registered (modprobe dm-qcow2 failed; set DMQ_MODULE=/path/to/dm-qcow2.ko)"
	ktap_print_msg "target: $("$DMSETUP" targets 2>/dev/null | grep '^qcow2')"

	trap _dmq_cleanup EXIT
	_dmq_pysrv_start
	trap 'exit 130' INT
	trap 'exit 143' TERM
	trap 'exit 129' HUP
	DMQ_SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/dmq-selftest.XXXXXX") ||
		_dmq_skip_all "mktemp failed"
	_dmq_mount_scratch
	ktap_print_msg "scratch: ${DMQ_SCRATCH_FS:-ext4}${DMQ_LOOP:+ on $DMQ_LOOP (sector ${DMQ_SCRATCH_SECTOR:-512})}"
	_dmq_odirect_ok "$DMQ_SCRATCH" ||
		_dmq_skip_all "O_DIRECT does not work in $DMQ_SCRATCH"
}

# ---------------------------------------------- messages and fio checks

# need TOOL...: the case is skipped unless every TOOL is on PATH
need() {
	local t
	for t in "$@"; do
		command -v "$t" >/dev/null 2>&1 || dmq_skip "$t not found"
	done
}

# random FILE SIZE: SIZE bytes from /dev/urandom
random() {
	dmq_run dd if=/dev/urandom of="$1" bs="$2" count=1 iflag=fullblock status=none
}

# check_rc IMG OK...: qemu-img check IMG exits with one of OK (0 clean,
# 3 leaked clusters only; 2 is corruption)
check_rc() {
	local img=$1 rc
	shift
	"$QEMU_IMG" check -f qcow2 "$img" >check.log 2>&1
	rc=$?
	case " $* " in
	*" $rc "*) ;;
	*)
		cat check.log
		dmq_fail "qemu-img check $img: rc=$rc (2: corruptions, 3: leaks)"
		;;
	esac
	echo "qemu-img check $img: rc=$rc"
}

# errno_text ERRNO: its strerror text, as dmsetup prints it
errno_text() {
	case $1 in
	EINVAL) echo "Invalid argument" ;;
	EBADF) echo "Bad file descriptor" ;;
	EBUSY) echo "Device or resource busy" ;;
	EACCES) echo "Permission denied" ;;
	EPERM) echo "Operation not permitted" ;;
	ENOENT) echo "No such file or directory" ;;
	ENOTTY) echo "Inappropriate ioctl for device" ;;
	EIO) echo "Input/output error" ;;
	EBADSLT) echo "Invalid slot" ;;
	*) echo "$1" ;;
	esac
}

# msg NAME WORD...: `dmsetup message NAME 0 -- WORD...`, its stdout as is,
# its stderr in msg.err; returns dmsetup's status. ("--": dmsetup's getopt
# would take a word like "-1" for an option.)
msg() {
	local full
	full=$(dmq_full_name "$1")
	shift
	[ "${DMQ_VERBOSE:-0}" = 1 ] && echo "+ $DMSETUP message $full 0 -- $*" >&2
	"$DMSETUP" message "$full" 0 -- "$@" 2>msg.err
}

# msg_ok NAME WORD...: the message must succeed; its output in MSG_OUT
msg_ok() {
	MSG_OUT=$(msg "$@") || {
		cat msg.err
		dmq_fail "message '${*:2}' failed"
	}
}

# dmq_wait_ready NAME KIND [SECS]: polls "KIND progress" (merge_backward,
# merge_forward) until stage=ready, SECS seconds at most (120); any stage
# but copying and ready fails. The last progress line stays in MSG_OUT.
dmq_wait_ready() {
	local end=$((SECONDS + ${3:-120}))
	while :; do
		msg_ok "$1" "$2" progress
		case $MSG_OUT in
		*stage=ready*) return 0 ;;
		*stage=copying*) ;;
		*) dmq_fail "$2 progress: '$MSG_OUT'" ;;
		esac
		[ "$SECONDS" -lt "$end" ] || dmq_fail "no stage=ready after ${3:-120} s: '$MSG_OUT'"
		sleep 0.2
	done
}

# dmq_wait_exit PID SECS WHAT: waits for the background job PID to end,
# SECS seconds at most (then fails: "WHAT still running after SECS s");
# returns its exit status.
dmq_wait_exit() {
	local end=$((SECONDS + $2))
	while kill -0 "$1" 2>/dev/null; do
		[ "$SECONDS" -lt "$end" ] || dmq_fail "$3 still running after $2 s"
		sleep 0.2
	done
	wait "$1"
}

# expect_msg_err NAME ERRNO WORD...: the message fails with ERRNO (dmsetup
# prints "device-mapper: message ioctl on NAME  failed: <strerror>")
expect_msg_err() {
	local name=$1 err=$2 out text
	shift 2
	text=$(errno_text "$err")
	if out=$(msg "$name" "$@"); then
		dmq_fail "message '$*' succeeded (printed '$out'); expected $err"
	fi
	if ! grep -qF -- "failed: $text" msg.err; then
		cat msg.err
		dmq_fail "message '$*': expected $err ($text)"
	fi
	echo "message '$*': $err"
}

# dump DEV FILE: the whole device (O_DIRECT)
dump() {
	dmq_run dd if="$1" of="$2" bs=1M iflag=direct status=none
}

# same FILE1 FILE2 WHAT
same() {
	if ! cmp "$1" "$2"; then
		cmp -l "$1" "$2" | head -n 8
		echo "cmp -l: $(cmp -l "$1" "$2" | wc -l) bytes differ"
		dmq_fail "$3"
	fi
}

# convert IMG RAW: what QEMU reads of IMG's chain
convert() {
	dmq_run "$QEMU_IMG" convert -f qcow2 -O raw "$1" "$2"
}

# reads_then_removed NAME DEV WANT IMG: DEV (table NAME) reads WANT; then
# NAME is removed, IMG passes qemu-img check, and qemu-img convert of IMG
# reads WANT too
reads_then_removed() {
	dump "$2" dev.raw
	same dev.raw "$3" "the device does not read like $3"
	dmq_remove "$1" || dmq_fail "dmsetup remove failed"
	dmq_check_images "$4"
	convert "$4" img.raw
	same img.raw "$3" "qemu-img convert of $4 differs from $3"
	echo "the device and qemu-img convert of $4 read like $3"
	rm -f dev.raw img.raw
}

# put FILE DEV OFFSET: FILE written to DEV at OFFSET (O_DIRECT, fsync)
put() {
	dmq_run dd if="$1" of="$2" bs=4k seek=$(($3 / 4096)) oflag=direct \
		conv=notrunc,fsync status=none
}

# chain_len NAME: the image count of `dmsetup table` ("<n> v<ver> <cs>")
chain_len() {
	local t
	t=$("$DMSETUP" table "$(dmq_full_name "$1")") || return 1
	# shellcheck disable=SC2086	# the table's words
	set -- $t
	[ "${3:-}" = qcow2 ] || return 1
	echo "${4:-}"
}

# check_unwritten BEFORE AFTER IOLOG...: AFTER equals BEFORE outside the
# ranges the iologs wrote or trimmed
check_unwritten() {
	"$PYTHON" - "$@" <<-'EOF'
		import sys
		before, after, logs = sys.argv[1], sys.argv[2], sys.argv[3:]
		iv = []
		for log in logs:
		    for line in open(log):
		        w = line.split()
		        # v2: FILE write OFF LEN; v3: TIME FILE write OFF LEN
		        # (trims change data too)
		        for i in (1, 2):
		            if len(w) == i + 3 and w[i] in ("write", "trim"):
		                iv.append((int(w[i + 1]), int(w[i + 2])))
		if not iv:
		    sys.exit("check_unwritten: no writes in " + " ".join(logs))
		iv.sort()
		import mmap, os
		def load(path):
		    # mapped, not read whole: devices of more than 512 MiB too
		    with open(path, "rb") as f:
		        if os.fstat(f.fileno()).st_size == 0:
		            return b""
		        return mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
		a = load(before)
		b = load(after)
		if len(a) != len(b):
		    sys.exit("check_unwritten: %s has %d bytes, %s %d" %
		             (before, len(a), after, len(b)))
		def cmp(lo, hi):
		    # 16 MiB slices (bytes, compared with memcmp), then 512 bytes
		    big = 16 << 20
		    while lo < hi and a[lo:min(lo + big, hi)] == b[lo:min(lo + big, hi)]:
		        lo += big
		    if lo >= hi:
		        return 0
		    step = 512
		    for s in range(lo, hi, step):
		        e = min(s + step, hi)
		        if a[s:e] != b[s:e]:
		            off = next(i for i in range(s, e) if a[i] != b[i])
		            near = [x for x in iv if x[0] - (1 << 21) < off < sum(x) + (1 << 21)]
		            print("unwritten byte %d (0x%x) changed: was 0x%02x, now "
		                  "0x%02x; writes nearby (off, len): %s" %
		                  (off, off, a[off], b[off], near[:8]))
		            return 1
		pos = bad = written = 0
		for off, ln in iv:
		    bad |= cmp(pos, off)
		    written += max(0, off + ln - max(pos, off))
		    pos = max(pos, off + ln)
		bad |= cmp(pos, len(a))
		if not bad:
		    print("%d writes, %d bytes written, the other %d bytes unchanged"
		          % (len(iv), written, len(a) - written))
		sys.exit(bad)
	EOF
}

# dmq_run_case NAME: run case_NAME in a subshell in its own directory,
# check dmesg, print the KTAP result line.
dmq_run_case() {
	local name=$1 rc bad left klog t0=$SECONDS
	export DMQ_CASE=$name
	export DMQ_CASE_DIR="$DMQ_SCRATCH/$name"
	rm -rf "$DMQ_CASE_DIR"
	mkdir -p "$DMQ_CASE_DIR"
	dmq_dmesg_begin "$name"
	(
		cd "$DMQ_CASE_DIR" || exit "$KSFT_FAIL"
		"case_$name"
	) 2>&1 | sed -u 's/^/# /'
	rc=${PIPESTATUS[0]}
	# A case removes what it made: a device left behind fails it.
	left=$(dmq_remove_all)
	if [ -n "$left" ]; then
		printf '%s\n' "$left"
		ktap_print_msg "the case left devices behind"
		[ "$rc" -eq 0 ] && rc=$KSFT_FAIL
	fi
	# the case's kernel log, read once (each read scans the whole run's log)
	klog=$(dmq_dmesg_case)
	bad=$(grep -E -- "$DMQ_DMESG_BAD" <<<"$klog")
	case " $DMQ_FAULT_CASES " in
	*" $name "*) ;;
	*) [ -z "$bad" ] && bad=$(grep -E -- "$DMQ_DMESG_CONSISTENCY" <<<"$klog") ;;
	esac
	if [ -n "$bad" ]; then
		ktap_print_msg "kernel log has warnings/oopses/consistency errors:"
		sed 's/^/#   /' <<<"$klog"
		rc=$KSFT_FAIL
	elif [ "$rc" -ne 0 ] && [ "$rc" -ne "$KSFT_SKIP" ]; then
		ktap_print_msg "kernel log of this case:"
		tail -n 40 <<<"$klog" | sed 's/^/#   /'
	fi
	# the case's wall time: where a run's minutes go
	ktap_print_msg "$name: $((SECONDS - t0)) s"
	if [ "$rc" -eq 0 ]; then
		ktap_test_pass "$name"
	elif [ "$rc" -eq "$KSFT_SKIP" ]; then
		ktap_test_skip "$name"
	else
		DMQ_FAILED=1
		ktap_test_fail "$name"
	fi
	if [ "$rc" -eq 0 ] || [ "${DMQ_KEEP:-0}" != 1 ]; then
		rm -rf "$DMQ_CASE_DIR"
	else
		ktap_print_msg "kept $DMQ_CASE_DIR"
	fi
}

# dmq_main "$@": runs the cases named on the command line (all of
# DMQ_CASES when none; "-l" lists them), then exits with the kselftest code.
# Also takes the names from KSELFTEST_<SCRIPT>_ARGS through the runner.
# shellcheck disable=SC2153	# DMQ_CASES comes from the test script
dmq_main() {
	local want=("$@") c n found long=0
	if [ "${want[0]:-}" = "-l" ] || [ "${want[0]:-}" = "--list" ]; then
		printf '%s\n' "${DMQ_CASES[@]}"
		exit 0
	fi
	if [ "${want[0]:-}" = "-h" ] || [ "${want[0]:-}" = "--help" ]; then
		echo "usage: $0 [-l] [CASE...]"
		exit 0
	fi
	if [ ${#want[@]} -eq 0 ]; then
		# Without names: every case, but the script's DMQ_LONG_CASES (slow
		# variants of what other cases cover) only with DMQ_FULL=1 (`make
		# check-full`): what keeps `make check` within CI's time.
		for c in "${DMQ_CASES[@]}"; do
			if [ "${DMQ_FULL:-0}" != 1 ] && [[ " ${DMQ_LONG_CASES[*]:-} " == *" $c "* ]]; then
				long=$((long + 1))
				continue
			fi
			want+=("$c")
		done
	fi
	for c in "${want[@]}"; do
		found=0
		for n in "${DMQ_CASES[@]}"; do
			[ "$n" = "$c" ] && found=1
		done
		if [ "$found" != 1 ]; then
			echo "unknown case '$c'; cases: ${DMQ_CASES[*]}" >&2
			exit "$KSFT_FAIL"
		fi
	done
	dmq_init
	[ "$long" = 0 ] ||
		ktap_print_msg "$long long cases not run (DMQ_FULL=1 runs them): ${DMQ_LONG_CASES[*]}"
	ktap_set_plan "${#want[@]}"
	for c in "${want[@]}"; do
		dmq_run_case "$c"
	done
	ktap_finished
}

# dmq_counts_bios: the target's counters (status fast_bios=) see the bios
# sent to the device (not so for the host-side fake)
dmq_counts_bios() {
	return 0
}

# dmq_complete_under_io: a merge may complete while writes are in flight
# (not so for the host-side fake, whose devices are files)
dmq_complete_under_io() {
	return 0
}

# dmq_trims_on_suspend: a suspend truncates the top after its last used
# cluster (not so for the host-side fake, which writes the files back)
dmq_trims_on_suspend() {
	return 0
}

# dmq_needs_kernel WHAT: the case needs the real target and kernel (WHAT:
# what it uses that the host-side fake cannot model); there it is skipped
dmq_needs_kernel() {
	return 0
}

# dmq_dev_absent NAME: dmsetup works and lists no device NAME. Unlike
# "! dmq_dev_exists NAME", a dmsetup that fails does not pass for "absent".
dmq_dev_absent() {
	local out
	out=$("$DMSETUP" ls 2>&1) || {
		printf '%s\n' "$out"
		echo "dmsetup ls failed: cannot tell whether $1 is gone"
		return 1
	}
	! awk -v n="$(dmq_full_name "$1")" '$1 == n { f = 1 } END { exit !f }' <<<"$out"
}

# dmq_with_md_cache N CMD...: run CMD (a case body) in a subshell with the
# module parameter md_cache_pages=N (metadata pages cached per image; the
# target keeps at least 16), then put the old value back. The parameter is
# read on every cache miss, so it applies to tables already loaded too.
DMQ_MD_PARAM=/sys/module/dm_qcow2/parameters/md_cache_pages
DMQ_MD_OLD=
dmq_with_md_cache() {
	local n=$1 rc
	shift
	dmq_needs_kernel "the md_cache_pages module parameter"
	DMQ_MD_OLD=$(cat "$DMQ_MD_PARAM") || dmq_fail "cannot read $DMQ_MD_PARAM"
	trap 'echo "$DMQ_MD_OLD" >"$DMQ_MD_PARAM"' EXIT
	echo "$n" >"$DMQ_MD_PARAM" || dmq_fail "cannot write $n to $DMQ_MD_PARAM"
	echo "md_cache_pages=$(cat "$DMQ_MD_PARAM") (was $DMQ_MD_OLD)"
	("$@")
	rc=$?
	echo "$DMQ_MD_OLD" >"$DMQ_MD_PARAM" || { echo "cannot restore $DMQ_MD_PARAM"; rc=$KSFT_FAIL; }
	trap - EXIT
	return "$rc"
}

# dmq_md_cache_env: with DMQ_MD_CACHE_PAGES=N in the environment, every
# case of the script runs under dmq_with_md_cache N. Call it just before
# dmq_main: DMQ_MD_CACHE_PAGES=16 ./qcow2_write.sh [CASE...]
dmq_md_cache_env() {
	local c
	[ -n "${DMQ_MD_CACHE_PAGES:-}" ] || return 0
	for c in "${DMQ_CASES[@]}"; do
		eval "$(declare -f "case_$c" | sed "1s/^case_$c /_dmq_md_case_$c /")"
		eval "case_$c() { dmq_with_md_cache \"\$DMQ_MD_CACHE_PAGES\" _dmq_md_case_$c; }"
	done
}

# Host-side testing of these scripts (host/run.sh) swaps in fakes here.
if [ -n "${DMQ_LIB_OVERRIDES:-}" ]; then
	# shellcheck source=/dev/null
	. "$DMQ_LIB_OVERRIDES"
fi
