"""Hugging Face ``transformers`` image classifiers as cgc models: their outputs read for logits,
the layer search at their own image size, token layouts read from their configs (ViT, DeiT,
BEiT, DINOv2 with and without registers, Swin's token stages; ConvNeXt, ResNet and EfficientNet
as CNNs), layers that output tuples, every CAM method equal to pytorch-grad-cam's, the CGC term
differentiable twice through both attention implementations, ``--arch hf:DIR`` in the command
lines with the save_pretrained folder a run writes, and one error line for each bad input.

Every model is built from a small config (a few blocks, small widths) at 64 px, offline."""

from __future__ import annotations

import collections
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import cgc
from cgc import checkpoint, evaluate, explain, models, train
from cgc.errors import ConfigError, MissingDependency, MissingFile, UnsupportedModel
from cgc.models import describe, find_target_layer
from cgc.structure import TokenMap, declared_size, logits_of

from .conftest import assert_equals_pytorch_grad_cam

transformers = pytest.importorskip(
    "transformers",
    minversion="5.0",
    reason="transformers is optional (pip install transformers); these tests name the modules of its version 5",
)

SIZE = 64
METHODS = ["gradcam", "hirescam", "gradcam++", "xgradcam", "layercam"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread runs them as fast as several on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def vit_args(size: int = SIZE, patch: int = 8, **kw) -> dict:
    return dict(
        image_size=size,
        patch_size=patch,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        **kw,
    )


def tiny(kind: str, classes: int = 3, size: int = SIZE, **kw) -> nn.Module:
    """A small randomly initialized classifier of each family, built from its config."""
    torch.manual_seed(0)
    t = transformers
    if kind == "vit":
        return t.ViTForImageClassification(t.ViTConfig(**vit_args(size, **kw), num_labels=classes))
    if kind == "deit":
        return t.DeiTForImageClassificationWithTeacher(t.DeiTConfig(**vit_args(size, **kw), num_labels=classes))
    if kind == "deit_plain":
        return t.DeiTForImageClassification(t.DeiTConfig(**vit_args(size, **kw), num_labels=classes))
    if kind == "beit":
        return t.BeitForImageClassification(t.BeitConfig(**vit_args(size, **kw), num_labels=classes))
    if kind == "beit_token":
        config = t.BeitConfig(**vit_args(size, **kw), use_mean_pooling=False, num_labels=classes)
        return t.BeitForImageClassification(config)
    if kind == "dinov2":
        return t.Dinov2ForImageClassification(t.Dinov2Config(**vit_args(size, **kw), num_labels=classes))
    if kind == "dinov2_reg":
        config = t.Dinov2WithRegistersConfig(**vit_args(size, **kw), num_register_tokens=2, num_labels=classes)
        return t.Dinov2WithRegistersForImageClassification(config)
    if kind == "swin":  # 16x16, 8x8, 4x4 tokens over three stages at 64 px
        swin = dict(image_size=size, embed_dim=8, depths=[1, 1, 1], num_heads=[1, 2, 2], window_size=4)
        return t.SwinForImageClassification(t.SwinConfig(**{**swin, **kw}, num_labels=classes))
    if kind == "convnext":
        config = t.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=classes, **kw)
        return t.ConvNextForImageClassification(config)
    if kind == "resnet":
        config = t.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=classes, **kw
        )
        return t.ResNetForImageClassification(config)
    if kind == "efficientnet":
        config = t.EfficientNetConfig(
            image_size=size, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128, num_labels=classes, **kw
        )
        model = t.EfficientNetForImageClassification(config)
        for m in model.modules():  # transformers starts its norms' scales near zero: the maps would be too
            if isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
        return model
    raise ValueError(kind)


#: (kind, CAM layer, its layout, heatmap side at 64 px)
FAMILIES = [
    ("vit", "vit.layers.1.layernorm_before", TokenMap("tokens", 1, (8, 8)), 8),
    ("deit", "deit.layers.1.layernorm_before", TokenMap("tokens", 2, (8, 8)), 8),
    ("deit_plain", "deit.layers.1.layernorm_before", TokenMap("tokens", 2, (8, 8)), 8),
    ("beit", "beit.layers.1", TokenMap("tokens", 1, (8, 8)), 8),  # mean-pooled head, identity final norm
    ("beit_token", "beit.layers.1.layernorm_before", TokenMap("tokens", 1, (8, 8)), 8),
    ("dinov2", "dinov2.encoder.layer.1.norm1", TokenMap("tokens", 1, (8, 8)), 8),  # class token + patch mean
    ("dinov2_reg", "dinov2_with_registers.encoder.layer.1.norm1", TokenMap("tokens", 3, (8, 8)), 8),
    ("swin", "swin.layernorm", TokenMap("tokens", 0, (16, 16), pad=True), 4),
    ("convnext", "convnext.encoder.stages.1", TokenMap("nchw"), 8),
    ("resnet", "resnet.encoder.stages.1", TokenMap("nchw"), 8),
    ("efficientnet", "efficientnet.encoder.top_activation", TokenMap("nchw"), 2),
]


