"""Where a pretraining step of the default study spends its time, on one thread: building the batch
(sampling the mixture, encoding, packing), the forward and the backward + AdamW step, in process CPU
seconds per step (steps 5-29 of 30; the first five warm up).

    .venv/bin/python bench/pretrain_profile.py
"""
import time, torch
torch.set_num_threads(1)
from posttrain.config import load_study_config, preset_path
from posttrain.study import build_tasks
from posttrain.models.tiny import build_char_tokenizer, build_tiny_model
from posttrain.train.pretrain import pretrain_batch
cfg = load_study_config(preset_path("default"))
tasks = build_tasks(cfg)
tok = build_char_tokenizer(); model = build_tiny_model(cfg.model, len(tok), 0)
opt = torch.optim.AdamW(model.parameters(), 1e-3)
tp = tf = tb = 0.0
for step in range(30):
    t0 = time.process_time()
    batch = pretrain_batch(tasks, cfg.pretrain, tok, cfg.model.max_length, 0, step)
    t1 = time.process_time()
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch.input_ids[:, 1:].reshape(-1), reduction="none").view_as(batch.target_mask)
    loss = (loss * batch.target_mask).sum() / batch.target_mask.sum()
    t2 = time.process_time()
    loss.backward(); opt.step(); opt.zero_grad()
    t3 = time.process_time()
    if step >= 5:
        tp += t1 - t0; tf += t2 - t1; tb += t3 - t2
print(f"per step CPU s: data {tp/25:.4f}, forward {tf/25:.4f}, backward+adam {tb/25:.4f}; batch shape {tuple(batch.input_ids.shape)}, mask {tuple(batch.attention_mask.shape)} {batch.attention_mask.dtype}")
