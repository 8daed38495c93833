"""Resumable training state, written atomically in safetensors + JSON (never pickle).

A checkpoint is one directory `<out>/checkpoint/` holding, for a set of named modules
and optimizers: `<name>.safetensors` (weights), `<opt>.optim.safetensors` plus
`<opt>.optim.json` (optimizer tensors and hyper-parameters), `rng.safetensors`, and
`state.json` (step, data position, scheduler, KL controller, ... as the stage likes).
The whole directory is staged under a temporary name and renamed into place, so a
kill at any moment leaves the previous complete checkpoint.

With more than one process (`dist`, rlhflab.distributed) the directory holds the sharded
form instead, written by torch.distributed.checkpoint (DCP) through its safetensors
storage: `<name>/` and `<opt>.optim/` hold one safetensors file per rank with the pieces
that rank owns (their offsets in the file's JSON header), `<opt>.optim.json` the
hyper-parameters with parameters named by FQN, `rng.rank<r>.safetensors` each rank's RNG,
and `state.json` (plus the world size). Every rank writes into one temporary directory;
rank 0 renames it into place after a barrier. Loading reshards: a checkpoint written by
N processes resumes on M (M = 1 too), and a 1-process one resumes on M. DCP's default
storage pickles its metadata; the safetensors storage does not, so no checkpoint load
ever unpickles (the ranks exchange their own load plans, pickled, between themselves).
"""

from __future__ import annotations

import contextlib
import json
import random
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from rlhflab.distributed import SINGLE, Dist, tied_names
from rlhflab.errors import InputError
from rlhflab.io import atomic_dir, kill_point, recover_dir

CHECKPOINT = "checkpoint"
STATE = "state.json"


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    out_dir: str | Path,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    state: dict,
    dist: Dist | None = None,
) -> Path:
    """Write `<out_dir>/checkpoint` atomically; `state` must be JSON-serialisable. With
    more than one process (`dist`) every rank calls it and the sharded form is written."""
    path = Path(out_dir) / CHECKPOINT
    if dist is not None and dist.enabled:
        return _save_sharded(path, modules, optimizers, state, dist)
    with atomic_dir(path) as tmp:
        for name, module in modules.items():
            save_model(module, str(tmp / f"{name}.safetensors"))
        kill_point("checkpoint/partial")
        for name, opt in optimizers.items():
            tensors, meta = _optimizer_tensors(opt)
            save_file(tensors, str(tmp / f"{name}.optim.safetensors"))
            (tmp / f"{name}.optim.json").write_text(json.dumps(meta))
        rng = {"torch": torch.get_rng_state()}
        save_file(rng, str(tmp / "rng.safetensors"))
        full = dict(state, python_rng=_py_rng_to_json(random.getstate()))
        (tmp / STATE).write_text(json.dumps(full, indent=1, sort_keys=True))
    return path


def has_checkpoint(out_dir: str | Path, dist: Dist | None = None) -> bool:
    """Whether a complete checkpoint is there (rank 0 looks and repairs; all ranks hear)."""
    if dist is not None and dist.enabled:
        return bool(dist.broadcast(has_checkpoint(out_dir) if dist.is_main else None))
    recover_dir(Path(out_dir) / CHECKPOINT)  # a kill mid-save may have left it aside
    return (Path(out_dir) / CHECKPOINT / STATE).is_file()


