"""After the build: live patches on a host (``install``, ``load``, ``unload``, ``list``, ``info``, ``package``).

One module per concern: :mod:`.inspect` (what a ``.ko`` says), :mod:`.sysfs` (what the kernel says),
:mod:`.checks` (may it load), :mod:`.store` (``/var/lib/klpforge/<release>``), :mod:`.unit` (systemd unit and
the shell loader), :mod:`.deb` (Debian package), :mod:`.actions` (what the commands do),
:mod:`.manpage` (man pages and bash completion from the argument parser).
"""
