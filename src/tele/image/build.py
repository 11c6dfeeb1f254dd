"""tele's image and the sandbox's images, built without docker and cached by their inputs.

Three layers, bottom up, each cached under `~/.cache/tele/images` by the hash of its inputs:

- **base**: Debian bookworm's `python3.11` and `nftables` (agent-init's redirects), unpacked
  by `mmdebstrap --variant=extract` (no maintainer scripts, no dpkg, no shell) with the
  standard library compiled; documentation and locales left out. The agent serves volumes
  with its own `tele.agent.sftp`, not OpenSSH's sftp-server: nothing of OpenSSH is in it.
  Key: package list, suite, mirror, recipe. Shared by tele's image and the sandbox's images.
- **deps**: tele's runtime dependencies as cp311 manylinux wheels, `pip install --target`,
  compiled. Key: the resolved dependency versions. Laptop- and sandbox-only libraries (helm,
  the Kubernetes schemas and client, pyroute2, ...) stay out: the manager and agent never load
  them.
- **tele**: the `tele` package itself and the entry point. Key: the hash of every source file,
  so a code change rebuilds only this layer (about a second).

Layers are written by tele (`image.layers`) rather than umoci: umoci repacks an unpacked root
file system, which needs real ownership (root) and keeps the build's timestamps; tele's writer
sorts entries, fixes owner and time and compresses without a date, so the same inputs give the
same digest on any machine, without root. Python bytecode is compiled with unchecked-hash
invalidation: it does not depend on file times, which are all zero in the image.
"""

from __future__ import annotations

import compileall
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import py_compile
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .. import paths
from ..errors import UserError
from .assemble import BuiltImage, assemble
from .layers import Layer, LayerBuilder, describe_layer
from .oci import ContainerConfig

log = logging.getLogger(__name__)

PYC_KEEP_SECONDS = 14 * 24 * 3600
KEEP_VERSIONS = 5
"""Versions of a layer the cache keeps (a few branches' worth of tele layers)."""
RECIPE = "5"
"""Bumped whenever what a layer holds changes for the same inputs (part of every cache key)."""
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3.11", "nftables")
"""Python; nft (agent-init's port redirects)."""
PYTHON = "/usr/bin/python3.11"
SITE_PACKAGES = "usr/lib/python3/dist-packages"
"""On Debian's python3.11 default sys.path: no PYTHONPATH needed in the image."""
NONROOT = 65532
"""The user the image runs as unless a pod says otherwise (distroless's `nonroot`)."""
ENTRYPOINT = "usr/local/bin/tele-entrypoint"

IMAGE_EXCLUDED_DISTRIBUTIONS = frozenset(
    {
        "helm-python-sdk",  # `tele helm` on the laptop (~240 MB installed)
        "kubernetes-validate",  # the sandbox API server's schemas (~110 MB)
        "kubernetes",  # kubeconfig loading on the laptop; in-cluster code uses k8s.incluster
        "pyroute2",  # the laptop's TUN device and routes
        "hypercorn",  # the sandbox
        "dnslib",  # the sandbox's cluster DNS
        "bcrypt",  # the sandbox registry's htpasswd
        "docker",  # Docker mode on the laptop (tele/docker/)
    }
)
"""tele's requirements that the cluster-side programs (manager, agent, agent-init) never load."""

_BASE_SKIP = re.compile(
    r"^(?:dev/|proc/|sys/|run/|var/cache/|var/lib/apt/|var/lib/dpkg/|var/log/|"
    r"usr/share/(?:man|info|locale|lintian|linda|bug|doc-base|perl5)/|"
    r"usr/share/doc/(?!.*/copyright$)|"
    r"usr/bin/(?:ssh|scp|sftp|ssh-.*|dpkg.*|chage|chfn|chsh|gpasswd|passwd|expiry|newgrp|"
    r"update-alternatives)$|"
    r"usr/sbin/(?!ldconfig$|nft$).*|usr/lib/openssh/|"
    r"usr/lib/python3\.11/(?:test|idlelib|tkinter|turtledemo|ensurepip|lib2to3|pydoc_data)/|"
    r".*/__pycache__/.*\.cpython-311\.opt-[12]\.pyc$)"
)
"""Base files no program in the image needs: docs, locales, dpkg/apt state, OpenSSH."""


