"""`python -m tele.sandbox run --name N`: the sandbox process that `tele sandbox up` spawns."""

from __future__ import annotations

from tele import _patches
from tele.cli.sandbox_cmd import sandbox

if __name__ == "__main__":
    _patches.apply()
    sandbox.main(prog_name="tele sandbox")
