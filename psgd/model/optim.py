"""Update rules that apply a gradient to a flat parameter vector, in place.

The same classes run in the single-process trainer and on the parameter server, where
``params`` may be one shard's range of the vector. A step allocates no arrays: each rule
keeps one scratch block (BLOCK elements). Its state is a dict of plain arrays, saved and
restored exactly.

L2 weight decay adds ``weight_decay * w`` to the gradient of every weight-matrix entry
(``decay_mask`` is 1 there and 0 on biases); as the server applies it to the weights it
holds, it is never stale. AdamW instead decays the weights themselves, apart from the
gradient's moments (Loshchilov & Hutter, "Decoupled weight decay regularization", 2019).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import ConfigError

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "adam", "adamw")
OUTER_OPTIMIZERS = ("sgd", "delayed_nesterov")  # a local-SGD server's (psgd.config.server_update)
BLOCK = 1 << 17  # elements a step updates at a time: each block's arrays stay in the cache


@dataclass(frozen=True)
class OptimizerSpec:
    """Which rule and its constants. ``momentum`` is mu for momentum and nesterov;
    ``beta1``, ``beta2`` and ``adam_eps`` are Adam's (Kingma & Ba 2015, PyTorch's defaults)."""

    name: str = "momentum"
    momentum: float = 0.9
    weight_decay: float = 0.0
    adagrad_eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    nesterov_every: int = 1  # delayed_nesterov: pushes between applications of the momentum

    def __post_init__(self):
        if self.name not in OPTIMIZERS + OUTER_OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight decay must be >= 0, got {self.weight_decay}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ConfigError(f"Adam's betas must be in [0, 1), got {self.beta1} and {self.beta2}")
        if self.nesterov_every < 1:
            raise ConfigError(f"the delayed Nesterov period must be >= 1 push, got {self.nesterov_every}")
        if not self.adam_eps > 0:
            raise ConfigError(f"Adam's epsilon must be > 0, got {self.adam_eps}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "OptimizerSpec":
        try:  # Adam's constants default: a description written before Adam lacks them
            return cls(str(d["name"]), float(d["momentum"]), float(d["weight_decay"]), float(d["adagrad_eps"]),
                       float(d.get("beta1", 0.9)), float(d.get("beta2", 0.999)), float(d.get("adam_eps", 1e-8)),
                       int(d.get("nesterov_every", 1)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed optimizer description: {exc!r}") from None


class Optimizer:
    """Base: the blocked loop, the scratch block and weight decay; each rule implements
    ``_block`` (one block's update, from the state arrays' views of that block) and, where
    it keeps scalars across steps, ``_begin``/``_end`` (once per step, around the blocks).

    A step runs over BLOCK elements at a time. The update rules are elementwise, so this
    is the whole-vector update bit for bit, but each block's few passes (scale the
    velocity, scale the gradient, add, add) find it in the cache: a 25M-element shard no
    longer streams its arrays through memory once per pass, and the scratch vector is one
    block, not a second copy of the range."""

    state_names: tuple[str, ...] = ()
    couples_decay = True  # weight decay enters as L2 on the gradient (AdamW: False, it decays apart)

    def __init__(self, spec: OptimizerSpec, size: int, dtype=np.float32, decay_mask: np.ndarray | None = None):
        self.spec = spec
        self.size = size
        self.dtype = np.dtype(dtype)
        # the momentum in force: the spec's, unless the server's momentum rule (psgd.model.momentum_rule) sets it
        self.momentum = spec.momentum
        self._scratch = np.empty(min(size, BLOCK), self.dtype)
        self._decay = None
        if spec.weight_decay and self.couples_decay:
            mask = np.ones(size, self.dtype) if decay_mask is None else np.asarray(decay_mask, self.dtype)
            if mask.shape != (size,):
                raise ConfigError(f"decay mask has shape {mask.shape}, expected ({size},)")
            self._decay = mask * spec.weight_decay
            self._decayed_grad = np.empty(min(size, BLOCK), self.dtype)
        for name in self.state_names:
            setattr(self, name, np.zeros(size, self.dtype))

    def step(self, params: np.ndarray, grad: np.ndarray, lr: float) -> None:
        """``params -= update(grad)`` in place; ``grad`` is only read (it may be a wire buffer)."""
        self._begin()
        states = [getattr(self, name) for name in self.state_names]
        for a in range(0, self.size, BLOCK):
            b = min(a + BLOCK, self.size)
            self._offset = a  # for a rule with arrays of its own beyond the state (AdamW's decay mask)
            p, g, s = params[a:b], grad[a:b], self._scratch[:b - a]
            if self._decay is not None:
                d = self._decayed_grad[:b - a]
                np.multiply(p, self._decay[a:b], out=d)
                d += g
                g = d
            self._block(p, g, lr, s, *(x[a:b] for x in states))
        self._end()

    def _begin(self) -> None:
        pass

    def _end(self) -> None:
        pass

    def _block(self, params, grad, lr, s, *state):
        """One block: ``params`` and the ``state`` arrays in place, ``s`` scratch of the block's size."""
        raise NotImplementedError

    def state(self, copy: bool = True) -> dict[str, np.ndarray]:
        """The state arrays, copied (``copy=False``: the live arrays, for a caller that
        writes them out before the next step)."""
        return {name: getattr(self, name).copy() if copy else getattr(self, name) for name in self.state_names}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for name in self.state_names:
            value = np.asarray(state[name])
            if value.shape != (self.size,):
                raise ConfigError(f"optimizer state {name!r} has shape {value.shape}, expected ({self.size},)")
            getattr(self, name)[...] = value


