"""Model factory: heads sized for the dataset, local weights, clear errors."""

from __future__ import annotations

import pytest
import torch
import torchvision

from cgc import checkpoint, models


@pytest.mark.parametrize(
    "arch,head",
    [("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3"), ("squeezenet1_0", "classifier.1"), ("compact", "fc")],
)
def test_head_has_dataset_classes(arch, head):
    model = models.build_model(arch, 7)
    name, _module = models.classifier_head(model)
    assert name == head
    out = model.eval()(torch.randn(1, 3, 64, 64) if arch != "squeezenet1_0" else torch.randn(1, 3, 96, 96))
    assert out.shape == (1, 7)


def test_local_weights_with_imagenet_head_then_new_head(tmp_path):
    src = torchvision.models.resnet18()
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    model = models.build_model("resnet18", 5, weights=tmp_path / "r18.pth")
    assert torch.equal(model.conv1.weight, src.conv1.weight)
    assert model.fc.out_features == 5


def test_local_weights_with_dataset_head_are_kept(tmp_path):
    src = models.build_model("resnet18", 5)
    torch.save({"model": src.state_dict()}, tmp_path / "ckpt.pt")  # a cgc checkpoint's layout
    model = models.build_model("resnet18", 5, weights=tmp_path / "ckpt.pt")
    assert torch.equal(model.fc.weight, src.fc.weight)


def test_weight_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        models.build_model("compact", 3, weights=tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights"):
        models.build_model("compact", 3, weights=tmp_path / "junk.pt")
    torch.save(models.build_model("compact", 3).state_dict(), tmp_path / "compact.pt")
    with pytest.raises(ValueError, match="do not fit"):
        models.build_model("resnet18", 3, weights=tmp_path / "compact.pt")
    with pytest.raises(ValueError, match="unknown architecture"):
        models.build_model("resnet19", 3)
    with pytest.raises(ValueError, match="either"):
        models.build_model("resnet18", 3, pretrained=True, weights=tmp_path / "compact.pt")


def test_pretrained_without_internet_is_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(FileNotFoundError, match="--weights PATH"):
        models.build_model("resnet18", 3, pretrained=True)


def test_unknown_names_suggest_close_ones():
    with pytest.raises(ValueError, match="did you mean 'resnet18'"):
        models.build_model("resnet19", 3)
    with pytest.raises(ValueError, match="norm"):
        models.build_model("resnet18", 3, norm="group")


def test_group_norm_compact_model_has_no_batch_statistics():
    model = models.build_model("compact", 4, norm="group")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) == 4
    assert len(list(model.buffers())) == 0
    x = torch.randn(6, 3, 32, 32)
    model.train()
    assert torch.allclose(model(x)[:3], model(x[:3]), atol=1e-6)  # a row does not depend on the others


