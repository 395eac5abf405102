"""The MTA block: released initialisation, equivalences, top-k, gradients, conversion, errors."""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mta_jax import load_hf_t5
from mta_jax.errors import ConfigError
from mta_jax.models import ffn
from mta_jax.models import mta as M
from mta_jax.models.t5 import T5
from tests.helpers import TINY_T5 as TINY
from tests.helpers import init_params, make_hf_t5, random_inputs


def _inputs(b=4, seed=0):
    return random_inputs(batch=b, seed=seed)


def _model(**mta):
    plug = M.MTAConfig(**{"encoder_layers": "last", "decoder_layers": "last", **mta})
    model = T5(TINY.replace(ffn_plug=plug))
    return model, init_params(model)


@pytest.mark.slow  # over 3 s on 2 cores
def test_released_initial_logits_and_weights():
    cfg = M.MTAConfig()
    table = cfg.initial_logits()
    np.testing.assert_allclose(table[0], [0.22, 0.22, 0.2, 0.2, 0.2], atol=1e-7)  # classify
    np.testing.assert_allclose(table[3], [0.2, 0.2, 0.2, 0.22, 0.22], atol=1e-7)  # generate
    np.testing.assert_allclose(table[4], [0.22, 0.2, 0.2, 0.2, 0.22], atol=1e-7)
    w = np.asarray(jax.nn.softmax(table / cfg.temperature, axis=-1))
    # Softmax-T at T = 0.1: e^0.2 / (2 e^0.2 + 3) for a task's own adapters.
    own = np.exp(0.2) / (2 * np.exp(0.2) + 3)
    np.testing.assert_allclose(w[0], [own, own] + [(1 - 2 * own) / 3] * 3, rtol=1e-6)
    model, params = _model()
    np.testing.assert_array_equal(params["encoder"]["layers_1"]["ffn"]["mta"]["selector"]["logits"], table)


@pytest.mark.slow  # over 3 s on 2 cores
def test_ffn_copies_equal_plain_t5_whatever_the_weights(tmp_path):
    make_hf_t5(tmp_path, "v1_0")
    plain, p0 = load_hf_t5(str(tmp_path))
    plug = M.MTAConfig(encoder_layers="all", decoder_layers=(-1,))
    mta, p1 = load_hf_t5(str(tmp_path), ffn_plug=plug)
    # Random selector logits: any convex combination of identical adapters is the FFN.
    for stack, layers in (("encoder", (0, 1)), ("decoder", (1,))):
        for i in layers:
            sel = p1[stack][f"layers_{i}"]["ffn"]["mta"]["selector"]
            sel["logits"] = jax.random.normal(jax.random.PRNGKey(i), sel["logits"].shape)
    ids, dec, task_ids = _inputs()
    ids = ids % 96
    a = jax.jit(lambda p: mta.apply({"params": p}, ids, dec, task_ids=task_ids))(p1)
    b = jax.jit(lambda p: plain.apply({"params": p}, ids, dec))(p0)
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-5


@pytest.mark.slow  # over 3 s on 2 cores
def test_bottleneck_adapters_start_as_exact_noop(tmp_path):
    make_hf_t5(tmp_path, "v1_1_hf5")
    plain, p0 = load_hf_t5(str(tmp_path))
    mta, p1 = load_hf_t5(str(tmp_path), ffn_plug=M.MTAConfig(
        adapter_kind="bottleneck", adapter_dim=6, encoder_layers="all", decoder_layers="all"))
    assert p1["decoder"]["layers_0"]["ffn"]["mta"]["adapters"]["wo"].shape == (5, 6, 32)
    assert "mlp" in p1["decoder"]["layers_0"]["ffn"]  # the pretrained FFN stays
    ids, dec, task_ids = _inputs()
    np.testing.assert_array_equal(
        jax.jit(lambda p: mta.apply({"params": p}, ids, dec, task_ids=task_ids))(p1),
        jax.jit(lambda p: plain.apply({"params": p}, ids, dec))(p0))


def _loop_reference(x, p, weights, act, gated):
    """The authors' formulation: a Python loop over examples and adapters."""
    out = np.zeros_like(x)
    for b in range(x.shape[0]):
        for e in range(weights.shape[1]):
            if gated:
                h = act(x[b] @ p["wi_0"][e]) * (x[b] @ p["wi_1"][e])
            else:
                h = act(x[b] @ p["wi"][e])
            out[b] += weights[b, e] * (h @ p["wo"][e])
    return out