@pytest.mark.parametrize("kind,layer,layout,side", FAMILIES)
def test_gradcam_with_no_arguments_explains_on_the_last_grid(kind, layer, layout, side):
    """The layer search runs at the model's own 64 px (its config's image_size), picks the
    written rule's layer, reads it with the layout of the model's config, and the heatmap has
    the last patch or feature grid."""
    model = tiny(kind).eval()
    with cgc.GradCAM(model) as cam:
        assert (cam.target_layer, cam.layout) == (layer, layout)
        out = cam(torch.randn(3, 3, SIZE, SIZE))
    assert out.cams.shape == (3, side, side) and out.cams.abs().sum() > 0
    assert out.logits.shape == (3, 3)


@pytest.mark.parametrize("kind", ["vit", "deit", "beit", "dinov2_reg", "swin", "convnext", "resnet"])
def test_cgc_term_gives_a_finite_loss_with_gradients_on_the_weights(kind):
    model = tiny(kind).train()
    with cgc.CGCTerm(model) as term:
        out = term(torch.randn(4, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    weights = [p for n, p in model.named_parameters() if p.dim() > 1 and "classifier" not in n]
    assert torch.isfinite(out.loss) and out.logits.shape == (4, 3)
    assert all(torch.isfinite(p.grad).all() for p in weights if p.grad is not None)
    assert sum(p.grad.abs().sum() for p in weights if p.grad is not None) > 0


def test_logits_of_every_kind_of_output():
    logits = torch.randn(2, 3)
    Pair = collections.namedtuple("Pair", "logits aux")
    output = transformers.modeling_outputs.ImageClassifierOutput(logits=logits)
    for out in (logits, output, {"logits": logits}, (logits, None), [logits], Pair(logits, None)):
        assert logits_of(out) is logits
    with pytest.raises(UnsupportedModel, match=r"BaseModelOutput with 'last_hidden_state', without logits"):
        logits_of(transformers.modeling_outputs.BaseModelOutput(last_hidden_state=logits))
    with pytest.raises(UnsupportedModel, match="a str, without logits"):
        logits_of("scores")


class NoLogits(nn.Module):
    """A classifier whose output names no logits."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return {"scores": self.features(x).mean((2, 3))}


def test_a_model_without_logits_is_a_typed_error():
    with cgc.GradCAM(NoLogits(), "features") as cam, pytest.raises(UnsupportedModel, match="'scores'"):
        cam(torch.randn(2, 3, 16, 16))


def test_the_layer_search_probes_at_the_declared_size():
    """A 64 px ViT declares its size in its config; a 224 px probe would fail in its embedding."""
    model = tiny("vit")
    assert declared_size(model) == (SIZE, SIZE) and find_target_layer(model) == "vit.layers.1.layernorm_before"
    assert declared_size(nn.Conv2d(3, 3, 1)) is None
    timm = pytest.importorskip("timm", reason="timm is optional")
    assert declared_size(timm.create_model("resnet18", pretrained_cfg_overlay=dict(input_size=(3, 96, 96)))) == (
        96,
        96,
    )


def test_named_layers_read_without_reshape():
    """A named ViT block reads with the inferred layout, and the same heatmap as the search's."""
    model = tiny("vit").eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with cgc.GradCAM(model) as found, cgc.GradCAM(model, "vit.layers.1.layernorm_before") as named:
        assert torch.equal(found(x).cams, named(x, found(x).targets).cams)


def test_layers_that_output_tuples_are_read_by_their_first_element():
    """Swin's stages return (tokens, spatial copy, attention) and its blocks (tokens, attention):
    each is read by its tokens at its own grid, and the stage's heatmap is that of the patch
    merging inside it, which outputs the same tokens as a tensor (so the layers after read the
    rebuilt tuple)."""
    model = tiny("swin").eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    targets = torch.tensor([0, 2])
    with (
        cgc.GradCAM(model, "swin.encoder.layers.0") as stage,
        cgc.GradCAM(model, "swin.encoder.layers.0.downsample") as merge,
    ):
        a, b = stage(x, targets, create_graph=True), merge(x, targets)
        assert stage.layout == TokenMap("tokens", 0, (8, 8), pad=True) and a.cams.shape == (2, 8, 8)
        assert torch.allclose(a.cams, b.cams, atol=1e-6) and a.cams.abs().sum() > 0
        a.cams.sum().backward()  # differentiable through the rebuilt tuple
    with cgc.GradCAM(model, "swin.encoder.layers.1.blocks.0") as block:
        assert block(x, targets).cams.shape == (2, 8, 8)


def test_the_stem_is_refused_and_so_is_a_layer_without_gradient():
    vit, swin = tiny("vit").eval(), tiny("swin").eval()
    for model, stem in ((vit, "vit.embeddings"), (swin, "swin.embeddings.patch_embeddings")):
        with pytest.raises(UnsupportedModel, match="patch embedding"):
            cgc.GradCAM(model, stem)
    with cgc.GradCAM(vit, "vit.layernorm") as cam, pytest.raises(UnsupportedModel, match="patch tokens"):
        cam(torch.randn(2, 3, SIZE, SIZE))
    with cgc.GradCAM(vit) as cam, pytest.raises(ConfigError, match="built for 64x64 px"):
        cam(torch.randn(2, 3, 32, 32))
    with cgc.GradCAM(Sidetrack(), "unread") as cam, pytest.raises(UnsupportedModel, match="no gradient reaches"):
        cam(torch.randn(2, 3, 16, 16))


class Sidetrack(nn.Module):
    """A classifier with a layer whose output nothing reads."""

    def __init__(self):
        super().__init__()
        self.features, self.unread, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1), nn.Linear(4, 3)

    def forward(self, x):
        maps = self.features(x)
        self.unread(maps)
        return self.head(maps.mean((2, 3)))


def test_randomization_cascade_runs_over_the_blocks():
    from cgc.metrics import randomization_steps

    steps = [name for name, _ in randomization_steps(tiny("dinov2"))]
    assert steps == ["classifier", "dinov2.layernorm", "dinov2.encoder.layer.1", "dinov2.encoder.layer.0"] + [
        "dinov2.embeddings"
    ]


def _peer_reshape(kind: str):
    """pytorch-grad-cam's reshape_transform for the layer of each family."""
    if kind == "convnext":
        return None
    prefix, side = {"vit": (1, 8), "deit": (2, 8), "swin": (0, 4)}[kind]
    return lambda t: t[:, prefix:].reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)


