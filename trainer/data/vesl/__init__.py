"""VESL-style region pseudo-labels (CLOC, Chen et al. 2024): candidate phrases from each
caption (phrases.py), boxes for them from an open-vocabulary detector (detector.py), written
into shards resumably (label.py). The CLI is tools/label_regions.py; the SLURM array
slurm/label_regions.sh."""
