"""tele.gctune: survivors leave the collector's walks; an earlier freeze's garbage is freed."""

from __future__ import annotations

import gc
import weakref

from tele import gctune


class _Node:
    other: object = None


def test_settle_exempts_survivors_and_a_later_settle_frees_their_cycles() -> None:
    node = _Node()
    node.other = node  # a cycle: only the collector can free it
    ref = weakref.ref(node)
    try:
        gctune.settle()
        assert gc.get_freeze_count() > 0
        assert not any(o is node for o in gc.get_objects())  # no collection walks it
        del node
        gc.collect()
        assert ref() is not None  # frozen: a plain collection does not see the cycle
        gctune.settle()
        assert ref() is None
    finally:
        gc.unfreeze()
