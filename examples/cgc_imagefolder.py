"""Add CGC to a plain PyTorch training loop over a torchvision ImageFolder.

    python examples/cgc_imagefolder.py /path/to/images --epochs 5

``ROOT`` is a class-per-folder tree (``ROOT/<class>/<image>``). The loop is the one every
PyTorch tutorial writes; CGC adds three lines, marked below: build the term, call it on the
batch (it makes the crop/flip view and runs the model once on both views), add its loss.
"""

import argparse

import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms as T

import cgc


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", help="ImageFolder root: ROOT/<class>/<image>")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--lam", type=float, default=0.5, help="weight of the CGC term")
    p.add_argument("--out", default="cgc_resnet18.pt", help="where to save the trained weights")
    args = p.parse_args(argv)

    size = args.image_size
    tf = T.Compose(
        [T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    )
    dataset = torchvision.datasets.ImageFolder(args.root, transform=tf)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = torchvision.models.resnet18(num_classes=len(dataset.classes)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)

    term = cgc.CGCTerm(model, temperature=0.5)  # CGC 1/3: the term
    for epoch in range(args.epochs):
        model.train()
        total = n = 0
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            out = term(images)  # CGC 2/3: both views
            loss = F.cross_entropy(out.logits, labels) + args.lam * out.loss  # CGC 3/3: add it
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + float(loss), n + 1
        print(f"epoch {epoch + 1}: loss {total / max(n, 1):.4f}")
    term.close()
    torch.save(model.state_dict(), args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
