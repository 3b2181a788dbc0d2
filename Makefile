# hpcc — top-level targets. Run as root on Debian 12.
#   make demo   set everything up and run the main job end to end on an embedded image
#   make test   set everything up and run the whole test suite
#   make install / deps / bench / spank
SHELL := /bin/bash
PYTHON  ?= /usr/bin/python3
PREFIX  ?= /opt/hpcc
VENV    ?= $(PREFIX)/venv
BINDIR  ?= /usr/local/bin
PYTEST_ARGS ?=
# Man pages and shell completions (generated from the CLI definitions by hpcc.clidoc).
MANDIR  ?= /usr/local/share/man
BASHCOMPDIR ?= /usr/share/bash-completion/completions
ZSHCOMPDIR  ?= /usr/local/share/zsh/site-functions
FISHCOMPDIR ?= /usr/share/fish/vendor_completions.d
# `make install SUID=no` installs the mount helper without the setuid bit (unprivileged
# launches then keep squashfuse_ll for every image): see README, "Kernel mounts for users".
SUID    ?= yes

# Why each package is here: see README.md, "Dependencies".
APT_PKGS := libsquashfs-dev squashfs-tools-ng squashfs-tools squashfuse fuse3 \
	docker-registry umoci busybox-static zstd apache2-utils openssl \
	python3-venv python3-dev build-essential pkg-config iproute2 util-linux \
	slurm-wlm slurmd slurmctld libslurm-dev munge libmunge-dev mpich libmpich-dev libopenmpi3 \
	skopeo apparmor procps strace zsh fish
BENCH_APT_PKGS := charliecloud charliecloud-builders debootstrap hyperfine

.PHONY: all deps bench-deps venv install spank libexec mpi4py-wheel lint test demo bench clean

all: install

