"""Site configuration: etc/hpcc.toml, validated against etc/hpcc.schema.json.

Lookup order: the explicit path given by the caller, $HPCC_CONFIG, /etc/hpcc/hpcc.toml; a
missing default file means "all defaults". Validation needs jsonschema, which is slow to
import (about 100 ms), so `load_config(validate_schema=False)` exists for the launch path,
which relies on a validation done earlier by an admin command (`gateway`, `hpcc config
check`).
"""
import os

from .errors import ConfigError

DEFAULT_PATH = "/etc/hpcc/hpcc.toml"

DEFAULTS = {
    "store": {
        "path": "/var/lib/hpcc/images",
        "user_path": "$XDG_DATA_HOME/hpcc/images",
        "blob_cache": "",
        "user_blob_cache_mb": 0,
        "blob_cache_max_mb": 0,
    },
    "gateway": {
        "compressor": "zstd",
        "level": 0,
        "block_size": 131072,
        "workers": 0,
        "concurrent_downloads": 4,
        "retries": 5,
        "strip_setuid": True,
        "strip_sticky": False,
        "keep_user_xattrs": True,
        "platform": "",
    },
    "registries": {},
    "service": {
        "enabled": False,
        "socket": "/run/hpcc/gateway.sock",
        "listen": "",
        "address": "",
        "munge_socket": "",
        "resolve_cache_seconds": 60,
        "max_connections": 512,
    },
    "policy": {
        "allow": [],
        "deny": [],
        "max_compressed_mb": 0,
        "max_squashfs_mb": 0,
        "user_concurrent_pulls": 0,
        "user_pulls_per_hour": 0,
        "store_budget_mb": 0,
        "audit_log": "/var/log/hpcc/gateway-audit.jsonl",
        "signatures": [],
    },
    "launcher": {
        "binds": [],
        "mount_home": True,
        "mount_cwd": True,
        "devices": [],
        "env_passthrough": ["TERM", "LANG", "LC_ALL", "TZ"],
        "hooks_dir": "/etc/hpcc/hooks.d",
        "warm_mb": 32,
        "mount_helper": "/opt/hpcc/libexec/hpcc-mount",
        "writable": False,
        "remap_root": False,
        "containers_dir": "/run/hpcc-containers",
        "containers_scope": "job",
    },
    "mpi": {"libraries": [], "extra_files": [], "devices": [], "abi_check": "minor"},
    "gpu": {"library_paths": [], "allowed_devices": []},
}


# Keys renamed since they were introduced: a file may still use the old name (the new one wins
# when both are set). launcher.prefetch_mb became warm_mb, the command's page cache warming,
# distinct from `gateway prefetch` of the images of pending jobs.
RENAMED = {("launcher", "prefetch_mb"): "warm_mb"}


def _rename_old_keys(data):
    for (section, old), new in RENAMED.items():
        table = data.get(section)
        if isinstance(table, dict) and old in table:
            value = table.pop(old)
            table.setdefault(new, value)
    return data


def _deepcopy(value):
    """Copy of nested dicts/lists (copy.deepcopy costs ~5 ms of imports on the launch path)."""
    if isinstance(value, dict):
        return {k: _deepcopy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deepcopy(v) for v in value]
    return value


def _schema_path():
    from pathlib import Path  # not on the launch path

    here = Path(__file__).resolve().parent
    for candidate in (here / "data" / "hpcc.schema.json", here.parent / "etc" / "hpcc.schema.json"):
        if candidate.exists():
            return candidate
    raise ConfigError("hpcc's config schema is missing from the installation; reinstall hpcc")


def _key_path(error):
    """'gateway.level' for a jsonschema error, naming an unknown key where there is one."""
    parts = [str(p) for p in error.absolute_path]
    if error.validator == "additionalProperties":
        # The message names the unexpected key(s); point at the first one.
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        if extra:
            parts.append(extra[0])
            return ".".join(parts), "unknown key"
    return ".".join(parts) or "(top level)", error.message


def validate(data, source="config"):
    import json

    import jsonschema  # slow import: only when validating

    schema = json.loads(_schema_path().read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        key, why = _key_path(errors[0])
        raise ConfigError(f"{source}: bad value for '{key}': {why}",
                          hint="see etc/hpcc.toml in the hpcc sources for every key")


def quick_check(cfg):
    """Problems a launch should mention about a merged config, found without jsonschema
    (the launch path cannot afford its import): keys hpcc does not know, and values whose
    type differs from the default's ("no" for a boolean is true to Python). One string per
    problem; `hpcc config check` gives the full validation."""
    out = []
    for section, value in cfg.items():
        known = DEFAULTS.get(section)
        if known is None:
            out.append(f"unknown section [{section}] (ignored)")
            continue
        if section == "registries" or not isinstance(known, dict):
            continue
        if not isinstance(value, dict):
            out.append(f"[{section}] is not a table")
            continue
        for key, v in value.items():
            if key not in known:
                out.append(f"unknown key '{section}.{key}' (ignored)")
                continue
            want = known[key]
            if isinstance(want, bool):
                ok, kind = isinstance(v, bool), "true or false"
            elif isinstance(want, int):
                ok, kind = isinstance(v, int) and not isinstance(v, bool), "an integer"
            elif isinstance(want, str):
                ok, kind = isinstance(v, str), "a string"
            elif isinstance(want, list):
                ok, kind = isinstance(v, list), "a list"
            else:
                continue
            if not ok:
                got = f'"{v}"' if isinstance(v, str) else repr(v)
                out.append(f"'{section}.{key}' must be {kind}, not {got}")
    return out


def _merge(base, override):
    out = _deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "registries":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def config_path(explicit=None):
    if explicit:
        return explicit, True
    env = os.environ.get("HPCC_CONFIG")
    if env:
        return env, True
    return DEFAULT_PATH, False


def _memo_path(raw):
    """Marker file saying that this exact config text passed this exact schema (content
    addressed: any change to either validates again). In the caller's cache directory; a
    marker forged there only skips a check that the launcher never makes anyway."""
    import hashlib

    h = hashlib.sha256(_schema_path().read_bytes())
    h.update(b"\0")
    h.update(raw)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hpcc", "valid-config", h.hexdigest())


def load_config(path=None, *, validate_schema=True, memo=True):
    """Return the merged configuration (defaults + file) as nested dicts. With memo, a text
    that already passed the schema is not validated again (jsonschema's import and the
    validation cost ~70 ms of every gateway command)."""
    path, required = config_path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist",
                              hint="fix HPCC_CONFIG or create the file") from None
        return _deepcopy(DEFAULTS)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    import tomllib  # ~5 ms with its re/typing imports: only when a file is read

    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    if validate_schema:
        marker = _memo_path(raw) if memo else None
        if not (marker and os.path.exists(marker)):
            validate(data, source=str(path))
            if marker:
                try:
                    os.makedirs(os.path.dirname(marker), 0o700, exist_ok=True)
                    os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
                except OSError:
                    pass
    return _merge(DEFAULTS, _rename_old_keys(data))


def expand_path(value):
    """Expand ~ and $VARS, with XDG_DATA_HOME defaulting to ~/.local/share."""
    env = dict(os.environ)
    env.setdefault("XDG_DATA_HOME", os.path.join(os.path.expanduser("~"), ".local", "share"))
    env.setdefault("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    out = os.path.expanduser(value)
    for k in sorted(env, key=len, reverse=True):
        out = out.replace("${" + k + "}", env[k]).replace("$" + k, env[k])
    return out
