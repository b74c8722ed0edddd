"""Block KV caching (prefix / dual) in the decoding loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dultra_jax
from dultra_jax.decoding import DecodeConfig, generate
from dultra_jax.model.layers import positions_and_mask, rope_tables

MODES = ("prefix", "dual")


def _prompts(seed=0, lengths=(9, 5)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 290, size=n) for n in lengths]


def test_cache_holds_the_layers_keys_and_values(tiny_model, golden):
    ids = jnp.asarray(golden["fwd_input_ids"])
    positions, _ = positions_and_mask(*ids.shape, None)
    hidden, kv = tiny_model.backbone.hidden_states(ids, positions, None, return_kv=True)
    np.testing.assert_allclose(np.asarray(hidden), golden["fwd_last_hidden"], atol=1e-4)
    # recompute every layer's K/V independently with an unrolled pass
    cos, sin = rope_tables(positions, tiny_model.cfg.head_dim, tiny_model.cfg.rope_theta)
    graphdef, stacked = nnx.split(tiny_model.backbone.blocks.layers)
    x = tiny_model.backbone.embed(ids)
    for i in range(tiny_model.cfg.n_layers):
        blk = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked))
        x, layer_kv = blk(x, cos, sin, None)
        np.testing.assert_allclose(np.asarray(kv.keys[i]), np.asarray(layer_kv.keys), atol=1e-5)
        np.testing.assert_allclose(np.asarray(kv.values[i]), np.asarray(layer_kv.values), atol=1e-5)


def _canvas(model, pad_aware):
    ids, mask = dultra_jax.decoding.pad_prompts(_prompts(), model.cfg.pad_token_id)
    canvas = np.concatenate([ids, np.full((2, 16), model.cfg.mask_token_id)], axis=1)
    canvas[:, 9:13] = 7
    attn = jnp.asarray(np.concatenate([mask, np.ones((2, 16), np.int32)], axis=1)) if pad_aware else None
    return jnp.asarray(canvas), attn


@nnx.jit(static_argnames=("start", "width"))
def _cached_vs_full(model, canvas, attn, start, width):
    """(full hidden, full planner logits, window hidden, cached-head block logits), jitted (eager op-by-op
    dispatch of a whole model is slow)."""
    b = canvas.shape[0]
    positions, kmask = positions_and_mask(*canvas.shape, attn)
    hidden, kv = model.backbone.hidden_states(canvas, positions, kmask, return_kv=True)
    t = jnp.asarray([0.3, 0.6])
    mask_index = canvas == model.cfg.mask_token_id
    full_plan, head_kv = model.planner(hidden, t, mask_index, positions, kmask, return_kv=True)
    win = slice(start, start + width)
    fresh = model.backbone.hidden_states(canvas[:, win], positions[:, win], kmask, kv, start)
    query = jnp.broadcast_to(jnp.arange(8), (b, 8))
    plan = model.planner(fresh, t, mask_index[:, win], positions[:, win], kmask, query=query, cache=head_kv,
                         start=start)
    return hidden, full_plan, fresh, plan


@pytest.mark.parametrize("pad_aware", [False, True])
def test_window_over_a_fresh_cache_is_exact(tiny_model, pad_aware):
    """Nothing changed since the cache was filled -> the window's states and the cached head's block logits
    equal the full forward's."""
    canvas, attn = _canvas(tiny_model, pad_aware)
    for start, width in ((9, 16), (9, 8), (17, 8)):
        hidden, full_plan, fresh, plan = _cached_vs_full(tiny_model, canvas, attn, start, width)
        np.testing.assert_allclose(np.asarray(fresh), np.asarray(hidden[:, start:start + width]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(plan), np.asarray(full_plan[:, start:start + 8]), atol=1e-5)


@nnx.jit(static_argnames=("start", "width"))
def _loop_window(model, canvas, attn, cache, start, width, fresh=None):
    """The decoding loop's cached iteration (``loop._window_forward``, prefix, block 8) of the window [start,
    start + width) over ``cache`` = (backbone K/V, head K/V): (block states, planner block logits)."""
    from dultra_jax.decoding import kv_cache
    from dultra_jax.decoding import loop as L

    cfg = L.decode_config(gen_length=16, block_length=8, strategy="planner", cache="prefix")
    rows = L.Rows(keys=None, length=jnp.full((canvas.shape[0],), float(canvas.shape[1])), mask=attn)
    return L._window_forward(model, canvas, rows, start, width, cfg, canvas == model.cfg.mask_token_id,
                             jnp.asarray([0.3, 0.6]), kv_cache.DecodeCache(*cache), fresh)


@pytest.mark.parametrize("pad_aware", [False, True])
def test_a_window_reading_its_first_columns_from_the_cache_is_the_shorter_window(tiny_model, pad_aware):
    """Per-row prefix caching runs block 0's window for every block, the row's finished columns in it read from
    the cache (``fresh``: WindowStart): over a stale cache, each row's block equals that of the window starting
    at the row's block. The stale columns matter (that block differs from the exact forward's), so a window that
    computed them fresh would fail the check."""
    stale, attn = _canvas(tiny_model, pad_aware)
    positions, kmask = positions_and_mask(*stale.shape, attn)
    hidden, bkv = tiny_model.backbone.hidden_states(stale, positions, kmask, return_kv=True)
    _, hkv = tiny_model.planner(hidden, jnp.asarray([0.3, 0.6]), stale == tiny_model.cfg.mask_token_id, positions,
                                kmask, return_kv=True)
    canvas = stale.at[:, 9:21].set(11)  # revealed since the cache was filled: block 0, and some of block 1
    cache = (bkv, hkv)
    # each row's block start (per row: row 0 is at block 1, row 1 at block 0)
    wide = _loop_window(tiny_model, canvas, attn, cache, 9, 16, jnp.asarray([17, 9]))
    exact = tiny_model.backbone.hidden_states(canvas, positions, kmask)
    for r, f in enumerate((17, 9)):
        own = _loop_window(tiny_model, canvas, attn, cache, f, 25 - f)
        for got, want in zip(wide, own, strict=True):
            assert np.isfinite(np.asarray(got)).all()
            np.testing.assert_allclose(np.asarray(got[r]), np.asarray(want[r]), atol=1e-5)
    assert np.abs(np.asarray(wide[0][0]) - np.asarray(exact[0, 17:25])).max() > 1e-3


def test_restricted_head_equals_the_full_canvas_head():
    """Queries/MLP at the block only (keys/values everywhere) give the full head's block logits, also with
    two head layers and per-row blocks."""
    m = dultra_jax.DUltra(dultra_jax.preset("tiny", num_head_layers=2), rngs=nnx.Rngs(3))
    canvas, attn = _canvas(m, True)
    cols = jnp.asarray([[9 + i for i in range(8)], [17 + i for i in range(8)]])

    @nnx.jit
    def both(m, canvas, attn, cols):
        hidden = m.hidden_states(canvas, attn)
        t = jnp.asarray([0.3, 0.6])
        mask_index = canvas == m.cfg.mask_token_id
        return (m.planner_logits(hidden, t, mask_index, attn),
                m.planner_logits(hidden, t, mask_index, attn, query_cols=cols))

    full, part = both(m, canvas, attn, cols)
    np.testing.assert_allclose(np.asarray(part), np.take_along_axis(np.asarray(full), np.asarray(cols), 1),
                               atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kw", [
    dict(strategy="threshold", threshold=0.3), dict(strategy="factor"), dict(strategy="fixed", steps=16),
])
def test_one_layer_model_cache_is_exact_for_baselines(mode, kw):
    """With a single block, cached K/V depend only on tokens that did not change: nothing stale to reuse."""
    m = dultra_jax.DUltra(dultra_jax.preset("tiny", n_layers=1))
    prompts = _prompts(1)
    base = generate(m, prompts, gen_length=32, block_length=8, **kw)
    cached = generate(m, prompts, gen_length=32, block_length=8, cache=mode, **kw)
    np.testing.assert_array_equal(np.asarray(cached.tokens), np.asarray(base.tokens))
    np.testing.assert_array_equal(np.asarray(cached.nfe), np.asarray(base.nfe))
    assert np.all(np.asarray(cached.equivalent_forwards) < np.asarray(base.equivalent_forwards))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kw", [dict(strategy="planner", temperature=0.5), dict(strategy="threshold", threshold=0.5)])
