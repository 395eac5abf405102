"""The loss and the train step: (params, opt_state, batch, rng) -> (params, opt_state, metrics).

Freezing has one source, the stage's labels (`optim.param_labels`: 'trainable' | 'frozen'
per parameter, from the `trainable` regex). They decide both halves of it:
  * the loss reads every frozen leaf through `lax.stop_gradient`, so JAX traces no gradient
    for it at all: the compiled stage-two step has no weight-gradient matmul for the frozen
    backbone (tests/unit/test_step.py counts them in the HLO);
  * `optax.multi_transform` gives frozen leaves `set_to_zero()`, which holds no optimizer
    state, so they come out of the step unchanged.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import optax
from jax import lax

from mta_jax import optim
from mta_jax.models import t5 as t5_lib

Batch = Mapping[str, jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits: float32 [b, t, vocab]; labels, mask: [b, t] -> (summed NLL, token count)."""
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def router_metrics(router: Mapping) -> dict[str, jax.Array]:
    """The 'router' collection of one forward pass -> metrics averaged over the routed blocks.

    router/adapter_usage [E] (mean routing weight per adapter or expert), router/confidence
    (mean largest weight), router/gate [1 + S] (stage two), and router/<name> for every scalar
    a plug sows (Switch: load_balancing_loss, router_z_loss, expert_usage, ...), as flaxformer
    logs `expert_usage` / `router_confidence`.
    """
    flat = {k: v[0] if isinstance(v, tuple) else v
            for k, v in flax.traverse_util.flatten_dict(dict(router)).items()}
    by_name: dict[str, list] = {}
    for k, v in flat.items():
        by_name.setdefault(k[-1], []).append(v)
    out = {}
    for name, key in (("adapter_weights", "router/adapter_usage"), ("gate_weights", "router/gate")):
        if name in by_name:
            out[key] = jnp.mean(jnp.stack([jnp.mean(v, axis=0) for v in by_name[name]]), axis=0)
    if "adapter_weights" in by_name:
        out["router/confidence"] = jnp.mean(
            jnp.stack([jnp.mean(jnp.max(v, -1)) for v in by_name["adapter_weights"]]))
    for name, values in by_name.items():
        if all(jnp.ndim(v) == 0 for v in values):
            out.setdefault(f"router/{name}", jnp.mean(jnp.stack(values)))
    return out


def freeze(params: Any, labels: Any) -> Any:
    """`params` with every frozen leaf behind lax.stop_gradient (no gradient is traced for it)."""
    return jax.tree.map(lambda p, l: p if l == optim.TRAINABLE else lax.stop_gradient(p),
                        params, labels)


