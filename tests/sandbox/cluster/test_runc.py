"""Containers run by runc from an image: the image's layers and config combined with the pod
spec by Kubernetes' rules, read-only config volumes, limits, exec, termination and the errors a
user sees for an image that cannot run; nothing left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tele.sandbox.kubelet import runtime
from tele.sandbox.kubelet.imagestore import ImageStore

from . import busybox
from .conftest import Kubectl, NodeSandbox

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def images(node_sandbox: NodeSandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Preload the test images into the node's store (as `kind load` does); yields the name
    of the sandbox."""
    if not runtime.runc_available():
        pytest.skip("needs root and runc")
    if not busybox.available():
        pytest.skip("needs Debian's busybox-static (/bin/busybox, statically linked)")
    store = ImageStore(node_sandbox.kubeconfig.parent / "state" / "images")
    tmp = tmp_path_factory.mktemp("layouts")
    variants: dict[str, dict[str, Any]] = {
        "busybox": {"cmd": ["sh", "-c", "echo default-cmd"]},
        "entry": {"entrypoint": ["echo", "entry"], "cmd": ["from-cmd"]},
        "appuser": {"cmd": ["id"], "user": "app", "workdir": "/home/app"},
        "baduser": {"cmd": ["id"], "user": "nobody-here"},
        "empty": {},
    }
    for name, options in variants.items():
        layout = busybox.write_layout(tmp / name, **options)
        store.import_layout(layout, f"docker.io/tele-test/{name}:1")
    yield node_sandbox.name
    # The module's sandbox is stopped by node_sandbox; what it must have removed is checked
    # by test_nothing_left_behind while it runs.


def _pod(name: str, image: str, **container: Any) -> str:
    spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": container.pop("grace", 2),
        "restartPolicy": container.pop("restartPolicy", "Never"),
        "containers": [{"name": "c", "image": f"tele-test/{image}:1", **container}],
    }
    if "volumes" in container:
        spec["volumes"] = container.pop("volumes")
        spec["containers"][0] = {"name": "c", "image": f"tele-test/{image}:1", **container}
    return yaml.safe_dump(
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}
    )


def _wait_phase(kubectl: Kubectl, name: str, phase: str) -> dict[str, Any]:
    kubectl.run("wait", f"--for=jsonpath={{.status.phase}}={phase}", f"pod/{name}", "--timeout=60s")
    pod: dict[str, Any] = json.loads(kubectl.run("get", "pod", name, "-o", "json").stdout)
    return pod


