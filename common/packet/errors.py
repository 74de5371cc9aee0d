"""The one exception every packet parser raises on short or invalid input."""

from __future__ import annotations


class MalformedPacket(ValueError):
    """The bytes do not hold a well-formed header of the expected kind."""
