"""Fig. 5: Grad-CAM (Selvaraju et al. 2017) of the last stage, after its attention, through the
maintained ``grad-cam`` package (import ``pytorch_grad_cam``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..fileio import write_text
from .attention import foreground_ratio
from .drawing import colorbar, finish, heading, overlay, pyplot
from .inputs import run_label, load_images, open_models


class LogitsModel(nn.Module):
    """The re-id model as a plain classifier for pytorch_grad_cam: images -> ID logits, in eval mode.

    ``ResNetRGA`` returns a (pooled, bn, logits) tuple in train mode and a feature in eval mode;
    Grad-CAM wants one logits tensor, computed with the BN running statistics.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        m = self.model
        return m.cls(m.feat_bn(m.backbone(x).mean((2, 3))))


@torch.no_grad()
def top_classes(model, images: torch.Tensor) -> list[int]:
    """Each image's highest-scoring training identity (the class Grad-CAM explains by default)."""
    model.eval()
    return LogitsModel(model)(images).argmax(1).tolist()


def gradcam_maps(model, images: torch.Tensor, target_layer=None, classes=None) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017) of the final stage (after its attention), (B, H, W) in [0, 1].

    The target is ``classes`` (one training identity per image), by default each image's
    highest-scoring training identity (``top_classes``; the usual choice for re-id models, whose
    test identities are not among the classes). Uses ``pytorch_grad_cam.GradCAM``, which scales
    each image's map to 0..1.
    """
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as e:  # pragma: no cover
        raise ImportError("gradcam needs the grad-cam package: pip install grad-cam (or the [vis] extra)") from e
    model.eval()
    if classes is None:
        classes = top_classes(model, images)
    layer = target_layer if target_layer is not None else model.backbone.rga_att4
    with GradCAM(model=LogitsModel(model), target_layers=[layer]) as cam:
        return cam(input_tensor=images, targets=[ClassifierOutputTarget(int(c)) for c in classes])


def gradcam_figure(originals, runs, path, ratios=None, classes=None, labels: list | None = None) -> Path:
    """Rows: images; columns: the image, then each run's Grad-CAM, on one 0..1 colour scale.

    runs: [(label, (B, H, W))]; ratios: per run, per image foreground ratios; classes: per run, per
    image the training identity explained (printed above each map); labels: a list that
    receives the figure's texts.
    """
    plt = pyplot()
    n = len(originals)
    fig, axes = plt.subplots(n, 1 + len(runs), figsize=(1.9 * (1 + len(runs)) + 0.6, 2.4 * n + 0.9),
                             squeeze=False, layout="constrained")
    for i, img in enumerate(originals):
        axes[i, 0].imshow(img)
        axes[i, 0].axis("off")
        if i == 0:
            axes[i, 0].set_title("input image", fontsize=7)
        for j, (label, cams) in enumerate(runs, start=1):
            axes[i, j].imshow(overlay(img, cams[i], vmin=0.0, vmax=1.0))
            axes[i, j].axis("off")
            title = [label.replace(" (", "\n(")] if i == 0 else []
            if classes is not None:
                title.append(f"class {classes[j - 1][i]}")
            if ratios is not None and not np.isnan(ratios[j - 1][i]):
                title.append(f"fg ratio {ratios[j - 1][i]:.2f}")
            axes[i, j].set_title("\n".join(title), fontsize=6)
    heading(fig, "Grad-CAM of the last stage (after its attention) for the class each model scores highest on "
                  "the image ('class k': training identity k); each map scaled to 0–1")
    colorbar(fig, axes, 0.0, 1.0, "Grad-CAM (0–1 per map)")
    return finish(fig, path, labels, dpi=110)


def cmd_gradcam(args) -> dict:
    models = open_models(args)
    runs, ratios, explained, summary = [], [], [], {"images": args.images, "runs": []}
    originals = None
    for model in models:
        originals, batch, masks = load_images(args.images, model.height, model.width)
        classes = [c for s in range(0, len(batch), 32) for c in top_classes(model, batch[s:s + 32])]
        cams = np.concatenate([gradcam_maps(model, batch[s:s + 32], classes=classes[s:s + 32])
                               for s in range(0, len(batch), 32)])
        big = [F.interpolate(torch.from_numpy(c)[None, None], size=o.shape[:2], mode="bilinear",
                             align_corners=False)[0, 0].numpy() for c, o in zip(cams, originals)]
        rt = [float(foreground_ratio(torch.from_numpy(b)[None, None] + 1e-12, torch.from_numpy(m)[None, None]))
              if m is not None else float("nan") for b, m in zip(big, masks)]
        runs.append((run_label(model), big))
        ratios.append(rt)
        explained.append(classes)
        summary["runs"].append({"run": model.run_name, "variant": model.variant, "foreground_ratio": rt,
                                "classes": classes})
        v = [x for x in rt if not np.isnan(x)]
        print(f"{run_label(model)}: Grad-CAM foreground ratio mean {np.mean(v):.3f} over {len(v)} images" if v
              else f"{run_label(model)}: no masks")
    out = Path(args.out)
    k = args.show
    texts = []
    summary["figure"] = str(gradcam_figure(originals[:k], [(label, cams[:k]) for label, cams in runs],
                                           out / "gradcam.png", ratios=[r[:k] for r in ratios],
                                           classes=[c[:k] for c in explained], labels=texts))
    summary["texts"] = texts
    write_text(json.dumps(summary, indent=2) + "\n", out / "gradcam.json")
    print(f"wrote {summary['figure']}")
    return summary
