"""What the paper reports, as data, each entry with its provenance tag.

The main paper's tables were not available to this project; the numbers below are known only from
secondary sources and are tagged [R] (plausible, not verified). They are shown next to this project's
own results, never mixed with them. The setting differs (COCO, ResNet-50-FPN, ImageNet-pretrained
backbones, 1x schedule on GPUs) from the embedded default (a small generated dataset, from scratch, CPU).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reported:
    detector: str
    dataset: str
    metric: str
    baseline: float
    harmonic: float
    tag: str = "[R]"
    note: str = ""

    @property
    def gain(self) -> float:
        return round(self.harmonic - self.baseline, 3)


# COCO test-dev AP, baseline -> with the method [R].
MAIN_TABLE: tuple[Reported, ...] = (
    Reported("Faster R-CNN R50-FPN", "COCO test-dev", "AP", 37.5, 39.3),
    Reported("Mask R-CNN R50-FPN", "COCO test-dev", "AP", 38.5, 40.1),
    Reported("Mask R-CNN X101-FPN", "COCO test-dev", "AP", 42.3, 44.0, note="46.9 with multi-scale test [R]"),
    Reported("RetinaNet R50", "COCO test-dev", "AP", 36.1, 37.6),
    Reported("RefineDet512", "COCO test-dev", "AP", 36.4, 38.8),
)

# COCO val2017 ablation, Faster R-CNN R50-FPN, cumulative rows [R].
ABLATION: tuple[tuple[str, float], ...] = (
    ("baseline", 37.3),
    ("+ Harmonic", 38.3),
    ("+ task-contrasting", 38.5),
    ("+ plain IoU loss", 38.7),
    ("HIoU instead of IoU", 39.2),
)
ABLATION_TAG = "[R]"
# AP75 before and after the method in the ablation [R]; which rows the two numbers belong to is unclear
ABLATION_AP75: tuple[float, float] = (40.7, 42.7)
ABLATION_NOTE = (f"AP75 reported {ABLATION_AP75[0]} -> {ABLATION_AP75[1]} [R], row unclear; "
                 "best alpha = 1.5, gamma = 0.8 [R]")

# Mapping from the ablation rows to this project's sweep variants (same meaning, our setting).
ABLATION_VARIANTS: dict[str, str] = {
    "baseline": "baseline",
    "+ Harmonic": "harmonic",
    "+ task-contrasting": "harmonic_tc",
    "+ plain IoU loss": "harmonic_tc_iou",
    "HIoU instead of IoU": "harmonic_tc_hiou",
}
