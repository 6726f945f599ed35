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
