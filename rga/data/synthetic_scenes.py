"""A second synthetic re-id set, ``synthetic_scenes``: the person is somewhere in a cluttered frame.

The default ``synthetic`` set centres every person and fills 78-93% of the image height with them
(the mask is ~33% of the image), so global average pooling already looks mostly at the person and
an attention module has nothing to find. Here, with the same identities (``synthetic._identity``)
drawn by the same person drawer (``synthetic._draw_person`` / ``_colour_person``):

* the target person stands at a **random scale and position**: height 45-80% of the frame (times
  the identity's own height factor 0.88-1.04), horizontal centre anywhere the body fits, feet
  anywhere from just below the frame's bottom edge up to where the head still fits;
* **cluttered, textured backgrounds**, one panorama per camera (stripes, bricks, checks, panels,
  smooth noise, shop windows / posters, blobs, a floor), from which each image takes its own
  window, plus 2-6 per-image objects (boxes, bands of stripes, discs, fences). All colours are
  drawn from the clothing palettes as well as the scene palette, so a colour average of the whole
  image is a poor cue to the identity;
* **other people**: in a share of images (per camera, around ``people_prob``) one or two other
  people (appearances that are no identity of the set) at 0.55-1.35x the target's height, anywhere,
  often partly outside the frame, mostly behind the target, sometimes in front of it;
* **occluders** (around ``occluder_prob`` of the images): a pole, a box / bin / bench at the
  bottom, or a passer-by cut by the frame edge, in front of the target. Layouts that hide more
  than 45% of the target are redrawn;
* **pose and viewpoint**: front / back / side views (per-camera bias), walking phase, arm swing;
  plus per-camera lighting (gain, colour cast, gamma), blur and sensor noise as in ``synthetic``.

Masks (``masks/<split>/<stem>.png``, 0/255) hold **only the target's visible pixels**: other
people and occluders are outside them, which is what the foreground-attention ratio of
``rga.visualize`` needs.

Default image size 128x64, the size the models train at: at 64x32 a ResNet's stage-3 and stage-4
maps (stride 16, last stride 1) are 4x2, where RGA's spatial relations are degenerate (most
attention MLPs get a hidden width of 1 and the stage-4 spatial gate is constant within an image);
at 128x64 they are 8x4.

Layout, naming, query / gallery protocol (every query has a cross-camera match), distractors
(pid 0000: scenes around a person who is no identity), marker JSON
(``synthetic_scenes_config.json``: generator version + parameters), determinism (one seeded
generator per camera and image) and the generate-once-with-a-lock behaviour are those of
``synthetic``::

    <root>/synthetic_scenes/{bounding_box_train,query,bounding_box_test}/0001_c1s1_000001_00.jpg
    <root>/synthetic_scenes/masks/<split folder>/<same stem>.png
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .generated import build_generated, make_config, marker_json, mask_path, write_generated
from .synthetic import (_BOTTOM, _CLOTH, _SCENE, BG, SyntheticConfig, _camera_finish, _colour_person,
                        _draw_person, _identity, _jitter, _reduce_mask, _rng)

GENERATOR_VERSION = 1
GENERATOR = "scenes"
MARKER = "synthetic_scenes_config.json"
DIRNAME = "synthetic_scenes"
NAME = "synthetic_scenes"

#: every colour a background, clutter object or occluder may take: clothing colours included
_ANY = np.concatenate([_CLOTH, _BOTTOM, _SCENE])
_VIEWS = ("front", "back", "left", "right")
# owners of a pixel (the ``owner`` map of _paint)
SCENE, TARGET, OTHER, OCCLUDER = 0, 1, 2, 3


@dataclass(frozen=True)
class SceneConfig(SyntheticConfig):
    """The fields of SyntheticConfig (same meaning and defaults) plus the scene's knobs."""
    min_person_height: float = 0.45  # target height, fraction of the frame height
    max_person_height: float = 0.80
    people_prob: float = 0.7  # mean share of images with 1-2 other people (varies per camera)
    occluder_prob: float = 0.4  # mean share of images with an occluder (varies per camera)

    def validate(self) -> None:
        super().validate()
        if not 0.2 <= self.min_person_height <= self.max_person_height <= 0.95:
            raise ValueError("need 0.2 <= min_person_height <= max_person_height <= 0.95")
        for k in ("people_prob", "occluder_prob"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise ValueError(f"{k} must be in [0, 1]")
        if self.height < 32 or self.width < 16:
            raise ValueError("scene images must be at least 32 x 16")


def _c(v) -> Tuple[int, int, int]:
    return tuple(int(x) for x in np.clip(v, 0, 255))


def _any_colour(r: np.random.Generator, s: float = 18.0) -> np.ndarray:
    return _jitter(r, _ANY[r.integers(len(_ANY))], s)


# ---------------------------------------------------------------------------------------------
# cameras: a cluttered panorama each
# ---------------------------------------------------------------------------------------------
def _stripes(d, r, box, fill, vertical: Optional[bool] = None) -> None:
    """Stripes of ``fill`` (a PIL fill: RGB tuple or grey level) over ``box`` (x0, y0, x1, y1):
    vertical, horizontal or diagonal."""
    x0, y0, x1, y1 = box
    period = float(r.uniform(5, 26))
    width = period * float(r.uniform(0.25, 0.6))
    kind = int(r.integers(3)) if vertical is None else (0 if vertical else 1)
    if kind == 0:
        for x in np.arange(x0, x1, period):
            d.rectangle([x, y0, x + width, y1], fill=fill)
    elif kind == 1:
        for y in np.arange(y0, y1, period):
            d.rectangle([x0, y, x1, y + width], fill=fill)
    else:  # diagonal: may run past the box's left and right edges (more clutter where drawn
        # straight onto the panorama; clipped by the object's alpha in _paint)
        slope = float(r.choice([-1.0, 1.0])) * float(r.uniform(0.5, 1.5))
        span = abs(slope) * (y1 - y0)
        for x in np.arange(x0 - span, x1 + span, period):
            d.polygon([(x, y0), (x + width, y0), (x + width + slope * (y1 - y0), y1),
                       (x + slope * (y1 - y0), y1)], fill=fill)


def _smooth_noise(r: np.random.Generator, H: int, W: int, cells: int, amp: float) -> np.ndarray:
    """A (H, W) multiplicative texture 1 +- amp from a coarse random grid, bilinearly enlarged."""
    from PIL import Image

    gh, gw = max(2, H // cells), max(2, W // cells)
    g = r.uniform(-1, 1, (gh, gw)).astype(np.float32)
    big = np.asarray(Image.fromarray(g, mode="F").resize((W, H), Image.BILINEAR))
    return 1.0 + amp * big


def _panorama(r: np.random.Generator, H2: int, W2: int) -> np.ndarray:
    """A camera's scene (1.3 H2 x 4 W2, float RGB) from which every image takes a window."""
    from PIL import Image, ImageDraw

    PH, PW = int(H2 * 1.3), 4 * W2
    wall = _any_colour(r, 20) * 0.9
    img = Image.new("RGB", (PW, PH), _c(wall))
    d = ImageDraw.Draw(img)
    horizon = int(PH * r.uniform(0.5, 0.8))
    texture = int(r.integers(5))
    second = _any_colour(r, 25)
    if texture == 0:  # stripes over the whole wall
        _stripes(d, r, (0, 0, PW, horizon), _c(second))
    elif texture == 1:  # bricks
        bh = int(r.integers(6, 16))
        for i, y in enumerate(range(0, horizon, bh)):
            d.line([(0, y), (PW, y)], fill=_c(wall * 0.7), width=2)
            for x in range((i % 2) * bh, PW, 2 * bh):
                d.line([(x, y), (x, y + bh)], fill=_c(wall * 0.7), width=2)
    elif texture == 2:  # checks
        s = int(r.integers(8, 24))
        for y in range(0, horizon, s):
            for x in range((y // s % 2) * s, PW, 2 * s):
                d.rectangle([x, y, x + s - 1, y + s - 1], fill=_c(second))
    elif texture == 3:  # panels
        step = int(r.integers(W2 // 6, W2 // 2))
        for x in range(0, PW, step):
            d.rectangle([x, 0, x + step * 0.45, horizon], fill=_c(wall * r.uniform(0.75, 1.2)))
    for _ in range(int(r.integers(6, 14))):  # shop windows, doors, posters, signs
        w, h = r.uniform(0.2, 1.0) * W2, r.uniform(0.1, 0.6) * H2
        x, y = r.uniform(0, PW - w), r.uniform(-0.1 * H2, max(1.0, horizon - 0.5 * h))
        box = (float(x), float(y), float(x + w), float(y + h))
        d.rectangle(box, fill=_c(_any_colour(r, 30)))
        if r.random() < 0.4:
            _stripes(d, r, box, _c(_any_colour(r, 30)))
    for _ in range(int(r.integers(4, 10))):  # bushes, signs, lamps
        w, h = r.uniform(0.1, 0.6) * W2, r.uniform(0.05, 0.3) * H2
        x, y = r.uniform(-w / 2, PW - w / 2), r.uniform(0, PH - h)
        d.ellipse([float(x), float(y), float(x + w), float(y + h)], fill=_c(_any_colour(r, 30)))
    floor = _any_colour(r, 20) * 0.8
    d.rectangle([0, horizon, PW, PH], fill=_c(floor))
    if r.random() < 0.6:  # paving
        _stripes(d, r, (0, horizon, PW, PH), _c(floor * r.uniform(0.7, 1.25)))
    bg = np.asarray(img, dtype=np.float32)
    bg = bg * _smooth_noise(r, PH, PW, int(r.integers(6, 20)), float(r.uniform(0.05, 0.2)))[..., None]
    return bg * np.linspace(1.06, 0.92, PH, dtype=np.float32)[:, None, None]


def _scene_camera(cfg: SceneConfig, cam: int, H2: int, W2: int) -> Dict:
    r = _rng(cfg.seed, 12, cam)
    cast = np.clip(r.normal(1.0, 0.1, 3), 0.8, 1.2).astype(np.float32)
    d = {
        "views": r.dirichlet([1.0, 1.0, 0.6, 0.6]),  # front, back, side left, side right
        "gain": float(r.uniform(0.7, 1.2)),
        "cast": cast,
        "gamma": float(r.uniform(0.8, 1.25)),
        "blur": float(r.choice([0.0, 0.0, 0.4, 0.6])),
        "noise": float(r.uniform(2.0, 6.0)),
        "light_dir": float(r.uniform(-1, 1)),
        "people_prob": float(np.clip(cfg.people_prob * r.uniform(0.7, 1.3), 0, 1)),
        "occ_prob": float(np.clip(cfg.occluder_prob * r.uniform(0.6, 1.4), 0, 1)),
    }
    d["background"] = _panorama(r, H2, W2)
    return d


# ---------------------------------------------------------------------------------------------
# one image: a layout (all the randomness), then painting (none)
# ---------------------------------------------------------------------------------------------
def _person(r: np.random.Generator, ident: Dict, views, cx: float, feet: float, ph: float,
            role: int) -> Dict:
    view = _VIEWS[int(r.choice(4, p=views))]
    return {"kind": "person", "role": role, "ident": ident, "view": view, "cx": float(cx),
            "feet": float(feet), "ph": float(ph), "phase": float(r.uniform(-1, 1)),
            "swing": float(r.uniform(-1, 1))}


def _extra_ident(cfg: SceneConfig, r: np.random.Generator) -> Dict:
    return _identity(cfg.seed, 1_000_000 + int(r.integers(1_000_000)))  # no identity of the set


def _layout(ident: Dict, cam: Dict, cfg: SceneConfig, r: np.random.Generator, H2: int,
            W2: int) -> Dict:
    """Everything random about one image, in drawing order (back to front)."""
    bg = cam["background"]
    lay: Dict = {"y0": int(r.integers(0, bg.shape[0] - H2 + 1)),
                 "x0": int(r.integers(0, bg.shape[1] - W2 + 1)), "objects": []}
    objs: List[Dict] = lay["objects"]
    for _ in range(int(r.integers(2, 7))):  # per-image clutter, behind everybody
        w, h = r.uniform(0.1, 0.7) * W2, r.uniform(0.05, 0.4) * H2
        x, y = r.uniform(-0.2 * W2, W2 - 0.3 * w), r.uniform(-0.1 * H2, H2 - 0.3 * h)
        objs.append({"kind": str(r.choice(["rect", "ellipse", "stripes", "fence"])),
                     "role": SCENE, "box": (float(x), float(y), float(x + w), float(y + h)),
                     "colour": _any_colour(r, 30), "seed": int(r.integers(2**31))})
    # the target
    ph = H2 * r.uniform(cfg.min_person_height, cfg.max_person_height) * ident["height"]
    half = min(0.22 * ph * ident["build"], 0.5 * W2)  # half the body's width, arms included
    cx = r.uniform(half, W2 - half)
    feet = r.uniform(min(ph + 0.01 * H2, 1.03 * H2), 1.03 * H2)
    target = _person(r, ident, cam["views"], cx, feet, ph, TARGET)
    behind, front = [], []
    if r.random() < cam["people_prob"]:
        for _ in range(1 + int(r.random() < 0.4)):
            oph = ph * r.uniform(0.55, 1.35)
            ofeet = r.uniform(max(0.45 * H2, 0.6 * oph), 1.25 * H2)
            ocx = r.uniform(-0.25 * W2, 1.25 * W2)
            other = _person(r, _extra_ident(cfg, r), cam["views"], ocx, ofeet, oph, OTHER)
            (front if r.random() < 0.25 else behind).append(other)
    if r.random() < cam["occ_prob"]:
        kind = int(r.integers(3))
        col = _any_colour(r, 25)
        if kind == 0:  # pole, from the top or standing on the ground
            w = r.uniform(0.06, 0.16) * W2
            x = r.uniform(-0.5 * w, W2 - 0.5 * w)
            y = 0.0 if r.random() < 0.6 else r.uniform(0.0, 0.6) * H2
            front.append({"kind": "pole", "role": OCCLUDER, "colour": col,
                          "box": (float(x), float(y), float(x + w), float(H2))})
        elif kind == 1:  # box / bin / bench at the bottom
            w = r.uniform(0.3, 0.8) * W2
            x = r.uniform(-0.3 * w, W2 - 0.7 * w)
            y = r.uniform(0.7, 0.9) * H2
            front.append({"kind": "rect" if r.random() < 0.6 else "stripes", "role": OCCLUDER,
                          "box": (float(x), float(y), float(x + w), float(H2 * 1.05)),
                          "colour": col, "seed": int(r.integers(2**31))})
        else:  # a passer-by close to the camera, cut by the frame edge
            oph = H2 * r.uniform(1.0, 1.5)
            ocx = (r.uniform(-0.1, 0.08) if r.random() < 0.5 else r.uniform(0.92, 1.1)) * W2
            front.append(_person(r, _extra_ident(cfg, r), cam["views"], ocx,
                                 H2 * r.uniform(1.0, 1.4), oph, OCCLUDER))
    objs += behind + [target] + front
    lay["finish_seed"] = int(r.integers(2**63))
    return lay


def _paint(lay: Dict, cam: Dict, H2: int, W2: int, skip: Sequence[int] = ()
           ) -> Tuple[np.ndarray, np.ndarray, int]:
    """Paint a layout at 2x: (float RGB image, owner map of SCENE / TARGET / OTHER / OCCLUDER,
    the number of pixels the target covers before anything in front of it is drawn).
    Objects whose role is in ``skip`` are left out (the tests paint scenes without the target)."""
    from PIL import Image, ImageDraw

    y0, x0 = lay["y0"], lay["x0"]
    img = cam["background"][y0:y0 + H2, x0:x0 + W2].copy()
    owner = np.zeros((H2, W2), np.uint8)
    target_area = 0
    for ob in lay["objects"]:
        if ob["role"] in skip:
            continue
        if ob["kind"] == "person":
            labels = Image.new("L", (W2, H2), BG)
            _draw_person(ImageDraw.Draw(labels), ob["ident"], ob["view"], ob["cx"], ob["feet"],
                         ob["ph"], phase=ob["phase"], swing=ob["swing"])
            lab = np.asarray(labels)
            where = lab > 0
            col = _colour_person(lab, ob["ident"], ob["cx"], ob["feet"], ob["ph"],
                                 cam["light_dir"])
            img[where] = col[where]
            if ob["role"] == TARGET:
                target_area = int(where.sum())
        else:
            layer = Image.new("RGB", (W2, H2), (0, 0, 0))
            alpha = Image.new("L", (W2, H2), 0)
            d, da = ImageDraw.Draw(layer), ImageDraw.Draw(alpha)
            box, colour = ob["box"], ob["colour"]
            if ob["kind"] == "ellipse":
                d.ellipse(box, fill=_c(colour))
                da.ellipse(box, fill=255)
            elif ob["kind"] in ("stripes", "fence"):
                r = np.random.default_rng(ob["seed"])
                if ob["kind"] == "stripes":  # a striped block
                    d.rectangle(box, fill=_c(colour))
                    da.rectangle(box, fill=255)
                    _stripes(d, r, box, _c(colour * r.uniform(0.5, 0.8)))
                else:  # bars with gaps: the scene shows through
                    _stripes(d, r, box, _c(colour), vertical=True)
                    _stripes(da, np.random.default_rng(ob["seed"]), box, 255, vertical=True)
            else:  # rect, pole
                d.rectangle(box, fill=_c(colour))
                da.rectangle(box, fill=255)
            where = np.asarray(alpha) > 0
            rgb = np.asarray(layer, dtype=np.float32)
            if ob["kind"] == "pole":  # a little roundness
                xs = np.linspace(0.8, 1.15, W2, dtype=np.float32)
                rgb = rgb * xs[None, :, None]
            img[where] = rgb[where]
        owner[where] = ob["role"]
    return img, owner, target_area


def render_scene(ident: Dict, cam: Dict, cfg: SceneConfig, r: np.random.Generator
                 ) -> Tuple[np.ndarray, np.ndarray, Dict]:
    """(image (H, W, 3) uint8, mask (H, W) 0/255 of the target's visible pixels, layout)."""
    H2, W2 = 2 * cfg.height, 2 * cfg.width
    for attempt in range(10):  # redraw layouts that hide too much of the target
        lay = _layout(ident, cam, cfg, r, H2, W2)
        img, owner, area = _paint(lay, cam, H2, W2)
        visible = int((owner == TARGET).sum())
        if visible >= 0.55 * area and visible > 0:
            break
    out = _camera_finish(img, cam, np.random.default_rng(lay["finish_seed"]))
    return out, _reduce_mask(owner == TARGET), lay


def finish_layout(lay: Dict, cam: Dict, cfg: SceneConfig, skip: Sequence[int] = ()
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """Image and owner map (at 2x) of a layout, optionally without some roles: render_scene's
    image exactly when ``skip`` is empty (same camera noise)."""
    H2, W2 = 2 * cfg.height, 2 * cfg.width
    img, owner, _ = _paint(lay, cam, H2, W2, skip)
    return _camera_finish(img, cam, np.random.default_rng(lay["finish_seed"])), owner


# ---------------------------------------------------------------------------------------------
# the dataset on disk
# ---------------------------------------------------------------------------------------------
def scene_cameras(cfg: SceneConfig) -> List[Dict]:
    return [_scene_camera(cfg, c, 2 * cfg.height, 2 * cfg.width) for c in range(cfg.num_cameras)]


def generate_scenes(out_dir, cfg: Optional[SceneConfig] = None) -> Path:
    """Render the whole ``synthetic_scenes`` dataset into ``out_dir`` (which must not exist yet)."""
    cfg = cfg or SceneConfig()
    cfg.validate()
    cams = scene_cameras(cfg)
    idents: Dict[int, Dict] = {}

    def render(pid: int, c: int, k: int):
        ident = idents.setdefault(pid, _identity(cfg.seed, pid))
        return render_scene(ident, cams[c], cfg, _rng(cfg.seed, 14, pid, c, k))[:2]

    def distractor(i: int):
        r = _rng(cfg.seed, 15, i)
        c = int(r.integers(cfg.num_cameras))
        ident = _identity(cfg.seed, 100_000 + i)  # nobody in train or test
        return (*render_scene(ident, cams[c], cfg, r)[:2], c)

    return write_generated(out_dir, cfg, render, distractor, marker_text(cfg), MARKER)


def marker_text(cfg: SceneConfig) -> str:
    return marker_json(cfg, GENERATOR_VERSION, generator=GENERATOR)


def build_synthetic_scenes(root="data", verbose: bool = True, **kw):
    """Load <root>/synthetic_scenes, generating it first if it is missing or was generated with
    other parameters (keyword arguments: the fields of SceneConfig)."""
    cfg = make_config(SceneConfig, NAME, kw)
    return build_generated(root, cfg, DIRNAME, MARKER, marker_text(cfg),
                           lambda out: generate_scenes(out, cfg), NAME, verbose)


def contact_sheet(paths: Sequence[str], out, cols: int = 8, scale: int = 2) -> Path:
    """A PNG of the images ``paths`` side by side, each with its mask's outline in green
    (``docs/figures/synthetic_scenes.png`` is one of the default set)."""
    from PIL import Image, ImageFilter

    tiles = []
    for p in paths:
        img = np.asarray(Image.open(p).convert("RGB")).copy()
        m = Image.open(mask_path(p)).convert("L")
        edge = (np.asarray(m.filter(ImageFilter.MaxFilter(3))) > 0) & (
            np.asarray(m.filter(ImageFilter.MinFilter(3))) == 0)
        img[edge] = (0, 255, 0)
        tiles.append(Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale),
                                                 Image.NEAREST))
    w, h = tiles[0].size
    rows = (len(tiles) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (w + 4) + 4, rows * (h + 4) + 4), (255, 255, 255))
    for i, t in enumerate(tiles):
        sheet.paste(t, (4 + (i % cols) * (w + 4), 4 + (i // cols) * (h + 4)))
    out = Path(out)
    from ..fileio import atomic_write

    fmt = Image.registered_extensions().get(out.suffix.lower(), "PNG")
    atomic_write(out, lambda f: sheet.save(f, format=fmt), what="figure")
    return out