def test_batched_rows_equal_batch1_with_cache(tiny_model, mode, kw):
    prompts = _prompts(2)
    batch = generate(tiny_model, prompts, gen_length=16, block_length=8, cache=mode, rng=4, **kw)
    for i, pr in enumerate(prompts):
        one = generate(tiny_model, [pr], gen_length=16, block_length=8, cache=mode, rng=4, row_seeds=[i],
                       pad_aware=True, **kw)
        np.testing.assert_array_equal(np.asarray(batch.generated[i]), np.asarray(one.generated[0]))
        assert int(batch.nfe[i]) == int(one.nfe[0])


def _xla_window_fractions(model, length, block, windows):
    """{mode: [flops of a cached forward over (start, width) / flops of the full forward]} from XLA's
    cost_analysis of the compiled backbone + LM head (on the block at ``start``)."""
    graphdef, state = nnx.split(model.backbone)
    positions, _ = positions_and_mask(1, length, None)
    ids = jnp.zeros((1, length), jnp.int32)
    _, cache = model.backbone.hidden_states(ids, positions, None, return_kv=True)

    def cached(ids, positions, start, state, cache):
        bb = nnx.merge(graphdef, state)
        return bb.lm_head(bb.hidden_states(ids, positions, None, cache=cache, start=start)[:, :block])

    def exact(ids, positions, start, state, cache):
        bb = nnx.merge(graphdef, state)
        return bb.lm_head(jax.lax.dynamic_slice_in_dim(bb.hidden_states(ids, positions, None), start, block, 1))

    counted = {}  # width -> flops (the start is traced: one compile per width)

    def flops(start, width):
        if width not in counted:
            fn = exact if width == length else cached
            args = (ids[:, :width], positions[:, :width], jnp.int32(start), state, cache)
            cost = jax.jit(fn).lower(*args).compile().cost_analysis()
            counted[width] = float((cost[0] if isinstance(cost, list) else cost)["flops"])
        return counted[width]

    full = flops(windows["dual"][0][0], length)
    return {mode: [flops(s, w) / full for s, w in ws] for mode, ws in windows.items()}


