"""The PyTorch peer of ``throughput.py``: torchvision's ResNet50 with a new fc layer, trained with
SGD the way PyTorch's transfer-learning tutorial does, on the same images held in memory.

    python benchmarks/torch_peer.py IMAGES.npz --batch-size 16 --head-epochs 10 --finetune-epochs 3

``IMAGES.npz`` holds ``images`` (float32 0-255, [n, height, width, 3]) and ``labels`` (int). It
times two stages, like the in-memory ceiling of ``throughput.py``: the head alone on a frozen
backbone (``requires_grad`` off everywhere but fc, as the tutorial's "ConvNet as fixed feature
extractor"), then every layer. It prints one JSON line: steady images/s of each stage (epochs
after the first), and torch's version and thread count. Run by ``throughput.py --peer torch``,
in a separate process so the two frameworks never share threads or memory.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torchvision


def steady_rate(seconds: list[float], images: int) -> float:
    steady = seconds[1:] if len(seconds) > 1 else seconds
    return images * len(steady) / sum(steady)


def stage(images: torch.Tensor, labels: torch.Tensor, num_classes: int, batch_size: int, epochs: int,
          frozen: bool) -> float:
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)  # same architecture; weights do not change speed
    model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
    if frozen:
        for parameter in model.parameters():
            parameter.requires_grad = False
        for parameter in model.fc.parameters():
            parameter.requires_grad = True
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1e-3 if frozen else 1e-4, momentum=0.9)
    loss_function = torch.nn.CrossEntropyLoss()
    model.train()
    generator = torch.Generator().manual_seed(0)
    seconds = []
    for _ in range(epochs):
        started = time.perf_counter()
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            batch = order[start:start + batch_size]
            optimizer.zero_grad()
            loss = loss_function(model(images[batch]), labels[batch])
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - started)
    return steady_rate(seconds, len(images))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--head-epochs", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    args = parser.parse_args()
    with np.load(args.images) as saved:
        # NCHW, scaled as torchvision's ImageNet preprocessing does (the cost is the same either way).
        mean = np.array([0.485, 0.456, 0.406], np.float32) * 255
        std = np.array([0.229, 0.224, 0.225], np.float32) * 255
        images = torch.from_numpy(((saved["images"] - mean) / std).transpose(0, 3, 1, 2).copy())
        labels = torch.from_numpy(saved["labels"].astype(np.int64))
    num_classes = int(labels.max()) + 1
    head = stage(images, labels, num_classes, args.batch_size, args.head_epochs, frozen=True)
    finetune = stage(images, labels, num_classes, args.batch_size, args.finetune_epochs, frozen=False)
    print(json.dumps({"head": head, "finetune": finetune, "torch": torch.__version__,
                      "torchvision": torchvision.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
