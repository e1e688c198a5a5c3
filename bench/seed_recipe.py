"""The seed notebook's training recipe, kept as the baseline that bench/train_vs_seed.py
measures against: PyTorch's tutorial network fed by torchvision's CIFAR10 dataset with
per-sample PIL transforms (ToTensor, Normalize), batch 4, 2 loader workers, 2 epochs of SGD
(lr 0.001, momentum 0.9), then test accuracy.

Usage: python bench/seed_recipe.py DATA_ROOT OUTPUT_JSON
(DATA_ROOT holds cifar-10-batches-py/.)
"""

from __future__ import annotations

import json
import sys
import time

started = time.perf_counter()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.optim as optim  # noqa: E402
import torchvision  # noqa: E402
import torchvision.transforms as transforms  # noqa: E402


class MirrorCIFAR10(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR10, minus its check of the official files' md5s (the benchmark mirror
    is a rebuilt copy). Loading and transforms are torchvision's own."""

    def _check_integrity(self) -> bool:
        return True


# The notebook's own network, copied as written rather than imported from model_src: the
# baseline must not move when our TutorialNet's implementation does (same layers, same maths).
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def main(data_root: str, output: str) -> None:
    recipe_started = time.perf_counter()  # after the imports, as the entry script's clock
    torch.manual_seed(0)
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
    )
    trainset = MirrorCIFAR10(root=data_root, train=True, download=False, transform=transform)
    trainloader = torch.utils.data.DataLoader(trainset, batch_size=4, shuffle=True, num_workers=2)
    testset = MirrorCIFAR10(root=data_root, train=False, download=False, transform=transform)
    testloader = torch.utils.data.DataLoader(testset, batch_size=4, shuffle=False, num_workers=2)

    net = Net()
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    for epoch in range(2):
        running_loss = 0.0
        for i, (inputs, labels) in enumerate(trainloader):
            optimizer.zero_grad()
            loss = criterion(net(inputs), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            if i % 2000 == 1999:
                print(f"[{epoch + 1}, {i + 1:5d}] loss: {running_loss / 2000:.3f}", flush=True)
                running_loss = 0.0

    correct = total = 0
    with torch.no_grad():
        for images, labels in testloader:
            predicted = net(images).argmax(1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    now = time.perf_counter()
    result = {"test_accuracy": correct / total, "wall_seconds": now - started,
              "recipe_seconds": now - recipe_started}
    with open(output, "w") as f:
        json.dump(result, f)
    print(result, flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)
    main(sys.argv[1], sys.argv[2])
