"""`distill(config) -> DistillResult`: train a smaller student to imitate a teacher, keep the best, save it.

The student is made from the teacher (see `workbench.distill.students`: structured pruning, fewer layers, or an
existing smaller model), then trained on text with

    loss = (1 − α) · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)) + α · CE(z_s, next token)

per token position (mean over the batch's positions), where z_t, z_s are the teacher's and the student's
logits, T the temperature and α `ce_weight` (Hinton et al., 2015: the T² keeps the gradient of the soft term
on the scale of the hard one as T changes). Every `eval_every` steps the student's perplexity on the reference
corpus's held-out split (the windows a `workbench run` scores) is measured; the best checkpoint is kept in
memory, and at the end — or on a stop request, within one step — it is saved in Hugging Face format as
`student:NAME`, a model source for runs.
"""

from workbench.distill.config import CurvePoint, DistillConfig, DistillResult, DistillStart
from workbench.distill.train import distill, distill_loss

__all__ = ["DistillConfig", "DistillResult", "DistillStart", "CurvePoint", "distill", "distill_loss"]
