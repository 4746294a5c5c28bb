"""cgc.CGCTerm / cgc.cgc_term: one forward pass of both views, the same numbers as the pieces
it is made of, the model untouched and unowned, clear errors; examples/cgc_imagefolder.py runs
as written (the library page's examples: tests/test_docs.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import cgc
from cgc import transforms
from cgc.models import CompactCNN

ROOT = Path(__file__).resolve().parents[1]


def test_term_equals_its_pieces():
    """Logits, heatmaps and loss equal GradCAM + CGCLoss computed view by view (GroupNorm: no
    batch statistics, so one forward of both views equals two forwards)."""
    torch.manual_seed(0)
    model = CompactCNN(5, norm="group").double().train()
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    theta = transforms.random_crop_flip(6, 32, 32, generator=torch.Generator().manual_seed(1)).theta().double()
    with cgc.CGCTerm(model, method="hirescam", temperature=0.3, heatmap_size=24) as term:
        out = term(x, theta=theta)
    x_aug = transforms.apply(x, theta)
    assert torch.allclose(out.x_aug, x_aug)
    with cgc.GradCAM(model, method="hirescam") as cam:
        orig = cam(x, create_graph=True)
        aug = cam(x_aug, orig.targets, create_graph=True)
    assert torch.equal(out.targets, orig.targets)
    assert torch.allclose(out.logits, orig.logits, atol=1e-12) and torch.allclose(
        out.logits_aug, aug.logits, atol=1e-12
    )
    assert torch.allclose(out.cams, orig.cams, atol=1e-12) and torch.allclose(out.cams_aug, aug.cams, atol=1e-12)
    expected = cgc.CGCLoss(0.3, 24, floor=cgc.TermConfig().heatmap_floor)(orig.cams, aug.cams, theta)
    assert torch.allclose(out.loss, expected, atol=1e-12)
    # the gradient of the term reaches every layer (second order through the head)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "weight" in n)


def test_extra_views_targets_and_functional_form():
    torch.manual_seed(0)
    model = CompactCNN(4, norm="group").eval()
    x, extra = torch.randn(4, 3, 32, 32), torch.randn(3, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    out = cgc.cgc_term(model, x, targets=y, extra=[extra], generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.targets, y)
    assert [t.shape for t in out.extra_logits] == [(3, 4)]
    assert torch.allclose(out.extra_logits[0], model(extra), atol=1e-5)
    again = cgc.cgc_term(model, x, targets=y, extra=[extra], generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.theta, again.theta) and torch.allclose(out.loss, again.loss)
    assert not model._forward_hooks and not model.features._forward_hooks  # the functional form unhooks
    mse = cgc.cgc_term(model, x[:1], kind="mse")  # the ablation has no negatives: one image is enough
    assert mse.loss.ndim == 0 and torch.isfinite(mse.loss)


def test_term_owns_nothing_and_keeps_the_model_as_it_was():
    model = CompactCNN(3)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    term = cgc.CGCTerm(model)
    assert list(term.parameters()) == [] and term.state_dict() == {}
    assert term.target_layer == "features" and "features" in repr(term)
    model(torch.randn(2, 3, 32, 32))  # the user's own forward: the hook records nothing
    assert term.cam._activations is None
    term.close()
    assert not model.features._forward_hooks
    assert model.training
    assert set(before) == set(model.state_dict())


def test_term_errors():
    model = CompactCNN(3)
    with cgc.CGCTerm(model) as term:
        with pytest.raises(ValueError, match="at least 2 images"):
            term(torch.randn(1, 3, 32, 32))
        with pytest.raises(ValueError, match=r"theta must be \[3,2,3\]"):
            term(torch.randn(3, 3, 32, 32), theta=torch.zeros(2, 2, 3))
        with pytest.raises(ValueError, match="image batch"):
            term(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="unknown --cam 'gradcamm'; did you mean 'gradcam'"):
        cgc.CGCTerm(model, method="gradcamm")
    with pytest.raises(ValueError, match="--temperature must be a finite number > 0, got 0"):
        cgc.CGCTerm(model, temperature=0)
    with pytest.raises(ValueError, match="baseline without a CGC term"):
        cgc.CGCTerm(model, kind="ce")
    with pytest.raises(ValueError, match="unknown setting 'temprature'; did you mean 'temperature'"):
        cgc.cgc_term(model, torch.randn(2, 3, 32, 32), temprature=0.3)


def test_the_model_runs_once_per_term_call(rng):
    """The model's forward runs once per term call, on the original, augmented and extra views
    together (one batch: the cost of one forward, BatchNorm statistics of all views), and the
    backward through the heatmaps (create_graph) runs none."""
    model = CompactCNN(4).train()
    batches = []
    handle = model.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    x = torch.randn(5, 3, 32, 32, generator=rng)
    extra = [torch.randn(3, 3, 32, 32, generator=rng), torch.randn(2, 3, 32, 32, generator=rng)]
    try:
        with cgc.CGCTerm(model) as term:
            batches.clear()  # finding the CAM layer traced the model on the meta device
            out = term(x, extra=extra)
            assert batches == [5 + 5 + 3 + 2], f"forward passes of batches {batches}"
            (out.loss + sum(e.sum() for e in out.extra_logits)).backward()
            assert len(batches) == 1, f"forward passes of batches {batches}"
            batches.clear()
            term(x)
            assert batches == [10], f"forward passes of batches {batches}"
        batches.clear()
        cgc.cgc_term(model, x, extra=extra[:1], target_layer="features")
        assert batches == [13], f"forward passes of batches {batches}"
    finally:
        handle.remove()


@pytest.mark.slow
def test_example_script_trains_on_an_image_folder(tmp_path):
    for c, color in enumerate(((220, 40, 40), (40, 40, 220))):
        for k in range(4):
            d = tmp_path / "images" / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40 + k, 36), color).save(d / f"{k}.png")
    out = tmp_path / "w.pt"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "cgc_imagefolder.py"),
            str(tmp_path / "images"),
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--image-size",
            "32",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1: loss" in proc.stdout
    state = torch.load(out, weights_only=True)
    assert state["fc.weight"].shape == (2, 512)
