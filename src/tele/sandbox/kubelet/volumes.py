"""Pod volumes and container environments, materialized from the store.

Volumes are directories under the pod's state directory, bind-mounted by the launcher at each
mountPath: emptyDir, configMap, secret, downwardAPI and projected (service account token, CA,
namespace). Files are replaced atomically (write + rename) so that refreshed downward API files
show up in the running container. `container_env` resolves env and envFrom like the kubelet.
"""

from __future__ import annotations

import base64
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from tele.sandbox.apiserver.rest import Api
from tele.sandbox.apiserver.serviceaccount import InvalidToken

log = logging.getLogger(__name__)

ApiObject = dict[str, Any]
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_SA_VOLUME: ApiObject = {
    "name": "kube-api-access",
    "projected": {
        "sources": [
            {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
            {
                "configMap": {
                    "name": "kube-root-ca.crt",
                    "items": [{"key": "ca.crt", "path": "ca.crt"}],
                }
            },
            {
                "downwardAPI": {
                    "items": [
                        {"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}
                    ]
                }
            },
        ]
    },
}
"""What the ServiceAccount admission plugin adds to a pod (mounted at SA_DIR in every container
that mounts nothing there); the kubelet keeps it in the pod's `serviceaccount` directory."""
_IDLE_CHECK = 60.0
"""How often a pod without a token yet looks again (the kubelet's pod sync period)."""
_VAR_RE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


class ConfigError(Exception):
    """A referenced ConfigMap, Secret or key is missing (CreateContainerConfigError)."""


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    os.replace(tmp, path)


def _field(pod: ApiObject, path: str) -> str:
    meta = pod["metadata"]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = sorted((meta.get(path.split(".")[1]) or {}).items())
        return "\n".join(f'{k}="{v}"' for k, v in items)
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": (pod.get("spec") or {}).get("nodeName", ""),
        "spec.serviceAccountName": (pod.get("spec") or {}).get("serviceAccountName", "default"),
        "status.podIP": (pod.get("status") or {}).get("podIP", ""),
        "status.hostIP": (pod.get("status") or {}).get("hostIP", ""),
    }
    return str(simple.get(path, ""))


def _data_of(api: Api, kind: str, ns: str, name: str, optional: bool) -> dict[str, bytes] | None:
    obj = api.store.get("/configmaps" if kind == "ConfigMap" else "/secrets", ns, name)
    if obj is None:
        if optional:
            return None
        raise ConfigError(f'{kind.lower()} "{name}" not found')
    if kind == "ConfigMap":
        out = {k: str(v).encode() for k, v in (obj.get("data") or {}).items()}
        out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return out
    return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}


def _project(files: dict[str, bytes], items: list[ApiObject] | None) -> dict[str, bytes]:
    if not items:
        return files
    return {i["path"]: files[i["key"]] for i in items if i.get("key") in files}


def volume_files(api: Api, pod: ApiObject, volume: ApiObject) -> dict[str, bytes] | None:
    """Files of one volume (None for emptyDir and other plain directories)."""
    ns = pod["metadata"]["namespace"]
    if "configMap" in volume or "secret" in volume:
        kind = "ConfigMap" if "configMap" in volume else "Secret"
        src = volume.get("configMap") or volume.get("secret") or {}
        name = src.get("name") or src.get("secretName") or ""
        data = _data_of(api, kind, ns, name, bool(src.get("optional")))
        return _project(data or {}, src.get("items"))
    if "downwardAPI" in volume:
        return {
            i["path"]: _field(pod, (i.get("fieldRef") or {}).get("fieldPath", "")).encode()
            for i in volume["downwardAPI"].get("items") or []
        }
    if "projected" in volume:
        files: dict[str, bytes] = {}
        for source in volume["projected"].get("sources") or []:
            if "serviceAccountToken" in source:
                sat = source["serviceAccountToken"]
                # Pod-bound, audience-bound, re-minted at 80 % of its life by the API server's
                # token issuer (apiserver/serviceaccount.py).
                try:
                    token = api.authn.service_accounts.projected_token(pod, sat)
                except InvalidToken as exc:
                    raise ConfigError(str(exc)) from None
                files[sat.get("path", "token")] = token.encode()
            for kind, key in (("ConfigMap", "configMap"), ("Secret", "secret")):
                if key in source:
                    src = source[key]
                    data = _data_of(api, kind, ns, src.get("name", ""), bool(src.get("optional")))
                    files.update(_project(data or {}, src.get("items")))
            if "downwardAPI" in source:
                files.update(volume_files(api, pod, {"downwardAPI": source["downwardAPI"]}) or {})
        return files
    return None


