"""Adversarial evaluation of detectors: PGD/FGSM/APGD on the inputs against a detector's
score (`pgd`, `objectives`), attack settings (`spec`) and the clean-vs-attacked cells
(`evaluate`, `adversarial_ood`)."""
