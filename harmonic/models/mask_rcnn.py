"""Mask R-CNN with the Harmonic loss on the box head; the mask loss is torchvision's, unchanged.

The detector is torchvision's ``MaskRCNN`` with :class:`harmonic.models.faster_rcnn.HarmonicRoIHeads`
(the Faster R-CNN RoI heads subclass, reused, not copied): with ``loss="harmonic"`` the box head's
``loss_classifier`` / ``loss_box_reg`` are the Harmonic loss exactly as in Faster R-CNN (see
:mod:`harmonic.models.faster_rcnn`), the RPN keeps torchvision's losses [D], and

* the **mask loss** ``loss_mask`` is torchvision's ``maskrcnn_loss`` (binary cross-entropy of the
  ground-truth class's 28 x 28 mask logits against the target mask cropped to each positive RoI and
  resized, averaged), in ``torchvision.models.detection.roi_heads``, called as it stands; the Harmonic
  loss does not touch it [D]: the paper's loss pairs a classification and a localization term, and nothing
  recovered says the mask term was reweighted;
* mask inference is torchvision's ``maskrcnn_inference`` (the sigmoid of the detected class's mask),
  pasted into the image by torchvision's transform: eval outputs gain ``masks`` [n, 1, H, W], probabilities
  in the input image's pixels.

``loss="baseline"`` is torchvision's ``MaskRCNN`` losses exactly. Targets need ``masks`` (uint8 [N, H, W],
one per box, in the image's pixels; :class:`harmonic.data.CocoDetection` gives them with ``masks=True``).

The paper reports Mask R-CNN R50-FPN 38.5 -> 40.1 box AP and X101-FPN 42.3 -> 44.0 on COCO test-dev with
its method [R]; no mask AP of the method was recovered [R].

Layout [D]: the mask head's width follows ``fpn_channels`` (four 3x3 convolutions and the 2x deconvolution
of that width); at torchvision's 256 it is torchvision's own layout (``maskrcnn_resnet50_fpn``).
"""

from __future__ import annotations

from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor

from harmonic.models.common import HarmonicTransform
from harmonic.models.faster_rcnn import HarmonicRoIHeads
from harmonic.models.head_loss import HarmonicOptions

__all__ = ["HarmonicMaskRCNN"]

#: torchvision's box head (TwoMLPHead) output width, the box predictor's input
_BOX_REPRESENTATION = 1024


class HarmonicMaskRCNN(MaskRCNN):
    """torchvision's ``MaskRCNN`` (``num_classes`` = K, without background: the box and mask predictors get
    K + 1 outputs as torchvision expects) with :class:`HarmonicRoIHeads` carrying torchvision's mask branch.

    ``kwargs`` go to ``MaskRCNN`` (sizes, anchors, post-processing), except the predictors and the mask
    head, built here: the mask head ``mask_channels`` wide (torchvision: 256).
    """

    def __init__(
        self, backbone, num_classes: int, *, options: HarmonicOptions | None = None, mask_channels: int = 256, **kwargs
    ) -> None:
        for name in ("box_predictor", "mask_head", "mask_predictor"):
            if name in kwargs:
                raise ValueError(f"HarmonicMaskRCNN builds its own {name}; do not pass it")
        super().__init__(
            backbone, None,
            box_predictor=FastRCNNPredictor(_BOX_REPRESENTATION, num_classes + 1),
            mask_head=MaskRCNNHeads(backbone.out_channels, (mask_channels,) * 4, 1),
            mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels, num_classes + 1),
            **kwargs,
        )
        self.roi_heads = HarmonicRoIHeads.from_roi_heads(self.roi_heads, options)
        self.transform = HarmonicTransform.from_transform(self.transform, num_classes)
