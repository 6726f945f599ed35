"""`posttrain.train.loop.train` with training curves, as a study calls it (`posttrain train` logs
none), for the subprocess tests of several processes: train_curves.py CONFIG METHOD BASE OUT [--resume]."""

import random
import sys

import coin_task  # noqa: F401

from posttrain.config import build_study_config, read_study_yaml
from posttrain.study import build_tasks
from posttrain.train.loop import train

config, method, base, out = sys.argv[1:5]
cfg = build_study_config(read_study_yaml(config), [])
m = cfg.methods[method]
task = build_tasks(cfg)[m.task]
rng = random.Random(0)
curve = {f"{m.task}/{split}": [task.sample(rng, split) for _ in range(6)] for split in ("id", "ood")}
train(m, init_dir=base, ref_dir=base, out_dir=out, task=task, expert_format="default", seed=cfg.seed,
      curve_tasks={m.task: task}, curve_problems=curve, curve_every=2, device="cpu", resume="--resume" in sys.argv,
      method=method)
