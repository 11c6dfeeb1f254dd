"""The pod's environment on the developer's machine: which of its variables may reach a local
command or an env file, and which stay the developer's own.

A pod (or a fake agent) chooses the environment tele hands to `-- COMMAND`. Variables that
steer the loader, an interpreter or a shell (`LD_PRELOAD`, `PERL5OPT`, `PYTHONWARNINGS`,
`BROWSER`, `PATH`, ...) would run code of the pod's choosing as the developer, so they are kept
out unless the user passes --unsafe-pod-env. The env files (-e, --env-json) get the same rule:
in the sh file such a variable is written commented out (a `source` or `docker --env-file`
skips it, a reader still sees it); the JSON file leaves it out.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from typing import Final

UNSAFE_FLAG: Final = "--unsafe-pod-env"

PROTECTED_NAMES: Final = frozenset(
    {
        # shells
        "PATH", "ENV", "BASH_ENV", "IFS", "PS4", "SHELLOPTS", "BASHOPTS", "PROMPT_COMMAND",
        "CDPATH", "GLOBIGNORE", "ZDOTDIR", "HOME", "SHELL", "FPATH", "HISTFILE", "INPUTRC",
        # programs that other programs start
        "BROWSER", "EDITOR", "VISUAL", "PAGER", "MANPAGER", "LESSOPEN", "LESSCLOSE",
        "SSH_ASKPASS", "SUDO_ASKPASS", "GIT_ASKPASS", "GIT_SSH", "GIT_SSH_COMMAND",
        "GIT_EXEC_PATH", "GIT_CONFIG", "GIT_CONFIG_GLOBAL", "GIT_CONFIG_SYSTEM",
        "GIT_TEMPLATE_DIR", "GIT_PROXY_COMMAND",
        # interpreters
        "NODE_OPTIONS", "NODE_PATH", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS",
        "CLASSPATH", "PERLLIB", "RUBYLIB", "RUBYOPT", "GEM_HOME", "GEM_PATH", "BUNDLE_GEMFILE",
        "LUA_INIT", "LUA_PATH", "LUA_CPATH", "TCLLIBPATH", "R_PROFILE", "R_PROFILE_USER",
        "PHPRC", "PHP_INI_SCAN_DIR", "DOTNET_STARTUP_HOOKS", "CORECLR_PROFILER",
        "CORECLR_PROFILER_PATH", "CORECLR_ENABLE_PROFILING", "ERL_AFLAGS", "ERL_FLAGS",
        "ERL_ZFLAGS", "GOFLAGS", "NPM_CONFIG_PREFIX", "NPM_CONFIG_USERCONFIG",
        # the C library and the loader
        "GCONV_PATH", "GLIBC_TUNABLES", "HOSTALIASES", "LOCPATH", "NLSPATH", "RESOLV_HOST_CONF",
        "MALLOC_CHECK_", "OPENSSL_CONF", "OPENSSL_ENGINES", "TMPDIR", "XDG_CONFIG_HOME",
        "XDG_CONFIG_DIRS", "XDG_DATA_HOME", "XDG_DATA_DIRS", "KUBECONFIG",
    }
)  # fmt: skip
"""Variables the pod's environment never sets on this machine without UNSAFE_FLAG."""

PROTECTED_PREFIXES: Final = (
    "LD_", "DYLD_", "PYTHON", "PERL5", "PERL_", "RUBY", "BASH_FUNC_", "NODE_", "MALLOC_",
    "JAVA_", "GIT_CONFIG_", "NPM_CONFIG_", "DOTNET_", "COMPlus_",
)  # fmt: skip

QUIET: Final = frozenset({"PATH", "HOME", "HOSTNAME"})
"""Kept out of the note `-- COMMAND` prints: every image sets them, and a developer expects
their own."""

_VALID_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def protected(name: str) -> bool:
    return name in PROTECTED_NAMES or name.startswith(PROTECTED_PREFIXES)


def usable(name: str, value: str) -> bool:
    """Whether a process environment can hold this variable at all."""
    return bool(name) and "=" not in name and "\0" not in name and "\0" not in value


def split(pod_env: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(what may pass, what is protected) of the pod's environment; variables no environment
    can hold are in neither."""
    allowed: dict[str, str] = {}
    held: dict[str, str] = {}
    for name, value in pod_env.items():
        if usable(name, value):
            (held if protected(name) else allowed)[name] = value
    return allowed, held


def command_environment(
    own: Mapping[str, str], pod_env: Mapping[str, str], *, unsafe: bool
) -> tuple[dict[str, str], list[str]]:
    """The environment for `-- COMMAND` (the developer's, then the pod's on top) and the names
    the pod set that were kept out (unsafe: those it did override, for a warning)."""
    allowed, held = split(pod_env)
    env = {**own, **allowed}
    if unsafe:
        env.update(held)
    return env, sorted(held)


def sh_file(pod_env: Mapping[str, str], *, unsafe: bool) -> str:
    """The pod's environment as `NAME=value` lines for sh (and docker --env-file); protected
    variables commented out unless `unsafe`; names no shell could take, always."""
    lines = []
    for name, value in sorted(pod_env.items()):
        if not _VALID_NAME.fullmatch(name) or "\0" in value:
            # (never the name itself: a newline in it would start a line of the pod's)
            lines.append("# (tele: left out a variable whose name a shell cannot take)")
        elif protected(name) and not unsafe:
            shown = json.dumps(value)  # one line, whatever the value holds
            lines.append(f"# {name}={shown}  (tele: the pod's, kept out; {UNSAFE_FLAG} writes it)")
        else:
            lines.append(f"{name}={shlex.quote(value)}")
    return "".join(f"{line}\n" for line in lines)


def json_map(pod_env: Mapping[str, str], *, unsafe: bool) -> dict[str, str]:
    allowed, held = split(pod_env)
    return {**allowed, **held} if unsafe else allowed
