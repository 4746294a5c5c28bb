"""The documentation works: every relative link of README.md, docs/ and benchmarks/RESULTS.md
reaches a file (and a heading) of the repository; nothing cites notes that are not in it; the
flag references in docs are the ones the commands' settings generate; the Python of
docs/library.md, docs/backends.md, docs/transformers.md and README's snippets runs as written; README stays a short
landing page whose quick-start test command is the one CI runs."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

import cgc
from cgc import flag_reference
from cgc.settings import reference_markers
from study import flag_reference as study_reference

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md")), ROOT / "benchmarks" / "RESULTS.md"]
README_MAX_LINES = 250
#: what the repository must not cite: internal notes that are not part of it (spelled in pieces
#: so that this file does not cite them itself)
ABSENT = ("METHOD" + ".md", "DESIGN" + ".md", "shared" + "/")
#: how the project is developed stays out of the published text and the benchmarks
DEVELOPMENT = re.compile(r"\bissues? #?\d+|\bsessions?\b|\bthe brief\b|\blent\b", re.IGNORECASE)
#: folders that are not part of the repository when git cannot say so
UNTRACKED = {".git", ".venv", "build", "runs", "__pycache__", ".pytest_cache", ".benchmarks"}

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def prose(text: str) -> str:
    """``text`` without its code blocks and inline code, where brackets are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page.read_text()))


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def repository_files() -> list[Path]:
    """The repository's files: tracked and new ones git does not ignore (a walk without git)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = []
        for folder, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in UNTRACKED and not d.endswith(".egg-info")]
            names += [rel(Path(folder) / f) for f in files]
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def text_of(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    return data.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- links
def test_readme_links_every_page():
    for name in ("method", "training", "distributed", "evaluation", "library", "backends", "datasets", "study"):
        assert (DOCS / f"{name}.md").is_file(), f"docs/{name}.md is missing"
    linked = {(README.parent / target.split("#")[0]).resolve() for target in links(README)}
    unlinked = [rel(p) for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link to {unlinked}: add them to its Documentation table"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or ROOT.resolve() not in (dest, *dest.parents):
            broken.append(f"{target} (no such file in the repository)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading '#{anchor}' in {rel(dest)})")
    assert not broken, f"{rel(page)} has broken links: " + "; ".join(broken)


def test_slug_follows_github():
    assert slug("GPU (NVIDIA H100 80GB HBM3, torch 2.11, commit 47fd59e, 2026-11-26)") == (
        "gpu-nvidia-h100-80gb-hbm3-torch-211-commit-47fd59e-2026-11-26"
    )
    assert slug("The `info_nce` op: explicit negatives") == "the-info_nce-op-explicit-negatives"
    assert slug("Training: `python -m cgc.train`") == "training-python--m-cgctrain"


# ----------------------------------------------------------------------------- what is cited
def test_nothing_cites_notes_outside_the_repository():
    found = []
    for path in repository_files():
        text = text_of(path)
        if text is None:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            found += [f"{rel(path)}:{n}: {name}" for name in ABSENT if name in line]
    assert not found, "cites files that are not in the repository:\n" + "\n".join(found)


def test_published_text_does_not_describe_how_it_was_developed():
    paths = [*PAGES, *sorted(p for p in (ROOT / "benchmarks").rglob("*") if p.is_file())]
    found = []
    for path in paths:
        text = text_of(path)
        if text is None:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if m := DEVELOPMENT.search(line):
                found.append(f"{rel(path)}:{n}: {m.group(0)!r}")
    assert not found, "say what was measured, on which commit and machine, instead of:\n" + "\n".join(found)


# ----------------------------------------------------------------------------- the flag reference
def test_flag_references_are_generated_from_the_settings():
    """Every command's flag reference in the docs is what its settings class generates (the
    study's too, which lives beside the library)."""
    assert flag_reference.stale(ROOT) == [], "run `python -m cgc.flag_reference --write`"
    assert flag_reference.stale(ROOT, study_reference.PAGES) == [], "run `python -m study.flag_reference --write`"


def test_no_flag_table_is_written_by_hand():
    """Flag tables live between the generated references' markers; other pages link to them."""
    for page in PAGES:
        text = page.read_text()
        for cls in {**flag_reference.PAGES, **study_reference.PAGES}:
            start, end = reference_markers(cls)
            if start in text:
                text = text[: text.index(start)] + text[text.index(end) :]
        assert "| flag | default |" not in text, f"{rel(page)} has a hand-written flag table"


