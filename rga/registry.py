"""The name tables: variants, backbones, RGA defaults, model rows and the paper's labels, once.

A leaf: it imports nothing. ``rga.config`` reads these names to describe a run (flags, presets,
checkpoint configs), ``rga.models`` and ``rga.attention`` map them to classes, ``rga.experiments``
and ``rga.visualize`` print their labels. A name means one thing everywhere:

* a **variant** (``VARIANTS``) is an attention design placed after the ResNet stages: the
  ``variant`` field of ``rga.config.ModelConfig`` and the first argument of ``rga.build_model``;
* a **backbone** (``BACKBONES``) is the ResNet trunk;
* a **row** (``MODEL_ROWS``, ``--model NAME``) is a line of the paper's tables: a variant plus every
  RGA option. Every variant is also a row under its own name.

To add an attention design: its class goes into ``rga.models.ATTENTIONS`` (or ``rga.attention``),
its name and label here (``DESIGN_LABELS``); it is then a variant, a row and a ``--model``.
"""
from __future__ import annotations

#: the backbone names; rga.models maps each to its ResNet blocks
BACKBONES = ("resnet50", "resnet18")

#: the defaults of the RGA module's options (what the paper's RGA-SC uses)
RGA_OPTIONS = dict(use_relation=True, use_original=True, embedding="asymmetric", cha_ratio=8, spa_ratio=8,
                   down_ratio=8, gate_init="public")
#: options that only set initial values: accepted (and ignored) by models without RGA modules, so
#: one preset can train every design; not part of a row (a --model NAME leaves them as they are)
INIT_OPTIONS = ("gate_init",)
#: the RGA options a row of the paper's tables fixes
ROW_OPTIONS = tuple(k for k in RGA_OPTIONS if k not in INIT_OPTIONS)

#: the other attention designs of the paper's Table 2 (rga/attention.py): name -> the paper's label
DESIGN_LABELS = {
    "cbam_s": "CBAM-S",
    "cbam_c": "CBAM-C",
    "cbam_cs": "CBAM-CS",
    "se": "SE",
    "fc_s": "FC-S",
    "fc_c": "FC-C",
    "fc_s_par_c": "FC-S//C",
    "nl": "NL",
    "snl": "SNL",
}

# The variant table: name -> None (no attention module: the baseline), or a dict of options; the key
# "attention" (default "rga") picks the module class from rga.models.ATTENTIONS, the other keys are
# its options. Each Table 2 design is a variant under its own name.
VARIANTS = {
    "baseline": None,
    "rga_s": dict(use_spatial=True, use_channel=False),
    "rga_c": dict(use_spatial=False, use_channel=True),
    "rga_sc": dict(order="sc"),
    "rga_cs": dict(order="cs"),
    "rga_s_par_c": dict(order="parallel"),
    **{name: dict(attention=name) for name in DESIGN_LABELS},
}

#: older spellings of variant names, still accepted by rga.build_model
VARIANT_ALIASES = {"rga": "rga_sc", "rgasc": "rga_sc", "rgas": "rga_s", "rgac": "rga_c", "rgacs": "rga_cs"}


def _row(variant, **options):
    return {"variant": variant, **{k: RGA_OPTIONS[k] for k in ROW_OPTIONS}, **options}


#: --model NAME: the variant and every RGA option, as in the paper's Tables 1 and 4. Each variant
#: is also a row under its own name (see model_rows()).
MODEL_ROWS = {
    # Table 1
    "baseline": _row("baseline"),
    "rga_s_wo_rel": _row("rga_s", use_relation=False),
    "rga_s_wo_ori": _row("rga_s", use_original=False),
    "rga_s": _row("rga_s"),
    "rga_c_wo_rel": _row("rga_c", use_relation=False),
    "rga_c_wo_ori": _row("rga_c", use_original=False),
    "rga_c": _row("rga_c"),
    "rga_s_par_c": _row("rga_s_par_c"),
    "rga_cs": _row("rga_cs"),
    "rga_sc": _row("rga_sc"),
    # Table 4 (RGA-SC with each embedding of the relations; "asymmetric" is rga_sc itself)
    "wo_embedding": _row("rga_sc", embedding="none"),
    "symmetric": _row("rga_sc", embedding="symmetric"),
    "asymmetric": _row("rga_sc", embedding="asymmetric"),
}


def model_rows() -> dict:
    """MODEL_ROWS plus a row for every variant of VARIANTS (read at call time: a variant added to
    the table is a row at once)."""
    out = dict(MODEL_ROWS)
    for name in VARIANTS:
        out.setdefault(name, _row(name))
    return out


#: row or variant name -> the paper's label
PAPER_LABELS = {
    "baseline": "Baseline", "rga_s": "RGA-S", "rga_c": "RGA-C", "rga_sc": "RGA-SC", "rga_cs": "RGA-CS",
    "rga_s_par_c": "RGA-S//C", **DESIGN_LABELS,
    "rga_s_wo_rel": "RGA-S w/o Rel.", "rga_s_wo_ori": "RGA-S w/o Ori.",
    "rga_c_wo_rel": "RGA-C w/o Rel.", "rga_c_wo_ori": "RGA-C w/o Ori.",
    "wo_embedding": "w/o Embedding", "symmetric": "Symmetric", "asymmetric": "Asymmetric (ours)",
}
