"""How CAS and the real-data accuracy move with the classifier's training, for one trained G.

    python bench/cas_classifier.py runs/<run>/checkpoints/step-00000450/g_ema.pt --data data/demo-shards \
        --variant epochs=5 --variant epochs=5,src=real --variant epochs=15 --variant epochs=5,max_shift=0

A checkpoint's EMA G draws --samples class-balanced images from the evaluation copy that
`pipeline.evaluation.cas` uses (4 standing-statistics passes, bf16 sampling where the CPU has bf16 units). The
real images are the shards' first --samples (the dataset classifier's) and, held out, the --test images after
them, as in the demo. Each --variant trains `train_classifier` on the samples (src=fake, the default) or on
the real images (src=real), optionally with every other image mirrored (flip=1), with any other keyword of
`train_classifier` (epochs, max_shift, lr, width, ...). It prints one JSON line per variant: the held-out
accuracy, the seconds it took and, for samples, the gap in points to the first src=real variant before it.

--per-class adds, per class name, the held-out accuracy (`per_class`) and the two classes its held-out images are
most often mistaken for (`confused_with`); and, on the first src=real variant, `fidelity`: that classifier's
accuracy on the samples of each class (low where G draws one class looking like another). Read together they
tell a class G draws wrongly (low fidelity) from one it draws too narrowly (high fidelity, low CAS).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.evaluation import evaluation_copy, real_images  # noqa: E402
from pipeline.metrics.classifier import predict_logits, train_classifier  # noqa: E402
from pipeline.metrics.evaluate import generate  # noqa: E402
from pipeline.performance import fast_bf16  # noqa: E402
from pipeline.sample import load_generator  # noqa: E402


def parse_variant(text: str) -> dict:
    """'epochs=15,src=real' -> {'epochs': 15, 'src': 'real'}; numbers become numbers."""
    out: dict = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"variant item {item!r} is not key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    if out.get("src", "fake") not in ("fake", "real"):
        raise argparse.ArgumentTypeError(f"src must be fake or real, got {out['src']!r}")
    return out


def class_accuracies(predicted: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict[str, float]:
    """{class name: share of that class's images predicted as it}, for the classes present."""
    return {name: round((predicted[labels == k] == k).float().mean().item(), 4)
            for k, name in enumerate(names) if (labels == k).any()}


def per_class_rows(predicted: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict:
    """{'per_class': accuracies, 'confused_with': {name: [the two most frequent wrong predictions]}}."""
    confused = {}
    for k, name in enumerate(names):
        counts = torch.bincount(predicted[labels == k], minlength=len(names))
        counts[k] = 0
        confused[name] = [names[j] for j in counts.argsort(descending=True)[:2].tolist() if counts[j] > 0]
    return {"per_class": class_accuracies(predicted, labels, names), "confused_with": confused}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a g_ema.pt (or a checkpoint folder) that pipeline.sample reads")
    ap.add_argument("--data", default="data/demo-shards", help="the shards G trained on")
    ap.add_argument("--samples", type=int, default=5000, help="generated and real training images (default 5000)")
    ap.add_argument("--test", type=int, default=2000, help="held-out real images (default 2000)")
    ap.add_argument("--variant", type=parse_variant, action="append", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--per-class", action="store_true", help="accuracy, confusions and fidelity per class")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    bf16 = fast_bf16(torch.device("cpu"))
    G, cfg, names = load_generator(args.checkpoint)
    num_classes = len(names)
    G_eval = evaluation_copy(G, passes=4, batch_size=250, bf16=bf16)
    fake = [(x.cpu(), y) for x, y in generate(G_eval, num_classes=num_classes, dim_z=G.dim_z,
                                               num_samples=args.samples, batch_size=250, seed=0)]
    fx, fy = torch.cat([x for x, _ in fake]), torch.cat([y for _, y in fake])
    rx, ry = real_images(args.data, count=args.samples + args.test, batch_size=250, resolution=cfg.model.resolution)
    if rx.shape[0] < args.samples + args.test:
        raise SystemExit(f"{args.data}: {rx.shape[0]} images, fewer than --samples + --test = {args.samples + args.test}")
    hx, hy, rx, ry = rx[args.samples:], ry[args.samples:], rx[:args.samples], ry[:args.samples]
    real_acc = None
    for variant in args.variant:
        kw = dict(variant)
        src, flip = kw.pop("src", "fake"), bool(kw.pop("flip", 0))
        x, y = (fx, fy) if src == "fake" else (rx, ry)
        if flip:
            x = x.clone()
            x[::2] = x[::2].flip(-1)
        t = time.time()
        clf = train_classifier(x, y, num_classes, seed=0, bf16=bf16, **kw)
        predicted = predict_logits(clf, hx).argmax(1)
        acc = (predicted == hy).float().mean().item()
        row = {**variant, "accuracy": acc, "seconds": round(time.time() - t, 1)}
        if args.per_class:
            row.update(per_class_rows(predicted, hy, names))
            if src == "real" and real_acc is None:
                row["fidelity"] = class_accuracies(predict_logits(clf, fx).argmax(1), fy, names)
        if src == "real" and real_acc is None:
            real_acc = acc
        if real_acc is not None and src == "fake":
            row["gap_points"] = round(100 * (real_acc - acc), 1)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    raise SystemExit(main())
