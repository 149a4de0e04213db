"""Train/validation split, a deterministic example order, and padded micro-batches.

The order is a pure function of the seed: the examples of epoch ``e`` come in a
permutation drawn from a generator seeded by (seed, e), and micro-batch ``j`` takes
positions ``j * batch_size ...`` of the concatenated epochs. So the data position of a
run is just its step number, and a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from splitcore.data.examples import IGNORE_INDEX, TokenizedExample, tokenize_examples
from splitcore.data.formats import Example
from splitcore.training.config import TrainConfig


def _generator(seed: int, purpose: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@dataclass(frozen=True)
class TrainingData:
    train: tuple[TokenizedExample, ...]
    val: tuple[TokenizedExample, ...]
    dropped: int  # examples left without any trained token after truncation


def split_train_val(examples: Sequence[TokenizedExample], val_fraction: float, seed: int) -> TrainingData:
    """Hold out ``val_fraction`` of the examples (at least one when the fraction is > 0).

    Examples with no trained token (e.g. a prompt longer than the sequence length) are
    dropped; an empty training set is an error that says why.
    """
    usable = [example for example in examples if example.num_trained_tokens > 0]
    dropped = len(examples) - len(usable)
    if not usable:
        raise ValueError(
            f"none of the {len(examples)} examples has a token to train on within the sequence length; "
            "raise the sequence length or shorten the prompts"
        )
    n_val = round(len(usable) * val_fraction) if val_fraction > 0 else 0
    if val_fraction > 0:
        n_val = max(1, n_val)
        if n_val >= len(usable):
            raise ValueError(
                f"a validation fraction of {val_fraction} leaves no training examples out of {len(usable)}; "
                "lower it or add examples"
            )
    order = torch.randperm(len(usable), generator=_generator(seed, "validation-split")).tolist()
    val = tuple(usable[i] for i in sorted(order[:n_val]))
    train = tuple(usable[i] for i in sorted(order[n_val:]))
    return TrainingData(train=train, val=val, dropped=dropped)


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (batch, seq) int64
    attention_mask: torch.Tensor  # (batch, seq) int64, 1 for real tokens
    labels: torch.Tensor  # (batch, seq) int64, IGNORE_INDEX where no loss

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device) -> Batch:
        """The batch on ``device`` (itself when it is there already)."""
        if self.input_ids.device == torch.device(device):
            return self
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    @property
    def num_trained_tokens(self) -> int:
        """Labelled next-token targets (the loss shifts labels by one)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def collate(examples: Sequence[TokenizedExample], pad_token_id: int) -> Batch:
    """Right-pad to the longest example of the batch."""
    length = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
    return Batch(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


class MicroBatches:
    """Micro-batch ``j`` of a run over ``examples``, as a pure function of (seed, j)."""

    def __init__(self, examples: Sequence[TokenizedExample], batch_size: int, seed: int, pad_token_id: int) -> None:
        self.examples = tuple(examples)
        self.batch_size = batch_size
        self.seed = seed
        self.pad_token_id = pad_token_id

    @lru_cache(maxsize=4)  # noqa: B019 - a handful of epochs, freed with the object
    def _epoch_order(self, epoch: int) -> tuple[int, ...]:
        return tuple(torch.randperm(len(self.examples), generator=_generator(self.seed, f"epoch-{epoch}")).tolist())

    def indices(self, micro_index: int) -> list[int]:
        n = len(self.examples)
        positions = range(micro_index * self.batch_size, (micro_index + 1) * self.batch_size)
        return [self._epoch_order(p // n)[p % n] for p in positions]

    def epoch_of(self, micro_index: int) -> float:
        return micro_index * self.batch_size / len(self.examples)

    def batch(self, micro_index: int) -> Batch:
        return collate([self.examples[i] for i in self.indices(micro_index)], self.pad_token_id)


def evaluation_batches(examples: Sequence[TokenizedExample], batch_size: int, pad_token_id: int) -> list[Batch]:
    return [collate(examples[i:i + batch_size], pad_token_id) for i in range(0, len(examples), batch_size)]


def prepare_training_data(tokenizer, examples: Sequence[Example], config: TrainConfig) -> TrainingData:
    """Tokenize with label masking, truncate to ``config.seq_len`` and hold out the validation share."""
    return split_train_val(tokenize_examples(tokenizer, examples, config.seq_len), config.val_fraction, config.seed)