def test_weights_that_run_code_are_refused_in_one_line(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this would have run",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError) as info:
        models.build_model("compact", 3, weights=tmp_path / "evil.pt")
    message = str(info.value)
    assert "\n" not in message and "Python objects" in message and "state_dict" in message


TIMM_FAMILIES = [
    ("resnet18", "layer4", "fc"),
    ("efficientnet_b0", "bn2", "classifier"),
    ("convnext_atto", "stages", "head.fc"),
    ("regnetx_002", "s4", "head.fc"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,layer,head", TIMM_FAMILIES)
def test_timm_models_get_the_dataset_head_and_their_cam_layer(name, layer, head, tmp_path):
    pytest.importorskip("timm", reason="timm is an optional dependency (pip install timm)")
    from cgc import find_target_layer

    model = models.build_model(f"timm:{name}", 6)
    assert find_target_layer(model, 64) == layer
    assert models.classifier_head(model)[0] == head
    assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 6)
    # --weights: a local timm state dict with its ImageNet head, then the dataset's head
    import timm

    src = timm.create_model(name)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    loaded = models.build_model(f"timm:{name}", 6, weights=tmp_path / "w.pth")
    first = next(iter(src.state_dict()))
    assert torch.equal(loaded.state_dict()[first], src.state_dict()[first])


def test_timm_safetensors_weights_and_errors(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm", reason="timm is an optional dependency (pip install timm)")
    from safetensors.torch import save_file

    src = timm.create_model("resnet18", num_classes=4)
    save_file(src.state_dict(), str(tmp_path / "r18.safetensors"))
    model = models.build_model("timm:resnet18", 4, weights=tmp_path / "r18.safetensors")
    assert torch.equal(model.fc.weight, src.fc.weight)
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="safetensors"):
        models.build_model("timm:resnet18", 4, weights=tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="did you mean 'resnet18'"):
        models.build_model("timm:resnet188", 4)
    monkeypatch.setitem(__import__("sys").modules, "timm", None)  # as if timm were not installed
    with pytest.raises(ImportError, match="pip install timm"):
        models.build_model("timm:resnet18", 4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_a_timm_model_trains_one_cgc_epoch(tmp_path, name):
    pytest.importorskip("timm", reason="timm is an optional dependency (pip install timm)")
    from cgc import train

    results = train.main(
        [
            "--arch",
            f"timm:{name}",
            "--train-size",
            "32",
            "--val-size",
            "16",
            "--batch-size",
            "8",
            "--image-size",
            "32",
            "--num-classes",
            "3",
            "--epochs",
            "1",
            "--overlays",
            "2",
            "--term-gate",
            "0",  # the term from the first step
            "--out",
            str(tmp_path),
        ]
    )
    log = (tmp_path / "log.jsonl").read_text()
    assert '"train_cgc"' in log and results["arch"] == f"timm:{name}"
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["target_layer"] == {"resnet18": "layer4", "efficientnet_b0": "bn2"}[name]


def test_cnns_ignore_the_image_size():
    a, b = models.build_model("resnet18", 4), models.build_model("resnet18", 4, image_size=64)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_patch_size_rule():
    """The architecture's patch while it divides the image into at least 7 per side, else the
    largest smaller patch that does; none of 2 px or more: a ConfigError with a size that works."""
    assert models.patch_size_for("vit", 224, 16) == 16
    assert models.patch_size_for("vit", 64, 16) == 8
    assert models.patch_size_for("vit", 64, 14) == 8
    assert models.patch_size_for("vit", 96, 16) == 12
    assert models.patch_size_for("vit", 112, 16) == 16
    with pytest.raises(models.ConfigError, match=r"cannot take 67 px images.*multiples of 8 px from 56 px do"):
        models.patch_size_for("vit", 67, 16)


@pytest.mark.parametrize(
    "arch,layer,grid",
    [
        ("timm:vit_tiny_patch16_224", "blocks.11.norm1", 8),
        ("timm:deit_tiny_distilled_patch16_224", "blocks.11.norm1", 8),
        ("timm:eva02_tiny_patch14_224", "blocks.11", 8),  # its default weights are headless: a head is added
        ("timm:swin_tiny_patch4_window7_224", "norm", 2),
        ("swin_t", "norm", 2),
    ],
)
def test_transformers_are_built_for_the_image_size(arch, layer, grid):
    pytest.importorskip("timm", reason="timm is an optional dependency (pip install timm)")
    from cgc import GradCAM

    model = models.build_model(arch, 6, image_size=64).eval()
    if "distilled" in arch:
        assert models.head_names(model) == ["head", "head_dist"] and model.head_dist.out_features == 6
    with GradCAM(model) as cam:
        assert cam.target_layer == layer
        out = cam(torch.randn(2, 3, 64, 64))
    assert out.logits.shape == (2, 6) and out.cams.shape == (2, grid, grid)
    if arch.startswith("timm:") and "swin" not in arch:
        assert model.patch_embed.patch_size == (8, 8) and model.dynamic_img_size


@pytest.mark.slow
def test_torchvision_vit_is_built_for_the_image_size():
    """vit_b_16 at 64 px: 8 px patches (an 8x8 grid), the rest of its architecture unchanged."""
    model = models.build_model("vit_b_16", 3, image_size=64)
    ref = torchvision.models.vit_b_16()
    assert (model.image_size, model.patch_size, model.hidden_dim, model.mlp_dim) == (64, 8, 768, 3072)
    assert len(model.encoder.layers) == len(ref.encoder.layers)
    assert model.encoder.pos_embedding.shape == (1, 65, 768)
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 3)


@pytest.mark.parametrize(
    "arch,size,message",
    [
        ("timm:vit_tiny_patch16_224", 67, "no patch of 2 to 16 px"),
        ("vit_b_16", 10, "no patch of 2 to 16 px"),
        ("timm:swin_tiny_patch4_window7_224", 48, "multiple of 32 px"),
        ("swin_t", 32, "at least 64 px"),
    ],
)
def test_image_sizes_a_transformer_cannot_take(arch, size, message):
    pytest.importorskip("timm", reason="timm is an optional dependency (pip install timm)")
    with pytest.raises(models.ConfigError, match=message):
        models.build_model(arch, 3, image_size=size)


def test_timm_vit_weights_of_another_size_are_resampled_as_timm_does(tmp_path):
    """ImageNet-shaped weights of a ViT built at 224 px (16 px patches) load into the 64 px build
    (8 px patches): position embeddings and patch kernel resampled by timm's own filter, so the
    outputs equal timm's resampled load of the same file."""
    timm = pytest.importorskip("timm", reason="timm is an optional dependency (pip install timm)")
    name = "vit_tiny_patch16_224"
    src = timm.create_model(name)
    torch.save(src.state_dict(), tmp_path / "vit.pth")
    ours = models.build_model(f"timm:{name}", 1000, image_size=64, weights=tmp_path / "vit.pth").eval()
    theirs = timm.create_model(
        name,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "vit.pth")),
        img_size=64,
        patch_size=8,
        dynamic_img_size=True,
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    assert ours.pos_embed.shape == (1, 65, 192) and ours.patch_embed.proj.weight.shape[-2:] == (8, 8)
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)
    head = models.build_model(f"timm:{name}", 5, image_size=64, weights=tmp_path / "vit.pth")
    assert head.head.out_features == 5 and torch.equal(head.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_timm_swin_weights_of_another_size_are_resampled_as_timm_does(tmp_path):
    timm = pytest.importorskip("timm", reason="timm is an optional dependency (pip install timm)")
    name, small = "swin_tiny_patch4_window7_224", dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 2, 2))
    torch.save(timm.create_model(name, **small).state_dict(), tmp_path / "swin.pth")
    args = models.from_timm.size_args(name, 64)
    ours = timm.create_model(name, **args, **small)
    ours.load_state_dict(models.fit_state(ours, torch.load(tmp_path / "swin.pth", weights_only=True)))
    theirs = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "swin.pth")), **args, **small
    )
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(ours.eval()(x), theirs.eval()(x), atol=1e-5)


