"""Train a classifier with CGC in PyTorch Lightning, on the built-in dataset.

    python examples/lightning_classifier.py --epochs 5

``CGCClassifier`` is a LightningModule: cross-entropy plus the CGC term, its safeguards on by
default (the gate waits for training top-1 0.5), both logged. ``--devices 2`` trains with DDP on
two processes (CPU or GPU). Needs ``pip install "cgc[lightning]"``.
"""

import argparse

import lightning as L
import torch

from cgc import CAM, data, metrics
from cgc.integrations.lightning import CGCClassifier
from cgc.models import CompactCNN


class Normalized(torch.utils.data.Dataset):
    def __init__(self, split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        image, label = self.split[i]
        return data.normalize(image[None])[0], label


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lambda", dest="lam", type=float, default=1.0, help="weight of the CGC term (0: CE only)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    L.seed_everything(a.seed, verbose=False)
    bundle = data.build("synthetic", seed=a.seed, image_size=64, train_size=3000, val_size=500, num_classes=6)
    net = CompactCNN(len(bundle.classes))
    module = CGCClassifier(net, lr=a.lr, lam=a.lam)
    loader = torch.utils.data.DataLoader(Normalized(bundle.train), batch_size=32, shuffle=True, drop_last=True)
    val = torch.utils.data.DataLoader(Normalized(bundle.val), batch_size=100)
    trainer = L.Trainer(
        max_epochs=a.epochs, accelerator="auto", devices=a.devices, logger=False, enable_checkpointing=False
    )
    trainer.fit(module, loader, val)
    if trainer.global_rank == 0:
        with CAM(net.eval()) as cam:
            chosen = metrics.select(["top1", "consistency", "consistency_iou", "content_heatmap"])
            found = metrics.explanation_metrics(cam, bundle.val, module.device, metrics=chosen)
        ran = module.cgc.outcome(trainer.global_step) if module.cgc else None
        print({k: round(v, 4) for k, v in found.items()}, "term:", ran.summary() if ran else "none (lambda 0)")


if __name__ == "__main__":
    main()