class BuildError(UserError):
    """The image could not be built (a tool missing or failing); the sentence says which."""


@dataclass(frozen=True)
class LayerResult:
    name: str
    layer: Layer
    cached: bool
    seconds: float


@dataclass(frozen=True)
class BuildResult:
    image: BuiltImage
    layers: tuple[LayerResult, ...]
    cached: bool
    """The whole image came from the cache (no layer was written)."""
    seconds: float
    tag: str

    def to_json(self) -> dict[str, object]:
        return {
            "image": self.tag,
            "digest": self.image.digest,
            "size": self.image.size,
            "cached": self.cached,
            "seconds": round(self.seconds, 3),
            "layers": [
                {
                    "name": r.name,
                    "digest": r.layer.digest,
                    "size": r.layer.size,
                    "cached": r.cached,
                    "seconds": round(r.seconds, 3),
                }
                for r in self.layers
            ],
        }


CACHE_ENV = "TELE_IMAGE_CACHE"
"""Overrides where images are cached (tests share the user's cache: it is content-addressed)."""


def cache_root() -> Path:
    override = os.environ.get(CACHE_ENV)
    if override and os.path.isabs(override):
        return Path(override)
    return paths.cache_dir() / "images"


def store_dir(root: Path | None = None) -> Path:
    return (root or cache_root()) / "blobs" / "sha256"


