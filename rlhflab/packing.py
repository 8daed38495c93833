"""Shared-prompt packing: a prompt's K responses scored over ONE copy of the prompt.

    padded (one row per response)          packed (rows of up to `width` tokens)
    [prompt A][resp A1] pad pad            [prompt A][A1][A2][A3][prompt B][B1] pad
    [prompt A][resp A2] pad                [prompt A][A4][A5][prompt C][C1][C2]
    [prompt A][resp A3] pad pad pad
    ...

In a packed row a response attends to its own prompt and its own earlier tokens and to
nothing else (a 4D attention mask), and its positions continue its prompt's, so its
score is the one it gets alone in a row (up to summation order in the kernels). A group
too long for one row is split, each piece repeating its prompt. On the lab's rankings
(K = 4..9 responses of ~13 tokens under a ~16-token prompt) a step of 8 prompts is
~1,100 token slots packed against ~2,600 padded (BENCHMARKS.md).

Two users: the reward model's training rows (stages/rm.py: a prompt and its K ranked
responses) and the capability benchmarks' multiple choice (eval/capability.py: a context
and its endings, each ending's log-likelihood read where its tokens are predicted:
`prompt_ends`, `starts`, `cols`).

Only attention implementations that take a custom 4D mask pack (`supports_packing`):
`eager` (an additive float mask) and `sdpa` (a boolean one); FlashAttention and flex
attention do not, and their callers fall back to padded rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

PACKABLE_ATTENTION = ("eager", "sdpa")


def supports_packing(model) -> bool:
    """Whether `model`'s attention takes a custom 4D mask (see the module docstring)."""
    return getattr(model.config, "_attn_implementation", None) in PACKABLE_ATTENTION


def additive_mask(model) -> bool:
    """Whether `model`'s attention adds its mask to the scores (eager) or takes a boolean
    one (sdpa): the `additive` of `Packed.attention_mask`."""
    return getattr(model.config, "_attn_implementation", None) == "eager"


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


def pack(groups: list[tuple[list[int], list[list[int]]]], pad_id: int, width: int) -> Packed:
    """Pack (prompt ids, [response ids, ...]) groups into rows of at most `width` tokens.

    Sequence n is the n-th response in the order given (groups flattened). A group is cut
    into pieces of prompt + as many of its responses as fit in `width` (at least one: a
    longer pair gets a row of its own, as wide as it needs); pieces go into rows first-fit,
    longest first. Every response must have at least one token (rlhflab's end with eos).
    """
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
