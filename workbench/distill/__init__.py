"""`distill(config) -> DistillResult`: train a smaller student to imitate a teacher, keep the best, save it.

The student is made from the teacher (see `workbench.distill.students`: structured pruning, fewer layers, or an
existing smaller model), then trained on text with

    loss = (1 − α) · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)) + α · CE(z_s, next token)

per token position (mean over the batch's positions), where z_t, z_s are the teacher's and the student's
logits, T the temperature and α `ce_weight` (Hinton et al., 2015: the T² keeps the gradient of the soft term
on the scale of the hard one as T changes). Every `eval_every` steps the student's perplexity on the reference
corpus's held-out split (the windows a `workbench run` scores) is measured; the best checkpoint is kept in
memory, and at the end — or on a stop request, within one step — it is saved in Hugging Face format as
`student:NAME`, a model source for runs. With `data_parallel` > 1 the training runs on that many ranks,
synchronously (gradients averaged every step) or asynchronously (local SGD: weights averaged every K steps); see
`workbench.distill.dp`.
"""

from workbench.distill.config import CurvePoint, DistillConfig, DistillParallel, DistillResult, DistillStart, RankStats
from workbench.distill.ranks import distill_on_ranks
from workbench.distill.train import Distillation, distill_loss
from workbench.events import OnEvent, never_stop, no_event
from workbench.execution import threads

__all__ = ["DistillConfig", "DistillResult", "DistillStart", "CurvePoint", "DistillParallel", "RankStats", "distill",
           "distill_loss"]


def distill(config: DistillConfig, on_event: OnEvent = no_event, should_stop=never_stop) -> DistillResult:
    """Build the student, distil it from the teacher, save the best checkpoint as `student:NAME`.

    Raises a WorkbenchError subclass with one sentence for anything the user can fix (ConfigError,
    ModelSourceError), before any weight is read where possible. With `data_parallel` > 1 the training runs on
    that many ranks (`workbench.distill.dp`), started like torchrun starts them.
    """
    if config.data_parallel > 1:
        return distill_on_ranks(config, on_event, should_stop)
    with threads(config.threads):
        job = Distillation(config, on_event, should_stop)
        job.prepare()
        job.load()
        job.train()
        return job.finish()