def _wait_reason(kubectl: Kubectl, name: str, reason: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        pod = json.loads(kubectl.run("get", "pod", name, "-o", "json").stdout)
        statuses = (pod.get("status") or {}).get("containerStatuses") or []
        state = statuses[0]["state"] if statuses else {}
        got = (state.get("waiting") or state.get("terminated") or {}).get("reason")
        if got == reason:
            return dict(pod)
        assert time.monotonic() < deadline, f"pod {name}: waited for {reason}, state {state}"
        time.sleep(0.1)


def _events(kubectl: Kubectl, name: str) -> list[tuple[str, str]]:
    items = json.loads(
        kubectl.run(
            "get", "events", "--field-selector", f"involvedObject.name={name}", "-o", "json"
        ).stdout
    )["items"]
    return [(e["reason"], e["message"]) for e in items]


def test_pod_runs_the_image_not_the_host(kubectl: Kubectl, images: str, tmp_path: Path) -> None:
    host_only = tmp_path / f"host-only-{uuid.uuid4().hex[:6]}"
    host_only.write_text("secret")
    script = (
        f"ls {host_only} >/dev/null 2>&1 && echo host=visible || echo host=absent; "
        "echo layer=$(cat /etc/layer); ls /gone/file >/dev/null 2>&1 && echo wh=no || echo wh=ok; "
        "echo env=$FROM_IMAGE/$OVERRIDE/$ADDED; echo host=$(hostname); echo id=$(id -u); "
        "echo pwd=$(pwd); echo resolv=$(head -n1 /etc/resolv.conf); "
        "echo sa=$(cat /var/run/secrets/kubernetes.io/serviceaccount/namespace); "
        "touch /rootfs-write && echo rootfs=rw; echo args=$0-$1"
    )
    kubectl.run(
        "apply",
        "-f",
        "-",
        input=_pod(
            "plain",
            "busybox",
            command=["sh", "-c", script],
            args=["first", "second"],
            env=[{"name": "OVERRIDE", "value": "pod"}, {"name": "ADDED", "value": "$(OVERRIDE)x"}],
        ),
    )
    pod = _wait_phase(kubectl, "plain", "Succeeded")
    out = dict(line.split("=", 1) for line in kubectl.run("logs", "plain").stdout.splitlines())
    ns = kubectl.namespace
    assert out == {
        "host": "plain",
        "layer": "top",
        "wh": "ok",
        "env": "yes/pod/podx",
        "id": "0",
        "pwd": "/",
        "resolv": f"search {ns}.svc.cluster.local svc.cluster.local cluster.local",
        "sa": ns,
        "rootfs": "rw",
        "args": "first-second",
    } | {"host": out.get("host", "")}
    assert "host=absent" in kubectl.run("logs", "plain").stdout
    status = pod["status"]["containerStatuses"][0]
    assert status["imageID"].startswith("docker.io/tele-test/busybox@sha256:")
    assert status["containerID"].startswith(f"runc://{images}.")
    reasons = [r for r, _ in _events(kubectl, "plain")]
    assert {"Pulled", "Created", "Started"} <= set(reasons), reasons


def test_image_entrypoint_cmd_user_and_workdir(kubectl: Kubectl, images: str) -> None:
    kubectl.run("apply", "-f", "-", input=_pod("entry", "entry"))
    kubectl.run("apply", "-f", "-", input=_pod("entry-args", "entry", args=["replaced"]))
    kubectl.run("apply", "-f", "-", input=_pod("default", "busybox"))
    kubectl.run("apply", "-f", "-", input=_pod("app", "appuser", command=["sh", "-c", "id; pwd"]))
    kubectl.run(
        "apply",
        "-f",
        "-",
        input=_pod(
            "runas",
            "appuser",
            command=["id"],
            securityContext={"runAsUser": 4242, "runAsGroup": 77},
        ),
    )
    for name in ("entry", "entry-args", "default", "app", "runas"):
        _wait_phase(kubectl, name, "Succeeded")
    assert kubectl.run("logs", "entry").stdout == "entry from-cmd\n"
    assert kubectl.run("logs", "entry-args").stdout == "entry replaced\n"
    assert kubectl.run("logs", "default").stdout == "default-cmd\n"
    app = kubectl.run("logs", "app").stdout.splitlines()
    assert app == ["uid=1000(app) gid=1000(app) groups=50(staff),1000(app)", "/home/app"]
    assert kubectl.run("logs", "runas").stdout.startswith("uid=4242 gid=77")


def test_config_volumes_are_read_only(kubectl: Kubectl, images: str) -> None:
    kubectl.run("create", "configmap", "cm", "--from-literal=key=value")
    script = (
        "cat /cm/key; echo; (echo x > /cm/key) 2>/dev/null && echo cm=rw || echo cm=ro; "
        "touch /scratch/x && echo empty=rw; touch /x 2>/dev/null && echo root=rw || echo root=ro"
    )
    kubectl.run(
        "apply",
        "-f",
        "-",
        input=_pod(
            "vols",
            "busybox",
            command=["sh", "-c", script],
            volumeMounts=[
                {"name": "cm", "mountPath": "/cm"},
                {"name": "scratch", "mountPath": "/scratch"},
            ],
            volumes=[
                {"name": "cm", "configMap": {"name": "cm"}},
                {"name": "scratch", "emptyDir": {}},
            ],
            securityContext={"readOnlyRootFilesystem": True},
        ),
    )
    _wait_phase(kubectl, "vols", "Succeeded")
    assert kubectl.run("logs", "vols").stdout.split() == ["value", "cm=ro", "empty=rw", "root=ro"]


def test_errors_a_user_sees(kubectl: Kubectl, images: str) -> None:
    kubectl.run("apply", "-f", "-", input=_pod("baduser", "baduser"))
    kubectl.run("apply", "-f", "-", input=_pod("empty", "empty"))
    kubectl.run(
        "apply",
        "-f",
        "-",
        input=_pod("nonroot", "busybox", securityContext={"runAsNonRoot": True}),
    )
    kubectl.run(
        "apply",
        "-f",
        "-",
        input=_pod("badname", "busybox").replace("tele-test/busybox:1", "Bad//Name"),
    )
    kubectl.run("apply", "-f", "-", input=_pod("never", "absent", imagePullPolicy="Never"))
    kubectl.run("apply", "-f", "-", input=_pod("noexec", "busybox", command=["/nope"]))
    pod = _wait_reason(kubectl, "baduser", "CreateContainerConfigError")
    assert pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"] == (
        "unable to find user nobody-here: no matching entries in passwd file"
    )
    pod = _wait_reason(kubectl, "empty", "CreateContainerError")
    assert (
        "no command specified"
        in pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
    )
    pod = _wait_reason(kubectl, "nonroot", "CreateContainerConfigError")
    assert "runAsNonRoot and image will run as root" in json.dumps(pod["status"])
    _wait_reason(kubectl, "badname", "InvalidImageName")
    _wait_reason(kubectl, "never", "ErrImageNeverPull")
    pod = _wait_reason(kubectl, "noexec", "ContainerCannotRun")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 128
    assert 'exec: "/nope"' in terminated["message"]
    assert (
        "Failed",
        "Error: unable to find user nobody-here: no matching entries in passwd file",
    ) in _events(kubectl, "baduser")


def test_oom_killed(kubectl: Kubectl, images: str) -> None:
    kubectl.run(
        "apply",
        "-f",
        "-",
        input=_pod(
            "oom",
            "busybox",
            command=["sh", "-c", "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived"],
            resources={"limits": {"memory": "32Mi", "cpu": "500m"}},
        ),
    )
    pod = _wait_phase(kubectl, "oom", "Failed")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["reason"], terminated["exitCode"]) == ("OOMKilled", 137)


