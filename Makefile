# SPDX-License-Identifier: GPL-2.0
# Top-level entry points. `make help` lists them.

SHELL := /bin/bash
# The plain test kernel by default; `make check-debug` (or DMQ_KERNEL=debug)
# runs the suite on the debug kernel (KASAN, lockdep, kmemleak, ...), which
# boots ~40x slower under TCG: see README.
ifneq ($(filter check-debug,$(MAKECMDGOALS)),)
DMQ_KERNEL ?= debug
else
DMQ_KERNEL ?= release
endif
export DMQ_KERNEL
# kselftest VMs side by side (one vCPU each when more than one): TCG runs a
# vCPU on one host thread and the scripts are mostly sequential
DMQ_VMS ?= 2
export DMQ_VMS
KDIR ?= $(shell DMQ_KERNEL=$(DMQ_KERNEL) tools/kdir.sh)
# rustup's tools (rustc, bindgen, clippy-driver) for the kernel's Rust build,
# also when the caller's PATH lacks them (CI).
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: all module modules preflight headers-test deb deb-test dkms-test patches patches-test kernel-deb rustfmt rustfmtcheck deps kernel check check-full check-debug check-smp crashtest test host-test kselftest demo bench bench-deps clean help

all: module

help:
	@echo "make deps      - install everything on a fresh Debian 12 (root, idempotent)"
	@echo "make kernel    - build (or reuse) the cached test kernel (DMQ_KERNEL=debug|release)"
	@echo "make module    - build dm-qcow2.ko against it"
	@echo "make modules KDIR=<dir> - build dm-qcow2.ko against any kernel (preflight first)"
	@echo "make preflight [KDIR=<dir>] - can the module be built against that kernel? (exit 77: no Rust)"
	@echo "make headers-test - build the module against a headers-only copy of the test kernel"
	@echo "make deb       - out/deb/: dm-qcow2-dkms_<version>_all.deb and dm-qcow2-tools_<version>_<arch>.deb"
	@echo "make deb-test  - both packages built in a temp dir and their contents checked"
	@echo "make dkms-test - DKMS builds in a temp DKMS tree (headers-only kernel, no-Rust kernel, other rustc)"
	@echo "make patches   - the kernel patch series (drivers/md/dm-qcow2/) into out/patches/"
	@echo "make patches-test - the series applies to linux-source-6.12 and builds in-tree (root)"
	@echo "make kernel-deb - Debian kernel packages with CONFIG_DM_QCOW2=m (a full kernel build; not in CI)"
	@echo "make demo      - the main job: boot a VM, map a qcow2 chain with ext4, use it"
	@echo "make check     - host tests + kselftests in the VM; ends with 'N passed, N failed'"
	@echo "make check-full - the same with the scripts' long cases (DMQ_LONG_CASES; over CI's 90 minutes)"
	@echo "make check-debug - the same on the debug kernel (KASAN, lockdep, kmemleak, ...; slow under TCG)"
	@echo "make check-smp - the write and merge kselftests in 4-vCPU VMs (the lanes on several CPUs; not in CI)"
	@echo "make host-test - cargo tests (format logic, the dm-qcow2 command)"
	@echo "make rustfmt   - format the module's sources (the kernel's .rustfmt.toml); rustfmtcheck checks"
	@echo "make kselftest [T=name] - kselftests in the VM only"
	@echo "make crashtest - the crash-replay kselftest with many more crash states (not in CI)"
	@echo "make bench     - fio, discard, merge in the VM: dm-qcow2 vs raw file, qemu-nbd, rublk; table + chart (make bench-deps)"

deps:
	tools/setup.sh

kernel:
	tools/build-kernel.sh

# The kernel's own compiler: LLVM=1 for a clang-built kernel (our test
# kernels), GCC otherwise. clippy when it is installed and the kernel tree
# has its clippy configuration (.clippy.toml: the kernel's MSRV and lints;
# headers packages lack it and clippy's defaults differ); CLIPPY= turns it off.
DMQ_LLVM = $(if $(shell grep -sx CONFIG_CC_IS_CLANG=y $(KDIR)/include/config/auto.conf $(KDIR)/.config),LLVM=1)
CLIPPY ?= $(if $(shell command -v clippy-driver),$(if $(wildcard $(KDIR)/.clippy.toml $(KDIR)/source/.clippy.toml),1))
DMQ_KBUILD = $(MAKE) -C $(KDIR) M=$(CURDIR) $(DMQ_LLVM) $(if $(filter 1,$(CLIPPY)),CLIPPY=1)

