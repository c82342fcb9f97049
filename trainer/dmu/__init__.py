"""Diversified Multiplet Upcycling (CLIP-MoE, Zhang et al. 2024): a dense CLIP -> E-1 stages of
multistage contrastive learning in which only FFNs train, on batches of samples that the
previous stages could not tell apart -> one MoE whose expert e is stage e's FFN (expert 0 the
dense one) -> router training. ``python -m trainer.dmu --config configs/dmu_b16.yaml``; see
run.py for the phases and their files.

Modules: config (DMUConfig, torch-free), kmeans, labels (embedding + accumulated cluster
labels), assemble (FFN sets -> experts), run (the driver), superclass (Mobile V-MoE's
super-class map from class-name embeddings).
"""
