"""Path resolution inside a root (no mounts needed: a plain directory stands for the root)."""
import errno
import os

import pytest

from hpcc.errors import MountError
from hpcc.runtime import inroot


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    (r / "etc").mkdir(parents=True)
    (r / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\n")
    (r / "tmp").symlink_to("/etc")                      # absolute: resolves inside
    (r / "up").symlink_to("../../../../../../etc")      # climbing: stops at the root
    (r / "dangling").symlink_to("/nonexistent/dir")
    (tmp_path / "outside").mkdir()
    fd = os.open(r, os.O_PATH | os.O_DIRECTORY)
    yield r, fd
    os.close(fd)


def _real(fd):
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.mark.parametrize("openat2", [True, False])
def test_plain_paths_resolve(root, monkeypatch, openat2):
    r, fd = root
    monkeypatch.setattr(inroot, "_HAVE_OPENAT2", openat2)
    t = inroot.open_in_root(fd, "/etc/passwd")
    assert _real(t) == str(r / "etc" / "passwd")
    os.close(t)


@pytest.mark.parametrize("openat2", [True, False], ids=["openat2", "nofollow-walk"])
def test_symlinks_resolve_inside_the_root(root, monkeypatch, openat2):
    """The one fallback where openat2 is missing resolves like RESOLVE_IN_ROOT does."""
    r, fd = root
    monkeypatch.setattr(inroot, "_HAVE_OPENAT2", openat2)
    for path in ("/tmp/passwd", "/up/passwd", "/../../etc/passwd"):
        t = inroot.open_in_root(fd, path)
        assert _real(t) == str(r / "etc" / "passwd"), path
        os.close(t)


@pytest.mark.parametrize("openat2", [True, False], ids=["openat2", "nofollow-walk"])
def test_magic_and_dangling_links_do_not_leave_the_root(root, monkeypatch, openat2):
    r, fd = root
    monkeypatch.setattr(inroot, "_HAVE_OPENAT2", openat2)
    with pytest.raises(OSError) as e:
        inroot.open_in_root(fd, "/dangling")
    assert e.value.errno == errno.ENOENT
    t = inroot.open_in_root(fd, "/dangling", follow=False)
    assert _real(t) == str(r / "dangling")
    os.close(t)


def test_seccomp_eperm_from_openat2_falls_back_to_the_walk(root, monkeypatch):
    """A seccomp filter that answers EPERM for openat2 (some container runtimes' default
    profiles) is taken as 'no openat2'. Mock: the filter cannot be installed from a test."""
    r, fd = root
    monkeypatch.setattr(inroot, "_HAVE_OPENAT2", True)

    def filtered(*a):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(inroot._sys, "openat2", filtered)
    t = inroot.open_in_root(fd, "/tmp/passwd")
    assert _real(t) == str(r / "etc" / "passwd") and inroot._HAVE_OPENAT2 is False
    os.close(t)


def test_missing_targets_are_created_only_on_allowed_filesystems(root):
    r, fd = root
    dev = os.fstat(fd).st_dev
    t = inroot.resolve_target(fd, "/new/a/b", "dir", {dev})
    assert _real(t) == str(r / "new" / "a" / "b")
    os.close(t)
    t = inroot.resolve_target(fd, "/new/file", "file", {dev})
    assert os.path.isfile(r / "new" / "file")
    os.close(t)
    # a dangling symlink is followed inside the root: /nonexistent/dir is created there
    t = inroot.resolve_target(fd, "/dangling/x", "dir", {dev})
    assert _real(t) == str(r / "nonexistent" / "dir" / "x")
    os.close(t)
    with pytest.raises(MountError, match="host directory"):
        inroot.resolve_target(fd, "/other/dir", "dir", set())
    assert not os.path.exists(r / "other")


def test_files_are_replaced_not_written_through_symlinks(root, tmp_path):
    r, fd = root
    victim = tmp_path / "outside" / "victim"
    victim.write_text("keep")
    (r / "etc" / "hosts").symlink_to(str(victim))
    dev = os.fstat(fd).st_dev
    inroot.write_file_in_root(fd, "/etc/hosts", b"new\n", {dev})
    assert victim.read_text() == "keep"
    assert not os.path.islink(r / "etc" / "hosts")
    assert (r / "etc" / "hosts").read_text() == "new\n"


def test_eagain_from_openat2_is_retried(root, monkeypatch):
    """openat2(RESOLVE_IN_ROOT) returns EAGAIN when a mount or rename raced with it."""
    r, fd = root
    real = inroot._sys.openat2
    calls = []

    def openat2_fault(*a):  # the kernel race cannot be produced on demand
        calls.append(a)
        if len(calls) < 3:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        return real(*a)
    monkeypatch.setattr(inroot._sys, "openat2", openat2_fault)
    t = inroot.open_in_root(fd, "/etc/passwd")
    assert _real(t) == str(r / "etc" / "passwd") and len(calls) == 3
    os.close(t)


@pytest.mark.parametrize("openat2", [True, False], ids=["openat2", "nofollow-walk"])
def test_directories_reached_through_links_open_with_the_flags_asked(root, monkeypatch, openat2):
    r, fd = root
    monkeypatch.setattr(inroot, "_HAVE_OPENAT2", openat2)
    for path in ("/up", "/tmp", "/"):
        t = inroot.open_in_root(fd, path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert "passwd" in os.listdir(t) or path == "/", path  # O_PATH fds cannot list
        finally:
            os.close(t)
