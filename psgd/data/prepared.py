"""A run's data, ready to train on: the training set, the validation split, the test set,
and each one's targets in the form the model's loss wants."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import TrainConfig
from ..errors import ConfigError
from .datasets import Dataset, load, split


@dataclass
class PreparedData:
    config: TrainConfig  # the run's config fitted to this data (see TrainConfig.fitted_to)
    train: Dataset
    validation: Dataset | None
    test: Dataset
    T_train: np.ndarray
    T_val: np.ndarray | None
    T_test: np.ndarray

    @property
    def eval_set(self) -> tuple[np.ndarray, np.ndarray]:
        """``(X, T)`` evaluated during training: the validation split, or the test set without one."""
        if self.validation is not None:
            return self.validation.X, self.T_val
        return self.test.X, self.T_test


def prepare_data(config: TrainConfig) -> PreparedData:
    """Load the data set, fit the config's size-dependent settings to it (``.config``: run
    with that one), hold out the validation split, check the model fits it."""
    train, test = load(config.data, config.data_dir, config.seed)
    config = config.fitted_to(len(train))
    if config.validation >= len(train):
        raise ConfigError(f"--validation {config.validation} holds out all {len(train)} training examples of "
                          f"{train.name}: give a smaller --validation (0 evaluates on the test set)")
    sizes = config.model.sizes
    n_out = train.n_outputs_for(config.model.loss)
    if not config.model.factory and (sizes[0] != train.n_inputs or sizes[-1] != n_out):
        raise ConfigError(
            f"layers {','.join(map(str, sizes))} do not fit {train.name}: it has {train.n_inputs} inputs "
            f"and {n_out} outputs, so the list must start with {train.n_inputs} and end with {n_out}"
        )
    if config.model.loss == "softmax_ce" and not train.n_classes:
        raise ConfigError(f"{train.name} has real-valued targets: use --loss sse")
    val = None
    if config.validation:
        train, val = split(train, config.validation, config.seed)
    loss = config.model.loss
    return PreparedData(
        config, train, val, test, train.targets_for(loss),
        val.targets_for(loss) if val is not None else None, test.targets_for(loss),
    )
