"""Where the time of a run from image files to PNG masks goes (``fastseg predict --timing``).

Stages, in the order an image meets them, and where each runs:

============  ======================================================================================
``decode``    reading and decoding the file (:func:`fastseg.data.read_image`): DataLoader workers
``resize``    resize to the test scale (workers) + normalisation to the model's input (main thread,
              whole mode; in slide mode each window is normalised inside ``labels``)
``forward``   the model's forward passes (every window / scale / flip), timed by hooks on the model
``labels``    the rest of :func:`fastseg.inference.segment_labels`: upsample + argmax, or the sliding
              window's bands; the labels copied to host memory
``encode``    colourise + PNG encode + atomic write (+ overlay / label PNGs): the writer threads
============  ======================================================================================

Two waits of the main thread say whether the pipeline keeps up: ``input`` (waiting for a decoded
image: the workers are too slow) and ``output`` (waiting for a free slot in the writer's bounded
queue: the writers are too slow). A stage's total is summed over the processes and threads that run
it, so stages that overlap can add up to more than the wall time; ``share`` is a stage's fraction of
the summed stage time. ``forward / wall`` says how much of the main thread's time the model had: the
forward is the bottleneck when it is near 1 and the waits are small.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

STAGES = ("decode", "resize", "forward", "labels", "encode")
STAGE_TITLES = {"decode": "decode", "resize": "resize + normalize", "forward": "forward",
                "labels": "labels (upsample+argmax)", "encode": "encode (colour + PNG + write)"}
WAITS = ("input", "output")
SCHEMA = "fastseg-predict-timing/1"


@dataclass
class StageTimes:
    """Seconds and image counts per stage and wait, of one process (:meth:`merged` sums ranks)."""

    seconds: dict = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    images: dict = field(default_factory=lambda: dict.fromkeys(STAGES, 0))
    waits: dict = field(default_factory=lambda: dict.fromkeys(WAITS, 0.0))
    wall_s: float = 0.0
    count: int = 0  # images this process was given (read or not)
    _start: float | None = None

    def add(self, stage: str, seconds: float, images: int = 1) -> None:
        self.seconds[stage] += seconds
        self.images[stage] += images

    def wait(self, what: str, seconds: float) -> None:
        self.waits[what] += seconds

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self) -> None:
        self.wall_s = time.perf_counter() - self._start

    def as_dict(self) -> dict:
        return {"seconds": dict(self.seconds), "images": dict(self.images), "waits": dict(self.waits),
                "wall_s": self.wall_s, "count": self.count}

    @classmethod
    def merged(cls, parts: list[dict]) -> "StageTimes":
        """The ranks' :meth:`as_dict`: totals summed, wall the slowest rank's (they run together)."""
        out = cls()
        for p in parts:
            for s in STAGES:
                out.add(s, p["seconds"][s], p["images"][s])
            for w in WAITS:
                out.wait(w, p["waits"][w])
            out.wall_s = max(out.wall_s, p["wall_s"])
            out.count += p["count"]
        return out

    def record(self, **context) -> dict:
        """JSON-ready: per stage total s, ms/img (over the images that reached it), share; the waits;
        wall time, images/s end to end, ``forward_wall_fraction``; plus ``context``."""
        busy = sum(self.seconds.values()) or 1.0
        stages = {s: {"total_s": self.seconds[s], "images": self.images[s],
                      "ms_per_image": 1e3 * self.seconds[s] / self.images[s] if self.images[s] else None,
                      "share": self.seconds[s] / busy} for s in STAGES}
        ranks = max(int(context.get("world_size", 1)), 1)
        return {"schema": SCHEMA, "images": self.count, "wall_s": self.wall_s,
                "images_per_s": self.count / self.wall_s if self.wall_s > 0 else None,
                "stages": stages, "waits_s": dict(self.waits),
                # each rank's main thread runs its own forwards: the fraction of their summed wall time
                "forward_wall_fraction": self.seconds["forward"] / (self.wall_s * ranks) if self.wall_s > 0 else None,
                **context}


def format_table(record: dict) -> str:
    """A short text table of :meth:`StageTimes.record`."""
    lines = [f"{'stage':30s} {'total s':>9s} {'ms/img':>9s} {'share':>7s}"]
    for s in STAGES:
        r = record["stages"][s]
        ms = f"{r['ms_per_image']:9.1f}" if r["ms_per_image"] is not None else f"{'-':>9s}"
        lines.append(f"{STAGE_TITLES[s]:30s} {r['total_s']:9.3f} {ms} {100 * r['share']:6.1f}%")
    waits = record["waits_s"]
    lines.append(f"main thread waited {waits['input']:.3f} s for input, {waits['output']:.3f} s for the writers")
    rate = record["images_per_s"]
    frac = record["forward_wall_fraction"]
    lines.append(f"{record['images']} image(s) in {record['wall_s']:.3f} s: "
                 f"{rate:.2f} images/s end to end" if rate is not None else f"{record['images']} image(s)")
    if frac is not None:
        lines[-1] += f"; forward {100 * frac:.0f}% of wall time"
    return "\n".join(lines)
