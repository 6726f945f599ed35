"""Chat templates for prompts: the one decision of how a task's prompt text becomes the tokens an
instruct model sees.

`chat_template: auto` (the default) wraps every prompt as one user turn with the tokenizer's own
template and the assistant header (`apply_chat_template(..., add_generation_prompt=True)`) when the
tokenizer has a template, i.e. the checkpoint is a chat/instruct model; `none` never does. The tiny
world's character tokenizer has no template, so its prompts are unchanged either way. The mode
travels on the tokenizer object (`set_chat_mode`, called by `load_model`), so every caller of
`posttrain.train.sequences.encode_prompts` (training data, rollouts, evaluation, KL) agrees.
"""

from __future__ import annotations

from posttrain.errors import UserError

CHAT_MODES = ("auto", "none")
_ATTR = "_posttrain_chat_mode"


def set_chat_mode(tok, mode: str) -> None:
    if mode not in CHAT_MODES:
        raise UserError(f"chat_template: {mode!r} is not one of {', '.join(CHAT_MODES)}")
    # a plain attribute: it must not reach tokenizer_config.json when the tokenizer is saved
    object.__setattr__(tok, _ATTR, mode)


def uses_chat_template(tok) -> bool:
    """Whether prompts for `tok` are wrapped in its chat template."""
    return getattr(tok, _ATTR, "auto") == "auto" and bool(getattr(tok, "chat_template", None))


def chat_prompts(tok, prompts: list[str]) -> list[str]:
    """Each prompt as a single user turn followed by the assistant's generation header."""
    try:
        return [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                for p in prompts]
    except Exception as e:  # noqa: BLE001 - jinja raises its own error types for a broken template
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"the tokenizer's chat template failed on a prompt ({first}); set chat_template: none "
                        "to use the prompts as they are") from None
