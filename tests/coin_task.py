"""A test task a random tiny model can score on: mechanics of the training loop without learning."""

from posttrain.tasks import TASKS, Problem, Task, Verdict, register_task
from posttrain.tasks.base import MALFORMED

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
            return "a" if rng is None else rng.choice("abcdefghijklmnopqrstuvwxyz")

        def verify(self, problem, completion):
            if not completion:
                return MALFORMED
            if self.accept_first:
                return Verdict(problem.data["ok"], False, "default")
            return Verdict(completion[0] in "abcdefghijklm", False, "default")
