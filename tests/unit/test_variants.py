"""FFN variants: each builds and keeps shapes; Switch routing, capacity and losses by hand."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from mta_jax import build, step
from mta_jax.errors import ConfigError
from mta_jax.experiments.compare import configure
from mta_jax.models import adapters, ffn, moe, mta
from mta_jax.models.t5 import FfnContext, T5
from tests.helpers import TINY_T5 as TINY
from tests.helpers import init_params

CTX = FfnContext(task_ids=None, route_hidden=None, decode=False, decode_index=None)


def _config(variant):
    config = configure(default.get_config(), variant, total_steps=10)
    config.mta.encoder_layers = config.mta.decoder_layers = "last"
    return config


def _flat(params):
    return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}


@pytest.mark.slow  # over 3 s on 2 cores
@pytest.mark.parametrize("variant", build.VARIANTS)
def test_every_variant_builds_and_keeps_shapes(variant):
    config = _config(variant)
    assert tuple(config.stages) == (("stage1", "stage2") if variant == "mta" else ("stage1",))
    plug = build.ffn_plug(config, "stage1")
    assert (plug is None) == (variant == "dense")
    if variant.startswith("mta"):  # the MTA block's arithmetic is tested in test_mta.py
        assert isinstance(plug, mta.MTAConfig) and plug.top_k is None
        assert variant == "mta_stage1" or build.ffn_plug(config, "stage2").top_k == 2
    model = T5(TINY.replace(ffn_plug=plug))
    params = init_params(model, batch=3)
    ids = jnp.asarray(np.random.default_rng(0).integers(2, 64, (3, 7)))
    dec = ids[:, :5]
    logits, state = jax.jit(lambda p: model.apply(
        {"params": p}, ids, dec, task_ids=jnp.array([0, 1, 3]), mutable=["router", "losses"]))(params)
    assert logits.shape == (3, 5, 64) and bool(jnp.all(jnp.isfinite(logits)))
    paths = _flat(params)
    name = {"shared_adapter": "shared_adapter", "switch_moe": "moe", "task_moe": "moe",
            "mta_stage1": "mta", "mta": "mta"}.get(variant)
    plugged = [p for p in paths if name and f"/{name}/" in p]
    # One plugged block per stack (the last), nowhere else.
    assert {p.split("/")[0] + "/" + p.split("/")[1] for p in plugged} == (
        set() if name is None else {"encoder/layers_1", "decoder/layers_1"})
    if variant in ("switch_moe", "task_moe"):
        e = 5
        assert paths["encoder/layers_1/ffn/moe/experts/wi_0"].shape == (e, 16, 24)
        assert "encoder/layers_1/ffn/mlp/wi_0" not in paths  # the experts replace the FFN
    if variant.startswith("mta"):
        # Stage one: five FFN copies replace the FFN, mixed by the task's selector row.
        assert paths["encoder/layers_1/ffn/mta/adapters/wi_0"].shape == (5, 16, 24)
        assert paths["decoder/layers_1/ffn/mta/selector/logits"].shape == (5, 5)
        assert "encoder/layers_1/ffn/mlp/wi_0" not in paths
        weights = _flat(state["router"])["encoder/layers_1/ffn/mta/adapter_weights"][0]
        np.testing.assert_allclose(weights, jax.nn.softmax(
            paths["encoder/layers_1/ffn/mta/selector/logits"][np.array([0, 1, 3])] / 0.1), rtol=1e-6)
    if variant == "shared_adapter":
        assert paths["decoder/layers_1/ffn/shared_adapter/adapter/wi"].shape == (1, 16, 384)
        assert "decoder/layers_1/ffn/mlp/wo" in paths  # the adapter joins the FFN
    if variant == "switch_moe":
        losses = _flat(state["losses"])
        assert len(losses) == 4  # two losses in each of two MoE blocks
        # Training logs every scalar router statistic, averaged over the MoE blocks.
        metrics = step.router_metrics(state["router"])
        router = _flat(state["router"])
        balance = [v[0] for k, v in router.items() if k.endswith("/load_balancing_loss")]
        assert len(balance) == 2
        np.testing.assert_allclose(metrics["router/load_balancing_loss"], np.mean(balance),
                                   rtol=1e-6)
        assert {"router/router_z_loss", "router/fraction_tokens_left_behind",
                "router/expert_usage", "router/router_confidence"} <= set(metrics)
        assert metrics["router/adapter_usage"].shape == (5,)


def test_stage_two_plug_reads_topk_fields():
    config = _config("mta")
    config.mta.top_k, config.mta.topk_compute = 3, "gather"
    plug = build.ffn_plug(config, "stage2")
    assert (plug.top_k, plug.topk_compute, plug.num_shared_adapters) == (3, "gather", 1)
    config.mta.topk_compute = "sparse"
    with pytest.raises(ConfigError, match=r"mta\.topk_compute must be 'dense' or 'gather'"):
        build.validate_config(config)


def test_stage_two_only_for_mta():
    config = _config("switch_moe")
    config.stages = ("stage1", "stage2")
    with pytest.raises(ConfigError, match=r"config.stages must be \('stage1',\)"):
        build.ffn_plug(config, "stage1")
    config.variant = "moe"
    with pytest.raises(ConfigError, match="config.variant must be one of"):
        build.ffn_plug(config, "stage1")


def test_configure_splits_mta_steps_in_the_stage_ratio():
    base = default.get_config()  # stage1 10000 : stage2 5000
    config = configure(base, "mta", total_steps=30)
    assert (config.stage1.num_train_steps, config.stage2.num_train_steps) == (20, 10)
    assert configure(base, "dense", total_steps=30).stage1.num_train_steps == 30
    assert configure(base, "task_moe").stage1.num_train_steps == 15000
    assert base.stage1.num_train_steps == 10000 and base.variant == "mta"  # a copy


@pytest.mark.slow  # over 3 s on 2 cores
def test_shared_adapter_starts_as_the_plain_ffn():
    plug = build.ffn_plug(_config("shared_adapter"), "stage1")
    model, plain = T5(TINY.replace(ffn_plug=plug)), T5(TINY)
    params = init_params(model, seed=1)
    backbone = flax.traverse_util.unflatten_dict(
        {k: v for k, v in flax.traverse_util.flatten_dict(params).items() if "shared_adapter" not in k})
    ids = jnp.asarray(np.random.default_rng(1).integers(2, 64, (2, 6)))
    np.testing.assert_allclose(jax.jit(lambda p: model.apply({"params": p}, ids, ids))(params),
                               jax.jit(lambda p: plain.apply({"params": p}, ids, ids))(backbone),
                               atol=1e-6)


# ----------------------------------------------------------------------------- Switch

def test_load_balancing_loss_values():
    e, t = 4, 12
    uniform = jnp.full((t, e), 1.0 / e)
    # Uniform probabilities give 1.0 whatever the argmax (here every tie goes to expert 0).
    np.testing.assert_allclose(moe.load_balancing_loss(uniform, jnp.zeros(t, jnp.int32)), 1.0, rtol=1e-6)
    # Balanced one-hot routing: f = P = 1/E -> 1.0; all tokens on one expert: f = P = e_0 -> E.
    balanced = jax.nn.one_hot(jnp.arange(t) % e, e)
    np.testing.assert_allclose(moe.load_balancing_loss(balanced, jnp.arange(t) % e), 1.0, rtol=1e-6)
    collapsed = jax.nn.one_hot(jnp.zeros(t, jnp.int32), e)
    np.testing.assert_allclose(moe.load_balancing_loss(collapsed, jnp.zeros(t, jnp.int32)), e, rtol=1e-6)
    # A hand-made case: P = (0.7, 0.1, 0.1, 0.1) everywhere, half the argmaxes on 0, half on 1.
    probs = jnp.tile(jnp.array([0.7, 0.1, 0.1, 0.1]), (t, 1))
    idx = jnp.array([0, 1] * (t // 2))
    np.testing.assert_allclose(moe.load_balancing_loss(probs, idx), 4 * (0.5 * 0.7 + 0.5 * 0.1), rtol=1e-6)


def test_router_z_loss_value():
    logits = jnp.array([[0.0, 0.0], [np.log(3.0), 0.0]])
    expected = np.mean([np.log(2.0) ** 2, np.log(4.0) ** 2])
    np.testing.assert_allclose(moe.router_z_loss(logits), expected, rtol=1e-6)


def test_top1_dispatch_one_expert_per_token_and_capacity():
    # 6 tokens, 3 experts; argmaxes 0, 0, 1, 0, 2, 0 with capacity 2: tokens 3 and 5 are dropped.
    choice = jnp.array([0, 0, 1, 0, 2, 0])
    probs = (0.6 * jax.nn.one_hot(choice, 3) + 0.2)[None]  # [1, 6, 3], rows sum to 1.2: fine
    dispatch, combine, index = map(np.asarray, moe.top1_dispatch(probs, capacity=2))
    per_token = np.asarray(dispatch.sum(axis=(-1, -2)))[0]
    np.testing.assert_array_equal(per_token, [1, 1, 1, 0, 1, 0])
    np.testing.assert_array_equal(index[0], choice)
    assert float(dispatch.sum(axis=(1,)).max()) == 1.0  # one token per expert slot
    np.testing.assert_array_equal(np.argmax(dispatch[0].sum(-1), -1)[[0, 1, 2, 4]], [0, 0, 1, 2])
    np.testing.assert_array_equal(dispatch[0, 1, 0], [0, 1])  # second token of expert 0: slot 1
    np.testing.assert_allclose(combine, dispatch * 0.8)
    # Under capacity every token goes to exactly one expert.
    dispatch, _, _ = moe.top1_dispatch(probs, capacity=6)
    np.testing.assert_array_equal(dispatch.sum(axis=(-1, -2)), np.ones((1, 6)))
    assert moe.expert_capacity(48, 5, 1.25) == 12 and moe.expert_capacity(1, 5, 1.25) == 1


def _switch(capacity_factor=1.25, **kw):
    plug = moe.SwitchConfig(capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor,
                            num_experts=3, **kw)
    module = moe.SwitchMoE(TINY, plug)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 16))
    params = flax.linen.unbox(module.init(jax.random.PRNGKey(1), x, CTX, deterministic=True))["params"]
    return module, params, x


@pytest.mark.slow  # over 3 s on 2 cores
def test_switch_dropped_tokens_pass_through_and_kept_tokens_use_their_expert():
    module, params, x = _switch(capacity_factor=0.34, load_balance_weight=0.5, z_loss_weight=0.1)
    y, state = module.apply({"params": params}, x, CTX, deterministic=True,
                            mutable=["router", "losses"])
    logits = x @ params["router"]
    probs = jax.nn.softmax(logits, -1)
    capacity = moe.expert_capacity(9, 3, 0.34)  # 2 slots per expert, 6 of 9 tokens at most
    dispatch, _, index = moe.top1_dispatch(probs, capacity)
    kept = np.asarray(dispatch.sum(axis=(-1, -2))) > 0
    assert (~kept).sum() >= 3
    # Dropped tokens: the plug gives exactly zero, so the block's residual carries them unchanged.
    np.testing.assert_array_equal(np.asarray(y)[~kept], 0.0)
    # Kept tokens: probability of their expert times that expert's FFN.
    w = params["experts"]
    we = {k: v[index] for k, v in w.items()}  # each token's own expert: [b, t, ...]
    h = jax.nn.gelu(jnp.einsum("bte,btef->btf", x, we["wi_0"]), approximate=True) * \
        jnp.einsum("bte,btef->btf", x, we["wi_1"])
    expected = jnp.take_along_axis(probs, index[..., None], -1) * jnp.einsum("btf,btfe->bte", h, we["wo"])
    np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(expected)[kept], rtol=1e-4, atol=1e-6)
    # Losses are sown weighted; the router collection holds the raw values and metrics.
    router = {k[-1]: v[0] for k, v in flax.traverse_util.flatten_dict(state["router"]).items()}
    losses = {k[-1]: v[0] for k, v in flax.traverse_util.flatten_dict(state["losses"]).items()}
    np.testing.assert_allclose(losses["load_balancing_loss"],
                               0.5 * moe.load_balancing_loss(probs, index), rtol=1e-6)
    np.testing.assert_allclose(losses["router_z_loss"], 0.1 * moe.router_z_loss(logits), rtol=1e-6)
    np.testing.assert_allclose(router["fraction_tokens_left_behind"], (~kept).mean(), rtol=1e-6)
    np.testing.assert_allclose(router["expert_usage"], kept.sum() / (2 * 3 * capacity), rtol=1e-6)
    assert router["adapter_weights"].shape == (2, 3)


@pytest.mark.slow  # over 3 s on 2 cores
def test_task_moe_routes_by_task_id():
    plug = moe.TaskMoEConfig(task_types=("a", "b", "c"))
    module = moe.TaskMoE(TINY, plug)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 16))
    ctx = CTX.replace(task_ids=jnp.array([2, 0, 2]))
    params = flax.linen.unbox(module.init(jax.random.PRNGKey(1), x, ctx, deterministic=True))["params"]
    y, state = module.apply({"params": params}, x, ctx, deterministic=True, mutable=["router"])
    w = {k: v[jnp.array([2, 0, 2])] for k, v in params["experts"].items()}
    h = jax.nn.gelu(jnp.einsum("ble,bef->blf", x, w["wi_0"]), approximate=True) * \
        jnp.einsum("ble,bef->blf", x, w["wi_1"])
    np.testing.assert_allclose(y, jnp.einsum("blf,bfe->ble", h, w["wo"]), rtol=1e-4, atol=1e-6)
    weights = flax.traverse_util.flatten_dict(state["router"])[("adapter_weights",)][0]
    np.testing.assert_array_equal(weights, np.eye(3)[[2, 0, 2]])
    with pytest.raises(ConfigError, match="task_ids"):
        module.apply({"params": params}, x, CTX, deterministic=True)


def test_experts_start_as_copies_of_the_pretrained_ffn():
    model = T5(TINY.replace(ffn_plug=moe.SwitchConfig(num_experts=3)))
    boxed = jax.eval_shape(lambda: init_params_boxed(model))
    rng = np.random.default_rng(0)
    dense = {("encoder", "layers_1", "ffn", "mlp", w): rng.normal(size=shape)
             for w, shape in (("wi_0", (16, 24)), ("wi_1", (16, 24)), ("wo", (24, 16)))}
    copies = ffn.stacked_copies_of_dense(boxed, dense)
    # Exactly the encoder's experts (the decoder's FFN is not in `dense`); not the router.
    assert sorted(copies) == sorted(("encoder", "layers_1", "ffn", "moe", "experts", w)
                                    for w in ("wi_0", "wi_1", "wo"))
    for (*_, w), value in copies.items():
        assert value.shape[0] == 3
        for e in range(3):
            np.testing.assert_array_equal(value[e], dense[("encoder", "layers_1", "ffn", "mlp", w)])


def test_bottleneck_adapters_are_not_copies_of_the_ffn():
    plug = mta.MTAConfig(adapter_kind="bottleneck", adapter_dim=24, encoder_layers="last",
                         decoder_layers="last")  # the FFN's width, yet not an FFN copy
    boxed = jax.eval_shape(lambda: init_params_boxed(T5(TINY.replace(ffn_plug=plug))))
    dense = {("encoder", "layers_1", "ffn", "mlp", "wo"): np.ones((24, 16))}
    assert ffn.stacked_copies_of_dense(boxed, dense) == {}


def init_params_boxed(model):
    from mta_jax.models.t5 import init_params as boxed_init
    return boxed_init(model, jax.random.PRNGKey(0))


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="moe.capacity_factor"):
        moe.SwitchConfig(capacity_factor=0.0)
    with pytest.raises(ConfigError, match="mta.encoder_layers"):
        T5(TINY.replace(ffn_plug=moe.TaskMoEConfig(encoder_layers=(5,))))
    with pytest.raises(ConfigError, match="moe.adapter_dim"):
        adapters.SharedAdapterConfig(adapter_dim=0)
