"""The pod's environment on the developer's machine: which of its variables may reach a local
command or an env file, and which stay the developer's own.

A pod (or a fake agent) chooses the environment tele hands to `-- COMMAND`. Variables that
steer the loader, an interpreter or a shell (`LD_PRELOAD`, `PERL5OPT`, `PYTHONWARNINGS`,
`BROWSER`, `PATH`, ...) would run code of the pod's choosing as the developer, so they are kept
out unless the user passes --unsafe-pod-env. The env files (-e, --env-json) get the same rule:
in the -e file such a variable is written commented out (a `source` or `docker --env-file`
skips it, a reader still sees it); the JSON file leaves it out. The -e file is written in the
syntax its reader takes (--env-syntax, Telepresence's names), each value read back verbatim.
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


SYNTAXES: Final = ("docker", "compose", "sh", "sh:export", "csh", "csh:export", "cmd", "ps", "json")
"""--env-syntax values (Telepresence's); docker is the default for --env-file."""

_SAFE_BARE = re.compile(r"[A-Za-z0-9_@%+=:,./-]*")
"""Characters no reader of the syntaxes below treats specially: such a value is written bare."""

_PS_QUOTES = "'\u2018\u2019\u201a\u201b"
"""PowerShell ends a single-quoted string at any of these (it reads typographic quotes as ')."""


def _encodable(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:  # a lone surrogate (JSON can carry one)
        return False
    return True


def _docker(name: str, value: str) -> str | None:
    # docker --env-file: one line per variable, the value verbatim (no quotes, no escapes, no
    # interpolation); a line ends at a newline and loses a trailing CR.
    if "\n" in value or "\r" in value:
        return None
    return f"{name}={value}"


def _compose(name: str, value: str) -> str:
    # Compose's .env: bare values lose a ` #...` comment and trailing blanks, and they and
    # double-quoted ones are interpolated ($NAME, ${NAME}); single-quoted ones are literal but
    # take no backslash escape that compose and dotenv readers agree on.
    if _SAFE_BARE.fullmatch(value):
        return f"{name}={value}"
    if not any(c in value for c in "'\\") and all(c >= " " and c != "\x7f" for c in value):
        return f"{name}='{value}'"
    escaped = (
        value.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
        .replace("$", "$$")
    )
    return f'{name}="{escaped}"'


def _csh_quote(value: str) -> str:
    # csh: single quotes keep everything but `'`, `!` (history substitution happens even in a
    # sourced file) and a newline (it must follow a backslash).
    quoted = value.replace("'", "'\\''").replace("!", "'\\!'").replace("\n", "\\\n")
    return f"'{quoted}'"


def _cmd(name: str, value: str) -> str | None:
    # cmd.exe batch file: no quotes (a " in the value would toggle quoting), every special
    # character escaped with ^, % doubled (a batch file expands %NAME%); no line breaks.
    if "\n" in value or "\r" in value:
        return None
    escaped = "".join(f"^{c}" if c in '^&|<>()"' else c for c in value).replace("%", "%%")
    return f"set {name}={escaped}"


def _ps(name: str, value: str) -> str:
    quoted = "".join(c + c if c in _PS_QUOTES else c for c in value)
    return f"$Env:{name}='{quoted}'"


_WRITERS: Final = {
    "docker": _docker,
    "compose": _compose,
    "sh": lambda name, value: f"{name}={shlex.quote(value)}",
    "sh:export": lambda name, value: f"export {name}={shlex.quote(value)}",
    "csh": lambda name, value: f"set {name}={_csh_quote(value)}",
    "csh:export": lambda name, value: f"setenv {name} {_csh_quote(value)}",
    "cmd": _cmd,
    "ps": _ps,
}

_HOLDS_NO_LINE_BREAK: Final = frozenset({"docker", "cmd"})


def env_file(pod_env: Mapping[str, str], syntax: str, *, unsafe: bool) -> tuple[str, list[str]]:
    """The pod's environment as a file in `syntax` (one of SYNTAXES) and the names of the
    variables it could not hold (left out with a comment that names them). Protected variables
    are commented out unless `unsafe`; a name no shell could take is always left out."""
    if syntax == "json":
        return json.dumps(json_map(pod_env, unsafe=unsafe), indent=2, sort_keys=True) + "\n", []
    write = _WRITERS[syntax]
    remark = "REM" if syntax == "cmd" else "#"
    lines, left_out = [], []
    for name, value in sorted(pod_env.items()):
        if not _VALID_NAME.fullmatch(name) or not usable(name, value) or not _encodable(value):
            # (never the name itself: a newline in it would start a line of the pod's)
            lines.append(f"{remark} (tele: left out a variable that no env file can hold)")
        elif protected(name) and not unsafe:
            # (the value only where a comment cannot be mistaken for anything: cmd expands
            # %...% even in REM lines)
            shown = "" if syntax == "cmd" else "=" + json.dumps(value)
            kept_out = f"(tele: the pod's, kept out; {UNSAFE_FLAG} writes it)"
            lines.append(f"{remark} {name}{shown}  {kept_out}")
        elif (line := write(name, value)) is None:
            left_out.append(name)
            lines.append(
                f"{remark} {name}: left out (tele: {syntax} cannot hold a line break in a value; "
                "--env-syntax compose, sh or json can)"
            )
        else:
            lines.append(line)
    return "".join(f"{line}\n" for line in lines), left_out


def json_map(pod_env: Mapping[str, str], *, unsafe: bool) -> dict[str, str]:
    allowed, held = split(pod_env)
    mapping = {**allowed, **held} if unsafe else allowed
    return {name: value for name, value in mapping.items() if _encodable(name + value)}
