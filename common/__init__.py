"""The translation core shared by pasta and passt.

Nothing in this package knows which mode it runs in: the mode-specific parts
(namespaces, the tap device, the VM socket) live in `pasta/` and `passt/` and
hand this core a `Config`, a tap backend and an event loop.
"""