def load_checkpoint(
    out_dir: str | Path,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    dist: Dist | None = None,
) -> dict:
    """Restore modules, optimizers and RNG in place; return the stage's `state` dict.
    Either form, on any number of processes (every rank calls it)."""
    path = Path(out_dir) / CHECKPOINT
    sharded = any((path / name).is_dir() for name in modules)
    if sharded or (dist is not None and dist.enabled):
        return _load_resharded(path, modules, optimizers, dist or SINGLE, sharded)
    try:
        state = json.loads((path / STATE).read_text())
        for name, module in modules.items():
            missing, unexpected = load_model(module, str(path / f"{name}.safetensors"), strict=False)
            if unexpected or any(not _is_tied(module, m) for m in missing):
                raise InputError(f"checkpoint does not match the model ({name})", file=str(path))
        for name, opt in optimizers.items():
            meta = json.loads((path / f"{name}.optim.json").read_text())
            _load_optimizer(opt, load_file(str(path / f"{name}.optim.safetensors")), meta)
        torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch"])
    except (OSError, json.JSONDecodeError, SafetensorError, KeyError, ValueError, RuntimeError) as e:
        raise InputError(f"unreadable checkpoint: {str(e).splitlines()[0]}", file=str(path)) from None
    random.setstate(_py_rng_from_json(state.pop("python_rng")))
    return state


def _is_tied(module: torch.nn.Module, key: str) -> bool:
    # save_model drops one name of each shared tensor (e.g. a tied lm_head).
    params = dict(module.named_parameters(remove_duplicate=False))
    target = params.get(key)
    return target is not None and any(p is target for k, p in params.items() if k != key)


def _py_rng_to_json(st) -> list:
    version, internal, gauss = st
    return [version, list(internal), gauss]


def _py_rng_from_json(obj) -> tuple:
    version, internal, gauss = obj
    return (version, tuple(internal), gauss)


# --------------------------------------------------------------------------- sharded (DCP)

_LOAD_ERRORS = (OSError, json.JSONDecodeError, SafetensorError, KeyError, ValueError, RuntimeError)


@contextlib.contextmanager
def _staged(path: Path, dist: Dist):
    """One temporary directory beside `path` for every rank; rank 0 renames it into place
    (io.atomic_dir) once the body, which ends in a barrier, is done on every rank."""
    if dist.is_main:
        with atomic_dir(path) as tmp:
            dist.broadcast(str(tmp))
            yield tmp
    else:
        yield Path(dist.broadcast(None))


def _dcp_save(tensors: dict, where: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(where), save_distributed=True))


def _dcp_load(tensors: dict, where: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    if not where.is_dir():
        raise OSError(f"{where.name}/ is missing")
    alone = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    with warnings.catch_warnings():  # one process reading a sharded checkpoint is meant
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(where)), no_dist=alone)


