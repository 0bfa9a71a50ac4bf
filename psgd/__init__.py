"""psgd: asynchronous SGD with a parameter server, in the style of Downpour (Dean et al., 2012).

The model math (network, functions, optim, schedules, data) knows nothing of sockets;
protocol, transport and the roles (server, worker, launch) build on it.
"""

__version__ = "0.1.0"
