"""Which operators a pretraining step of the default study spends its time in, fp32 and under bf16
autocast (fp32 master weights), one thread, from the same initial weights and batches: per step,
milliseconds of CPU in the matrix products (aten::mm), the attention kernel forward and backward,
and everything else (elementwise work, norms, the optimizer), from torch.profiler over steps 5-14;
and the rate of the matrix products against this core's rate on a 2048^3 product.

    .venv/bin/python bench/pretrain_ops.py
"""
import torch
torch.set_num_threads(1)
from torch.profiler import profile
from demo_flops import matmul_rate
from posttrain.config import load_study_config, preset_path
from posttrain.study import build_tasks
from posttrain.models.tiny import build_char_tokenizer, build_tiny_model
from posttrain.train.pretrain import pretrain_batch

cfg = load_study_config(preset_path("default"))
tasks = build_tasks(cfg)
tok = build_char_tokenizer()
batches = [pretrain_batch(tasks, cfg.pretrain, tok, cfg.model.max_length, 0, step) for step in range(15)]
print(f"this core: 2048^3 fp32 product at {matmul_rate() / 1e9:.1f} GFLOP/s")


def step(model, opt, batch, bf16):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                       attention_mask=batch.attention_mask).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             batch.input_ids[:, 1:].reshape(-1), reduction="none").view_as(batch.target_mask)
    loss = (loss * batch.target_mask).sum() / batch.target_mask.sum()
    loss.backward(); opt.step(); opt.zero_grad()


for bf16 in (False, True):
    model = build_tiny_model(cfg.model, len(tok), 0)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    for batch in batches[:5]:
        step(model, opt, batch, bf16)
    with profile() as prof:
        for batch in batches[5:]:
            step(model, opt, batch, bf16)
    n = len(batches) - 5
    ms = {"mm": 0.0, "attention forward": 0.0, "attention backward": 0.0, "other": 0.0}
    for e in prof.key_averages():
        if e.key == "aten::mm":
            ms["mm"] += e.self_cpu_time_total / 1e3 / n
        elif e.key == "aten::_scaled_dot_product_flash_attention_for_cpu":
            ms["attention forward"] += e.self_cpu_time_total / 1e3 / n
        elif e.key == "aten::_scaled_dot_product_flash_attention_for_cpu_backward":
            ms["attention backward"] += e.self_cpu_time_total / 1e3 / n
        else:
            ms["other"] += e.self_cpu_time_total / 1e3 / n
    total = sum(ms.values())
    tokens = batches[5].input_ids.numel()
    params = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name)
    rate = 6 * tokens * params / (ms["mm"] / 1e3) / 1e9
    print(f"{'bf16 autocast' if bf16 else 'fp32'}: {total:.0f} ms/step = "
          + ", ".join(f"{k} {v:.0f} ({v / total:.0%})" for k, v in ms.items())
          + f"; matrix products at ~{rate:.0f} GFLOP/s")