class SGD(Optimizer):
    def _block(self, params, grad, lr, s):
        np.multiply(grad, lr, out=s)
        params -= s


class Momentum(Optimizer):
    """Classical momentum: v <- mu v - lr g; w <- w + v."""

    state_names = ("velocity",)

    def _block(self, params, grad, lr, s, velocity):
        velocity *= self.momentum
        np.multiply(grad, lr, out=s)
        velocity -= s
        params += velocity


class Nesterov(Momentum):
    """Nesterov momentum in Sutskever's form: v <- mu v - lr g; w <- w + mu v - lr g."""

    def _block(self, params, grad, lr, s, velocity):
        velocity *= self.momentum
        np.multiply(grad, lr, out=s)
        velocity -= s
        params -= s
        np.multiply(velocity, self.momentum, out=s)
        params += s


class Adagrad(Optimizer):
    """Per-element rates, as Downpour ran on its servers: w <- w - lr g / (sqrt(sum g^2) + eps)."""

    state_names = ("sum_sq",)

    def _block(self, params, grad, lr, s, sum_sq):
        np.multiply(grad, grad, out=s)
        sum_sq += s
        np.sqrt(sum_sq, out=s)
        s += self.spec.adagrad_eps
        np.divide(grad, s, out=s)
        s *= lr
        params -= s


