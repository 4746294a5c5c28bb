"""Model factory: heads sized for the dataset, local weights, clear errors."""

from __future__ import annotations

import pytest
import torch
import torchvision

from cgc import models


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
            "--out",
            str(tmp_path),
        ]
    )
    log = (tmp_path / "log.jsonl").read_text()
    assert '"train_cgc"' in log and results["arch"] == f"timm:{name}"
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["target_layer"] == {"resnet18": "layer4", "efficientnet_b0": "bn2"}[name]
