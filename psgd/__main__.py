import sys

try:
    from .cli import main
except KeyboardInterrupt:  # a Ctrl-C while the command is still being imported
    print("\npsgd: interrupted", file=sys.stderr, flush=True)
    import os
    os._exit(130)  # not sys.exit: see psgd.cli._exit_at_once

main()
