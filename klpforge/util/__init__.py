"""Generic helpers every part of klpforge uses; none of them knows about ELF, the diff or a kernel.

- :mod:`.errors` the exception kinds and their exit codes (0 ok, 1 error, 2 refused, 3 no change)
- :mod:`.proc` child processes that end with klpforge (process groups, signals, a watchdog for SIGKILL)
- :mod:`.fsutil` regular-file checks, atomic writes, private directories
- :mod:`.outputs` output paths checked before any work, written aside and renamed into place
- :mod:`.termout` terminal or plain-line progress and tables
- :mod:`.provenance` what went into a build (hashes, compiler, version)
- :mod:`.buildlog` the build log a failed build keeps
- :mod:`.unidiff` the one unified-diff (patch) parser

Import direction: :mod:`klpforge.util` imports nothing else of klpforge (:mod:`.buildlog` asks
:mod:`klpforge.kbuild.prepare` for the cache directory at call time); every other package may import it.
"""
