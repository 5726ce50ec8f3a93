# The two commands a newcomer needs: `make demo` and `make test`.
# Both bootstrap everything on a fresh Debian 12 machine (as root) and are
# quick no-ops when already set up.

PYTHON    ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
STAMPS    := .stamps
APT_PKGS  := fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv \
             fsverity nginx-light erofs-utils sqlite3 fio squashfuse iproute2 kmod \
             curl tar util-linux
# peers only the benchmarks compare against
BENCH_APT := squashfs-tools rclone httpfs2 debootstrap attr

.PHONY: setup demo test bench bench-quick bench-debian clean install-helpers uninstall-helpers \
        install-systemd uninstall-systemd

# where mount(8) looks for mount.incfs (/sbin is /usr/sbin on Debian 12)
SBINDIR   ?= /usr/sbin
SYSTEMDDIR ?= /etc/systemd/system

setup: $(STAMPS)/venv $(STAMPS)/native $(STAMPS)/bytecode $(STAMPS)/helpers

# incfs._block_dirents (setup.py), the C fast path of directory listings,
# built into src/incfs. Optional: without it incfs.block_dirents does the
# same in Python (a cold walk of a million files takes ~0.2 s longer), so a
# failed build is a note, not an error.
$(STAMPS)/native: $(STAMPS)/venv setup.py src/incfs/_block_dirents.c
	@$(BIN)/python -W ignore setup.py -q build_ext --inplace >/dev/null 2>&1 \
	    || echo "note: incfs._block_dirents not built (gcc, python3-dev?): listings in Python"
	@touch $@

# Every mount starts two interpreters that import ~70 of our modules: without
# .pyc files (PYTHONDONTWRITEBYTECODE=1 in the environment, a read-only
# tree) each start compiles them again, ~65 ms of a ~300 ms start.
# compileall writes them whatever that variable says.
$(STAMPS)/bytecode: $(STAMPS)/venv $(shell find src/incfs -name '*.py')
	@$(BIN)/python -m compileall -q src/incfs
	@touch $@

$(STAMPS)/apt: Makefile
	@mkdir -p $(STAMPS)
	@missing=$$(for p in $(APT_PKGS); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "apt: installing $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@touch $@

$(STAMPS)/venv: $(STAMPS)/apt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip
	@$(BIN)/pip install -q -e '.[test,bench]'
	@touch $@

# mount.incfs and umount.fuse.incfs: `mount -t incfs`, fstab lines, umount
# (root only; a normal user gets a note and `incfs mount` still works)
$(STAMPS)/helpers: $(STAMPS)/venv src/incfs/mount_helper.py
	@if [ "$$(id -u)" = 0 ]; then \
	    $(BIN)/python -m incfs.mount_helper install --sbin $(SBINDIR) --python $(abspath $(BIN))/python; \
	else \
	    echo "note: not root, so mount.incfs is not installed in $(SBINDIR) (see docs/operations.md)"; \
	fi
	@touch $@

install-helpers:
	@rm -f $(STAMPS)/helpers
	@$(MAKE) --no-print-directory $(STAMPS)/helpers

uninstall-helpers:
	rm -f $(SBINDIR)/mount.incfs $(SBINDIR)/umount.fuse.incfs $(STAMPS)/helpers

# incfs@.service (one mount per instance, configured in /etc/incfs/<name>.conf)
install-systemd: setup
	@sed 's|@INCFS@|$(abspath $(BIN))/incfs|g' systemd/incfs@.service > $(SYSTEMDDIR)/incfs@.service
	@mkdir -p /etc/incfs
	@test -e /etc/incfs/example.conf || cp systemd/example.conf /etc/incfs/example.conf
	@systemctl daemon-reload 2>/dev/null || echo "note: systemd is not running here; unit installed anyway"
	@echo "installed $(SYSTEMDDIR)/incfs@.service (see docs/operations.md)"

uninstall-systemd:
	rm -f $(SYSTEMDDIR)/incfs@.service
	-systemctl daemon-reload 2>/dev/null

demo: setup
	@$(BIN)/python -m incfs.demo

test: setup
	@$(BIN)/python -m pytest -q tests

$(STAMPS)/bench: $(STAMPS)/venv Makefile
	@missing=$$(for p in $(BENCH_APT); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "apt: installing $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@$(BIN)/pip install -q py-spy
	@touch $@

bench: $(STAMPS)/bench
	@$(BIN)/python bench/run.py

bench-quick: $(STAMPS)/bench
	@$(BIN)/python bench/run.py --quick

# pack a debootstrapped Debian minbase (from the tree and from a tar of it)
# and compare every entry, then time programs chrooted into it against the
# tree itself; minutes, so not part of `make test`
bench-debian: $(STAMPS)/bench
	@$(BIN)/python bench/debian_rootfs.py
	@$(BIN)/python bench/debian_chroot.py

clean:
	rm -rf $(STAMPS) $(VENV) build src/*.egg-info src/incfs/_block_dirents.*.so
