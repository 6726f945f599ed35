import os

import pytest
import torch

os.environ.setdefault("POSTTRAIN_NO_PROGRESS", "1")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A randomly initialised tiny Llama + char tokenizer saved in HF format."""
    from posttrain.config import ModelConfig
    from posttrain.models.loading import save_checkpoint
    from posttrain.models.tiny import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer()
    model = build_tiny_model(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, max_length=96),
                             len(tok), seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(model, tok, path)
    return path


# ---- a task a random tiny model can score on: mechanics of the training loop without learning --

import random as _random  # noqa: E402

from posttrain.tasks import TASKS, Problem, Task, Verdict, register_task  # noqa: E402
from posttrain.tasks.base import MALFORMED  # noqa: E402

if "coin" not in TASKS:

    @register_task("coin")
    class Coin(Task):
        """Reward 1 when the completion's first character is in the first half of the alphabet
        (random models hit it about half the time). With `accept_first` > 0, only the first
        `accept_first` sampled problems accept anything; later ones accept nothing."""

        formats = ("default",)
        splits = ("id", "ood")

        def __init__(self, accept_first: int = 0) -> None:
            self.accept_first = accept_first
            self.count = 0

        def sample(self, rng, split, partition="any"):
            self.count += 1
            ok = self.accept_first == 0 or self.count <= self.accept_first
            return Problem(self.name, split, f"coin {rng.randint(0, 9)}:", {"ok": ok})

        def solve(self, problem, fmt, rng=None):
            return "a"

        def verify(self, problem, completion):
            if not completion:
                return MALFORMED
            if self.accept_first:
                return Verdict(problem.data["ok"], False, "default")
            return Verdict(completion[0] in "abcdefghijklm", False, "default")
