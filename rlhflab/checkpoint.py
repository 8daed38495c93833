"""Resumable training state, written atomically in safetensors + JSON (never pickle).

A checkpoint is one directory `<out>/checkpoint/` holding, for a set of named modules
and optimizers: `<name>.safetensors` (weights), `<opt>.optim.safetensors` plus
`<opt>.optim.json` (optimizer tensors and hyper-parameters), `rng.safetensors`, and
`state.json` (step, data position, scheduler, KL controller, ... as the stage likes).
The whole directory is staged under a temporary name and renamed into place, so a
kill at any moment leaves the previous complete checkpoint.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

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
) -> Path:
    """Write `<out_dir>/checkpoint` atomically; `state` must be JSON-serialisable."""
    path = Path(out_dir) / CHECKPOINT
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


def has_checkpoint(out_dir: str | Path) -> bool:
    recover_dir(Path(out_dir) / CHECKPOINT)  # a kill mid-save may have left it aside
    return (Path(out_dir) / CHECKPOINT / STATE).is_file()


def load_checkpoint(
    out_dir: str | Path, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer]
) -> dict:
    """Restore modules, optimizers and RNG in place; return the stage's `state` dict."""
    path = Path(out_dir) / CHECKPOINT
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
