"""Shared fixtures: tiny random Hugging Face T5 checkpoints built with transformers + torch."""
import json
import os

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

TINY = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20,
            dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)

# The three shapes a user's folder can have (MTA_SPEC.md: "Test all three shapes").
SHAPES = {
    # v1.0: ReLU, head tied to the embedding, output scaled.
    "v1_0": dict(feed_forward_proj="relu"),
    # v1.1 as transformers 5 saves it: tie_word_embeddings true, scale_decoder_outputs false,
    # no lm_head.weight in the file.
    "v1_1_hf5": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                     num_decoder_layers=3, relative_attention_num_buckets=12),
    # An older v1.1 / Flan folder: tie_word_embeddings false, a separate lm_head.weight.
    "v1_1_old": dict(feed_forward_proj="gated-gelu", num_decoder_layers=1),
}


def make_hf_t5(folder, shape="v1_0", seed=0, **overrides):
    """Save a tiny random T5ForConditionalGeneration in `folder`; returns the torch model."""
    import torch
    import transformers
    from mta_jax.hf import read_safetensors, write_safetensors

    torch.manual_seed(seed)
    kwargs = {**TINY, **SHAPES[shape], **overrides}
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**kwargs)).eval()
    model.save_pretrained(folder)
    if shape == "v1_1_old":
        # Rewrite the folder the way transformers 4 saved untied v1.1 checkpoints.
        cfg_path = os.path.join(folder, "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg["tie_word_embeddings"] = False
        cfg.pop("scale_decoder_outputs", None)
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        path = os.path.join(folder, "model.safetensors")
        tensors = {k: np.array(v) for k, v in read_safetensors(path).items()}
        head = torch.randn(kwargs["vocab_size"], kwargs["d_model"], generator=torch.Generator().manual_seed(seed + 1))
        tensors["lm_head.weight"] = head.numpy()
        write_safetensors(path, tensors)
        model = transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()
    return model


@pytest.fixture(params=sorted(SHAPES))
def hf_shape(request):
    return request.param


def pytest_sessionfinish(session, exitstatus):
    """Under CI=true a skipped test fails the run: parity against PyTorch must really run."""
    if not os.environ.get("CI") or exitstatus != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        reporter.write_line(f"CI: {len(skipped)} test(s) skipped; skips are failures in CI "
                            "(install the test extras: pip install -e '.[test]')", red=True)
        session.exitstatus = 1