async def refresh_tokens(
    api: Api, pod_of: Callable[[], ApiObject], rewrite: Callable[[], None]
) -> None:
    """Re-write the token volumes of a pod (`rewrite`) whenever one of its service-account
    tokens reaches 80 % of its life (the API server's issuer says when), as long as the pod
    runs. A pod whose tokens are not minted yet (the default token is written when its first
    container starts) looks again every minute."""
    while True:
        due = api.authn.service_accounts.next_rotation(pod_of())
        if due is None:
            await trio.sleep(_IDLE_CHECK)
            continue
        await trio.sleep(max(due - api.clock(), 1.0))
        try:
            rewrite()
        except (ConfigError, OSError) as exc:
            log.warning("rotating the tokens of %s: %s", pod_of()["metadata"]["name"], exc)


def write_service_account(api: Api, pod: ApiObject, target: Path) -> None:
    """Create or refresh the default service-account directory (token, ca.crt, namespace) of
    `pod` in `target`; each file replaced atomically, so a reader never sees half a token."""
    files = volume_files(api, pod, DEFAULT_SA_VOLUME) or {}
    for rel, data in files.items():
        _write(target / rel, data)


def write_volumes(api: Api, pod: ApiObject, root: Path, *, refresh_only: bool = False) -> None:
    """Create or refresh every volume of `pod` under root/<volume name>."""
    for volume in (pod.get("spec") or {}).get("volumes") or []:
        if refresh_only and "downwardAPI" not in volume and "projected" not in volume:
            continue
        target = root / volume["name"]
        target.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in volume:
            target.chmod(0o777)  # as the kubelet makes it: any container user writes there
        files = volume_files(api, pod, volume)
        # defaultMode, 0644 unless said (as Kubernetes: a non-root reader may read a Secret).
        source = next((volume[k] for k in ("secret", "configMap") if k in volume), None) or {}
        mode = source.get("defaultMode", 0o644) if isinstance(source, dict) else 0o644
        mode = mode if isinstance(mode, int) and 0 <= mode <= 0o777 else 0o644
        for rel, data in (files or {}).items():
            _write(target / rel, data, mode)


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion ($$ escapes; unknown references stay as written)."""
    return _VAR_RE.sub(
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text
    )


def container_env(
    api: Api, pod: ApiObject, container: ApiObject, base: dict[str, str]
) -> dict[str, str]:
    ns = pod["metadata"]["namespace"]
    env = dict(base)
    for src in container.get("envFrom") or []:
        prefix = src.get("prefix", "")
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key in src:
                ref = src[key]
                data = _data_of(api, kind, ns, ref.get("name", ""), bool(ref.get("optional")))
                for k, v in (data or {}).items():
                    env[prefix + k] = v.decode(errors="replace")
    for item in container.get("env") or []:
        name = item["name"]
        if "value" in item:
            env[name] = expand(str(item["value"]), env)
            continue
        ref = item.get("valueFrom") or {}
        if "fieldRef" in ref:
            env[name] = _field(pod, ref["fieldRef"].get("fieldPath", ""))
        for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
            if key in ref:
                r = ref[key]
                data = _data_of(api, kind, ns, r.get("name", ""), bool(r.get("optional")))
                if data is not None and r.get("key") in data:
                    env[name] = data[r["key"]].decode(errors="replace")
                elif not r.get("optional"):
                    raise ConfigError(
                        f"couldn't find key {r.get('key')} in {kind} {ns}/{r.get('name')}"
                    )
        if "value" not in item and name not in env:
            env[name] = ""
    return env
