"""More than one process under `torchrun`: the process group, DDP or FSDP2, and the
collectives a training loop needs. PyTorch's own engine only (torch.distributed, DDP,
`fully_shard`, torch.distributed.checkpoint); nothing here talks over sockets itself.

    torchrun --nproc_per_node 8 -m rlhflab sft ...                    # one node, 8 GPUs (nccl)
    torchrun --nproc_per_node 2 -m rlhflab sft --run.device cpu ...   # the CPU check (gloo)

A run's maths does not change with the number of processes. `batch_size` is the GLOBAL
batch: every rank computes the same global index list and takes its slice of it
(`Dist.share`), and scales its per-example (or per-token) mean loss by the share of the
batch it holds, so that the gradient DDP or FSDP averages over ranks is the gradient of
the 1-process step on the whole batch. Metrics are all-reduced, so every rank holds the
same numbers and takes the same decisions (the NaN guard, the epoch choice); only rank 0
writes files.

Without torchrun's environment (or with WORLD_SIZE=1) `setup` returns a single-process
`Dist` whose collectives are identities: nothing here changes a 1-process run.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as tdist

from rlhflab.config import PARALLEL
from rlhflab.errors import InputError

TIMEOUT_ENV = "RLHFLAB_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0
"""How long a collective waits for the other ranks before it raises (torch's own default
for gloo and nccl): a rank that hangs makes the others fail instead of waiting forever.
RLHFLAB_DIST_TIMEOUT_S overrides it (a long rank-0-only save of a very large model)."""

DUMP_ENV = "RLHFLAB_TEST_DUMP_DIR"


@dataclass(frozen=True)
class Dist:
    """Where this process stands among the job's processes, and the collectives over them.
    World size 1: every collective returns its input."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and shows progress."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------------ batches

    def shard(self, items):
        """This rank's contiguous slice of a global list (or a tensor's first dimension):
        sizes differ by at most one, and a rank may get none (a batch smaller than the world)."""
        n = len(items)
        return items[n * self.rank // self.world_size : n * (self.rank + 1) // self.world_size]

    def share(self, batch, weight: Callable[[object], float] = len) -> tuple[object, float]:
        """(this rank's part of a global batch, the factor on its mean loss).

        A rank's loss is a mean over the n_r examples or tokens (`weight`) of its part; DDP
        and FSDP average gradients over the W ranks; so scaling each rank's mean by
        n_r·W / N (N = Σ n_r) makes that average the gradient of the mean over the whole
        batch, the 1-process step. A rank left without examples gets the batch's first one
        weighted 0: every rank must run the forward and backward, whose collectives the
        others wait on.
        """
        if not self.enabled:
            return batch, 1.0
        part = self.shard(batch)
        n = float(weight(part)) if len(part) else 0.0
        total = self.sum(n)
        if not len(part):
            part = batch[:1]
        return part, n * self.world_size / total if total > 0 else 0.0

    def step_metrics(self, loss: torch.Tensor, stats: dict, scale: float) -> tuple[float, dict]:
        """The whole batch's loss and stats from every rank's (`share`'s `scale` each).

        The loss and a plain stat: the mean weighted by each rank's share of the batch. A
        stat given as (numerator, denominator): Σ numerators / Σ denominators (the RM's
        accuracy: pairs ordered right over pairs). One all-reduce for all of them.
        """
        keys = sorted(stats)
        if not self.enabled:
            return float(loss), {k: _ratio(stats[k]) for k in keys}
        live = 1.0 if scale > 0 else 0.0  # a stand-in example (scale 0) counts nowhere
        values = [float(loss) * scale]
        for k in keys:
            v = stats[k]
            values += [v[0] * live, v[1] * live] if isinstance(v, tuple) else [float(v) * scale, 0.0]
        total = self.sum(values)
        out = {}
        for i, k in enumerate(keys):
            num, den = total[1 + 2 * i], total[2 + 2 * i]
            out[k] = _ratio((num, den)) if isinstance(stats[k], tuple) else num / self.world_size
        return total[0] / self.world_size, out

    def map_shards(self, fn: Callable[[list], list], items: Sequence) -> list:
        """`fn` over this rank's block of `items`, every rank's results gathered in order
        on every rank: fn(part) returns one result per item of `part`.

        Each rank's block is padded to the same length (repeating an item whose result is
        dropped), so that an `fn` whose number of forwards depends only on the length of
        its input (fixed-size batches) runs as many forwards on every rank: FSDP's
        all-gathers need every rank in each one.
        """
        items = list(items)
        if not self.enabled or not items:
            return list(fn(items))
        k = math.ceil(len(items) / self.world_size)
        part = items[self.rank * k : (self.rank + 1) * k]
        real = len(part)
        part += [items[-1]] * (k - real)
        mine = list(fn(part))[:real]
        gathered: list = [None] * self.world_size
        tdist.all_gather_object(gathered, mine)  # results of this process's own computation
        return [r for rank_results in gathered for r in rank_results]

    # ------------------------------------------------------------------ collectives

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """`tensor` summed ('sum') or averaged ('mean') over ranks, in place; returned."""
        if op not in ("sum", "mean"):
            raise ValueError(f"op must be sum or mean, not {op!r}")
        if self.enabled:
            tdist.all_reduce(tensor)
            if op == "mean":
                tensor /= self.world_size
        return tensor

    def sum(self, value):
        """A float, a list of floats or a {key: float} dict, summed over ranks (in float64)."""
        return self._reduce(value, "sum")

    def mean(self, value):
        """As `sum`, averaged over ranks (each rank weighs the same)."""
        return self._reduce(value, "mean")

    def max(self, value: int) -> int:
        """The largest of the ranks' integers (e.g. how many micro-batches to run)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return int(t.item())

    def all_true(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank: one decision for all (the NaN guard)."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
        return bool(t.item())

    def moments(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, float, float]:
        """(mean, variance, count) of `values` (where `mask` is true) over every rank's:
        the statistics of a whitening over the whole batch (PPO's advantages), not a shard."""
        v = values.detach().double()
        m = torch.ones_like(v) if mask is None else mask.to(v.dtype)
        s, s2, n = self.sum([float((v * m).sum()), float((v * v * m).sum()), float(m.sum())])
        mean = s / max(n, 1.0)
        return mean, max(s2 / max(n, 1.0) - mean * mean, 0.0), n

    def broadcast(self, obj=None):
        """Rank 0's `obj` on every rank (a small picklable object: a metrics record, a path).
        Pickle between this job's own processes only; never data read from a file."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def teardown(self) -> None:
        """Leave the process group (`destroy_process_group`); a no-op in one process."""
        teardown()

    def _reduce(self, value, op: str):
        if not self.enabled:
            return value
        if isinstance(value, dict):
            keys = sorted(value)
            return dict(zip(keys, self._reduce([float(value[k]) for k in keys], op)))
        if isinstance(value, (list, tuple)):
            t = torch.tensor([float(v) for v in value], dtype=torch.float64, device=self.device)
            return self.all_reduce(t, op).tolist()
        return self._reduce([value], op)[0]


SINGLE = Dist()
"""The single-process Dist (no torchrun): what a stage gets without one."""


def _ratio(stat) -> float:
    if isinstance(stat, tuple):
        num, den = stat
        return float(num) / float(den) if den else 0.0
    return stat


# --------------------------------------------------------------------------- setup


def setup(device: torch.device, timeout_s: float | None = None) -> Dist:
    """This process's `Dist`, from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK;
    MASTER_ADDR and MASTER_PORT for the rendezvous). Without it (or WORLD_SIZE=1): a
    single-process Dist on `device` (training.resolve_device of run.device). Otherwise the
    process group: nccl on cuda:LOCAL_RANK when `device` is a GPU, gloo on the CPU; every
    collective raises after `timeout_s` (default DEFAULT_TIMEOUT_S, or the environment's
    RLHFLAB_DIST_TIMEOUT_S) instead of waiting forever for a rank that hangs. Called
    again in the same process, it joins the group already there."""
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process: LOCAL_RANK's
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise InputError(f"more than one process runs on cuda or cpu, not {device.type}", field="run.device")
    if not tdist.is_initialized():
        if timeout_s is None:
            timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        tdist.init_process_group(
            backend,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if backend == "nccl" else None,
        )
        atexit.register(teardown)
    return Dist(rank, world, local_rank, device)


def is_main_process() -> bool:
    """Rank 0 of the job, or the only process (who prints a stage's closing line)."""
    return not (tdist.is_available() and tdist.is_initialized()) or tdist.get_rank() == 0


def teardown() -> None:
    """`destroy_process_group` if one is open (idempotent; also run at exit)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def finish() -> None:
    """The end of a command that succeeded under torchrun: every rank waits for the others
    (a barrier), then leaves the group while the interpreter is whole. A rank that leaves
    on its own at exit, its peer still in a collective or gloo's threads still holding
    work, can abort there ("terminate called without an active exception")."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


# --------------------------------------------------------------------------- wrapping


def resolve_parallel(parallel: str, dist: Dist) -> str:
    """'none' in one process; else 'ddp' or 'fsdp' ('auto' is DDP)."""
    if parallel not in PARALLEL:
        raise InputError(f"train.parallel must be one of {list(PARALLEL)}, not {parallel!r}", field="train.parallel")
    if not dist.enabled:
        return "none"
    return "ddp" if parallel == "auto" else parallel


class Forward(torch.nn.Module):
    """`module` with `fn(module, *args)` as its forward: code that calls a model's parts
    (rlhflab's `reward_scores` calls `model.base_model` and `model.score`) must still go
    through the root forward of DDP (which sets up the gradient all-reduce) and of FSDP
    (which all-gathers the root's own parameters: embeddings, final norm, head)."""

    def __init__(self, module: torch.nn.Module, fn: Callable):
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, *args, **kwargs):
        out = self.fn(self.module, *args, **kwargs)
        # FSDP hooks the backward on the output; an in-place op on a view would drop the hook.
        return out.clone() if torch.is_tensor(out) and out._is_view() else out


def wrap(model: torch.nn.Module, parallel: str, dist: Dist, forward: Callable | None = None) -> torch.nn.Module:
    """The module to train through: `model` itself in one process; DDP(model) (CPU:
    device_ids=None); or FSDP2: `fully_shard` on each transformer block, then on the
    root, which shards `model`'s parameters in place (they become DTensors, and every
    forward of `model` is then a collective: every rank must run it).

    `forward`: train through `fn(model, *args)` instead of `model(...)` (see `Forward`):
    wrap(rm, "ddp", dist, forward=reward_scores)(ids, mask) is reward_scores(rm, ids, mask).
    Keep `model` for everything else: optimizer, state dicts, evaluation (under DDP its
    forwards are local; under FSDP they are collectives either way).
    """
    mode = resolve_parallel(parallel, dist)
    root = model if forward is None else Forward(model, forward)
    if mode == "none":
        return root
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [dist.device.index] if dist.device.type == "cuda" else None
        # No buffer broadcast before each forward: rlhflab's models train none (RoPE's are constants).
        return DistributedDataParallel(root, device_ids=ids, forward_sync_buffers=False)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(root, mesh=mesh)
    return root


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformer, found generically: the `nn.ModuleList` of
    same-typed modules holding the most parameters (GPT-2's transformer.h, Llama's
    model.layers, GPT-NeoX's gpt_neox.layers, under a peft wrapper too)."""
    best, best_n = [], 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            n = sum(p.numel() for p in module.parameters())
            if n > best_n:
                best, best_n = list(module), n
    return best


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a DDP wrapper and a `Forward` adapter (FSDP shards in place)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model = model.module
    return model.module if isinstance(model, Forward) else model


@contextlib.contextmanager
def no_sync(model: torch.nn.Module, active: bool = True):
    """Accumulate this backward's gradients without reducing them over ranks (all but the
    last micro-batch of a step): DDP's `no_sync`, FSDP's `set_requires_gradient_sync`."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if active and isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif active and isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model`'s parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (the tensor itself otherwise): for checks that must
    not turn into collectives (a NaN scan that stops early on one rank would hang)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def tied_names(module: torch.nn.Module) -> set[str]:
    """Parameter names that share another's tensor (a tied lm_head): a state dict keeps one."""
    every = dict(module.named_parameters(remove_duplicate=False))
    return set(every) - set(dict(module.named_parameters()))


# --------------------------------------------------------------------------- full weights


def full_state_dict(model: torch.nn.Module, dist: Dist) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights on rank 0, on the CPU; {} on the other ranks. Under
    FSDP a collective (every rank must call it); tied duplicates dropped."""
    model = unwrap(model)
    tied = tied_names(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif dist.is_main:
        sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    else:
        sd = {}
    return {k: v.contiguous() for k, v in sd.items() if k not in tied} if dist.is_main else {}


def save_weights(model: torch.nn.Module, path, dist: Dist) -> None:
    """`path` (a .safetensors file) with the full weights, written by rank 0 (a collective
    under FSDP). `safetensors.torch.load_model(plain, path, strict=False)` reads it back."""
    from safetensors.torch import save_file

    sd = full_state_dict(model, dist)
    if dist.is_main:
        save_file(sd, str(path))


def full_model(model: torch.nn.Module, dist: Dist) -> torch.nn.Module | None:
    """A plain module with the full weights, on rank 0 (None on the others), for what only
    rank 0 does at the end: folding a bias in, `save_pretrained`. One process or DDP: the
    model itself. FSDP (a collective): a CPU copy of the model's class, built on the meta
    device and given the gathered weights and the model's buffers (a Hugging Face model:
    it is rebuilt from `model.config`)."""
    model = unwrap(model)
    if not is_sharded(model):
        return model if dist.is_main else None
    from torch.distributed.fsdp import FSDPModule

    sd = full_state_dict(model, dist)
    if not dist.is_main:
        return None
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = cls(model.config)
    missing, unexpected = plain.load_state_dict(sd, strict=False, assign=True)
    for name, buf in model.named_buffers():  # not in a state dict when non-persistent (RoPE)
        owner, _, leaf = name.rpartition(".")
        plain.get_submodule(owner)._buffers[leaf] = buf.detach().cpu().clone()
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()
    left = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if unexpected or left or set(missing) - tied_names(plain):
        raise RuntimeError(f"gathered weights do not fill {cls.__name__}: missing {left or missing}")
    return plain


def dump_point(model: torch.nn.Module, dist: Dist) -> None:
    """Test hook (tests/test_distributed.py): with RLHFLAB_TEST_DUMP_DIR set, each rank
    writes the parameters it holds (its shards under FSDP) to <dir>/rank<r>.safetensors."""
    where = os.environ.get(DUMP_ENV)
    if not where:
        return
    from safetensors.torch import save_file

    os.makedirs(where, exist_ok=True)
    params = {n: local(p).detach().cpu().contiguous() for n, p in unwrap(model).named_parameters()}
    save_file(params, os.path.join(where, f"rank{dist.rank}.safetensors"))
