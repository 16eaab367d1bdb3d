"""Checkpoints: pickle-free, atomic, and only complete ones are resumed from."""

from __future__ import annotations

import torch

from farm.spec import TrainSpec
from farm.train.common import (LocalCheckpoints, TrainState, build_optimizer, build_scheduler,
                               latest_checkpoint, load_checkpoint, write_checkpoint)


def _setup(seed: int = 0, steps: int = 3):
    """A layer, its optimizer and schedule after ``steps`` steps from ``seed``."""
    torch.manual_seed(seed)
    layer = torch.nn.Linear(4, 3)
    optimizer = build_optimizer(layer.parameters(), TrainSpec(learning_rate=0.1))
    scheduler = build_scheduler(optimizer, TrainSpec(max_steps=10, warmup_steps=2))
    for _ in range(steps):
        layer(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return layer, optimizer, scheduler


def test_checkpoints_round_trip_and_incomplete_ones_are_skipped(tmp_path):
    layer, optimizer, scheduler = _setup()
    store = LocalCheckpoints(tmp_path, keep=2)
    for step in (1, 2, 3):
        state = TrainState(step=step, rows_consumed=8 * step)
        store.save(lambda f, s=state: write_checkpoint(f, layer.state_dict(), optimizer, scheduler, s), step, {})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-0000002", "checkpoint-0000003"]  # pruned to keep=2, no temp left
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.bin"))

    expected_rng = torch.get_rng_state()
    # Another seed and another step count: fresh state differs from the saved state in every
    # part, so each check below fails if loading skips that part.
    _, fresh_opt, fresh_sched = _setup(seed=1, steps=1)
    saved_avg = optimizer.state_dict()["state"][0]["exp_avg"]
    assert not torch.equal(torch.get_rng_state(), expected_rng)
    assert not torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], saved_avg)
    assert fresh_sched.state_dict()["last_epoch"] != scheduler.state_dict()["last_epoch"]
    tensors, state = load_checkpoint(tmp_path / "checkpoint-0000003", fresh_opt, fresh_sched)
    assert state.step == 3 and state.rows_consumed == 24
    assert torch.equal(tensors["weight"], layer.weight)
    assert torch.equal(torch.get_rng_state(), expected_rng)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], saved_avg)
    assert fresh_sched.state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"]

    # A copy cut short (as when a worker dies mid-upload) is not a checkpoint to resume from.
    newest = tmp_path / "checkpoint-0000003" / "optimizer.safetensors"
    newest.write_bytes(newest.read_bytes()[:10])
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-0000002"
    (tmp_path / "checkpoint-0000002" / "rng.safetensors").unlink()
    assert latest_checkpoint(tmp_path) is None
