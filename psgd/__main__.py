import sys

try:
    from .cli import main
except KeyboardInterrupt:  # a Ctrl-C while the command is still being imported
    print("\npsgd: interrupted", file=sys.stderr)
    sys.exit(130)

main()