@pytest.mark.slow  # over 3 s on 2 cores
@pytest.mark.parametrize("kind", ["ffn", "bottleneck"])
def test_stacked_adapters_equal_a_reference_loop(kind):
    cfg = TINY.replace(feed_forward_proj="relu" if kind == "bottleneck" else "gated-gelu")
    module = ffn.StackedFFN(cfg, num=5, kind=kind, width=None if kind == "ffn" else 5)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 16))
    xs = jnp.broadcast_to(x, (5,) + x.shape)  # every adapter reads the same input
    params = flax.linen.unbox(module.init(jax.random.PRNGKey(1), xs, deterministic=True))
    params = jax.tree_util.tree_map(lambda v: v + 0.1, params)  # non-zero bottleneck output
    w = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(2), (3, 5)), axis=-1)
    every = module.apply(params, xs, deterministic=True)  # [n, b, l, e]
    ours = np.einsum("nble,bn->ble", every, w)
    act = (lambda v: np.asarray(jax.nn.gelu(v, approximate=True))) if kind == "ffn" else (
        lambda v: np.maximum(v, 0))
    ref = _loop_reference(np.asarray(x), jax.tree_util.tree_map(np.asarray, params["params"]),
                          np.asarray(w), act, gated=kind == "ffn")
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    # Per-example selection (top-k "gather") runs each example through its chosen adapters.
    chosen = jnp.array([[4, 1], [0, 0], [2, 3]])
    picked = module.apply(params, x, deterministic=True, select=chosen)  # [b, l, k, e]
    expected = np.stack([np.asarray(every)[chosen[b], b].transpose(1, 0, 2) for b in range(3)])
    np.testing.assert_allclose(np.asarray(picked), expected, atol=1e-5)


@pytest.mark.slow  # over 3 s on 2 cores
@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_k_under_jit_zeroes_exactly_n_minus_k(k):
    model, params = _model(top_k=k, num_shared_adapters=1)
    ids, dec, task_ids = _inputs(b=6)
    step = jax.jit(lambda p, t: model.apply({"params": p}, ids, dec, task_ids=t, mutable=["router"]))
    _, state = step(params, task_ids)
    for stack in ("encoder", "decoder"):
        r = state["router"][stack]["layers_1"]["ffn"]["mta"]
        w = np.asarray(r["adapter_weights"][0])
        assert w.shape == (6, 5)
        assert ((w == 0).sum(axis=1) == 5 - k).all()
        gate = np.asarray(r["gate_weights"][0])
        np.testing.assert_allclose(gate.sum(axis=1), 1.0, rtol=1e-6)


def test_renormalised_top_k_sums_to_one():
    w = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(0), (4, 5)), axis=-1)
    kept = M.top_k_weights(w, 2, renormalize=True)
    np.testing.assert_allclose(np.asarray(kept.sum(-1)), 1.0, rtol=1e-6)
    raw = M.top_k_weights(w, 2, renormalize=False)
    assert float(raw.sum(-1).max()) < 1.0
    top2 = np.sort(np.asarray(w), axis=1)[:, -2:]
    np.testing.assert_allclose(np.sort(np.asarray(raw), axis=1)[:, -2:], top2)