def test_equivalent_forwards_accounting(tiny_model):
    from dultra_jax.decoding.cost import iteration_cost

    prompts = _prompts(3, (12, 12))
    res = {mode: generate(tiny_model, prompts, gen_length=32, block_length=8, strategy="fixed", steps=32,
                          cache=mode) for mode in ("none", "prefix", "dual")}
    np.testing.assert_array_equal(np.asarray(res["none"].equivalent_forwards), np.asarray(res["none"].nfe))
    for mode in MODES:
        np.testing.assert_array_equal(np.asarray(res[mode].nfe), [32, 32])  # every forward counts 1 NFE
    assert np.all(np.asarray(res["dual"].equivalent_forwards) < np.asarray(res["prefix"].equivalent_forwards))
    assert np.all(np.asarray(res["prefix"].equivalent_forwards) < 32)
    # Independent reference: XLA's FLOP count of the compiled programs. Each block costs 1 full forward + 7 cached
    # ones; a cached forward over columns [s, s + w) of the 44-column canvas (dual: the block, w = 8; prefix: the
    # block to the end) costs flops(window) / flops(full) of an exact one, both with the LM head on the block.
    xla = _xla_window_fractions(tiny_model, 44, 8, {"dual": [(s, 8) for s in (12, 20, 28, 36)],
                                                    "prefix": [(s, 44 - s) for s in (12, 20, 28, 36)]})
    for mode in MODES:  # measured: the package's count is 4-10% under XLA's (which adds norms, softmax, RoPE)
        np.testing.assert_allclose(np.asarray(res[mode].equivalent_forwards), 4 + 7 * sum(xla[mode]), rtol=0.2)
    # the planner's head is counted: a cached planner iteration saves less than the backbone alone would
    cfg = tiny_model.cfg
    head_too = iteration_cost(cfg, 44, 8, 8, planner=True) / iteration_cost(cfg, 44, 44, 8, planner=True)
    backbone_only = iteration_cost(cfg, 44, 8, 8, planner=False) / iteration_cost(cfg, 44, 44, 8, planner=False)
    assert backbone_only < head_too < 1
    plan = generate(tiny_model, prompts, gen_length=32, block_length=8, cache="dual", strategy="planner",
                    reveal="topk", max_iterations=32)
    nfe, eq = np.asarray(plan.nfe), np.asarray(plan.equivalent_forwards)
    cached = nfe - 4  # each block's first iteration is exact
    np.testing.assert_allclose(eq, 4 + cached * head_too, rtol=1e-5)


def test_unknown_cache_mode(tiny_model):
    with pytest.raises(ValueError, match="unknown cache"):
        generate(tiny_model, _prompts(), gen_length=16, block_length=8, cache="paged")
    with pytest.raises(ValueError, match="refresh_rows"):  # per_row + cache works (tests/test_engine.py)
        generate(tiny_model, _prompts(), gen_length=16, block_length=8, cache="dual", schedule="per_row",
                 refresh_rows=0)
    with pytest.raises(ValueError, match=r"refresh='suffix' needs schedule='sync' \(sync batches: `--batching"):
        DecodeConfig(gen_length=16, block_length=8, cache="dual", refresh="suffix", schedule="per_row")
    with pytest.raises(ValueError, match="refresh='suffix' and layer_loop='unrolled' need schedule='sync'"):
        DecodeConfig(gen_length=16, block_length=8, cache="dual", refresh="suffix", layer_loop="unrolled",
                     schedule="per_row")


