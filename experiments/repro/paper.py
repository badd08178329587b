"""The paper's numbers (section 5 and Appendix D.3), as data, for the report's side-by-side
tables. Values are ``(mean, std)`` as printed; accuracies in percent where the paper
prints percent (Tables 3, 4), as fractions where it prints fractions (Table 5).

The paper's datasets differ from ours (Stable Diffusion / Qwen2 finetunes against small
built-in analogues; see BUILD_NOTES.md, "Built-in datasets"): its numbers are the pattern to compare
with, not values to match.
"""

from __future__ import annotations

MODELS = ("mlp", "mlp_oalign", "mlp_svd", "mlp_dense", "glnet")
MODEL_NAMES = {
    "mlp": "MLP",
    "mlp_oalign": "MLP + O-Align",
    "mlp_svd": "MLP + SVD",
    "mlp_dense": "MLP + Dense",
    "glnet": "GL-net",
    # Peers (issue 14), not in the paper.
    "w2t": "W2T (not in paper)",
    "spectral": "Spectral (not in paper)",
    "glnet_seq": "GL-net-seq (not in paper)",
}

#: Table 2, CelebA-LoRA normalised CLIP score: train MSE, test MSE, Kendall's tau, R^2.
TABLE2 = {
    "mlp": {"train_mse": (0.047, 0.004), "test_mse": (0.988, 0.005), "tau": (0.226, 0.016), "r2": (0.333, 0.022)},
    "mlp_oalign": {"train_mse": (0.001, 0.001), "test_mse": (0.175, 0.006), "tau": (0.654, 0.004), "r2": (0.856, 0.004)},
    "mlp_svd": {"train_mse": (0.071, 0.003), "test_mse": (0.148, 0.005), "tau": (0.667, 0.008), "r2": (0.863, 0.006)},
    "mlp_dense": {"train_mse": (0.013, 0.002), "test_mse": (0.169, 0.011), "tau": (0.677, 0.006), "r2": (0.871, 0.005)},
    "glnet": {"train_mse": (0.009, 0.001), "test_mse": (0.111, 0.004), "tau": (0.695, 0.005), "r2": (0.884, 0.003)},
}  # fmt: skip

#: Table 3 left, CelebA attributes: train loss, test loss, test accuracy (%).
TABLE3_ATTRIBUTES = {
    "mlp": {"train_loss": (0.551, 0.000), "test_loss": (0.554, 0.000), "test_acc": (72.4, 0.0)},
    "mlp_oalign": {"train_loss": (0.074, 0.022), "test_loss": (0.333, 0.008), "test_acc": (87.2, 0.5)},
    "mlp_svd": {"train_loss": (0.490, 0.015), "test_loss": (0.509, 0.013), "test_acc": (77.3, 1.3)},
    "mlp_dense": {"train_loss": (0.131, 0.018), "test_loss": (0.267, 0.007), "test_acc": (89.1, 0.4)},
    "glnet": {"train_loss": (0.064, 0.008), "test_loss": (0.232, 0.007), "test_acc": (91.3, 0.1)},
}  # fmt: skip

#: Table 3 right, Imagenette class membership: train loss, test loss, test accuracy (%).
TABLE3_MEMBERSHIP = {
    "mlp": {"train_loss": (0.582, 0.004), "test_loss": (0.709, 0.004), "test_acc": (49.6, 1.3)},
    "mlp_oalign": {"train_loss": (0.002, 0.001), "test_loss": (0.278, 0.008), "test_acc": (87.8, 0.3)},
    "mlp_svd": {"train_loss": (0.581, 0.013), "test_loss": (0.638, 0.013), "test_acc": (65.6, 0.6)},
    "mlp_dense": {"train_loss": (0.019, 0.001), "test_loss": (0.264, 0.011), "test_acc": (88.9, 0.6)},
    "glnet": {"train_loss": (0.019, 0.000), "test_loss": (0.244, 0.005), "test_acc": (90.4, 0.3)},
}  # fmt: skip

#: Table 4, Imagenette dataset size: train loss, test accuracy (%).
TABLE4 = {
    "mlp": {"train_loss": (0.439, 0.030), "test_acc": (20.9, 3.1)},
    "mlp_oalign": {"train_loss": (0.014, 0.004), "test_acc": (35.2, 2.1)},
    "mlp_svd": {"train_loss": (0.082, 0.010), "test_acc": (73.1, 1.6)},
    "mlp_dense": {"train_loss": (0.382, 0.119), "test_acc": (31.6, 4.3)},
    "glnet": {"train_loss": (0.005, 0.003), "test_acc": (46.8, 2.1)},
}

#: Appendix D.3 (percent): equation 38 at the Table 3 membership accuracy, and the
#: measured accuracy of summing class predictions (GL-net only).
D3 = {
    "glnet": {"p": 90.4, "eq38": 46.1, "measured": 46.8, "sum": (43.5, 2.1)},
    "mlp_svd": {"p": 65.6, "eq38": 21.0, "measured": 73.1, "sum": None},
}

#: Table 5, Qwen2-ARC-LoRA (test): data-membership accuracy, val-loss R^2, ARC-C R^2.
TABLE5 = {
    "mlp": {"membership_acc": (0.516, 0.006), "val_loss_r2": (0.113, 0.059), "challenge_r2": (0.107, 0.035)},
    "mlp_oalign": {"membership_acc": (0.550, 0.016), "val_loss_r2": (0.821, 0.078), "challenge_r2": (0.965, 0.004)},
    "mlp_svd": {"membership_acc": (0.551, 0.001), "val_loss_r2": (0.999, 0.000), "challenge_r2": (0.983, 0.002)},
    "mlp_dense": {"membership_acc": (0.625, 0.008), "val_loss_r2": (0.987, 0.003), "challenge_r2": (0.981, 0.002)},
    "glnet": {"membership_acc": (0.605, 0.007), "val_loss_r2": (0.998, 0.000), "challenge_r2": (0.987, 0.001)},
}  # fmt: skip

#: Figures 4 and 5 are plots; the paper states their findings in words.
FIGURE4 = (
    "MLP + Dense and GL-net generalize well to ranks that are unseen during training, but "
    "do face degradation at rank one. On the other hand, MLP + SVD does not generalize well."
)
FIGURE5 = (
    "Every LoL model besides MLP + Dense scales well with the model size [...]. "
    "MLP + Dense runs out of memory for largest inputs."
)
