"""A SegFormer-b0 trained in seconds on the generated shapes task, for the INT8 accuracy tests."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

SIZE, CLASSES = 64, 4  # 64² crops: b0 training must fit CI's 2 loaded cores


def images(split: str, n: int, seed: int = 0):
    """(x (n, 3, 128, 128) normalised as predict does, labels (n, 128, 128) int64)."""
    from fastseg.data import SyntheticShapes, TestTransform

    data, transform = SyntheticShapes(split, n, SIZE, CLASSES, seed), TestTransform(None)
    xs, ys = [], []
    for i in range(n):
        image, label = data.load(i)
        x, y = transform(image, label)
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


def train_b0(iters: int = 200, batch: int = 6, seed: int = 0):
    from fastseg import SegFormer

    torch.manual_seed(seed)
    x_all, y_all = images("train", 256, seed)
    model = SegFormer("b0", num_classes=CLASSES)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=iters, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    import time

    start = time.perf_counter()
    for it in range(iters):
        if it % 25 == 0 and os.environ.get("FASTSEG_FIXTURE_VERBOSE"):
            print(f"iter {it} {time.perf_counter() - start:.1f}s", flush=True)
        idx = torch.randint(0, len(x_all), (batch,), generator=gen)
        logits = model(x_all[idx])
        loss = F.cross_entropy(F.interpolate(logits, size=(SIZE, SIZE), mode="bilinear", align_corners=False),
                               y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()
