"""Accuracy: perplexity and next-token accuracy on held-out text, agreement with the unmodified model."""

from __future__ import annotations

from workbench.measure.accuracy import greedy_match
from workbench.measure.tracker import Axis, Column, Tracker, register
from workbench.report import num
from workbench.result import AccuracyStats


@register
class AccuracyTracker(Tracker):
    """The engine's scores of the evaluation windows, plus the greedy match against the cached baseline."""

    section, stats, ready_after, order = "accuracy", AccuracyStats, "evaluate", 30
    axes = (Axis("perplexity", "perplexity", "", "lower", lambda s: s.perplexity),
            Axis("kl_vs_baseline", "KL vs unmodified", "nats", "lower", lambda s: s.kl_vs_baseline),
            Axis("top1_agreement", "top-1 agreement", "", "higher", lambda s: s.top1_agreement_vs_baseline),
            Axis("greedy_match", "greedy match", "", "higher", lambda s: s.greedy_match_vs_baseline),
            Axis("next_token_accuracy", "next-token accuracy", "", "higher", lambda s: s.next_token_accuracy))
    columns = (Column("perplexity", "REAL", lambda s: s.perplexity, "perplexity", num),
               Column("kl_vs_baseline", "REAL", lambda s: s.kl_vs_baseline, "KL", lambda v: num(v, ".4f")))

    def finish(self) -> AccuracyStats | None:
        run = self.run
        if run.scores is None:
            return None
        first = run.calls.first.rows[0] if run.calls.first and run.calls.first.rows else None
        match = greedy_match(first, run.baseline_greedy) if run.baseline_greedy and first is not None else None
        return AccuracyStats(**{**run.scores.__dict__, "greedy_match_vs_baseline": match})

    @classmethod
    def rows(cls, acc: AccuracyStats) -> list[tuple[str, str]]:
        return [("perplexity", num(acc.perplexity)), ("next-token accuracy", num(acc.next_token_accuracy, ".3f")),
                ("KL vs unmodified", num(acc.kl_vs_baseline, ".4f", " nats")),
                ("top-1 / greedy agreement", f"{num(acc.top1_agreement_vs_baseline, '.1%')} / "
                                             f"{num(acc.greedy_match_vs_baseline, '.1%')}")]
