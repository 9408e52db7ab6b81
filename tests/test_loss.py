"""Losses: chunked equals dense with memory linear in batch size; distributed (2 gloo processes) equals one process."""
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from clipforge.loss import ClipLoss, SigLipLoss, linear_cross_entropy

from conftest import free_port


def _features(n, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    b = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    return a, b


def _loss_and_grads(loss_fn, a, b, scale, bias=None):
    for t in (a, b, scale, bias):
        if t is not None:
            t.grad = None
    loss = loss_fn(a, b, scale, bias)
    loss.backward()
    return [loss.detach()] + [t.grad.clone() for t in (a, b, scale, bias) if t is not None]


@pytest.mark.parametrize("local_loss", [False, True])
def test_chunked_clip_loss_equals_dense(local_loss):
    a, b = _features(53)
    scale = torch.tensor(20.0, requires_grad=True)
    dense = _loss_and_grads(ClipLoss(local_loss=local_loss), a, b, scale)
    chunked = _loss_and_grads(ClipLoss(local_loss=local_loss, chunk_size=8), a, b, scale)
    for x, y in zip(dense, chunked):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_clip_loss_equals_open_clip():
    open_clip = pytest.importorskip("open_clip")
    a, b = _features(40)
    scale = torch.tensor(14.0)
    torch.testing.assert_close(ClipLoss()(a, b, scale), open_clip.ClipLoss()(a, b, scale))


def test_chunked_siglip_equals_dense_and_open_clip():
    a, b = _features(37)
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    dense = _loss_and_grads(SigLipLoss(), a, b, scale, bias)
    chunked = _loss_and_grads(SigLipLoss(chunk_size=6), a, b, scale, bias)
    for x, y in zip(dense, chunked):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    try:
        from open_clip.loss import SigLipLoss as TheirSigLip
    except ImportError:
        pytest.skip("open_clip not installed")
    torch.testing.assert_close(dense[0], TheirSigLip()(a, b, scale, bias).detach())


def _bytes_saved_for_backward(loss_fn, n):
    """Bytes of tensors autograd keeps between forward and backward (what grows with batch size)."""
    a, b = _features(n, d=16)
    a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(a, b, torch.tensor(10.0, requires_grad=True))
    loss.backward()
    return sum(saved)


def test_chunked_memory_grows_linearly_dense_quadratically():
    sizes = (256, 512, 1024)
    dense = [_bytes_saved_for_backward(ClipLoss(), n) for n in sizes]
    chunked = [_bytes_saved_for_backward(ClipLoss(chunk_size=64), n) for n in sizes]
    # doubling the batch: dense memory ~x4 (N^2 logits), chunked ~x2 (features and per-row statistics)
    assert dense[2] / dense[1] > 3.5 and dense[1] / dense[0] > 3.5
    assert chunked[2] / chunked[1] < 2.2 and chunked[1] / chunked[0] < 2.2
    assert chunked[2] < dense[2] / 10


def test_linear_cross_entropy_equals_dense_and_keeps_no_logits():
    """``linear_cross_entropy`` (CoCa's caption term): the summed cross-entropy of ``states @ weight`` and its
    gradients (scaled by the gradient coming back) equal the dense computation's, whatever the chunking (an uneven
    tail, one chunk, a chunk larger than the rows), with either input frozen, and without autograd; between the passes
    it keeps its inputs' gradients, not the [rows x vocab] logits and log-softmax the dense computation keeps (and so
    allows one backward)."""
    torch.manual_seed(0)
    states = torch.randn(300, 32, requires_grad=True)
    weight = (torch.randn(32, 5000) * 0.2).requires_grad_()
    labels = torch.randint(0, 5000, (300,))

    def saved_bytes_and_grads(compute):
        states.grad = weight.grad = None
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            loss = compute()
        (0.5 * loss).backward()
        return loss.detach(), sum(saved), states.grad, weight.grad

    dense, dense_saved, dense_states, dense_weight = saved_bytes_and_grads(
        lambda: F.cross_entropy(states @ weight, labels, reduction="sum"))
    for chunk in (64, 300, 1000):
        loss, saved, grad_states, grad_weight = saved_bytes_and_grads(
            lambda: linear_cross_entropy(states, weight, labels, chunk))
        assert torch.allclose(loss, dense, rtol=1e-6)
        assert torch.allclose(grad_states, dense_states, atol=1e-6) and torch.allclose(grad_weight, dense_weight,
                                                                                      atol=1e-5)
        assert saved < dense_saved / 5, (saved, dense_saved)
    frozen = weight.detach()
    states.grad = None
    (0.5 * linear_cross_entropy(states, frozen, labels, 64)).backward()
    assert torch.allclose(states.grad, dense_states, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(states, weight, labels, 64), dense, rtol=1e-6)
    loss = linear_cross_entropy(states, weight, labels, 64)  # its gradients are scaled in place: a second use refused
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()
    # float64 (LiMBer's scoring tests run the LM in float64) stays float64, with and without autograd
    wide_states, wide_weight = states.detach().double().requires_grad_(), weight.detach().double()
    wide_dense = F.cross_entropy(wide_states @ wide_weight, labels, reduction="sum")
    for grad_mode in (False, True):
        with torch.set_grad_enabled(grad_mode):
            wide = linear_cross_entropy(wide_states, wide_weight, labels, 64)
        assert wide.dtype == torch.float64 and torch.allclose(wide, wide_dense, rtol=1e-12, atol=0)
    wide.backward()
    assert wide_states.grad.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak device memory is measured on CUDA only")
def test_chunked_peak_cuda_memory_is_linear():
    def peak(loss_fn, n):
        a, b = (t.detach().cuda().requires_grad_() for t in _features(n, d=64))
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss_fn(a, b, torch.tensor(10.0, device="cuda")).backward()
        return torch.cuda.max_memory_allocated() - base

    chunked = [peak(ClipLoss(chunk_size=256), n) for n in (4096, 8192)]
    dense = [peak(ClipLoss(), n) for n in (4096, 8192)]
    assert chunked[1] / chunked[0] < 2.5 and dense[1] / dense[0] > 3.0


# ------------------------------------------------------------------------------------------- two processes, gloo

class _TinyTowers(torch.nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.image = torch.nn.Parameter(torch.randn(12, 8, generator=g))
        self.text = torch.nn.Parameter(torch.randn(10, 8, generator=g))
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.5))
        self.logit_bias = torch.nn.Parameter(torch.tensor(-3.0)) if bias else None

    def forward(self, x, y):
        return (F.normalize(x @ self.image, dim=-1), F.normalize(y @ self.text, dim=-1), self.logit_scale.exp(),
                self.logit_bias)


