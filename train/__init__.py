"""Training module: EE24 domain-adaptive pre-training and CE24 fine-tuning (`python -m train ...`).

Runs from a checkout; imports capsule_batch (bundle, preprocessing, class sets), never the reverse.
Every run ends in a ModelBundle that `capsule-batch run` consumes.
"""