def _model_tensors(module: torch.nn.Module) -> dict:
    """The module's state dict as DCP sees it (DTensor shards under FSDP), tied names dropped."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    tied = tied_names(module)
    return {k: v for k, v in get_model_state_dict(module).items() if k not in tied}


def _flat_optimizer(osd: dict) -> tuple[dict, dict]:
    """An FQN-keyed optimizer state dict as ({"<fqn>.<key>": tensor}, JSON-able rest)."""
    tensors, scalars = {}, {}
    for fqn, st in osd["state"].items():
        for key, value in st.items():
            (tensors if torch.is_tensor(value) else scalars)[f"{fqn}.{key}"] = value
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars}


def _nested(flat: dict) -> dict:
    state: dict = {}
    for key, value in flat.items():
        fqn, _, name = key.rpartition(".")  # optimizer state keys (exp_avg, step) hold no dot
        state.setdefault(fqn, {})[name] = value
    return state


def _save_sharded(path: Path, modules: dict, optimizers: dict, state: dict, dist: Dist) -> Path:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    container = torch.nn.ModuleDict(modules)  # one FQN space for an optimizer over several modules
    with _staged(path, dist) as tmp:
        for name, module in modules.items():
            _dcp_save(_model_tensors(module), tmp / name)
        kill_point("checkpoint/partial")
        for name, opt in optimizers.items():
            tensors, meta = _flat_optimizer(get_optimizer_state_dict(container, opt))
            _dcp_save(tensors, tmp / f"{name}.optim")
            if dist.is_main:
                (tmp / f"{name}.optim.json").write_text(json.dumps(meta))
        save_file({"torch": torch.get_rng_state()}, str(tmp / f"rng.rank{dist.rank}.safetensors"))
        if dist.is_main:
            full = dict(state, python_rng=_py_rng_to_json(random.getstate()), world_size=dist.world_size)
            (tmp / STATE).write_text(json.dumps(full, indent=1, sort_keys=True))
        dist.barrier()  # every rank's files are in `tmp` before rank 0 renames it
    return path


def _load_resharded(path: Path, modules: dict, optimizers: dict, dist: Dist, sharded: bool) -> dict:
    """Load either form into modules that may be DDP's, FSDP's or plain: DCP reshards the
    sharded form; the 1-process form is read whole on each rank and distributed."""
    from torch.distributed.checkpoint.api import CheckpointException

    container = torch.nn.ModuleDict(modules)
    try:
        state = json.loads((path / STATE).read_text())
        for name, module in modules.items():
            _load_module(module, path, name, sharded)
        for name, opt in optimizers.items():
            _load_optimizer_any(container, opt, path, name, sharded)
        _load_rng(path, dist, int(state.pop("world_size", 1)), sharded)
    except (*_LOAD_ERRORS, CheckpointException) as e:
        raise InputError(f"unreadable checkpoint: {str(e).strip().splitlines()[0]}", file=str(path)) from None
    random.setstate(_py_rng_from_json(state.pop("python_rng")))
    return state


def _load_module(module: torch.nn.Module, path: Path, name: str, sharded: bool) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if sharded:
        sd = _model_tensors(module)
        _dcp_load(sd, path / name)
        result = set_model_state_dict(module, sd, options=StateDictOptions(strict=False))
    else:
        full = load_file(str(path / f"{name}.safetensors"))
        options = StateDictOptions(full_state_dict=True, strict=False)
        result = set_model_state_dict(module, full, options=options)
    if result.unexpected_keys or set(result.missing_keys) - tied_names(module):
        raise InputError(f"checkpoint does not match the model ({name})", file=str(path))


def _load_optimizer_any(container, opt: torch.optim.Optimizer, path: Path, name: str, sharded: bool) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    meta = json.loads((path / f"{name}.optim.json").read_text())
    if sharded:
        tensors, _ = _flat_optimizer(get_optimizer_state_dict(container, opt))  # allocates what to load into
        _dcp_load(tensors, path / f"{name}.optim")
        osd = {"state": _nested({**tensors, **meta["scalars"]}), "param_groups": meta["param_groups"]}
        set_optimizer_state_dict(container, opt, osd)
        return
    # The 1-process form numbers parameters in the optimizer's order (torch's own state_dict).
    fqn = {id(p): n for n, p in container.named_parameters()}
    names = [fqn[id(p)] for group in opt.param_groups for p in group["params"]]
    flat = {**load_file(str(path / f"{name}.optim.safetensors")), **meta["scalars"]}
    state: dict = {}
    for key, value in flat.items():
        idx, key_name = key.split(".", 1)
        state.setdefault(names[int(idx)], {})[key_name] = value
    groups = [dict(g, params=[names[i] for i in g["params"]]) for g in meta["param_groups"]]
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(container, opt, {"state": state, "param_groups": groups}, options=options)


def _load_rng(path: Path, dist: Dist, saved_world: int, sharded: bool) -> None:
    """Each rank's own RNG when the world size is the one that saved it; otherwise rank
    0's, and under more than one process a stream per rank drawn from it (dropout)."""
    own = path / (f"rng.rank{dist.rank}.safetensors" if sharded else "rng.safetensors")
    if saved_world == dist.world_size and own.is_file():
        torch.set_rng_state(load_file(str(own))["torch"])
        return
    first = path / ("rng.rank0.safetensors" if sharded else "rng.safetensors")
    torch.set_rng_state(load_file(str(first))["torch"])
    if dist.enabled:
        torch.manual_seed(int(torch.randint(0, 2**62, (1,))) + dist.rank)
