"""Source of a user's model module, written into a temporary folder by the tests: a
softmax regression in plain numpy that knows nothing of psgd's networks."""

SOURCE = '''
import numpy as np
from psgd.model.layout import Layout


class SoftmaxRegression:
    """784 -> 10 softmax regression; the psgd model interface and nothing else."""

    description = "softmax regression 784-10"

    def __init__(self, n_in=784, k=10):
        self.layout = Layout.from_shapes([("W", (n_in, k)), ("b", (k,))])
        self.n_params = self.layout.size
        self.dtype = np.dtype(np.float32)

    def init_params(self, seed=0):
        rng = np.random.default_rng(seed)
        flat = np.zeros(self.n_params, self.dtype)
        self.layout.views(flat)["W"][...] = 0.01 * rng.standard_normal(self.layout.slots[0].shape)
        return flat

    def weight_mask(self):
        mask = np.zeros(self.n_params, self.dtype)
        mask[:self.layout.slots[0].size] = 1
        return mask

    def _logits(self, params, X):
        v = self.layout.views(params)
        return X @ v["W"] + v["b"]

    def loss_and_grad(self, params, X, T, grad=None, dropout=0.0, rng=None):
        if grad is None:
            grad = np.empty(self.n_params, self.dtype)
        a = self._logits(params, X)
        a -= a.max(axis=1, keepdims=True)
        p = np.exp(a)
        p /= p.sum(axis=1, keepdims=True)
        rows = np.arange(len(T))
        loss = float(-np.log(p[rows, T] + 1e-12).mean())
        p[rows, T] -= 1
        p /= len(T)
        g = self.layout.views(grad)
        np.matmul(X.T, p, out=g["W"])
        p.sum(axis=0, out=g["b"])
        return loss, grad

    def evaluate(self, params, X, T):
        a = self._logits(params, X)
        a -= a.max(axis=1, keepdims=True)
        logp = a - np.log(np.exp(a).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(T)), T].mean()), float((a.argmax(axis=1) == T).mean())


def make():
    return SoftmaxRegression()


def impostor():
    """The same layout, another model: a worker running it must be refused."""
    model = SoftmaxRegression()
    model.description = "something else with the same shapes"
    return model


def not_a_model():
    return object()
'''


def write(folder, name="my_user_model"):
    (folder / f"{name}.py").write_text(SOURCE)
    return f"{name}:make"
