"""The "what the network learned" report: one self-contained HTML file (every figure a
base64 PNG data URI, so it opens anywhere) plus the same PNGs in a `report_files/` folder.

Deterministic for a given seed: examples are drawn with `numpy.random.default_rng((seed, k))`,
one stream per section, and nothing time-dependent is written.
"""

from __future__ import annotations

import base64
import copy
import html
import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.transforms  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch import nn  # noqa: E402

from pipeline.files import write_bytes, write_text  # noqa: E402
from pipeline.reports import introspect, projection, receptive  # noqa: E402
from pipeline.reports.figures import confusion_matrix_png  # noqa: E402
from pipeline.training.confusion import confusion_matrix  # noqa: E402

FILES = "report_files"  # the PNGs, beside report.html
BOX_PERCENTILE = 95.0  # saliency localisation: Simonyan et al.'s foreground quantile
SECTIONS = ("overview", "curves", "confusion", "filters", "feature-maps", "top-activations", "evolution", "saliency",
            "layers")
EVOLUTION_OFF = ("<p>Off: the train stage kept no per-epoch weights (<code>report.evolution_epochs=[]</code>, the "
                 "default, which costs nothing). To see a few feature maps' strongest activation as training goes "
                 "on, train with e.g. <code>report.evolution_epochs=[1,2,5,10]</code> (the weights after those "
                 "epochs are kept in <code>models/evolution/</code> and logged to MLflow) and report again.</p>")
TOP_IMAGES = 2000  # "what excites a feature map" searches at most this many (the split is shuffled)
_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
        "text-align:right}th{background:#eee}td:first-child,td:nth-child(2){text-align:left}"
        "img{max-width:100%;display:block;margin:.5em 0}.note{color:#864}section{margin-bottom:2em}"
        ".grid img{display:inline-block;max-width:32%;margin:.3em;vertical-align:top}")


class _Figures:
    """Saves each figure as `<folder>/<name>.png` and returns its data-URI <img> tag."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.png"):
            stale.unlink()

    def img(self, fig, name: str, alt: str) -> str:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
        plt.close(fig)
        return self.tag(buf.getvalue(), name, alt)

    def tag(self, png: bytes, name: str, alt: str) -> str:
        write_bytes(self.folder / f"{name}.png", png)
        data = base64.b64encode(png).decode("ascii")
        return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _show(ax, image: np.ndarray, title: str = "", **kw) -> None:
    """An H x W x C uint8 (or float) image: RGB if 3 channels, else the first in grey."""
    img = image if image.shape[-1] == 3 else image[..., 0]
    ax.imshow(img, cmap=None if img.ndim == 3 else "gray", interpolation="nearest", **kw)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


class _Cell:
    """One image's place in a `_mosaic`: takes the few `Axes` calls the report's image grids
    make (`imshow`, `set_title`, `add_patch`, `axis`) and draws on the figure's one axes,
    whose data units are inches from the figure's top left."""

    def __init__(self, ax, x: float, y: float, width: float, height: float) -> None:
        self.ax, self.box = ax, (x, y, width, height)
        self.extent: tuple[float, float, float, float] | None = None  # the first image's, in inches
        self.scale = 1.0  # inches per image pixel

    def imshow(self, img, **kwargs) -> None:
        if self.extent is None:  # the image as large as fits the cell, centred, its aspect kept
            x, y, width, height = self.box
            rows, cols = np.shape(img)[:2]
            self.scale = min(width / cols, height / rows)
            left, top = x + (width - cols * self.scale) / 2, y + (height - rows * self.scale) / 2
            self.extent = (left, left + cols * self.scale, top + rows * self.scale, top)
        self.ax.imshow(img, extent=self.extent, aspect="auto", **kwargs)

    def set_title(self, text: str, fontsize: float = 8) -> None:
        if text:
            x, y, width, _ = self.box
            top = self.extent[3] if self.extent is not None else y
            self.ax.text(x + width / 2, top - 0.03, text, ha="center", va="bottom", fontsize=fontsize)

    def add_patch(self, patch) -> None:
        """A patch in the cell's image pixel coordinates (pixel centres at integers)."""
        left, top = self.extent[0], self.extent[3]
        patch.set_transform(matplotlib.transforms.Affine2D().scale(self.scale)
                            .translate(left + self.scale / 2, top + self.scale / 2) + self.ax.transData)
        self.ax.add_patch(patch)

    def axis(self, *_args) -> None:
        """The shared axes is off already."""


