"""Fully sharded training (--fsdp, PyTorch FSDP2) under torchrun on CPU (gloo): the same losses and weights as DDP,
exact resume from a sharded (DCP) checkpoint, and conversion of one into the normal single-file format."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import clipforge
from clipforge.checkpoint import read_checkpoint

from conftest import REPO, free_port, shapes_shard

pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 ships with torch >= 2.6")
HAS_PROC = Path("/proc/self/stat").exists()


def torchrun_train(spec: str, output, extra=(), steps: int = 4):
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "clipforge.cli", "train", "--train-data", spec, "--model", "ViT-Tiny-64",
           "--batch-size", "8", "--steps", str(steps), "--save-every", "2", "--workers", "0", "--seed", "5",
           "--output", str(output), "--no-progress", "--log-every", "1", *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux /proc). torchrun starts each rank in a session of its own, so killing
    the launcher's process group leaves the ranks running: they must be found and killed one by one."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while being read
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def weights(step_folder) -> dict:
    state, _ = read_checkpoint(step_folder)
    return state


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    for i in range(2):
        shapes_shard(root / "data" / f"s-{i:06d}.tar", 48, seed=i)
    spec = str(root / "data" / "s-{000000..000001}.tar")
    torchrun_train(spec, root / "ddp")
    torchrun_train(spec, root / "fsdp", ["--fsdp"])
    torchrun_train(spec, root / "resumed", ["--fsdp", "--resume", str(root / "fsdp" / "checkpoints" / "step-00000002")])
    return root, spec


def test_fsdp_gives_the_losses_and_weights_of_ddp(runs):
    root, _ = runs
    assert losses(root / "fsdp") == pytest.approx(losses(root / "ddp"), rel=1e-5)
    ddp, fsdp = weights(root / "ddp" / "checkpoints" / "step-00000004"), \
        weights(root / "fsdp" / "checkpoints" / "step-00000004")
    assert ddp.keys() == fsdp.keys()
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], atol=1e-6, rtol=1e-5, msg=key)
    first = weights(root / "fsdp" / "checkpoints" / "step-00000002")
    assert any(not torch.equal(first[k], fsdp[k]) for k in fsdp)  # the later steps did train


def test_fsdp_trains_a_coca_with_the_losses_and_weights_of_ddp(tmp_path):
    """A CoCa's towers are also called by ``forward_tokens`` (image tokens for the decoder, text states): FSDP gathers
    their weights for it as for ``forward``, and both losses train as under DDP."""
    spec = str(shapes_shard(tmp_path / "s-000000.tar", 32))
    tiny = json.dumps({"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "patch_size": 16,
                                                       "head_width": 32, "attn_pooler_queries": 8,
                                                       "attn_pooler_heads": 2},
                       "text_cfg": {"layers": 1, "width": 64, "heads": 2},
                       "multimodal_cfg": {"layers": 1, "width": 64, "heads": 2}})
    coca = ["--model", "coca_ViT-B-32", "--model-cfg", tiny]
    torchrun_train(spec, tmp_path / "ddp", coca, steps=2)
    torchrun_train(spec, tmp_path / "fsdp", [*coca, "--fsdp"], steps=2)
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "ddp"), rel=1e-5)
    ddp, fsdp = weights(tmp_path / "ddp" / "checkpoints" / "step-00000002"), \
        weights(tmp_path / "fsdp" / "checkpoints" / "step-00000002")
    assert ddp.keys() == fsdp.keys() and any(k.startswith("text_decoder.") for k in ddp)
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], atol=1e-6, rtol=1e-5, msg=key)


def test_sharded_checkpoints_are_written_per_rank_and_resume_exactly(runs):
    root, _ = runs
    step = root / "fsdp" / "checkpoints" / "step-00000004"
    assert (step / "sharded" / ".metadata").exists() and len(list((step / "sharded").glob("*.distcp"))) == 2
    assert not (step / "model.safetensors").exists()  # no rank gathered the whole model to write it
    assert not list((root / "fsdp" / "checkpoints").glob(".step-*"))  # no temporary folders left
    straight, resumed = weights(step), weights(root / "resumed" / "checkpoints" / "step-00000004")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert losses(root / "resumed") == losses(root / "fsdp")[2:]


def test_a_sharded_checkpoint_converts_and_loads_with_identical_features(runs, tmp_path):
    root, _ = runs
    step = root / "fsdp" / "checkpoints" / "step-00000004"
    converted = tmp_path / "converted"
    done = subprocess.run([sys.executable, "-m", "clipforge.cli", "convert", str(step), str(converted), "--to",
                           "clipforge"], env=dict(os.environ, PYTHONPATH=str(REPO / "src")), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (converted / "model.safetensors").exists()
    images = torch.randn(3, 3, 64, 64)
    features = []
    for source in (converted, step, root / "ddp" / "checkpoints" / "step-00000004"):
        model, _, tokenizer = clipforge.load(str(source))
        with torch.no_grad():
            features.append((model.encode_image(images), model.encode_text(tokenizer(["a red circle", "a square"]))))
    for image, text in features[1:]:
        torch.testing.assert_close(image, features[0][0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(text, features[0][1], atol=1e-6, rtol=1e-5)


def test_fsdp_composes_with_accumulation_locked_towers_checkpointing_siglip_local_loss_and_clipping(runs):
    root, spec = runs
    extra = ["--accum-freq", "2", "--lock-text", "--grad-checkpointing", "--loss", "siglip", "--local-loss",
             "--grad-clip", "1"]
    torchrun_train(spec, root / "ddp-all", extra, steps=2)
    torchrun_train(spec, root / "fsdp-all", ["--fsdp", *extra], steps=2)
    assert losses(root / "fsdp-all") == pytest.approx(losses(root / "ddp-all"), rel=1e-5)
    ddp, fsdp = (weights(root / run / "checkpoints" / "step-00000002") for run in ("ddp-all", "fsdp-all"))
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.skipif(not HAS_PROC, reason="finding torchrun's rank processes to kill them needs Linux /proc")
def test_a_run_killed_after_a_sharded_checkpoint_resumes_to_the_same_weights(runs):
    root, spec = runs
    port = free_port()
    victim_dir = root / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "clipforge.cli", "train", "--train-data", spec, "--model", "ViT-Tiny-64",
           "--batch-size", "8", "--steps", "12", "--save-every", "2", "--workers", "0", "--seed", "5", "--output",
           str(victim_dir), "--no-progress", "--log-every", "1", "--fsdp"]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    victim = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    checkpoints = victim_dir / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (checkpoints.exists() and any(checkpoints.glob("step-*"))):
        time.sleep(0.05)
    ranks = descendants(victim.pid)
    assert len(ranks) >= 2, "the launcher's rank processes were not found"
    for pid in [victim.pid, *ranks]:  # the launcher and both ranks, mid-run, as a machine failure would
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    victim.wait()
    deadline = time.time() + 30
    while any(alive(pid) for pid in ranks) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in ranks), "a rank survived SIGKILL"
    done = sorted(p.name for p in checkpoints.glob("step-*"))
    assert done and done[-1] < "step-00000012", "the run finished before it could be killed"
    torchrun_train(spec, victim_dir, ["--fsdp", "--resume", "latest"], steps=12)
    torchrun_train(spec, root / "straight-12", ["--fsdp"], steps=12)
    straight, resumed = weights(root / "straight-12" / "checkpoints" / "step-00000012"), \
        weights(victim_dir / "checkpoints" / "step-00000012")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_fsdp_refuses_what_it_does_not_support_and_resuming_across_kinds(runs, tmp_path):
    root, spec = runs
    from clipforge.train import TrainConfig, train

    with pytest.raises(ValueError, match="--fsdp"):
        train(TrainConfig(train_data=spec, fsdp=True, objective="labels", steps=1, output=str(tmp_path / "x")))
    with pytest.raises(ValueError, match="resume it with --fsdp|resume it without --fsdp"):
        train(TrainConfig(model="ViT-Tiny-64", train_data=spec, batch_size=8, steps=4, workers=0, seed=5,
                          output=str(tmp_path / "y"), progress=False,
                          resume=str(root / "fsdp" / "checkpoints" / "step-00000002")))
