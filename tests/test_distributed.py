"""Distributed CGC on torchrun (gloo, two CPU processes): the same model as one process, global
vs local negatives, the differentiable gather, one writer, exact mid-epoch resume, SIGTERM and a
killed worker restarted by torchrun.

Equivalence tolerance (1 vs 2 processes, float32, compact model with GroupNorm, lr 0.01, 16
steps): per-step losses within 1e-5 relative, final weights within 1e-5 of the largest
weight; the sums over a batch are split differently between processes, so the last bits
differ. Resumed and restarted runs repeat the uninterrupted ones bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cgc import CGCLoss, CGCTerm, checkpoint, data, distributed, engine, files, train, transforms
from cgc.models import build_model
from cgc.train_config import TrainConfig

pytestmark = pytest.mark.slow  # torchrun processes and whole training runs: the slow tier

TOY = TrainConfig().replace(
    train_size=64, val_size=24, batch_size=8, image_size=32, num_classes=3, epochs=2, arch="compact", norm="group",
    optimizer="sgd", lr=0.01, overlays=2, checkpoint_every=3, workers=0, amp="off",
    term_gate=0.0, cam_target="predicted",  # the paper's term, on from the first step (step_one_terms)
)  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def config_file(config: TrainConfig, folder: Path) -> str:
    """``config`` as a YAML file for a command line (``--config``)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.in.yaml"
    path.write_text(config.to_yaml())
    return str(path)


