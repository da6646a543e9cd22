"""Fine-tuning: data order, schedule, checkpoints, convergence log and exact resumption."""

import json
import os
import subprocess
import sys

import chex
import numpy as np
import pytest

from jaxinf import recipes, training
from jaxinf.models import LoraConfig, load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup():
    model = load_model("tiny-llama")
    task = recipes.load_task(model, recipes.TaskConfig(source="backdoor", max_length=96))
    return model, LoraConfig(rank=2, alpha=8.0, dropout=0.1), task


def test_example_order_visits_every_row_once_per_epoch():
    n, b = 13, 4
    stream = np.concatenate([training.example_order(3, n, s, b) for s in range(13)])  # 52 = 4 epochs
    for e in range(4):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
    assert not np.array_equal(stream[:n], stream[n:2 * n])  # reshuffled each epoch
    np.testing.assert_array_equal(training.example_order(3, n, 7, b), stream[28:32])


def test_schedule_warmup_then_linear_decay():
    config = training.TrainConfig(steps=10, lr=1.0, warmup_steps=2)
    schedule = training.make_schedule(config, 10)
    np.testing.assert_allclose([float(schedule(s)) for s in (0, 1, 2, 6, 10)], [0.0, 0.5, 1.0, 0.5, 0.0])


def test_interrupted_run_resumes_to_identical_parameters_and_log(setup, tmp_path):
    model, lora, task = setup
    config = training.TrainConfig(steps=12, batch_size=4, grad_accum=2, lr=1e-2, checkpoint_every=5, seed=1)
    full, full_log = recipes.finetune_lora(model, lora, task, config, str(tmp_path / "full"))
    part, part_log = recipes.finetune_lora(model, lora, task, config, str(tmp_path / "cut"), stop_after=7)
    assert len(part_log) == 7 and training.checkpoint_steps(str(tmp_path / "cut")) == [0, 5, 7]
    resumed, resumed_log = recipes.finetune_lora(model, lora, task, config, str(tmp_path / "cut"))
    chex.assert_trees_all_equal(full, resumed)
    assert resumed_log == full_log
    with open(tmp_path / "cut" / "convergence.jsonl") as f:
        assert [json.loads(line) for line in f] == full_log
    assert training.checkpoint_steps(str(tmp_path / "full")) == [0, 5, 10, 12]
    assert full_log[-1]["loss"] < full_log[0]["loss"]  # it learns
    assert full_log[-1]["dist_from_init"] > 0


def test_restore_checkpoint_returns_saved_adapters(setup, tmp_path):
    model, lora, task = setup
    config = training.TrainConfig(steps=3, batch_size=4, lr=1e-2, checkpoint_every=1)
    adapters, _ = recipes.finetune_lora(model, lora, task, config, str(tmp_path))
    abstract = {"trainable": adapters, "opt_state": training.make_optimizer(config, 3).init(adapters)}
    step, state = training.restore_checkpoint(str(tmp_path), abstract)
    assert step == 3
    chex.assert_trees_all_equal(state["trainable"], adapters)


def test_changed_settings_in_same_workdir_are_refused(setup, tmp_path):
    model, lora, task = setup
    recipes.finetune_lora(model, lora, task, training.TrainConfig(steps=1, batch_size=4), str(tmp_path))
    with pytest.raises(ValueError, match="other settings"):
        recipes.finetune_lora(model, lora, task, training.TrainConfig(steps=1, batch_size=2), str(tmp_path))


def test_empty_training_split_is_a_clear_error():
    with pytest.raises(ValueError, match="empty"):
        training.TrainConfig(steps=1).validate(0)


@pytest.mark.slow  # three binary runs (about a minute); the in-process resume is checked above in the default job
def test_finetune_binary_resumes_to_the_same_last_log_line(tmp_path):
    """The CLI: 20 steps with checkpoints every 5; a run stopped at 10 and re-run ends on the same line."""
    def run(workdir, *extra):
        cmd = [sys.executable, "-m", "experiments.finetune", "--model=tiny-llama", "--data=backdoor", "--steps=20",
               "--checkpoint_every=5", "--batch_size=4", f"--workdir={workdir}", *extra]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        with open(os.path.join(workdir, "convergence.jsonl")) as f:
            return f.read().splitlines()

    whole = run(tmp_path / "whole")
    run(tmp_path / "cut", "--stop_after=10")
    resumed = run(tmp_path / "cut")
    assert len(whole) == 20 and resumed[-1] == whole[-1]
    assert len(os.listdir(tmp_path / "whole" / "checkpoints")) >= 4


def test_tree_norm_is_the_euclidean_norm_of_every_entry():
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    tree = {"a": {"A": rng.normal(size=(3, 4)), "B": rng.normal(size=(4, 2))}, "b": rng.normal(size=(5,))}
    expected = np.sqrt(sum(float(np.sum(x ** 2)) for x in (tree["a"]["A"], tree["a"]["B"], tree["b"])))
    got = float(training._tree_norm({"a": {k: jnp.asarray(v, jnp.float32) for k, v in tree["a"].items()},
                                     "b": jnp.asarray(tree["b"], jnp.float32)}))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    single = float(training._tree_norm(jnp.asarray(tree["b"], jnp.bfloat16)))  # one leaf; squares summed in float32
    np.testing.assert_allclose(single, np.linalg.norm(np.asarray(jnp.asarray(tree["b"], jnp.bfloat16), np.float64)),
                               rtol=1e-6)
