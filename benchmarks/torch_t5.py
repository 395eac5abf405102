"""The PyTorch side: Hugging Face T5 with our weights, and the authors' MTA formulation.

The MTA block is patched into `transformers.T5ForConditionalGeneration` by replacing the
`DenseReluDense` module of the chosen blocks (T5LayerFF keeps its norm, dropout and
residual), in two forms of the same computation:
  * `VectorisedMTA`: the adapters stacked on an adapter axis, one torch.einsum per matrix;
  * `LoopMTA`: as the released code computes it, a Python loop over examples and adapters.
Both read the task ids set by `set_task_ids` before each forward pass.
"""
from __future__ import annotations

import numpy as np
import torch
import transformers
from torch import nn

from mta_jax import hf


def hf_t5(model, params, folder: str) -> transformers.T5ForConditionalGeneration:
    """The same dense weights in PyTorch (our model must have no plug, or a dense copy)."""
    hf.save_hf_t5(folder, model, params)
    return transformers.T5ForConditionalGeneration.from_pretrained(folder)


class _Routed(nn.Module):
    """Softmax-T task weights from a [task_types, E] logit table and the current task ids."""

    def __init__(self, logits: np.ndarray, temperature: float):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(np.asarray(logits)))
        self.temperature = temperature
        self.task_ids = None  # LongTensor [b], set by set_task_ids

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits[self.task_ids] / self.temperature, dim=-1)  # [b, E]


class VectorisedMTA(_Routed):
    """sum_e w_e * FFN_e(x) with the E FFNs stacked: wi [E, d, f], wo [E, f, d]."""

    def __init__(self, wi, wo, logits, temperature: float, dropout_rate: float):
        super().__init__(logits, temperature)
        self.wi = nn.Parameter(torch.tensor(np.asarray(wi)))
        self.wo = nn.Parameter(torch.tensor(np.asarray(wo)))
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x):  # x: [b, l, d]
        h = self.dropout(torch.relu(torch.einsum("ble,nef->blnf", x, self.wi)))
        h = h * self.weights()[:, None, :, None]
        return torch.einsum("blnf,nfe->ble", h, self.wo)


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


class LoopMTA(_Routed):
    """The released code's form: for each example, for each adapter, add w * adapter(x)."""

    def __init__(self, wi, wo, logits, temperature: float, dropout_rate: float):
        super().__init__(logits, temperature)
        self.experts = nn.ModuleList(_Expert(wi[e], wo[e], dropout_rate) for e in range(len(wi)))

    def forward(self, x):
        w = self.weights()
        rows = []
        for i in range(x.shape[0]):
            y = 0.0
            for e, expert in enumerate(self.experts):
                y = y + w[i, e] * expert(x[i:i + 1])
            rows.append(y)
        return torch.cat(rows, dim=0)


def patch_mta(hf_model, config, params, form: str = "vectorised"):
    """Replace DenseReluDense in the MTA blocks of `config` by the adapters in `params`.

    config: our T5Config with an `ffn` MTAConfig plug (ReLU FFN); params: its parameter tree.
    """
    plug = config.ffn_plug
    assert plug.adapter_kind == "ffn" and not config.is_gated, "mirrors ReLU FFN adapters only"
    assert plug.top_k is None and plug.num_shared_adapters == 0, "stage one only"
    cls = {"vectorised": VectorisedMTA, "loop": LoopMTA}[form]
    for stack, blocks in (("encoder", hf_model.encoder.block), ("decoder", hf_model.decoder.block)):
        for i in plug.layer_indices(stack, len(blocks)):
            p = params[stack][f"layers_{i}"]["ffn"]["mta"]
            module = cls(np.asarray(p["adapters"]["wi"]), np.asarray(p["adapters"]["wo"]),
                         np.asarray(p["selector"]["logits"]), plug.temperature, config.dropout_rate)
            blocks[i].layer[-1].DenseReluDense = module
    return hf_model


def set_task_ids(hf_model, task_ids) -> None:
    ids = torch.as_tensor(np.asarray(task_ids), dtype=torch.long)
    for module in hf_model.modules():
        if isinstance(module, _Routed):
            module.task_ids = ids


def _tensors(batch) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.array(v), dtype=torch.long) for k, v in batch.items()}


def train_step(hf_model, batch, learning_rate: float = 1e-4):
    """A callable running one step: forward, backward, AdamW (no weight decay, as ours)."""
    t = _tensors(batch)
    set_task_ids(hf_model, t["task_ids"])
    hf_model.train()
    opt = torch.optim.AdamW(hf_model.parameters(), lr=learning_rate, weight_decay=0.0,
                            foreach=True)

    def step() -> float:
        out = hf_model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                       decoder_input_ids=t["decoder_input_ids"],
                       decoder_attention_mask=t["decoder_attention_mask"], labels=t["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach().item()

    return step


def logits(hf_model, batch) -> np.ndarray:
    """Deterministic logits [b, t, vocab] (eval mode)."""
    t = _tensors(batch)
    set_task_ids(hf_model, t["task_ids"])
    hf_model.eval()
    with torch.inference_mode():
        out = hf_model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                       decoder_input_ids=t["decoder_input_ids"],
                       decoder_attention_mask=t["decoder_attention_mask"])
    return out.logits.float().numpy()


def greedy_generate(hf_model, batch, length: int):
    """A callable running HF greedy `generate` for exactly `length` new tokens per row."""
    t = _tensors(batch)
    set_task_ids(hf_model, t["task_ids"])
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
