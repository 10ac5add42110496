"""Tests of the CPU backend for verl: platform, patches, the HF rollout, and a real GRPO run."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from subprocess_runs import run_in_own_group, step_metrics

from common.cpu_backend import (
    PACKED_ATTENTION,
    PLUGIN_MODULE,
    ROLLOUT_NAME,
    cpu_hydra_overrides,
    cpu_run_env,
    gpu_available,
)
from common.cpu_backend.hf_generate import (
    SamplingSpec,
    generate_batch,
    left_pad,
    position_ids_from_mask,
    reset_generation_config,
)

needs_cpu_backend = pytest.mark.skipif(gpu_available(), reason="checks the GPU-less code path")

PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 11, 12], [1, 20, 21], [1, 30, 31, 32, 33, 34]]
EOS, PAD = 2, 0


def _load(model_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").eval()
    reset_generation_config(model)
    return model


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return _load(tiny_model_dir)


# ---------------------------------------------------------------------------- run settings


def test_every_ray_actor_gets_the_cpu_env(monkeypatch):
    """launch passes the CPU variables to Ray's runtime_env: without OMP_NUM_THREADS there, Ray gives an
    actor that reserves at most one CPU (the training worker, the rollout server) a single torch thread."""
    from common.launch import backend_env

    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    env = backend_env(base={"PATH": "/usr/bin"})
    assert env["OMP_NUM_THREADS"] == str(len(os.sched_getaffinity(0)))
    assert env["VERL_PLATFORM"] == "cpu" and PLUGIN_MODULE in env["VERL_USE_EXTERNAL_MODULES"]


def test_run_env_and_overrides():
    env = cpu_run_env({"VERL_USE_EXTERNAL_MODULES": "other.plugin"})
    assert env["VERL_PLATFORM"] == "cpu"
    assert env["VERL_USE_EXTERNAL_MODULES"].split(",") == ["other.plugin", PLUGIN_MODULE]
    assert env["OMP_NUM_THREADS"] == str(len(os.sched_getaffinity(0)))
    assert cpu_run_env({"OMP_NUM_THREADS": "1"})["OMP_NUM_THREADS"] == "1"  # the user's choice wins
    overrides = cpu_hydra_overrides(n_procs=2)
    for expected in (
        f"actor_rollout_ref.rollout.name={ROLLOUT_NAME}",
        "actor_rollout_ref.actor.strategy=fsdp2",
        f"++actor_rollout_ref.model.override_config.attn_implementation={PACKED_ATTENTION}",
        "++ray_kwargs.ray_init.num_gpus=2",
        "trainer.n_gpus_per_node=2",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
    ):
        assert expected in overrides


# ---------------------------------------------------------------------------- platform


@needs_cpu_backend
def test_platform_resolves_to_cpu():
    from verl.plugin.platform import get_platform
    from verl.utils.device import get_nccl_backend, get_torch_device

    assert os.environ["VERL_PLATFORM"] == "cpu"
    assert get_platform().device_name == "cpu"
    assert get_nccl_backend() == "gloo"
    assert get_torch_device().current_device() == "cpu"
    assert get_torch_device().memory_allocated() == 0


_FRESH_PROCESS_PROBE = textwrap.dedent(
    """
    import json, torch.distributed as dist
    from verl.plugin.platform import get_platform
    from verl.workers.engine.base import EngineRegistry
    import verl.workers.engine.fsdp.transformer_impl as fsdp_impl
    from verl.workers.engine_workers import initialize_global_process_group_ray
    from verl.workers.rollout.base import get_rollout_class
    from verl.workers.rollout.replica import get_rollout_replica_class
    initialize_global_process_group_ray()
    print(json.dumps({
        "platform": get_platform().device_name,
        "backend": dist.get_backend(),
        "engine": EngineRegistry.get_engine_cls("language_model", "fsdp2").__name__,
        "pinned": fsdp_impl.CPUOffloadPolicy(pin_memory=True).pin_memory,
        "adapter": get_rollout_class("hf").__name__,
        "replica": get_rollout_replica_class("hf").__name__,
    }))
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@needs_cpu_backend
def test_fresh_process_autodetects_cpu_and_gloo():
    """Only the plugin is listed (no VERL_PLATFORM): the cpu platform is picked automatically."""
    env = cpu_run_env()
    env.pop("VERL_PLATFORM")
    env.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    out = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS_PROBE], env=env, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-3000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe == {
        "platform": "cpu",
        "backend": "gloo",
        "engine": "FSDPEngineWithLMHead",
        "pinned": False,
        "adapter": "HFServerAdapter",
        "replica": "HFRolloutReplica",
    }


# ---------------------------------------------------------------------------- sampling rules


