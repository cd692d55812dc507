"""Chat-template facts every stage agrees on: where an assistant turn ends and which tokens stop a completion.

Generation (teacher, eval), SFT targets and GRPO rollouts all read them from here, so they end turns on the same
tokens.
"""
from __future__ import annotations

# Turn terminators of common chat templates: an instruct model ends its turn with one of these even where its
# tokenizer names another EOS.
TERMINATORS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>")


def end_of_turn_text(tokenizer) -> str:
    """The text the chat template writes right after an assistant message (e.g. "<|im_end|>" for ChatML).

    Found by rendering a conversation with a sentinel assistant reply and reading what follows it; trailing
    whitespace is dropped because generation stops at the end-of-turn token itself. Falls back to the EOS token
    for templates that write nothing after the reply.
    """
    sentinel = "\u2063SENTINEL\u2063"  # invisible separator: cannot collide with real template text
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": sentinel}], tokenize=False
    )
    after = rendered.split(sentinel, 1)[1].rstrip() if sentinel in rendered else ""
    # Llama-3 style templates may write several special tokens; keep only up to the first one's end.
    special = sorted((t for t in tokenizer.all_special_tokens if t and after.startswith(t)), key=len)
    if special:
        return special[-1]
    if after:
        return after
    if tokenizer.eos_token is None:
        raise ValueError("tokenizer has neither a chat template end-of-turn marker nor an eos_token")
    return tokenizer.eos_token


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Token ids that end a completion, in a fixed order: the tokenizer's EOS, the TERMINATORS its vocab has, the
    template's end-of-turn token, then any other EOS id of `generation_config` (a model's generation_config.json)."""
    ids: list[int] = []

    def add(i):
        if i is not None and i not in ids:
            ids.append(i)

    add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    for tok in TERMINATORS:
        add(vocab.get(tok))
    try:
        eot = tokenizer(end_of_turn_text(tokenizer), add_special_tokens=False)["input_ids"]
    except ValueError:  # no chat template and no EOS: nothing more to add
        eot = []
    if len(eot) == 1:
        add(eot[0])
    eos = getattr(generation_config, "eos_token_id", None)
    for i in eos if isinstance(eos, list) else [eos]:
        add(i)
    return ids
