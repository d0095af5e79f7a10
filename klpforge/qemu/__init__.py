"""Boot a kernel under QEMU to prove a live patch: :mod:`.initramfs`, :mod:`.verify`, :mod:`.modinfo`."""

__all__: list[str] = []