def _key(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in (RECIPE, *parts):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


@dataclass
class _Cache:
    root: Path
    store: Path = field(init=False)

    def __post_init__(self) -> None:
        self.store = store_dir(self.root)

    def _record(self, name: str, key: str) -> Path:
        return self.root / "layers" / f"{name}-{key}.json"

    def lookup(self, name: str, key: str) -> Layer | None:
        try:
            record = json.loads(self._record(name, key).read_text())
            path = self.store / record["digest"].removeprefix("sha256:")
            if path.stat().st_size != record["size"]:
                return None
            return Layer(record["digest"], record["diff_id"], record["size"], path)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def remember(self, name: str, key: str, layer: Layer) -> None:
        path = self._record(name, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        record = {"digest": layer.digest, "diff_id": layer.diff_id, "size": layer.size}
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)

    def layer(self, name: str, key: str, make: Callable[[], Layer]) -> LayerResult:
        start = time.monotonic()
        found = self.lookup(name, key)
        if found is not None:
            with contextlib.suppress(OSError):
                self._record(name, key).touch()  # recently used: kept by prune
            return LayerResult(name, found, True, time.monotonic() - start)
        log.info("building layer %s (%s)", name, key)
        layer = make()
        self.remember(name, key, layer)
        self.prune(name)
        return LayerResult(name, layer, False, time.monotonic() - start)

    def prune(self, name: str, keep: int = KEEP_VERSIONS) -> None:
        """Forget all but the `keep` most recently used versions of layer `name`, and remove
        the blobs no remaining record names (each code change makes a new tele layer)."""
        mine = [
            p
            for p in (self.root / "layers").glob(f"{name}-*.json")
            if "-" not in p.name.removeprefix(f"{name}-")  # not `echo-tls-…` for `echo`
        ]
        records = sorted(mine, key=lambda p: p.stat().st_mtime, reverse=True)
        stale = records[keep:]
        if not stale:
            return
        for path in stale:
            path.unlink(missing_ok=True)
        used = set()
        for record in (self.root / "layers").glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                used.add(json.loads(record.read_text())["digest"].removeprefix("sha256:"))
        for blob in self.store.iterdir():
            # Layers only (a gzip file); configs and manifests are small and rewritten per build.
            if blob.name in used or blob.name.startswith("."):
                continue
            with contextlib.suppress(OSError), blob.open("rb") as f:
                if f.read(2) == b"\x1f\x8b":
                    blob.unlink()


# ------------------------------------------------------------------------------------ base


def base_key(packages: tuple[str, ...] = BASE_PACKAGES) -> str:
    return _key("base", SUITE, MIRROR, *sorted(packages), _BASE_SKIP.pattern)


def _run(argv: list[str], what: str, *, env: dict[str, str] | None = None) -> None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    except FileNotFoundError:
        raise BuildError(
            f"Building the image needs {argv[0]}: apt-get install {argv[0]}."
        ) from None
    if result.returncode != 0:
        log.error("%s failed:\n%s\n%s", what, result.stdout[-4000:], result.stderr[-4000:])
        last = (result.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise BuildError(f"{what} failed ({last}); the log has the rest.")


def _need_mmdebstrap() -> None:
    if shutil.which("mmdebstrap") is None:
        raise BuildError(
            "Building the image needs mmdebstrap (apt-get install mmdebstrap) the first time."
        )


def _extract(rootfs_tar: Path, packages: tuple[str, ...], *hooks: str) -> None:
    """Debian's `packages` (SUITE from MIRROR, with their dependencies) unpacked, not
    installed, into the tarball `rootfs_tar`, with its library cache made; `hooks` are more
    mmdebstrap customize hooks ("$1": the tree). SOURCE_DATE_EPOCH=0: reproducible."""
    _run(
        [
            "mmdebstrap",
            "--quiet",
            "--variant=extract",
            f"--include={','.join(packages)}",
            '--customize-hook=ldconfig -r "$1"',
            *(f"--customize-hook={hook}" for hook in hooks),
            SUITE,
            str(rootfs_tar),
            MIRROR,
        ],
        "mmdebstrap",
        env={**os.environ, "SOURCE_DATE_EPOCH": "0"},
    )


def _build_base(store: Path, packages: tuple[str, ...]) -> Layer:
    _need_mmdebstrap()
    with tempfile.TemporaryDirectory(prefix="tele-image-base-") as tmp:
        rootfs_tar = Path(tmp) / "rootfs.tar"
        compile_stdlib = (
            'chroot "$1" ' + PYTHON + " -m compileall -q -j0 --invalidation-mode unchecked-hash "
            "/usr/lib/python3.11"
        )
        _extract(
            rootfs_tar,
            packages,
            'find "$1/usr/lib/python3.11" -name __pycache__ -prune -exec rm -rf {} +',
            compile_stdlib,
        )
        builder = LayerBuilder()
        _add_rootfs_tar(builder, rootfs_tar, Path(tmp) / "files")
        _add_os_files(builder)
        return builder.write(store)


def _add_rootfs_tar(builder: LayerBuilder, tar_path: Path, scratch: Path) -> None:
    """Add a root file system tarball's entries (files kept on disk in `scratch`)."""
    scratch.mkdir()
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
        by_name = {m.name.removeprefix("./"): m for m in members}
        for number, member in enumerate(members):
            name = member.name.removeprefix("./").rstrip("/")
            if not name or name == "." or _BASE_SKIP.match(name + ("/" if member.isdir() else "")):
                continue
            if member.isdir():
                builder.add_dir(name, member.mode & 0o7777, uid=member.uid, gid=member.gid)
            elif member.issym():
                builder.add_symlink(name, member.linkname)
            elif member.isfile() or member.islnk():
                source = member
                if member.islnk():
                    source = by_name.get(member.linkname.removeprefix("./"), member)
                f = tar.extractfile(source)
                if f is None:
                    continue
                path = scratch / str(number)
                with f, path.open("wb") as out:
                    shutil.copyfileobj(f, out, 1 << 20)
                builder.add_host_file(
                    name, path, member.mode & 0o7777, uid=member.uid, gid=member.gid
                )


def _add_os_files(builder: LayerBuilder) -> None:
    builder.add_file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/usr/sbin/nologin\n"
        b"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        + f"nonroot:x:{NONROOT}:{NONROOT}:nonroot:/home/nonroot:/usr/sbin/nologin\n".encode(),
    )
    builder.add_file(
        "etc/group",
        b"root:x:0:\nnogroup:x:65534:\n" + f"nonroot:x:{NONROOT}:\n".encode(),
    )
    builder.add_file("etc/nsswitch.conf", b"passwd: files\ngroup: files\nhosts: files dns\n")
    builder.add_file("etc/os-release", b'PRETTY_NAME="Debian GNU/Linux 12 (bookworm), tele"\n')
    builder.add_dir("root", 0o700)
    builder.add_dir("home/nonroot", 0o755, uid=NONROOT, gid=NONROOT)
    builder.add_dir("tmp", 0o1777)
    builder.add_dir("var/tmp", 0o1777)
    builder.add_symlink("usr/bin/python3", "python3.11")


# ------------------------------------------------------------------------------------ deps


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolved_dependencies(
    root: str = "tele", excluded: frozenset[str] = IMAGE_EXCLUDED_DISTRIBUTIONS
) -> dict[str, str]:
    """`{distribution: version}` of `root`'s runtime requirements, transitively, as installed
    here, leaving out `excluded` (and what only they need). Extras are not followed."""
    from packaging.requirements import Requirement

    found: dict[str, str] = {}
    pending = [root]
    while pending:
        name = pending.pop()
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise BuildError(
                f"{name} is required by tele but not installed here; run scripts/setup.sh."
            ) from None
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = _normalise(req.name)
            if dep in excluded or dep in found:
                continue
            try:
                found[dep] = importlib.metadata.version(dep)
            except importlib.metadata.PackageNotFoundError:
                raise BuildError(
                    f"{dep} (needed by {name}) is not installed here; run scripts/setup.sh."
                ) from None
            pending.append(dep)
    return dict(sorted(found.items()))


def deps_key(pins: dict[str, str]) -> str:
    return _key("deps", *(f"{k}=={v}" for k, v in pins.items()))


_PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(36, 4, -1)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
]


