"""The batched metrics equal Quantus's implementations on the same inputs (Quantus is a
test-only oracle: skipped with the reason when it is not installed).

Localization (PointingGame, RelevanceMassAccuracy), complexity (Sparseness, Complexity) on
precomputed heatmaps; robustness (MaxSensitivity) with the same explanation function and the
same noise (replayed into Quantus's perturbation hook); randomization (MPRT) at Quantus's
granularity (every module with reset_parameters, top down, the same seed). Tolerance 1e-5
(MPRT: 1e-4): Quantus normalizes the heatmaps in float32, which rounds some near-equal values
to ties and moves a rank correlation in its fifth digit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cgc
from cgc import metrics
from cgc.models import CompactCNN

quantus = pytest.importorskip("quantus", reason="Quantus (pip install quantus) is the oracle of these tests")

B, S = 6, 16


@pytest.fixture
def maps(rng):
    a = torch.rand(B, S, S, generator=rng)
    region = torch.zeros(B, S, S, dtype=torch.bool)
    region[:, 3:9, 4:12] = True
    region[1, 10:14, 1:5] = True
    return a, region


def quantus_args(a: torch.Tensor, region: torch.Tensor | None = None) -> dict:
    kw = dict(
        model=None,
        x_batch=np.zeros((a.shape[0], 3, *a.shape[1:]), np.float32),
        y_batch=np.zeros(a.shape[0], int),
        a_batch=a[:, None].numpy().copy(),
    )
    if region is not None:
        kw["s_batch"] = region[:, None].float().numpy()
    return kw


def test_localization_equals_quantus(maps):
    a, region = maps
    pg = quantus.PointingGame(disable_warnings=True)(**quantus_args(a, region))
    assert metrics.pointing_game(a, region).tolist() == [bool(v) for v in pg]
    rma = quantus.RelevanceMassAccuracy(disable_warnings=True)(**quantus_args(a, region))
    assert np.allclose(metrics.content_heatmap(a, region).numpy() / 100, rma, atol=1e-6)


def test_complexity_equals_quantus(maps):
    a, _ = maps
    a = a**3  # some spread
    sparse = quantus.Sparseness(disable_warnings=True)(**quantus_args(a))
    assert np.allclose(metrics.sparseness(a).numpy(), sparse, atol=1e-6)
    entropy = quantus.Complexity(disable_warnings=True)(**quantus_args(a))
    assert np.allclose(metrics.complexity(a).numpy(), entropy, atol=1e-5)


@pytest.fixture
def model_case():
    torch.manual_seed(0)
    model = CompactCNN(4).eval()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def cam_explain(model, images, targets):
    with cgc.GradCAM(model, "features") as cam:
        return cgc.resize_heatmaps(cam(images, targets).cams, tuple(images.shape[-2:]))


def for_quantus(model, inputs, targets, **_):
    """The same explanation as Quantus calls it: numpy in, numpy [B,1,H,W] out."""
    heat = cam_explain(model, torch.as_tensor(inputs).float(), torch.as_tensor(targets).long())
    return heat.detach().numpy()[:, None]


def test_max_sensitivity_equals_quantus(model_case):
    model, x, y = model_case
    samples = 4
    noise = metrics.keyed_noise(7, list(range(5)), (3, 32, 32), 0.2)
    ours = metrics.max_sensitivity(lambda images, t: cam_explain(model, images, t), x, y, noise, samples=samples)
    draws = iter([noise(s).numpy() for s in range(samples)])

    def replay(arr, indices, **_):  # Quantus's perturbation hook, fed the noise ours used
        return arr + next(draws).reshape(arr.shape)

    theirs = quantus.MaxSensitivity(nr_samples=samples, perturb_func=replay, disable_warnings=True)(
        model=model,
        x_batch=x.numpy(),
        y_batch=y.numpy(),
        a_batch=for_quantus(model, x, y),
        explain_func=for_quantus,
        device="cpu",
    )
    assert np.allclose(ours.numpy(), theirs, atol=1e-5)


@pytest.mark.slow
def test_mprt_equals_quantus_at_its_granularity(model_case):
    model, x, y = model_case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = metrics.randomization_steps(model, "module", 32)
    names, rho, _ = metrics.model_randomization(model, cam_explain, x, y, steps, seed=42)
    theirs = quantus.MPRT(seed=42, disable_warnings=True)(
        model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=None, explain_func=for_quantus, device="cpu"
    )
    assert names == [n for n in theirs if n != "original"]
    for name, values in zip(names, rho):
        assert np.allclose(values.numpy(), theirs[name], atol=1e-4), name
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # never the user's model
