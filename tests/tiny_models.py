"""Tiny random causal LMs and a matching tokenizer, built offline in about a second.

Tests need real Hugging Face model folders (``config.json`` + weights + tokenizer files) that
``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` and verl can load, but no model hub is
reachable. These helpers write such folders from scratch:

* :func:`build_tiny_tokenizer` - a byte-level tokenizer built with the ``tokenizers`` library: every
  byte is one token (so any text round-trips and digits are split one per token), plus ChatML
  special tokens and a ChatML chat template. No merges, so it needs no training corpus.
* :func:`build_tiny_model` - a randomly initialised Qwen2 or Llama model (2 layers, hidden 64 by
  default) saved next to that tokenizer, seeded for reproducibility.

Both are deterministic for a given seed and safe to call again on an existing folder (files are
overwritten).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# ChatML, the format of Qwen2 and SmolLM2 instruct models; bos/eos/pad follow SmolLM2.
PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Special tokens get ids 0..2, the 256 byte tokens follow.
TOKENIZER_SIZE = len(SPECIAL_TOKENS) + 256

_ARCHS = ("qwen2", "llama")


def build_tiny_tokenizer(directory: str | Path):
    """Write a byte-level ChatML tokenizer to ``directory`` and return it.

    Token ids: ``<|endoftext|>`` = 0 (pad), ``<|im_start|>`` = 1 (bos), ``<|im_end|>`` = 2 (eos),
    then one token per byte value (259 tokens in all, see ``TOKENIZER_SIZE``). No BOS is added when
    encoding, like Qwen2 / SmolLM2. The saved folder loads with ``AutoTokenizer.from_pretrained``.

    Returns:
        The ``PreTrainedTokenizerFast`` that was saved.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    # ByteLevel maps every byte to a printable unicode character; its alphabet is the whole vocab.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(alphabet)})
    assert len(vocab) == TOKENIZER_SIZE

    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    # use_regex=False: without merges the regex split only costs time, every byte is a token anyway.
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def _model_config(arch: str, vocab_size: int, num_layers: int, hidden: int, tokenizer, tie: bool):
    """Return a small transformers config for ``arch`` with ids taken from ``tokenizer``."""
    from transformers import LlamaConfig, Qwen2Config

    num_heads = max(1, hidden // 16)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        # grouped-query attention, as in the real models, whenever the head count allows it
        num_key_value_heads=num_heads // 2 if num_heads % 2 == 0 else num_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    if arch == "qwen2":
        return Qwen2Config(**common)
    return LlamaConfig(**common)


def build_tiny_model(
    directory: str | Path,
    *,
    arch: str = "qwen2",
    vocab_size: int | None = None,
    num_layers: int = 2,
    hidden: int = 64,
    seed: int = 0,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a random tiny causal LM plus the tiny tokenizer to ``directory``.

    Args:
        directory: output folder (created if missing).
        arch: ``"qwen2"`` (Qwen2ForCausalLM) or ``"llama"`` (LlamaForCausalLM).
        vocab_size: rows of the embedding / output head. Defaults to the tokenizer size (259). A
            larger value mimics a padded vocabulary (ids the tokenizer never produces); a smaller
            one is rejected because the tokenizer's ids would not fit.
        num_layers: decoder layers.
        hidden: hidden size; heads of 16 dims each, intermediate size ``2 * hidden``.
        seed: seeds the weight initialisation, so the same arguments give the same weights.
        tie_word_embeddings: share the input embedding and the output head. Off by default: a
            random model with tied embeddings greedily repeats its last input token forever,
            which makes generation tests pass vacuously. Untied, greedy outputs vary and the
            next-token distribution is close to uniform.

    Returns:
        ``directory`` as a :class:`~pathlib.Path`. The weights are float32 safetensors, the
        model uses ChatML (eos = ``<|im_end|>``).
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {_ARCHS}, got {arch!r}")
    if hidden % 16 != 0:
        raise ValueError(f"hidden must be a multiple of 16 (head dim), got {hidden}")
    vocab_size = TOKENIZER_SIZE if vocab_size is None else vocab_size
    if vocab_size < TOKENIZER_SIZE:
        raise ValueError(f"vocab_size must be >= the tokenizer size {TOKENIZER_SIZE}, got {vocab_size}")

    directory = Path(directory)
    tokenizer = build_tiny_tokenizer(directory)
    config = _model_config(arch, vocab_size, num_layers, hidden, tokenizer, tie_word_embeddings)

    # Seed a private generator state so callers' global RNG streams are left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(str(directory))
    _record_provenance(
        directory,
        arch=arch,
        vocab_size=vocab_size,
        num_layers=num_layers,
        hidden=hidden,
        seed=seed,
        tie_word_embeddings=tie_word_embeddings,
    )
    return directory


def _record_provenance(directory: Path, **kwargs) -> None:
    """Note how the folder was built, so a failing test's artefacts explain themselves."""
    (directory / "tiny_model.json").write_text(json.dumps(kwargs, indent=2) + "\n")
