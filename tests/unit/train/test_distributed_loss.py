"""The distributed losses, run in a real 2-process gloo group, equal the single-process full batch.

Each rank gets rows [4r, 4r+4) of a global batch of 8, computes its loss and gradients, then
averages gradients and losses over ranks exactly as DDP does. The reference is one process
with world_size 1 on all 8 rows. Everything runs in float64 so 1e-5 is a strict tolerance.
"""

import math
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from clap_core.train.loss import ClipLoss, LogitScale, SigLipLoss, SigmoidLogitScale

WORLD_SIZE = 2
GLOBAL_BATCH = 8
LOCAL_BATCH = GLOBAL_BATCH // WORLD_SIZE

# name -> (loss kind, ClipLoss kwargs); SigLIP always gathers text with grad
SCENARIOS = {
    "clip_local": ("infonce", {"local_loss": True, "gather_with_grad": True}),
    "clip_global": ("infonce", {"local_loss": False, "gather_with_grad": True}),
    "clip_global_no_grad": ("infonce", {"local_loss": False, "gather_with_grad": False}),
    "siglip": ("siglip", {}),
}


class _TinyClap(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.audio_encoder = nn.Linear(6, 5)
        self.text_encoder = nn.Linear(7, 5)
        if kind == "infonce":
            self.scale = LogitScale(per_modality=True)
            with torch.no_grad():
                self.scale.log_scale[1] = math.log(1 / 0.05)  # distinct per-direction scales
        else:
            self.scale = SigmoidLogitScale()

    def forward(self, audio_x, text_x):
        audio = F.normalize(self.audio_encoder(audio_x), dim=-1)  # (B, 5)
        text = F.normalize(self.text_encoder(text_x), dim=-1)  # (B, 5)
        return audio, text, *self.scale()


def _model_and_batch(kind):
    torch.manual_seed(0)
    model = _TinyClap(kind).double()
    gen = torch.Generator().manual_seed(1)
    audio_x = torch.randn(GLOBAL_BATCH, 6, generator=gen, dtype=torch.float64)  # (8, 6)
    text_x = torch.randn(GLOBAL_BATCH, 7, generator=gen, dtype=torch.float64)  # (8, 7)
    return model, audio_x, text_x


def _loss_and_grads(kind, loss_fn, rows):
    model, audio_x, text_x = _model_and_batch(kind)
    loss = next(iter(loss_fn(*model(audio_x[rows], text_x[rows])).values()))
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def _reference(name):
    kind, _ = SCENARIOS[name]
    loss_fn = ClipLoss() if kind == "infonce" else SigLipLoss()
    return _loss_and_grads(kind, loss_fn, slice(None))


def _worker(rank, port, out_dir):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo's pair connections on loopback
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    results = {}
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    for name, (kind, kwargs) in SCENARIOS.items():
        if kind == "infonce":
            loss_fn = ClipLoss(rank=rank, world_size=WORLD_SIZE, **kwargs)
        else:
            loss_fn = SigLipLoss(rank=rank, world_size=WORLD_SIZE)
        loss, grads = _loss_and_grads(kind, loss_fn, rows)
        # what DDP does: average gradients (and here the logged loss) over ranks
        for tensor in [loss, *grads.values()]:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= WORLD_SIZE
        results[name] = (loss, grads)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_loopback_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dist_loss")
    context = mp.start_processes(
        _worker,
        args=(_free_loopback_port(), str(out_dir)),
        nprocs=WORLD_SIZE,
        join=False,
        daemon=True,
        start_method="spawn",
    )
    deadline = time.monotonic() + 90
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail("distributed loss workers did not finish within 90 s")
    per_rank = [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    for name in SCENARIOS:  # after the all-reduce every rank holds the same averages
        torch.testing.assert_close(per_rank[0][name], per_rank[1][name], rtol=0, atol=0)
    return per_rank[0]


def _assert_matches_reference(result, reference, grad_factor=None):
    (loss, grads), (ref_loss, ref_grads) = result, reference
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)
    assert set(grads) == set(ref_grads)
    for name, ref_grad in ref_grads.items():
        factor = grad_factor(name) if grad_factor else 1.0
        torch.testing.assert_close(grads[name], factor * ref_grad, rtol=0, atol=1e-5, msg=name)


@pytest.mark.timeout(120)
def test_clip_local_loss_with_grad_gather_equals_full_batch(distributed_results):
    # The mean of the ranks' (B, W*B) losses is the full-batch loss; the gather's backward
    # sums every rank's gradient into the feature owner, so DDP's average is the full gradient.
    _assert_matches_reference(distributed_results["clip_local"], _reference("clip_local"))


@pytest.mark.timeout(120)
def test_clip_global_loss_with_grad_gather_equals_full_batch(distributed_results):
    # Every rank computes the full loss L. The gather's backward sums W identical gradients,
    # so each rank's encoder gradient is W * dL/dtheta restricted to its own rows; averaging
    # over ranks gives (1/W) * W * dL/dtheta = dL/dtheta. The logit scale is not gathered:
    # each rank has dL/dscale, whose average is dL/dscale. So everything equals the reference.
    _assert_matches_reference(distributed_results["clip_global"], _reference("clip_global"))


@pytest.mark.timeout(120)
def test_clip_global_loss_without_grad_gather_scales_encoder_grads_by_one_over_w(distributed_results):
    # Without gradient through the gather each rank only back-propagates into its own rows,
    # so the averaged encoder gradient is dL/dtheta / W, while the logit-scale gradient
    # (computed fully on every rank) stays exact: why training should gather with grad.
    _assert_matches_reference(
        distributed_results["clip_global_no_grad"],
        _reference("clip_global_no_grad"),
        grad_factor=lambda name: 1.0 if name.startswith("scale.") else 1.0 / WORLD_SIZE,
    )


@pytest.mark.timeout(120)
def test_siglip_distributed_equals_full_batch(distributed_results):
    _assert_matches_reference(distributed_results["siglip"], _reference("siglip"))
