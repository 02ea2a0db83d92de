"""Segmentation metrics from an accumulated confusion matrix (as mmsegmentation computes them).

``cm[t, p]`` counts pixels of true class ``t`` predicted as ``p``; pixels whose label is the
ignore index are left out. From it, per class::

    IoU_c = cm[c, c] / (Σ_p cm[c, p] + Σ_t cm[t, c] - cm[c, c])     (nan if the union is 0)
    Acc_c = cm[c, c] / Σ_p cm[c, p]                                  (nan if class c never occurs)

and ``mIoU`` / ``mAcc`` are their nan-aware means (a class absent from both labels and
predictions does not count; a class predicted but absent from the labels has IoU 0), ``aAcc`` is
the fraction of labelled pixels predicted right. Values are fractions in [0, 1].
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """pred, target: integer class maps of the same shape → (K, K) int64 counts ``[true, pred]``.

    Raises ValueError for labels or predictions outside ``[0, K)`` (other than ``ignore_index``
    in the labels): a silently dropped class would be a wrong answer.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(target.shape)} differ in shape")
    if pred.is_floating_point() or target.is_floating_point():
        raise TypeError(f"expected integer class maps, got {pred.dtype} and {target.dtype}")
    keep = target != ignore_index
    t = target[keep].long()
    p = pred[keep].long()
    if t.numel():
        bad = t[(t < 0) | (t >= num_classes)]
        if bad.numel():
            raise ValueError(f"labels outside [0, {num_classes}) that are not the ignore index {ignore_index}: "
                             f"{sorted(set(bad.unique().tolist()))[:10]}")
        bad = p[(p < 0) | (p >= num_classes)]
        if bad.numel():
            raise ValueError(f"predictions outside [0, {num_classes}): {sorted(set(bad.unique().tolist()))[:10]}")
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def metrics_from_confusion(cm: torch.Tensor) -> dict:
    """aAcc, mIoU, mAcc and per-class IoU / Acc (lists, nan where undefined) from a (K, K) matrix."""
    cm = cm.double().cpu()
    inter = cm.diag()
    label_area = cm.sum(1)
    pred_area = cm.sum(0)
    union = label_area + pred_area - inter
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, inter / union.clamp_min(1), nan)
    acc = torch.where(label_area > 0, inter / label_area.clamp_min(1), nan)
    total = label_area.sum()

    def nanmean(v):
        v = v[~torch.isnan(v)]
        return v.mean().item() if v.numel() else float("nan")

    return {
        "aAcc": (inter.sum() / total).item() if total > 0 else float("nan"),
        "mIoU": nanmean(iou),
        "mAcc": nanmean(acc),
        "IoU": iou.tolist(),
        "Acc": acc.tolist(),
        "pixels": int(total.item()),
    }


class SegMetric:
    """Accumulates a confusion matrix over batches; ``all_reduce()`` sums it across ranks."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device="cpu"):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred: (B, H, W) or (H, W) class ids; target: same shape with ignore_index allowed."""
        self.cm += confusion_matrix(pred.to(self.cm.device), target.to(self.cm.device),
                                    self.num_classes, self.ignore_index)

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.cm, op=dist.ReduceOp.SUM)

    def compute(self) -> dict:
        return metrics_from_confusion(self.cm)


def format_table(metrics: dict, class_names=None) -> str:
    """A plain-text table: one row per class (IoU, Acc in %), then aAcc / mIoU / mAcc."""
    iou, acc = metrics["IoU"], metrics["Acc"]
    names = list(class_names) if class_names else [f"class_{i}" for i in range(len(iou))]
    width = max([5] + [len(n) for n in names])

    def pct(v):
        return "   nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:6.2f}"

    lines = [f"{'class':<{width}} |   IoU  |   Acc", f"{'-' * width}-+--------+-------"]
    lines += [f"{n:<{width}} | {pct(i)} | {pct(a)}" for n, i, a in zip(names, iou, acc)]
    lines.append(f"{'-' * width}-+--------+-------")
    lines.append(f"aAcc {pct(metrics['aAcc'])}   mIoU {pct(metrics['mIoU'])}   mAcc {pct(metrics['mAcc'])}")
    return "\n".join(lines)
