"""The PyTorch side: Hugging Face T5 with our weights, and the authors' MTA formulation.

The MTA block is patched into `transformers.T5ForConditionalGeneration` by replacing the
`DenseReluDense` module of the chosen blocks (T5LayerFF keeps its norm, dropout and
residual), in two forms of the same computation:
  * "vectorised": the library's PyTorch runtime (`mta_jax.torch.MTABlock`), the adapters
    stacked on an adapter axis and run together by einsums;
  * "loop" (`LoopMTA`): as the released code computes it, a Python loop over examples and
    adapters.
Both read the task ids passed to the model's forward (`task_ids=`), through
`mta_jax.torch.attach_routing`.
"""
from __future__ import annotations

import dataclasses

import flax
import numpy as np
import torch
import transformers
from torch import nn

from mta_jax import hf
from mta_jax.torch import attach_routing, install_mta

STACKS = ("encoder", "decoder")


def hf_t5(model, params, folder: str) -> transformers.T5ForConditionalGeneration:
    """The same dense weights in PyTorch (our model must have no plug, or a dense copy)."""
    hf.save_hf_t5(folder, model, params)
    return transformers.T5ForConditionalGeneration.from_pretrained(folder)


class _Expert(nn.Module):
    """One adapter as Hugging Face's T5DenseActDense: wi -> ReLU -> dropout -> wo."""

    def __init__(self, wi, wo, dropout_rate: float):
        super().__init__()
        self.wi = nn.Linear(wi.shape[0], wi.shape[1], bias=False)
        self.wo = nn.Linear(wo.shape[0], wo.shape[1], bias=False)
        with torch.no_grad():
            self.wi.weight.copy_(torch.tensor(np.asarray(wi).T))
            self.wo.weight.copy_(torch.tensor(np.asarray(wo).T))
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x):
        return self.wo(self.dropout(torch.relu(self.wi(x))))


class LoopMTA(nn.Module):
    """The released code's form: for each example, for each adapter, add w * adapter(x)."""

    def __init__(self, wi, wo, logits, temperature: float, dropout_rate: float, routing):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(np.asarray(logits)))
        self.temperature, self.routing = temperature, routing
        self.experts = nn.ModuleList(_Expert(wi[e], wo[e], dropout_rate) for e in range(len(wi)))

    def forward(self, x):
        w = torch.softmax(self.logits[self.routing.task_ids] / self.temperature, dim=-1)
        rows = []
        for i in range(x.shape[0]):
            y = 0.0
            for e, expert in enumerate(self.experts):
                y = y + w[i, e] * expert(x[i:i + 1])
            rows.append(y)
        return torch.cat(rows, dim=0)


def patch_mta(hf_model, config, params, form: str = "vectorised"):
    """Replace DenseReluDense in the MTA blocks of `config` by the adapters in `params`.

    config: our T5Config with an MTAConfig plug; params: its parameter tree. The loop form
    mirrors stage one's ReLU FFN adapters only.
    """
    plug = config.ffn_plug
    blocks = {s: plug.layer_indices(s, config.num_layers_of(s)) for s in STACKS}
    if form == "vectorised":
        tensors = {"/".join(k): np.asarray(v)
                   for k, v in flax.traverse_util.flatten_dict(params).items() if "mta" in k}
        return install_mta(hf_model, dataclasses.asdict(plug), blocks, tensors)
    assert plug.adapter_kind == "ffn" and not config.is_gated, "mirrors ReLU FFN adapters only"
    assert plug.top_k is None and plug.num_shared_adapters == 0, "stage one only"
    routing = attach_routing(hf_model)
    for stack in STACKS:
        for i in blocks[stack]:
            p = params[stack][f"layers_{i}"]["ffn"]["mta"]
            getattr(hf_model, stack).block[i].layer[-1].DenseReluDense = LoopMTA(
                np.asarray(p["adapters"]["wi"]), np.asarray(p["adapters"]["wo"]),
                np.asarray(p["selector"]["logits"]), plug.temperature, config.dropout_rate,
                routing[stack])
    return hf_model


def _tensors(batch) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.array(v), dtype=torch.long) for k, v in batch.items()}


def _model_inputs(hf_model, t: dict, *names: str) -> dict[str, torch.Tensor]:
    """The named inputs and the task ids; the stacks' routing hooks (harmless on a dense
    model, which has no MTA block to read them) take the task ids out."""
    attach_routing(hf_model)
    return {**{n: t[n] for n in names}, "task_ids": t["task_ids"]}


def train_step(hf_model, batch, learning_rate: float = 1e-4):
    """A callable running one step: forward, backward, AdamW (no weight decay, as ours)."""
    inputs = _model_inputs(hf_model, _tensors(batch), "input_ids", "attention_mask",
                           "decoder_input_ids", "decoder_attention_mask", "labels")
    hf_model.train()
    opt = torch.optim.AdamW(hf_model.parameters(), lr=learning_rate, weight_decay=0.0,
                            foreach=True)

    def step() -> float:
        out = hf_model(**inputs)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach().item()

    return step


def logits(hf_model, batch) -> np.ndarray:
    """Deterministic logits [b, t, vocab] (eval mode)."""
    inputs = _model_inputs(hf_model, _tensors(batch), "input_ids", "attention_mask",
                           "decoder_input_ids", "decoder_attention_mask")
    hf_model.eval()
    with torch.inference_mode():
        out = hf_model(**inputs)
    return out.logits.float().numpy()


def greedy_generate(hf_model, batch, length: int):
    """A callable running HF greedy `generate` for exactly `length` new tokens per row, on a
    dense model (no task ids)."""
    t = _tensors(batch)
    hf_model.eval()

    def run() -> np.ndarray:
        with torch.inference_mode():
            out = hf_model.generate(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                                    do_sample=False, num_beams=1, max_new_tokens=length,
                                    min_new_tokens=length)
        return out[:, 1:].numpy()  # drop the start token

    return run


def top_ops(fn, n: int = 5) -> list[tuple[str, float, float]]:
    """The n PyTorch ops with the most self CPU time in one call of `fn`:
    (name, seconds, share of the total)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [(e.key, e.self_cpu_time_total / 1e6) for e in prof.key_averages()]
    total = sum(t for _, t in events) or 1.0
    return [(k, t, t / total) for k, t in sorted(events, key=lambda kt: -kt[1])[:n]]