# ----------------------------------------------------------------------------- runnable Python
@pytest.mark.slow
def test_library_page_runs_as_written():
    blocks = python_blocks(DOCS / "library.md")
    assert len(blocks) >= 3
    scope: dict = {}
    try:
        for block in blocks:
            exec(compile(block, "docs/library.md", "exec"), scope)  # noqa: S102 - our own docs
        assert isinstance(scope["loss"], torch.Tensor) and torch.isfinite(scope["loss"])
        assert scope["heat"].shape == (4, 64, 64)
        assert "absgrad" in cgc.CAM_METHODS
    finally:
        cgc.CAM_METHODS.pop("absgrad", None)
        if "term" in scope:
            scope["term"].close()


def test_backends_page_runs_as_written():
    blocks = python_blocks(DOCS / "backends.md")
    assert blocks
    scope: dict = {}
    for block in blocks:
        exec(compile(block, "docs/backends.md", "exec"), scope)  # noqa: S102 - our own docs
    assert torch.isfinite(scope["loss"]) and torch.isfinite(scope["same_rows"])


def test_transformers_page_runs_as_written():
    pytest.importorskip("timm", reason="timm is optional (pip install timm)")
    # the Hugging Face snippet runs in tests/test_huggingface.py, where transformers is there
    blocks = [b for b in python_blocks(DOCS / "transformers.md") if "from transformers" not in b]
    assert blocks
    scope: dict = {}
    for block in blocks:
        exec(compile(block, "docs/transformers.md", "exec"), scope)  # noqa: S102 - our own docs
    assert scope["heat"].shape == (2, 8, 8) and torch.isfinite(scope["heat"]).all()


def test_readme_training_loop_runs_with_a_model_optimizer_and_loader():
    from cgc.models import CompactCNN

    block = next(b for b in python_blocks(README) if "CGCTerm" in b)
    model = CompactCNN(10)
    scope: dict = dict(
        model=model,
        opt=torch.optim.SGD(model.parameters(), lr=0.01),
        loader=[(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))],
    )
    try:
        exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - our own README
        assert torch.isfinite(scope["loss"])
    finally:
        if "term" in scope:
            scope["term"].close()


@pytest.mark.parametrize("page", [README, DOCS / "training.md"], ids=rel)
def test_weights_load_without_cgc_as_shown(page, tmp_path, monkeypatch):
    """The snippet that loads a run's model.safetensors into torchvision, on a file written the
    way a run writes it."""
    import torchvision

    from cgc.files import save_weights

    block = next(b for b in python_blocks(page) if "load_file(" in b)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "cgc").mkdir(parents=True)
    saved = torchvision.models.resnet18(num_classes=10)
    save_weights(saved, "runs/cgc/model.safetensors")
    scope: dict = {}
    exec(compile(block, rel(page), "exec"), scope)  # noqa: S102 - our own docs
    assert torch.equal(scope["model"].fc.weight, saved.fc.weight)


# ----------------------------------------------------------------------------- the landing page
def test_readme_is_a_landing_page():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move details to docs/ (at most {README_MAX_LINES})"


def test_readme_quick_start_is_what_ci_runs():
    text = README.read_text()
    bash = [b.strip() for b in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)]
    install = (
        "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt && "
        "pip install --no-build-isolation -e . && python -m cgc.train"
    )
    assert install in bash, "README's quick start lost its install-and-train command"
    assert ". .venv/bin/activate && python -m pytest tests" in bash
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci[-1] == "python -m pytest tests", "CI must run README's test command"
    extras = ci.index(
        'pip install --no-build-isolation -e ".[test]"'
    )  # the package as README builds it, plus its oracles
    # before any extra: README's quick-start environment, where the quick tier and the study's tests must pass
    quick_start = ["pip install -r requirements.txt", "pip install --no-build-isolation -e ."]
    assert all(ci.index(step) < extras for step in quick_start)
    assert any(line.startswith('python -m pytest tests -m "not slow"') for line in ci[:extras])
    assert any(line.startswith("python -m pytest tests/test_study.py") for line in ci[:extras])
    assert not any("pip install" in line for line in ci[ci.index(quick_start[1]) + 1 : extras])
    assert "ruff check ." in ci and "ruff format --check ." in ci
