"""How a (prompt, response) pair becomes tokens, the same way in every stage.

A prompt is a string or a conversation (a tuple of `data.Message`).
  string        query    = [bos] + tokens(prompt + SEP)
                response = tokens(completion) + [eos]
  conversation  query    = the tokenizer's chat template of the prompt, with its generation prompt
                response = what the template adds for the assistant's answer, up to and including
                           the first eos ([eos] appended where the template writes none)
Every stage (SFT, sampling, RM, PPO, eval) goes through `encode_query` and `encode_pair`
so that a model never sees one layout in training and another in use. `train_tokenizer`
makes the lab's byte-level BPE tokenizer (pad, bos and eos three distinct special tokens,
so a padded position is never mistaken for the end of a response) with a chat template
that renders a one-turn conversation exactly as the string layout.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rlhflab.errors import InputError

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
"""The lab tokenizer's special tokens."""

SEP = "\n"
"""Text between the prompt and the response."""

SHOT_SEP = "\n\n"
"""Text between the question-answer pairs of one document: the lab corpus's FAQ pages and
GPT-prompted's few-shot prefix, which imitates them."""

LAB_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
)
"""The lab tokenizer's chat template: [bos], then each system or user turn followed by SEP
and each assistant turn followed by [eos]; the generation prompt adds nothing. A one-turn
conversation is token for token the string layout."""


def is_conversation(prompt) -> bool:
    return not isinstance(prompt, str)


def encode_query(tokenizer, prompt, where: dict | None = None) -> list[int]:
    """Token ids of a prompt, ready for the model to answer.  `where` (file, line, field)
    names the row in the error a conversation raises when the tokenizer has no template."""
    if is_conversation(prompt):
        return render_chat(tokenizer, prompt, generation_prompt=True, where=where)
    ids = tokenizer(prompt + SEP, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + list(ids)


def encode_response(tokenizer, completion: str, eos: bool = True) -> list[int]:
    """Token ids of a string prompt's response (for a conversation use `encode_pair`)."""
    ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    return ids + ([tokenizer.eos_token_id] if eos else [])


def encode_pair(tokenizer, prompt, completion: str, where: dict | None = None) -> tuple[list[int], list[int]]:
    """(query, response) token ids of a prompt and one answer, in the layout of the prompt's
    kind (module docstring); the response ends with eos."""
    if not is_conversation(prompt):
        return encode_query(tokenizer, prompt), encode_response(tokenizer, completion)
    from rlhflab.data import Message

    full = (*prompt, Message("assistant", completion))
    ids, spans = assistant_spans(tokenizer, full, where)
    start, end = spans[-1]
    return ids[:start], ids[start:end]


def render_chat(tokenizer, messages: Sequence, generation_prompt: bool, where: dict | None = None) -> list[int]:
    """The tokenizer's chat template of `messages` (data.Message), as token ids."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            "a conversational row needs a tokenizer with a chat template, and this one has none "
            "(set tokenizer.chat_template, or give plain-string rows)",
            **(where or {}),
        )
    ids = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        add_generation_prompt=generation_prompt,
        tokenize=True,
        return_dict=False,
    )
    return list(ids)


def assistant_spans(tokenizer, conversation: Sequence, where: dict | None = None):
    """Token ids of a whole conversation and the [start, end) span of each assistant turn.

    A turn's span is what the template adds between the conversation before it (with the
    generation prompt) and the conversation through it, cut after its first eos. The last
    turn always ends with eos: appended where the template writes none, so the model learns
    to stop. Refuses a template that does not render each prefix as a prefix of the whole.
    -> (ids, [(start, end), ...]) one span per assistant message, in order.
    """
    eos = tokenizer.eos_token_id
    ids = render_chat(tokenizer, conversation, generation_prompt=False, where=where)
    turns = [i for i, m in enumerate(conversation) if m.role == "assistant"]
    spans = []
    for n, i in enumerate(turns):
        before = render_chat(tokenizer, conversation[:i], generation_prompt=True, where=where) if i else []
        through = ids if i == len(conversation) - 1 else render_chat(tokenizer, conversation[: i + 1], False, where)
        if ids[: len(before)] != before or ids[: len(through)] != through or len(through) <= len(before):
            raise InputError(
                "the tokenizer's chat template does not render this conversation's turns as "
                "prefixes of the whole, so the assistant's tokens cannot be found",
                **(where or {}),
            )
        start, end = len(before), len(through)
        if eos in ids[start:end]:
            end = ids.index(eos, start) + 1
        elif n == len(turns) - 1:
            ids = ids[:end] + [eos] + ids[end:]
            end += 1
        spans.append((start, end))
    if turns and turns[-1] == len(conversation) - 1:
        ids = ids[: spans[-1][1]]  # nothing after the answer's eos (a template's trailing newline)
    return ids, spans


def encode_documents(tokenizer, texts: list[str], context: int | None) -> list[list[int]]:
    """Pretraining layout: [bos] + tokens(text) + [eos], cut to the context length (None: not cut)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [(bos + list(x) + [tokenizer.eos_token_id])[:context] for x in ids]


def decode_response(tokenizer, ids) -> str:
    """Text of a generated response: stops at the first eos, drops padding."""
    ids = [int(i) for i in ids]
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    ids = [i for i in ids if i != tokenizer.pad_token_id]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists (for generation).  -> ids (B, T), attention_mask (B, T)"""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s) :] = torch.tensor(s)
            mask[i, T - len(s) :] = 1
    return ids, mask


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists (for training).  -> ids (B, T), attention_mask (B, T)"""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, as a transformers fast tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, clean_up_tokenization_spaces=False
    )
    out.chat_template = LAB_CHAT_TEMPLATE
    return out
