"""Comparison data from the policy's own samples: the labeler-agreement ceiling."""

from __future__ import annotations

from rlhflab.stages.comparisons import agreement


def test_agreement_counts_untied_pairs_across_rows():
    same = [{"ranking": [0, 1, 2]}, {"ranking": [1, 0]}]
    assert agreement(same, same) == 1.0
    assert agreement(same, [{"ranking": [2, 1, 0]}, {"ranking": [0, 1]}]) == 0.0
    # pairs (0,1) and (0,2) agree, (1,2) flips; a tie group drops its pairs
    assert agreement([{"ranking": [0, 1, 2]}], [{"ranking": [0, 2, 1]}]) == round(2 / 3, 4)
    assert agreement([{"ranking": [0, 1, 2]}], [{"ranking": [[0, 1], 2]}]) == 1.0
