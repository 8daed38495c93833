"""Tiny chat models of eight architectures, each with a tokenizer and a chat template of
its own, built from config (no download): the shapes and templates users bring.

    path = chat_model_dir(tmp_path / "qwen2", "qwen2")
The directory holds a `save_pretrained` causal LM and its tokenizer (chat template saved
with it). Templates are short versions of the real ones: the same special tokens, the same
turn layout, the same generation prompt, and where the real tokenizer's eos closes each
assistant turn (Llama 3, Qwen2, Mistral, OPT) or does not (GPT-2, GPT-NeoX, Gemma, Phi-3).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tiny import WORDS

SYSTEM_FIRST = (
    "{% set ns = namespace(sys='') %}{% if messages[0]['role'] == 'system' %}"
    "{% set ns.sys = messages[0]['content'] + '\\n\\n' %}{% set messages = messages[1:] %}{% endif %}"
)
"""Jinja prelude of templates that fold the system message into the first user turn."""

# name: (config class, its size keys, special tokens {role: token}, chat template)
ARCHS = {
    "gpt2": dict(
        config="GPT2Config",
        size=dict(n_layer=2, n_embd=32, n_head=4, n_positions=256),
        special=dict(bos="<|endoftext|>", eos="<|endoftext|>"),  # no pad: rlhflab reuses eos
        template=(
            "{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
            "{% elif m['role'] == 'system' %}{{ m['content'] }}\n"
            "{% else %}Assistant: {{ m['content'] }}\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}Assistant:{% endif %}"
        ),
    ),
    "llama": dict(
        config="LlamaConfig",
        size=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        ),
        special=dict(bos="<|begin_of_text|>", eos="<|eot_id|>", extra=["<|start_header_id|>", "<|end_header_id|>"]),
        template=(
            "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
        ),
    ),
    "qwen2": dict(
        config="Qwen2Config",
        size=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        ),
        special=dict(eos="<|im_end|>", pad="<|endoftext|>", extra=["<|im_start|>"]),  # no bos
        template=(
            "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
    ),
    "mistral": dict(
        config="MistralConfig",
        size=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        ),
        special=dict(bos="<s>", eos="</s>", extra=["[INST]", "[/INST]"]),
        template=SYSTEM_FIRST
        + (
            "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
            "[INST] {% if loop.first %}{{ ns.sys }}{% endif %}{{ m['content'] }} [/INST]"
            "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
        ),
    ),
    "gpt_neox": dict(
        config="GPTNeoXConfig",
        size=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        special=dict(bos="<|endoftext|>", eos="<|endoftext|>", pad="<|padding|>", extra=["<|user|>", "<|assistant|>"]),
        template=(
            "{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>\n{{ m['content'] }}\n"
            "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
        ),
    ),
    "opt": dict(
        config="OPTConfig",
        size=dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32),
        special=dict(bos="</s>", eos="</s>", pad="<pad>"),  # OPT: bos and eos are one token
        template=(
            "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}### Assistant: "
            "{{ m['content'] }}{{ eos_token }}\n{% else %}### {{ m['role'] | capitalize }}: {{ m['content'] }}\n"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}### Assistant:{% endif %}"
        ),
    ),
    "gemma": dict(
        config="GemmaConfig",
        size=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
        ),
        special=dict(bos="<bos>", eos="<eos>", pad="<pad>", extra=["<start_of_turn>", "<end_of_turn>"]),
        template=SYSTEM_FIRST
        + (
            "{{ bos_token }}{% for m in messages %}<start_of_turn>"
            "{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
            "{% if loop.first %}{{ ns.sys }}{% endif %}{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
            "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
        ),
    ),
    "phi3": dict(
        config="Phi3Config",
        size=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        ),
        special=dict(bos="<s>", eos="<|endoftext|>", extra=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
        template=(
            "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
        ),
    ),
}

_TOKENIZERS: dict[str, PreTrainedTokenizerFast] = {}


def chat_tokenizer(arch: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE with `arch`'s special tokens and chat template; cached per arch."""
    if arch not in _TOKENIZERS:
        spec = ARCHS[arch]["special"]
        names = [spec[k] for k in ("pad", "bos", "eos") if k in spec]
        specials = list(dict.fromkeys(names + spec.get("extra", [])))
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=360,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        text = WORDS + " User Assistant system user assistant model Human You are a helpful"
        tok.train_from_iterator([text] * 4, trainer=trainer)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token=spec.get("bos"),
            eos_token=spec["eos"],
            pad_token=spec.get("pad"),
            clean_up_tokenization_spaces=False,
        )
        fast.chat_template = ARCHS[arch]["template"]
        _TOKENIZERS[arch] = fast
    return _TOKENIZERS[arch]


def chat_model_dir(path: Path, arch: str, seed: int = 0, max_positions: int = 256) -> Path:
    """A tiny causal LM of `arch` and its chat tokenizer, saved to `path`."""
    tok = chat_tokenizer(arch)
    spec = ARCHS[arch]
    cls = getattr(transformers, spec["config"])
    size = dict(spec["size"])
    if "n_positions" not in size:
        size["max_position_embeddings"] = max_positions
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = cls(vocab_size=len(tok), tie_word_embeddings=False, **ids, **size)
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)