def make_loss_fn(model: t5_lib.T5):
    """(params, batch, rng, denominator) -> (loss, (nll, tokens, aux loss, router metrics))."""
    def loss_fn(params, batch, rng, denominator):
        logits, state = model.apply(
            {"params": params}, batch["input_ids"], batch["decoder_input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_attention_mask=batch["decoder_attention_mask"], task_ids=batch["task_ids"],
            deterministic=False, rngs={"dropout": rng}, mutable=["router", "losses"])
        nll, ntok = cross_entropy(logits, batch["labels"], batch["decoder_attention_mask"])
        # Auxiliary losses (selector supervision, load balancing, z-loss) are sown weighted.
        aux = sum((jnp.sum(x) for x in jax.tree_util.tree_leaves(state.get("losses", {}))),
                  jnp.zeros(()))
        loss = nll / denominator + aux
        return loss, (nll, ntok, aux, router_metrics(state.get("router", {})))
    return loss_fn


def make_train_step(model: t5_lib.T5, tx: optax.GradientTransformation, labels: Any, *,
                    grad_accum_steps: int = 1):
    """(params, opt_state, batch, rng) -> (params, opt_state, metrics); see the module docstring.

    With grad_accum_steps = n the batch is split into n micro-batches along its first axis;
    their gradients (trainable leaves only) are summed in a scan and normalised by the whole
    batch's target tokens, so the step equals the full-batch step.
    """
    loss_fn = make_loss_fn(model)
    trainable = lambda tree: jax.tree.map(  # frozen leaves -> None: nothing to accumulate
        lambda x, l: x if l == optim.TRAINABLE else None, tree, labels)

    def step(params, opt_state, batch, rng):
        denominator = jnp.maximum(jnp.sum(batch["decoder_attention_mask"]).astype(jnp.float32), 1.0)
        grad_fn = jax.value_and_grad(
            lambda p, b, r: loss_fn(freeze(p, labels), b, r, denominator), has_aux=True)
        if grad_accum_steps == 1:
            (loss, (nll, ntok, aux, router)), grads = grad_fn(params, batch, rng)
        else:
            micro = jax.tree.map(lambda x: x.reshape((grad_accum_steps, -1) + x.shape[1:]), batch)

            def body(carry, xs):
                acc, i = carry
                (l, (n, t, a, r)), g = grad_fn(params, xs, jax.random.fold_in(rng, i))
                acc = jax.tree.map(jnp.add, acc, (trainable(g), l, n, t, a))
                return (acc, i + 1), r

            zeros = (jax.tree.map(jnp.zeros_like, trainable(params)),) + (jnp.zeros(()),) * 4
            ((acc, loss, nll, ntok, aux), _), routers = lax.scan(body, (zeros, 0), micro)
            aux = aux / grad_accum_steps
            router = jax.tree.map(lambda x: jnp.mean(x, axis=0), routers)
            grads = jax.tree.map(lambda l, g, p: g if l == optim.TRAINABLE else jnp.zeros_like(p),
                                 labels, acc, params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        out = {"loss": nll / jnp.maximum(ntok, 1.0), "total_loss": loss, "aux_loss": aux,
               "grad_norm": optax.global_norm(trainable(grads)), "target_tokens": ntok,
               **router}
        return params, opt_state, out

    return step


def dropout_key(seed: int, stage_index: int, impl: str = "threefry2x32") -> jax.Array:
    """A stage's base dropout key (a typed key of `impl`); step i uses fold_in(key, i).

    threefry2x32 draws the same masks on every platform; XLA lowers it to ~20 rounds of
    integer ops per random word, which on TPU was most of a small model's compile time and
    of its compiler-counted work (README, "Compile for TPU"). rbg / unsafe_rbg draw the bits
    with XLA's RngBitGenerator (hardware RNG on TPU).
    """
    return jax.random.fold_in(jax.random.key(seed, impl=impl), stage_index)


RBG_SPMD_FLAG = "--xla_tpu_spmd_rng_bit_generator_unsafe=true"


def libtpu_flags(rng_impl: str) -> tuple[str, ...]:
    """libtpu flags a config's train step is compiled with, by training (mta_jax.main) and by
    mta_jax.compile alike.

    rbg / unsafe_rbg keys get RBG_SPMD_FLAG. Without it XLA's SPMD partitioner draws every
    dropout mask for the global batch on each chip and keeps its slice: compiled for a v5e-8,
    T5-small's stage one (batch 64, 512/64 tokens) accessed 43.5 GB per chip with 2.27 GiB of
    temporaries, against 30.0 GB and 1.33 GiB with it (README, "Compile for a TPU slice").
    The price: the masks depend on the mesh. With remat a block draws its masks again in the
    backward pass; a redraw sharded differently from the forward draw would give other masks
    (jax-ml/jax issue 21046). The activations' logical constraints give both draws the same
    sharding (the test compiles both and compares), and MaxText and AXLearn run this flag with
    remat too. threefry2x32 needs no flag: jax_threefry_partitionable splits its draws.
    """
    return (RBG_SPMD_FLAG,) if rng_impl in ("rbg", "unsafe_rbg") else ()


def state_donation(platform: Optional[str] = None) -> tuple[int, ...]:
    """`donate_argnums` of a train step (params, opt_state, batch, rng) on `platform`
    (default: JAX's default backend).

    On accelerators the parameters and optimizer state are donated, so the step updates them
    in place. XLA CPU instead copies every donated buffer at the start of the step (no
    memory saved, the step slower: benchmarks/README.md), so nothing is donated there.
    """
    return () if (platform or jax.default_backend()) == "cpu" else (0, 1)


def jit_train_step(stage, batch_sharding, *, grad_accum_steps: int = 1,
                   platform: Optional[str] = None):
    """The stage's train step as training runs it: jit with the stage's parameter and
    optimizer-state shardings in and out, the batch split by `batch_sharding`, donation."""
    fn = make_train_step(stage.model, stage.tx, stage.labels, grad_accum_steps=grad_accum_steps)
    return jax.jit(fn, in_shardings=(stage.param_shardings, stage.opt_shardings, batch_sharding, None),
                   out_shardings=(stage.param_shardings, stage.opt_shardings, None),
                   donate_argnums=state_donation(platform))
