"""Exploration: ``annotation_her2st.py`` with every model replaced by an average of ``--members`` SpotClassifiers.

Each member has its own initialisation and minibatch seed and its own warm start; class
probabilities are averaged (selection and scoring use the average; the latent space for the
diversity step is member 0's). Applies to every rule, random included. Not a library feature.

    OMP_NUM_THREADS=1 STIMG_BENCH_CACHE=/work/cache/bench_embed python benchmarks/annotation_ensemble_her2st.py \\
        --members 5 --rules least_confidence random --seeds 0 1 2 3 4 --rounds 6 \\
        --out benchmarks/results/annotation_her2st_ensemble5
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import stimg.models._classifier as clf  # noqa: E402

_Base = clf.SpotClassifier


class EnsembleClassifier(_Base):
    """Average of ``n_members`` independently initialised SpotClassifier modules (exploration only)."""

    n_members = 5

    def train(self, max_epochs=None, *, seed=None, **kw):  # noqa: D102
        seed = self.seed if seed is None else int(seed)
        first = not self.is_trained_
        members = [None] * self.n_members if first else self.members_
        out = []
        for k, module in enumerate(members):
            if module is not None:
                self.module = module
            self.is_trained_ = not first
            super().train(max_epochs, seed=seed + 1000 * k, warm_start=not first, **kw)
            out.append(self.module)
        self.members_ = out
        self.module = out[0]

    def _forward(self, adata, what):
        if what != "proba":
            return super()._forward(adata, what)
        probas = []
        for m in self.members_:
            self.module = m
            probas.append(super()._forward(adata, what))
        self.module = self.members_[0]
        return np.mean(probas, axis=0)


if __name__ == "__main__":
    i = sys.argv.index("--members") if "--members" in sys.argv else None
    if i is not None:
        EnsembleClassifier.n_members = int(sys.argv[i + 1])
        del sys.argv[i:i + 2]
    clf.SpotClassifier = EnsembleClassifier
    import annotation_her2st

    annotation_her2st.main()