def _mosaic(rows: int, cols: int, figsize: tuple[float, float], title: str = "", *, titles: bool = True):
    """A figure of rows x cols image cells (`_Cell`) drawn on a single axes, and `title`
    above them. A grid of `plt.subplots` costs about 10 ms an axes to make and as much to
    draw: the report's 388 took 7 s of its 16 here. `titles`: leave room above each image
    for a title (a quarter of the cell, as subplots' spacing did)."""
    width, height = figsize
    fig = plt.figure(figsize=figsize)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_autoscale_on(False)
    head = 0.08
    if title:
        ax.text(width / 2, head, title, ha="center", va="top", fontsize=9)
        head += 0.16 * (title.count("\n") + 1) + 0.06
    margin, cell_w, cell_h = 0.05, (width - 0.1) / cols, (height - head - 0.05) / rows
    band = 0.25 * cell_h if titles else 0.02
    cells = np.empty((rows, cols), dtype=object)
    for r in range(rows):
        for c in range(cols):
            cells[r, c] = _Cell(ax, margin + c * cell_w + 0.03, head + r * cell_h + band, cell_w - 0.06,
                                cell_h - band - 0.03)
    return fig, cells


def diagnose(rows: Sequence[dict]) -> list[str]:
    """Plain-language reading of the learning curves (gap, over-/under-fitting signs)."""
    if not rows:
        return ["No epochs were recorded."]
    get = lambda key: [r.get(key) for r in rows]  # noqa: E731
    ta, va, tl, vl = rows[-1].get("train/acc"), rows[-1].get("val/acc"), get("train/loss"), get("val/loss")
    notes = []
    if ta is not None and va is not None:
        gap = ta - va
        notes.append(f"Final train - validation accuracy gap: {gap:+.1%} (train {ta:.1%}, validation {va:.1%}).")
        if gap > 0.05:
            notes.append("Over-fitting: training accuracy exceeds validation by more than 5 points.")
        elif gap < -0.02:
            notes.append("Validation above training: training accuracy is measured with dropout/augmentation "
                         "active and averaged over an epoch of changing weights, so this signals strong "
                         "regularisation or a model still improving, not over-fitting.")
        if ta < 0.8:
            notes.append(f"Under-fitting: training accuracy is only {ta:.1%} (too little capacity, too strong "
                         "regularisation or too few epochs).")
    if None not in vl and None not in tl and len(rows) >= 3:
        best = int(np.argmin(vl))
        if best < len(rows) - 1 and vl[-1] > vl[best] * 1.05 and tl[-1] < tl[best]:
            notes.append(f"Validation loss has risen {vl[-1] / vl[best] - 1:.0%} since epoch {rows[best]['epoch'] + 1} "
                         f"while training loss kept falling ({tl[best]:.3f} to {tl[-1]:.3f}): over-fitting.")
        elif tl[-1] < 0.95 * tl[-2] and vl[-1] < vl[-2]:
            notes.append("Training and validation loss were both still falling at the last epoch: "
                         "under-trained, more epochs should help.")
    return notes