def test_exec_probe_and_graceful_stop(kubectl: Kubectl, images: str) -> None:
    script = "trap 'echo got-term; exit 0' TERM; touch /tmp/ready; while true; do sleep 0.1; done"
    kubectl.run(
        "apply",
        "-f",
        "-",
        input=_pod(
            "svc",
            "busybox",
            command=["sh", "-c", script],
            readinessProbe={"exec": {"command": ["cat", "/tmp/ready"]}, "periodSeconds": 1},
            grace=10,
        ),
    )
    kubectl.run("wait", "--for=condition=Ready", "pod/svc", "--timeout=60s")
    out = kubectl.run(
        "exec", "svc", "--", "sh", "-c", "echo in-$(hostname); ls /proc | grep -c '^[0-9]'"
    )
    lines = out.stdout.split()
    assert lines[0] == "in-svc"
    assert int(lines[1]) < 10  # its own PID namespace: a handful of processes, not the host's
    failed = kubectl.run("exec", "svc", "--", "sh", "-c", "exit 3", check=False)
    assert failed.returncode == 3
    kubectl.run("delete", "pod", "svc", "--timeout=30s")
    # The SIGTERM reached the container: no need for the SIGKILL after the grace period.
    # (Its log is gone with the pod; the quick deletion is the evidence.)


def test_nothing_left_behind(kubectl: Kubectl, images: str, node_sandbox: NodeSandbox) -> None:
    kubectl.run(
        "apply", "-f", "-", input=_pod("short", "busybox", command=["sleep", "30"], grace=0)
    )
    kubectl.run("wait", "--for=condition=Ready", "pod/short", "--timeout=60s")
    prefix = f"{images}."
    assert any(c.startswith(prefix) for c in _runc_ids())
    kubectl.run("delete", "pod", "--all", "--timeout=60s")
    containers = node_sandbox.kubeconfig.parent / "state" / "containers"

    def leftovers() -> list[Any]:
        bundles = list(containers.iterdir()) if containers.exists() else []
        return [c for c in _runc_ids() if c.startswith(prefix)] + _mounts(prefix) + bundles

    deadline = time.monotonic() + 20
    while leftovers():
        assert time.monotonic() < deadline, leftovers()
        time.sleep(0.1)


def _runc_ids() -> list[str]:
    out = subprocess.run(
        ["runc", "--root", str(runtime.RUNC_ROOT), "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return [c["id"] for c in json.loads(out or "null") or []]


def _mounts(prefix: str) -> list[str]:
    return [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if f"/{prefix}" in line.split()[4]
    ]


_ = shutil


def test_what_a_crashed_kubelet_left_is_cleaned_up(tmp_path: Path) -> None:
    """A container still running, its rootfs mounted and its cgroups present, as a killed
    sandbox leaves them: cleanup_sync (run by the next start or `tele sandbox down`) removes
    them all, and nothing of another sandbox."""
    if not runtime.runc_available() or not busybox.available():
        pytest.skip("needs root, runc and busybox-static")
    store = ImageStore(tmp_path / "images")
    image = store.import_layout(busybox.write_layout(tmp_path / "layout"), "docker.io/x/y:1")
    layers = [store.layer_dir(d) for d in reversed(image.diff_ids)]
    name = f"tc{uuid.uuid4().hex[:6]}"
    bundles = tmp_path / "containers"
    netns_name = f"tele-{name}"
    subprocess.run(["ip", "netns", "add", netns_name], check=True)
    try:
        cid = f"{name}.1.c.0"
        container = runtime.Container(name, cid, bundles / cid)
        container.memory_limit = 64 << 20
        process = runtime.build_process(
            ["sleep", "600"], {}, "/", runtime.User(0, 0, ()), {"name": "c"}
        )
        container.prepare(
            layers,
            lambda rootfs, cgroups: runtime.build_config(
                rootfs=rootfs,
                process=process,
                container={"name": "c"},
                hostname="h",
                netns_path=f"/var/run/netns/{netns_name}",
                mounts=[],
                cgroups_path=cgroups,
                cpu_limit=None,
                cpu_request=None,
            ),
        )
        runc = subprocess.Popen(
            ["runc", "--root", str(runtime.RUNC_ROOT), "run", "--bundle", str(bundles / cid), cid],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while cid not in _runc_ids():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        runc.kill()  # the kubelet's process dies; the container stays
        runc.wait()
        assert cid in _runc_ids() and _mounts(f"{name}.")
        hierarchies = runtime._hierarchies()
        cgroups = [h / runtime.cgroup_group(name) for h in hierarchies]
        cgroups = [p for p in cgroups if p.is_dir()]
        assert cgroups
        runtime.cleanup_sync(name, bundles)
        assert cid not in _runc_ids()
        assert not _mounts(f"{name}.")
        assert not [p for p in cgroups if p.exists()]
        assert not bundles.exists()
    finally:
        runtime.cleanup_sync(name, bundles)
        subprocess.run(["ip", "netns", "delete", netns_name], check=False)