def _build_deps(store: Path, pins: dict[str, str]) -> Layer:
    with tempfile.TemporaryDirectory(prefix="tele-image-deps-") as tmp:
        target = Path(tmp) / "site"
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text("".join(f"{k}=={v}\n" for k, v in pins.items()))
        argv = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-compile",
            "--only-binary=:all:",
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            "--abi",
            "cp311",
            *[arg for p in _PLATFORMS for arg in ("--platform", p)],
            "--target",
            str(target),
            "-r",
            str(requirements),
        ]
        # A constraint file of the machine would fight the exact pins.
        env = {k: v for k, v in os.environ.items() if k != "PIP_CONSTRAINT"}
        env["PIP_CONSTRAINT"] = ""
        _run(argv, "pip install of tele's dependencies", env=env)
        shutil.rmtree(target / "bin", ignore_errors=True)
        _compile(target, "/" + SITE_PACKAGES)
        builder = LayerBuilder()
        builder.add_tree(target, SITE_PACKAGES, skip=_skip_build_junk)
        return builder.write(store)


def _skip_build_junk(path: Path) -> bool:
    return path.name in ("INSTALLER", "REQUESTED", "direct_url.json") and path.parent.name.endswith(
        ".dist-info"
    )


def _compile(directory: Path, image_path: str) -> None:
    """Bytecode for every module (unchecked-hash: valid whatever the file times)."""
    if sys.version_info[:2] != (3, 11):
        log.warning("not compiling bytecode: this Python is not the image's 3.11")
        return
    with contextlib.redirect_stdout(None):
        compileall.compile_dir(
            str(directory),
            ddir=image_path,
            quiet=2,
            workers=0,
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
        )


