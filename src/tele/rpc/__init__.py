"""Typed request/stream RPC over HTTP/2 (h2) on any trio stream; API definitions per peer pair."""
