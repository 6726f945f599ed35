"""Token plumbing by hand: document packing for pretraining, device moves, encoding."""

import pytest
import torch

from posttrain.errors import UserError
from posttrain.models.tiny import build_char_tokenizer
from posttrain.train.sequences import encode_completions, encode_prompts, pack, pack_documents


def test_pack_documents_first_fit_decreasing_by_hand():
    p = pack_documents([[11, 12, 13], [14, 15], [16], [17, 18, 19, 20]], row_len=5, pad_id=0)
    # longest first: [17..20] opens row 0 (1 free), [11..13] opens row 1 (2 free), [14, 15] fills
    # row 1, [16] fills row 0
    assert p.input_ids.tolist() == [[17, 18, 19, 20, 16], [11, 12, 13, 14, 15]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    # a target is the next token of the same document
    assert p.target_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 1]]
    m = p.attention_mask[:, 0]
    assert m.shape == (2, 5, 5)
    expect1 = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(m[1], expect1)
    assert torch.equal(m[0, 4], torch.tensor([False, False, False, False, True]))


def test_pack_documents_pads_truncates_and_masks_padding():
    p = pack_documents([[1, 2, 3, 4, 5, 6], [7]], row_len=4, pad_id=9)
    assert p.input_ids.tolist() == [[1, 2, 3, 4], [7, 9, 9, 9]]
    # padding positions stay in range; padding is no target and attends only to itself
    assert p.position_ids.tolist() == [[0, 1, 2, 3], [0, 0, 1, 2]]
    assert p.target_mask.tolist() == [[1, 1, 1], [0, 0, 0]]
    m = p.attention_mask[1, 0]
    assert torch.equal(m, torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool))
    short = pack_documents([[1, 2]], row_len=8, pad_id=0)
    assert short.input_ids.tolist() == [[1, 2]] and short.target_mask.tolist() == [[1]]
    empty = pack_documents([], row_len=4, pad_id=0)
    assert empty.input_ids.shape == (0, 1)
    # one-token documents: rows as wide as the longest, one token, nothing to predict
    one = pack_documents([[5], [6]], row_len=1, pad_id=0)
    assert one.input_ids.tolist() == [[5], [6]] and one.target_mask.shape == (2, 0)
    # token ids and positions are integer indices (embedding and rotary tables), the mask is boolean
    assert p.input_ids.dtype == p.position_ids.dtype == torch.long and p.attention_mask.dtype == torch.bool


def test_packed_batch_moves_and_keeps_every_field():
    b = pack([[1, 5], [1, 5]], [[6, 2], [7, 8, 2]], pad_id=3, group_size=2)
    c = b.to(torch.device("cpu"))
    assert c.pad_id == 3 and c.shared is not None
    for f in ("input_ids", "attention_mask", "target_mask"):
        assert torch.equal(getattr(c, f), getattr(b, f))
    for f in ("input_ids", "position_ids", "attention_mask", "index"):
        assert torch.equal(getattr(c.shared, f), getattr(b.shared, f))
    p = b.padded()
    assert p.shared is None and p.pad_id == 3 and torch.equal(p.target_mask, b.target_mask)
    assert torch.equal(p.input_ids, b.input_ids) and torch.equal(p.attention_mask, b.attention_mask)
    # a group cut out of a grouped batch keeps the batch's pad id
    assert b.select_groups([0]).pad_id == 3
    assert pack([[1, 5], [1, 6]], [[6, 2], [7, 2]], pad_id=0, group_size=2).shared is None  # prompts differ
    assert pack([[1, 5]] * 3, [[6, 2]] * 3, pad_id=0, group_size=2).shared is None  # 3 rows, groups of 2


def test_encoding_adds_bos_and_eos():
    tok = build_char_tokenizer()
    a, b = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")
    assert encode_prompts(tok, ["ab", "b"]) == [[tok.bos_token_id, a, b], [tok.bos_token_id, b]]
    assert encode_completions(tok, ["ba", ""]) == [[b, a, tok.eos_token_id], [tok.eos_token_id]]


def test_encoding_wraps_prompts_in_the_chat_template_instead_of_bos():
    tok = build_char_tokenizer()
    tok.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    ids = lambda s: tok.convert_tokens_to_ids(list(s))  # noqa: E731
    assert encode_prompts(tok, ["ab", "b"]) == [ids("[ab]A:"), ids("[b]A:")]
    with pytest.raises(UserError, match=r"^the tokenizer cannot encode 'é' in the prompt '\[é\]A:' \(the tiny world's "
                                        r"character tokenizer knows printable ASCII only\)$"):
        encode_prompts(tok, ["é"])


def test_encoding_adds_no_special_tokens_of_the_tokenizers_own():
    # a tokenizer that adds BOS itself (as Llama's does): the prompt still gets exactly one, the
    # completion none before its text
    from tokenizers.processors import TemplateProcessing

    tok = build_char_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{tok.bos_token} $A",
                                                       special_tokens=[(tok.bos_token, tok.bos_token_id)])
    a = tok.convert_tokens_to_ids("a")
    assert tok(["a"])["input_ids"] == [[tok.bos_token_id, a]]  # the tokenizer alone would add it
    assert encode_prompts(tok, ["a"]) == [[tok.bos_token_id, a]]
    assert encode_completions(tok, ["a"]) == [[a, tok.eos_token_id]]


def test_pack_scores_from_the_first_completion_token_and_types_its_tensors():
    # a prompt of just BOS: token 1 is the first completion token, predicted at position 0
    b = pack([[1]], [[6, 2]], pad_id=0)
    assert b.target_mask.tolist() == [[1.0, 1.0]]
    assert b.input_ids.dtype == b.attention_mask.dtype == torch.long and b.target_mask.dtype == torch.float32


def test_share_prefixes_lays_out_each_group_once_by_hand():
    # group 0: prompt [1, 5], completions [6, 2] and [7, 8, 2]; group 1: prompt [1, 9], completions [2], [3, 2]
    b = pack([[1, 5], [1, 5], [1, 9], [1, 9]], [[6, 2], [7, 8, 2], [2], [3, 2]], pad_id=0, group_size=2)
    sh = b.shared
    assert sh.input_ids.tolist() == [[1, 5, 6, 2, 7, 8, 2], [1, 9, 2, 3, 2, 0, 0]]
    # completions continue the prompt's positions; padding counts from 0 again
    assert sh.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4], [0, 1, 2, 2, 3, 0, 1]]
    assert sh.position_ids.dtype == sh.input_ids.dtype == torch.long
    # padded row b, token t -> flat position in the shared rows (7 per row); padding -> 0
    assert sh.index.tolist() == [[0, 1, 2, 3, 0], [0, 1, 4, 5, 6], [7, 8, 9, 0, 0], [7, 8, 10, 11, 0]]
    m = sh.attention_mask[:, 0].int().tolist()
    # a completion sees the prompt and itself, causally, never the other completion
    assert m[0][4] == [1, 1, 0, 0, 1, 0, 0] and m[0][3] == [1, 1, 1, 1, 0, 0, 0]
    assert m[1][4] == [1, 1, 0, 1, 1, 0, 0]
    # a padding query attends to itself only (a non-empty softmax row)
    assert m[1][5] == [0, 0, 0, 0, 0, 1, 0] and m[1][6] == [0, 0, 0, 0, 0, 0, 1]
