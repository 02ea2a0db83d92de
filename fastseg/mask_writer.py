"""Colourise, encode and write ``fastseg predict``'s PNGs on background threads.

The forward pass is the work of a prediction run; a PNG's zlib encode is not small (tens of ms for
a photo-sized mask), and on the main thread it would sit between two forwards. So the main thread
hands each image's labels to :class:`MaskWriter` and goes on with the next forward; a few threads
colourise, encode and write. Pillow's PNG encoder (filtering + deflate, ``libImaging/ZipEncode.c``)
runs with the GIL released, as does numpy's palette lookup, so the threads run beside the model.

At most ``pending`` images, and at most ``pending_bytes`` of their arrays (labels, the image for
an overlay, and the colour masks the encode makes), are in the writer at once:
:meth:`MaskWriter.submit` blocks until both fit, and one image always fits when the writer is
empty. So memory stays bounded however far the model runs ahead and however large the images
(at 10000×10000 one image's labels and colour mask take 400 MB: a count alone would not bound it). Every file is written atomically
(:func:`fastseg.io.atomic_write`: a temporary file in the same folder, then a rename; the mode a
plain ``open()`` gives under the umask), so a killed run leaves whole masks or none. A failure to
write one image's files is that image's failure: it is returned by :meth:`MaskWriter.finished` with
its reason, and the other images are still written.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

LABEL_PNG_8BIT_MAX = 256  # classes an 8-bit (mode L) label PNG can hold
PENDING_BYTES = 256 << 20  # the arrays the writer may hold at once (one image always fits)


def save_label_png(labels: np.ndarray, dest, num_classes: int | None) -> None:
    """Class ids as a PNG (``dest``: a path or a binary file object): 8-bit (mode L) for up to 256
    classes, else 16-bit (mode I;16), so ids never wrap. Read back exactly by
    :func:`fastseg.data.read_label`."""
    from PIL import Image

    wide = (num_classes or 0) > LABEL_PNG_8BIT_MAX or (labels.size and int(labels.max()) >= LABEL_PNG_8BIT_MAX)
    Image.fromarray(labels.astype(np.uint16 if wide else np.uint8)).save(dest, format="PNG")


def output_names(stem: str, overlay: bool, save_labels: bool) -> list[str]:
    """The files ``fastseg predict`` writes for an input whose name has this stem, mask first."""
    return ([f"{stem}.png"] + ([f"{stem}_overlay.png"] if overlay else [])
            + ([f"{stem}_labels.png"] if save_labels else []))


class MaskWriter:
    """``submit(key, stem, labels, image)`` → ``<stem>.png`` (labels in ``palette`` colours), and
    with ``overlay_alpha`` ``<stem>_overlay.png``, with ``save_labels`` ``<stem>_labels.png``, in
    ``out_dir``, written by ``threads`` threads. :meth:`finished` returns ``(key, seconds, error)`` of
    each image done since the last call (error None when every file was written); :meth:`close`
    waits for the rest and returns them."""

    def __init__(self, out_dir: Path, palette: np.ndarray, *, overlay_alpha: float | None = None,
                 save_labels: bool = False, num_classes: int | None = None, threads: int = 2,
                 pending: int | None = None, pending_bytes: int = PENDING_BYTES):
        if threads < 1:
            raise ValueError(f"the writer needs at least one thread, got {threads}")
        self.out_dir, self.palette = Path(out_dir), palette
        self.overlay_alpha, self.save_labels, self.num_classes = overlay_alpha, save_labels, num_classes
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="fastseg-writer")
        self._max_items, self._max_bytes = pending or 2 * threads, pending_bytes
        self._items = self._bytes = self.peak_bytes = 0  # what the writer holds now (and at most)
        self._room = threading.Condition()
        self._done: queue.SimpleQueue = queue.SimpleQueue()

    def cost(self, labels: np.ndarray, image: np.ndarray | None) -> int:
        """Bytes one image holds in the writer: its labels, the overlay's image, and the (H, W, 3)
        colour mask (and overlay) the encode makes."""
        made = labels.size * 3 * (2 if self.overlay_alpha is not None else 1)
        return labels.nbytes + made + (image.nbytes if image is not None and self.overlay_alpha is not None else 0)

    def submit(self, key, stem: str, labels: np.ndarray, image: np.ndarray | None) -> float:
        """Queue one image's files; returns the seconds spent waiting for room."""
        cost = self.cost(labels, image)
        t0 = time.perf_counter()
        with self._room:
            self._room.wait_for(lambda: self._items == 0 or (
                self._items < self._max_items and self._bytes + cost <= self._max_bytes))
            self._items += 1
            self._bytes += cost
            self.peak_bytes = max(self.peak_bytes, self._bytes)
        waited = time.perf_counter() - t0
        try:
            self._pool.submit(self._write, key, stem, labels, image, cost)
        except BaseException:
            self._release(cost)
            raise
        return waited

    def _release(self, cost: int) -> None:
        with self._room:
            self._items -= 1
            self._bytes -= cost
            self._room.notify_all()

    def _write(self, key, stem: str, labels: np.ndarray, image, cost: int) -> None:
        from PIL import Image

        from fastseg.data import colorize, overlay
        from fastseg.io import atomic_write

        t0, error = time.perf_counter(), None
        try:
            names = output_names(stem, self.overlay_alpha is not None, self.save_labels)
            colours = colorize(labels, self.palette)
            with atomic_write(self.out_dir / names[0], recover_leftovers=False) as f:
                Image.fromarray(colours).save(f, format="PNG")
            if self.overlay_alpha is not None:
                with atomic_write(self.out_dir / names[1], recover_leftovers=False) as f:
                    Image.fromarray(overlay(image, colours, self.overlay_alpha)).save(f, format="PNG")
            del colours
            if self.save_labels:
                with atomic_write(self.out_dir / names[-1], recover_leftovers=False) as f:
                    save_label_png(labels, f, self.num_classes)
        except Exception as e:  # noqa: BLE001 - one image's failure, reported by name; the others go on
            from fastseg.errors import one_line

            error = f"could not write its outputs ({type(e).__name__}: {one_line(e)})"
        finally:
            self._release(cost)
            self._done.put((key, time.perf_counter() - t0, error))

    def finished(self) -> list[tuple]:
        out = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    def close(self, cancel: bool = False) -> list[tuple]:
        """Wait for the queued images (``cancel``: drop those not started) and return what finished."""
        self._pool.shutdown(wait=True, cancel_futures=cancel)
        return self.finished()
