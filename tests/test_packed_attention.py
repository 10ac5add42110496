"""The CPU backend's packed attention: each packed sequence sees only itself, exactly as if run alone."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny_model
from transformers import AutoModelForCausalLM

from common.cpu_backend import PACKED_ATTENTION, cpu_hydra_overrides
from common.cpu_backend.packed_attention import register, sequence_bounds

LENGTHS = [7, 12, 1, 9]


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def model_dir(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return build_tiny_model(folder, arch=request.param, hidden=64, num_layers=2)


def _load(model_dir, attention: str, dtype=torch.float64):
    register()
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attention)


def _packed_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (1, sum(LENGTHS)), generator=generator)
    positions = torch.cat([torch.arange(n) for n in LENGTHS]).unsqueeze(0)
    return ids, positions


def test_sequence_bounds_split_where_positions_restart():
    _, positions = _packed_inputs()
    assert sequence_bounds(positions) == [(0, 7), (7, 19), (19, 20), (20, 29)]
    assert sequence_bounds(torch.arange(5).unsqueeze(0)) is None


def test_packed_row_equals_each_sequence_alone_with_gradients(model_dir):
    """float64: logits and every parameter gradient of the packed forward equal those of separate runs."""
    model = _load(model_dir, PACKED_ATTENTION)
    ids, positions = _packed_inputs()
    weights = torch.randn(sum(LENGTHS), model.config.vocab_size, dtype=torch.float64)

    packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
    (packed * weights).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    reference = _load(model_dir, "sdpa")  # eager takes its softmax in float32
    start, pieces = 0, []
    for n in LENGTHS:
        logits = reference(input_ids=ids[:, start : start + n], use_cache=False).logits[0]
        (logits * weights[start : start + n]).sum().backward()
        pieces.append(logits)
        start += n
    torch.testing.assert_close(packed, torch.cat(pieces), rtol=1e-10, atol=1e-10)
    for name, param in reference.named_parameters():
        torch.testing.assert_close(packed_grads[name], param.grad, rtol=1e-9, atol=1e-10, msg=name)


def test_packed_row_differs_from_one_long_sequence(model_dir):
    """The check above would pass vacuously if attention never crossed positions at all."""
    model = _load(model_dir, PACKED_ATTENTION)
    ids, positions = _packed_inputs()
    packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    whole = model(input_ids=ids, use_cache=False).logits
    assert not torch.allclose(packed[0, 7:19], whole[0, 7:19], atol=1e-3)


def test_padded_batches_and_generation_match_sdpa(model_dir):
    """Everything that is not one packed row (a left-padded batch, a KV cache) is plain sdpa."""
    ours, sdpa = _load(model_dir, PACKED_ATTENTION), _load(model_dir, "sdpa")
    ids, _ = _packed_inputs(seed=1)
    batch = ids[:, :24].reshape(2, 12)
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    torch.testing.assert_close(
        ours(input_ids=batch, attention_mask=mask).logits, sdpa(input_ids=batch, attention_mask=mask).logits
    )
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(batch, **kwargs), sdpa.generate(batch, **kwargs))


def test_cpu_runs_select_packed_attention():
    key = "++actor_rollout_ref.model.override_config.attn_implementation"
    assert f"{key}={PACKED_ATTENTION}" in cpu_hydra_overrides()


def test_sequences_stay_apart_without_transformers_packed_mask(model_dir):
    """With a KV cache being built, transformers skips its packed-sequence mask: plain sdpa then attends
    across sequences, ours still does not (so the checks above exercise our split, not only the mask)."""
    ids, positions = _packed_inputs(seed=2)
    alone = [
        _load(model_dir, "sdpa")(input_ids=piece, use_cache=False).logits[0]
        for piece in torch.split(ids, LENGTHS, dim=1)
    ]
    for attention, separated in ((PACKED_ATTENTION, True), ("sdpa", False)):
        logits = _load(model_dir, attention)(input_ids=ids, position_ids=positions, use_cache=True).logits[0]
        assert torch.allclose(logits, torch.cat(alone), rtol=1e-9, atol=1e-9) is separated, attention


def test_sliding_window_layers_keep_sdpa(tmp_path):
    """A sliding-window layer needs the window in its mask: such layers stay on transformers' sdpa."""
    folder = build_tiny_model(tmp_path / "qwen2", arch="qwen2", hidden=64, num_layers=2)
    window = dict(use_sliding_window=True, sliding_window=4, layer_types=["sliding_attention"] * 2)
    register()
    ids, positions = _packed_inputs(seed=3)
    logits = {
        attention: AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float64, attn_implementation=attention, **window
        )(input_ids=ids, position_ids=positions, use_cache=False).logits
        for attention in (PACKED_ATTENTION, "sdpa")
    }
    torch.testing.assert_close(logits[PACKED_ATTENTION], logits["sdpa"], rtol=1e-10, atol=1e-10)
