"""``python tests/hostile_worker.py WORKER-OPTIONS``: a real ``psgd worker`` whose every
pushed gradient is scaled by SCALE (a crude attack, or a fault such as a loss scaled by
mistake). The outlier guard's end-to-end test runs it next to an honest worker."""

import sys

from psgd.cli import main
from psgd.wire.client import ParameterClient

SCALE = 1e6
_push_begin = ParameterClient.push_begin


def scaled_push_begin(self, examples, params):
    grad = self.grad  # the buffer about to go out (a property: scale it in place)
    grad *= SCALE
    return _push_begin(self, examples, params)


if __name__ == "__main__":
    ParameterClient.push_begin = scaled_push_begin
    sys.argv = ["psgd", "worker", *sys.argv[1:]]
    main()
