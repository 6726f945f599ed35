"""p(EOS) per step of gpu_check's random Qwen2.5-0.5B-shaped model, with EOS's embedding row scaled
by k (bench/gpu_check.py scales it x10 so that GRPO completions finish and rewards are mixed).

    .venv/bin/python bench/eos_probe.py            # ~15 s on 2 CPU cores, 2 GB of memory

Random prompts of the character tokenizer (4 x 48 tokens), one forward; the scaled row changes the
logit of EOS only (a prompt holds no EOS), so each k reuses the same hidden states.
"""

import torch

from gpu_check import QWEN05
from posttrain.config import ModelConfig
from posttrain.models.tiny import build_chat_tokenizer, build_tiny_model


def main() -> None:
    shape = dict(QWEN05)
    vocab = shape.pop("vocab")
    tok = build_chat_tokenizer()
    model = build_tiny_model(ModelConfig(arch="qwen2", **shape), vocab, seed=0)  # gpu_check's build
    ids = torch.randint(0, len(tok) - 2, (4, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.model(input_ids=ids).last_hidden_state @ model.lm_head.weight.T
    others = torch.logsumexp(logits, -1)
    print(f"vocabulary {vocab}, {ids.numel()} positions")
    for k in (1, 4, 6, 8, 10, 12, 16):
        le = logits[..., tok.eos_token_id] * k
        p = torch.exp(le - torch.logaddexp(others, le))
        print(f"EOS row x{k:<2}  mean p(EOS) per step {float(p.mean()):.2e}  "
              f"P(finish within 64 steps, steps independent) {float(1 - (1 - p.mean()) ** 64):.2f}")


if __name__ == "__main__":
    main()
