"""The README's code examples run as written, on inputs of the shapes they name."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block(after_heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index(after_heading):]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_the_loss_in_your_own_training_step():
    code = _python_block("## The loss in your own training step")
    generator = torch.Generator().manual_seed(0)
    xy = 50 * torch.rand(6, 2, generator=generator)
    target_boxes = torch.cat([xy, xy + 20], dim=1)
    boxes = (target_boxes + torch.randn(6, 4, generator=generator)).requires_grad_()
    logits = torch.randn(6, 5, generator=generator, requires_grad=True)
    namespace = {
        "logits": logits, "labels": torch.tensor([1, 2, 3, 4, 0, 1]), "boxes": boxes, "target_boxes": target_boxes,
        "offsets": torch.randn(6, 4, generator=generator, requires_grad=True), "target_offsets": torch.zeros(6, 4),
        "negatives_cls_loss": torch.tensor(0.5),
    }
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own example
    loss = namespace["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0.5
    assert logits.grad is not None and boxes.grad is not None and torch.isfinite(boxes.grad).all()
