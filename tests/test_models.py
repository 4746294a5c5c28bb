"""Model factory: heads sized for the dataset, local weights, clear errors."""
from __future__ import annotations

import pytest
import torch
import torchvision

from cgc import models


@pytest.mark.parametrize("arch,head", [("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3"),
                                        ("squeezenet1_0", "classifier.1"), ("compact", "fc")])
def test_head_has_dataset_classes(arch, head):
    model = models.build_model(arch, 7)
    name, module = models.classifier_head(model)
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
    with pytest.raises(RuntimeError, match="--weights PATH"):
        models.build_model("resnet18", 3, pretrained=True)