# ------------------------------------------------------------------------------------ tele


# Bytecode caches, and this machine's mypyc build of tele.net (`scripts/build_native.py`: made
# for its interpreter, not the image's; the image runs those modules as Python).
_NOT_IN_IMAGES = ("__pycache__", "_native", "_native.new")


def tele_package_dir() -> Path:
    import tele

    return Path(tele.__file__).resolve().parent


def _tele_files(package: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(package):
        dirs[:] = sorted(d for d in dirs if d not in _NOT_IN_IMAGES)
        for name in sorted(files):
            if not name.endswith((".pyc", ".pyo")) and not name.startswith(".#"):
                yield Path(root) / name


def tele_key(package: Path) -> str:
    digest = hashlib.sha256()
    for path in _tele_files(package):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(b"x" if os.access(path, os.X_OK) else b"-")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return _key("tele", digest.hexdigest(), _ENTRYPOINT_SCRIPT)


_ENTRYPOINT_SCRIPT = f"""#!{PYTHON}
# tele's image: `manager` (the default command), `agent` / `agent-init` (the webhook's args),
# anything else is the tele CLI.
import os
import signal
import sys

# As a container's PID 1 the program gets no default action for SIGTERM (the kernel drops it),
# so a pod's deletion would wait out its grace period: SIGTERM becomes SIGINT, which trio turns
# into KeyboardInterrupt at a safe point (cleanup runs, the programs exit 0).
signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))


def run(main, argv):
    try:
        return main(argv)
    except BaseException as exc:
        # The interrupt may come out of a nursery, wrapped in a group: still a clean stop.
        if isinstance(exc, KeyboardInterrupt) or (
            isinstance(exc, BaseExceptionGroup) and exc.split(KeyboardInterrupt)[1] is None
        ):
            return 0
        raise


args = sys.argv[1:] or ["manager"]
if args[0] == "manager":
    # The image leaves out the kubernetes package (kubeconfig loading): in-cluster only.
    if not os.environ.get("KUBERNETES_SERVICE_HOST"):
        sys.exit(
            "tele's traffic manager image runs in a pod (KUBERNETES_SERVICE_HOST is not set): "
            "install it with `tele helm install`, or run `python -m tele.manager --kubeconfig "
            "FILE` from a tele installation."
        )
    from tele.manager.__main__ import main

    sys.exit(run(main, args[1:]))
if args[0] in ("agent", "agent-init"):
    from tele.agent.__main__ import main

    sys.exit(run(main, args))
from tele.cli.main import main

sys.argv = ["tele", *args]
sys.exit(main())
"""


def _compile_cached(directory: Path, image_path: str, pyc_cache: Path) -> None:
    """Bytecode for every module, each taken from `pyc_cache` when its source and path were
    compiled before: a code change recompiles only the files it touched."""
    if sys.version_info[:2] != (3, 11):
        log.warning("not compiling bytecode: this Python is not the image's 3.11")
        return
    pyc_cache.mkdir(parents=True, exist_ok=True)
    magic = importlib.util.MAGIC_NUMBER
    misses: list[tuple[Path, str, Path, Path]] = []
    for source in sorted(directory.rglob("*.py")):
        rel = source.relative_to(directory).as_posix()
        dfile = f"{image_path}/{rel}"
        key = hashlib.sha256(magic + dfile.encode() + b"\0" + source.read_bytes()).hexdigest()
        cached = pyc_cache / key
        target = Path(importlib.util.cache_from_source(str(source)))
        if cached.exists():
            target.parent.mkdir(exist_ok=True)
            shutil.copyfile(cached, target)
            with contextlib.suppress(OSError):
                os.utime(cached)  # in use: kept by the sweep below
        else:
            misses.append((source, dfile, target, cached))
    if len(misses) > 16:
        _compile(directory, image_path)  # a first build: all of them, in parallel
    for source, dfile, target, cached in misses:
        if not target.exists():
            target.parent.mkdir(exist_ok=True)
            try:
                py_compile.compile(
                    str(source),
                    cfile=str(target),
                    dfile=dfile,
                    doraise=True,
                    invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
                )
            except py_compile.PyCompileError as exc:
                raise BuildError(f"{source.name} does not compile: {exc.msg.strip()}") from None
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        shutil.copyfile(target, tmp)
        os.replace(tmp, cached)
    if misses:
        # Bytecode of sources that no build used for two weeks goes.
        horizon = time.time() - PYC_KEEP_SECONDS
        for entry in pyc_cache.iterdir():
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < horizon:
                    entry.unlink()


def _build_tele(store: Path, package: Path) -> Layer:
    with tempfile.TemporaryDirectory(prefix="tele-image-tele-") as tmp:
        copy = Path(tmp) / "tele"
        shutil.copytree(package, copy, ignore=shutil.ignore_patterns(*_NOT_IN_IMAGES, "*.pyc"))
        _compile_cached(copy, f"/{SITE_PACKAGES}/tele", store.parent.parent / "pyc")
        builder = LayerBuilder()
        builder.add_tree(copy, f"{SITE_PACKAGES}/tele")
        version = _tele_version()
        dist_info = f"{SITE_PACKAGES}/tele-{version}.dist-info"
        builder.add_file(
            f"{dist_info}/METADATA",
            f"Metadata-Version: 2.1\nName: tele\nVersion: {version}\n".encode(),
        )
        builder.add_file(f"{dist_info}/top_level.txt", b"tele\n")
        builder.add_file(ENTRYPOINT, _ENTRYPOINT_SCRIPT.encode(), 0o755)
        builder.add_symlink("usr/local/bin/tele", "tele-entrypoint")
        return builder.write(store)


def _tele_version() -> str:
    import tele

    return str(getattr(tele, "__version__", "0.0.0"))


# ------------------------------------------------------------------------------------ images


def default_tag() -> str:
    return f"tele/traffic-manager:{_tele_version()}"


def tele_config() -> ContainerConfig:
    return ContainerConfig(
        user=f"{NONROOT}:{NONROOT}",
        env=[
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG=C.UTF-8",
            "PYTHONUNBUFFERED=1",
            "PYTHONDONTWRITEBYTECODE=1",
        ],
        entrypoint=[f"/{ENTRYPOINT}"],
        cmd=["manager"],
        working_dir="/",
        labels={
            "org.opencontainers.image.title": "tele",
            "org.opencontainers.image.version": _tele_version(),
            "org.opencontainers.image.description": "tele's traffic manager and traffic agent",
        },
    )


_BASE_HISTORY = f"base: Debian {SUITE} {' '.join(BASE_PACKAGES)} (mmdebstrap)"


def _image(
    store: Path,
    layers: tuple[LayerResult, ...],
    config: ContainerConfig,
    history: list[str],
    tag: str,
    start: float,
) -> BuildResult:
    """The image of `layers` (a history line each) assembled in `store`, as built since
    `start` (time.monotonic()): cached when every layer came from the cache."""
    image = assemble(store, [r.layer for r in layers], config, history=history)
    return BuildResult(image, layers, all(r.cached for r in layers), time.monotonic() - start, tag)


def build_tele_image(root: Path | None = None, *, package: Path | None = None) -> BuildResult:
    """Build (or find in the cache) tele's image."""
    start = time.monotonic()
    cache = _Cache(root or cache_root())
    package = package or tele_package_dir()
    pins = resolved_dependencies()
    results = (
        cache.layer("base", base_key(), lambda: _build_base(cache.store, BASE_PACKAGES)),
        cache.layer("deps", deps_key(pins), lambda: _build_deps(cache.store, pins)),
        cache.layer("tele", tele_key(package), lambda: _build_tele(cache.store, package)),
    )
    history = [
        _BASE_HISTORY,
        f"deps: {' '.join(f'{k}=={v}' for k, v in pins.items())}",
        f"tele {_tele_version()}",
    ]
    return _image(cache.store, results, tele_config(), history, default_tag(), start)


# ------------------------------------------------------------------------------------ tools

TOOLS_PACKAGES = ("dash", "coreutils", "grep", "sed", "hostname", "libc-bin", "curl", "socat")
"""A shell and the tools a user pokes a cluster with (getent, hostname, curl, socat): the
worker image's, for `kubectl exec` and the tests' client pods."""
_OS_FILES = frozenset(
    {"etc/passwd", "etc/group", "etc/nsswitch.conf", "etc/os-release", "usr/bin/python3"}
)
"""Files the base writes itself (`_add_os_files`): a package's copy never replaces them."""


def tools_key(base: str, packages: tuple[str, ...] = TOOLS_PACKAGES) -> str:
    return _key("tools", base, SUITE, MIRROR, *sorted(packages), _BASE_SKIP.pattern)


def _build_tools(store: Path, base: Layer, packages: tuple[str, ...]) -> Layer:
    """The files `packages` add to the base (with their dependencies): extracted together
    with the base's packages (so /etc/ld.so.cache knows every library), minus what the base
    layer already holds unchanged."""
    _need_mmdebstrap()
    lower = describe_layer(base)
    with tempfile.TemporaryDirectory(prefix="tele-image-tools-") as tmp:
        rootfs_tar = Path(tmp) / "rootfs.tar"
        _extract(rootfs_tar, (*BASE_PACKAGES, *packages))
        full = LayerBuilder()
        _add_rootfs_tar(full, rootfs_tar, Path(tmp) / "files")
        builder = LayerBuilder()
        for path, entry in full.entries():
            if path in _OS_FILES or path.startswith("usr/lib/python3.11/"):
                continue
            have = lower.get(path)
            if have is not None and have == full.describe(path):
                continue
            builder.copy_entry(path, entry)
        return builder.write(store)


DAEMON_PACKAGES = ("sshfs",)
"""What only the daemon's image (`tele connect --docker`) adds to tele's: sshfs and fusermount3
(its dependency fuse3), to mount the engaged pod's volumes in the daemon's container. The
cluster's image stays without them (the agent serves files with tele.agent.sftp)."""


def build_daemon_image(root: Path | None = None, *, package: Path | None = None) -> BuildResult:
    """tele's image with the daemon's layer on top (sshfs); the docker CLI side adds the
    daemon's Python packages and entry point (tele.docker.image)."""
    start = time.monotonic()
    cache = _Cache(root or cache_root())
    tele = build_tele_image(root, package=package)
    base = tele.layers[0]
    fuse = cache.layer(
        "fuse",
        tools_key(base.layer.digest, DAEMON_PACKAGES),
        lambda: _build_tools(cache.store, base.layer, DAEMON_PACKAGES),
    )
    history = [
        _BASE_HISTORY,
        "deps",
        f"tele {_tele_version()}",
        f"fuse: {' '.join(DAEMON_PACKAGES)} (mmdebstrap)",
    ]
    return _image(
        cache.store, (*tele.layers, fuse), tele_config(), history, "tele/daemon-base", start
    )


# ------------------------------------------------------------------------------------ sandbox


@dataclass(frozen=True)
class SandboxImage:
    repository: str
    module: str
    """The program: a module of tele.sandbox.images, copied as /app/main.py."""
    packages: tuple[str, ...] = ()
    """Pure-Python packages it imports, copied from this environment."""
    env: tuple[str, ...] = ()
    tools: bool = False
    """On the tools layer (a shell, coreutils, grep, sed, curl, socat) besides the base."""


_ECHO_PACKAGES = ("h11", "h2", "hpack", "hyperframe")
"""HTTP/1.1 and h2 (h2c with prior knowledge, h2 over TLS by ALPN)."""

SANDBOX_IMAGES = (
    SandboxImage("tele-sandbox/echo", "echo", _ECHO_PACKAGES),
    SandboxImage("tele-sandbox/echo-tls", "echo", _ECHO_PACKAGES, ("ECHO_TLS=1",)),
    SandboxImage(
        "tele-sandbox/l4-echo",
        "l4echo",
        ("trio", "outcome", "sniffio", "attr", "attrs", "sortedcontainers", "idna"),
    ),
    SandboxImage("tele-sandbox/worker", "worker", tools=True),
    SandboxImage("tele-sandbox/frontend", "frontend"),
)
SANDBOX_TAG = "latest"


def sandbox_tags() -> tuple[str, ...]:
    """The tags the sandbox's images are published and preloaded under: `latest` and tele's
    version (pin one and it stays put while `latest` moves)."""
    return (SANDBOX_TAG, _tele_version())


def _package_dir(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise BuildError(f"{name} is not installed here; run scripts/setup.sh.")
    return Path(next(iter(spec.submodule_search_locations)))


def _program_key(spec: SandboxImage) -> str:
    parts = [spec.repository, spec.module, *spec.env]
    source = tele_package_dir() / "sandbox" / "images" / f"{spec.module}.py"
    parts.append(hashlib.sha256(source.read_bytes()).hexdigest())
    for name in spec.packages:
        parts.append(f"{name}=={_dist_version(name)}")
    return _key("program", *parts)


_DISTRIBUTION_OF = {"attr": "attrs"}
"""Top-level packages whose distribution is named otherwise (the rest share their name)."""


def _dist_version(package: str) -> str:
    try:
        return importlib.metadata.version(_DISTRIBUTION_OF.get(package, package))
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _build_program(store: Path, spec: SandboxImage) -> Layer:
    builder = LayerBuilder()
    source = tele_package_dir() / "sandbox" / "images" / f"{spec.module}.py"
    builder.add_file("app/main.py", source.read_bytes(), 0o644)
    for name in spec.packages:
        builder.add_tree(
            _package_dir(name),
            f"app/{name}",
            skip=lambda p: p.name == "__pycache__" or p.suffix == ".pyc",
        )
    return builder.write(store)


def build_sandbox_images(
    root: Path | None = None,
) -> dict[str, BuildResult]:
    """The sandbox's images: the base layer shared with tele's image, one program layer each."""
    cache = _Cache(root or cache_root())
    base = cache.layer("base", base_key(), lambda: _build_base(cache.store, BASE_PACKAGES))
    tools: LayerResult | None = None
    built: dict[str, BuildResult] = {}
    for spec in SANDBOX_IMAGES:
        start = time.monotonic()
        lower = [base]
        if spec.tools:
            if tools is None:
                tools = cache.layer(
                    "tools",
                    tools_key(base.layer.digest),
                    lambda: _build_tools(cache.store, base.layer, TOOLS_PACKAGES),
                )
            lower.append(tools)
        program = cache.layer(
            f"program-{spec.repository.replace('/', '-')}",
            _program_key(spec),
            lambda spec=spec: _build_program(cache.store, spec),  # type: ignore[misc]
        )
        config = ContainerConfig(
            env=[
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "PYTHONUNBUFFERED=1",
                *spec.env,
            ],
            entrypoint=[PYTHON, "/app/main.py"],
            working_dir="/app",
        )
        history = [
            "base",
            *([f"tools: {' '.join(TOOLS_PACKAGES)} (mmdebstrap)"] if spec.tools else []),
            f"program {spec.module}",
        ]
        built[spec.repository] = _image(
            cache.store,
            (*lower, program),
            config,
            history,
            f"{spec.repository}:{SANDBOX_TAG}",
            start,
        )
    return built
