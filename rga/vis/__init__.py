"""The paper's figures for your own runs: attention (Fig. 1), relations (Fig. 4), Grad-CAM (Fig. 5),
ranked lists and CMC; ``python -m rga.visualize`` is their command line (``rga.vis.cli``).

One module per figure: ``attention`` (the spatial maps and the foreground ratio), ``relation``
(R(i, :) and position invariance), ``gradcam``, ``ranks`` (the one ranked-sheet drawer, which
``rga.search`` uses too, and the CMC curve); ``inputs`` opens runs and images, ``drawing`` holds
the matplotlib helpers they share. The maps come from the models' own forward: every attention
module after a stage (``RGAModule`` or a Table 2 design of ``rga.attention``) has a
``keep_attention`` switch, and after a forward ``module.last_attention`` holds its maps.
Needs matplotlib (``pip install -e ".[vis]"``); Grad-CAM also needs ``grad-cam``.
"""
from .attention import attention_figure, attention_maps, cmd_attention, foreground_ratio, spatial_maps
from .drawing import FLAT, STRETCHES, figure_texts, map_range, overlay
from .gradcam import LogitsModel, cmd_gradcam, gradcam_figure, gradcam_maps, top_classes
from .inputs import dataset_images, load_images, open_model, open_models, run_label, stage_modules
from .ranks import BLUE, GREEN, GREY, RED, SheetStyle, cmd_ranks, plot_cmc, rank_sheet
from .relation import cmd_relation, default_targets, position_invariance, relation_figure, relation_maps

__all__ = ["open_model", "open_models", "run_label", "load_images", "dataset_images", "stage_modules",
           "attention_maps", "spatial_maps", "foreground_ratio", "attention_figure", "cmd_attention",
           "relation_maps", "position_invariance", "default_targets", "relation_figure", "cmd_relation",
           "LogitsModel", "top_classes", "gradcam_maps", "gradcam_figure", "cmd_gradcam",
           "rank_sheet", "SheetStyle", "plot_cmc", "cmd_ranks", "overlay", "map_range", "figure_texts",
           "FLAT", "STRETCHES", "GREEN", "RED", "GREY", "BLUE"]
