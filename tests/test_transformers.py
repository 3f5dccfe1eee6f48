"""AttnLRP and CP-LRP on transformers: equal to LXT 2.1 on torch twins, and the engine's
transformer rules against their definitions."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require
from flax import nnx
from transformer_twins import Decoder, NNXViT, randomized, small_vit

from lenet_jax import explain
from lenet_jax.models import explained, init_params

pytestmark = pytest.mark.usefixtures("float64")


def linen_vit(seed):
    model = small_vit()
    params = randomized(init_params(model, jax.random.key(seed)), seed)
    x = jax.random.normal(jax.random.key(seed + 1), (3, 28, 28, 1), jnp.float64)
    return explained(model, params), params, x, 2


def nnx_vit(seed):
    model = NNXViT(rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p: p, randomized(state, seed)))
    model.eval()
    params = nnx.state(model, nnx.Param).to_pure_dict()
    x = jax.random.normal(jax.random.key(seed + 1), (3, 28, 28, 1), jnp.float64)
    return model, params, x, 2


def decoder(seed):
    model = Decoder()
    emb = jax.random.normal(jax.random.key(seed + 1), (3, 6, 16), jnp.float64)
    params = randomized(model.init(jax.random.key(seed), emb)["params"], seed)
    return functools.partial(model.apply, {"params": params}), params, emb, 2


MODELS = {"linen_vit": linen_vit, "nnx_vit": nnx_vit, "decoder": decoder}


def non_argmax_targets(f, x):
    """For each sample the class ranked second: a target that is not the prediction."""
    return jnp.argsort(f(x), axis=1)[:, -2].astype(jnp.int32)


@pytest.mark.peers
@pytest.mark.parametrize("variant", ["attn_lrp", "cp_lrp"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_equals_lxt_on_a_torch_twin(name, variant):
    require("lxt")
    from twins import lxt_relevance, twin_logits
    from twins import transformer_twin as torch_twin

    f, params, x, heads = MODELS[name](seed=3)
    twin = torch_twin("decoder" if name == "decoder" else "vit", params, variant, heads)
    # LXT's RMSNorm patch computes in float32, even in a float64 model: the decoder's bounds are
    # float32's, the ViTs' float64's
    bound = 1e-5 if name == "decoder" else 1e-6
    np.testing.assert_allclose(twin_logits(twin, x), f(x), rtol=0, atol=bound * 10)
    target = non_argmax_targets(f, x)
    ours = np.asarray(explain.lrp(f, x, target, composite=variant))
    theirs = lxt_relevance(twin, x, target)
    scale = np.abs(theirs).max()
    assert scale > 0
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=bound * scale)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_jit_equals_eager_and_batches_equal_single_samples(name):
    f, params, x, _ = MODELS[name](seed=5)
    target = non_argmax_targets(f, x)
    jitted = jax.jit(lambda x, t: explain.lrp(f, x, t, composite="attn_lrp"))
    batch = jitted(x, target)
    # nnx.MultiHeadAttention (jax.nn.dot_product_attention) computes its softmax in float32
    atol = (1e-6 if name == "nnx_vit" else 1e-12) * np.abs(batch).max()
    if name == "linen_vit":  # eager (op by op, each op compiled on its own: slow) once
        eager = explain.lrp(f, x, target, composite="attn_lrp")
        np.testing.assert_allclose(batch, eager, rtol=0, atol=atol)
    for i in (0, x.shape[0] - 1):  # the first and the last sample on their own (jitted: one shape)
        single = jitted(x[i : i + 1], target[i : i + 1])
        np.testing.assert_allclose(single[0], batch[i], rtol=0, atol=atol)


@pytest.mark.parametrize("variant", ["attn_lrp", "cp_lrp"])
def test_conservation_layer_by_layer_names_the_blocks(variant):
    """With zero biases and ε = 1e-9 both variants conserve the target logit through the head, the
    final LayerNorm, the MLPs and the residual sums. AttnLRP's softmax rule does not conserve (the
    softmax's relevance ``x ⊙ (R − s ΣR)`` sums to ``ΣR (1 − Σ x s)``), so its blocks do not;
    CP-LRP holds the attention constant, and its blocks do. The class token and the position
    embedding take their share before the patch embedding."""
    model = small_vit()
    params = randomized(init_params(model, jax.random.key(1)), 1)
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.zeros_like(p) if path[-1].key == "bias" else p, params
    )
    f = explained(model, params)
    x = jax.random.normal(jax.random.key(2), (2, 28, 28, 1), jnp.float64)
    rel = explain.lrp_layerwise(f, x, 3, composite=variant, epsilon=1e-9)
    sums = explain.conservation(rel)
    logit = f(x)[:, 3]
    for name in ("head", "ln", "block_1", "block_1/attn", "block_1/mlp_out", "block_0"):
        assert name in rel
    np.testing.assert_allclose(sums["head"], logit, rtol=1e-7)
    np.testing.assert_allclose(sums["ln"], logit, rtol=1e-7)
    blocks_conserve = np.allclose(sums["block_0"], logit, rtol=1e-7)
    assert blocks_conserve == (variant == "cp_lrp")
    assert not np.allclose(sums["input"], sums["block_0"], rtol=1e-3)
    np.testing.assert_allclose(sums["input"], sums["embed"], rtol=1e-7)


def test_query_scaling_is_not_merged_under_attn_lrp_but_is_under_zennit_composites():
    """LXT applies ε to each layer's own output ``Wx + b``; zennit's canonizers merge the affine
    chain after a layer. Here the chain is a scaling by 3 after a dense layer."""
    w1 = jnp.array([[1.0, -2.0], [0.5, 1.5]], jnp.float64)
    b1 = jnp.array([[0.2, -0.1]], jnp.float64)
    w2 = jnp.array([[1.0], [2.0]], jnp.float64)

    def f(x):
        with jax.named_scope("fc1"):
            h = x @ w1 + b1
        return jnp.tanh(3.0 * h) @ w2

    x = jnp.array([[0.3, -0.2]], jnp.float64)
    eps = 0.5  # large, so that where it applies shows
    z = x @ w1 + b1
    r_out = explain.lrp_layerwise(f, x, 0, composite="attn_lrp", epsilon=eps)["fc1"]
    # the relevance into fc1 is spread by ε on fc1's own output z, not on 3z
    expected = x * ((r_out / (z + eps * jnp.sign(z))) @ w1.T)
    np.testing.assert_allclose(
        explain.lrp(f, x, 0, composite="attn_lrp", epsilon=eps), expected, rtol=1e-12
    )
    merged = explain.lrp(f, x, 0, composite="epsilon", epsilon=eps)
    expected_merged = x * ((3 * r_out / (3 * z + eps * jnp.sign(z))) @ w1.T)
    np.testing.assert_allclose(merged, expected_merged, rtol=1e-12)
    assert not np.allclose(merged, expected, rtol=1e-3)


def test_softmax_rule_is_x_times_r_minus_s_sum_r():
    w = jnp.cos(jnp.arange(20, dtype=jnp.float64)).reshape(4, 5)

    def f(x):
        with jax.named_scope("fc"):
            h = x @ w
        with jax.named_scope("probs"):
            s = jax.nn.softmax(h, axis=-1)
        return s * h  # a product of the softmax and its input

    x = jax.random.normal(jax.random.key(0), (3, 4), jnp.float64)
    nodes = explain.lrp_nodes(f, x, "attn_lrp")
    assert nodes["probs/softmax"] == "softmax"
    rel = explain.lrp_layerwise(f, x, 1, composite="attn_lrp")
    h = x @ w
    s = jax.nn.softmax(h, axis=-1)
    r_s = rel["probs"]
    # the product gives half of the output relevance to each operand
    np.testing.assert_allclose(r_s[:, 1], 0.5 * (s * h)[:, 1], rtol=1e-12)
    r_h_from_softmax = h * (r_s - s * r_s.sum(-1, keepdims=True))
    np.testing.assert_allclose(rel["fc"], r_h_from_softmax + r_s, rtol=1e-10, atol=1e-14)


def hand_written_layer_norm(x, eps=1e-5):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    std = jnp.sqrt(jnp.mean(centred**2, axis=-1, keepdims=True) + eps)
    return centred / std * 1.5 + 0.25


def hand_written_softmax(x):
    e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    return e / jnp.sum(e, axis=-1, keepdims=True)


@pytest.mark.parametrize(
    "fn, kind",
    [
        (hand_written_layer_norm, "normalize"),
        (lambda h: h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6), "normalize"),
        (hand_written_softmax, "softmax"),
        (lambda h: jnp.exp(h) / jnp.sum(jnp.exp(h), -1, keepdims=True), "softmax"),
    ],
    ids=["layer_norm", "rms_norm", "softmax", "softmax_without_shift"],
)
def test_hand_written_norms_and_softmax_are_recognised(fn, kind):
    w = jnp.sin(jnp.arange(24, dtype=jnp.float64)).reshape(4, 6)

    def f(x):
        with jax.named_scope("fc"):
            h = x @ w
        with jax.named_scope("op"):
            h = fn(h)
        return h[:, :3] * 2.0

    x = jax.random.normal(jax.random.key(1), (2, 4), jnp.float64)
    assert explain.lrp_nodes(f, x, "attn_lrp")[f"op/{kind}"] == kind
    rel = explain.lrp_layerwise(f, x, 0, composite="attn_lrp")
    h = x @ w
    if kind == "normalize":  # the statistic held constant: the map is linear, R_in = h ⊙ Jᵀ(R/y)
        y, back = jax.vjp(lambda v: _with_held_statistic(fn, v, h), h)
        expected = h * back(rel["op"] / y)[0]
    else:
        s = fn(h)
        expected = h * (rel["op"] - s * rel["op"].sum(-1, keepdims=True))
    np.testing.assert_allclose(rel["fc"], expected, rtol=1e-10, atol=1e-14)


def _with_held_statistic(fn, v, h):
    """``fn`` at ``v`` with its normalising statistic taken at ``h`` (linear in ``v``)."""
    if fn is hand_written_layer_norm:
        c = h - h.mean(-1, keepdims=True)
        std = jnp.sqrt(jnp.mean(c**2, -1, keepdims=True) + 1e-5)
        return (v - v.mean(-1, keepdims=True)) / std * 1.5 + 0.25
    return v * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6)


@pytest.mark.parametrize(
    "fn, name",
    [
        (lambda h: jnp.exp(h) / (jnp.sum(jnp.exp(h), -1, keepdims=True) + 1.0), "div"),
        (lambda h: jnp.tanh(h) * jnp.mean(h, -1, keepdims=True), "mul"),
        (lambda h: jnp.sort(h, axis=-1), "sort"),
    ],
    ids=["softmax_like", "gate_by_own_mean", "sort"],
)
def test_operations_without_a_rule_are_one_line_errors(fn, name):
    def f(x):
        with jax.named_scope("fc"):
            h = x @ jnp.ones((4, 5), x.dtype)
        with jax.named_scope("odd"):
            h = fn(h)
        return h[:, :3]

    x = jax.random.normal(jax.random.key(2), (2, 4), jnp.float64)
    with pytest.raises(ValueError) as err:
        explain.lrp(f, x, composite="attn_lrp")
    assert str(err.value).startswith(f"no LRP rule for the operation '{name}' in layer 'odd': ")
    assert "\n" not in str(err.value)


def test_cp_lrp_gives_the_attention_no_relevance():
    f, _, x, _ = linen_vit(seed=7)
    rel = explain.lrp_layerwise(f, x, 1, composite="cp_lrp")
    nodes = explain.lrp_nodes(f, x, "cp_lrp")
    assert nodes["block_0/attn/softmax"] == "softmax"
    from lenet_jax.explain.engine import plan
    from lenet_jax.explain.graph import trace

    p = plan(trace(f, x), "bias")
    products = [n for n in p.nodes if n.kind == "product"]
    assert [n.weights is not None for n in products] == [False, True] * 2  # q·kᵀ, then A·v
    # the same as holding the attention constant: AttnLRP with the uniform rule replaced by cp
    np.testing.assert_array_equal(
        explain.lrp(f, x, 1, composite="attn_lrp", rules={"product": "cp"}), rel["input"]
    )


def test_rules_override_kinds_and_nodes_by_name():
    f, _, x, _ = linen_vit(seed=8)
    base = explain.lrp(f, x, 0, composite="attn_lrp")
    by_kind = explain.lrp(f, x, 0, composite="attn_lrp", rules={"sum": "norm"})
    table = dataclasses.replace(explain.COMPOSITES["attn_lrp"], sum="norm")
    np.testing.assert_array_equal(explain.lrp(f, x, 0, composite=table), by_kind)
    # zennit's Norm rule stabilizes the residual sums by 1e-6: close to the exact split, not equal
    assert 0 < np.abs(by_kind - base).max() < 1e-3 * np.abs(base).max()
    names = list(explain.lrp_nodes(f, x, "attn_lrp"))
    assert "block_1/attn/softmax" in names and "head" in names
    one = explain.lrp(f, x, 0, composite="attn_lrp", rules={"block_1/attn/softmax": "gradient"})
    assert not np.allclose(one, base)
    same = explain.lrp(f, x, 0, composite="attn_lrp", rules={"head": "epsilon", "softmax": "exact"})
    np.testing.assert_array_equal(same, base)
    with pytest.raises(ValueError, match=r"^rules= names \['softmx'\], neither a node kind"):
        explain.lrp(f, x, composite="attn_lrp", rules={"softmx": "exact"})
    with pytest.raises(ValueError, match=r"^unknown LRP rule 'identity'; choose one of"):
        explain.lrp(f, x, composite="attn_lrp", rules={"softmax": "identity"})


def test_token_relevance_sums_the_hidden_dimension():
    f, _, emb, _ = decoder(seed=9)
    rel = explain.lrp(f, emb, 1, composite="attn_lrp")
    tokens = explain.token_relevance(rel)
    assert tokens.shape == emb.shape[:2]
    np.testing.assert_allclose(tokens, rel.sum(-1), rtol=1e-12)
    # causal: the last token's state reads every token, so each gets relevance
    assert (np.abs(np.asarray(tokens)) > 0).all()
