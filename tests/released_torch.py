"""PyTorch transcriptions of the authors' MTA classes (EasyNLP `examples/mta`), for the tests.

Written for the tests from the released formulas, on parameters laid out as our Flax MTABlock
lays them out (kernels [in, out], stacked adapters [E, ...]):

    ReleasedStageOne   MTA_noisegate: Softmax-T over a learnable row per task type
    ReleasedShareMoE   MTA_sharemoe4 with S shared experts: the task's own experts {t, t+1},
                       a bias-free gate of width d_model over the outputs at position 0
"""
import numpy as np
import torch

# MTA_sharemoe4's type order: type t mixes experts t and t + 1.
SHAREMOE4_TYPES = ("classify", "nli", "generate", "anaphora_resolution")


def _linear(kernel):
    """A bias-free torch Linear holding a Flax kernel [in, out] (torch stores [out, in])."""
    layer = torch.nn.Linear(*kernel.shape, bias=False)
    layer.weight.data = torch.tensor(np.asarray(kernel).T.copy())
    return layer


class ReleasedFFN(torch.nn.Module):
    """T5DenseActDense: wo(relu(wi(x))), no dropout at evaluation."""

    def __init__(self, wi, wo):
        super().__init__()
        self.wi, self.wo = _linear(wi), _linear(wo)

    def forward(self, x):
        return self.wo(torch.relu(self.wi(x)))


def _experts(stacked):
    return torch.nn.ModuleList(ReleasedFFN(wi, wo) for wi, wo in zip(stacked["wi"], stacked["wo"]))


class ReleasedStageOne(torch.nn.Module):
    """MTA_noisegate: every expert on the batch, then per example the softmax(row / T) of
    its type's learnable row mixes them."""

    def __init__(self, params, rows: dict, temperature: float):
        super().__init__()
        self.experts = _experts(params["adapters"])
        self.rows = {t: torch.tensor(np.asarray(r)) for t, r in rows.items()}
        self.temperature = temperature

    def forward(self, h, type_label):
        outs = [expert(h) for expert in self.experts]
        mixed = []
        for i, kind in enumerate(type_label):
            w = torch.softmax(self.rows[kind] / self.temperature, dim=0)
            mixed.append(sum(out[i] * w[k] for k, out in enumerate(outs)))
        return torch.stack(mixed)


class ReleasedShareMoE(torch.nn.Module):
    """MTA_sharemoe4 with S shared experts: type t mixes experts t and t + 1 with entries t and
    t + 1 of softmax(row_t / T) (not renormalised); the gate Linear((1+S) d -> d, no bias),
    ReLU, Linear(d -> 1+S, no bias), softmax reads the outputs at position 0."""

    def __init__(self, params, rows, temperature: float):
        super().__init__()
        self.experts = _experts(params["adapters"])
        self.shared = _experts(params["shared_adapters"])
        self.rows = torch.tensor(np.asarray(rows))
        self.temperature = temperature
        self.gate = torch.nn.Sequential(
            _linear(params["gate_hidden"]["kernel"]), torch.nn.ReLU(),
            _linear(params["gate_out"]["kernel"]), torch.nn.Softmax(dim=-1))

    def forward(self, h, type_label):
        shared = [expert(h) for expert in self.shared]
        out = []
        for i, kind in enumerate(type_label):
            t = SHAREMOE4_TYPES.index(kind)
            w = torch.softmax(self.rows[t] / self.temperature, dim=0)
            task = self.experts[t](h[i]) * w[t] + self.experts[t + 1](h[i]) * w[t + 1]
            g = self.gate(torch.cat([task[0]] + [s[i][0] for s in shared], 0))
            out.append(task * g[0] + sum(s[i] * g[j + 1] for j, s in enumerate(shared)))
        return torch.stack(out)