class LogitsOnly(nn.Module):
    """pytorch-grad-cam's usual wrapper: the Hugging Face model's ``.logits``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["vit", "deit", "swin", "convnext"])
def test_method_equals_pytorch_grad_cam(kind, method):
    """Same model, layer, input and targets; pytorch-grad-cam with its wrapper and the matching
    reshape_transform. Our heatmap scaled as it scales its own (min-max, resize, min-max) equals
    its output to 1e-5. In float64: XGrad-CAM divides by the sum of a LayerNorm's tokens over
    the map, which can nearly cancel, so float32 rounding of two summation orders differs by
    more than 1e-5 there (1.3e-5 on a DeiT)."""
    model, twin = tiny(kind, classes=5).double().eval(), tiny(kind, classes=5).double().eval()
    x = torch.randn(3, 3, SIZE, SIZE, dtype=torch.float64)
    targets = torch.tensor([0, 3, 4])
    with cgc.GradCAM(model, method=method) as cam:
        ours, layer = cam(x, targets).cams, cam.target_layer
    assert_equals_pytorch_grad_cam(ours, LogitsOnly(twin), f"model.{layer}", x, targets, method, _peer_reshape(kind))


def tiny32(kind: str, attention: str) -> nn.Module:
    """A float64 ViT or Swin at 32 px (8x8 patch tokens) with one of transformers' attention
    implementations."""
    if kind == "vit":
        model = tiny(kind, size=32, patch=4, attn_implementation=attention)
    else:
        model = tiny(kind, size=32, depths=[1, 1], num_heads=[1, 2], attn_implementation=attention)
    assert model.config._attn_implementation == attention
    return model.double()


def crops(seed: int) -> torch.Tensor:
    return cgc.transforms.random_crop_flip(3, 32, 32, scale=(0.5, 1.0), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_cgc_term_gradcheck_through_attention(kind, rng):
    """float64 gradcheck of the whole CGC term (fixed crops and targets) w.r.t. the input with
    transformers' sdpa attention: second order through the attention after the CAM layer, which
    runs PyTorch's math kernel there (the fused CPU kernel has no double backward)."""
    model = tiny32(kind, "sdpa").eval()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=rng).requires_grad_()
    theta, targets = crops(int(torch.randint(1 << 30, (1,), generator=rng))).theta().double(), torch.tensor([0, 1, 2])
    with cgc.GradCAM(model, method="hirescam") as cam:
        cam(x.detach())  # the first call's gradient check, outside gradcheck

        def term(inp):
            return cgc.cgc_term(cam, inp, theta=theta, targets=targets, temperature=0.5).loss

        assert torch.autograd.gradcheck(term, (x,), fast_mode=True)


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_eager_attention_gives_the_same_gradients_as_sdpa(kind, rng):
    """transformers' eager attention takes its softmax in float32 even in a float64 model, so a
    float64 gradcheck of it measures that rounding, not the derivative. Instead: the gradients of
    the whole term (input and every weight: second order through the attention after the CAM
    layer) equal those of the same model with sdpa, which the gradcheck above verifies, to that
    rounding (measured over seeds 0-3: relative differences of 2e-9 to 1e-7; a wrong second
    derivative differs by order 1)."""
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=rng)
    theta = crops(int(torch.randint(1 << 30, (1,), generator=rng))).theta().double()
    found = []
    for attention in ("sdpa", "eager"):
        model = tiny32(kind, attention).train()
        inp = x.clone().requires_grad_()
        with cgc.CGCTerm(model, method="hirescam") as term:
            loss = term(inp, theta=theta, targets=torch.tensor([0, 1, 2])).loss
        grads = torch.autograd.grad(loss, [inp, *model.parameters()], allow_unused=True)
        found.append(torch.cat([g.flatten() for g in grads if g is not None]))
    sdpa, eager = found
    assert sdpa.shape == eager.shape and sdpa.abs().max() > 0
    assert (eager - sdpa).norm() < 1e-5 * sdpa.norm() and (eager - sdpa).abs().max() < 1e-5 * sdpa.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the fused attention kernels there)")
