"""Classification Accuracy Score (Ravuri & Vinyals 2019): train on generated images, test on real ones.

A classifier trained only on G's samples (with the labels G was conditioned on) is tested on held-out real
images. Reported next to the accuracy of the same kind of classifier trained on real data: the gap says how
much class information G's samples lack.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.metrics.classifier import MAX_INPUT_SIZE, accuracy, train_classifier
from pipeline.metrics.collective import LOCAL, Collective
from pipeline.metrics.evaluate import generate


def classification_accuracy_score(
    G: nn.Module,
    *,
    num_classes: int,
    dim_z: int,
    test_images: Tensor,  # real held-out images (N, C, R, R) in [-1, 1]
    test_labels: Tensor,
    num_samples: int,  # generated training images, class-balanced
    batch_size: int = 256,
    truncation: float = 0.0,
    device: str | torch.device = "cpu",
    seed: int = 0,
    real_classifier: nn.Module | None = None,  # trained on real training images (train_classifier)
    train_kwargs: dict[str, Any] | None = None,  # passed to train_classifier (epochs, lr, ...)
    group: Collective = LOCAL,  # ranks that share the sampling; every one of them calls this
) -> dict[str, float]:
    """{'cas': accuracy on test_images of a classifier trained on G's samples, 'real_accuracy': ...}.

    'real_accuracy' (the real-data classifier's accuracy on the same test images) is present when
    real_classifier is given. With a group, each rank draws its share of the batches (sample i is the same
    whoever draws it); rank 0 trains the classifier on all of them and every rank gets its numbers.
    """
    # whole batches per rank: each sample comes out of the same batch as in one process, so the classifier (which
    # would amplify a last-bit difference) trains on exactly the same images
    first, last = group.share(-(-num_samples // batch_size))
    lo, hi = first * batch_size, min(last * batch_size, num_samples)
    images, labels = [], []
    batches = generate(G, num_classes=num_classes, dim_z=dim_z, num_samples=num_samples, batch_size=batch_size,
                       truncation=truncation, device=device, seed=seed, start=lo, stop=hi)
    with contextlib.closing(batches):
        for x, y in batches:
            if x.shape[-1] > MAX_INPUT_SIZE:  # the classifier sees at most 64 px; keep memory small
                x = F.interpolate(x, size=(MAX_INPUT_SIZE, MAX_INPUT_SIZE), mode="area")
            images.append(x.cpu())
            labels.append(y)
    fake_images, fake_labels = torch.cat(images), torch.cat(labels)
    if group.distributed:
        shape = fake_images.shape[1:]
        rows = group.gather_rows(fake_images.flatten(1).numpy())
        fake_images = torch.from_numpy(rows).reshape(-1, *shape)
        fake_labels = torch.from_numpy(group.gather_rows(fake_labels.long().numpy()[:, None])[:, 0])

    def train_and_test() -> dict[str, float]:
        clf = train_classifier(fake_images, fake_labels, num_classes, seed=seed, device=device, **(train_kwargs or {}))
        out = {"cas": accuracy(clf, test_images, test_labels)}
        if real_classifier is not None:
            out["real_accuracy"] = accuracy(real_classifier, test_images, test_labels)
        return out

    return group.on_rank0(train_and_test)  # one classifier, not one per rank: rank 0 trains it on the node's cores
