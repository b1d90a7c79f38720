import numpy as np
import pandas as pd
import pytest

import stimg as si


@pytest.fixture
def adata():
    return si.datasets.synthetic(300, 8, n_sections=2, image=False, as_anndata=True, seed=2)


def test_classify_expression_learns_high_low(adata):
    from sklearn.metrics import roc_auc_score

    train = (adata.obs["library_id"] == "S0").to_numpy()
    adata.var["si_target"] = np.arange(8) < 4
    si.tl.classify_expression(adata, embedding_key="X_synthetic", train_mask=train)
    prob = adata.layers["si_high_prob"]
    assert prob.shape == adata.shape
    assert np.isnan(prob[:, 4:]).all() and np.all((prob[:, :4] >= 0) & (prob[:, :4] <= 1))
    y = np.log1p(adata.X.toarray()[~train, :4])
    labels = y > y.mean(0)
    aucs = [roc_auc_score(labels[:, j], prob[~train, j]) for j in range(4)]
    assert np.mean(aucs) > 0.75
    uns = adata.uns["si_high_prob"]
    assert uns["params"]["l1_ratio"] == 0.5 and uns["params"]["n_train"] == int(train.sum())
    assert uns["genes"] == list(adata.var_names[:4])
    df = si.tl.classify_expression(adata, embedding_key="X_synthetic", genes=["gene_0"], inplace=False)
    assert isinstance(df, pd.DataFrame) and df.shape == (adata.n_obs, 1)


def test_classify_expression_validates_before_writing(adata):
    with pytest.raises(KeyError, match="X_synthetic"):
        si.tl.classify_expression(adata, embedding_key="X_nope")
    with pytest.raises(KeyError, match="not in the table"):
        si.tl.classify_expression(adata, embedding_key="X_synthetic", genes=["nope"])
    with pytest.raises(ValueError, match="empty"):
        si.tl.classify_expression(adata, embedding_key="X_synthetic", train_mask=np.zeros(adata.n_obs, bool))
    assert "si_high_prob" not in adata.layers and "si_high_prob" not in adata.uns


def test_split_by_patient_and_leakage():
    adata = si.datasets.synthetic(20, 3, n_sections=4, image=False, as_anndata=True)
    adata.obs["patient"] = adata.obs["library_id"].map({"S0": "P0", "S1": "P0", "S2": "P1", "S3": "P2"}).astype(str)
    si.tl.split_by_patient(adata, test_patients=["P0"], val_patients=["P1"])
    split = adata.obs["si_split"]
    assert set(split[adata.obs["patient"] == "P0"]) == {"test"} and set(split[adata.obs["patient"] == "P2"]) == {"train"}
    assert adata.uns["si_split"]["test"] == ["P0"]
    si.tl.check_split_leakage(adata, "si_split")
    rnd = si.tl.split_by_patient(adata, test_size=0.34, seed=1, inplace=False)
    assert rnd.groupby(adata.obs["patient"].to_numpy(), observed=True).nunique().max() == 1
    # a section holding spots of two patients crosses splits → raises, writes nothing
    bad = adata.copy()
    del bad.obs["si_split"]
    bad.obs.loc[bad.obs_names[:5], "patient"] = "P2"  # 5 spots of section S0 re-labelled to patient P2
    with pytest.raises(ValueError, match="leakage"):
        si.tl.split_by_patient(bad, test_patients=["P0"])
    assert "si_split" not in bad.obs
    with pytest.raises(KeyError, match="P9"):
        si.tl.split_by_patient(adata, test_patients=["P9"])
    adata.obs.loc[adata.obs_names[0], "si_split"] = "train"  # spot of test patient P0 moved to train
    with pytest.raises(ValueError, match="leakage"):
        si.tl.check_split_leakage(adata, "si_split")


@pytest.mark.real
def test_split_her2st_leave_one_section_out(her2st_c_adata):
    a = her2st_c_adata.copy()
    si.tl.split_by_patient(a, patient_key="library_id", test_patients=["C4"])
    assert set(a.obs.loc[a.obs["library_id"] == "C4", "si_split"]) == {"test"}
    assert (a.obs["si_split"] == "train").sum() == (a.obs["library_id"] != "C4").sum()
    with pytest.raises(ValueError, match="no patient is left"):
        si.tl.split_by_patient(a, test_patients=["C"])
