"""Turn conversations or plain text into the token ids the scorers feed the model.

The chat format uses the tokenizer's own chat template, as training does (so a fine-tuned model
sees at evaluation exactly the framing it was trained on); the plain format is a bare text prompt
for base models without a template. Prompts longer than the budget lose their left end (the end
of a prompt carries the question and the instruction), and the caller counts that.
"""

from __future__ import annotations

from sparsedoc.errors import UserError


class PromptError(UserError, ValueError):
    """The prompt cannot be built as asked (e.g. the chat format on a model with no template)."""


def render_chat(tokenizer, messages: list[dict], system_prompt: str = "",
                add_generation_prompt: bool = True) -> str:
    """The chat template's text for ``messages`` (+ the assistant header when asked)."""
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError("the tokenizer has no chat template; use prompt_format=plain")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def encode(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of a rendered prompt. A chat template writes its own special tokens, so none
    are added; a plain prompt gets the tokenizer's usual BOS."""
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


def encode_continuation(tokenizer, prompt: str, continuation: str, chat: bool) -> list[int]:
    """Ids of ``continuation`` as they follow ``prompt`` (the lm-eval convention: encode the
    whole and the context, keep the difference; encode alone if the boundary merges)."""
    whole = encode(tokenizer, prompt + continuation, chat)
    ctx = encode(tokenizer, prompt, chat)
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        return whole[len(ctx):]
    return list(tokenizer(continuation, add_special_tokens=False)["input_ids"])


def prompt_budget(model, max_prompt_tokens: int, max_new_tokens: int) -> int:
    """Longest prompt the model can take with ``max_new_tokens`` still to come."""
    if max_prompt_tokens:
        return max_prompt_tokens
    limit = getattr(model.config, "max_position_embeddings", None) or 4096
    return max(16, limit - max_new_tokens)


def truncate_left(ids: list[int], budget: int) -> tuple[list[int], bool]:
    if len(ids) <= budget:
        return ids, False
    return ids[len(ids) - budget:], True
