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
that renders a one-turn conversation exactly as the string layout. `pack` lays several
responses to one prompt in a row over one copy of it (the section "Packed rows").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rlhflab.device import LOWP_EAGER
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


# --------------------------------------------------------------------------- packed rows
# Packed rows: a prompt's K responses scored over ONE copy of the prompt.
#
#     padded (one row per response)          packed (rows of up to `width` tokens)
#     [prompt A][resp A1] pad pad            [prompt A][A1][A2][A3][prompt B][B1] pad
#     [prompt A][resp A2] pad                [prompt A][A4][A5][prompt C][C1][C2]
#     [prompt A][resp A3] pad pad pad
#     ...
#
# In a packed row a response attends to its own prompt and its own earlier tokens and to
# nothing else (a 4D attention mask), and its positions continue its prompt's, so its
# score is the one it gets alone in a row (up to summation order in the kernels). A group
# too long for one row is split, each piece repeating its prompt. On the lab's rankings
# (K = 4..9 responses of ~13 tokens under a ~16-token prompt) a step of 8 prompts is
# ~1,140 token slots packed against ~2,850 padded (mean of 100 steps; BENCHMARKS.md).
#
# Two users: the reward model's training rows (stages/rm.py: a prompt and its K ranked
# responses) and the capability benchmarks' multiple choice (eval/capability.py: a context
# and its endings, each ending's log-likelihood read where its tokens are predicted:
# `prompt_ends`, `starts`, `cols`).
#
# Only attention implementations that take a custom 4D mask pack (`supports_packing`):
# `eager` and rlhflab's bf16 eager (device.py; an additive float mask) and `sdpa` (a
# boolean one); FlashAttention and flex attention do not, and their callers fall back to
# padded rows.

ADDITIVE_ATTENTION = ("eager", LOWP_EAGER)
PACKABLE_ATTENTION = (*ADDITIVE_ATTENTION, "sdpa")


def supports_packing(model) -> bool:
    """Whether `model`'s attention takes a custom 4D mask (the section comment above)."""
    return getattr(model.config, "_attn_implementation", None) in PACKABLE_ATTENTION


def additive_mask(model) -> bool:
    """Whether `model`'s attention adds its mask to the scores (eager) or takes a boolean
    one (sdpa): the `additive` of `Packed.attention_mask`."""
    return getattr(model.config, "_attn_implementation", None) in ADDITIVE_ATTENTION


@dataclass
class Packed:
    """Sequences packed several to a row; sequence n is read at (rows[n], cols[n])."""

    input_ids: torch.Tensor
    """(B, T) token ids, pad after the last piece of each row."""
    position_ids: torch.Tensor
    """(B, T) each response's positions continue its prompt's (0 at every prompt's start)."""
    group: torch.Tensor
    """(B, T) which prompt piece a token belongs to, −1 on padding."""
    segment: torch.Tensor
    """(B, T) −1 on a prompt's tokens, else the index n of the response the token is in."""
    rows: torch.Tensor
    """(N,) the row of sequence n's last token."""
    cols: torch.Tensor
    """(N,) its column."""
    starts: torch.Tensor
    """(N,) the column of response n's first token (same row)."""
    prompt_ends: torch.Tensor
    """(N,) the column of the last token of response n's prompt (−1: an empty prompt); its
    output predicts the response's first token."""

    def to(self, device) -> Packed:
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})

    def attention_mask(self, additive: bool) -> torch.Tensor:
        """(B, 1, T, T) where token i may attend token j: j ≤ i, same piece, and j in the
        prompt or in i's own response. Every token also attends itself, so no row of the
        softmax is empty (an all-masked row makes NaN in sdpa, and NaN·0 in the backward
        would spread into real tokens). `additive`: 0 / finfo.min in fp32 (what eager
        attention adds to its scores), else boolean (what sdpa takes)."""
        T = self.input_ids.shape[1]
        ar = torch.arange(T, device=self.input_ids.device)
        g, s = self.group, self.segment
        allow = (ar[None, :] <= ar[:, None]) & (g[:, :, None] == g[:, None, :]) & (g[:, None, :] >= 0)
        allow &= (s[:, None, :] == -1) | (s[:, :, None] == s[:, None, :])
        allow |= torch.eye(T, dtype=torch.bool, device=ar.device)
        allow = allow[:, None]  # (B, 1, T, T)
        if not additive:
            return allow
        zeros = torch.zeros(allow.shape, device=ar.device)
        return zeros.masked_fill(~allow, torch.finfo(torch.float32).min)


def pack(groups: list[tuple[list[int], list[list[int]]]], pad_id: int, width: int = 0) -> Packed:
    """Pack (prompt ids, [response ids, ...]) groups into rows of at most `width` tokens
    (0: twice the longest prompt + response).

    Sequence n is the n-th response in the order given (groups flattened). A group is cut
    into pieces of prompt + as many of its responses as fit in `width` (at least one: a
    longer pair gets a row of its own, as wide as it needs); pieces go into rows first-fit,
    longest first. Every response must have at least one token (rlhflab's end with eos).
    """
    width = width or 2 * max((len(p) + len(r) for p, rs in groups for r in rs), default=1)
    pieces, n = [], 0  # (prompt, [(response, n), ...]) each within width where it can be
    for prompt, responses in groups:
        cur, size = [], len(prompt)
        for r in responses:
            if not r:
                raise ValueError(f"response {n} is empty: a packed sequence is read at its last token")
            if cur and size + len(r) > width:
                pieces.append((prompt, cur))
                cur, size = [], len(prompt)
            cur.append((r, n))
            size += len(r)
            n += 1
        if cur:
            pieces.append((prompt, cur))
    lengths = [len(p) + sum(len(r) for r, _ in rs) for p, rs in pieces]
    cap = max([width, *lengths])
    rows: list[list[int]] = []  # piece indices per row
    used: list[int] = []
    for i in sorted(range(len(pieces)), key=lambda i: -lengths[i]):
        for b in range(len(rows)):
            if used[b] + lengths[i] <= cap:
                rows[b].append(i)
                used[b] += lengths[i]
                break
        else:
            rows.append([i])
            used.append(lengths[i])
    B, T = len(rows), max(used)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    group = torch.full((B, T), -1, dtype=torch.long)
    segment = torch.full((B, T), -1, dtype=torch.long)
    at_row, at_col, start, prompt_end = (torch.zeros(n, dtype=torch.long) for _ in range(4))
    for b, row in enumerate(rows):
        t = 0
        for i in row:
            prompt, responses = pieces[i]
            L = len(prompt)
            last_of_prompt = t + L - 1 if L else -1
            ids[b, t : t + L] = torch.tensor(prompt, dtype=torch.long)
            pos[b, t : t + L] = torch.arange(L)
            group[b, t : t + L] = i
            t += L
            for r, k in responses:
                ids[b, t : t + len(r)] = torch.tensor(r, dtype=torch.long)
                pos[b, t : t + len(r)] = torch.arange(L, L + len(r))
                group[b, t : t + len(r)] = i
                segment[b, t : t + len(r)] = k
                t += len(r)
                at_row[k], at_col[k], start[k], prompt_end[k] = b, t - 1, t - len(r), last_of_prompt
    return Packed(ids, pos, group, segment, at_row, at_col, start, prompt_end)
