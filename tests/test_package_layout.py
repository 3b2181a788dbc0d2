"""The layout: gateway/ and hooks/ sit beside hpcc/ in the checkout but install as the
subpackages hpcc.gateway and hpcc.hooks, and the tests import the installed package."""
from pathlib import Path

from tests.conftest import REPO


def test_tests_import_the_installed_package_not_the_checkout():
    import hpcc
    import hpcc.gateway
    import hpcc.hooks
    import hpcc.squashfs._sqfs  # compiled: only in the installed package

    for mod in (hpcc, hpcc.gateway, hpcc.hooks):
        path = Path(mod.__file__).resolve()
        assert REPO not in path.parents, f"{mod.__name__} imported from the checkout: {path}"
    assert Path(hpcc.gateway.__file__).resolve().parent == (
        Path(hpcc.__file__).resolve().parent / "gateway")
