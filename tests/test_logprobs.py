"""token_logprobs and entropy_from_logits, block by block, against the full-vocabulary formulas."""

from __future__ import annotations

import pytest
import torch

from rlhflab.models import _row_blocks, entropy_from_logits, token_logprobs

CASES = [  # shape, dtype, temperature; the last two span more than one block of rows
    ((3, 5, 50), torch.float32, 1.0),
    ((8, 33, 2048), torch.bfloat16, 0.7),
    ((600, 3, 1000), torch.float32, 1.0),
    ((700, 4096), torch.float32, 2.0),
]


@pytest.mark.parametrize("shape,dtype,temperature", CASES)
def test_logprobs_and_gradient_match_log_softmax(shape, dtype, temperature):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(shape, generator=g) * 3).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    upstream = torch.randn(shape[:-1], generator=g)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    plain = torch.log_softmax(a.float() / temperature, -1).gather(-1, labels[..., None])[..., 0]
    blocked = token_logprobs(b, labels, temperature)
    plain.backward(upstream)
    blocked.backward(upstream)
    assert blocked.dtype == torch.float32 and b.grad.dtype == dtype
    torch.testing.assert_close(blocked, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(b.grad.float(), a.grad.float(), rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-2)
    assert torch.equal(b.detach(), logits)  # the logits are read, never written
    p = torch.softmax(logits.float() / temperature, -1)
    entropy = -(p * torch.log_softmax(logits.float() / temperature, -1)).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits, temperature), entropy, rtol=0, atol=5e-5)


def test_blocks_cover_every_row_once():
    for shape in [(1, 7), (600, 3, 1000), (700, 4096), (0, 5)]:
        x = torch.empty(shape)
        rows = [i for s in _row_blocks(x) for i in range(x.shape[0])[s]]
        assert rows == list(range(shape[0]))
    assert len(_row_blocks(torch.empty(700, 4096))) == 3  # 256 rows of 4096 per 2^20
