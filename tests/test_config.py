"""Site config: defaults, validation errors naming the key, reference parsing."""
import pytest

from hpcc.config import load_config
from hpcc.errors import ConfigError, ReferenceError_
from hpcc.reference import parse_reference


def test_missing_default_config_means_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("HPCC_CONFIG", raising=False)
    monkeypatch.setattr("hpcc.config.DEFAULT_PATH", str(tmp_path / "none.toml"))
    cfg = load_config()
    assert cfg["gateway"]["compressor"] == "zstd"


def test_shipped_config_is_valid():
    from tests.conftest import REPO

    cfg = load_config(str(REPO / "etc" / "hpcc.toml"))
    assert cfg["store"]["path"] == "/var/lib/hpcc/images"


@pytest.mark.parametrize("text,key", [
    ('[gateway]\nlevel = "high"\n', "gateway.level"),
    ('[gateway]\ncompresor = "zstd"\n', "gateway.compresor"),
    ('[bogus]\nx = 1\n', "bogus"),
    ('[launcher]\ndevices = ["/etc/passwd"]\n', "launcher.devices.0"),
])
def test_bad_config_names_the_key(tmp_path, text, key):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert f"'{key}'" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text,warm_mb", [
    ("[launcher]\nprefetch_mb = 7\n", 7),                  # the key's old name still works
    ("[launcher]\nprefetch_mb = 7\nwarm_mb = 9\n", 9),     # the new name wins
    ("[launcher]\nwarm_mb = 0\n", 0),
    ("", 32),
])
def test_renamed_key_prefetch_mb_is_read_as_warm_mb(tmp_path, text, warm_mb):
    p = tmp_path / "c.toml"
    p.write_text(text)
    cfg = load_config(str(p), memo=False)
    assert cfg["launcher"]["warm_mb"] == warm_mb
    assert "prefetch_mb" not in cfg["launcher"]


def test_config_that_is_not_toml_is_one_line_error(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[gateway\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert "not valid TOML" in str(e.value)


def test_hpcc_config_pointing_nowhere_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HPCC_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError):
        load_config()


@pytest.mark.parametrize("ref,expected", [
    ("ubuntu", "docker.io/library/ubuntu:latest"),
    ("ubuntu:22.04", "docker.io/library/ubuntu:22.04"),
    ("user/img", "docker.io/user/img:latest"),
    ("localhost:5000/a/b:c", "localhost:5000/a/b:c"),
    ("127.0.0.1:5000/ns/app@sha256:" + "a" * 64, "127.0.0.1:5000/ns/app@sha256:" + "a" * 64),
    ("ghcr.io/o/r:v1@sha256:" + "b" * 64, "ghcr.io/o/r:v1@sha256:" + "b" * 64),
])
def test_references_normalise_like_docker(ref, expected):
    assert str(parse_reference(ref)) == expected


@pytest.mark.parametrize("ref", ["Ubuntu", "a@sha256:zz", "a b", "", ":x", "a:-x", "a//b"])
def test_bad_references_are_rejected(ref):
    with pytest.raises(ReferenceError_):
        parse_reference(ref)


def test_a_config_text_that_passed_is_not_validated_again_until_it_changes(
        tmp_path, monkeypatch):
    import hpcc.config as config

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = []
    real = config.validate
    monkeypatch.setattr(config, "validate", lambda data, source: (calls.append(source),
                                                                  real(data, source)))
    p = tmp_path / "c.toml"
    p.write_text('[gateway]\nlevel = 4\n')
    assert load_config(str(p))["gateway"]["level"] == 4
    assert load_config(str(p))["gateway"]["level"] == 4
    assert len(calls) == 1                                  # the second load trusted it
    assert len(list((tmp_path / "cache" / "hpcc" / "valid-config").iterdir())) == 1
    load_config(str(p), memo=False)                         # `hpcc config check` always checks
    assert len(calls) == 2
    p.write_text('[gateway]\nlevel = "high"\n')              # changed: validated again
    with pytest.raises(ConfigError, match="gateway.level"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="gateway.level"):
        load_config(str(p))                                 # and a bad text never passes
    assert len(calls) == 4