def test_sampling_spec_defaults_leave_distribution_untruncated():
    kwargs = SamplingSpec.from_params({"temperature": 0.8, "top_k": -1, "top_p": 1.0}).generate_kwargs()
    # generate() fills a missing top_k with 50; the spec must pass 0 explicitly
    assert kwargs == {
        "do_sample": True,
        "temperature": 0.8,
        "top_k": 0,
        "top_p": 1.0,
        "repetition_penalty": 1.0,
    }
    assert SamplingSpec.from_params({"temperature": 1.0, "top_k": None, "top_p": None}).top_k == 0


def test_sampling_spec_configured_and_greedy():
    assert (
        SamplingSpec.from_params({"temperature": 1.0, "top_k": 5, "top_p": 0.9}).generate_kwargs()["top_k"]
        == 5
    )
    for params in ({"temperature": 0}, {"temperature": 1.0, "do_sample": False}):
        spec = SamplingSpec.from_params(params)
        assert spec.greedy and spec.temperature == 1.0 and spec.generate_kwargs()["do_sample"] is False
    assert SamplingSpec.from_params({"temperature": 1.0}, force_greedy=True).greedy


def test_sampling_covers_whole_vocabulary(tiny_model):
    """With top-k 50 at most 50 distinct first tokens could appear; the tiny model is near-uniform."""
    torch.manual_seed(0)
    spec = SamplingSpec.from_params({"temperature": 1.0, "top_k": -1})
    gens = generate_batch(tiny_model, [PROMPTS[1]] * 1500, spec, 1, eos_token_ids=[EOS], pad_token_id=PAD)
    assert len({g.token_ids[0] for g in gens}) > 100


# ---------------------------------------------------------------------------- generation


def test_position_ids_follow_training_convention():
    input_ids, mask = left_pad([[7, 8, 9], [5]], pad_token_id=PAD)
    assert input_ids.tolist() == [[7, 8, 9], [PAD, PAD, 5]]
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_batched_left_padded_greedy_equals_individual(tiny_model):
    spec = SamplingSpec.from_params({"temperature": 0})
    batched = generate_batch(tiny_model, PROMPTS, spec, 20, eos_token_ids=[EOS], pad_token_id=PAD)
    for prompt, together in zip(PROMPTS, batched, strict=True):
        alone = generate_batch(tiny_model, [prompt], spec, 20, eos_token_ids=[EOS], pad_token_id=PAD)[0]
        assert together.token_ids == alone.token_ids
        assert together.log_probs == pytest.approx(alone.log_probs, abs=1e-4)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_log_probs_match_float64_recomputation(tiny_model, tiny_model_dir, temperature):
    torch.manual_seed(1)
    spec = SamplingSpec.from_params({"temperature": temperature})
    gens = generate_batch(tiny_model, PROMPTS, spec, [4, 12, 8], eos_token_ids=[EOS], pad_token_id=PAD)
    reference = _load(tiny_model_dir, dtype=torch.float64)
    for prompt, gen in zip(PROMPTS, gens, strict=True):
        ids = torch.tensor([prompt + gen.token_ids])
        with torch.no_grad():
            logits = reference(ids).logits[0, len(prompt) - 1 : -1] / temperature
        expected = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt) :, None]).squeeze(-1)
        assert torch.tensor(gen.log_probs, dtype=torch.float64) == pytest.approx(expected, abs=1e-4)
    for gen, limit in zip(gens, [4, 12, 8], strict=True):
        assert len(gen.token_ids) == limit or (gen.hit_eos and len(gen.token_ids) < limit)


def test_stops_at_eos_and_keeps_it(tiny_model):
    spec = SamplingSpec.from_params({"temperature": 0})
    free = generate_batch(tiny_model, PROMPTS[:1], spec, 10, eos_token_ids=[EOS], pad_token_id=PAD)[0]
    stop_token = free.token_ids[3]  # declare the 4th greedy token an eos
    stopped = generate_batch(tiny_model, PROMPTS[:1], spec, 10, eos_token_ids=[stop_token], pad_token_id=PAD)[
        0
    ]
    first = free.token_ids.index(stop_token)
    assert stopped.hit_eos and stopped.token_ids == free.token_ids[: first + 1]
    assert len(stopped.token_ids) <= 4 < len(free.token_ids)


# ---------------------------------------------------------------------------- server + adapter


class _RemoteMethod:
    """Mimics ``actor.method.remote(...)`` for an in-process object (returns an awaitable)."""

    def __init__(self, fn):
        self._fn = fn

    def remote(self, *args, **kwargs):
        return self._fn(*args, **kwargs)


