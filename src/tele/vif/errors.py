"""Errors of the virtual network interface: what can go wrong creating the device and routes."""

from __future__ import annotations

from tele.errors import TeleError, UserError


class VifError(TeleError):
    """The TUN device, its addresses or routes could not be set up (or torn down)."""


class RouteConflict(UserError):
    """A subnet tele would route overlaps a route that another interface already has."""
