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
