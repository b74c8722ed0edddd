"""Sharding by logical axes on 8 fake CPU devices (tests/conftest.py sets them up before JAX starts)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

import dultra_jax
from dultra_jax.checkpoints import save_converted
from dultra_jax.config import preset
from dultra_jax.model import DUltra, axes
from dultra_jax.multihost import distributed_settings, initialize_distributed
from dultra_jax.parallel import (
    DEFAULT_RULES,
    MeshConfig,
    MeshError,
    MissingAxesError,
    ShardingPlan,
    ShardingRuleError,
    make_mesh,
    param_logical_axes,
    shardings_of,
)


def _host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# ------------------------------------------------------------------------------------------------ mesh
def test_mesh_from_spec(cpu8):
    assert MeshConfig.parse("data=2,fsdp=-1").resolve(8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert MeshConfig.parse("data=-1").resolve(8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert MeshConfig.parse(None).resolve(8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert MeshConfig.parse({"fsdp": 2, "tensor": 4}).resolve(8) == {"data": 1, "fsdp": 2, "tensor": 4}
    mesh = make_mesh("data=1,fsdp=2,tensor=4", devices=cpu8)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 4}
    assert mesh.axis_types == (AxisType.Auto,) * 3


@pytest.mark.parametrize(
    "spec, message",
    [
        ("data=3,fsdp=4", "data=3,fsdp=4,tensor=1 needs 12 devices but 8 are available"),
        ("data=3", "8 devices are not divisible by the fixed axes' product 3"),
        ("pipeline=2", "unknown axis ['pipeline']"),
        ("data=two", "size of 'data' must be an integer"),
        ("data=-1,fsdp=-1", "at most one axis may be -1"),
        ("data=0", "sizes must be positive or -1"),
        ("data:2", "expected AXIS=SIZE items"),
    ],
)
def test_bad_mesh_spec_is_named(cpu8, spec, message):
    with pytest.raises(MeshError) as e:
        make_mesh(spec, devices=cpu8)
    assert message in str(e.value)


# ------------------------------------------------------------------------------------------------ rules
@pytest.mark.parametrize("name", ["tiny", "llada-8b"])
def test_every_parameter_has_logical_axes_with_a_rule(name):
    abstract = nnx.eval_shape(lambda: DUltra(preset(name)))
    state = nnx.state(abstract)
    names = param_logical_axes(state)
    ruled = dict(DEFAULT_RULES)
    shapes = {tuple(p): v.shape for p, v in nnx.to_flat_state(state)}
    assert len(names) == len(shapes) > 20
    for path, logical in names.items():
        assert logical is not None, path
        assert len(logical) == len(shapes[path]), path
        assert all(n in ruled for n in logical), (path, logical)
        assert (logical[0] == axes.LAYERS) == ("layers" in path), (path, logical)


def test_rules_must_name_axes_of_the_mesh(cpu8):
    other = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,), devices=cpu8)
    with pytest.raises(MeshError, match=r"mesh axes \['data', 'fsdp', 'tensor'\] that mesh \{'model': 8\} lacks"):
        ShardingPlan(other)
    plan = ShardingPlan(other, rules=((axes.EMBED, "model"),))
    assert plan.spec([axes.EMBED], [16]) == PartitionSpec("model")


def test_parameter_without_logical_axes_is_rejected(cpu8):
    plan = ShardingPlan.create("fsdp=8", devices=cpu8)
    _, state = nnx.split(nnx.Linear(8, 8, rngs=nnx.Rngs(0)))  # plain flax layer: no logical names
    with pytest.raises(MissingAxesError, match="kernel"):
        plan.param_shardings(state)


def test_8b_shardings_from_the_rules(cpu8):
    plan = ShardingPlan.create("data=1,fsdp=2,tensor=4", devices=cpu8)
    _, abstract = plan.abstract_model(preset("llada-8b"), on_uneven="raise")  # every 8B dim divides
    spec = {"/".join(map(str, p)): v.sharding.spec for p, v in nnx.to_flat_state(abstract)}
    assert spec["backbone/embed/embedding"] == PartitionSpec("tensor", "fsdp")
    assert spec["backbone/lm_head/kernel"] == PartitionSpec("fsdp", "tensor")
    assert spec["backbone/blocks/layers/q/kernel"] == PartitionSpec(None, "fsdp", "tensor")
    assert spec["backbone/blocks/layers/o/kernel"] == PartitionSpec(None, "tensor", "fsdp")
    assert spec["backbone/blocks/layers/down/kernel"] == PartitionSpec(None, "tensor", "fsdp")
    assert spec["backbone/blocks/layers/attn_norm/scale"] == PartitionSpec(None, None)
    assert spec["planner/adaln_in/modulation/kernel"] == PartitionSpec("fsdp", "tensor")
    assert spec["planner/blocks/layers/gate/kernel"] == PartitionSpec(None, "fsdp", "tensor")
    assert spec["planner/out/kernel"] == PartitionSpec("fsdp", None)


def test_uneven_and_unknown_axes():
    mesh = {"data": 1, "fsdp": 8, "tensor": 1}
    assert axes.logical_to_spec([axes.EMBED], [300], mesh, DEFAULT_RULES) == PartitionSpec(None)
    with pytest.raises(ShardingRuleError, match="300 .* not divisible by mesh axes fsdp=8"):
        axes.logical_to_spec([axes.EMBED], [300], mesh, DEFAULT_RULES, on_uneven="raise")
    with pytest.raises(ShardingRuleError, match="'nope' has no entry"):
        axes.logical_to_spec(["nope"], [8], mesh, DEFAULT_RULES)
    # batch over data x fsdp keeps the part that divides; a mesh axis is used once per array
    two = {"data": 2, "fsdp": 4, "tensor": 1}
    assert axes.logical_to_spec([axes.ACT_BATCH], [2], two, DEFAULT_RULES) == PartitionSpec("data")
    assert axes.logical_to_spec([axes.EMBED, axes.EMBED], [8, 8], two, DEFAULT_RULES) == PartitionSpec("fsdp", None)


def test_constrain_is_identity_without_mesh_or_rules(cpu8):
    x = jnp.ones((8, 4, 6))
    assert axes.constrain(x, axes.BLD) is x
    with nnx.logical_axis_rules(DEFAULT_RULES):
        assert axes.constrain(x, axes.BLD) is x  # rules but no mesh
    with jax.set_mesh(make_mesh("fsdp=8", devices=cpu8)):
        assert axes.constrain(x, axes.BLD) is x  # mesh but no rules


# ------------------------------------------------------------------------------------------------ forward
@pytest.fixture(scope="module")
def fresh_tiny():
    """The tiny config, freshly initialised in fp32 (logits of order 1, so 1e-5 is a tight tolerance)."""
    return DUltra(preset("tiny"), rngs=nnx.Rngs(7))


@pytest.mark.parametrize("mesh", ["data=1,fsdp=2,tensor=4", "data=1,fsdp=8,tensor=1"])
def test_sharded_forward_equals_single_device(cpu8, fresh_tiny, mesh):
    cfg = fresh_tiny.cfg
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size - 1, size=(8, 16)).astype(np.int32)
    ids[:, 10:] = cfg.mask_token_id
    attn = np.ones_like(ids)
    attn[:4, :3] = 0  # left padding on half the rows
    mask_index = ids == cfg.mask_token_id
    timestep = 1.0 - mask_index.mean(axis=1)
    graphdef, state = nnx.split(fresh_tiny)
    ref_logits, ref_hidden = dultra_jax.forward(graphdef, state, jnp.asarray(ids), jnp.asarray(attn))
    ref_plan = dultra_jax.planner_forward(graphdef, state, ref_hidden, jnp.asarray(timestep),
                                          jnp.asarray(mask_index), jnp.asarray(attn))

    plan = ShardingPlan.create(mesh, devices=cpu8)
    sharded = plan.shard_state(state)
    fwd = plan.forward_fn(graphdef, shardings_of(sharded))
    logits, hidden = fwd(sharded, plan.shard_batch(ids), plan.shard_batch(attn))
    planner = plan.planner_fn(graphdef, shardings_of(sharded))
    plan_logits = planner(sharded, hidden, plan.shard_batch(timestep.astype(np.float32)),
                          plan.shard_batch(mask_index), plan.shard_batch(attn))

    batch = ("data", "fsdp")
    assert logits.sharding.spec == PartitionSpec(batch, None, "tensor")
    assert hidden.sharding.spec == PartitionSpec(batch, None, None)
    assert len(logits.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(ref_hidden), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(plan_logits), np.asarray(ref_plan), atol=1e-5, rtol=0)
    # the mask argument is optional, as in dultra_jax.forward
    no_mask, _ = fwd(sharded, plan.shard_batch(ids))
    np.testing.assert_allclose(np.asarray(no_mask), np.asarray(dultra_jax.forward(graphdef, state, ids)[0]),
                               atol=1e-5, rtol=0)


def test_activation_constraints_are_emitted_only_under_a_plan(cpu8, tiny_model):
    graphdef, state = nnx.split(tiny_model)
    ids = jax.ShapeDtypeStruct((8, 16), jnp.int32)
    plan = ShardingPlan.create("data=1,fsdp=2,tensor=4", devices=cpu8)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                            plan.param_shardings(state))
    text = plan.forward_fn(graphdef, shardings_of(abstract)).lower(abstract, ids).as_text()
    plain = dultra_jax.forward.lower(graphdef, state, ids).as_text()
    assert text.count("sharding_constraint") >= 5  # embed, block in/out (scanned body), q/k/v, MLP, logits
    assert '[{"data", "fsdp"}, {}, {"tensor"}, {}]' in text  # q/k/v heads over tensor
    assert "sharding_constraint" not in plain


def test_create_model_is_sharded_and_matches_eager_init(cpu8):
    cfg = preset("tiny")
    plan = ShardingPlan.create("data=2,fsdp=2,tensor=2", devices=cpu8)
    model = plan.create_model(cfg, seed=3)
    state = nnx.state(model)
    want = plan.param_shardings(state)
    for (path, v), (_, s) in zip(nnx.to_flat_state(state), nnx.to_flat_state(want), strict=True):
        assert v[...].sharding.spec == s.get_value().spec, path
    assert state["backbone"]["blocks"]["layers"]["gate"]["kernel"][...].sharding.spec == PartitionSpec(
        None, "fsdp", "tensor")
    eager = nnx.state(DUltra(cfg, rngs=nnx.Rngs(3)))
    for a, b in zip(_host(state), _host(eager), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ data
def test_shard_batch(cpu8):
    plan = ShardingPlan.create("data=2,fsdp=4", devices=cpu8)
    assert plan.batch_shards == 8
    x = plan.shard_batch(np.arange(8 * 3).reshape(8, 3))
    assert x.sharding.spec == PartitionSpec(("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(x), np.arange(24).reshape(8, 3))
    with pytest.raises(ShardingRuleError, match="6 rows cannot be split 8 ways.*multiple of 8"):
        plan.shard_batch(np.zeros((6, 3)))


# ------------------------------------------------------------------------------------------------ checkpoints
def test_save_on_one_mesh_restore_on_another(cpu8, tiny_model, tmp_path):
    save_plan = ShardingPlan.create("data=1,fsdp=2,tensor=4", devices=cpu8)
    sharded = save_plan.shard_model(tiny_model)
    assert sharded.backbone.lm_head.kernel[...].sharding.spec == PartitionSpec("fsdp", "tensor")
    save_converted(sharded, tmp_path / "ck")
    want = _host(nnx.state(tiny_model))
    for mesh, spec in (("data=1,fsdp=8,tensor=1", PartitionSpec("fsdp", "tensor")),
                       ("data=2,fsdp=1,tensor=4", PartitionSpec("fsdp", "tensor"))):
        restored = dultra_jax.load(tmp_path / "ck", mesh=make_mesh(mesh, devices=cpu8))
        kernel = restored.backbone.lm_head.kernel[...]
        assert kernel.sharding.spec == spec and dict(kernel.sharding.mesh.shape) == MeshConfig.parse(mesh).sizes
        for a, b in zip(_host(nnx.state(restored)), want, strict=True):
            np.testing.assert_array_equal(a, b)
    single = dultra_jax.load(tmp_path / "ck")  # and back onto one device
    assert len(single.backbone.lm_head.kernel[...].sharding.device_set) == 1
    for a, b in zip(_host(nnx.state(single)), want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_hf_checkpoint_loads_onto_a_mesh(cpu8, tiny_dir, tiny_model):
    model = dultra_jax.load(tiny_dir, mesh=ShardingPlan.create("fsdp=8", devices=cpu8))
    assert model.backbone.blocks.layers.q.kernel[...].sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    for a, b in zip(_host(nnx.state(model)), _host(nnx.state(tiny_model)), strict=True):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------ multi-host
def test_distributed_settings_from_environment():
    assert distributed_settings({}) is None
    assert distributed_settings({"JAX_NUM_PROCESSES": "1"}) is None
    assert distributed_settings({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
                                 "JAX_PROCESS_ID": "1"}) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
    assert distributed_settings({"COORDINATOR_ADDRESS": "h:1", "NUM_PROCESSES": "4", "PROCESS_ID": "0"}) == {
        "coordinator_address": "h:1", "num_processes": 4, "process_id": 0}
    assert distributed_settings({"SLURM_NTASKS": "4"}) == {}  # JAX detects the SLURM cluster itself
    assert distributed_settings({"SLURM_NTASKS": "1"}) is None
    with pytest.raises(ValueError, match=r"incomplete: set \['JAX_COORDINATOR_ADDRESS'\]"):
        distributed_settings({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"})
    with pytest.raises(ValueError, match="outside"):
        distributed_settings({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})


def test_initialize_distributed_is_a_noop_on_one_host():
    assert initialize_distributed({}) is False
    assert not jax.distributed.is_initialized()
    assert jax.process_count() == 1
