"""Serve an exported MTA model with PyTorch and Hugging Face transformers (no JAX).

    pip install 'mta_jax[torch]'

    from mta_jax.torch import load_mta_t5
    model = load_mta_t5("export/backbone", "export")  # a transformers.T5ForConditionalGeneration
    logits = model(input_ids=ids, decoder_input_ids=dec, task_ids=torch.tensor([0, 3])).logits
    tokens = model.generate(input_ids=ids, attention_mask=mask, task_ids=task_ids, num_beams=4)

`model.task_types[t]` is the task type of id t; `model.generation_config` decodes as the run's
evaluation did (config.eval). transformers' `from_pretrained` reads the backbone folder (a
local folder); the artifact is read through etils.epath, so it may be on gs:// too. The backbone is Hugging Face's T5, loaded from the folder; in each
MTA block the `DenseReluDense` of the FFN sub-layer (after its layer norm, before its dropout
and residual) becomes an `MTABlock` (bottleneck adapters: the dense FFN plus an `MTABlock`).
An `MTABlock` computes what models/mta.py computes, with the adapters stacked as the JAX
model stores them ([E, d_model, width] and [E, width, d_model]) and run together by einsums
over the adapter axis: no loop over examples or adapters.

How task ids reach the blocks: `T5ForConditionalGeneration.forward` passes its extra keyword
arguments to the encoder and the decoder stack, and a forward pre-hook on each stack takes
`task_ids` out of them for that stack's blocks (`attach_routing`). `generate` accepts
`task_ids` because `MTAT5ForConditionalGeneration.forward` names it; it hands it to the
encoder (b rows), and for beam search repeats every tensor of its model kwargs per beam
(`GenerationMixin._expand_inputs_for_generation`, repeat_interleave on dim 0), so each
decoder step gets b * num_beams rows, example-major like the beams themselves.

The gate of stage two reads the outputs at position 0. In incremental decoding only the first
step sees position 0, so the decoder's blocks keep that gate for the later steps (the decoder
pre-hook reads the position off the cache). It is the same for every beam of an example (all
beams share position 0), so beam reordering cannot change it.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
import transformers
from etils import epath
from torch import nn

from mta_jax import artifact_format as fmt
from mta_jax.errors import CheckpointFormatError


class _Routing:
    """What the MTA blocks of one stack route on in the stack's current call; the stack's
    forward pre-hook (this object, called with the stack's keyword arguments) sets it."""

    def __init__(self, decoder: bool):
        self.decoder = decoder
        self.task_ids: Optional[torch.Tensor] = None  # int [b]
        self.route_hidden: Optional[torch.Tensor] = None  # decoder: encoder output at 0 [b, d]
        self.at_start = True  # decoder: this call starts at position 0 (False: a cached step)

    def __call__(self, module, args, kwargs):
        self.task_ids = kwargs.pop("task_ids", None)
        if self.decoder:
            encoded = kwargs.get("encoder_hidden_states")
            self.route_hidden = None if encoded is None else encoded[:, 0]
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            self.at_start = cache is None or cache.get_seq_length() == 0
        return args, kwargs


def attach_routing(hf_model: nn.Module) -> dict[str, _Routing]:
    """The routing state of each stack of a Hugging Face T5, hooked on once: {stack: _Routing}."""
    if not hasattr(hf_model, "_mta_routing"):
        routing = {stack: _Routing(stack == "decoder") for stack in fmt.STACKS}
        for stack, hook in routing.items():
            getattr(hf_model, stack).register_forward_pre_hook(hook, with_kwargs=True)
        hf_model._mta_routing = routing
    return hf_model._mta_routing


# --------------------------------------------------------------------------- the block

class Dense(nn.Module):
    """y = x @ kernel + bias, with Flax's layout: kernel [d_in, d_out], bias [d_out] or none."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True):
        super().__init__()
        self.kernel = nn.Parameter(torch.zeros(d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.kernel
        return y if self.bias is None else y + self.bias


class StackedFFN(nn.Module):
    """`num` FFNs on a leading adapter axis: wi (gated: wi_0, wi_1) [num, d_model, width],
    wo [num, width, d_model]; act(x wi) (gated: act(x wi_0) * (x wi_1)), dropout, then wo."""

    def __init__(self, num: int, d_model: int, width: int, *, gated: bool,
                 act: Callable[[torch.Tensor], torch.Tensor], dropout_rate: float):
        super().__init__()
        self.names_in = ("wi_0", "wi_1") if gated else ("wi",)
        for name in self.names_in:
            self.register_parameter(name, nn.Parameter(torch.zeros(num, d_model, width)))
        self.wo = nn.Parameter(torch.zeros(num, width, d_model))
        self.act, self.dropout = act, nn.Dropout(dropout_rate)

    def _hidden(self, x, spec: str, take: Callable) -> torch.Tensor:
        project = lambda name: torch.einsum(spec, x, take(getattr(self, name)))
        if len(self.names_in) == 2:
            return self.dropout(self.act(project("wi_0")) * project("wi_1"))
        return self.dropout(self.act(project("wi")))

    def mixed(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_n weights[:, n] FFN_n(x): x [b, l, d], weights [b, num] -> [b, l, d] (the mix
        folded into the second product)."""
        h = self._hidden(x, "ble,nef->blnf", lambda w: w)
        return torch.einsum("blnf,nfe->ble", h * weights[:, None, :, None], self.wo)

    def gathered(self, x: torch.Tensor, kept: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each example through its k kept FFNs only: kept int [b, k], weights [b, k]
        -> [b, l, d]."""
        h = self._hidden(x, "ble,bkef->blkf", lambda w: w[kept])
        return torch.einsum("blkf,bkfe->ble", h * weights[:, None, :, None], self.wo[kept])

    def each(self, x: torch.Tensor) -> torch.Tensor:
        """Every FFN on x: [b, l, d] -> [num, b, l, d]."""
        h = self._hidden(x, "ble,nef->nblf", lambda w: w)
        return torch.einsum("nblf,nfe->nble", h, self.wo)


class TaskSelector(nn.Module):
    """Selector logits [b, E]: the row of each example's task type in a [task_types, E] table."""

    def __init__(self, num_task_types: int, num_adapters: int, d_model: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_task_types, num_adapters))

    def forward(self, task_ids: Optional[torch.Tensor], route_hidden: torch.Tensor) -> torch.Tensor:
        n = self.logits.shape[0]
        if task_ids is None:
            raise ValueError("task_ids (int[batch], ids into model.task_types) is required: "
                             "the MTA blocks route by task type")
        ids = torch.as_tensor(task_ids, dtype=torch.long, device=self.logits.device).reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
            raise ValueError(f"task_ids must lie in [0, {n}) (model.task_types); got "
                             f"{ids.tolist()}")
        return self.logits[ids]


class StartTokenSelector(nn.Module):
    """Selector logits [b, E]: a linear read-out of the hidden state at the [START] position."""

    def __init__(self, num_task_types: int, num_adapters: int, d_model: int):
        super().__init__()
        self.kernel = nn.Parameter(torch.zeros(d_model, num_adapters))
        self.bias = nn.Parameter(torch.zeros(num_adapters))

    def forward(self, task_ids: Optional[torch.Tensor], route_hidden: torch.Tensor) -> torch.Tensor:
        return route_hidden.float() @ self.kernel + self.bias


SELECTORS = {"task": TaskSelector, "start_token": StartTokenSelector}


def top_k(weights: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [b, k] of the k largest weights per row, the lower index first among
    equal weights (jax.lax.top_k's choice)."""
    values, indices = torch.sort(weights, dim=-1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def own_adapters(task_ids: torch.Tensor, num_adapters: int) -> torch.Tensor:
    """int [b, 2]: each example's task's own adapters {t, t+1} mod E (one column if E = 1)."""
    offsets = torch.arange(min(2, num_adapters), device=task_ids.device)
    return (task_ids.reshape(-1, 1).long() + offsets) % num_adapters


def adapter_weights(logits: torch.Tensor, plug: Mapping[str, Any],
                    task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Selector logits [b, E] -> the task adapters' weights [b, E] (models/mta.py): Softmax-T;
    with top_k, the kept ones (`stage2_selection`: the k largest, or the task's own {t, t+1})
    renormalised to sum 1 with `renormalize`, the others 0."""
    weights = torch.softmax(logits / plug["temperature"], dim=-1)
    if plug["top_k"] is None:
        return weights
    if plug.get("stage2_selection", "top_k") == "own":
        kept = own_adapters(torch.as_tensor(task_ids, device=weights.device), weights.shape[-1])
    else:
        _, kept = top_k(weights, plug["top_k"])
    weights = torch.zeros_like(weights).scatter(-1, kept, weights.gather(-1, kept))
    if plug["renormalize"]:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights


class MTABlock(nn.Module):
    """The mixture in one FFN sub-layer: x [b, l, d_model] (normed) -> [b, l, d_model].

        stage one:  sum_e w_e A_e(x)
        stage two:  g_0 sum_e w_e A_e(x) + sum_j g_j S_j(x),  g = gate(outputs at position 0)

    Parameter names follow the JAX tree below `.../ffn/mta` ('.' for '/').
    """

    def __init__(self, plug: Mapping[str, Any], *, d_model: int, d_ff: int, gated: bool,
                 act: Callable, dropout_rate: float, routing: _Routing):
        super().__init__()
        self.plug, self.routing = dict(plug), routing
        ffn = plug["adapter_kind"] == "ffn"
        stacked = lambda n: StackedFFN(n, d_model, d_ff if ffn else plug["adapter_dim"],
                                       gated=gated and ffn, act=act if ffn else torch.relu,
                                       dropout_rate=dropout_rate)
        self.selector = SELECTORS[plug["selector"]](len(plug["task_types"]),
                                                    plug["num_adapters"], d_model)
        self.adapters = stacked(plug["num_adapters"])
        shared = plug["num_shared_adapters"]
        if shared:
            self.shared_adapters = stacked(shared)
            width, bias = plug["gate_hidden_dim"] or d_model, plug.get("gate_bias", True)
            self.gate_hidden = Dense((1 + shared) * d_model, width, bias=bias)
            self.gate_out = Dense(width, 1 + shared, bias=bias)
        self._gate: Optional[torch.Tensor] = None  # decoder: position 0's gate [b, 1 + S]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.routing
        route = x[:, 0] if r.route_hidden is None else r.route_hidden
        weights = adapter_weights(self.selector(r.task_ids, route), self.plug, r.task_ids)  # [b, E]
        if weights.shape[0] != x.shape[0]:
            raise ValueError(f"task_ids has {weights.shape[0]} rows; the batch has {x.shape[0]}")
        if self.plug["top_k"] is not None and self.plug["topk_compute"] == "gather":
            kept_weights, kept = top_k(weights, self.plug["top_k"])
            y = self.adapters.gathered(x, kept, kept_weights.to(x.dtype))
        else:
            y = self.adapters.mixed(x, weights.to(x.dtype))
        if not self.plug["num_shared_adapters"]:
            return y
        y_shared = self.shared_adapters.each(x)  # [S, b, l, d]
        g = self._gate_weights(y, y_shared).to(y.dtype)  # [b, 1 + S]
        return g[:, None, :1] * y + torch.einsum("sble,bs->ble", y_shared, g[:, 1:])

    def _gate_weights(self, y: torch.Tensor, y_shared: torch.Tensor) -> torch.Tensor:
        """softmax(gate_out(relu(gate_hidden(outputs at position 0)))) in float32: [b, 1 + S]."""
        if self.routing.decoder and not self.routing.at_start:
            if self._gate is None or self._gate.shape[0] != y.shape[0]:
                raise RuntimeError("an MTA decoder step after position 0 needs the gate of "
                                   "position 0: decode from the start token with the cache")
            return self._gate
        first = torch.cat([y[None, :, 0], y_shared[:, :, 0]])  # [1 + S, b, d]
        flat = first.transpose(0, 1).reshape(y.shape[0], -1).float()
        gate = torch.softmax(self.gate_out(torch.relu(self.gate_hidden(flat))), dim=-1)
        if self.routing.decoder:
            self._gate = gate
        return gate


class _Beside(nn.Module):
    """Bottleneck adapters: the dense FFN stays and the MTA block's output is added to it."""

    def __init__(self, dense: nn.Module, mta: MTABlock):
        super().__init__()
        self.dense, self.mta = dense, mta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x) + self.mta(x)


def install_mta(hf_model: nn.Module, plug: Mapping[str, Any], blocks: Mapping[str, Any],
                tensors: Mapping[str, Any], *, where: str = "<tensors>") -> nn.Module:
    """Puts MTA blocks into a Hugging Face T5 in place; returns it.

    plug: the MTAConfig's fields (dataclasses.asdict); blocks: {stack: block indices};
    tensors: {name in the JAX tree, e.g. 'encoder/layers_1/ffn/mta/adapters/wi': array}, checked
    for missing, unexpected and misshapen tensors (CheckpointFormatError naming `where`).
    """
    routing = attach_routing(hf_model)
    c = hf_model.config
    placed, params = [], {}
    for stack in fmt.STACKS:
        for i in blocks[stack]:
            ff = getattr(hf_model, stack).block[i].layer[-1]
            block = MTABlock(plug, d_model=c.d_model, d_ff=c.d_ff, gated=c.is_gated_act,
                             act=ff.DenseReluDense.act, dropout_rate=c.dropout_rate,
                             routing=routing[stack])
            for name, p in block.named_parameters():
                params[f"{stack}/layers_{i}/ffn/mta/{name.replace('.', '/')}"] = p
            placed.append((ff, block))
    fmt.check_tensors(where, {n: tuple(p.shape) for n, p in params.items()},
                      {n: tuple(t.shape) for n, t in tensors.items()})
    with torch.no_grad():
        for name, p in params.items():
            value = tensors[name]
            p.copy_(value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value)))
    for ff, block in placed:
        ff.DenseReluDense = block if plug["adapter_kind"] == "ffn" else _Beside(ff.DenseReluDense,
                                                                               block)
    return hf_model


# --------------------------------------------------------------------------- loading

class MTAT5ForConditionalGeneration(transformers.T5ForConditionalGeneration):
    """Hugging Face's T5 whose `forward`, hence `generate`, takes `task_ids`."""

    def forward(self, *args, task_ids: Optional[torch.Tensor] = None, **kwargs):
        """As T5ForConditionalGeneration.forward; task_ids: int [batch], each row's task type
        as an index into `self.task_types` (the stacks' pre-hooks take it)."""
        return super().forward(*args, task_ids=task_ids, **kwargs)


def _read_adapters(path: epath.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(path.read_bytes())
    except Exception as e:  # noqa: BLE001 -- any unreadable file is one user-facing line
        raise CheckpointFormatError(f"{path}: not a readable safetensors file "
                                    f"({type(e).__name__}: {e})") from e


def load_mta_t5(backbone_folder: str | os.PathLike, adapter_dir: str | os.PathLike, *,
                accept_other_backbone: bool = False) -> MTAT5ForConditionalGeneration:
    """A Hugging Face backbone folder + an adapter artifact -> a T5ForConditionalGeneration
    with the MTA blocks (float32, eval mode), its logits those of the JAX model.

    The backbone is checked as `mta_jax.load_adapters` checks it (artifact_format: the config
    fields and the digest); `accept_other_backbone` accepts other weights on purpose.
    """
    meta = fmt.read_meta(adapter_dir)
    folder = os.fspath(backbone_folder)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise CheckpointFormatError(f"{folder}: no config.json (not a Hugging Face T5 folder)")
    model = MTAT5ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    state = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    fmt.check_backbone(meta, {f: getattr(model.config, f) for f in fmt.SHAPE_FIELDS}, state,
                       where=folder, adapter_dir=os.fspath(adapter_dir),
                       accept_other_backbone=accept_other_backbone)
    path = epath.Path(adapter_dir) / fmt.ADAPTERS_FILE
    install_mta(model, meta["plug"], meta["blocks"], _read_adapters(path), where=str(path))
    model.task_types = tuple(meta["task_types"])
    e, g = meta["eval"], model.generation_config
    g.num_beams = e["beam_size"] if e["decode"] == "beam" else 1
    g.max_new_tokens, g.length_penalty = e["max_decode_length"], e["length_penalty"]
    g.do_sample, g.early_stopping = False, False
    return model.eval()
