"""The options that keep the CGC term from holding a network at chance: the gate (cross-entropy
first, the term switched on once the training top-1 reaches a threshold), the CAMs of the
label instead of the predicted class, the stop-gradient on the warped original heatmap and the
bound on the term's gradient relative to cross-entropy's (an adaptive lambda)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import cgc
from cgc import CGCLoss, Safeguards, TermConfig, TermGate, checkpoint, evaluate, files, train, transforms
from cgc.evaluate import EvalConfig
from cgc.gate import TermOutcome
from cgc.train_config import TrainConfig

from .conftest import backend_device_params

TOY = TrainConfig().replace(
    train_size=96, val_size=40, batch_size=16, image_size=32, num_classes=4, overlays=0, epochs=2
)


def steps(out) -> list[dict]:
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- the gate
def test_the_gate_opens_when_the_moving_top1_reaches_the_threshold_and_stays_open():
    gate = TermGate(0.5, window=3)  # alpha = 0.5
    average, on_at = None, gate.first()
    assert on_at is None
    seen = []
    for i, top1 in enumerate([0.1, 0.9, 0.8, 0.1, 0.0]):
        average, on_at = gate.observe(average, top1, on_at, position=(i + 1) / 10)
        seen.append((round(average, 4), on_at))
    # 0.1 -> 0.5 (= threshold: opens at the end of step 2) -> 0.65 -> 0.375 -> 0.1875 (stays open)
    assert seen == [(0.1, None), (0.5, 0.2), (0.65, 0.2), (0.375, 0.2), (0.1875, 0.2)]
    assert TermGate(0.0).first() == 0.0  # no threshold: on from the start


def test_lambda_ramps_in_from_where_the_gate_opened():
    guard = Safeguards(TermConfig(lam=2.0, lambda_warmup_epochs=1.0, term_gate=0.5))
    assert guard.state.on_at is None and guard.weight(0.4) == 0.0  # off
    guard.observe(0.3, position=0.1, step=1)
    assert guard.state.on_at is None and guard.state.top1 == 0.3
    guard.state.top1 = 0.49
    guard.observe(0.9, position=3.0, step=30)  # the moving top-1 reaches 0.5: the gate opens
    assert guard.state.on_at == 3.0 and guard.state.first_step == 31
    assert guard.weight(3.5) == pytest.approx(2.0 * 0.5)  # half the ramp after it opened
    assert guard.weight(4.1) == 2.0
    assert Safeguards(TermConfig(term_gate=0.0, lambda_warmup_epochs=0.0)).weight(0.5) == 1.0  # no gate, no ramp
    assert Safeguards(TermConfig(loss="ce")).weight(5.0) == 0.0  # the baseline has no term


def test_the_outcome_says_whether_and_from_which_step_the_term_ran():
    never = TermOutcome(None, 120, 0.31, 0.5)
    assert not never.ran and never.to_dict()["term_first_step"] == "never"
    assert "never" in never.summary() and "0.31" in never.summary()
    assert "--term-gate 0" in never.warning() and "--epochs" in never.warning()
    opened = TermOutcome(41, 120, 0.8, 0.5, opened_at=1.3)
    assert opened.ran and opened.warning() is None and opened.summary() == "from step 41 of 120"
    assert opened.to_dict() == {
        "term_first_step": 41,
        "term_opened_at_epoch": 1.3,
        "term_gate": 0.5,
        "term_train_top1": 0.8,
    }
    # opened by the very last step: no step ran the term
    assert not TermOutcome(121, 120, 0.5, 0.5, opened_at=10.0).ran
    # a checkpoint from before the first step was recorded: where the gate opened is all it knows
    assert TermOutcome(None, 120, 0.9, 0.5, opened_at=2.5).summary() == "from epoch 2.50 of the run"


@pytest.mark.slow
def test_a_closed_gate_trains_the_ce_baseline(tmp_path):
    """While the gate is closed the step is the CE baseline's: same views, same losses, same
    weights; the term starts when the threshold is reached and ramps in from there."""
    ce = train.run(TOY.replace(loss="ce", epochs=1, out=str(tmp_path / "ce")))
    closed = train.run(TOY.replace(term_gate=0.99, epochs=1, out=str(tmp_path / "closed")))
    assert ce["val_top1"] == closed["val_top1"]
    a, b = steps(tmp_path / "ce"), steps(tmp_path / "closed")
    assert [s["loss"] for s in a] == [s["loss"] for s in b] and all(s["lambda"] == 0 for s in b)
    assert "cgc" not in b[0]
    # ... and says so: metrics.json, the results table, the warning, and the evaluation of its checkpoint
    assert "term_first_step" not in ce
    assert closed["term_first_step"] == "never" and closed["term_gate"] == 0.99
    assert json.loads((tmp_path / "closed" / "metrics.json").read_text())["term_first_step"] == "never"
    assert "| CGC term ran" in train.results_table(closed) and "never" in closed["term_summary"]
    assert "--term-gate 0" in closed["term_warning"]
    report = evaluate.run(
        EvalConfig(
            checkpoint=(str(tmp_path / "closed"), str(tmp_path / "ce")), metrics=("top1",), out=str(tmp_path / "e")
        )
    )
    assert report["closed"]["term_first_step"] == "never" and "--term-gate 0" in report["closed"]["term_warning"]
    assert "term_first_step" not in report["ce"]
    table = (tmp_path / "e" / "report.md").read_text()
    assert "| CGC term ran" in table and "no term (CE)" in table
    opens = train.run(TOY.replace(term_gate=0.05, lambda_warmup_epochs=1.0, out=str(tmp_path / "opens")))
    log = steps(tmp_path / "opens")
    on = [s for s in log if s["lambda"] > 0]
    assert on and "cgc" in on[0] and on[0]["step"] > 1 and log[-1]["lambda"] == pytest.approx(1.0)
    assert opens["term_first_step"] == on[0]["step"] and "term_warning" not in opens
    assert opens["term_summary"] == f"from step {on[0]['step']} of {len(log)}"
    state = checkpoint.load(tmp_path / "opens")["state"]
    assert state["gate"]["on_at"] is not None and 0 < state["gate"]["on_at"] < 1
    assert opens["val_top1"] >= 0
    epochs = [json.loads(line) for line in (tmp_path / "opens" / "log.jsonl").read_text().splitlines()]
    assert 0 < epochs[0]["train_lambda"] < 1  # the mean weight of the first epoch's steps


@pytest.mark.slow
def test_resume_across_the_gate_is_exact(tmp_path, monkeypatch):
    """A run killed after the gate opened resumes with the same gate, weights and logs."""
    config = TOY.replace(term_gate=0.05, cam_target="label", detach_target=True, grad_bound=0.5, checkpoint_every=3)
    train.run(config.replace(out=str(tmp_path / "full")))
    real_save = files.save_atomic

    def save_then_die(payload, path):
        real_save(payload, path)
        if payload["state"]["global_step"] == 9:
            raise KeyboardInterrupt

    monkeypatch.setattr(files, "save_atomic", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.run(config.replace(out=str(tmp_path / "cut")))
    monkeypatch.undo()
    train.run(config.replace(out=str(tmp_path / "cut"), resume="auto"))
    assert steps(tmp_path / "full") == steps(tmp_path / "cut")
    full, cut = (checkpoint.load(tmp_path / r) for r in ("full", "cut"))
    assert all(torch.equal(full["model"][k], cut["model"][k]) for k in full["model"])
    assert full["state"]["gate"] == cut["state"]["gate"] and full["state"]["gate"]["on_at"] is not None


# ----------------------------------------------------------------------------- the CAMs' class
class TinyCNN(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def test_label_targets_reach_the_term(monkeypatch, rng):
    """--cam-target label: the training step hands the labels to the term, whose CAMs explain
    them; predicted: the term picks the classes predicted on x."""
    from cgc import engine

    model = TinyCNN()
    x = torch.randn(4, 3, 8, 8, generator=rng)
    y = torch.tensor([2, 0, 1, 2])
    theta = transforms.random_crop_flip(4, 8, 8, generator=rng).theta()
    seen = []
    with cgc.CGCTerm(model, temperature=0.5) as term:
        real = term.forward
        monkeypatch.setattr(term, "forward", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
        for target in ("label", "predicted"):
            guard = Safeguards(TermConfig(cam_target=target))
            engine.train_step(model, term, engine.StepInputs(x, y, theta, None, theta), 1.0, guard=guard)
    assert torch.equal(seen[0].targets, y)
    assert torch.equal(seen[1].targets, seen[1].logits.argmax(1))


# ----------------------------------------------------------------------------- the gradient bound
def norm_of_gradient(loss: torch.Tensor, at: torch.Tensor) -> float:
    (g,) = torch.autograd.grad(loss, at, retain_graph=True)
    return float(g.double().norm())


@pytest.mark.parametrize("bound", [1e-3, 0.5, 1e3])
def test_bounded_lambda_is_the_gradient_ratio_at_the_cam_layer(rng, bound):
    """min(lam, bound * |dCE/dA| / |dterm/dA|), A the hooked activations of the whole batch."""
    model = TinyCNN(4).double()
    x = torch.randn(5, 3, 8, 8, generator=rng, dtype=torch.float64)
    y = torch.randint(0, 4, (5,), generator=rng)
    theta = transforms.random_crop_flip(5, 8, 8, generator=rng).theta().double()
    out = cgc.cgc_term(model, x, theta=theta, targets=y, temperature=0.5, backend="reference")
    ce = torch.nn.functional.cross_entropy(torch.cat([out.logits, out.logits_aug]), y.repeat(2))
    acts = out.activations
    assert acts.shape[0] == 10 and acts.requires_grad
    ratio = norm_of_gradient(ce, acts) / norm_of_gradient(out.loss, acts)
    got = cgc.bounded_lambda(2.0, ce, out.loss, acts, bound)
    assert not got.requires_grad and got.dtype == out.loss.dtype
    assert float(got) == pytest.approx(min(2.0, bound * ratio), rel=1e-12)
    summed = cgc.bounded_lambda(2.0, ce, out.loss, acts, bound, all_reduce_sum=lambda t: 3 * t)
    assert float(summed) == pytest.approx(float(got), rel=1e-12)  # both norms grow alike
    with pytest.raises(ValueError, match="must be positive"):
        cgc.bounded_lambda(2.0, ce, out.loss, acts, 0.0)


@pytest.mark.parametrize(
    "backend_device", backend_device_params(lambda b, d: d == "cpu" and b != "triton"), indirect=True
)
def test_the_bound_under_bfloat16_autocast(backend_device, rng):
    """cgc.train computes the bound inside the step's autocast region: the two extra gradients
    must run with the dtypes their forward recorded (a CPU backward runs in this thread, where
    autocast would otherwise recast its ops)."""
    from cgc import engine
    from cgc.models import CompactCNN
    from cgc.structure import to_channels_last

    backend, _ = backend_device
    model = to_channels_last(CompactCNN(4))
    x = torch.randn(6, 3, 32, 32, generator=rng)
    y = torch.randint(0, 4, (6,), generator=rng)
    theta = transforms.random_crop_flip(6, 32, 32, generator=rng).theta()
    with cgc.CGCTerm(model, "features", temperature=0.2, channels_last=True, backend=backend) as term:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            guard = Safeguards(TermConfig(grad_bound=1.0, cam_target="predicted"))
            out = engine.train_step(model, term, engine.StepInputs(x, y, theta, None, theta), 1.0, guard=guard)
        out["loss"].backward()
    assert 0 < float(out["lambda"]) <= 1.0 and torch.isfinite(out["loss"])


def test_a_term_without_gradient_keeps_its_weight(rng):
    acts = torch.randn(4, 3, generator=rng, dtype=torch.float64).requires_grad_()
    ce = acts.square().sum()
    flat = (acts * 0).sum()
    assert float(cgc.bounded_lambda(1.5, ce, flat, acts, 1.0)) == 1.5
    assert float(cgc.bounded_lambda(1.5, flat, ce, acts, 1.0)) == 0.0  # CE without gradient: no term


def test_the_bound_scales_the_terms_gradient_and_adds_none(rng):
    """The step's loss is CE + w * term with the bounded weight w held constant: its gradient
    (float64, through the term's second order) is CE's plus w times the term's."""
    from cgc import engine

    model = TinyCNN(4).double()
    x = torch.randn(4, 3, 8, 8, generator=rng, dtype=torch.float64)
    y = torch.tensor([3, 1, 2, 0])
    theta = transforms.random_crop_flip(4, 8, 8, generator=rng).theta().double()
    with cgc.CGCTerm(model, temperature=0.5, backend="reference") as term:
        inputs = engine.StepInputs(x, y, theta, None, theta)
        bounded = Safeguards(TermConfig(grad_bound=0.05, cam_target="predicted"))
        out = engine.train_step(model, term, inputs, 1.0, guard=bounded)
        params = list(model.parameters())
        w = out["lambda"]
        assert 0 < float(w) < 1.0  # the bound is active on this draw
        total = torch.autograd.grad(out["loss"], params, retain_graph=True)
        ce = torch.autograd.grad(out["ce"], params, retain_graph=True)
        cgc_grads = torch.autograd.grad(out["cgc"], params, retain_graph=True, allow_unused=True)
        for t, c, g in zip(total, ce, cgc_grads):  # None: the head's bias does not move a heatmap
            torch.testing.assert_close(t, c if g is None else c + w * g, rtol=1e-12, atol=1e-14)
        plain = engine.train_step(model, term, inputs, 1.0, guard=Safeguards(TermConfig(cam_target="predicted")))
        assert "lambda" not in plain and float(plain["loss"].detach()) == pytest.approx(
            float((plain["ce"] + plain["cgc"]).detach())
        )


# ----------------------------------------------------------------------------- the floor
def _amplification(seed: int, floor: float | None, steps: int = 8, batch: int = 16) -> float:
    """How much ``steps`` SGD steps (float64, lr 0.05, a GroupNorm compact model from its
    initialization, the term with the label's CAMs at full weight from the first step; ``floor``
    None: CE alone) amplify a perturbation of 1e-9 of the weights: the relative size of the
    difference at the end to the one at the start. Rounding (another thread count, another
    machine) is such a perturbation."""
    from cgc import data, engine
    from cgc.models import CompactCNN

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    bundle = data.build("synthetic", seed=seed, image_size=32, train_size=batch * steps, val_size=8, num_classes=6)
    images = data.normalize(bundle.train.images).double().reshape(steps, batch, 3, 32, 32)
    labels = bundle.train.labels.reshape(steps, batch)
    thetas = [transforms.random_crop_flip(batch, 32, 32, generator=gen).theta().double() for _ in range(steps)]
    models = [CompactCNN(6, norm="group").double() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    with torch.no_grad():
        for p in models[1].parameters():
            p.add_(1e-9 * p.abs().mean() * torch.randn(p.shape, generator=gen, dtype=p.dtype))

    def flat(model):
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    start = (flat(models[1]) - flat(models[0])).norm()
    config = TermConfig(heatmap_floor=floor or 0.0, term_gate=0.0, cam_target="label")
    for model in models:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        term = None if floor is None else cgc.CGCTerm.from_config(model, config, backend="reference")
        for k in range(steps):
            inputs = engine.StepInputs(images[k], labels[k], thetas[k], None, thetas[k])
            out = engine.train_step(model, term, inputs, 1.0, guard=Safeguards(config))
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
        if term is not None:
            term.close()
    return float((flat(models[1]) - flat(models[0])).norm() / start)


def test_the_floor_keeps_the_term_from_amplifying_rounding():
    """The term on from the first step with the label's CAMs (fine-tuning's case) is
    ill-conditioned without a floor: early on most label CAMs are nearly empty, and 8 steps
    amplify a perturbation of the weights hundreds to many thousand times (the run's end then
    depends on rounding: 1 vs 2 threads end 5 % apart). With the default floor (1) the term
    amplifies it about as little as cross-entropy alone (measured on seeds 0-9: CE 1.01-1.06,
    floor 1 1.02-1.15, no floor 22-670 000)."""
    seed = 4
    ce = _amplification(seed, None)
    assert ce < 1.5
    assert _amplification(seed, TermConfig().heatmap_floor) < 2 * ce  # the default floor
    assert _amplification(seed, 0.0) > 100 * ce


# ----------------------------------------------------------------------------- the stop-gradient
def test_detached_target_gets_no_gradient_and_the_anchor_the_same(rng):
    cam_orig = torch.rand(4, 6, 6, generator=rng, dtype=torch.float64).requires_grad_()
    cam_aug = torch.rand(4, 6, 6, generator=rng, dtype=torch.float64).requires_grad_()
    theta = transforms.random_crop_flip(4, 6, 6, generator=rng).theta().double()
    plain = CGCLoss(0.5, None, backend="reference")(cam_orig, cam_aug, theta, (6, 6))
    detached = CGCLoss(0.5, None, backend="reference", detach_target=True)(cam_orig, cam_aug, theta, (6, 6))
    assert plain.item() == detached.item()  # the same value
    g_plain = torch.autograd.grad(plain, (cam_orig, cam_aug))
    g_orig, g_aug = torch.autograd.grad(detached, (cam_orig, cam_aug), allow_unused=True)
    assert g_orig is None or not g_orig.any()
    torch.testing.assert_close(g_aug, g_plain[1])  # the anchor's gradient does not depend on it
    assert g_plain[0].abs().sum() > 0


def test_detached_loss_gradcheck(rng):
    """float64 gradcheck of the detached loss as a function of what it differentiates: the
    augmented heatmaps (the original ones held fixed)."""
    cam_orig = torch.rand(3, 5, 5, generator=rng, dtype=torch.float64)
    cam_aug = torch.rand(3, 5, 5, generator=rng, dtype=torch.float64).requires_grad_()
    theta = transforms.random_crop_flip(3, 5, 5, generator=rng).theta().double()
    loss = CGCLoss(0.5, None, backend="reference", detach_target=True)
    assert torch.autograd.gradcheck(lambda a: loss(cam_orig, a, theta, (5, 5)), (cam_aug,), eps=1e-6, atol=1e-6)


def test_term_with_the_safe_options_differentiates_the_augmented_side_only(rng):
    """The whole term (second order through the head) with the label's CAMs and the detached
    target has the gradient of the plain loss whose original heatmaps are constants."""
    model = TinyCNN(4).double()
    x = torch.randn(3, 3, 6, 6, generator=rng, dtype=torch.float64).requires_grad_()
    theta = transforms.random_crop_flip(3, 6, 6, generator=rng).theta().double()
    labels = torch.tensor([3, 1, 2])
    kw = dict(theta=theta, targets=labels, temperature=0.5, backend="reference")
    out = cgc.cgc_term(model, x, detach_target=True, **kw)
    (got,) = torch.autograd.grad(out.loss, x)
    plain = cgc.cgc_term(model, x, **kw)
    floor = TermConfig().heatmap_floor  # the term's default
    want = CGCLoss(0.5, None, backend="reference", floor=floor)(plain.cams.detach(), plain.cams_aug, theta, (6, 6))
    (expected,) = torch.autograd.grad(want, x, retain_graph=True)
    assert torch.equal(out.targets, labels)
    torch.testing.assert_close(got, expected)
    (everything,) = torch.autograd.grad(plain.loss, x)
    assert not torch.allclose(got, everything)  # the original's path did contribute before


def test_the_gate_is_checked_and_the_ce_baseline_ignores_the_safeguards(tmp_path):
    """The safeguards shape the term: a CE run ignores them (a CE checkpoint of any age loads,
    whatever its config says), as it ignores T and λ."""
    assert "--term-gate must be in [0, 1), got 1.5" in TrainConfig().replace(term_gate=1.5).problems()[0]
    assert "--grad-bound must be a finite number >= 0, got -1.0" in TrainConfig().replace(grad_bound=-1.0).problems()[0]
    assert (
        TrainConfig()
        .replace(loss="ce", term_gate=0.0, cam_target="predicted", detach_target=True, grad_bound=2.0)
        .problems()
        == []
    )
    ce = TOY.replace(loss="ce", epochs=1, seed=3)
    plain = train.run(ce.replace(out=str(tmp_path / "a")))
    shaped = train.run(ce.replace(term_gate=0.0, cam_target="predicted", out=str(tmp_path / "b")))
    assert plain["val_top1"] == shaped["val_top1"]
