"""The checks of the image stores and of the gateway service."""
import os

from ..errors import HpccError
from .check import Check


def _store_check(id, title, path, must_exist):
    if not os.path.exists(path):
        if must_exist:
            return Check(id, title, "warn", f"{path} does not exist (no site images yet)",
                         "pull one: gateway pull IMAGE (as the store's owner)", path=path)
        return Check(id, title, "ok", f"{path} does not exist yet; `hpcc pull` creates it",
                     path=path)
    if not os.path.isdir(path):
        return Check(id, title, "fail", f"{path} is not a directory",
                     f"fix store path in hpcc.toml, or remove {path}", path=path)
    if not os.access(path, os.R_OK | os.X_OK):
        return Check(id, title, "fail", f"{path} is not readable by you",
                     f"chmod a+rx {path} (images must be readable by their users)", path=path)
    refs = os.path.join(path, "refs")
    if os.path.isdir(refs) and not os.access(refs, os.R_OK | os.X_OK):
        return Check(id, title, "fail", f"{refs} is not readable by you",
                     f"chmod -R a+rX {refs}", path=path)
    return Check(id, title, "ok", f"{path} is readable", path=path)


def check_stores(config):
    from ..store import Store
    out = [_store_check("store.site", "site image store", Store.site(config).root, True)]
    try:
        user = Store.user(config).root
    except HpccError as e:
        out.append(Check("store.user", "your image store", "warn", str(e)))
    else:
        out.append(_store_check("store.user", "your image store", user, False))
    return out


def check_service(config):
    """The gateway service, asked for its status over the same connection `hpcc pull` uses
    (its UNIX socket on this host, else TCP + munge to service.address)."""
    svc = config.get("service") or {}
    title = "gateway service"
    where = {"socket": svc.get("socket"), "address": svc.get("address") or None}
    if not svc.get("enabled"):
        return Check("gateway.service", title, "off", "the gateway service is not enabled "
                     "(service.enabled = false): pulls convert in the caller's process",
                     **where)
    from ..gateway.service_client import call
    try:
        res = call(config, {"op": "status"}, timeout=10)
    except HpccError as e:
        return Check("gateway.service", title, "fail", str(e.message),
                     "start it (systemctl start hpcc-gateway, or `gateway serve` as the "
                     "store's owner), or set service.enabled = false", **where)
    except OSError as e:
        return Check("gateway.service", title, "fail",
                     f"the gateway service did not answer: {e.strerror or e}",
                     "check the service's log (journalctl -u hpcc-gateway)", **where)
    status = res.get("status") if isinstance(res.get("status"), dict) else {}
    return Check("gateway.service", title, "ok", "the gateway service answers"
                 + (f" (store {status['store']})" if status.get("store") else ""),
                 **where, answer=status)
