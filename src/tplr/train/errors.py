"""Typed errors of the training worker. Each names what was wrong and carries a ``hint``."""

from __future__ import annotations

from tplr.errors import ConfigError, TplrError


class TrainConfigError(ConfigError):
    """A model or training setting is out of range or inconsistent with another."""


class VocabMismatchError(ConfigError):
    """The data holds token ids the model's vocabulary cannot embed."""

    hint = "set the model's vocab_size (--vocab-size) to at least the dataset's vocabulary"


class BatchError(TplrError):
    """A batch has the wrong shape, dtype or token ids."""


class BatchesExhaustedError(TplrError):
    """The batch iterator ended before the requested number of optimizer steps."""

    hint = "pass an iterator with at least n x accumulation-steps micro-batches"


class CheckpointError(TplrError):
    """A checkpoint could not be written, read, or does not fit this model."""


class UpdateError(TplrError):
    """An update (pseudo-gradient, snapshot) does not match the model's parameters."""


class TrainingDivergedError(TplrError):
    """The loss became NaN or infinite."""

    hint = "lower the learning rate, lengthen the warmup or enable gradient clipping"


class DistributedError(TplrError):
    """torch.distributed could not be set up from the launcher's environment."""

    hint = "launch with torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)"
