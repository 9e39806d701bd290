"""Named grids of training runs, each one execution of notebook ``03_train_eval`` through papermill.

``make sweep SWEEP=<name>`` (``python -m harmonic reproduce --sweep <name>``) runs every (variant, seed)
of a grid. A run whose ``metrics.json`` exists is skipped, so an interrupted sweep resumes where it
stopped; a run that fails is reported with the path of its executed notebook and the others go on. The
sweep's status is written to ``results/sweeps/<name>.json``.

Variants change only the loss options of the detector: the protocol is that the model, assigner,
schedule and data stay the same, and only the loss changes. A sweep over several architectures may give
each architecture its own detector settings (``arch_overrides``), the same for all of its variants.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harmonic.utils.files import atomic_write_json

# Loss options per variant. Keys are DetectorConfig fields. Provenance of each in harmonic/models.
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {"loss": "baseline"},
    # the paper's ablation rows (Faster R-CNN in the paper [R]; cumulative)
    "harmonic": {"loss": "harmonic", "hiou": False},
    "harmonic_tc": {"loss": "harmonic", "hiou": False, "tc_weight": 1.0},
    "harmonic_tc_iou": {"loss": "harmonic", "hiou": True, "hiou_gamma": 0.0, "tc_weight": 1.0},
    "harmonic_tc_hiou": {"loss": "harmonic", "hiou": True, "hiou_gamma": 0.8, "tc_weight": 1.0},
    # the method as the reproduction compares it: Harmonic + HIoU (alpha 1.5, gamma 0.8 [R])
    "harmonic_hiou": {"loss": "harmonic", "hiou": True},
    "harmonic_hiou_detached": {"loss": "harmonic", "hiou": True, "detach_factors": True},
    "harmonic_hiou_gt_prob": {"loss": "harmonic", "hiou": True, "beta_c_source": "gt_prob"},
    "harmonic_hiou_gt_ce": {"loss": "harmonic", "hiou": True, "beta_c_source": "gt_ce"},
    # attribution controls [D]: the IoU-type term without the harmonic factors (focal + L1 + 1.5 HIoU, and the
    # same with torchvision's GIoU loss in HIoU's place): does any IoU-type term move AP here, or HIoU as built?
    "baseline_hiou": {"loss": "harmonic", "hiou": True, "factors": False},
    "baseline_giou": {"loss": "harmonic", "hiou": True, "iou_loss": "giou", "factors": False},
    # ... and the regression's gradient scale without an IoU-type term: focal + 2 L1. The 1.5 HIoU term grows
    # the regression head's gradient by 1.5x (fresh head) to 1.9-2.2x (trained), tools/grad_scale.py: does a
    # step that much larger alone stall the regression? [D]
    "baseline_l1x2": {"loss": "harmonic", "hiou": False, "factors": False, "box_weight": 2.0},
    # Harmonic + HIoU with one factor applied: (1 + beta_r) on the classification term only, or (1 + beta_c)
    # on the localization term only (the other term unweighted): which term the factors' cost comes from [D]
    "harmonic_hiou_cls_factor": {"loss": "harmonic", "hiou": True, "factor_terms": "cls"},
    "harmonic_hiou_box_factor": {"loss": "harmonic", "hiou": True, "factor_terms": "box"},
    # the default study's two main variants with GroupNorm in the head towers (torchvision's v2 RetinaNet head):
    # the regression tower of torchvision's v1 head (conv + ReLU) loses its last layer's units when the box loss's
    # gradient grows (tools/grad_scale.py dead_channels) [D]; does the comparison change where they cannot die?
    "baseline_gn": {"loss": "baseline", "head_norm": "gn"},
    "harmonic_hiou_gn": {"loss": "harmonic", "hiou": True, "head_norm": "gn"},
    "harmonic_hiou_detached_gn": {"loss": "harmonic", "hiou": True, "detach_factors": True, "head_norm": "gn"},
    # comparison losses, RetinaNet only: our implementation of other papers' formulas [D]
    # (GFL's quality focal loss, VarifocalNet's varifocal loss, IoU-balanced weights; harmonic.losses.comparison)
    "qfl": {"loss": "qfl"},
    "varifocal": {"loss": "varifocal"},
    "iou_balanced": {"loss": "iou_balanced"},
}
for _g in (0.2, 0.4, 0.6, 0.8, 1.0):
    VARIANTS[f"hiou_gamma_{_g}"] = {"loss": "harmonic", "hiou": True, "hiou_gamma": _g}
for _a in (0.5, 1.0, 1.5, 2.0):
    VARIANTS[f"hiou_alpha_{_a}"] = {"loss": "harmonic", "hiou": True, "hiou_weight": _a}


@dataclass(frozen=True)
class Sweep:
    name: str
    variants: tuple[str, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    archs: tuple[str, ...] = ("retinanet",)
    parameters: dict[str, Any] = field(default_factory=dict)  # extra notebook parameters
    description: str = ""
    # per architecture: DetectorConfig fields over the preset's (the notebook's detector_overrides)
    arch_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def runs(self) -> list[tuple[str, dict[str, Any]]]:
        """(run name, notebook parameters) for every arch x seed x variant.

        Seed-major order: the variants of one seed come together, so an interrupted or partial sweep
        already holds complete pairs for the paired comparison.
        """
        out = []
        for arch, seed, variant in itertools.product(self.archs, self.seeds, self.variants):
            prefix = "" if self.archs == ("retinanet",) else f"{arch}-"
            name = f"{self.name}-{prefix}{variant}-s{seed}"
            params = dict(self.parameters)
            params.update(
                run_name=name, variant=variant, seed=seed, sweep=self.name, arch=arch, loss_options=VARIANTS[variant]
            )
            if arch in self.arch_overrides:
                params["detector_overrides"] = dict(self.arch_overrides[arch])
            out.append((name, params))
        return out


#: the test bed every loss sweep shares (docs/testbed.md): the shapes-study data, RetinaNet R18-FPN with a
#: shapes-pretrained backbone, 2400 iterations; four seeds, so the sweeps' runs pair by seed
TEST_BED: dict[str, Any] = {"preset": "shapes-study"}
TEST_BED_SEEDS = (0, 1, 2, 3)
#: twice the test bed's length, the shapes-study decays scaled to it (the long sweeps' train_overrides)
LONG_SCHEDULE: dict[str, Any] = {"max_iters": 4800, "lr_steps": [3682, 4478]}
#: Faster R-CNN on the test bed (the faster_rcnn sweeps' arch_overrides): one anchor of 2 x stride per level
#: and the training sampling sized to its images (the faster_rcnn_ablation sweep's comment says why)
FASTER_RCNN_TEST_BED: dict[str, dict[str, Any]] = {"faster_rcnn": {
    "anchor_sizes": [[8], [16], [32], [64], [128]], "rpn_pre_nms_top_n_train": 1000, "rpn_post_nms_top_n_train": 500,
    "box_batch_size_per_image": 128}}

SWEEPS: dict[str, Sweep] = {
    s.name: s
    for s in (
        # what `make reproduce` runs: the method with its factors differentiated through and detached
        # against the baseline (seed-major: complete pairs first). The sweeps after it add only variants it
        # lacks: their runs pair with its baseline by seed, and each variant is run once, so a report over
        # several of them (notebook 05's `sweeps`) pairs every run exactly once.
        Sweep("default", ("baseline", "harmonic_hiou", "harmonic_hiou_detached"), seeds=TEST_BED_SEEDS,
              parameters=TEST_BED,
              description="make reproduce: baseline vs Harmonic + HIoU (factors through and detached), RetinaNet "
              "R18-FPN with a shapes-pretrained backbone on the shapes-study data"),
        # which part of the method moves AP, and does any IoU-type term do the same here?
        Sweep("attribution", ("harmonic", "baseline_hiou", "baseline_giou", "baseline_l1x2"), seeds=TEST_BED_SEEDS,
              parameters=TEST_BED,
              description="Harmonic without HIoU; focal + L1 + 1.5 HIoU without factors; focal + L1 + 1.5 GIoU "
              "(torchvision's) without factors; focal + 2 L1 (the box term's weight alone)"),
        # is the loss of Harmonic + HIoU the dying regression tower? The same pair with GroupNorm heads
        Sweep("head_norm", ("baseline_gn", "harmonic_hiou_gn", "harmonic_hiou_detached_gn"), seeds=TEST_BED_SEEDS,
              parameters=TEST_BED,
              description="baseline and Harmonic + HIoU (factors through and detached) with GroupNorm in RetinaNet's "
              "head towers (torchvision's v2 head), where the v1 head's regression units died"),
        # the factors' cost given HIoU (harmonic_hiou against baseline_hiou), one term at a time
        Sweep("factor_terms", ("harmonic_hiou_cls_factor", "harmonic_hiou_box_factor"), seeds=TEST_BED_SEEDS,
              parameters=TEST_BED,
              description="Harmonic + HIoU with (1 + beta_r) on the classification term only, and with (1 + beta_c) "
              "on the localization term only (the other term unweighted)"),
        # the HIoU weight as a dose-response: alpha 0 is the attribution's `harmonic`, 1.5 the default's
        # `harmonic_hiou` (1.5 reported best [R])
        Sweep("alpha", tuple(f"hiou_alpha_{a}" for a in (0.5, 1.0, 2.0)), seeds=TEST_BED_SEEDS, parameters=TEST_BED,
              description="Harmonic + HIoU with the HIoU weight alpha 0.5, 1 and 2 (0 and 1.5: attribution, default)"),
        # the HIoU focusing parameter: 0.8 is the default's `harmonic_hiou` (0.8 reported best [R])
        Sweep("gamma", tuple(f"hiou_gamma_{g}" for g in (0.2, 0.4, 0.6, 1.0)), seeds=TEST_BED_SEEDS, parameters=TEST_BED,
              description="HIoU focusing parameter gamma 0.2 to 1 (0.8: the default study)"),
        # the paper's ablation rows [R] on RetinaNet: + task-contrasting, + IoU loss, HIoU instead of IoU (the
        # baseline and `harmonic` rows: default and attribution)
        Sweep("ablation", ("harmonic_tc", "harmonic_tc_iou", "harmonic_tc_hiou"), seeds=TEST_BED_SEEDS, parameters=TEST_BED,
              description="the paper's ablation rows [R] on RetinaNet (baseline and + Harmonic: default, attribution)"),
        Sweep("beta_c", ("harmonic_hiou_gt_prob", "harmonic_hiou_gt_ce"), seeds=TEST_BED_SEEDS, parameters=TEST_BED,
              description="beta_c of the sigmoid head from the ground-truth probability instead of the focal loss, "
              "and the consistent cross-entropy (the same -log sigmoid(x_gt) in the factor and in its term)"),
        Sweep("comparison", ("qfl", "varifocal", "iou_balanced"), seeds=TEST_BED_SEEDS, parameters=TEST_BED,
              description="the quality focal, varifocal and IoU-balanced losses [D], each a loss-only swap in the "
              "same RetinaNet (against default's baseline and Harmonic + HIoU)"),
        # the default study at twice the length, outside make reproduce's budget: about 12 minutes a run on the
        # 2-core bfloat16 CPU, where the test-bed runs of that length (docs/testbed.md, the frontier) gave the
        # baseline about twice the AP, detections scoring above 0.5 and few positives with y > 1.2785 [D]. Its
        # own baseline: report it alone (make reproduce PROFILE=long: notebooks 04 and 05 into results/long)
        Sweep("long", ("baseline", "harmonic_hiou", "harmonic_hiou_detached"), seeds=TEST_BED_SEEDS,
              parameters={**TEST_BED, "train_overrides": LONG_SCHEDULE},
              description="the default study at 4800 iterations (the shapes-study decays scaled to the length)"),
        # the paper's ablation detector [R]: softmax cross-entropy makes beta_c = p exactly (Eq. 4). Its RPN
        # and RoI heads on the same backbone, data and schedule; one anchor of 2 x stride per FPN level
        # (P2-P6, strides 4-64), the test bed's rule for its objects of 40-112 px [D]. Sampling sized to images of
        # 160 px with a few objects [D]: 1000 proposals per level before the RPN's NMS and 500 per image after it,
        # 128 RoIs per image for the box head's loss (torchvision: 2000, 2000, 512; Fast R-CNN sampled 64 per
        # image [R]). One step of Harmonic on one thread in bfloat16 (random-init ResNet-18, batch 2): 0.50 s with
        # torchvision's sampling, 0.22 s with this one, so the 20 runs take about two hours two at a time, not five
        Sweep("faster_rcnn_ablation", ("baseline", "harmonic", "harmonic_tc", "harmonic_tc_iou", "harmonic_tc_hiou"),
              seeds=TEST_BED_SEEDS, archs=("faster_rcnn",), parameters=TEST_BED,
              arch_overrides=FASTER_RCNN_TEST_BED,
              description="the paper's ablation rows [R] on Faster R-CNN R18-FPN on the test bed"),
        # the paper's whole method against the baseline on Faster R-CNN at twice the length (4800 iterations,
        # the long sweep's schedule), where the baseline is further from its start: does the ablation's verdict
        # at 2400 iterations hold as the detector trains longer? Its own baseline (make reproduce
        # PROFILE=faster_rcnn_long: notebooks 04 and 05 into results/faster_rcnn_long). Six seeds: at four, three
        # pairs agreed within 0.3 AP and one differed by 3.0, which left the interval too wide to decide [D]
        Sweep("faster_rcnn_long", ("baseline", "harmonic_tc_hiou"), seeds=(0, 1, 2, 3, 4, 5), archs=("faster_rcnn",),
              parameters={**TEST_BED, "train_overrides": LONG_SCHEDULE},
              arch_overrides=FASTER_RCNN_TEST_BED,
              description="baseline vs the paper's whole method (Harmonic + TC + HIoU) on Faster R-CNN R18-FPN, "
              "4800 iterations"),
        # the data lever alone: faster_rcnn_long's runs on ten times the training images (shapes-study-large,
        # whose first 600 training and 150 validation images are shapes-study's). After 4800 iterations that
        # sweep's baseline scored 57.8 AP on its 600 training images and 29.8 on validation: it overfits [D].
        # Validation on 600 images, four times as many, and the first 150 of them are the other sweep's
        Sweep("faster_rcnn_data", ("baseline", "harmonic_tc_hiou"), seeds=TEST_BED_SEEDS, archs=("faster_rcnn",),
              parameters={**TEST_BED, "train_overrides": {**LONG_SCHEDULE, "dataset": "shapes-study-large"}},
              arch_overrides=FASTER_RCNN_TEST_BED,
              description="faster_rcnn_long on shapes-study-large: 6000 training images instead of 600, 600 "
              "validation images instead of 150"),
        # the length lever on the larger split, where training and validation AP agree (35.6 against 33.5 at
        # 4800 iterations [D]): faster_rcnn_data's pair at twice its length (38-46 minutes a run here, two at
        # a time). Its baseline meets the AP target (46.5 ± 0.6 AP, AP50 71.7, 4 seeds [D]), and the pair
        # decides: the whole method -1.8 AP [-2.8, -0.7], minimum detectable effect 1.4 (docs/testbed.md)
        Sweep("faster_rcnn_data_long", ("baseline", "harmonic_tc_hiou"), seeds=TEST_BED_SEEDS, archs=("faster_rcnn",),
              parameters={**TEST_BED, "train_overrides": {"max_iters": 9600, "lr_steps": [7364, 8956],
                                                          "dataset": "shapes-study-large"}},
              arch_overrides=FASTER_RCNN_TEST_BED,
              description="faster_rcnn_data at 9600 iterations: baseline vs Harmonic + TC + HIoU, Faster R-CNN "
              "R18-FPN on shapes-study-large"),
        # the former default study: RetinaNet R18-FPN from scratch on the harder shapes data, 3000 iterations
        Sweep("scratch", ("baseline", "harmonic_hiou"), seeds=(0, 1, 2), parameters={"preset": "shapes-cpu"},
              description="baseline vs Harmonic + HIoU, RetinaNet R18-FPN from scratch on the shapes data"),
        # make reproduce PROFILE=quick: the same notebooks in a few minutes, a first look
        Sweep("quick", ("baseline", "harmonic_hiou"), seeds=(0,), parameters={"preset": "shapes-quick"},
              description="make reproduce PROFILE=quick: baseline vs Harmonic + HIoU, 800 iterations, one seed"),
        # the same plumbing with a tiny schedule (tests)
        Sweep("smoke", ("baseline", "harmonic_hiou"), seeds=(0,), parameters={"preset": "shapes-tiny"},
              description="tests: the default profile's plumbing in seconds"),
        # the paper's setting on COCO (make reproduce PROFILE=coco COCO_ROOT=...)
        Sweep("coco", ("baseline", "harmonic_hiou"), seeds=(0,),
              parameters={"preset": "coco-1x", "nproc_per_node": "auto"},
              description="COCO 2017, RetinaNet R50-FPN, 1x schedule, every GPU of the machine"),
        # the engine's fast path against float32, same runs otherwise (the accuracy check of make bench)
        Sweep("precision_fp32", ("baseline",), seeds=(0, 1),
              parameters={"preset": "shapes-cpu", "train_overrides": {"amp": "off", "channels_last": False}},
              description="the from-scratch study's baseline in float32 (the reference of the precision check)"),
        Sweep("precision_bf16", ("baseline",), seeds=(0, 1),
              parameters={"preset": "shapes-cpu", "train_overrides": {"amp": "bf16", "channels_last": True}},
              description="the from-scratch study's baseline with bfloat16 autocast and channels_last"),
        # PASCAL VOC07+12 (make reproduce PROFILE=voc VOC_ROOT=...); the paper's VOC settings are not
        # known [R], so the recipe is a standard one [D] (harmonic.engine.config PRESETS["voc"])
        Sweep("voc", ("baseline", "harmonic_hiou"), seeds=(0,), parameters={"preset": "voc", "nproc_per_node": "auto"},
              description="PASCAL VOC07+12 trainval -> VOC07 test, RetinaNet R50-FPN, every GPU of the machine"),
        # the default preset's anchors are RetinaNet's (3 sizes, 5 levels): FCOS and SSD keep their own
        # [D]; RefineDet gets one anchor of 2 x stride on its 4 levels, the preset's rule for small
        # shapes on 160 px images (the RefineDet paper: 4 x stride on 320 / 512 px images [R]) [D]
        Sweep("detectors", ("baseline", "harmonic_hiou"), archs=("retinanet", "fcos", "faster_rcnn", "mask_rcnn", "ssd", "refinedet"),
              parameters={"preset": "shapes-cpu"},
              description="the loss on each detector family, from scratch on the shapes data",
              arch_overrides={"fcos": {"anchor_sizes": None}, "ssd": {"anchor_sizes": None},
                              "refinedet": {"anchor_sizes": [[16], [32], [64], [128]]}}),
    )
}


def run_sweep(
    sweep: Sweep,
    results_dir: str | Path,
    run_notebook: Callable[[str, dict[str, Any], Path], Any],
    *,
    jobs: int = 1,
    threads: int | None = None,
) -> dict[str, Any]:
    """Execute every run of ``sweep`` not already finished with ``run_notebook(stem, parameters, output)``
    (:func:`harmonic.experiments.notebooks.run_notebook`); return (and write) the status of each.

    ``jobs``: how many runs execute at once (each in its own kernel, in the sweep's seed-major order), each
    with ``threads`` torch threads (``train_overrides["num_threads"]``, unless the sweep sets it) when given.
    The status file is rewritten after every run, so an interrupted sweep leaves a record of what finished.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
    results_dir = Path(results_dir)
    status: dict[str, Any] = {"sweep": sweep.name, "description": sweep.description, "runs": {}}
    lock = threading.Lock()
    pending = []
    for name, params in sweep.runs():
        run_dir = results_dir / "runs" / name
        if (run_dir / "metrics.json").is_file():
            status["runs"][name] = {"status": "skipped (finished)", "folder": str(run_dir)}
            continue
        params = dict(params, results_dir=str(results_dir))
        if threads is not None:
            params["train_overrides"] = {"num_threads": threads, **params.get("train_overrides", {})}
        pending.append((name, params, run_dir))

    def execute(name: str, params: dict[str, Any], run_dir: Path) -> None:
        notebook = run_dir / "03_train_eval.ipynb"
        try:
            run_notebook("03_train_eval", params, notebook)
            outcome = {"status": "done", "folder": str(run_dir)}
        except Exception as err:  # noqa: BLE001 - a failed run must not stop the others
            partial = getattr(err, "partial_path", None) or notebook
            outcome = {"status": "failed", "notebook": str(partial), "error": f"{type(err).__name__}: {err}"[:2000]}
            print(f"[sweep {sweep.name}] run {name} failed; see {partial}: {type(err).__name__}")
        with lock:
            status["runs"][name] = outcome
            atomic_write_json(results_dir / "sweeps" / f"{sweep.name}.json", status)

    if jobs == 1:
        for item in pending:
            execute(*item)
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:  # each run is its own kernel process
            list(pool.map(lambda item: execute(*item), pending))
    atomic_write_json(results_dir / "sweeps" / f"{sweep.name}.json", status)
    return status


def failed_runs(status: dict[str, Any]) -> list[str]:
    return [name for name, s in status["runs"].items() if s["status"] == "failed"]
