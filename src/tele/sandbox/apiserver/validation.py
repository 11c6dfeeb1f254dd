"""Validation as the API server does it: names, labels, kind rules (422) and schema fields.

`check_fields` walks an object against its published schema: unknown fields are pruned (and
reported for `fieldValidation=Strict|Warn`), wrong JSON types are decode errors (400).
`validate` returns the 422 causes of one object; callers raise `errors.invalid` with them.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from . import schemas
from .errors import (
    Cause,
    duplicate,
    forbidden_field,
    invalid_value,
    required,
    unsupported,
)
from .selectors import from_label_selector_object, matches_labels

ApiObject = dict[str, Any]

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SUBDOMAIN_CHARS = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_SUBDOMAIN_BAD_PAIRS = re.compile(r"\.\.|\.-|-\.")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")

SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used "
    "for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
    "must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex "
    "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
DNS1035_MSG = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
    "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or "
    "'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"
)
LABEL_VALUE_MSG = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or "
    "'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?"
    "[A-Za-z0-9])?')"
)
QUALIFIED_NAME_MSG = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
    "with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for "
    "validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
)
CONFIG_KEY_MSG = (
    "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. "
    "'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')"
)

# Kinds whose names are DNS-1035 / DNS-1123 labels rather than subdomains.
_NAME_RULES: dict[str, str] = {
    "Namespace": "label",
    "Service": "dns1035",
    "Role": "path",
    "ClusterRole": "path",
    "RoleBinding": "path",
    "ClusterRoleBinding": "path",
}


def is_subdomain(name: str) -> bool:
    """DNS-1123 subdomain test without the backtracking of the textbook regex."""
    return bool(_SUBDOMAIN_CHARS.match(name)) and not _SUBDOMAIN_BAD_PAIRS.search(name)


def name_causes(kind: str, name: str, field: str = "metadata.name") -> list[Cause]:
    rule = _NAME_RULES.get(kind, "subdomain")
    if rule == "path":
        if name in (".", ".."):
            return [invalid_value(field, name, f"may not be '{name}'")]
        for bad in ("/", "%"):
            if bad in name:
                return [invalid_value(field, name, f"may not contain '{bad}'")]
    elif rule == "label":
        if len(name) > 63:
            return [invalid_value(field, name, "must be no more than 63 characters")]
        if not _DNS1123_LABEL.match(name):
            return [invalid_value(field, name, LABEL_MSG)]
    elif rule == "dns1035":
        if len(name) > 63:
            return [invalid_value(field, name, "must be no more than 63 characters")]
        if not _DNS1035_LABEL.match(name):
            return [invalid_value(field, name, DNS1035_MSG)]
    else:
        if len(name) > 253:
            return [invalid_value(field, name, "must be no more than 253 characters")]
        if not is_subdomain(name):
            return [invalid_value(field, name, SUBDOMAIN_MSG)]
    return []


def _qualified_key_causes(key: str, field: str) -> list[Cause]:
    prefix, slash, name = key.rpartition("/")
    causes: list[Cause] = []
    if slash and (not prefix or not is_subdomain(prefix)):
        causes.append(invalid_value(field, key, "prefix part " + SUBDOMAIN_MSG))
    if not name or len(name) > 63 or not _QUALIFIED_NAME.match(name):
        causes.append(invalid_value(field, key, QUALIFIED_NAME_MSG))
    return causes


def labels_causes(labels: Any, field: str) -> list[Cause]:
    causes: list[Cause] = []
    if not isinstance(labels, dict):
        return causes
    for key, value in labels.items():
        causes += _qualified_key_causes(str(key), field)
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            causes.append(invalid_value(field, value, LABEL_VALUE_MSG))
    return causes


def metadata_causes(obj: ApiObject) -> list[Cause]:
    meta = obj.get("metadata") or {}
    causes: list[Cause] = []
    name = meta.get("name")
    if not name:
        causes.append(required("metadata.name", "name or generateName is required"))
    else:
        causes += name_causes(str(obj.get("kind")), str(name))
    causes += labels_causes(meta.get("labels"), "metadata.labels")
    annotations = meta.get("annotations") or {}
    total = 0
    for key, value in annotations.items():
        causes += _qualified_key_causes(str(key), "metadata.annotations")
        total += len(key) + len(str(value))
    if total > 256 * 1024:
        causes.append(
            Cause(
                "FieldValueTooLong",
                "metadata.annotations",
                "Too long: must have at most 262144 bytes",
            )
        )
    return causes


# --- per kind -------------------------------------------------------------------------------


def _containers(containers: Any, field: str, needed: bool) -> list[Cause]:
    causes: list[Cause] = []
    if not containers:
        if needed:
            causes.append(required(field))
        return causes
    seen: set[str] = set()
    for i, c in enumerate(containers):
        where = f"{field}[{i}]"
        if not isinstance(c, dict):
            continue
        cname = c.get("name")
        if not cname:
            causes.append(required(f"{where}.name"))
        elif not _DNS1123_LABEL.match(cname):
            causes.append(invalid_value(f"{where}.name", cname, LABEL_MSG))
        elif cname in seen:
            causes.append(duplicate(f"{where}.name", cname))
        else:
            seen.add(cname)
        if not c.get("image"):
            causes.append(required(f"{where}.image"))
        for j, port in enumerate(c.get("ports") or []):
            number = (port or {}).get("containerPort")
            if not isinstance(number, int) or not 0 < number < 65536:
                causes.append(
                    invalid_value(
                        f"{where}.ports[{j}].containerPort",
                        number,
                        "must be between 1 and 65535, inclusive",
                    )
                )
    return causes


def pod_spec_causes(spec: Any, field: str) -> list[Cause]:
    if not isinstance(spec, dict):
        return [required(field)]
    causes = _containers(spec.get("containers"), f"{field}.containers", True)
    causes += _containers(spec.get("initContainers"), f"{field}.initContainers", False)
    policy = spec.get("restartPolicy")
    if policy not in ("Always", "OnFailure", "Never"):
        causes.append(
            unsupported(f"{field}.restartPolicy", policy, ["Always", "OnFailure", "Never"])
        )
    return causes


def _selector_template(obj: ApiObject, needs_selector: bool = True) -> list[Cause]:
    spec = obj.get("spec") or {}
    causes: list[Cause] = []
    selector = spec.get("selector")
    template = spec.get("template") or {}
    labels = (template.get("metadata") or {}).get("labels") or {}
    if needs_selector and not selector:
        causes.append(required("spec.selector"))
    elif selector is not None:
        parsed = from_label_selector_object(selector)
        if parsed is not None and not parsed:
            causes.append(
                invalid_value("spec.selector", selector, "empty selector is invalid for deployment")
            )
        elif parsed is not None and not matches_labels(parsed, labels):
            causes.append(
                invalid_value(
                    "spec.template.metadata.labels",
                    labels,
                    "`selector` does not match template `labels`",
                )
            )
    replicas = spec.get("replicas")
    if isinstance(replicas, int) and replicas < 0:
        causes.append(
            invalid_value("spec.replicas", replicas, "must be greater than or equal to 0")
        )
    causes += labels_causes(labels, "spec.template.metadata.labels")
    causes += pod_spec_causes(template.get("spec"), "spec.template.spec")
    return causes


def _service(obj: ApiObject) -> list[Cause]:
    spec = obj.get("spec") or {}
    causes: list[Cause] = []
    svc_type = spec.get("type")
    types = ["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"]
    if svc_type not in types:
        causes.append(unsupported("spec.type", svc_type, types))
    ports = spec.get("ports") or []
    headless = spec.get("clusterIP") == "None"
    if not ports and svc_type != "ExternalName" and not headless:
        causes.append(required("spec.ports"))
    names: set[str] = set()
    for i, port in enumerate(ports):
        if not isinstance(port, dict):
            continue
        where = f"spec.ports[{i}]"
        pname = port.get("name")
        if len(ports) > 1 and not pname:
            causes.append(required(f"{where}.name"))
        elif pname:
            if not _DNS1123_LABEL.match(pname):
                causes.append(invalid_value(f"{where}.name", pname, LABEL_MSG))
            elif pname in names:
                causes.append(duplicate(f"{where}.name", pname))
            names.add(pname)
        number = port.get("port")
        if not isinstance(number, int) or not 0 < number < 65536:
            causes.append(
                invalid_value(f"{where}.port", number, "must be between 1 and 65535, inclusive")
            )
        protocol = port.get("protocol")
        if protocol not in ("TCP", "UDP", "SCTP"):
            causes.append(unsupported(f"{where}.protocol", protocol, ["SCTP", "TCP", "UDP"]))
        target = port.get("targetPort")
        if isinstance(target, int) and not 0 < target < 65536:
            causes.append(
                invalid_value(
                    f"{where}.targetPort", target, "must be between 1 and 65535, inclusive"
                )
            )
        elif isinstance(target, str) and not _IANA_SVC_NAME.match(target):
            causes.append(
                invalid_value(
                    f"{where}.targetPort",
                    target,
                    "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)",
                )
            )
    ip = spec.get("clusterIP")
    if ip not in (None, "", "None"):
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            causes.append(
                invalid_value(
                    "spec.clusterIPs[0]",
                    ip,
                    "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
                )
            )
    return causes


def _data_keys(obj: ApiObject) -> list[Cause]:
    causes: list[Cause] = []
    for field in ("data", "binaryData", "stringData"):
        for key in obj.get(field) or {}:
            if not _CONFIG_KEY.match(str(key)):
                causes.append(invalid_value(f"{field}[{key}]", key, CONFIG_KEY_MSG))
    return causes


def _webhook_config(obj: ApiObject) -> list[Cause]:
    causes: list[Cause] = []
    names: set[str] = set()
    for i, hook in enumerate(obj.get("webhooks") or []):
        where = f"webhooks[{i}]"
        hname = (hook or {}).get("name", "")
        if not hname:
            causes.append(required(f"{where}.name"))
        elif hname.count(".") < 2 or not is_subdomain(hname):
            causes.append(
                invalid_value(
                    f"{where}.name",
                    hname,
                    "should be a domain with at least three segments separated by dots",
                )
            )
        elif hname in names:
            causes.append(duplicate(f"{where}.name", hname))
        names.add(hname)
        effects = hook.get("sideEffects")
        if effects not in ("None", "NoneOnDryRun"):
            causes.append(unsupported(f"{where}.sideEffects", effects, ["None", "NoneOnDryRun"]))
        versions = hook.get("admissionReviewVersions")
        if not versions:
            causes.append(
                required(f"{where}.admissionReviewVersions", "must specify one of v1, v1beta1")
            )
        client = hook.get("clientConfig") or {}
        if bool(client.get("url")) == bool(client.get("service")):
            causes.append(
                required(f"{where}.clientConfig", "exactly one of url or service is required")
            )
        policy = hook.get("failurePolicy")
        if policy not in ("Fail", "Ignore"):
            causes.append(unsupported(f"{where}.failurePolicy", policy, ["Fail", "Ignore"]))
        timeout = hook.get("timeoutSeconds")
        if isinstance(timeout, int) and not 1 <= timeout <= 30:
            causes.append(
                invalid_value(
                    f"{where}.timeoutSeconds",
                    timeout,
                    "the timeout value must be between 1 and 30 seconds",
                )
            )
    return causes


def _binding(obj: ApiObject) -> list[Cause]:
    ref = obj.get("roleRef") or {}
    causes: list[Cause] = []
    if ref.get("kind") not in ("Role", "ClusterRole"):
        causes.append(unsupported("roleRef.kind", ref.get("kind"), ["ClusterRole", "Role"]))
    if not ref.get("name"):
        causes.append(required("roleRef.name"))
    if obj.get("kind") == "ClusterRoleBinding" and ref.get("kind") == "Role":
        causes.append(unsupported("roleRef.kind", "Role", ["ClusterRole"]))
    for i, subject in enumerate(obj.get("subjects") or []):
        if subject.get("kind") not in ("User", "Group", "ServiceAccount"):
            causes.append(
                unsupported(
                    f"subjects[{i}].kind", subject.get("kind"), ["Group", "ServiceAccount", "User"]
                )
            )
        if not subject.get("name"):
            causes.append(required(f"subjects[{i}].name"))
    return causes


def _pdb(obj: ApiObject) -> list[Cause]:
    spec = obj.get("spec") or {}
    if "minAvailable" in spec and "maxUnavailable" in spec:
        return [invalid_value("spec", spec, "minAvailable and maxUnavailable cannot be both set")]
    return []


def validate(obj: ApiObject) -> list[Cause]:
    """Causes for a new or updated object (empty when valid)."""
    kind = obj.get("kind")
    causes = metadata_causes(obj)
    if kind == "Pod":
        causes += pod_spec_causes(obj.get("spec"), "spec")
    elif kind in ("Deployment", "ReplicaSet", "StatefulSet"):
        causes += _selector_template(obj)
    elif kind == "Service":
        causes += _service(obj)
    elif kind in ("ConfigMap", "Secret"):
        causes += _data_keys(obj)
    elif kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        causes += _webhook_config(obj)
    elif kind in ("RoleBinding", "ClusterRoleBinding"):
        causes += _binding(obj)
    elif kind == "PodDisruptionBudget":
        causes += _pdb(obj)
    return causes


_POD_MUTABLE = ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds")


def update_causes(new: ApiObject, old: ApiObject) -> list[Cause]:
    """Immutable fields of an update (spec of pods, selectors, roleRef, service IPs)."""
    kind = new.get("kind")
    causes: list[Cause] = []
    if kind == "Pod":

        def scrub(spec: ApiObject) -> ApiObject:
            spec = {k: v for k, v in spec.items() if k not in _POD_MUTABLE}
            for field in ("containers", "initContainers"):
                if isinstance(spec.get(field), list):
                    spec[field] = [
                        {k: v for k, v in c.items() if k != "image"} if isinstance(c, dict) else c
                        for c in spec[field]
                    ]
            return spec

        old_spec, new_spec = scrub(old.get("spec") or {}), scrub(new.get("spec") or {})
        if old_spec.get("nodeName") in (None, "") and new_spec.get("nodeName"):
            old_spec = {**old_spec, "nodeName": new_spec["nodeName"]}
        if old_spec != new_spec:
            causes.append(
                forbidden_field(
                    "spec",
                    "pod updates may not change fields other than "
                    "`spec.containers[*].image`,`spec.initContainers[*].image`,"
                    "`spec.activeDeadlineSeconds`,`spec.tolerations` "
                    "(only additions to existing "
                    "tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 "
                    "if it was previously negative)",
                )
            )
    elif kind in ("Deployment", "ReplicaSet", "StatefulSet"):
        if (new.get("spec") or {}).get("selector") != (old.get("spec") or {}).get("selector"):
            causes.append(
                invalid_value(
                    "spec.selector", (new.get("spec") or {}).get("selector"), "field is immutable"
                )
            )
    elif kind in ("ConfigMap", "Secret") and old.get("immutable"):
        for field in ("data", "binaryData"):
            if new.get(field) != old.get(field):
                causes.append(forbidden_field(field, "field is immutable when `immutable` is set"))
        if not new.get("immutable"):
            causes.append(
                forbidden_field("immutable", "field is immutable when `immutable` is set")
            )
    elif kind in ("RoleBinding", "ClusterRoleBinding"):
        if new.get("roleRef") != old.get("roleRef"):
            causes.append(invalid_value("roleRef", new.get("roleRef"), "cannot change roleRef"))
    elif kind == "Service":
        old_ip = (old.get("spec") or {}).get("clusterIP")
        new_ip = (new.get("spec") or {}).get("clusterIP")
        if old_ip and new_ip != old_ip and (old.get("spec") or {}).get("type") != "ExternalName":
            causes.append(
                invalid_value("spec.clusterIPs[0]", [new_ip or ""], "may not change once set")
            )
    return causes


# --- schema walk ----------------------------------------------------------------------------


class FieldReport:
    """Problems found by `check_fields`: unknown field paths and type errors."""

    def __init__(self) -> None:
        self.unknown: list[str] = []
        self.type_errors: list[str] = []


_JSON_TYPE = {
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    dict: "object",
    list: "array",
}


def _type_ok(value: Any, allowed: set[str]) -> bool:
    if not allowed or value is None:
        return True
    actual = _JSON_TYPE.get(type(value), "")
    if actual == "integer" and "number" in allowed:
        return True
    if actual == "number" and "integer" in allowed and float(value).is_integer():
        return True
    return actual in allowed


def check_fields(value: Any, schema: schemas.Schema | None, path: str, report: FieldReport) -> Any:
    """Return `value` with undeclared fields removed, noting them and type errors in `report`."""
    if schema is None:
        return value
    resolved = schemas.deref(schema)
    if resolved is None or resolved.get("x-kubernetes-preserve-unknown-fields"):
        return value
    allowed = schemas.types(schema)
    if not _type_ok(value, allowed):
        want = "/".join(sorted(allowed))
        report.type_errors.append(
            f"{path or '.'}: expected {want}, got {_JSON_TYPE.get(type(value), 'null')}"
        )
        return value
    if isinstance(value, dict):
        props = resolved.get("properties")
        extra = resolved.get("additionalProperties")
        out: dict[str, Any] = {}
        for key, sub in value.items():
            sub_path = f"{path}.{key}" if path else key
            if props is not None and key in props:
                out[key] = check_fields(sub, props[key], sub_path, report)
            elif isinstance(extra, dict):
                out[key] = check_fields(sub, extra, sub_path, report)
            elif props is None and extra is None:
                out[key] = sub
            else:
                report.unknown.append(sub_path)
        return out
    if isinstance(value, list):
        item = resolved.get("items")
        if isinstance(item, dict):
            return [check_fields(v, item, f"{path}[{i}]", report) for i, v in enumerate(value)]
    return value
