"""TRL's SFTTrainer with the two things the sft stage needs on top (settings come from SftParams).

- `l2_to_pretrained` (alpha > 0): loss + alpha * sum((theta - theta_0)^2) over the trainable weights,
  theta_0 being their values when training started: the L2-SP regulariser against catastrophic
  forgetting. The penalty is logged as `l2_to_pretrained` (zero at step 0, growing as weights move).
- `plain_forward`: compute the loss through the model's own forward. TRL's fused LM-head path calls
  the backbone directly, which skips the virtual tokens peft's prefix tuning adds to the attention
  mask; the model's forward handles them. The labels are TRL's, so the loss is still on the
  response tokens only.
"""

from __future__ import annotations

import torch
from transformers import Trainer
from trl import SFTTrainer


class AlignflowSFTTrainer(SFTTrainer):
    def __init__(self, *args, l2_to_pretrained: float = 0.0, plain_forward: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.l2_to_pretrained = l2_to_pretrained
        self.plain_forward = plain_forward
        self.anchor = (
            [(p, p.detach().clone()) for p in self.model.parameters() if p.requires_grad] if l2_to_pretrained > 0 else []
        )

    def l2_distance(self) -> torch.Tensor:
        """sum((theta - theta_0)^2) over the trainable weights."""
        return sum(((p - p0) ** 2).sum() for p, p0 in self.anchor)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.plain_forward:
            inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "labels")}
            result = Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        else:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not self.anchor:
            return result
        loss, outputs = result if return_outputs else (result, None)
        penalty = self.l2_to_pretrained * self.l2_distance()
        self._metrics["train" if model.training else "eval"]["l2_to_pretrained"].append(penalty.item())
        loss = loss + penalty
        return (loss, outputs) if return_outputs else loss
