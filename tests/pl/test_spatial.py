import matplotlib.pyplot as plt
import numpy as np
import pytest

import stimg as si


def test_spatial_continuous_and_categorical_multi_section():
    sd = si.datasets.synthetic(25, 6, n_sections=2)
    axs = si.pl.spatial(sd, "gene_1")
    assert len(axs) == 2
    coll = axs[0].collections[0]
    t = sd.tables["table"]
    s0 = (t.obs["library_id"] == "S0").to_numpy()
    np.testing.assert_allclose(np.asarray(coll.get_array()), t[s0, "gene_1"].X.toarray().ravel())
    ax = si.pl.spatial(sd, "cell_type", library_id="S1")
    assert ax.get_legend() is not None
    # true size: spot width in data units = diameter in pixels
    assert coll.get_offsets().shape == (25, 2)
    plt.close("all")


def test_spatial_anndata_layer_and_obsm():
    ad = si.datasets.synthetic(25, 6, as_anndata=True)
    ad.layers["log"] = np.log1p(ad.X.toarray())
    ax = si.pl.spatial(ad, "gene_2", layer="log", img=False)
    np.testing.assert_allclose(np.asarray(ax.collections[0].get_array()), ad.layers["log"][:, 2])
    si.pl.spatial(ad, "X_synthetic:3")
    with pytest.raises(KeyError, match="neither an obs column"):
        si.pl.spatial(ad, "nope")
    with pytest.raises(KeyError, match="layers"):
        si.pl.spatial(ad, "gene_2", layer="nope")
    plt.close("all")


def test_spatial_real_gene_over_he(c2_sdata):
    fig = si.pl.spatial(c2_sdata, "ERBB2", return_fig=True)
    assert fig.axes[0].images  # the H&E is drawn
    ds = si.pp.extract_patches(c2_sdata)
    axs = si.pl.patches(ds, n=6)
    assert sum(bool(a.images) for a in axs.ravel()) == 6
    plt.close("all")
