"""Man pages and shell completions generated from the CLI definitions (hpcc.clidoc), as
`make install` writes them: every command and option the programs accept is in them."""
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    d = tmp_path_factory.mktemp("clidoc")
    subprocess.run([sys.executable, "-P", "-m", "hpcc.clidoc", str(d),
                    str(REPO / "etc" / "hpcc.toml")], check=True, capture_output=True)
    return d


@pytest.mark.parametrize("page", ["man1/hpcc.1", "man8/gateway.8", "man8/hpcc-hook.8",
                                  "man5/hpcc.toml.5"])
def test_man_pages_render_without_warnings(out, page):
    path = out / "man" / page
    p = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(path)],
                       capture_output=True, text=True) if shutil.which("groff") else None
    if p is not None:
        assert p.returncode == 0 and p.stderr == "", p.stderr
    text = path.read_text()
    assert text.startswith(".TH ") and ".SH NAME" in text


def test_pages_list_every_command_and_option(out):
    gateway = (out / "man" / "man8" / "gateway.8").read_text()
    for word in ("gateway pull", "gateway import", "gateway gc", "gateway prefetch",
                 "\\-\\-blobs", "\\-\\-platform", "\\-\\-insecure", "EXIT STATUS"):
        assert word in gateway, word
    hpcc = (out / "man" / "man1" / "hpcc.1").read_text()
    for word in ("hpcc run [OPTIONS] IMAGE", "hpcc exec", "\\-\\-mount", "\\-\\-gpus",
                 "\\-\\-env\\-file", "hpcc pull", "containers"):
        assert word in hpcc, word
    hook = (out / "man" / "man8" / "hpcc-hook.8").read_text()
    assert "\\-\\-dry\\-run" in hook and "mpi" in hook
    toml = (out / "man" / "man5" / "hpcc.toml.5").read_text()
    for word in (".SH [STORE]", "blob_cache", ".SH [LAUNCHER]", "mount_home", "abi_check"):
        assert word in toml, word


@pytest.mark.parametrize("words,cword,expect", [
    (["gateway", "pu"], 1, "pull"), (["gateway", "gc", "--bl"], 2, "--blobs"),
    (["hpcc", "run", "--mp"], 2, "--mpi"), (["hpcc", "ima"], 1, "images"),
    (["hpcc-hook", "nv"], 1, "nvidia"),
])
def test_bash_completion_completes_commands_and_options(out, words, cword, expect):
    prog = words[0]
    script = (f"source {out}/completions/bash/{prog}; COMP_WORDS=({' '.join(words)}); "
              f"COMP_CWORD={cword}; _{prog.replace('-', '_')}; echo \"${{COMPREPLY[@]}}\"")
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert expect in p.stdout.split(), p.stdout


@pytest.mark.parametrize("shell,path", [("zsh", "zsh/_gateway"), ("fish", "fish/hpcc.fish")])
def test_zsh_and_fish_completions_parse(out, shell, path):
    if not shutil.which(shell):
        pytest.skip(f"{shell} is not installed")
    flag = ["-n"] if shell == "zsh" else ["--no-execute"]
    p = subprocess.run([shell, *flag, str(out / "completions" / path)], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr


def test_make_install_installs_them():
    """`make install` puts the pages and completions where man and the shells look."""
    mk = (REPO / "Makefile").read_text()
    assert "-m hpcc.clidoc" in mk and "$(MANDIR)" in mk and "$(BASHCOMPDIR)" in mk
    assert os.path.exists(os.path.join(sys.prefix, "share", "hpcc-doc", "man", "man1",
                                       "hpcc.1"))


def test_fish_completion_completes_commands_and_options(out):
    if not shutil.which("fish"):
        pytest.skip("fish is not installed")
    for prog, line, expect in (("gateway", "gateway pu", "pull"),
                               ("hpcc", "hpcc run --mp", "--mpi"),
                               ("gateway", "gateway gc --bl", "--blobs")):
        p = subprocess.run(["fish", "-c", f"source {out}/completions/fish/{prog}.fish; "
                            f"complete -C '{line}'"], capture_output=True, text=True, check=True)
        assert expect in [ln.split("\t")[0] for ln in p.stdout.splitlines()], p.stdout