def _curves(rows: Sequence[dict], figs: _Figures) -> str:
    ep = [r["epoch"] + 1 for r in rows]  # stored 0-based (Lightning's count); shown from 1
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(11, 3.8))
    for split, color in (("train", "tab:blue"), ("val", "tab:orange")):
        ax_l.plot(ep, [r.get(f"{split}/loss") for r in rows], ".-", color=color, label=split)
        ax_a.plot(ep, [r.get(f"{split}/acc") for r in rows], ".-", color=color, label=split)
    ta, va = (np.array([r.get(k, np.nan) for r in rows], dtype=float) for k in ("train/acc", "val/acc"))
    ax_a.fill_between(ep, ta, va, where=ta >= va, color="tab:red", alpha=0.25, interpolate=True,
                      label="gap: train above val")
    ax_a.fill_between(ep, ta, va, where=ta < va, color="tab:green", alpha=0.25, interpolate=True,
                      label="gap: val above train")
    if len(rows) and not np.isnan(ta[-1] - va[-1]):
        ax_a.annotate(f"final gap {ta[-1] - va[-1]:+.1%}", xy=(ep[-1], (ta[-1] + va[-1]) / 2),
                      xytext=(-90, -30), textcoords="offset points", arrowprops={"arrowstyle": "->"})
    vl = [r.get("val/loss") for r in rows]
    if rows and None not in vl:
        best = int(np.argmin(vl))
        ax_l.axvline(ep[best], color="grey", ls="--", lw=1, label=f"min val loss (epoch {ep[best]})")
    ax_l.set(xlabel="epoch", title="loss")
    ax_l.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_a.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_a.set(xlabel="epoch", title="accuracy")
    for ax in (ax_l, ax_a):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    items = "".join(f"<li>{html.escape(n)}</li>" for n in diagnose(rows))
    return figs.img(fig, "learning_curves", "learning curves") + f"<ul>{items}</ul>"


def _confusion(images, labels, pred, probs, classes, figs: _Figures, seed: int, k: int = 5) -> str:
    cm = confusion_matrix(labels, pred, len(classes))
    path = confusion_matrix_png(cm, list(classes), figs.folder / "confusion_matrix.png")
    parts = [figs.tag(path.read_bytes(), "confusion_matrix", "confusion matrix")]
    pairs = introspect.most_confused_pairs(cm, classes, k)
    if not pairs:
        return parts[0] + "<p>No test image was misclassified.</p>"
    rng = np.random.default_rng((seed, 1))
    parts.append("<table><tr><th>actual</th><th>predicted as</th><th>count</th><th>share of actual</th></tr>"
                 + "".join(f"<tr><td>{html.escape(p['actual'])}</td><td>{html.escape(p['predicted'])}</td>"
                           f"<td>{p['count']}</td><td>{p['rate']:.1%}</td></tr>" for p in pairs) + "</table>")
    parts.append("<div class='grid'>")
    for i, p in enumerate(pairs):
        idx = np.flatnonzero((labels == p["actual_index"]) & (pred == p["predicted_index"]))
        idx = np.sort(rng.choice(idx, size=min(6, len(idx)), replace=False))
        fig, axes = _mosaic(1, len(idx), (1.6 * len(idx), 1.9), f"actual {p['actual']}, predicted {p['predicted']}")
        for ax, j in zip(axes[0], idx):
            _show(ax, images[j], f"#{j} p={probs[j, p['predicted_index']]:.2f}")
        parts.append(figs.img(fig, f"confused_{i + 1}", f"{p['actual']} predicted as {p['predicted']}"))
    return "".join(parts) + "</div>"


