"""Would bf16 autocast make pretraining faster on this CPU? One thread, process CPU seconds per step
of the default study's pretraining (steps 5-15 of 16), fp32 against bf16 autocast (fp32 master
weights), from the same initial weights, twice each, side by side:

    .venv/bin/python bench/pretrain_bf16.py
"""
import random, time, torch
torch.set_num_threads(1)
from posttrain.config import load_study_config, preset_path
from posttrain.study import build_tasks
from posttrain.models.tiny import build_char_tokenizer, build_tiny_model
from posttrain.train.pretrain import mixture_texts
from posttrain.train.sequences import encode_completions, encode_prompts, pack_documents
from posttrain.train.data_sources import step_seed
cfg = load_study_config(preset_path("default"))
tasks = build_tasks(cfg)
tok = build_char_tokenizer()
batches=[]
for step in range(16):
    rng = random.Random(step_seed(0, step, "pretrain"))
    prompts, completions = mixture_texts(tasks, cfg.pretrain.mixture, rng, cfg.pretrain.batch_size)
    docs = [p + c for p, c in zip(encode_prompts(tok, prompts), encode_completions(tok, completions))]
    batches.append(pack_documents(docs, cfg.model.max_length, tok.pad_token_id))
def run(bf16):
    model = build_tiny_model(cfg.model, len(tok), 0); opt = torch.optim.AdamW(model.parameters(), 1e-3)
    ts = []
    for i, b in enumerate(batches):
        t = time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=b.input_ids, position_ids=b.position_ids, attention_mask=b.attention_mask).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), b.input_ids[:, 1:].reshape(-1), reduction="none").view_as(b.target_mask)
        loss = (loss * b.target_mask).sum() / b.target_mask.sum()
        loss.backward(); opt.step(); opt.zero_grad()
        if i >= 4: ts.append(time.process_time() - t)
    return sum(ts) / len(ts)
for rep in range(2):
    a = run(False); b = run(True)
    print(f"fp32 {a:.3f} s/step, bf16 autocast {b:.3f} s/step, ratio {a/b:.2f}")