def _batch(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 12, generator=g), torch.randn(n, 10, generator=g)


def _make_loss(kind):
    return {"gather": ClipLoss(), "local": ClipLoss(local_loss=True), "local_chunked": ClipLoss(True, chunk_size=3),
            "siglip": SigLipLoss()}[kind]


def _worker(rank, world, port, kind, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = torch.nn.parallel.DistributedDataParallel(_TinyTowers(kind == "siglip"))
    x, y = _batch()
    n = x.shape[0] // world
    loss = _make_loss(kind)(*model(x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]))
    loss.backward()  # DDP averages the gradients over ranks
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    torch.save({"loss": mean_loss / world, "grads": {k: p.grad for k, p in model.module.named_parameters()}},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    # Leave without tearing gloo down: its background threads can abort the process at interpreter exit.
    os._exit(0)


@pytest.mark.parametrize("kind", ["gather", "local", "local_chunked", "siglip"])
def test_two_process_loss_and_gradients_equal_one_process(kind, tmp_path):
    model = _TinyTowers(kind == "siglip")
    x, y = _batch()
    loss = _make_loss(kind)(*model(x, y))
    loss.backward()
    reference = {k: p.grad for k, p in model.named_parameters()}

    mp.spawn(_worker, args=(2, free_port(), kind, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(result["loss"], loss.detach(), atol=1e-6, rtol=1e-5)
        for name, grad in reference.items():
            torch.testing.assert_close(result["grads"][name], grad, atol=1e-6, rtol=1e-5, msg=f"{kind}: {name}")


def _open_clip_keywords_worker(rank, world, port, out_dir):
    """Each rank's loss and gradients under open_clip's keywords, ours and open_clip's, for every (local_loss,
    gather_with_grad) pair and SigLIP."""
    import torch.distributed as dist
    from open_clip.loss import ClipLoss as TheirClipLoss, DistillClipLoss as TheirDistill, SigLipLoss as TheirSigLipLoss

    from clipforge.open_clip_losses import DistillClipLoss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x, y = _batch()
    n = x.shape[0] // world
    own = slice(rank * n, (rank + 1) * n)
    with torch.no_grad():  # a teacher: other towers' features of the same batch
        teacher = _TinyTowers(False)
        teacher.image.mul_(-1.5)
        teacher_features = teacher(x[own], y[own])[:3]
    results = {}
    for local_loss in (False, True):
        for gather_with_grad in (False, True):
            for name, loss_class, distill_class in (("ours", ClipLoss, DistillClipLoss),
                                                    ("theirs", TheirClipLoss, TheirDistill)):
                model = _TinyTowers(False)
                loss_fn = loss_class(local_loss, gather_with_grad, False, rank, world)
                loss = loss_fn(*model(x[own], y[own])[:3])
                loss.backward()
                results[(local_loss, gather_with_grad, name)] = (loss.detach(), [p.grad for p in model.parameters()])
                model = _TinyTowers(False)  # open_clip's distillation signature: both terms
                loss = sum(distill_class(local_loss, gather_with_grad, False, rank, world)(
                    *model(x[own], y[own])[:3], *teacher_features))
                loss.backward()
                results[("distill", local_loss, gather_with_grad, name)] = (
                    loss.detach(), [p.grad for p in model.parameters()])
    for name, loss_class in (("ours", SigLipLoss), ("theirs", TheirSigLipLoss)):
        model = _TinyTowers(True)
        loss = loss_class(rank=rank, world_size=world, dist_impl="bidir")(
            *model(x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]))
        loss.backward()
        results[("siglip", name)] = (loss.detach(), [p.grad for p in model.parameters()])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    os._exit(0)


def test_two_process_losses_with_open_clips_keywords_equal_open_clips(tmp_path):
    """Under torchrun-like ranks (2 gloo processes), ``ClipLoss(local_loss, gather_with_grad, cache_labels, rank,
    world_size)``, ``SigLipLoss(rank=, world_size=, dist_impl=)`` and ``DistillClipLoss`` (open_clip's signature, its
    two terms summed) give each rank open_clip's loss and gradients
    (without DDP's averaging: what each rank's own backward gives) for every local_loss / gather_with_grad pair,
    open_clip's default ``gather_with_grad=False`` included."""
    pytest.importorskip("open_clip")
    mp.spawn(_open_clip_keywords_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        cases = [(local, with_grad) for local in (False, True) for with_grad in (False, True)] + [("siglip",)]
        cases += [("distill", local, with_grad) for local in (False, True) for with_grad in (False, True)]
        for case in cases:
            ours, theirs = results[(*case, "ours")], results[(*case, "theirs")]
            torch.testing.assert_close(ours[0], theirs[0], atol=1e-6, rtol=1e-5, msg=f"rank {rank} {case}")
            for mine, reference in zip(ours[1], theirs[1]):
                torch.testing.assert_close(mine, reference, atol=1e-6, rtol=1e-5, msg=f"rank {rank} {case}")
        # open_clip's default gathers without gradient: with local_loss, a different gradient from gathering with it
        assert not torch.allclose(results[(True, False, "ours")][1][0], results[(True, True, "ours")][1][0])