@pytest.mark.slow  # over 3 s on 2 cores
def test_gradients_reach_only_selected_adapters():
    model, params = _model(top_k=2)
    ids, dec, _ = _inputs(b=2)
    task_ids = jnp.array([3, 3], jnp.int32)  # generate: adapters 3 and 4 win at init

    def loss(p):
        return jnp.sum(model.apply({"params": p}, ids, dec, task_ids=task_ids) ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    for stack in ("encoder", "decoder"):
        g = grads[stack]["layers_1"]["ffn"]["mta"]["adapters"]
        for name in ("wi_0", "wi_1", "wo"):
            norms = np.abs(np.asarray(g[name])).reshape(5, -1).sum(axis=1)
            assert (norms[[0, 1, 2]] == 0).all() and (norms[[3, 4]] > 0).all(), (stack, name, norms)


@pytest.mark.slow  # over 3 s on 2 cores
def test_stage_one_to_stage_two_keeps_leaves_bitwise():
    model1, p1 = _model()
    s2 = M.stage_two_config(model1.config.ffn_plug, top_k=2, num_shared_adapters=2)
    model2 = T5(model1.config.replace(ffn_plug=s2))
    p2 = M.stage_two_params(p1, model2, jax.random.PRNGKey(3))
    f1, f2 = (flax.traverse_util.flatten_dict(p) for p in (p1, p2))
    for key, value in f1.items():
        np.testing.assert_array_equal(np.asarray(f2[key]), value)
        assert np.asarray(f2[key]).dtype == value.dtype
    new = sorted("/".join(k) for k in f2 if k not in f1)
    assert new and all("mta" in k and ("shared_adapters" in k or "gate" in k) for k in new)
    shared = f2[("encoder", "layers_1", "ffn", "mta", "shared_adapters", "wo")]
    assert shared.shape == (2, 24, 16)
    np.testing.assert_allclose(shared[0], f1[("encoder", "layers_1", "ffn", "mta", "adapters", "wo")].mean(0),
                               rtol=1e-6)
    ids, dec, task_ids = _inputs()
    logits = jax.jit(lambda p: model2.apply({"params": p}, ids, dec, task_ids=task_ids))(p2)
    assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.slow  # over 3 s on 2 cores
def test_every_mta_parameter_lives_under_an_mta_module():
    model, params = _model(top_k=2, num_shared_adapters=1)
    flat = flax.traverse_util.flatten_dict(params)
    plain = flax.traverse_util.flatten_dict(init_params(T5(TINY)))
    extra = [k for k in flat if k not in plain]
    assert extra and all("mta" in k for k in extra)


@pytest.mark.slow  # over 3 s on 2 cores
def test_start_token_selector_routes_on_the_first_position_not_on_task_ids():
    model, params = _model(selector="start_token")
    ids, dec, task_ids = _inputs()
    sel = params["encoder"]["layers_1"]["ffn"]["mta"]["selector"]
    # A read-out that matters: large weights, so that routing follows the hidden state.
    sel["kernel"] = jnp.asarray(np.random.default_rng(3).standard_normal(sel["kernel"].shape),
                                jnp.float32)
    seen = []

    def record(next_fun, args, kwargs, context):  # the inputs of the block and its selector
        if context.method_name == "__call__" and isinstance(
                context.module, (M.TaskWeightSelector, M.MTABlock)):
            selector = isinstance(context.module, M.TaskWeightSelector)
            seen.append((context.module.path, args[1] if selector else args[0]))
        return next_fun(*args, **kwargs)

    def routing(ids, task_ids):
        with nn.intercept_methods(record):
            logits, state = model.apply({"params": params}, ids, dec, task_ids=task_ids,
                                        mutable=["router"])
        flat = flax.traverse_util.flatten_dict(state["router"])
        return logits, {k[:2]: v[0] for k, v in flat.items() if k[-1] == "selector_weights"}

    logits, weights = routing(ids, None)  # no task ids needed
    assert logits.shape == (4, 6, 64)
    # The weights are Softmax-T of the read-out of the block's input at position 0.
    encoder_hidden = dict(seen)[("encoder", "layers_1", "ffn", "mta", "selector")]
    block_input = dict(seen)[("encoder", "layers_1", "ffn", "mta")]  # [b, length, embed]
    np.testing.assert_array_equal(encoder_hidden, block_input[:, 0])
    np.testing.assert_allclose(
        weights[("encoder", "layers_1")],
        jax.nn.softmax((encoder_hidden @ sel["kernel"] + sel["bias"]) / 0.1), rtol=1e-5, atol=1e-6)
    assert np.ptp(np.asarray(weights[("encoder", "layers_1")]), axis=0).max() > 0.1
    # Task ids change nothing but the auxiliary loss.
    other_logits, other = routing(ids, (task_ids + 1) % 5)
    np.testing.assert_array_equal(other_logits, logits)
    for k in weights:
        np.testing.assert_array_equal(other[k], weights[k])
    # A different first token changes that example's routing, only that example's.
    changed = ids.at[2, 0].set((ids[2, 0] + 7) % 64)
    _, moved = routing(changed, None)
    delta = np.abs(np.asarray(moved[("encoder", "layers_1")] - weights[("encoder", "layers_1")]))
    assert delta[2].max() > 1e-3 and delta[[0, 1, 3]].max() == 0.0


@pytest.mark.slow  # over 3 s on 2 cores
def test_start_token_selector_sows_its_task_loss():
    model, params = _model(selector="start_token")
    ids, dec, task_ids = _inputs()
    _, state = model.apply({"params": params}, ids, dec, task_ids=task_ids, mutable=["router"])
    flat = flax.traverse_util.flatten_dict(state["router"])
    aux = [v[0] for k, v in flat.items() if k[-1] == "selector_task_loss"]
    # Near-uniform routing at init: -log(2/5) for a task's two own adapters.
    assert len(aux) == 2 and all(abs(float(a) - np.log(5 / 2)) < 0.05 for a in aux)


@pytest.mark.parametrize("changes, field", [
    (dict(top_k=0), "mta.top_k"), (dict(top_k=6), "mta.top_k"),
    (dict(temperature=0.0), "mta.temperature"), (dict(adapter_dim=0), "mta.adapter_dim"),
    (dict(num_adapters=0), "mta.num_adapters"), (dict(selector="router"), "mta.selector"),
    (dict(adapter_kind="lora"), "mta.adapter_kind"), (dict(encoder_layers="first"), "mta.encoder_layers"),
])
def test_bad_settings_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        M.MTAConfig(**changes)


def test_layer_outside_the_stack_fails_at_model_build():
    with pytest.raises(ConfigError, match=r"mta\.decoder_layers must be block indices in \[-2, 1\]"):
        TINY.replace(ffn_plug=M.MTAConfig(encoder_layers=(0,), decoder_layers=(11,)))


def test_task_ids_missing_or_out_of_range():
    model, params = _model()
    ids, dec, _ = _inputs()
    with pytest.raises(ConfigError, match="task_ids .* is required"):
        model.apply({"params": params}, ids, dec)
    # Inside jit an out-of-range id cannot raise: the selector's logit row is NaN instead of a
    # clamped row. (Task ids come from the data pipeline, which names an unknown type.)
    table = jnp.asarray(M.MTAConfig().initial_logits())
    rows = jax.jit(ffn.take_or_nan)(table, jnp.array([0, 9, -1, 4], jnp.int32))
    assert np.isnan(np.asarray(rows[1:3])).all()
    np.testing.assert_array_equal(np.asarray(rows)[[0, 3]], np.asarray(table)[[0, 4]])
