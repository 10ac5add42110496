"""convert_checkpoint.sh: a verl FSDP checkpoint of a real GRPO run becomes a Hugging Face folder whose
model computes what the trained model computes."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import torch
from script_runs import SCRIPTS, run_script, script_env, tiny_training_env
from subprocess_runs import step_metrics

E2E_TIMEOUT_S = 600


def test_bad_arguments_stop_before_any_work(tmp_path):
    env = script_env(dict(os.environ))
    script = SCRIPTS / "utils" / "convert_checkpoint.sh"
    missing = tmp_path / "nothing"
    result = subprocess.run(
        ["bash", script, f"CHECKPOINT_PATH={missing}"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2 and f"CHECKPOINT_PATH={missing}: no such directory" in result.stderr
    result = subprocess.run(
        ["bash", script, f"CHECKPOINT_PATH={tmp_path}"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2 and "no FSDP actor checkpoint" in result.stderr
    result = subprocess.run(["bash", script, "CHECKPOINT=x"], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "unknown argument 'CHECKPOINT=x'" in result.stderr


def _trained_model(actor_dir):
    """The trained weights read straight from the actor's FSDP shard, independently of the merger."""
    from torch.distributed.tensor import DTensor
    from transformers import AutoConfig, AutoModelForCausalLM

    # one training process: the rank-0 shard holds every parameter whole
    shard = torch.load(actor_dir / "model_world_size_1_rank_0.pt", map_location="cpu", weights_only=False)
    state = {k: (v.to_local() if isinstance(v, DTensor) else v).float() for k, v in shard.items()}
    config = AutoConfig.from_pretrained(actor_dir / "huggingface")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _shard(actor_dir, kind: str) -> dict:
    from torch.distributed.tensor import DTensor

    path = os.path.join(actor_dir, f"{kind}_world_size_1_rank_0.pt")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if kind == "model":
        return {k: (v.to_local() if isinstance(v, DTensor) else v).float() for k, v in state.items()}
    return state


def check_step_continues(before_dir, after_dir, initial_dir) -> None:
    """The step saved in ``after_dir`` was taken from exactly the weights and optimizer in ``before_dir``.

    From the two checkpoints the AdamW update of the later step is replayed: its gradient follows from
    the two first moments; the second moment must then match, and the saved weights updated by it must
    give the later weights. A resume that restored the initial weights (``initial_dir``), other weights,
    or a fresh optimizer could not pass.
    """
    p0, p1 = _shard(before_dir, "model"), _shard(after_dir, "model")
    o0, o1 = _shard(before_dir, "optim"), _shard(after_dir, "optim")
    group = o1["param_groups"][0]
    (b1, b2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
    assert len(p1) == len(o1["state"])
    initial = _initial_weights(initial_dir)
    for index, name in enumerate(p1):
        s0, s1 = o0["state"][index], o1["state"][index]
        step = int(s1["step"])
        assert step == int(s0["step"]) + 1, name
        m0, v0, m1, v1 = (s[k].to_local() for s in (s0, s1) for k in ("exp_avg", "exp_avg_sq"))
        grad = (m1 - b1 * m0) / (1 - b1)
        assert torch.allclose(v1, b2 * v0 + (1 - b2) * grad**2, rtol=1e-3, atol=1e-12), name
        denom = (v1.sqrt() / (1 - b2**step) ** 0.5).add_(eps)
        predicted = (p0[name] * (1 - lr * wd)).addcdiv_(m1, denom, value=-lr / (1 - b1**step))
        assert (predicted - p1[name]).abs().max() < 1e-6, name
        assert (p0[name] - initial[name]).abs().max() > 1e-4, name


def _initial_weights(model_dir) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {k: v.float() for k, v in model.state_dict().items()}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.slow
def test_converted_checkpoint_matches_trained_weights(isolated_run_env, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = tmp_path / "run"
    env, inputs = tiny_training_env(
        isolated_run_env,
        tmp_path,
        TOTAL_STEPS=1,
        SAVE_FREQ=1,
        TEST_FREQ=-1,
    )
    start = time.monotonic()
    # the native variant, so its KL loss against the reference model runs end to end too
    rc, log = run_script(
        "grpo/train_grpo_native.sh",
        ["trainer.logger=[console]", "trainer.val_before_train=false"],
        env,
        tmp_path,
        tmp_path / "train.log",
        E2E_TIMEOUT_S,
    )
    print(f"train_grpo_native.sh, 1 step: {time.monotonic() - start:.1f}s wall")
    assert rc == 0, log[-6000:]
    assert "actor/kl_loss" in step_metrics(log)[1]

    actor_dir, target = run_dir / "global_step_1" / "actor", tmp_path / "hf"
    start = time.monotonic()
    rc, log = run_script(
        "utils/convert_checkpoint.sh",
        [f"CHECKPOINT_PATH={actor_dir}", f"TARGET_DIR={target}"],
        env,
        tmp_path,
        tmp_path / "convert.log",
        300,
    )
    print(f"convert_checkpoint.sh: {time.monotonic() - start:.1f}s wall")
    assert rc == 0, log[-6000:]

    converted = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    trained = _trained_model(actor_dir)
    initial = AutoModelForCausalLM.from_pretrained(inputs["model"], dtype=torch.float32).eval()
    # verl's merger stores bfloat16: the converted weights are exactly the trained ones rounded to it
    trained_state = trained.state_dict()
    for name, value in converted.state_dict().items():
        assert torch.equal(value, trained_state[name].bfloat16().float()), name

    tokenizer = AutoTokenizer.from_pretrained(target)
    original_tokenizer = AutoTokenizer.from_pretrained(inputs["model"])
    messages = [{"role": "user", "content": "What is 12 + 30?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == original_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    assert ids.tolist() == [original_tokenizer(text)["input_ids"]]

    out, trained_logits = _logits(converted, ids), _logits(trained, ids)
    rounded = trained.to(torch.bfloat16).float()  # in place: now the weights the folder should hold
    # same weights (checked exactly above); from_pretrained and from_config may pick different attention
    # kernels and thread counts change reduction order: float32 noise only, far below bf16 rounding
    assert torch.allclose(out, _logits(rounded, ids), atol=1e-4, rtol=0)
    # and the trained model differs from the initial one far beyond bf16 rounding, so a conversion that
    # wrote the initial weights (or stale ones) could not pass
    rounding = (out - trained_logits).abs().max()
    assert (_logits(initial, ids) - out).abs().max() > 10 * rounding