def torchrun(*args, nproc: int = 2, extra=(), timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        *extra,
        "-m",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0 or not check, proc.stderr[-3000:]
    return proc


def train_with_torchrun(config: TrainConfig, out: Path, **kwargs) -> subprocess.CompletedProcess:
    return torchrun(
        "cgc.train", "--config", config_file(config.replace(out=str(out)), out.parent / "configs"), **kwargs
    )


def steps(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same flags on one process (in this one) and on two (torchrun)."""
    root = tmp_path_factory.mktemp("dist")
    train.run(TOY.replace(out=str(root / "one")))
    proc = train_with_torchrun(TOY, root / "two")
    return root, proc


def test_two_processes_train_the_same_model_as_one(runs):
    root, _ = runs
    assert_same_steps(steps(root / "one"), steps(root / "two"), count=16, rel=1e-5)
    wa, wb = weights(root / "one"), weights(root / "two")
    scale = max(v.abs().max() for v in wa.values())
    assert max((wa[k] - wb[k]).abs().max() for k in wa) <= 1e-5 * scale
    la, lb = ([json.loads(x) for x in (root / r / "log.jsonl").read_text().splitlines()] for r in ("one", "two"))
    assert [r["val_top1"] for r in la] == [r["val_top1"] for r in lb]
    ma, mb = (json.loads((root / r / "metrics.json").read_text()) for r in ("one", "two"))
    assert mb["processes"] == 2 and ma["processes"] == 1
    for key in ("content_heatmap", "pointing_game", "consistency", "consistency_iou"):
        assert ma[key] == pytest.approx(mb[key], rel=1e-4, abs=1e-4), key


def test_outputs_are_written_once(runs):
    root, proc = runs
    run = root / "two"
    log = (run / "log.jsonl").read_text().splitlines()
    assert len(log) == 2
    assert [s["step"] for s in steps(run)] == list(range(1, 17))
    assert sorted(p.name for p in run.iterdir()) == [
        "best.pt",
        "config.yaml",
        "curves.png",
        "last.pt",
        "log.jsonl",
        "metrics.json",
        "model.safetensors",
        "overlays.png",
        "steps.jsonl",
    ]
    assert proc.stderr.count("cgc.train: compact") == 1 and proc.stdout.count("| val top-1") == 1
    ckpt = checkpoint.load(run)
    assert ckpt["state"]["epoch"] == 2 and ckpt["state"]["step"] == 0 and len(ckpt["rng"]) == 2


def step_one_terms(batch_rows: list[list[int]]) -> list[float]:
    """The CGC term of step 1 computed by hand (the initial model, the first global batch, the
    keyed crops of TOY's seed 0), once per group of its rows."""
    torch.manual_seed(0)
    bundle = data.build("synthetic", seed=0, image_size=32, train_size=64, val_size=24, num_classes=3)
    model = build_model("compact", 3, norm="group")
    first = next(iter(distributed.GlobalBatchSampler(64, 8, seed=0, epoch=0)))
    values = []
    with CGCTerm(model, loss=CGCLoss(TOY.term.temperature, None, floor=TOY.term.heatmap_floor)) as term:
        for rows in batch_rows:
            idx = [first[r] for r in rows]
            x = data.normalize(bundle.train.images[idx])
            theta = engine.crop_thetas(transforms.sample_keys(0, 0, idx, "aug"), (32, 32), (0.08, 1.0), "cpu")
            values.append(float(term(x, theta=theta).loss.detach()))
    return values


def test_global_and_local_negatives(runs, tmp_path):
    root, _ = runs
    (whole,) = step_one_terms([list(range(8))])
    assert steps(root / "one")[0]["cgc"] == pytest.approx(whole, rel=1e-5)
    assert steps(root / "two")[0]["cgc"] == pytest.approx(whole, rel=1e-5)  # global: the whole batch's negatives
    train_with_torchrun(TOY.replace(epochs=1, negatives="local"), tmp_path / "local")
    halves = step_one_terms([[0, 1, 2, 3], [4, 5, 6, 7]])
    local = steps(tmp_path / "local")[0]["cgc"]
    assert local == pytest.approx(sum(halves) / 2, rel=1e-5)  # each process's own 3 negatives
    assert abs(local - whole) > 1e-3


def one_and_two_processes(config: TrainConfig, tmp_path: Path) -> tuple[list[dict], list[dict]]:
    """The step logs of ``config`` run in this process and on two torchrun processes."""
    train.run(config.replace(out=str(tmp_path / "one")))
    train_with_torchrun(config, tmp_path / "two")
    return steps(tmp_path / "one"), steps(tmp_path / "two")


def assert_same_steps(
    one: list[dict], two: list[dict], count: int, rel: float, lambda_rel: float | None = None
) -> None:
    """The same steps with the same losses (to ``rel``) and term weights (to ``lambda_rel``, default ``rel``)."""
    assert len(one) == len(two) == count
    for a, b in zip(one, two):
        assert a["step"] == b["step"] and a["lr"] == b["lr"] and a.keys() == b.keys()
        assert a.get("lambda") == pytest.approx(b.get("lambda"), rel=lambda_rel or rel)
        for key in ("loss", "ce", "cgc"):
            if key in a:  # cgc: not before the term's gate opens
                assert abs(a[key] - b[key]) <= rel * abs(a[key]), (a["step"], key, a[key], b[key])


def test_two_processes_equal_one_with_uniform_crops_and_class_negatives(tmp_path):
    """The term's options on the distributed path: the class negatives are gathered with the
    anchors, so two processes take the steps of one."""
    options = TOY.replace(epochs=1, crop_sampler="uniform", class_negatives=2)
    assert_same_steps(*one_and_two_processes(options, tmp_path), count=8, rel=1e-5)


def test_two_processes_equal_one_with_the_safeguards(tmp_path):
    """The term's gate opens on the global batch's training top-1 (all-reduced), so at the same
    step on one and on two processes; the label's CAMs and the detached target change nothing
    about the equality."""
    options = TOY.replace(epochs=3, term_gate=0.45, cam_target="label", detach_target=True)
    one, two = one_and_two_processes(options, tmp_path)
    assert_same_steps(one, two, count=24, rel=1e-5)
    assert one[0]["lambda"] == 0  # the gate starts closed


def test_two_processes_equal_one_with_the_gradient_bound(tmp_path):
    """The bound's norms are summed over the processes and the term's gradient at the CAM layer
    comes home through the gathered negatives, so both take one process's weight each step.
    The weight is a ratio of gradient norms, which amplify float-order differences more than the
    losses do: measured 1e-6 relative at step 7, 1.3e-5 at step 8 (the losses: < 5e-6)."""
    options = TOY.replace(epochs=1, grad_bound=0.3, lambda_warmup_epochs=0.0)
    one, two = one_and_two_processes(options, tmp_path)
    assert_same_steps(one, two, count=8, rel=1e-5, lambda_rel=1e-4)
    assert all(s["lambda"] <= 1 for s in one) and any(s["lambda"] < 1 for s in one)  # lowered from λ = 1


def test_two_processes_equal_one_on_a_vision_transformer(tmp_path):
    """Global negatives under torchrun on a ViT (timm's tiny test ViT, CAM at its last block's
    first norm, the term's second order through attention): two processes take the steps of one."""
    pytest.importorskip("timm", reason="timm is optional (pip install timm)")
    vit = TOY.replace(epochs=1, arch="timm:test_vit", norm="batch", train_size=48)
    assert_same_steps(*one_and_two_processes(vit, tmp_path), count=6, rel=1e-4)


def test_gather_sends_gradients_home(tmp_path):
    script = tmp_path / "gather.py"
    # each rank writes its own result file: lines two processes print to one pipe can interleave
    script.write_text(
        "import json, sys\nimport torch\nfrom cgc import distributed\nctx = distributed.init('cpu')\n"
        "x = (torch.arange(6.).view(3, 2) + 10 * ctx.rank)[:3 - ctx.rank].requires_grad_()\n"
        "rows, offset = ctx.gather(x)\n(rows * torch.arange(rows.numel()).view_as(rows)).sum().backward()\n"
        "with open(f'{sys.argv[1]}/rank{ctx.rank}.json', 'w') as f:\n"
        "    json.dump([offset, rows.tolist(), x.grad.tolist()], f)\n"
        "distributed.shutdown(ctx)\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(tmp_path),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)
    assert out.returncode == 0, out.stderr
    found = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    rows = [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [10.0, 11.0], [12.0, 13.0]]
    # ranks hold 3 and 2 rows; each rank's loss weights row r by 2r, 2r+1, so the gradient of
    # a row is twice its weights (one copy per process)
    assert found[0] == [0, rows, [[0.0, 2.0], [4.0, 6.0], [8.0, 10.0]]]
    assert found[1] == [3, rows, [[12.0, 14.0], [16.0, 18.0]]]


def test_mid_epoch_resume_is_bit_identical(tmp_path, monkeypatch):
    one_epoch = TOY.replace(epochs=1)
    train.run(one_epoch.replace(out=str(tmp_path / "full")))
    real_save = files.save_atomic

    def save_then_die(state, path):
        real_save(state, path)
        if state["state"]["step"] == 6:
            raise KeyboardInterrupt  # killed right after the checkpoint of step 6 of 8

    monkeypatch.setattr(files, "save_atomic", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.run(one_epoch.replace(out=str(tmp_path / "cut")))
    monkeypatch.undo()
    assert checkpoint.load(tmp_path / "cut")["state"]["step"] == 6
    train.run(one_epoch.replace(out=str(tmp_path / "cut"), resume="auto"))
    full, cut = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)
    assert steps(tmp_path / "full") == steps(tmp_path / "cut")  # steps 1-8 once each, same numbers
    fa, fb = (json.loads((tmp_path / r / "log.jsonl").read_text()) for r in ("full", "cut"))
    fa.pop("time_s"), fb.pop("time_s")
    assert fa == fb


def wait_until_training(out: Path, proc: subprocess.Popen, seconds: float = 180) -> None:
    """Until the run has logged its first step (its SIGTERM handler is in place by then)."""
    deadline = time.time() + seconds
    steps_file = out / "steps.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if steps_file.is_file() and steps_file.read_text().strip():
            return
        time.sleep(0.02)
    raise AssertionError(f"the run did not start training in {seconds} s (exit status {proc.poll()})")


def test_sigterm_saves_and_stops(tmp_path):
    out = tmp_path / "run"
    long = TOY.replace(epochs=50, checkpoint_every=0, out=str(out))
    cmd = [sys.executable, "-m", "cgc.train", "--config", config_file(long, tmp_path / "configs")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    wait_until_training(out, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "preempted: saved" in err and "Traceback" not in err
    ckpt = checkpoint.load(out)
    done = ckpt["state"]["global_step"]
    assert 1 <= done < 50 * 8 and len(steps(out)) == done
    epochs = ckpt["state"]["epoch"] + 1
    train.run(long.replace(epochs=epochs, resume=str(out)))
    assert checkpoint.load(out)["state"]["epoch"] == epochs


def rank_of(pid: int) -> int | None:
    """The torchrun rank of a worker process (its RANK variable), None for other processes."""
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    found = [v.split(b"=", 1)[1] for v in env if v.startswith(b"RANK=")]
    return int(found[0]) if found else None


def children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry.name))
    return kids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes through /proc")
def test_killed_worker_is_restarted_and_resumes(runs, tmp_path):
    """SIGKILL one of two workers after the first mid-epoch checkpoint: torchrun (--max-restarts
    1) restarts both, they resume from OUT/last.pt by themselves, and the job ends with the
    weights of the uninterrupted two-process run."""
    root, _ = runs
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "--max-restarts",
        "1",
        "-m",
        "cgc.train",
        "--config",
        config_file(TOY.replace(out=str(out)), tmp_path / "configs"),
    ]
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 180
    killed = None
    while time.time() < deadline and agent.poll() is None and killed is None:
        if (out / "last.pt").is_file():
            workers = children(agent.pid)
            if workers:
                killed = workers[-1]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    _, err = agent.communicate(timeout=300)
    assert killed is not None, "the run ended before a worker could be killed"
    assert agent.returncode == 0, err[-3000:]
    assert "resumed from" in err
    assert [s["step"] for s in steps(out)] == list(range(1, 17))
    full, resumed = weights(root / "two"), weights(out)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes through /proc")
def test_sigterm_to_one_of_two_workers_stops_both_with_a_checkpoint(runs, tmp_path):
    """SIGTERM to rank 1 only: the flag travels in the step's all-reduce, both processes stop
    after the same step, the checkpoint holds both RNG states, both exit 143 (preempted), and
    resuming the job ends with the weights of the uninterrupted run."""
    root, _ = runs
    out = tmp_path / "term"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cgc.train",
        "--config", config_file(TOY.replace(out=str(out)), tmp_path / "configs"),
    ]  # fmt: skip
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    wait_until_training(out, agent)
    workers = {rank_of(pid): pid for pid in children(agent.pid)}
    os.kill(workers[1], signal.SIGTERM)
    _, err = agent.communicate(timeout=300)
    assert agent.returncode != 0 and err.count("exitcode  : 143") + err.count("exitcode: 143") >= 1, err[-3000:]
    assert "preempted: saved" in err and "Traceback" not in err.split("preempted: saved")[0]
    ckpt = checkpoint.load(out)
    done = ckpt["state"]["global_step"]
    assert 1 <= done < 16 and len(ckpt["rng"]) == 2 and len(steps(out)) == done
    train_with_torchrun(TOY.replace(resume="auto"), out)
    assert [s["step"] for s in steps(out)] == list(range(1, 17))
    full, resumed = weights(root / "two"), weights(out)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_evaluate_under_torchrun_equals_one_process(runs, tmp_path):
    root, _ = runs
    from cgc import evaluate

    one = evaluate.main(["--checkpoint", str(root / "one"), "--out", str(tmp_path / "e1"), "--overlays", "2"])
    torchrun("cgc.evaluate", "--checkpoint", str(root / "one"), "--out", str(tmp_path / "e2"), "--overlays", "2")
    two = json.loads((tmp_path / "e2" / "report.json").read_text())["models"]
    for key in (
        "top1",
        "top5",
        "content_heatmap",
        "pointing_game",
        "insertion_auc",
        "deletion_auc",
        "consistency",
        "consistency_iou",
    ):
        assert two["one"][key] == pytest.approx(one["one"][key], rel=1e-5, abs=1e-6), key


def test_distributed_flag_errors(tmp_path):
    with pytest.raises(SystemExit, match="SyncBatchNorm has no CPU kernel"):
        train.main(["--config", config_file(TOY, tmp_path), "--sync-bn", "--device", "cpu"])
    proc = train_with_torchrun(TOY.replace(batch_size=7), tmp_path / "x", check=False, timeout=120)
    assert proc.returncode != 0 and "must divide evenly over the 2 processes" in proc.stderr
