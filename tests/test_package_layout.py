"""The layout: gateway/ and hooks/ sit beside hpcc/ in the checkout but install as the
subpackages hpcc.gateway and hpcc.hooks; the tests import the installed package; data flows
one way (registry -> gateway -> store -> launcher -> runtime + hooks -> process), so no part
imports one above it; the test kit is imported by the tests and the demo only.
(docs/ARCHITECTURE.md explains the parts.)"""
import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

# What each lower part may import of hpcc besides itself (prefixes). The parts not listed
# (the CLIs, the Slurm side, doctor) sit on top and may import any of these.
ALLOWED = {
    "hpcc.errors": (),
    "hpcc.config": ("hpcc.errors",),
    "hpcc.reference": ("hpcc.errors",),
    "hpcc.image": ("hpcc.errors",),
    "hpcc.squashfs": ("hpcc.errors",),
    "hpcc.store": ("hpcc.config", "hpcc.errors", "hpcc.image", "hpcc.reference"),
    "hpcc.resolve": ("hpcc.errors", "hpcc.image", "hpcc.reference", "hpcc.store"),
    "hpcc.runtime": ("hpcc.config", "hpcc.errors",
                     "hpcc.squashfs"),     # --save writes the container's root as an image
    "hpcc.hooks": ("hpcc.config", "hpcc.errors", "hpcc.runtime"),
    "hpcc.gateway": ("hpcc.config", "hpcc.errors", "hpcc.image", "hpcc.reference",
                     "hpcc.squashfs", "hpcc.store", "hpcc.resolve",
                     "hpcc.slurm.jobs"),   # which images pending jobs name (prefetch)
}


def _installed_modules():
    """(module name, path) of every module of the installed hpcc."""
    import hpcc

    root = Path(hpcc.__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = rel.parts[:-1] if path.name == "__init__.py" else rel.parts
        yield ".".join(parts), path


def _imports(name, path):
    """Absolute names a module imports: `import a.b` gives a.b, `from a import b` gives
    a.b (a module or a name in a), relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            yield from (f"{mod}.{a.name}" for a in node.names)


def _within(name, prefix):
    return name == prefix or name.startswith(prefix + ".")


def test_tests_import_the_installed_package_not_the_checkout():
    import hpcc
    import hpcc.gateway
    import hpcc.hooks
    import hpcc.squashfs._sqfs  # noqa: F401 (compiled: only in the installed package)

    for mod in (hpcc, hpcc.gateway, hpcc.hooks):
        path = Path(mod.__file__).resolve()
        assert REPO not in path.parents, f"{mod.__name__} imported from the checkout: {path}"
    assert Path(hpcc.gateway.__file__).resolve().parent == (
        Path(hpcc.__file__).resolve().parent / "gateway")


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_no_part_imports_one_above_it(part):
    modules = [(n, p) for n, p in _installed_modules() if _within(n, part)]
    assert modules, part
    wrong = []
    for name, path in modules:
        for target in _imports(name, path):
            if not _within(target, "hpcc") or _within(target, part):
                continue
            if target == "hpcc" or target.startswith("hpcc.__"):   # __version__: shared ground
                continue
            if not any(_within(target, ok) for ok in ALLOWED[part]):
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def test_no_product_module_imports_the_testkit():
    """The test kit ships in the package (the demo and the tests use the installed one), but
    the product never depends on it: only hpcc.testkit itself and hpcc.demo import it."""
    modules = list(_installed_modules())
    assert len(modules) > 40, f"only {len(modules)} modules found"
    wrong = [f"{name} imports {target}"
             for name, path in modules if not _within(name, "hpcc.testkit") and name != "hpcc.demo"
             for target in _imports(name, path) if _within(target, "hpcc.testkit")]
    assert not wrong, wrong


def test_every_source_package_is_listed_and_ships_with_its_data_and_no_c():
    """pyproject.toml lists the packages by hand (package-dir maps gateway/ and hooks/): a
    directory of modules left out would silently not install, and a directory of other files
    setuptools cannot place is what made `pip install` warn. Installed: the data directory
    (etc/ copies, Slurm command wrappers), no C sources."""
    import tomllib

    import hpcc

    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    for name, src in tool["package-dir"].items():
        for d in [REPO / src, *(p for p in (REPO / src).rglob("*") if p.is_dir())]:
            if d.name == "__pycache__" or not any(f.suffix == ".py" for f in d.iterdir()):
                continue
            dotted = ".".join([name, *d.relative_to(REPO / src).parts])
            assert dotted in listed, f"{d} has modules but {dotted} is not in packages"
    installed = Path(hpcc.__file__).resolve().parent
    assert {"hpcc.toml", "hpcc.schema.json"} <= {p.name for p in (installed / "data").iterdir()}
    assert (installed / "data" / "slurm-bin" / "srun").is_file()
    assert not [p for p in installed.rglob("*") if p.suffix in (".c", ".h")]