deps:
	@missing=$$(for p in $(APT_PKGS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing apt packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

bench-deps: deps
	@missing=$$(for p in $(BENCH_APT_PKGS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; fi

# The stamp is written only once the build tools are in: a venv whose upgrade failed (no
# network, a proxy's CA missing) is completed by the next run instead of being taken as done.
# setuptools >= 77 reads pyproject.toml's SPDX `license` string (Debian 12 ships 66).
$(VENV)/.hpcc-venv-ready:
	[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip 'setuptools>=77' wheel cffi
	touch $@

venv: deps $(VENV)/.hpcc-venv-ready

# A real (non-editable) install: the launcher runs as any user, so it must not depend on
# the checkout being readable. The package is rebuilt every time (cheap; keeps tests honest).
install: venv spank libexec
	@# setuptools builds in ./build: a module turned into a package (or removed) would
	@# otherwise be shipped again from an earlier build's copy.
	rm -rf build
	$(VENV)/bin/pip install -q --no-build-isolation '.[test]'
	@# The venv's python3 as a real file, not a symlink to the system's: AppArmor attaches
	@# profiles by the executable's resolved path, and the profile below must grant user
	@# namespaces to hpcc's interpreter only. Refreshed when the system's python3 changes.
	@base=$$(readlink -f "$$($(VENV)/bin/python3 -c 'import sys; print(sys._base_executable)')"); \
	if [ -L $(VENV)/bin/python3 ] || ! cmp -s "$$base" $(VENV)/bin/python3; then \
		cp -p "$$base" $(VENV)/bin/python3.tmp && mv -f $(VENV)/bin/python3.tmp $(VENV)/bin/python3; \
	fi
	@# Ubuntu >= 23.10 (kernel.apparmor_restrict_unprivileged_userns=1): a profile granting
	@# `userns` to that interpreter (README, "Ubuntu"); nothing elsewhere.
	@$(VENV)/bin/python3 -I -m hpcc.apparmor install $(VENV)/bin/python3
	@# ... and to the mount helper, which unshares one after dropping its privileges (to lock
	@# the flags of the mount it hands out: docs/launcher.md, "The mount helper").
	@$(VENV)/bin/python3 -I -m hpcc.apparmor install $(PREFIX)/libexec/hpcc-mount
	@# The launcher's entry script without site.py (-S saves ~9 ms per launch) and isolated
	@# from PYTHON* variables (-I); it puts the venv's packages on sys.path itself.
	@purelib=$$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	printf '%s\n' "#!$(VENV)/bin/python3 -IS" \
		"# hpcc launcher written by 'make install': -I ignores PYTHON* variables and the user's" \
		"# site directory, -S skips site.py (about 9 ms of every launch)." \
		"import sys" "sys.path.append('$$purelib')" "from hpcc.cli import main" \
		"sys.exit(main())" > $(VENV)/bin/hpcc.tmp && chmod 0755 $(VENV)/bin/hpcc.tmp && \
	mv $(VENV)/bin/hpcc.tmp $(VENV)/bin/hpcc
	@install -d -m 0755 $(BINDIR)
	@for s in hpcc gateway hpcc-hook; do ln -sf $(VENV)/bin/$$s $(BINDIR)/$$s; done
	@install -d -m 0755 /etc/hpcc
	@# a first install names this PREFIX's mount helper in launcher.mount_helper
	@[ -e /etc/hpcc/hpcc.toml ] || { sed 's|"/opt/hpcc/libexec/hpcc-mount"|"$(PREFIX)/libexec/hpcc-mount"|' \
		etc/hpcc.toml > /etc/hpcc/.hpcc.toml.new && chmod 0644 /etc/hpcc/.hpcc.toml.new && \
		mv /etc/hpcc/.hpcc.toml.new /etc/hpcc/hpcc.toml; }
	@install -d -m 0755 /etc/hpcc/hooks.d
	@for f in etc/hooks.d/*.json; do d=/etc/hpcc/hooks.d/$$(basename $$f); \
		[ -e $$d ] || sed 's|/usr/local/bin/hpcc-hook|$(BINDIR)/hpcc-hook|' $$f > $$d; done
	@# man pages hpcc(1), gateway(8), hpcc-hook(8), hpcc.toml(5) and bash/zsh/fish
	@# completions, generated from the programs' own option definitions
	@rm -rf $(VENV)/share/hpcc-doc && $(VENV)/bin/python -P -m hpcc.clidoc \
		$(VENV)/share/hpcc-doc etc/hpcc.toml >/dev/null
	@for f in $(VENV)/share/hpcc-doc/man/man*/*; do \
		install -D -m 0644 $$f $(MANDIR)/$$(basename $$(dirname $$f))/$$(basename $$f); done
	@for f in $(VENV)/share/hpcc-doc/completions/bash/*; do \
		install -D -m 0644 $$f $(BASHCOMPDIR)/$$(basename $$f); done
	@for f in $(VENV)/share/hpcc-doc/completions/zsh/*; do \
		install -D -m 0644 $$f $(ZSHCOMPDIR)/$$(basename $$f); done
	@for f in $(VENV)/share/hpcc-doc/completions/fish/*; do \
		install -D -m 0644 $$f $(FISHCOMPDIR)/$$(basename $$f); done
	@chmod -R a+rX $(VENV)

spank:
	@if [ -f spank/Makefile ]; then $(MAKE) -s -C spank; fi

# the setuid mount helper, as $(PREFIX)/libexec/hpcc-mount (launcher.mount_helper)
libexec:
	@$(MAKE) -s -C libexec install PREFIX=$(PREFIX) SUID=$(SUID)

# The MPI tests' mpi4py, built from source against Debian's MPICH into .whl/ (git-ignored)
# once: minutes of compiling that belong here, not inside a test's timeout.
mpi4py-wheel: venv
	@ls .whl/mpi4py-*.whl >/dev/null 2>&1 || { \
		echo "building mpi4py against MPICH (once, into .whl/)"; \
		MPICC=mpicc $(VENV)/bin/pip wheel -q --no-deps --no-binary mpi4py mpi4py -w .whl; }

# ruff (configured in pyproject.toml: line length, import order, unused names), from the venv
lint: install
	$(VENV)/bin/ruff check .

test: lint mpi4py-wheel
	$(VENV)/bin/python -P -m pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/python -P -m hpcc.demo

bench: install bench-deps
	@for b in bench/*.sh; do echo "== $$b"; bash $$b || exit 1; done

clean:
	rm -rf build dist *.egg-info hpcc/squashfs/_sqfs*
	@if [ -f spank/Makefile ]; then $(MAKE) -s -C spank clean; fi
	@$(MAKE) -s -C libexec clean
