"""vLLM rollouts (`rollout.backend: vllm`): a colocated engine samples for the training loop.

The engine lives in the training process on the same GPU (TRL's colocate mode:
`distributed_executor_backend="external_launcher"`, see trl/generation/vllm_generation.py) and
takes token ids in and gives token ids out, so prompts are encoded exactly as the built-in sampler
encodes them (chat template included, `posttrain.train.sequences.encode_prompts`). Before every
sampling call the policy's current weights (merged, for LoRA) are loaded into the live engine
(`model_runner.model.load_weights`), so a rollout always sees the weights after the last optimizer
step; the prefix cache is reset with them.

When vLLM is not importable, no CUDA GPU is present or the run is on the CPU, the built-in sampler
runs instead: one line says so (once per process) and train.json records
`rollout_backend: "builtin (fallback: <why>)"`. Not verified on a GPU in the session that wrote it.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from pathlib import Path
from typing import Callable, Iterable

import torch

from posttrain.errors import UserError

_NOTICES: set[str] = set()
ENGINE_ATTR = "_posttrain_rollout_engine"  # set on the policy module: `rollout.generate` dispatches on it


def unavailable_reason(device: str, processes: int = 1) -> str | None:
    """Why vLLM cannot sample here (None: it can)."""
    if processes > 1:
        return "the colocated engine serves one process; this run has several"
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed"
    if device == "cpu":
        return "the run is on the CPU"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


def resolve_backend(backend: str, device: str, processes: int = 1) -> tuple[str, str]:
    """(backend to use, label for train.json); prints the fallback notice once per process."""
    if backend != "vllm":
        return "builtin", "builtin"
    why = unavailable_reason(device, processes)
    if why is None:
        return "vllm", "vllm"
    note = f"posttrain: rollout.backend vllm unavailable ({why}); rollouts use the built-in sampler"
    if note not in _NOTICES:
        _NOTICES.add(note)
        print(note, file=sys.stderr)
    return "builtin", f"builtin (fallback: {why})"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_runner_model(llm):
    """vLLM's live torch model behind `llm` (the path moved between vLLM versions)."""
    executor = llm.llm_engine.model_executor
    worker = executor.driver_worker
    for path in (("model_runner", "model"), ("worker", "model_runner", "model")):
        obj = worker
        try:
            for attr in path:
                obj = getattr(obj, attr)
            return obj
        except AttributeError:
            continue
    raise UserError("rollout.backend vllm: this vLLM version exposes no driver_worker.model_runner.model to load "
                    "weights into (tested against TRL's colocate path)")


class VllmEngine:
    """A colocated vLLM engine for one training run."""

    def __init__(self, model_dir: str | Path, weights: Callable[[], Iterable[tuple[str, torch.Tensor]]], *,
                 gpu_memory_utilization: float, max_model_len: int | None, dtype: torch.dtype, seed: int,
                 llm=None) -> None:
        self.weights = weights
        if llm is None:
            # in-process engine (no separate engine-core process): torch.distributed of one rank
            for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                         "MASTER_PORT": str(_free_port())}.items():
                os.environ.setdefault(k, v)
            from vllm import LLM

            llm = LLM(model=str(model_dir), skip_tokenizer_init=True, gpu_memory_utilization=gpu_memory_utilization,
                      max_model_len=max_model_len, dtype=str(dtype).removeprefix("torch."), seed=seed,
                      distributed_executor_backend="external_launcher", enable_prefix_caching=True,
                      trust_remote_code=False)
        self.llm = llm

    def sync(self) -> None:
        """Load the policy's current weights into the engine."""
        model = _model_runner_model(self.llm)
        with torch.no_grad():
            model.load_weights(((n, t.detach()) for n, t in self.weights()))
        self.llm.reset_prefix_cache()

    def generate(self, prompt_ids: list[list[int]], n: int, max_new_tokens: int, temperature: float, greedy: bool,
                 seed: int, top_p: float, eos: int) -> tuple[list[list[int]], list[bool]]:
        """`n` completions per prompt (prompt-major), each ending with EOS when it finished."""
        from vllm import SamplingParams

        self.sync()
        params = [SamplingParams(n=n, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
                                 max_tokens=max_new_tokens, seed=seed + i, stop_token_ids=[eos], detokenize=False)
                  for i in range(len(prompt_ids))]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], sampling_params=params, use_tqdm=False)
        return completions_from_outputs(outs, eos)


def completions_from_outputs(outs, eos: int) -> tuple[list[list[int]], list[bool]]:
    """vLLM `RequestOutput`s -> (token ids with EOS appended when the completion stopped, finished
    flags), the layout of the built-in sampler's `Rollouts`."""
    ids, finished = [], []
    for out in outs:
        for c in out.outputs:
            toks = list(c.token_ids)
            done = c.finish_reason == "stop"
            if done and (not toks or toks[-1] != eos):
                toks.append(eos)
            ids.append(toks)
            finished.append(done)
    return ids, finished