def test_cgc_step_through_sdpa_attention_on_cuda_in_bfloat16():
    """On CUDA under bfloat16 autocast transformers' sdpa attention runs the fused kernels before
    the CAM layer and the math kernel after it: the term's second-order backward goes through
    and every gradient is finite."""
    model = tiny("vit").cuda().train()
    x = torch.randn(8, 3, SIZE, SIZE, device="cuda")
    with cgc.CGCTerm(model, temperature=0.5) as term, torch.autocast("cuda", dtype=torch.bfloat16):
        out = term(x, generator=torch.Generator(device="cuda").manual_seed(0))
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(out.loss) and grads and all(torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------- building
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """save_pretrained folders of each family, at the sizes of the hub's models (224 px, 16 px
    patches; Swin's 7x7 windows over four stages) with 5 classes."""
    root = tmp_path_factory.mktemp("hf")
    t = transformers
    torch.manual_seed(0)
    built = {
        "vit": t.ViTForImageClassification(t.ViTConfig(**vit_args(224, 16), num_labels=5)),
        "deit": t.DeiTForImageClassificationWithTeacher(t.DeiTConfig(**vit_args(224, 16), num_labels=5)),
        "beit": t.BeitForImageClassification(
            t.BeitConfig(**vit_args(224, 16), use_relative_position_bias=True, num_labels=5)
        ),
        "dinov2": t.Dinov2ForImageClassification(t.Dinov2Config(**vit_args(224, 14), num_labels=5)),
        "swin": t.SwinForImageClassification(
            t.SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], num_labels=5)
        ),
        "convnext": tiny("convnext", classes=5),
        "resnet": tiny("resnet", classes=5),
    }
    for name, model in built.items():
        model.save_pretrained(root / name)
    (root / "empty").mkdir()
    return root