class _LocalHandle:
    def __init__(self, target):
        self._target = target

    def __getattr__(self, name):
        return _RemoteMethod(getattr(self._target, name))


def _rollout_config(**overrides):
    from verl.workers.config import RolloutConfig

    fields = dict(name=ROLLOUT_NAME, tensor_model_parallel_size=1, prompt_length=32, response_length=12)
    return RolloutConfig(**{**fields, "dtype": "float32", **overrides})


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    from verl.workers.config import HFModelConfig

    from common.cpu_backend.hf_server import HFRolloutServer

    return HFRolloutServer(_rollout_config(), HFModelConfig(path=str(tiny_model_dir)), 0, "hf-test")


def test_server_batches_concurrent_requests(server, tiny_model, monkeypatch):
    calls = []
    run_batch = server._run_batch
    monkeypatch.setattr(server, "_run_batch", lambda batch: calls.append(len(batch)) or run_batch(batch))
    greedy = {"temperature": 0, "logprobs": True}

    async def all_at_once():
        return await asyncio.gather(
            *[server.generate(p, dict(greedy), f"r{i}") for i, p in enumerate(PROMPTS)]
        )

    outputs = asyncio.run(all_at_once())
    assert calls == [len(PROMPTS)]
    spec = SamplingSpec.from_params(greedy)
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        alone = generate_batch(tiny_model, [prompt], spec, 12, eos_token_ids=[EOS], pad_token_id=PAD)[0]
        assert out.token_ids == alone.token_ids and len(out.log_probs) == len(out.token_ids)
        assert out.stop_reason == "completed"


def test_server_stops_at_stop_token_ids_and_keeps_them(server, monkeypatch):
    """vLLM's stop_token_ids: the response ends at the first one, which is kept; a request of the
    same moment without it runs in its own batch and is not cut."""
    greedy = {"temperature": 0, "logprobs": True}
    free = asyncio.run(server.generate(PROMPTS[0], dict(greedy), "free"))
    stop_token = free.token_ids[3]
    first = free.token_ids.index(stop_token)
    assert stop_token != EOS and first < len(free.token_ids) - 1
    sizes = []
    run_batch = server._run_batch
    monkeypatch.setattr(server, "_run_batch", lambda batch: sizes.append(len(batch)) or run_batch(batch))

    async def together():
        stopped = server.generate(PROMPTS[0], {**greedy, "stop_token_ids": [stop_token]}, "stopped")
        unstopped = server.generate(PROMPTS[0], {**greedy, "stop_token_ids": None}, "unstopped")
        return await asyncio.gather(stopped, unstopped)

    stopped, unstopped = asyncio.run(together())
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert stopped.log_probs == pytest.approx(free.log_probs[: first + 1], abs=1e-5)
    assert unstopped.token_ids == free.token_ids
    assert sizes == [1, 1]
    assert SamplingSpec.from_params({"stop_token_ids": [5, 7]}).stop_token_ids == {5, 7}
    assert SamplingSpec.from_params({}) == SamplingSpec.from_params({"stop_token_ids": None})


def test_server_token_budget(server):
    assert server._max_new_tokens(10, {}) == 12
    assert server._max_new_tokens(10, {"max_tokens": 5}) == 5
    assert server._max_new_tokens(40, {}) == 4  # prompt over its budget eats into the response's
    with pytest.raises(ValueError):
        server._max_new_tokens(44, {})


@pytest.mark.parametrize("tied", [False, True])
def test_adapter_syncs_trained_weights_into_server(tmp_path, tied):
    """After update_weights the server generates exactly like the new weights, in tiny buckets."""
    from tiny_models import build_tiny_model
    from verl.workers.config import CheckpointEngineConfig, HFModelConfig

    from common.cpu_backend.hf_rollout import HFServerAdapter
    from common.cpu_backend.hf_server import HFRolloutServer

    initial = build_tiny_model(tmp_path / "initial", seed=0, tie_word_embeddings=tied)
    trained = _load(build_tiny_model(tmp_path / "trained", seed=7, tie_word_embeddings=tied))
    model_config = HFModelConfig(path=str(initial))
    # bucket size 0: one Ray call per tensor, so the bucketing path runs too
    config = _rollout_config(checkpoint_engine=CheckpointEngineConfig(update_weights_bucket_megabytes=0))
    local = HFRolloutServer(config, model_config, 0, "hf-sync-test")
    adapter = HFServerAdapter(config, model_config, device_mesh=None)
    adapter._server = _LocalHandle(local)
    greedy = {"temperature": 0, "logprobs": True}

    before = asyncio.run(local.generate(PROMPTS[0], dict(greedy), "a"))
    asyncio.run(adapter.update_weights(iter(trained.state_dict().items()), global_steps=3))
    after = asyncio.run(local.generate(PROMPTS[0], dict(greedy), "b"))

    spec = SamplingSpec(greedy=True)
    expected = generate_batch(trained, PROMPTS[:1], spec, 12, eos_token_ids=[EOS], pad_token_id=PAD)[0]
    assert after.token_ids == expected.token_ids
    assert after.log_probs == pytest.approx(expected.log_probs, abs=1e-5)
    assert before.log_probs != pytest.approx(after.log_probs, abs=1e-2)
    assert after.extra_fields["global_steps"] == 3
    assert asyncio.run(local.generate(PROMPTS[0], {"temperature": 0}, "c")).log_probs is None
    with pytest.raises(KeyError, match="no_such.weight"):
        asyncio.run(local.update_weights([("no_such.weight", torch.zeros(1))]))


