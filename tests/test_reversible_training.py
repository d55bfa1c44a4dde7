"""Acceptance: a reversible speaker model trains in the lab to the same EER as vanilla.

Slow (minutes on a laptop CPU): both runs use the full default speaker configuration
(``Config.for_task("speaker")`` without MEMLAB_FAST: a small ResNet trained on 24 synthetic
speakers, EER on 12 unseen ones). Run with ``pytest -m slow tests/test_reversible_training.py``.

"Within noise": on this evaluation set (96 utterances of unseen speakers, 336 target trials)
the EER of one strategy moves by a few points from seed to seed, so the test asks that both
models learn (EER far below chance 0.5, accuracy far above chance 1/24) and that their EERs lie
within ``EER_TOLERANCE`` of each other.
"""

import pytest
import torch

from memlab.lab import Config, Experiment

EER_TOLERANCE = 0.08
EER_LEARNED = 0.35          # chance is 0.5; five seeds of either strategy: 0.22-0.29
ACC_LEARNED = 0.25          # chance is 1/24; five seeds: 0.38-0.56


def _final(memory: str, seed: int = 0) -> dict:
    exp = Experiment(Config.for_task("speaker", memory=memory, seed=seed))
    for rec in exp.run():
        pass
    return rec.metrics


@pytest.mark.slow
def test_reversible_trains_to_the_same_eer_as_vanilla(monkeypatch):
    monkeypatch.setenv("MEMLAB_FAST", "0")                 # the full default sizes
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        van = _final("vanilla")
        rev = _final("reversible")
    finally:
        torch.set_num_threads(n)
    print(f"vanilla {van}\nreversible {rev}")
    for name, m in (("vanilla", van), ("reversible", rev)):
        assert m["eer"] < EER_LEARNED, f"{name} did not learn: {m}"
        assert m["accuracy"] > ACC_LEARNED, f"{name} did not learn: {m}"
    assert abs(van["eer"] - rev["eer"]) <= EER_TOLERANCE, (van, rev)
