"""The object store: every object of the sandbox in memory, one global resourceVersion counter.

Objects are plain JSON dicts, never mutated once stored (writers store a new dict), so readers
may hand them out without copying. Every change appends an event to a bounded history that
watches replay from; a watch that asks for a version older than the history gets 410 Gone.
The store does no I/O: listeners are plain callbacks invoked synchronously on each change.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ApiObject = dict[str, Any]
ObjKey = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped


@dataclass(frozen=True, slots=True)
class Event:
    """A change: ADDED, MODIFIED or DELETED, with the object before it (for selector moves)."""

    type: str
    resource: str
    obj: ApiObject
    old: ApiObject | None
    rv: int


class TooOld(Exception):
    """A watch asked for a resourceVersion the history no longer holds."""

    def __init__(self, requested: int, oldest: int) -> None:
        super().__init__(f"too old resource version: {requested} ({oldest})")
        self.requested = requested
        self.oldest = oldest


Listener = Callable[[Event], None]


class Store:
    """In-memory objects per resource with per-resource listeners and a bounded event history."""

    def __init__(self, history_size: int = 10_000) -> None:
        self._rv = 0
        self._objects: dict[str, dict[ObjKey, ApiObject]] = {}
        self._history: deque[Event] = deque(maxlen=history_size)
        # Highest resourceVersion whose event has fallen out of the history.
        self._compacted = 0
        self._listeners: dict[str, list[Listener]] = {}
        self._uids: dict[str, tuple[str, ObjKey]] = {}
        self._dependents: dict[str, set[tuple[str, ObjKey]]] = {}

    # --- reads ---------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        return self._rv

    def get(self, resource: str, namespace: str, name: str) -> ApiObject | None:
        return self._objects.get(resource, {}).get((namespace, name))

    def objects(self, resource: str, namespace: str | None = None) -> list[ApiObject]:
        """Objects sorted by (namespace, name); all namespaces when `namespace` is None."""
        objs = self._objects.get(resource, {})
        keys = sorted(objs) if namespace is None else sorted(k for k in objs if k[0] == namespace)
        return [objs[k] for k in keys]

    def by_uid(self, uid: str) -> tuple[str, ApiObject] | None:
        where = self._uids.get(uid)
        if where is None:
            return None
        obj = self.get(where[0], *where[1])
        return None if obj is None else (where[0], obj)

    def dependents(self, owner_uid: str) -> list[tuple[str, ApiObject]]:
        """Objects listing `owner_uid` in their ownerReferences."""
        out = []
        for resource, key in sorted(self._dependents.get(owner_uid, ())):
            obj = self.get(resource, *key)
            if obj is not None:
                out.append((resource, obj))
        return out

    # --- writes --------------------------------------------------------------------------

    def create(self, resource: str, obj: ApiObject) -> ApiObject:
        """Store a new object (the caller checked it does not exist); stamps resourceVersion."""
        key = _key(obj)
        stored = self._stamp(obj)
        self._objects.setdefault(resource, {})[key] = stored
        self._index(resource, key, None, stored)
        self._emit(Event("ADDED", resource, stored, None, self._rv))
        return stored

    def replace(self, resource: str, obj: ApiObject) -> ApiObject:
        """Store a new version of an existing object; stamps resourceVersion."""
        key = _key(obj)
        old = self._objects[resource][key]
        stored = self._stamp(obj)
        self._objects[resource][key] = stored
        self._index(resource, key, old, stored)
        self._emit(Event("MODIFIED", resource, stored, old, self._rv))
        return stored

    def remove(self, resource: str, namespace: str, name: str) -> ApiObject:
        """Drop an object; the DELETED event carries it with a fresh resourceVersion."""
        key = (namespace, name)
        old = self._objects[resource].pop(key)
        self._index(resource, key, old, None)
        self._rv += 1
        gone = {**old, "metadata": {**old["metadata"], "resourceVersion": str(self._rv)}}
        self._emit(Event("DELETED", resource, gone, old, self._rv))
        return gone

    def _stamp(self, obj: ApiObject) -> ApiObject:
        self._rv += 1
        return {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self._rv)}}

    def _index(
        self, resource: str, key: ObjKey, old: ApiObject | None, new: ApiObject | None
    ) -> None:
        where = (resource, key)
        if old is not None:
            self._uids.pop(old["metadata"].get("uid", ""), None)
            for ref in old["metadata"].get("ownerReferences") or ():
                deps = self._dependents.get(ref.get("uid", ""))
                if deps is not None:
                    deps.discard(where)
                    if not deps:
                        del self._dependents[ref.get("uid", "")]
        if new is not None:
            self._uids[new["metadata"].get("uid", "")] = where
            for ref in new["metadata"].get("ownerReferences") or ():
                self._dependents.setdefault(ref.get("uid", ""), set()).add(where)

    # --- watching ------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        if len(self._history) == self._history.maxlen:
            self._compacted = self._history[0].rv
        self._history.append(event)
        for listener in list(self._listeners.get(event.resource, ())):
            listener(event)

    def subscribe(self, resource: str, listener: Listener) -> Callable[[], None]:
        """Call `listener` for every later change of `resource`; returns the unsubscriber."""
        listeners = self._listeners.setdefault(resource, [])
        listeners.append(listener)

        def unsubscribe() -> None:
            try:
                listeners.remove(listener)
            except ValueError:
                pass

        return unsubscribe

    def events_since(self, resource: str, rv: int) -> list[Event]:
        """Events of `resource` after `rv`, or TooOld when the history was compacted past it."""
        if rv < self._compacted:
            raise TooOld(rv, self._compacted + 1)
        if rv >= self._rv:
            return []
        out = []
        for event in reversed(self._history):
            if event.rv <= rv:
                break
            if event.resource == resource:
                out.append(event)
        out.reverse()
        return out


def _key(obj: ApiObject) -> ObjKey:
    meta = obj["metadata"]
    return (meta.get("namespace") or "", meta["name"])