def _filters(net: nn.Module, figs: _Figures) -> str:
    w = introspect.first_layer_filters(net)
    cols = min(16, len(w))
    rows_ = -(-len(w) // cols)
    fig, axes = _mosaic(rows_, cols, (cols * 0.8, rows_ * 0.8 + 0.4),
                        f"{len(w)} first-layer filters {w.shape[1]}x{w.shape[2]}", titles=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(w):
            img = w[i] if w.shape[-1] == 3 else w[i].mean(axis=-1)
            ax.imshow(img, cmap=None if img.ndim == 3 else "gray", vmin=0, vmax=1, interpolation="nearest")
    note = ("RGB" if w.shape[-1] == 3 else "grey" if w.shape[-1] == 1 else "mean over input channels")
    return (figs.img(fig, "filters", "first-layer filters")
            + f"<p>Each filter scaled on its own ({note}): mid-grey is a zero weight, white the largest "
              "positive, black the largest negative.</p>")


def _feature_maps(net, x, images, layers, figs: _Figures, seed: int, n: int = 2, channels: int = 8) -> str:
    picks = np.sort(np.random.default_rng((seed, 2)).choice(len(x), size=min(n, len(x)), replace=False))
    maps = introspect.feature_maps(net, x[picks], layers)
    parts = []
    for e, j in enumerate(picks):
        fig, axes = _mosaic(len(layers), channels + 1, (1.3 * (channels + 1), 1.4 * len(layers)))
        for row, name in zip(axes, layers):
            fmap = maps[name][e]
            _show(row[0], images[j], f"input #{j}" if name == layers[0] else "")
            top = torch.argsort(fmap.flatten(1).mean(1), descending=True, stable=True)[:channels]
            for c, ax in enumerate(row[1:]):
                ax.axis("off")
                if c < len(top):
                    ax.imshow(fmap[top[c]].numpy(), cmap="viridis", interpolation="nearest")
                    ax.set_title(f"{name} ch{int(top[c])}", fontsize=6)
        parts.append(figs.img(fig, f"feature_maps_{e + 1}", f"feature maps of test image {j}"))
    return ("<p>Layers " + ", ".join(f"<code>{html.escape(n)}</code>" for n in layers) + f": for each, the "
            f"{channels} channels with the highest mean response (the layer's output, before any later "
            "activation).</p>" + "".join(parts))


def _units_figure(rows: Sequence[Sequence[tuple[str, np.ndarray, np.ndarray]]], title: str):
    """Per row of (title, projection, patch) cells: the projections in one row of images and
    the input patches under them."""
    cols = max(len(r) for r in rows)
    fig, axes = _mosaic(2 * len(rows), cols, (max(1.2 * cols, 6.0), 2.5 * len(rows)), title)
    for cells, top_row, patch_row in zip(rows, axes[::2], axes[1::2]):
        for c, (ax_p, ax_i) in enumerate(zip(top_row, patch_row)):
            ax_p.axis("off")
            ax_i.axis("off")
            if c < len(cells):
                label, proj, patch = cells[c]
                _show(ax_p, proj, label, vmin=0, vmax=1)
                # The pixels' own grey levels: a patch stretched to its own range would
                # make a faint one look as contrasted as a strong one.
                _show(ax_i, patch, vmin=0, vmax=255)
    return fig


def _cell(images: np.ndarray, proj: torch.Tensor, u: receptive.TopUnit, label: str):
    top, left, bottom, right = u.box
    shown = projection.display(proj).numpy()[top:bottom + 1, left:right + 1]
    return label, shown, images[u.image][top:bottom + 1, left:right + 1]


def _path_note(name: str, path: projection.Path) -> str:
    parts = [f"{path.rectifications} ReLU{'s' if path.rectifications != 1 else ''} (rectified)"]
    parts.append(f"{path.max_pools} max pooling{'s' if path.max_pools != 1 else ''} (unpooled through the "
                 "switches)" if path.max_pools else
                 "no max pooling, so no switches: nothing to unpool, the transposed (strided) convolutions "
                 "alone bring the signal back")
    if path.batch_norms:
        parts.append(f"{path.batch_norms} batch norm{'s' if path.batch_norms != 1 else ''} (their eval-time "
                     "per-channel scale)")
    if path.others:
        parts.append("activations without a deconvnet rule, passed with their ordinary derivative: "
                     + ", ".join(path.others))
    return f"<li><code>{html.escape(name)}</code>: " + "; ".join(html.escape(p) for p in parts) + "</li>"


def _search_images(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255)


def _top_activations(net, images: np.ndarray, split: str, layers, figs: _Figures, method: str, maps: int = 4,
                     k: int = 9) -> tuple[str, dict | None]:
    """Zeiler & Fergus's top-k input patches per feature map (see `receptive.top_activations`),
    each under its projection to pixels (`projection.project`). Also returns the top units."""
    images = images[:TOP_IMAGES]
    x = _search_images(images)
    try:
        tops = receptive.top_activations(net, x, layers, maps=maps, k=k)
    except receptive.UnknownGeometry as err:
        return f"<p class='note'>Not available: {html.escape(str(err))}.</p>", None
    parts, paths = [], []
    for e, (name, rows) in enumerate(tops.items()):
        units = [u for us in rows for u in us]
        projections, path = projection.project(net, x, name, units, method)
        paths.append(_path_note(name, path))
        it = iter(projections)
        cells = [[_cell(images, next(it), u, (f"ch{u.channel}: " if c == 0 else "") + f"#{u.image} {u.value:.2f}")
                  for c, u in enumerate(us)] for us in rows]
        fig = _units_figure(cells, f"{name}: top {k} activations of {len(rows)} feature maps, each "
                                   f"{projection.LABELS[method].split(' (')[0]} projection above its input patch")
        parts.append(figs.img(fig, f"top_activations_{e + 1}", f"top activating patches of {name} and their "
                                                                f"{method} projections"))
    text = ("<p>What excites a feature map (Zeiler &amp; Fergus 2014): for layers "
            + ", ".join(f"<code>{html.escape(n)}</code>" for n in layers)
            + f", the {maps} channels with the strongest single activation over the first {len(images)} "
            f"{split} images, each with its {k} strongest activations (any image, any position: #image and "
            "value, the layer's output before any later activation) shown as the input patch under that "
            "unit's receptive field, cut at the image border. The patch comes from the receptive-field "
            "arithmetic of the layer table, followed along the network's data flow so that shortcuts and "
            "concatenations count (<code>pipeline.reports.receptive</code>).</p>"
            f"<p>Above each patch, the same activation projected back to pixels by <strong>"
            f"{html.escape(projection.LABELS[method])}</strong> (<code>report.projection={method}</code>; the "
            f"other choice is <code>{'guided_backprop' if method == 'deconvnet' else 'deconvnet'}</code>): "
            + ("the activation alone, every other one of its layer zeroed, sent down through max-unpooling "
               "with the forward pass's switches, rectification of the signal and the transposed filters. "
               if method == "deconvnet" else
               "the activation's gradient with respect to the input, where every ReLU passes only positive "
               "signal and only where its forward input was positive (a deconvnet that also keeps the forward "
               "pass's ReLU masks). ")
            + "Mid-grey is zero; each projection is scaled to its own largest magnitude, cut to the patch's box. "
            "Batch norm, in eval mode, is the linear map it is then (a per-channel scale), dropout the identity. "
            "On the way down from each layer the signal passes:</p><ul>" + "".join(paths) + "</ul>")
    return text + "".join(parts), tops


def _evolution(net: nn.Module, images: np.ndarray, split: str, tops: dict, states, requested: Sequence[int],
               source: str, figs: _Figures, method: str, maps: int = 2) -> str:
    """For `maps` feature maps of each layer (the strongest ones of the final network), the
    strongest activation's patch and projection with the weights kept after each epoch."""
    images = images[:TOP_IMAGES]
    x = _search_images(images)
    kept, notes = [], []
    for epoch, state in states:
        weights = copy.deepcopy(net)
        try:
            weights.load_state_dict(state)
        except (RuntimeError, KeyError) as err:
            notes.append(f"The weights kept after epoch {epoch} do not fit this network ({err}); left out.")
            continue
        kept.append((f"epoch {epoch}", weights.eval()))
    missing = sorted(set(requested) - {e for e, _ in states})
    if missing:
        notes.append("No weights kept after epoch " + ", ".join(map(str, missing)) + " (training stopped earlier, "
                     "or resumed past it).")
    if not kept:
        return "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes) + \
            "<p class='note'>Not available: no per-epoch weights to show.</p>"
    kept.append(("report", net))
    layers = list(tops)
    chosen = {name: [units[0].channel for units in tops[name][:maps]] for name in layers}
    best: dict[str, list[list]] = {name: [[] for _ in chosen[name]] for name in layers}
    for label, model in kept:
        every = receptive.top_activations(model, x, layers, maps=10**9, k=1)
        for name in layers:
            strongest = {units[0].channel: units[0] for units in every[name]}
            units = [strongest[c] for c in chosen[name]]
            projections, _ = projection.project(model, x, name, units, method)
            for row, (u, p) in zip(best[name], zip(units, projections)):
                row.append(_cell(images, p, u, f"{label}\nch{u.channel} #{u.image} {u.value:.2f}"))
    parts = []
    for e, name in enumerate(layers):
        fig = _units_figure(best[name], f"{name}: strongest activation of {len(chosen[name])} feature maps\n"
                                        "over training (projection above input patch)")
        parts.append(figs.img(fig, f"evolution_{e + 1}", f"feature evolution of {name}"))
    return (f"<p>Feature evolution over training (Zeiler &amp; Fergus 2014, Fig. 4): for {maps} feature maps of "
            "each layer (the strongest of the report's network), the strongest activation over the first "
            f"{len(images)} {split} images with the weights kept after each epoch "
            f"(<code>report.evolution_epochs={list(requested)}</code>; from {html.escape(source or 'the run')}), as "
            f"its {method} projection above its input patch; the last column, <em>report</em>, is the network the rest of this report shows. A feature that "
            "settles early keeps its patch and projection from one epoch to the next.</p>"
            + "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes) + "".join(parts))


def _saliency(net, x, images, labels, pred, classes, figs: _Figures, seed: int, *, gradcam: bool,
              per_class: int = 2, max_classes: int = 10) -> str:
    rng = np.random.default_rng((seed, 3))
    shown = np.arange(len(classes))
    if len(shown) > max_classes:
        shown = np.sort(rng.choice(shown, size=max_classes, replace=False))
    parts = []
    for c in shown:
        idx = np.flatnonzero(labels == c)
        if not len(idx):
            continue
        idx = np.sort(rng.choice(idx, size=min(per_class, len(idx)), replace=False))
        target = torch.as_tensor(pred[idx])
        sal = introspect.saliency(net, x[idx], target)
        sal = sal / sal.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
        boxes = introspect.saliency_box(sal, BOX_PERCENTILE)
        cams = introspect.grad_cam(net, x[idx], target) if gradcam else None
        cols = 4 if gradcam else 3
        fig, axes = _mosaic(len(idx), cols, (1.7 * cols, 1.8 * len(idx)))
        for r, j in enumerate(idx):
            _show(axes[r, 0], images[j], f"#{j} {classes[c]} -> {classes[pred[j]]}")
            heat = [("saliency", sal[r]), ("saliency box", None)] + ([("Grad-CAM", cams[r])] if cams is not None else [])
            for ax, (name, h) in zip(axes[r, 1:], heat):
                _show(ax, images[j], name)
                if h is not None:
                    ax.imshow(h.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1, interpolation="bilinear")
            top, left, bottom, right = boxes[r]
            ax = axes[r, 2]
            ax.add_patch(matplotlib.patches.Rectangle((left - 0.5, top - 0.5), right - left + 1, bottom - top + 1,
                                                      fill=False, edgecolor="lime", linewidth=1.5))
        parts.append(figs.img(fig, f"saliency_{int(c)}", f"saliency, saliency box and Grad-CAM for class {classes[c]}"))
    return ("<p>For test images of each class, heat maps for the <em>predicted</em> class: saliency "
            "(Simonyan et al. 2014) |d score / d pixel| maximised over channels; the saliency box, "
            f"localisation from class saliency: the bounding box of the largest 8-connected region of pixels "
            f"at or above the map's {BOX_PERCENTILE:g}th percentile (Simonyan et al. seed a GraphCut segmentation with "
            "those pixels and box its largest component; the GraphCut step is left out here); Grad-CAM "
            "(Selvaraju et al. 2017) at the last convolution, upsampled to the image.</p><div class='grid'>"
            + "".join(parts) + "</div>")


def _layers_table(net: nn.Module, input_shape: tuple[int, int, int]) -> str:
    rows = introspect.layer_table(net, input_shape)
    fmt = lambda v: "" if v is None else "x".join(map(str, v)) if isinstance(v, (list, tuple)) else f"{v:,}"  # noqa: E731
    head = "".join(f"<th>{h}</th>" for h in ("layer", "type", "output", "params", "MACs", "receptive field", "jump"))
    body = "".join(f"<tr><td><code>{html.escape(r['name'])}</code></td><td>{r['type']}</td><td>"
                   f"{fmt(r['output_shape'])}</td><td>{r['params']:,}</td><td>{r['macs']:,}</td>"
                   f"<td>{fmt(r['receptive_field'])}</td><td>{fmt(r['jump'])}</td></tr>" for r in rows)
    total = (f"<tr><th>total</th><th></th><th></th><th>{sum(r['params'] for r in rows):,}</th>"
             f"<th>{sum(r['macs'] for r in rows):,}</th><th></th><th></th></tr>")
    return (f"<table><tr>{head}</tr>{body}{total}</table><p>Receptive field and jump (stride product) in "
            "input pixels, by r<sub>out</sub> = r<sub>in</sub> + (k-1)j<sub>in</sub>, j<sub>out</sub> = "
            "j<sub>in</sub>s in forward order: exact for a chain of layers, an upper bound for branching "
            "networks (shortcuts, Inception, dense blocks).</p>")


def write_report(out_dir: Path, *, net: nn.Module, images: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                 classes: Sequence[str], curves: Sequence[dict], seed: int, meta: dict[str, object],
                 notes: Sequence[str] = (), hooks: bool = True, val_images: np.ndarray | None = None,
                 projection_method: str = "deconvnet", evolution: Sequence[tuple[int, dict]] = (),
                 evolution_epochs: Sequence[int] = (), evolution_source: str = "") -> Path:
    """Write `out_dir/report.html` and `out_dir/report_files/*.png`; returns the HTML path.

    `net` maps N x C x H x W floats in [0, 1] to class scores; `images` are the test
    split's NHWC uint8 images, `probs` its predictions. `hooks=False` (a graph that
    cannot take module hooks) keeps only what input gradients can show. `val_images`
    (the validation split's, NHWC uint8) are searched for each feature map's strongest
    activations; without them, the test images are. `projection_method` (`projection.METHODS`)
    projects them to pixels. `evolution` holds (epoch, state dict of `net`) pairs kept during
    training for the epochs `evolution_epochs` asked for (where from: `evolution_source`).
    """
    figs = _Figures(out_dir / FILES)
    labels, pred = np.asarray(labels), probs.argmax(axis=1)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255)
    convs = introspect.conv_layers(net) if hooks else []
    unavailable = "<p class='note'>Not available: {}.</p>".format
    why = "the model has no convolutional layer" if hooks else "the model cannot take forward hooks"
    layers = sorted({convs[0], convs[len(convs) // 2], convs[-1]}, key=convs.index) if convs else []
    search = (val_images, "validation") if val_images is not None and len(val_images) else (images, "test")
    # No feature map, nothing to project: a deconvnet inverts conv layers, and guided
    # backpropagation of a fully connected unit would show a template, not what excites a map.
    projection_why = (f"{why}, so there is no feature map to project (a deconvnet runs feature maps back "
                      "through transposed convolutions)") if hooks else why
    top_html, tops = _top_activations(net, *search, layers, figs, projection_method) if convs else ("", None)
    overview = "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                                   for k, v in meta.items()) + "</table>"
    overview += "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes)
    body = {
        "overview": ("Overview", overview),
        "curves": ("Learning curves", _curves(curves, figs) if curves else unavailable("no curves recorded")),
        "confusion": ("Confusion matrix and most-confused pairs",
                      _confusion(images, labels, pred, probs, classes, figs, seed)),
        "filters": ("First-layer filters", _filters(net, figs) if convs else unavailable(why)),
        "feature-maps": ("Feature maps", _feature_maps(net, x, images, layers, figs, seed) if convs
                         else unavailable(why)),
        "top-activations": ("What excites a feature map: top activating patches and their projections",
                            top_html if convs else unavailable(projection_why)),
        "evolution": ("Feature evolution over training",
                      unavailable(projection_why) if not convs else
                      unavailable("the top activations above could not be found") if tops is None else
                      _evolution(net, *search, tops, evolution, evolution_epochs, evolution_source, figs,
                                 projection_method) if evolution_epochs else EVOLUTION_OFF),
        "saliency": ("Saliency, localisation from saliency, and Grad-CAM",
                     _saliency(net, x, images, labels, pred, classes, figs, seed, gradcam=bool(convs))
                     + ("" if convs else unavailable(f"Grad-CAM ({why})"))),
        "layers": ("Layers: parameters, MACs, receptive field",
                   _layers_table(net, tuple(x.shape[1:])) if hooks else unavailable(why)),
    }
    title = html.escape(f"What the network learned: {meta.get('model', '')} on {meta.get('dataset', '')}")
    nav = " | ".join(f'<a href="#{k}">{html.escape(v[0])}</a>' for k, v in body.items())
    sections = "".join(f'<section id="{k}"><h2>{html.escape(h)}</h2>{content}</section>'
                       for k, (h, content) in body.items())
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{_CSS}</style></head><body><h1>{title}</h1><nav>{nav}</nav>{sections}</body></html>\n")
    path = out_dir / "report.html"
    write_text(path, page)
    return path