def test_torchvision_vit_weights_of_another_size_are_resampled():
    """Position embeddings by torchvision's interpolate_embeddings, the patch kernel by the
    pseudo-inverse resize, which equals timm's resample_patch_embed."""
    timm = pytest.importorskip("timm", reason="timm's resample_patch_embed is the oracle")
    from torchvision.models.vision_transformer import interpolate_embeddings

    def vit(size, patch):
        return torchvision.models.VisionTransformer(size, patch, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16)

    src, dst = vit(64, 16), vit(32, 4)
    state = models.fit_state(dst, src.state_dict())
    dst.load_state_dict(state)
    expected = interpolate_embeddings(32, 4, dict(src.state_dict()))["encoder.pos_embedding"]
    assert torch.equal(dst.encoder.pos_embedding, expected)
    kernel = src.conv_proj.weight.detach()
    for size in [(4, 4), (8, 8), (24, 24)]:
        theirs = timm.layers.resample_patch_embed(kernel, list(size))
        assert torch.allclose(models.resample_patch_kernel(kernel, size), theirs, atol=1e-5)
    assert torch.equal(models.fit_state(src, src.state_dict())["conv_proj.weight"], src.conv_proj.weight)


def test_load_model_rebuilds_a_transformer_checkpoint_at_its_image_size(monkeypatch, tmp_path):
    pytest.importorskip("timm", reason="timm is an optional dependency (pip install timm)")
    trained = models.build_model("timm:vit_tiny_patch16_224", 3, image_size=64)
    ckpt = {
        "config": {"model": {"arch": "timm:vit_tiny_patch16_224"}},
        "classes": ["a", "b", "c"],
        "image_size": 64,
        "model": trained.state_dict(),
        "target_layer": "blocks.11.norm1",
        "cam": "gradcam",
    }
    monkeypatch.setattr(checkpoint, "load", lambda path: ckpt)
    loaded = checkpoint.load_model(checkpoint_path=tmp_path / "last.pt")
    assert loaded.image_size == 64 and loaded.model.patch_embed.patch_size == (8, 8)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded.model.eval()(x), trained.eval()(x))