@pytest.mark.parametrize("kind", ["vit", "deit", "beit", "dinov2", "swin"])
def test_pretrained_weights_are_resampled_to_the_image_size(folders, kind):
    """Built at 64 px from a 224 px folder: the patch rule (8 px patches), Swin's window shrunk
    to its 2x2 last stage; the folder's weights resampled (position embeddings, patch kernel,
    relative position tables), every other weight as it was, a new head for 3 classes."""
    source = transformers.AutoModelForImageClassification.from_pretrained(folders / kind)
    model = models.build_model(f"hf:{folders / kind}", 3, image_size=SIZE, pretrained=True)
    info = describe(model)
    assert model.config.image_size == SIZE and model.config.num_labels == 3
    assert info.tokens.stride == ((4, 4) if kind == "swin" else (8, 8))
    if kind == "swin":
        assert model.config.window_size == 2
    theirs, changed = source.state_dict(), []
    for key, value in model.state_dict().items():
        head = any(key.startswith(h + ".") for h in models.head_names(model))
        if head or theirs[key].shape != value.shape:
            changed.append(key)
        else:
            assert torch.equal(value, theirs[key]), key
    assert all("position" in k or "projection" in k or k.split(".")[0].endswith("classifier") for k in changed)
    with cgc.GradCAM(model.eval()) as cam:
        assert cam(torch.randn(2, 3, SIZE, SIZE)).cams.shape == ((2, 2, 2) if kind == "swin" else (2, 8, 8))


def test_without_pretrained_the_folder_gives_the_architecture_with_fresh_weights(folders):
    fresh = models.build_model(f"hf:{folders / 'vit'}", 5)
    source = transformers.AutoModelForImageClassification.from_pretrained(folders / "vit")
    assert fresh.config.image_size == 224 and not torch.equal(
        fresh.vit.layers[0].mlp.fc1.weight, source.vit.layers[0].mlp.fc1.weight
    )
    kept = models.build_model(f"hf:{folders / 'vit'}", 5, pretrained=True)
    assert torch.equal(kept.classifier.weight, source.classifier.weight)  # same class count: the head kept


def test_library_errors_are_typed(folders, monkeypatch):
    with pytest.raises(MissingFile, match="holds no Hugging Face model"):
        models.build_model(f"hf:{folders / 'empty'}", 3)
    with pytest.raises(ConfigError, match="cannot take 48 px images"):
        models.build_model(f"hf:{folders / 'swin'}", 3, image_size=48)

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to the hub")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(MissingFile, match=r"could not fetch hf:org/model.*save_pretrained\(DIR\)"):
        models.build_model("hf:org/model", 3)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingDependency, match="pip install transformers"):
        models.build_model(f"hf:{folders / 'vit'}", 3)
    with cgc.GradCAM(models.build_model("compact", 3)) as cam:  # everything else works without it
        assert cam(torch.randn(2, 3, 32, 32)).cams.shape == (2, 4, 4)


# ----------------------------------------------------------------------------- the docs
def doc_block(page: str, needle: str) -> str:
    text = (Path(__file__).resolve().parents[1] / "docs" / page).read_text()
    return next(b for b in re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M) if needle in b)


def test_the_transformers_page_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny("vit", size=224, patch=16).save_pretrained("path/to/folder")
    scope: dict = {}
    exec(compile(doc_block("transformers.md", "from transformers"), "transformers.md", "exec"), scope)  # noqa: S102
    scope["term"].close()
    assert scope["heat"].shape == (2, 14, 14)


def test_a_runs_hf_model_loads_as_training_md_shows(tmp_path, monkeypatch):
    """The run's hf_model folder and model.safetensors, written as a run writes them (channels-last
    weights, as on CPUs), load into transformers as docs/training.md shows."""
    monkeypatch.chdir(tmp_path)
    model = cgc.structure.to_channels_last(tiny("swin"))
    cgc.files.save_weights(model, "runs/cgc/model.safetensors")
    models.from_huggingface.save_folder(model, "runs/cgc/hf_model", ["a", "b", "c"])
    scope: dict = {}
    exec(compile(doc_block("training.md", "hf_model"), "training.md", "exec"), scope)  # noqa: S102
    for loaded in (scope["model"], scope["same"]):
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert scope["model"].config.id2label == {0: "a", 1: "b", 2: "c"}


# ----------------------------------------------------------------------------- command lines
TOY = ["--train-size", "48", "--val-size", "16", "--batch-size", "8", "--image-size", "64", "--epochs", "1"]
TOY += ["--num-classes", "3", "--overlays", "2"]


