"""Where a dataset comes from, up to the canonical layout in data/raw/<dataset>: download (resume,
checksums), safe archive extraction, per-source conversion (convert/), and acquire, which chooses
among them by the catalogue's ``source`` entry and runs the integrity check."""
