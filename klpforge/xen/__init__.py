"""Xen hypervisor live patches: payloads for a running Xen (4.17), built with klpforge's diff engine.

``syms`` reads the hypervisor's ``xen-syms``; ``tree`` builds and recompiles a Xen tree; ``payload``
writes the notes and links the payload; ``pipeline`` goes from a patch to a payload; ``debian`` fetches
the Debian packages; ``verify`` proves a payload in the shipped hypervisor under QEMU.
"""

__all__: list[str] = []
