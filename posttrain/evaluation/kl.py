"""The KL between a fine-tuned policy pi and its base pi0 on held-out prompts of pi's fine-tuning task.

Two directions, named by their arguments so that no reader has to guess which is "forward":

- ``kl_pi_pi0`` = KL(pi || pi0) = E_x E_{y~pi(.|x)} [log pi(y|x) - log pi0(y|x)]: completions sampled
  from the fine-tuned model. Issue 13 calls this the "forward" KL.
- ``kl_pi0_pi`` = KL(pi0 || pi) = E_x E_{y~pi0(.|x)} [log pi0(y|x) - log pi(y|x)]: completions sampled
  from the base. This is the forgetting predictor of RL's Razor (arXiv 2509.04259, "the forward KL
  E_{x~tau}[KL(pi0 || pi)] on the new task"; the paper's "forward" is issue 13's "reverse"); the
  paper reports KL(pi || pi0) as the weaker predictor (R^2 0.93 vs 0.96 on its toy task).

Both are Monte Carlo estimates from completions sampled at temperature 1 with the training sampler
(`posttrain.train.rollout.generate`), scored with the training forward (`policy_forward` on
`pack`), so log pi here is exactly the log-prob the training loop optimises. A completion is
its sampled tokens up to and including EOS, or the first `max_new_tokens` tokens when it is cut
off: the estimate is then the KL between the two models' distributions over completions truncated
to `max_new_tokens` tokens, which is a KL in its own right (of the prefix marginals).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from posttrain.train.policy import policy_forward
from posttrain.train.rollout import generate
from posttrain.train.sequences import pack


def kl_estimate(seq_logratio: torch.Tensor, seq_tokens: torch.Tensor) -> dict[str, float | None]:
    """Monte Carlo KL(p || q) from `P` prompts x `n` completions y_ij ~ p(.|x_i) ([P, n] tensors).

    `seq_logratio[i, j]` = s_ij = sum_t [log p(y_ijt | x_i, y_ij<t) - log q(y_ijt | x_i, y_ij<t)] and
    `seq_tokens[i, j]` = l_ij, its number of tokens. With S_i = sum_j s_ij and L_i = sum_j l_ij:

    - per_seq = 1/(P n) sum_ij s_ij: unbiased for E_x KL(p(.|x) || q(.|x)) (the log-ratio of a whole
      sequence is the sum of its tokens' log-ratios, chain rule); per_seq_se = sd_i(S_i / n) / sqrt(P).
    - per_token = sum_ij s_ij / sum_ij l_ij (a ratio estimator: the KL per generated token);
      per_token_se by the delta method over prompts,
      sqrt(sum_i (S_i - per_token L_i)^2 / (P (P - 1))) / mean_i L_i (Cochran, Sampling Techniques, 6.9).

    Prompts are the independent units (a prompt's n completions share it); the SEs are None with
    fewer than 2 prompts. Returns {per_seq, per_seq_se, per_token, per_token_se, mean_tokens}.
    """
    if seq_logratio.shape != seq_tokens.shape or seq_logratio.dim() != 2 or seq_logratio.numel() == 0:
        raise ValueError(f"kl_estimate wants two equal non-empty [P, n] tensors, got {tuple(seq_logratio.shape)} "
                         f"and {tuple(seq_tokens.shape)}")
    s, l = seq_logratio.double(), seq_tokens.double()
    P, n = s.shape
    S, L = s.sum(1), l.sum(1)
    total_tokens = float(L.sum())
    if total_tokens <= 0:
        raise ValueError("kl_estimate: the completions hold no tokens")
    per_seq = float(S.sum()) / (P * n)
    per_token = float(S.sum()) / total_tokens
    seq_se = tok_se = None
    if P >= 2:
        seq_se = float((S / n).std(unbiased=True)) / math.sqrt(P)
        tok_se = math.sqrt(float(((S - per_token * L) ** 2).sum()) / (P * (P - 1))) / float(L.mean())
    return {"per_seq": per_seq, "per_seq_se": seq_se, "per_token": per_token, "per_token_se": tok_se,
            "mean_tokens": total_tokens / (P * n)}


@dataclass
class Samples:
    """`n` completions per prompt from one model, prompt-major, with that model's log-prob sums."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    n: int
    logp: torch.Tensor  # [P, n] sum over each completion's tokens of log p(token | prefix) under the sampler
    tokens: torch.Tensor  # [P, n] tokens per completion


@torch.no_grad()
def sequence_logprobs(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], n: int, pad_id: int,
                      batch_rows: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per completion: the sum of log model(token | prefix) over its tokens, and its token count
    ([P, n] each). The training forward at temperature 1 on the training layout (each prompt once
    per group), in batches of whole groups of at most `batch_rows` rows."""
    if len(prompt_ids) != len(completion_ids) or len(prompt_ids) % n:
        raise ValueError(f"{len(prompt_ids)} prompts and {len(completion_ids)} completions are not groups of {n}")
    model.eval()
    device = next(model.parameters()).device
    max_length = getattr(model.config, "max_position_embeddings", None)
    per = max(1, batch_rows // n) * n
    sums, counts = [], []
    for start in range(0, len(prompt_ids), per):
        packed = pack(prompt_ids[start : start + per], completion_ids[start : start + per], pad_id, max_length,
                      group_size=n)
        out = policy_forward(model, packed.to(device))
        mask = packed.target_mask.to(device)
        sums.append((out.logp.double() * mask).sum(-1).cpu())
        counts.append(mask.sum(-1).cpu())
    return torch.cat(sums).view(-1, n), torch.cat(counts).view(-1, n)


def sample(model, tok, prompts: list[str], n: int, max_new_tokens: int, seed: int, batch_size: int = 256) -> Samples:
    """`n` completions per prompt at temperature 1 (a torch.Generator seeded with `seed`) and their
    log-probs under the sampling model."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ro = generate(model, tok, prompts, n=n, max_new_tokens=max_new_tokens, temperature=1.0, generator=gen,
                  batch_size=batch_size)
    logp, tokens = sequence_logprobs(model, ro.prompt_ids, ro.completion_ids, n, tok.pad_token_id, batch_size)
    return Samples(ro.prompt_ids, ro.completion_ids, n, logp, tokens)


def kl_seed(seed: int, task_key: str, sampler: str) -> int:
    """The sampling seed of one side of the estimate: a function of (study seed, task split, sampler)
    only, so every fine-tuned model of a study is sampled with the same random numbers (their KLs
    differ by the models, not by the draw) and the base's samples are shared by all of them."""
    return random.Random(f"{seed}/kl/{task_key}/{sampler}").getrandbits(63)


def kl_to_base(model, base, tok, base_samples: Samples, prompts: list[str], max_new_tokens: int, seed: int,
               batch_size: int = 256) -> dict[str, float | None]:
    """Both KLs between `model` (pi) and `base` (pi0) on `prompts`; `base_samples` are pi0's
    completions of the same prompts (`sample(base, ...)`, reusable across models).

    Returns flat keys kl_pi_pi0_{per_token, per_seq}[_se] (KL(pi || pi0), y ~ pi),
    kl_pi0_pi_{...} (KL(pi0 || pi), y ~ pi0: RL's Razor's predictor), mean_tokens_pi, mean_tokens_pi0.
    """
    if model.config.vocab_size != base.config.vocab_size:
        raise ValueError(f"vocabulary sizes differ: {model.config.vocab_size} vs {base.config.vocab_size}")
    n = base_samples.n
    if len(base_samples.prompt_ids) != len(prompts) * n:
        raise ValueError("base_samples were drawn for other prompts")
    own = sample(model, tok, prompts, n, max_new_tokens, seed, batch_size)
    base_on_own, _ = sequence_logprobs(base, own.prompt_ids, own.completion_ids, n, tok.pad_token_id, batch_size)
    model_on_base, _ = sequence_logprobs(model, base_samples.prompt_ids, base_samples.completion_ids, n,
                                         tok.pad_token_id, batch_size)
    fwd = kl_estimate(own.logp - base_on_own, own.tokens)
    rev = kl_estimate(base_samples.logp - model_on_base, base_samples.tokens)
    out: dict[str, float | None] = {}
    for name, est in (("kl_pi_pi0", fwd), ("kl_pi0_pi", rev)):
        out.update({f"{name}_{k}": v for k, v in est.items() if k != "mean_tokens"})
    out["mean_tokens_pi"], out["mean_tokens_pi0"] = fwd["mean_tokens"], rev["mean_tokens"]
    return out
