"""Fitting a 1-8B policy with its reference, reward and value models on one GPU.

Two memory savers, both off by default:

- activation (gradient) checkpointing, `train.gradient_checkpointing` in every training
  stage: each transformer block keeps only its input and recomputes the rest in the
  backward (transformers' own, non-reentrant);
- LoRA adapters (Hu et al. 2021) for PPO, through peft, an optional extra (`pip install
  'rlhflab[lora]'`, imported only inside the functions that use it): the policy and the
  value model train low-rank adapters over frozen weights, and π_SFT is the policy's own
  base with its adapters off (`Reference`), so the reference costs no memory at all.

peft injects its layers into the model in place: the model PPO trains keeps its class,
its forward (`logits_to_keep`, the KV cache) and its config; `LoRA` holds peft's
wrappers, needed only to switch the adapters off, save them and merge them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhflab.errors import InputError
from rlhflab.models import keep_last

PEFT_MISSING = "needs peft: pip install 'rlhflab[lora]'"

# --------------------------------------------------------------------------- checkpointing


def checkpoint_activations(model, eval_mode: bool = False) -> None:
    """Turn on transformers' activation checkpointing in every block of `model`.

    Non-reentrant (torch.utils.checkpoint with use_reentrant=False): no input needs
    requires_grad (a LoRA model's embeddings are frozen), and the RNG is replayed, so a
    recomputed dropout draws the same mask. transformers checkpoints a block only in train
    mode; `eval_mode` is for a model that trains in eval mode (PPO: dropout off): each
    block then flags itself training exactly when it runs with gradients, while the model
    and every other module stay in eval mode (GPT-2 would otherwise drop its KV cache in
    sampling), and any dropout a block applies by its own flag is set to 0.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not getattr(model, "supports_gradient_checkpointing", False) or not layers:
        raise InputError(
            f"{type(model).__name__} does not support gradient checkpointing", field="train.gradient_checkpointing"
        )
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if eval_mode:
        _zero_dropout(model)
        for layer in layers:  # a pre-hook runs before the check; the recompute calls forward itself
            layer.register_forward_pre_hook(_training_when_grad)


def _training_when_grad(layer: torch.nn.Module, args) -> None:
    layer.training = torch.is_grad_enabled()


def _zero_dropout(model: torch.nn.Module) -> None:
    """Every dropout of `model` to p = 0: the nn.Dropout modules, and the float attributes
    layers read with their own training flag (OPT's `dropout`, Llama's `attention_dropout`)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


# --------------------------------------------------------------------------- LoRA


@dataclass
class LoRA:
    """peft's wrappers of the two models PPO trains as adapters; each wraps, in place, the
    very module the run trains (`wrapper.get_base_model() is run.policy`)."""

    policy: Any  # peft.PeftModelForCausalLM
    value: Any  # peft.PeftModelForSequenceClassification, its scalar head trained whole


def add_lora(policy, value_model, r: int, alpha: float, target_modules: str | list[str]) -> LoRA:
    """LoRA adapters of rank r on the policy and the value model, in place; everything else
    frozen except the value model's scalar head (`score`), which starts from the RM's and
    trains whole: a value function needs its own output scale, and it is one row.

    No adapter dropout: PPO trains with dropout off. B starts at 0, so both models start
    out computing exactly what they did.
    """
    try:
        import peft
    except ImportError:
        raise InputError(f"lora_r {PEFT_MISSING}", field="lora_r") from None

    def config(task: str, modules_to_save: list[str] | None):
        targets = list(target_modules) if isinstance(target_modules, list) else target_modules
        return peft.LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=0.0,
            target_modules=targets,
            task_type=task,
            modules_to_save=modules_to_save,
        )

    with warnings.catch_warnings():
        # GPT-2's Conv1D layers: peft switches to their (in, out) layout itself and says so.
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        try:
            return LoRA(
                peft.get_peft_model(policy, config("CAUSAL_LM", None)),
                peft.get_peft_model(value_model, config("SEQ_CLS", ["score"])),
            )
        except ValueError as e:  # e.g. a target module name the model does not have
            raise InputError(f"LoRA: {str(e).splitlines()[0]}", field="lora_target_modules") from None


class Reference(torch.nn.Module):
    """π_SFT for a LoRA policy: the policy's forward with its adapters off (peft's
    `disable_adapter`). It holds no weights: its parameters are the policy's base weights,
    the very same tensors, and the policy is not registered as its submodule, so moving,
    freezing or switching the mode of the reference leaves the policy as it is."""

    def __init__(self, peft_policy):
        super().__init__()
        self.__dict__["peft"] = peft_policy  # not a submodule (see above)

    @property
    def config(self):
        return self.peft.get_base_model().config

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for name, p in self.peft.get_base_model().named_parameters(prefix=prefix, remove_duplicate=remove_duplicate):
            if "lora_" not in name:
                yield name, p

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=0):
        model = self.peft.get_base_model()
        with self.peft.disable_adapter():
            return model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                **keep_last(model, logits_to_keep),
            )


def trainable(model: torch.nn.Module) -> torch.nn.Module:
    """The trainable parameters of `model` as a module of their own, the same tensors: what a
    LoRA run's checkpoint holds (its frozen base is the model directory it was loaded from).
    Loading a checkpoint into it writes into the model's own parameters."""
    view = torch.nn.Module()
    for name, p in model.named_parameters():
        if p.requires_grad:
            view.register_parameter(name.replace(".", "/"), p)
    return view


def save_adapter(peft_model, path: str | Path) -> None:
    """The adapter in peft's format (adapter_config.json + adapter_model.safetensors):
    `peft.PeftModel.from_pretrained(base, path)` rebuilds the trained model from its base."""
    peft_model.save_pretrained(str(path))


def merge(lora: LoRA) -> None:
    """Fold each adapter into its layer's weight (W + (α/r)·B·A) and drop the adapters, in
    place: the trained models become plain transformers models that load without peft.
    Where the run ends: their base weights are the merged ones from here on."""
    for peft_model in (lora.policy, lora.value):
        peft_model.merge_and_unload()
