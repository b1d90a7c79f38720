"""Data-parallel training (DDP) on CPU with 2 processes (gloo): the model contract passes strategy through."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import stimg as si

_SCRIPT = textwrap.dedent('''
    import hashlib, json, os, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    import stimg as si

    out = sys.argv[1]
    a = si.datasets.synthetic(120, 6, image=False, as_anndata=True, seed=2)
    si.models.NBRegressor.setup_anndata(a, embedding_key="X_synthetic")
    m = si.models.NBRegressor(a, n_hidden=8, seed=0)
    m.train(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", batch_size=32, early_stopping=False,
            validation_size=0, progress=False)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    state = b"".join(v.detach().cpu().numpy().tobytes() for v in m.module.state_dict().values())
    res = {"rank": rank, "weights": hashlib.sha1(state).hexdigest(), "trained": bool(m.is_trained_)}
    if rank == 0:
        res["finite"] = bool(np.isfinite(m.predict(a).mean).all())
        m.save(os.path.join(out, "nb.stimg"))
    json.dump(res, open(os.path.join(out, f"rank{rank}.json"), "w"))
''')


@pytest.mark.slow
def test_nb_regressor_trains_with_ddp_on_two_cpu_processes(tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(si.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)  # Lightning writes lightning_logs/ into the working directory
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]  # Lightning launched rank 1
    assert ranks[0]["weights"] == ranks[1]["weights"]  # gradients were averaged: one model, two replicas
    assert ranks[0]["trained"] and ranks[0]["finite"]
    assert si.models.load_model(tmp_path / "nb.stimg").genes_ == [f"gene_{i}" for i in range(6)]
