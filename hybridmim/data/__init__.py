"""The data layer, by stage (docs/contracts.md shows the layout):

- ``sources/`` — download, extraction, per-source conversion and acquisition into the canonical
  layout (data/raw/<dataset>);
- ``layout.py`` and ``integrity.py`` — that canonical layout (MSD-style) and its strict check;
- ``prepare/`` — fingerprint, preprocessing, splits and the pretraining cache (data/processed/);
- ``intensity.py`` and ``loading.py`` — windows applied when reading, torch datasets;
- ``demo.py`` — the embedded demo's generated phantoms; ``pipeline.py`` — the steps the workflow
  runs; ``versioning.py`` — DVC stages over data/.

What a dataset *is* (modality, labels, recipes, source, windows) is configuration and lives in
hybridmim.dataset_catalog, which imports nothing from here. Nothing is imported eagerly: the
Snakefile parses the config on every run and must not pay for torch or MONAI.
"""
