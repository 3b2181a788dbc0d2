"""`make install` on Ubuntu >= 23.10: the launcher's interpreter is a real file of the venv,
and where AppArmor restricts user namespaces a profile grants `userns` to that file only."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpcc import apparmor

BIN = Path(sys.executable).parent
PY = BIN / "python3"


def test_the_launcher_interpreter_is_a_real_file_of_the_venv():
    assert not PY.is_symlink() and PY.is_file() and os.access(PY, os.X_OK)
    assert os.path.realpath(PY) == str(PY)
    first = (BIN / "hpcc").read_text().splitlines()[0]
    assert first == f"#!{PY} -IS"
    p = subprocess.run([str(BIN / "hpcc"), "version"], capture_output=True, text=True,
                       check=False)
    assert p.returncode == 0 and p.stdout.startswith("hpcc ")
    # it is still the venv's interpreter (pyvenv.cfg found beside it)
    p = subprocess.run([str(PY), "-c", "import sys; print(sys.prefix)"], capture_output=True,
                       text=True, check=False)
    assert p.stdout.strip() == str(BIN.parent)


def test_the_profile_names_that_file_only_and_grants_userns_unconfined():
    text = apparmor.profile_text(PY)
    name = apparmor.profile_name(PY)
    assert name == "hpcc-" + str(PY).strip("/").replace("/", ".")
    assert f"profile {name} {PY} flags=(unconfined) {{\n  userns,\n" in text
    assert "abi <abi/4.0>," in text
    assert f"include if exists <local/{name}>" in text
    # exactly one rule: nothing but userns is granted beyond unconfined
    rules = [ln.strip() for ln in text.split("{", 1)[1].splitlines()
             if ln.strip() and not ln.strip().startswith(("#", "include", "}"))]
    assert rules == ["userns,"]


def test_a_symlink_or_a_pattern_path_gets_no_profile(tmp_path):
    link = tmp_path / "python3"
    link.symlink_to(sys.executable)
    with pytest.raises(ValueError, match="is a symlink"):
        apparmor.profile_text(link)
    odd = tmp_path / "py*thon"
    odd.write_text("")
    with pytest.raises(ValueError, match="pattern"):
        apparmor.profile_text(odd)


def test_apparmor_parser_accepts_the_profile(tmp_path):
    parser = shutil.which("apparmor_parser") or (
        "/usr/sbin/apparmor_parser" if os.path.exists("/usr/sbin/apparmor_parser") else None)
    if parser is None:
        pytest.skip("apparmor_parser is not installed (apt-get install apparmor)")
    v = subprocess.run([parser, "--version"], capture_output=True, text=True, check=False)
    major = int(re.search(r"version (\d+)", v.stdout).group(1))
    text = apparmor.profile_text(PY)
    if major < 4:
        # Debian 12's parser (3.0) predates the userns rule and ABI 4.0, which Ubuntu's
        # (4.0, where the restriction exists) has: parse everything else.
        text = text.replace("abi <abi/4.0>,", "abi <abi/3.0>,").replace("  userns,\n", "")
    f = tmp_path / "profile"
    f.write_text(text)
    p = subprocess.run([parser, "-Q", "-K", str(f)], capture_output=True, text=True,
                       check=False)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("value,has_dir,expect", [
    ("1\n", True, True), ("0\n", True, False), (None, True, False), ("1\n", False, False)])
def test_the_profile_is_installed_only_where_apparmor_restricts(tmp_path, value, has_dir,
                                                                 expect):
    sysctl = tmp_path / "apparmor_restrict_unprivileged_userns"
    if value is not None:
        sysctl.write_text(value)
    d = tmp_path / "apparmor.d"
    if has_dir:
        d.mkdir()
    assert apparmor.restricted(str(sysctl), str(d)) is expect


def test_install_writes_the_profile_atomically(tmp_path):
    path = apparmor.install(PY, profile_dir=str(tmp_path), load=False)
    assert path == str(tmp_path / apparmor.profile_name(PY))
    assert Path(path).read_text() == apparmor.profile_text(PY)
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path) == [os.path.basename(path)]


def test_no_profile_on_a_host_without_the_restriction():
    if apparmor.restricted():
        pytest.skip("this host restricts user namespaces with AppArmor")
    assert not os.path.exists(apparmor.profile_path(PY))
