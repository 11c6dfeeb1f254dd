"""Benchmark the sandbox node: pod start latency (Deployment created -> each pod Ready, p50/p99
over 20 pods), `rollout restart` of 3 replicas until the rollout completes, and pod->Service
throughput against pod->pod direct (a Python TCP sink and sender in the worker image).

The cluster runs in this process (serve_cluster with its node) under a unique name; everything
it creates (namespaces, processes) is removed at the end. Needs root, iproute2, nftables.
Pod start is measured both one Deployment after another (latency) and as one Deployment of 20
replicas (a burst: on a small machine the 20 Python interpreters starting at once dominate).
Pods of a real image (busybox-static, pushed to a docker-registry the node uses as its Docker
Hub mirror, run by runc): scheduled -> Running for the first pod (a cold pull: resolve, fetch,
unpack) and then with the image present, one pod at a time.
Prints a table and one JSON line. Targets (issue 5): pod ready p50 <= 1 s; restart <= 5 s;
Service path >= 0.9x direct; (issue 14) image present: scheduled -> Running p50 <= 0.5 s.

Images (issue 14): tele's image build on a fresh cache (`--fresh-build`: mmdebstrap + pip,
needs the network; target <= 3 min), a rebuild with unchanged inputs (cache hit, <= 2 s, as the
CLI `tele image build` and as the call), the compressed size (<= 80 MB) and its biggest parts,
and `tele sandbox up` with the images cached (<= 5 s; registry start and push included).
`--images-only` measures just these.

    .venv/bin/python bench/sandbox.py [--pods 20] [--seconds 3] [--images-only] [--fresh-build]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import trio

from tele.certs import CertificateAuthority
from tele.sandbox.apiserver.auth import User
from tele.sandbox.apiserver.context import RequestContext
from tele.sandbox.apiserver.kinds import by_kind
from tele.sandbox.apiserver.store import Event
from tele.sandbox.cluster import serve_cluster

ApiObject = dict[str, Any]
CTX = RequestContext(User("bench", ("system:masters",)))


def _rt(group: str, kind: str) -> Any:
    resource_type = by_kind(group, kind)
    assert resource_type is not None
    return resource_type


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _deployment(name: str, replicas: int, container: ApiObject) -> ApiObject:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"terminationGracePeriodSeconds": 1, "containers": [container]},
            },
        },
    }


def _echo() -> ApiObject:
    return {
        "name": "echo",
        "image": "tele-sandbox/echo",
        "ports": [{"containerPort": 8080}],
        "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
    }


def _ready(pod: ApiObject) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


async def pod_start(info: Any, pods: int, name: str = "start") -> list[float]:
    """Seconds from creating a Deployment of `pods` replicas until each pod is Ready."""
    store = info.api.store
    ready_at: dict[str, float] = {}
    done = trio.Event()

    def on_pod(event: Event) -> None:
        labels = event.obj["metadata"].get("labels") or {}
        pod = event.obj["metadata"]["name"]
        if labels.get("app") == name and _ready(event.obj) and pod not in ready_at:
            ready_at[pod] = time.perf_counter()
            if len(ready_at) == pods:
                done.set()

    unsubscribe = store.subscribe("/pods", on_pod)
    try:
        t0 = time.perf_counter()
        await info.api.create(
            _rt("apps", "Deployment"), "default", _deployment(name, pods, _echo()), CTX
        )
        with trio.fail_after(120):
            await done.wait()
    finally:
        unsubscribe()
    return [t - t0 for t in ready_at.values()]


async def image_pod_start(info: Any, pods: int) -> tuple[float, float, list[float]]:
    """Seconds from a pod's binding to the node until it is Running: the first pod of
    `bench/busybox:1` pulls it (cold), as the first of the frontend image (Debian's python, ~18
    MB compressed) does; the next `pods` of busybox find it present."""
    store = info.api.store
    pod_rt = _rt("", "Pod")
    bound: dict[str, float] = {}
    running: dict[str, float] = {}
    changed = trio.Event()

    def on_pod(event: Event) -> None:
        nonlocal changed
        pod = event.obj["metadata"]["name"]
        if not pod.startswith("img-"):
            return
        now = time.perf_counter()
        if (event.obj.get("spec") or {}).get("nodeName"):
            bound.setdefault(pod, now)
        if (event.obj.get("status") or {}).get("phase") == "Running":
            running.setdefault(pod, now)
        changed.set()
        changed = trio.Event()

    async def one(name: str, image: str = "bench/busybox:1") -> float:
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "terminationGracePeriodSeconds": 0,
                "containers": [
                    {
                        "name": "c",
                        "image": image,
                        **({"command": ["sleep", "3600"]} if "busybox" in image else {}),
                    }
                ],
            },
        }
        await info.api.create(pod_rt, "default", body, CTX)
        with trio.fail_after(120):
            while name not in running:
                await changed.wait()
        await info.api.delete(pod_rt, "default", name, {}, CTX)
        return running[name] - bound[name]

    unsubscribe = store.subscribe("/pods", on_pod)
    try:
        cold = await one("img-cold")
        cold_python = await one("img-frontend", "tele-sandbox/frontend:latest")
        warm = [await one(f"img-{i}") for i in range(pods)]
    finally:
        unsubscribe()
    return cold, cold_python, warm


async def _push_images(registry: Any, directory: Path) -> None:
    """busybox-static as bench/busybox:1, and the sandbox's images (from the cache) as `tele
    sandbox up` publishes them (the echo pods of the pod-ready rows need tele-sandbox/echo)."""
    from tele.image.reference import parse_reference
    from tele.image.registry import RegistryClient
    from tele.image.testing import busybox_image
    from tele.sandbox.publish import publish, sandbox_images, seed

    image = busybox_image(directory)
    async with RegistryClient(
        registry.address, credentials=registry.credentials, ca_file=registry.ca_file
    ) as client:
        ref = parse_reference(f"{registry.address}/bench/busybox:1")
        await client.push_image(ref, image.manifest_bytes, image.blobs())
    images = sandbox_images()
    seed(registry.data_dir / "data", images)
    await publish(registry, images)


async def rollout_restart(info: Any) -> float:
    api, store = info.api, info.api.store
    deploy = _rt("apps", "Deployment")
    await api.create(deploy, "default", _deployment("restart", 3, _echo()), CTX)
    complete = trio.Event()

    def check(event: Event | None = None) -> None:
        d = store.get(deploy.key, "default", "restart")
        st = (d or {}).get("status") or {}
        if (
            d is not None
            and st.get("observedGeneration") == d["metadata"].get("generation")
            and st.get("updatedReplicas") == 3
            and st.get("availableReplicas") == 3
            and st.get("replicas") == 3
        ):
            complete.set()

    unsubscribe = store.subscribe(deploy.key, check)
    with trio.fail_after(60):
        check()
        await complete.wait()
    complete = trio.Event()
    patch = {
        "spec": {
            "template": {
                "metadata": {
                    "annotations": {
                        "kubectl.kubernetes.io/restartedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ")
                    }
                }
            }
        }
    }
    t0 = time.perf_counter()
    await api.patch(
        deploy,
        "default",
        "restart",
        "application/strategic-merge-patch+json",
        json.dumps(patch).encode(),
        ctx=CTX,
    )
    try:
        with trio.fail_after(60):
            await complete.wait()
    finally:
        unsubscribe()
    return time.perf_counter() - t0


async def _run_pod(
    info: Any, name: str, command: list[str], labels: ApiObject | None = None
) -> ApiObject:
    store = info.api.store
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels or {}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "c", "image": "tele-sandbox/worker", "command": command}],
        },
    }
    await info.api.create(_rt("", "Pod"), "default", pod, CTX)
    changed = trio.Event()
    unsubscribe = store.subscribe("/pods", lambda e: changed.set())
    try:
        with trio.fail_after(60):
            while True:
                live = store.get("/pods", "default", name) or {}
                status = live.get("status") or {}
                if status.get("podIP") and (
                    status.get("phase") in ("Running", "Succeeded", "Failed")
                ):
                    return live
                changed = trio.Event()
                await changed.wait()
    finally:
        unsubscribe()


async def _finished(info: Any, name: str) -> None:
    store = info.api.store
    done = trio.Event()

    def check(event: Event | None = None) -> None:
        pod = store.get("/pods", "default", name) or {}
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            done.set()

    unsubscribe = store.subscribe("/pods", check)
    try:
        check()
        with trio.fail_after(60):
            await done.wait()
    finally:
        unsubscribe()


_SINK = """
import socket
server = socket.create_server(("", 5201))
while True:
    conn, _ = server.accept()
    while conn.recv(1 << 20):
        pass
    conn.close()
"""
_SEND = """
import json, socket, sys, time
deadline = time.monotonic() + 20
while True:
    try:
        conn = socket.create_connection((sys.argv[1], 5201))
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
buf, sent, start = bytes(1 << 20), 0, time.monotonic()
while time.monotonic() - start < float(sys.argv[2]):
    conn.sendall(buf)
    sent += len(buf)
conn.shutdown(socket.SHUT_WR)
conn.recv(1)
took = time.monotonic() - start
print(json.dumps({"end": {"sum_received": {"bits_per_second": sent * 8 / took}}}))
"""
"""A TCP sink and sender in the worker image's Python (it has no iperf3: Debian's package
brings perl and PAM, +15 MB); the sender prints iperf3's JSON field for the figure."""


async def throughput(info: Any, state_dir: Path, seconds: int) -> tuple[float, float]:
    server = await _run_pod(info, "iperf-server", ["python3", "-c", _SINK], {"app": "iperf"})
    await info.api.create(
        _rt("", "Service"),
        "default",
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "iperf", "namespace": "default"},
            "spec": {"selector": {"app": "iperf"}, "ports": [{"port": 5201}]},
        },
        CTX,
    )
    # Wait until the Service has the server as an endpoint (the server pod is Ready).
    store = info.api.store
    changed = trio.Event()
    unsubscribe = store.subscribe("/endpoints", lambda e: changed.set())
    try:
        with trio.fail_after(30):
            while not any(
                s.get("addresses")
                for s in (store.get("/endpoints", "default", "iperf") or {}).get("subsets") or []
            ):
                changed = trio.Event()
                await changed.wait()
    finally:
        unsubscribe()
    # Alternate the two paths a few times and keep medians: on a small shared machine a single
    # run of each is mostly noise.
    runs: dict[str, list[float]] = {"direct": [], "service": []}
    targets = {"direct": server["status"]["podIP"], "service": "iperf.default.svc.cluster.local"}
    for i in range(3):
        for path, target in targets.items():
            name = f"iperf-{path}-{i}"
            await _run_pod(info, name, ["python3", "-c", _SEND, target, str(seconds)])
            await _finished(info, name)
            runs[path].append(_iperf_bits(state_dir, info, name))
    return statistics.median(runs["direct"]), statistics.median(runs["service"])


def _iperf_bits(state_dir: Path, info: Any, name: str) -> float:
    pod = info.api.store.get("/pods", "default", name)
    uid = pod["metadata"]["uid"]
    raw = (state_dir / "pods" / uid / "logs" / "c" / "0.log").read_text()
    text = "".join(line.split(" ", 1)[1] + "\n" for line in raw.splitlines())
    report = json.loads(text)
    return float(report["end"]["sum_received"]["bits_per_second"])


def _contributors(result: Any, top: int = 6) -> list[tuple[str, int]]:
    """The biggest parts of an image (uncompressed bytes), grouped by what they are."""
    import tarfile

    sizes: dict[str, int] = {}
    for layer in result.layers:
        with tarfile.open(layer.layer.path) as tar:
            for member in tar:
                parts = member.name.split("/")
                if member.name.startswith("usr/lib/python3/dist-packages/"):
                    key = f"{layer.name}: {parts[4].split('-')[0]}" if len(parts) > 4 else ""
                elif member.name.startswith("usr/lib/x86_64-linux-gnu/"):
                    key = f"{layer.name}: shared libraries"
                else:
                    key = f"{layer.name}: {'/'.join(parts[:3])}"
                sizes[key] = sizes.get(key, 0) + member.size
    return sorted(sizes.items(), key=lambda kv: -kv[1])[:top]


def images(fresh: bool) -> tuple[list[tuple[str, float, str]], dict[str, Any]]:
    """Build, cache-hit, size and `tele sandbox up` rows for tele's image."""
    import subprocess

    from tele.image.build import build_sandbox_images, build_tele_image, cache_root

    rows: list[tuple[str, float, str]] = []
    data: dict[str, Any] = {}
    if fresh:
        with tempfile.TemporaryDirectory(prefix="tele-bench-images-") as tmp:
            start = time.monotonic()
            build_tele_image(Path(tmp))
            build_sandbox_images(Path(tmp))
            data["build_fresh_s"] = time.monotonic() - start
        rows.append(("image build, fresh cache, all 6 images (s)", data["build_fresh_s"], "<= 180"))
    result = build_tele_image()
    build_sandbox_images()
    start = time.monotonic()
    hit = build_tele_image()
    data["cache_hit_call_s"] = time.monotonic() - start
    assert hit.cached
    tele = str(Path(sys.executable).parent / "tele")
    start = time.monotonic()
    subprocess.run([tele, "image", "build", "--output", "json"], check=True, capture_output=True)
    data["cache_hit_cli_s"] = time.monotonic() - start
    data["image_bytes"] = result.image.size
    data["layers"] = {r.name: r.layer.size for r in result.layers}
    rows += [
        ("image build, inputs unchanged, call (s)", data["cache_hit_call_s"], "<= 2.0"),
        ("image build, inputs unchanged, CLI (s)", data["cache_hit_cli_s"], "<= 2.0"),
        ("tele's image, compressed (MB)", result.image.size / 1e6, "<= 80"),
    ]
    rows += [(f"  layer {r.name}, compressed (MB)", r.layer.size / 1e6, "") for r in result.layers]
    contributors = _contributors(result)
    data["biggest_uncompressed"] = dict(contributors)
    rows += [(f"  {name} (MB unpacked)", size / 1e6, "") for name, size in contributors]
    if os.geteuid() == 0:
        with tempfile.TemporaryDirectory(prefix="tele-bench-up-") as tmp:
            env = {
                **os.environ,
                "XDG_STATE_HOME": f"{tmp}/state",
                "XDG_RUNTIME_DIR": f"{tmp}/run",
                "TELE_IMAGE_CACHE": str(cache_root()),
            }
            os.makedirs(f"{tmp}/run", mode=0o700)
            name = f"bi{uuid.uuid4().hex[:6]}"
            start = time.monotonic()
            try:
                subprocess.run(
                    [tele, "sandbox", "up", "--name", name],
                    env=env,
                    check=True,
                    capture_output=True,
                )
                data["sandbox_up_s"] = time.monotonic() - start
            finally:
                subprocess.run([tele, "sandbox", "down", "--name", name], env=env, check=False)
            rows.append(("tele sandbox up, images cached (s)", data["sandbox_up_s"], "<= 5.0"))
            data["demo_s"] = _demo(tele, env)
            rows.append(("tele demo, images cached (s)", data["demo_s"], "<= 15.0"))
    return rows, data


def _demo(tele: str, env: dict[str, str]) -> float:
    """`tele demo` end to end (its own sandbox up, manager, connect, engage, leave, down)."""
    import subprocess

    start = time.monotonic()
    done = subprocess.run(
        [tele, "demo", "--name", f"bd{uuid.uuid4().hex[:6]}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    took = time.monotonic() - start
    if done.returncode != 0:
        sys.exit(f"tele demo failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return took


def _print(rows: list[tuple[str, float, str]]) -> None:
    print(f"{'measure':44} {'value':>10}  target   ({os.cpu_count()} CPUs)")
    for label, value, target in rows:
        print(f"{label:44} {value:10.3f}  {target}")


async def main(pods: int, seconds: int) -> None:
    if os.geteuid() != 0:
        sys.exit("bench/sandbox.py needs root (network namespaces)")
    name = f"b{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory(prefix="tele-bench-sandbox-") as tmp:
        state_dir = Path(tmp)
        async with trio.open_nursery() as nursery:
            from tele.sandbox.oci_registry import serve_registry

            registry = await nursery.start(
                serve_registry, state_dir / "registry", CertificateAuthority.create("bench-ca")
            )
            await _push_images(registry, state_dir / "image")
            info = await nursery.start(
                lambda **kw: serve_cluster(
                    name,
                    nodes=True,
                    state_dir=state_dir,
                    node_options={"registry": registry},
                    **kw,
                )
            )
            cold, cold_python, warm = await image_pod_start(info, pods)
            sequential = [(await pod_start(info, 1, f"one-{i}"))[0] for i in range(pods)]
            starts = await pod_start(info, pods)
            restart = await rollout_restart(info)
            direct, service = await throughput(info, state_dir, seconds)
            nursery.cancel_scope.cancel()
    rows = [
        ("image pod, cold pull of busybox: scheduled -> Running (s)", cold, ""),
        ("image pod, cold pull of frontend: scheduled -> Running (s)", cold_python, ""),
        (
            f"image pod, present: scheduled -> Running p50, {pods} (s)",
            _percentile(warm, 50),
            "<= 0.5",
        ),
        (f"image pod, present: scheduled -> Running p99, {pods} (s)", _percentile(warm, 99), ""),
        (f"pod ready p50, {pods} one at a time (s)", _percentile(sequential, 50), "<= 1.0"),
        (f"pod ready p99, {pods} one at a time (s)", _percentile(sequential, 99), ""),
        (f"pod ready p50, {pods} at once (s)", _percentile(starts, 50), ""),
        (f"pod ready p99, {pods} at once (s)", _percentile(starts, 99), ""),
        (f"pod ready mean, {pods} at once (s)", statistics.mean(starts), ""),
        ("rollout restart, 3 replicas (s)", restart, "<= 5.0"),
        ("pod -> pod TCP, median of 3 (Gbit/s)", direct / 1e9, ""),
        ("pod -> Service TCP, median of 3 (Gbit/s)", service / 1e9, ""),
        ("Service / direct", service / direct, ">= 0.9"),
    ]
    print(f"{'measure':56} {'value':>10}  target   ({os.cpu_count()} CPUs)")
    for label, value, target in rows:
        print(f"{label:56} {value:10.3f}  {target}")
    print(
        json.dumps(
            {
                "bench": "sandbox",
                "pods": pods,
                "image_cold_running_s": cold,
                "image_cold_python_running_s": cold_python,
                "image_warm_running_p50_s": _percentile(warm, 50),
                "image_warm_running_p99_s": _percentile(warm, 99),
                "pod_ready_p50_s": _percentile(sequential, 50),
                "pod_ready_p99_s": _percentile(sequential, 99),
                "burst_ready_p50_s": _percentile(starts, 50),
                "burst_ready_p99_s": _percentile(starts, 99),
                "rollout_restart_s": restart,
                "direct_bps": direct,
                "service_bps": service,
                "service_ratio": service / direct,
            }
        )
    )


if __name__ == "__main__":
    from tele import _patches

    _patches.apply()  # as in the processes measured (the daemon, manager, agent)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=20)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--images-only", action="store_true", help="only the image rows")
    parser.add_argument("--fresh-build", action="store_true", help="also a first build (~1 min)")
    args = parser.parse_args()
    image_rows, image_data = images(args.fresh_build)
    if args.images_only:
        _print(image_rows)
        print(json.dumps({"bench": "sandbox-images", **image_data}))
    else:
        _print(image_rows)
        print(json.dumps({"bench": "sandbox-images", **image_data}))
        trio.run(main, args.pods, args.seconds)