class Adam(Optimizer):
    """Adam, as PyTorch computes it: m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g^2;
    w <- w - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps), t the steps taken
    (counted by this optimizer: on a server shard, its own pushes, which are everyone's).
    Weight decay is L2 on the gradient, as in torch.optim.Adam.

    Its state is ``m``, ``v`` (float arrays of the vector's size) and ``step``, a one-element
    int64 array, so a checkpoint restores it exactly.
    """

    state_names = ("m", "v")

    def __init__(self, spec, size, dtype=np.float32, decay_mask=None):
        super().__init__(spec, size, dtype, decay_mask)
        self.steps = 0
        self._wd = None  # AdamW: per-element decoupled decay (weight_decay on weights, 0 on biases)
        if spec.weight_decay and not self.couples_decay:
            mask = np.ones(size, self.dtype) if decay_mask is None else np.asarray(decay_mask, self.dtype)
            if mask.shape != (size,):
                raise ConfigError(f"decay mask has shape {mask.shape}, expected ({size},)")
            self._wd = mask * spec.weight_decay

    def _begin(self):
        self.steps += 1
        self._v_scale = np.sqrt(1.0 - self.spec.beta2 ** self.steps)
        self._m_scale = 1.0 - self.spec.beta1 ** self.steps

    def _block(self, params, grad, lr, s, m, v):
        b1, b2 = self.spec.beta1, self.spec.beta2
        if self._wd is not None:  # AdamW: w <- w - lr wd w, before the moment step
            a = self._offset
            np.multiply(params, self._wd[a:a + params.size], out=s)
            s *= lr
            params -= s
        m *= b1
        np.multiply(grad, 1.0 - b1, out=s)
        m += s
        v *= b2
        np.multiply(grad, grad, out=s)
        s *= 1.0 - b2
        v += s
        np.sqrt(v, out=s)
        s /= self._v_scale
        s += self.spec.adam_eps
        np.divide(m, s, out=s)
        s *= lr / self._m_scale
        params -= s

    def state(self, copy: bool = True) -> dict[str, np.ndarray]:
        return {**super().state(copy), "step": np.array([self.steps], np.int64)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        super().load_state(state)
        step = np.asarray(state["step"])
        if step.shape != (1,) or step.dtype.kind not in "iu" or int(step[0]) < 0:
            raise ConfigError(f"Adam's step count is {step!r}, expected one integer >= 0")
        self.steps = int(step[0])


class AdamW(Adam):
    """Adam with decoupled weight decay: w <- w - lr wd w, then Adam's step on g alone."""

    couples_decay = False


class DelayedNesterov(Optimizer):
    """The outer optimizer of asynchronous local SGD: Nesterov momentum whose buffer moves
    only every N = ``nesterov_every`` pushes (after Liu et al. 2024, "Asynchronous Local-SGD
    Training for Language Modeling"), so that one fast worker's pushes do not each drag the
    momentum. With ``g`` each pushed outer gradient (start weights minus end weights):

        every push:       w <- w - (lr / N) g;  acc <- acc + g
        every N-th push:  m <- mu m + acc / N;  w <- w - lr mu m;  acc <- 0

    so N pushes move the weights as one synchronous DiLoCo round on their mean would. Each
    push at the full lr (N rounds' worth of steps per round of N workers) knocked 2 async
    workers of 784-64-10 from 93.9% to 83.1% within 20 rounds of the second one joining
    with fresh AdamW state; at lr / N the worst was 91.2% (tests/test_local_sgd.py).
    With N = 1 this is Nesterov momentum (w <- w - lr (g + mu m), m <- mu m + g, the form of
    ``nesterov`` above at a constant rate); with mu = 0, SGD at lr / N. State: ``m``, ``acc``
    and ``pending`` (pushes since the last momentum step, one int64)."""

    state_names = ("m", "acc")

    def __init__(self, spec, size, dtype=np.float32, decay_mask=None):
        super().__init__(spec, size, dtype, decay_mask)
        self.pending = 0

    def _begin(self):
        self.pending += 1
        self._momentum_step = self.pending >= self.spec.nesterov_every

    def _block(self, params, grad, lr, s, m, acc):
        mu, n = self.spec.momentum, self.spec.nesterov_every
        np.multiply(grad, lr / n, out=s)
        params -= s
        acc += grad
        if self._momentum_step:
            m *= mu
            np.multiply(acc, 1.0 / n, out=s)
            m += s
            np.multiply(m, lr * mu, out=s)
            params -= s
            acc[...] = 0

    def _end(self):
        if self._momentum_step:
            self.pending = 0

    def state(self, copy: bool = True) -> dict[str, np.ndarray]:
        return {**super().state(copy), "pending": np.array([self.pending], np.int64)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        super().load_state(state)
        self.pending = int(np.asarray(state["pending"]).reshape(-1)[0])


_RULES = {"delayed_nesterov": DelayedNesterov, "sgd": SGD, "momentum": Momentum, "nesterov": Nesterov, "adagrad": Adagrad, "adam": Adam, "adamw": AdamW}


def make_optimizer(spec: OptimizerSpec, size: int, dtype=np.float32, decay_mask=None) -> Optimizer:
    return _RULES[spec.name](spec, size, dtype, decay_mask)