# ---------------------------------------------------------------------------- end to end

E2E_TIMEOUT_S = 600  # measured 70-140 s on 2 cores depending on load
GRPO_STEPS = 2

_REWARD_FN = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """Length-based score in [0, 1]: enough signal for GRPO advantages on a random model."""
    return min(len(solution_str), 20) / 20.0
'''


def _write_grpo_data(root: Path) -> dict[str, Path]:
    import pandas as pd

    rows = [
        {
            "data_source": "tiny_arith",
            "prompt": [{"role": "user", "content": f"What is {i} + {i + 1}?"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(2 * i + 1)},
            "extra_info": {"split": "train", "index": i},
        }
        for i in range(16)
    ]
    paths = {"train": root / "train.parquet", "val": root / "val.parquet", "reward": root / "reward.py"}
    pd.DataFrame(rows).to_parquet(paths["train"])
    pd.DataFrame(rows[:4]).to_parquet(paths["val"])
    paths["reward"].write_text(_REWARD_FN)
    return paths


def _grpo_command(model_dir: Path, data: dict[str, Path], out_dir: Path) -> list[str]:
    arf = "actor_rollout_ref"
    return [
        sys.executable,
        "-m",
        "verl.trainer.main_ppo",
        *cpu_hydra_overrides(n_procs=1),
        "algorithm.adv_estimator=grpo",
        f"data.train_files={data['train']}",
        f"data.val_files={data['val']}",
        "data.train_batch_size=4",
        "data.max_prompt_length=64",
        "data.max_response_length=16",
        f"{arf}.model.path={model_dir}",
        f"{arf}.actor.ppo_mini_batch_size=4",
        f"{arf}.actor.ppo_micro_batch_size_per_gpu=4",
        # a large step so stale rollout weights would show in the rollout-vs-actor metrics
        f"{arf}.actor.optim.lr=0.01",
        f"{arf}.actor.use_kl_loss=true",
        f"{arf}.rollout.n=2",
        f"{arf}.rollout.log_prob_micro_batch_size_per_gpu=8",
        f"{arf}.ref.log_prob_micro_batch_size_per_gpu=8",
        f"reward.custom_reward_function.path={data['reward']}",
        "reward.custom_reward_function.name=compute_score",
        f"trainer.total_training_steps={GRPO_STEPS}",
        "trainer.logger=[console]",
        "trainer.val_before_train=true",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
        f"trainer.default_local_dir={out_dir / 'ckpt'}",
    ]


@pytest.mark.slow
def test_grpo_two_steps_with_unmodified_verl_entry_point(tiny_model_dir, tmp_path, isolated_run_env):
    data = _write_grpo_data(tmp_path)
    log_path = tmp_path / "grpo.log"
    start = time.monotonic()
    rc = run_in_own_group(
        _grpo_command(tiny_model_dir, data, tmp_path), isolated_run_env, tmp_path, log_path, E2E_TIMEOUT_S
    )
    wall = time.monotonic() - start
    print(f"GRPO {GRPO_STEPS} steps on CPU: {wall:.1f}s wall")
    log = log_path.read_text(errors="replace")
    assert rc == 0, log[-6000:]

    metrics = step_metrics(log)
    assert set(range(1, GRPO_STEPS + 1)) <= set(metrics), sorted(metrics)
    assert "val-core/tiny_arith/acc/mean@1" in metrics[0]  # greedy validation went through the server
    first, last = (float(metrics[s]["training/rollout_probs_diff_mean"]) for s in (1, GRPO_STEPS))
    # rollout log-probs reach the trainer, and after an update they still match the actor: the
    # server generated with the new weights (measured: ~4e-5 synced, ~8e-4 with sync disabled)
    assert last < 3 * first + 1e-5, (first, last)
    assert float(metrics[GRPO_STEPS]["actor/grad_norm"]) > 0
