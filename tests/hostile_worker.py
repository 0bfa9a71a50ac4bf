"""``python tests/hostile_worker.py WORKER-OPTIONS``: a real ``psgd worker`` whose every
pushed gradient is scaled by SCALE (a crude attack, or a fault such as a loss scaled by
mistake). The outlier guard's end-to-end test runs it next to an honest worker."""

import sys

from psgd.cli import main
from psgd.wire.client import ParameterClient

SCALE = 1e6
_push = ParameterClient.push


def scaled_push(self, examples, params):
    self.grad *= SCALE
    return _push(self, examples, params)


if __name__ == "__main__":
    ParameterClient.push = scaled_push
    sys.argv = ["psgd", "worker", *sys.argv[1:]]
    main()
