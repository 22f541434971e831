"""From the canonical layout to what training reads, in data/processed/<dataset>: the dataset
fingerprint, preprocessing (orientation, spacing, normalisation, foreground crop), the seeded or
published splits, and the native-spacing pretraining cache."""
