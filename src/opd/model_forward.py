"""One forward of a verl FSDP engine's model: logits (or final hidden states) at response positions only.

Teacher and student go through this same function, so both see identical inputs (remove-padding
packing, position ids) and the cached teacher rows line up with the student rows one to one.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from tensordict import TensorDict

from opd.batch import OPDBatch, response_logit_rows
from opd.devices import current_device


def engine_inputs(batch: OPDBatch, *, use_remove_padding: bool, pad_token_id: int) -> TensorDict:
    """The micro-batch in verl's no-padding layout (jagged ``input_ids`` / ``position_ids``).

    Positions restart at 0 for every sample, as in rollout: no sample has padding inside it.
    """
    from verl.utils import tensordict_utils as tu

    ids = torch.nested.as_nested_tensor(batch.input_ids, layout=torch.jagged)
    positions = torch.nested.as_nested_tensor(
        [torch.arange(t.numel(), dtype=torch.long) for t in batch.input_ids], layout=torch.jagged
    )
    data = TensorDict({"input_ids": ids, "position_ids": positions}, batch_size=[len(batch)])
    tu.assign_non_tensor(
        data,
        use_remove_padding=use_remove_padding,
        use_fused_kernels=False,
        pad_token_id=pad_token_id,
        temperature=1.0,
    )
    return data


def response_logits(engine, batch: OPDBatch, *, pad_token_id: int) -> torch.Tensor:
    """Raw (T = 1) logits that predict every response token: ``[sum R_i, V]``.

    With remove-padding the packed hidden states are cut to the response rows before the output head
    (``logits_to_keep``), so prompt positions never cost a ``[*, V]`` tensor.
    """
    return _response_rows(engine, batch, pad_token_id)


def response_hidden_states(engine, batch: OPDBatch, *, pad_token_id: int) -> torch.Tensor:
    """Final (post-norm) hidden states that predict every response token: ``[sum R_i, H]``.

    The same forward as :func:`response_logits` with the output head made the identity, so the rows are
    exactly what the head would have multiplied and no ``[*, V]`` logits are ever computed. Only the head
    module's ``forward`` is replaced, not the module: FSDP2 keeps running its hooks on it, and its weight
    stays registered (or tied to the embedding) as usual.
    """
    head = engine.module.get_output_embeddings()
    head.forward = _identity
    try:
        return _response_rows(engine, batch, pad_token_id)
    finally:
        del head.forward  # the class's own forward again


def _identity(hidden_states: torch.Tensor) -> torch.Tensor:
    return hidden_states


# Config keys of Hugging Face models that transform the logits after the output head, with the values that
# leave them alone. A transform before the head (e.g. a scaled hidden state) needs no entry: the hidden
# states are the head's input, whatever produced them.
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": (None,),  # Gemma 2/3: cap * tanh(logits / cap)
    "logit_scale": (None, 1, 1.0),  # Cohere: logits * scale
    "logits_scaling": (None, 1, 1.0),  # Granite: logits / scaling
}


def output_head_problem(model) -> str | None:
    """Why ``final hidden state @ head^T`` would not be the model's logits; None when it is.

    ``model``: an (FSDP2-sharded) Hugging Face causal LM. Both the teacher's 'hidden' signal and the
    student's fused output head rest on this.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        return "it runs under FSDP1 (strategy fsdp), whose flat parameters hold no gatherable head"
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return f"its output head is a {type(head).__name__}, not a linear layer"
    if head.bias is not None:
        return "its output head has a bias"
    configs = [model.config, getattr(model.config, "text_config", None)]
    for key, neutral in _LOGIT_TRANSFORMS.items():
        for config in filter(None, configs):
            value = getattr(config, key, None)
            if value not in neutral:
                return f"its config sets {key}={value}, a transform of the logits after the output head"
    return None


def gathered_head_weight(model, device: torch.device) -> torch.Tensor:
    """The output head's weight ``[V, H]`` whole on ``device``, differentiable back to the parameter.

    Under FSDP2 the weight is a sharded DTensor (the embedding's, with tied embeddings, so the head's
    gradient adds to the embedding's): every rank gathers it, a collective, so every rank calls this at the
    same point. The shard moves to ``device`` first (parameter offload may keep it on the host). Its
    gradient returns to the shard averaged over the ranks, as FSDP averages every other gradient.
    """
    from torch.distributed.tensor import DTensor, Partial

    weight = model.get_output_embeddings().weight
    if isinstance(weight, DTensor):
        weight = weight.to(device)
        return weight.full_tensor(grad_placements=[Partial("avg")] * weight.device_mesh.ndim)
    return weight.to(device)


def _response_rows(engine, batch: OPDBatch, pad_token_id: int) -> torch.Tensor:
    """The model's output at the rows that predict every response token: ``[sum R_i, D]``."""
    use_rmpad = bool(engine.model_config.use_remove_padding)
    data = engine_inputs(batch, use_remove_padding=use_rmpad, pad_token_id=pad_token_id)
    device = current_device()
    data = data.to(device)
    model_inputs, _ = engine.prepare_model_inputs(data)
    rows = response_logit_rows(batch).to(device)
    # set by verl's FSDP engine constructor; common.verl_surface checks that at launch
    autocast_dtype = engine._autocast_dtype
    autocast = (
        nullcontext()
        if autocast_dtype == torch.float32
        else torch.autocast(device_type=device.type, dtype=autocast_dtype)
    )
    with autocast:
        if use_rmpad:
            return engine.module(**model_inputs, use_cache=False, logits_to_keep=rows).logits.squeeze(0)
        logits = engine.module(**model_inputs, use_cache=False).logits
    padded_rows = response_logit_rows(batch, row_width=logits.shape[1]).to(device)
    return logits.reshape(-1, logits.shape[-1]).index_select(0, padded_rows)