def one_line_error(call, argv) -> str:
    with pytest.raises(SystemExit) as info:
        call(argv)
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def _train_and_use(folders, kind, tmp_path):
    """``cgc.train --arch hf:DIR``, then evaluate and explain on the run; the save_pretrained
    folder and model.safetensors load back into transformers and into --weights."""
    out, source = tmp_path / "run", tmp_path / "source"
    shutil.copytree(folders / kind, source)
    train.main([*TOY, "--arch", f"hf:{source}", "--pretrained", "--out", str(out)])
    shutil.rmtree(source)  # the run's checkpoints rebuild the model without it
    auto = transformers.AutoModelForImageClassification
    saved = auto.from_pretrained(out / models.from_huggingface.FOLDER).eval()
    assert saved.config.id2label == {0: "circle", 1: "square", 2: "triangle"}
    assert getattr(saved.config, "image_size", SIZE) == SIZE  # a ResNet declares none
    loaded = checkpoint.load_model(checkpoint_path=out).model.eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(saved(x).logits, loaded(x).logits, atol=1e-5)
    plain = auto.from_config(saved.config)
    plain.load_state_dict(cgc.models.load_state_dict_file(out / "model.safetensors"))  # strict
    for weights in (out / "model.safetensors", out / models.from_huggingface.FOLDER):
        again = models.build_model(f"hf:{folders / kind}", 3, image_size=SIZE, weights=weights)
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), loaded.state_dict().values()))
    report = evaluate.main(["--checkpoint", str(out), "--skip-slow", "--limit", "8", "--out", str(tmp_path / "e")])
    assert report["run"]["top1"] is not None
    Image.new("RGB", (70, 50), (120, 20, 200)).save(tmp_path / "img.png")
    written = explain.main([str(tmp_path / "img.png"), "--checkpoint", str(out), "--out", str(tmp_path / "x")])
    assert [p.name for p in written] == ["img_gradcam.png"]


def test_train_evaluate_and_explain_a_vit_folder(folders, tmp_path):
    _train_and_use(folders, "vit", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["deit", "swin", "convnext", "resnet"])
def test_train_evaluate_and_explain_each_family(folders, kind, tmp_path):
    _train_and_use(folders, kind, tmp_path)


def test_arch_models_in_evaluate_and_explain(folders, tmp_path):
    """``--arch hf:DIR`` in evaluate (with --weights: a save_pretrained folder) and explain
    (--pretrained: the folder's weights; its class names)."""
    Image.new("RGB", (70, 50), (20, 120, 200)).save(tmp_path / "img.png")
    args = ["--arch", f"hf:{folders / 'convnext'}"]
    explain.main([str(tmp_path / "img.png"), *args, "--pretrained", "--image-size", "64", "--out", str(tmp_path)])
    data = ["--dataset", "synthetic", "--num-classes", "5", "--train-size", "8", "--val-size", "8"]
    report = evaluate.main(
        [*args, "--weights", str(folders / "convnext"), *data, "--image-size", "64"]
        + [
            "--skip-slow",
            "--out",
            str(tmp_path / "e"),
        ]
    )
    assert report["convnext"]["top1"] is not None


def test_bad_inputs_are_one_error_line(folders, tmp_path, monkeypatch):
    """A folder that holds no model, a model whose output has no logits, an image size the model
    cannot take, and transformers absent: one error line from each command line."""
    Image.new("RGB", (40, 40), (120, 20, 200)).save(tmp_path / "img.png")
    img, out = str(tmp_path / "img.png"), ["--out", str(tmp_path / "o")]
    data = ["--dataset", "synthetic", "--num-classes", "5", "--train-size", "8", "--val-size", "8"]  # the folders'

    def commands(folder, size=()):
        arch = ["--arch", f"hf:{folder}"]
        return [
            (train.main, [*TOY, *arch, *size, *out]),
            (evaluate.main, [*arch, "--weights", str(folder), *data, *size, "--skip-slow", *out]),
            (explain.main, [img, *arch, "--pretrained", *size, *out]),
        ]

    for call, argv in commands(folders / "empty"):
        assert "holds no Hugging Face model (no config.json in it)" in one_line_error(call, argv)
    for call, argv in commands(folders / "swin", ("--image-size", "48")):
        assert "cannot take 48 px images" in one_line_error(call, argv)
    features = transformers.modeling_outputs.BaseModelOutput
    monkeypatch.setattr(  # a classifier that returns its features, not logits
        transformers.ConvNextForImageClassification,
        "forward",
        lambda self, x, **kw: features(last_hidden_state=self.convnext(x).pooler_output),
    )
    for call, argv in commands(folders / "convnext", ("--image-size", "64")):
        assert "without logits" in one_line_error(call, argv)
    monkeypatch.setitem(sys.modules, "transformers", None)
    for call, argv in commands(folders / "vit"):
        assert "pip install transformers" in one_line_error(call, argv)