# Against our cached test kernel (built first when missing).
module: kernel
	$(MAKE) modules KDIR=$(KDIR)

# Against any kernel's build or headers directory (also DKMS's command).
modules: preflight
	$(DMQ_KBUILD) modules

preflight:
	scripts/preflight.sh $(KDIR)

# The module built against a headers-only copy of the test kernel (as a
# distribution's headers package with its Rust files), in a temp dir.
headers-test: kernel
	scripts/test-headers-build.sh $(KDIR)

# The Debian packages into out/deb/: dm-qcow2-dkms (the module's sources for
# DKMS) and dm-qcow2-tools (the command, its man pages and completions)
deb:
	scripts/mk-deb.sh $(CURDIR)/out/deb

# Both packages built into a temp dir and looked into (nothing installed).
deb-test:
	scripts/test-deb.sh

# DKMS builds in a throwaway DKMS tree: headers-only tree of the test
# kernel (builds), a kernel without Rust (skipped), another rustc (fails
# with the preflight's message).
dkms-test: kernel
	scripts/test-dkms.sh $(KDIR)

# The kernel patch series (git format-patch) into out/patches/
patches:
	scripts/mk-patches.sh $(CURDIR)/out/patches $(KDIR)

# It applies to pristine linux-source-6.12 (git am) and the module builds
# in-tree with CONFIG_DM_QCOW2=m (overlay over the cached tree; root).
# DMQ_PATCH_FULL=1: git am onto the whole extracted tree (minutes more).
patches-test: kernel
	scripts/test-patches.sh $(KDIR)

# Debian kernel packages (bindeb-pkg) of the patched linux-source-6.12
# with CONFIG_DM_QCOW2=m into out/kernel-deb/: a full kernel build, not in CI.
kernel-deb: kernel
	KDIR=$(KDIR) scripts/mk-kernel-deb.sh $(CURDIR)/out/kernel-deb

# The kernel's Rust style (.rustfmt.toml is the kernel tree's): the crate
# root pulls in every file of the module.
rustfmt:
	rustfmt --edition 2021 --config-path .rustfmt.toml drivers/dm_qcow2.rs

rustfmtcheck:
	rustfmt --check --edition 2021 --config-path .rustfmt.toml drivers/dm_qcow2.rs

host-test:
	tools/check.sh host

kselftest: module
	tools/check.sh kselftest $(T)

# qcow2_crash.sh with CRASH_STATES crash states per file system (CI runs
# the script's default); DMQ_CRASH_SEED=S repeats a run
CRASH_STATES ?= 1500
crashtest: module
	DMQ_CRASH_STATES=$(CRASH_STATES) DMQ_TEST_TIMEOUT=$${DMQ_TEST_TIMEOUT:-14400} \
		tools/check.sh kselftest qcow2_crash.sh

check test: module
	tools/check.sh all

# everything: the scripts' long cases (DMQ_LONG_CASES) too
check-full: module
	DMQ_FULL=1 tools/check.sh all

check-debug: module
	tools/check.sh all

# The scripts whose cases run fio beside the target's lanes and worker, in
# VMs with 4 vCPUs each (make check's VMs have one: see tools/check.sh)
check-smp: module
	DMQ_VM_CPUS=$${DMQ_VM_CPUS:-4} tools/check.sh kselftest qcow2_write.sh qcow2_merge.sh

demo: module
	tools/demo.sh

bench: module
	tools/bench.sh

# The rublk peer for make bench (a userspace ublk qcow2 server from crates.io),
# matplotlib for its chart (bench-last.svg) and perf for DMQ_BENCH_PERF.
bench-deps:
	command -v rublk >/dev/null || [ -x $$HOME/.cargo/bin/rublk ] || cargo install --locked rublk
	dpkg-query -W -f='$${Status}' python3-matplotlib 2>/dev/null | grep -q 'ok installed' || \
		apt-get install -y -qq --no-install-recommends python3-matplotlib
	command -v perf >/dev/null || apt-get install -y -qq --no-install-recommends linux-perf

clean:
	-$(MAKE) -C $(KDIR) M=$(CURDIR) $(DMQ_LLVM) clean
	rm -f rust/bindings_generated.rs
