import sys

from .util.bytecode import enable

enable()  # before the commands are imported: byte-code even where Python may not write it (util/bytecode.py)

from .util.proc import Terminated, install_signal_handlers  # noqa: E402 (after enable)

# Before the heavy imports: a SIGTERM during start-up also gets its one line and exit code.
install_signal_handlers()
try:
    from .cli import main
except Terminated as e:
    print(f"klpforge: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
except KeyboardInterrupt:
    print("klpforge: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
