"""Shared numpydoc parameter fragments (docrep)."""

from docrep import DocstringProcessor

_data = """data
    :class:`~spatialdata.SpatialData` with a table linked to spot circles and an image,
    or :class:`~anndata.AnnData` with scanpy's ``.uns['spatial']`` layout."""
_table_key = """table_key
    Key in :attr:`spatialdata.SpatialData.tables`; ignored for :class:`~anndata.AnnData` input."""
_library_id = """library_id
    Section(s) to use: a region name of the table (``library_key`` value). ``None`` uses all."""
_library_key = """library_key
    Column of ``.obs`` naming each spot's section. ``None`` uses the table's region key
    (SpatialData) or ``'library_id'`` when present (AnnData)."""
_image_key = """image_key
    Image element to read (SpatialData). ``None`` picks the highest-resolution image named
    after the section's spot element, or the only image."""
_inplace = """inplace
    If ``True``, write into the table; otherwise return the result and write nothing."""
_progress = """progress
    Show a progress bar. ``None`` uses :attr:`stimg.settings.progress`."""
_key_added = """key_added
    Where to write the result. ``None`` derives it from the inputs."""

# --- the model contract (stimg.models._base): shared by every trainable model's train()/save()/load()
_max_epochs = """max_epochs
    Maximum number of epochs (``None``: the model's default)."""
_train_indices = """train_indices
    Spots to train on: integer positions, a boolean mask, or the name of a boolean ``.obs``
    column (e.g. ``'si_sampled'`` from :func:`stimg.tl.active_sample`). ``None`` uses all spots."""
_accelerator = """accelerator
    ``'cpu'``, ``'gpu'``/``'cuda'``, ``'auto'``; ``None`` uses :attr:`stimg.settings.accelerator`."""
_devices = """devices
    Lightning ``devices`` (a count, a list of ids or ``'auto'``); ``None`` uses
    :attr:`stimg.settings.devices`. Several devices train with DDP (``strategy=`` in ``trainer_kwargs``)."""
_seed = """seed
    Random seed of initialisation, splits and minibatch order; ``None`` uses :attr:`stimg.settings.seed`."""
_save_path = """path
    File to write (one safetensors file with a JSON header; no pickle). Conventionally ``*.stimg``."""
_overwrite = """overwrite
    Replace an existing file."""

d = DocstringProcessor(
    max_epochs=_max_epochs,
    train_indices=_train_indices,
    accelerator=_accelerator,
    devices=_devices,
    seed=_seed,
    save_path=_save_path,
    overwrite=_overwrite,
    data=_data,
    table_key=_table_key,
    library_id=_library_id,
    library_key=_library_key,
    image_key=_image_key,
    inplace=_inplace,
    progress=_progress,
    key_added=_key_added,
)