@pytest.mark.parametrize("mode", MODES)
def test_suffix_refresh_is_exact_for_a_one_layer_model(mode):
    """One layer: every position's K/V depend on its own token only, so recomputing only from the previous block
    onward loses nothing (baseline rule: no planner head, whose K/V see the backbone's whole output)."""
    m = dultra_jax.DUltra(dultra_jax.preset("tiny", n_layers=1))
    prompts = _prompts(1)
    kw = dict(gen_length=24, block_length=8, strategy="threshold", threshold=0.3)
    base = generate(m, prompts, **kw)
    full = generate(m, prompts, cache=mode, **kw)
    suffix = generate(m, prompts, cache=mode, refresh="suffix", **kw)
    np.testing.assert_array_equal(np.asarray(suffix.tokens), np.asarray(base.tokens))
    np.testing.assert_array_equal(np.asarray(suffix.nfe), np.asarray(base.nfe))
    assert np.all(np.asarray(suffix.equivalent_forwards) < np.asarray(full.equivalent_forwards))


@pytest.mark.parametrize("mode", MODES)
def test_suffix_refresh_and_unrolled_layers_run_the_planner(tiny_model, mode):
    """Planner with the cheaper refresh decodes everything; the unrolled layer loop (per-layer weights) gives
    the scanned loop's tokens."""
    prompts = _prompts(2)
    kw = dict(gen_length=16, block_length=8, cache=mode, rng=1)
    scan = generate(tiny_model, prompts, **kw)
    unrolled = generate(tiny_model, prompts, layer_loop="unrolled", **kw)
    np.testing.assert_array_equal(np.asarray(unrolled.tokens), np.asarray(scan.tokens))
    suffix = generate(tiny_model, prompts, refresh="suffix", layer_loop="unrolled", **kw)
    assert not np.any(np.asarray(suffix.generated) == tiny_model.cfg.mask_token_id)


def test_refresh_and_layer_loop_are_validated(tiny_model):
    with pytest.raises(ValueError, match="unknown refresh"):
        generate(tiny_model, _prompts(), gen_length=16, block_length=8, cache="dual", refresh="sometimes")
    with pytest.raises(ValueError, match="needs a cache"):
        generate(tiny_model, _prompts(), gen_length=16, block_length=8, refresh="suffix")
    with pytest.raises(ValueError, match="unknown layer_loop"):
        generate(tiny_model, _prompts(), gen_length=16, block_length=8, layer_loop="vmap")


def test_per_row_prefix_runs_one_window_per_row(tiny_model):
    """Under ``per_row`` the loop vmaps a row's cached iteration over rows, where a ``lax.switch`` over the block
    (one static prefix width per block) would run every block's window for every row. It runs block 0's window
    once instead (its finished columns read from the cache): XLA's FLOPs of the vmapped iteration equal one
    width-G window per row, not the num_blocks windows the switch made."""
    from dultra_jax.decoding import kv_cache
    from dultra_jax.decoding import loop as L

    graphdef, state = nnx.split(tiny_model)
    b, p, g, bl = 2, 8, 32, 8
    cfg = L.decode_config(gen_length=g, block_length=bl, strategy="planner", cache="prefix", schedule="per_row")
    x = jnp.full((b, p + g), tiny_model.cfg.mask_token_id, jnp.int32).at[:, :p].set(5)
    rows = L.Rows(keys=jnp.zeros((b,)), length=jnp.full((b,), float(p + g)), mask=None)
    mi, ts = x == tiny_model.cfg.mask_token_id, jnp.full((b,), 0.5)
    cache = jax.eval_shape(lambda s: L._full_forward(nnx.merge(graphdef, s), x, rows, jnp.full((b,), p), cfg, mi,
                                                     ts)[2], state)

    def per_row(state, x, mi, ts, cache, blk):  # the loop's per-row windows (vmapped over rows)
        return L._per_row_windows(nnx.merge(graphdef, state), x, rows, p + blk * bl, blk, cfg, mi, ts, cache, p)

    def window(state, x, mi, ts, cache):  # the batch's block-0 window: width G for each row
        w_start, width = kv_cache.window_start_width("prefix", p, g, bl, 0)
        return L._window_forward(nnx.merge(graphdef, state), x, rows, w_start, width, cfg, mi, ts, cache)

    def flops(f, *args):
        cost = jax.jit(f).lower(*args).compile().cost_analysis()
        return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

    blk = jnp.asarray([1, 3])
    got, one_window = flops(per_row, state, x, mi, ts, cache, blk), flops(window, state, x, mi, ts, cache)
    assert got == pytest.approx(one_window, rel=0.1)
    all_widths = sum(kv_cache.window_start_width("prefix", p, g, bl, i)[1] for i in range(g // bl))
    assert got < 0.6 * one_window * all_widths / g  # what running every block's window costs
